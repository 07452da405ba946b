"""`humanalign train rm`: the Helpful-RM (reward model) and the Harmless cost model, on the shared engine.

``task: helpful`` trains a reward model on helpful pairs with the Bradley-Terry loss (optional per-pair margin,
score regularisation, TRL-style centering); ``task: harmless`` trains a cost model on harmless pairs with Safe
RLHF's loss: the pairwise term plus the sign terms that put safe answers below cost 0 and unsafe ones above it
(``losses/reward_cost.py``). ``loss_granularity: token`` uses Safe RLHF's token-wise versions (decoders only).

Inputs are built by ``encode_score_pair``, the function ``Scorer`` uses, so a trained model sees at scoring time
exactly what it saw in training; the effective ``max_length`` / ``max_prompt_length`` are saved with the model.
The pair forward computes the shared prompt once per pair (``data.score_rows``: one row per pair, prompt +
chosen + rejected, a 4-D mask, the head on each answer's last token) when the model allows it and a self-check
on two training pairs reproduces the plain forward's scores; else (encoders, flash attention or sliding windows,
sharded parameters, the token-wise loss) it forwards the chosen and rejected rows. The run log says which.
The score normaliser's statistics (``normalizer``: running mean/var or EMA) are updated from every training
micro-batch's end scores, gathered across processes so that every rank holds the same statistics; they are
checkpointed with the run and saved in the model's config.json.

Harmless pairs without ``is_safe`` labels (hh-rlhf harmless-base, a generic file without safety fields) train
on the ordering alone: the sign terms are off for them, which the run says in one line. A pair whose safety
labels contradict its order is rejected while reading (file, line, field).

A vision-language base model (``models.vision.is_vision_model``) trains a ``VisionScoreModel``
(``models.vision_score``: the VLM's hidden states + a scalar head, the vision tower frozen by default, LoRA on the
language model) on pairs read with their images, tokenised and batched by the processor (``data.vision_pairs``,
``VisionScoreCollator``); the forward is the plain one, and the model is saved as that module describes.

The final model is a plain ``*ForSequenceClassification`` folder in ``<output_dir>/final``, as every trainer
saves it, so ``AutoModelForSequenceClassification.from_pretrained(<output_dir>/final)`` loads it; a run folder
stands for its ``final/`` model wherever a model is expected (``load_scorer(output_dir)``, the other commands'
``helpful_rm_path`` / ``cost_model``). Run folders of earlier versions, with the model at their top level, still
load; training into one again (resumed or overwritten) removes that copy once ``final/`` holds the new model.
``final_metrics.json`` holds the final validation accuracy (and, for cost models, sign accuracy).
A cost model is then sign-calibrated (``calibrate_sign``, models/calibration.py): the offset that best splits the
validation answers' safe from unsafe is saved with it, and ``sign_calibration`` in the summary gives the sign
accuracy at the raw 0 and at the calibrated one.
"""

from __future__ import annotations

import math
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from accelerate.utils import DistributedType

from humanalign.config.rm import RewardModelConfig
from humanalign.data.io import atomic_write_json
from humanalign.data.records import PreferencePair
from humanalign.data.score_pairs import load_pairs, pair_length
from humanalign.data.score_rows import SHARED_ROWS_KEY, ScorePairCollator
from humanalign.data.tokenize import CHATML_TEMPLATE
from humanalign.engine import Engine
from humanalign.engine import checkpoint as ckpt
from humanalign.engine.data import EncodedDataset
from humanalign.errors import ConfigError, UserError
from humanalign.eval.rm import rm_metrics
from humanalign.losses.reward_cost import (
    ScoreLoss,
    cost_loss,
    cost_tokenwise_loss,
    first_divergence_index,
    reward_pairwise_loss,
    reward_tokenwise_loss,
)
from humanalign.models.calibration import choose_sign_offset, costs_and_labels, write_sign_calibration
from humanalign.models.load import count_parameters
from humanalign.models.score_model import (
    ScoreNormalizer,
    is_score_model_dir,
    load_score_model,
    save_score_model,
    score_param_groups,
)
from humanalign.models.scorer import _position_limit
from humanalign.models.vision import is_vision_model, load_processor, max_images_per_prompt, model_config
from humanalign.models.vision_score import VisionScoreModel, load_vision_score_model, save_vision_score_model
from humanalign.trainers.reward_data import (
    IMAGE_INPUTS,
    NAME,
    VisionScoreCollator,
    prepare_score_data,
    prepare_vision_score_data,
    vision_pair_length,
)

FINAL_METRICS_FILE = "final_metrics.json"
NORMALIZER_STATE = "score_normalizer"
# train metrics of the loss functions that are logged (min/max of a micro-batch average into nothing useful)
REWARD_METRICS = ("accuracy", "margin", "reward_chosen", "reward_rejected", "reward_mean")
COST_METRICS = ("accuracy", "margin", "cost_safer", "cost_unsafer", "labeled_fraction")


# ----------------------------------------------------------------------------------------------- loss


@dataclass(frozen=True)
class LossSettings:
    task: str  # helpful | harmless
    granularity: str  # sequence | token
    regularization: float = 0.0
    center_coef: float = 0.0
    use_margin: bool = True
    use_sign_terms: bool = True


def score_pair_loss(output, batch: dict[str, Any], settings: LossSettings) -> ScoreLoss:
    """Per-pair losses (B,) and metrics of one ``collate_pairs`` batch (rows 0..B-1 chosen, B..2B-1 rejected)
    from the score model's output. For the cost task ``chosen`` is the safer response."""
    n = batch["input_ids"].shape[0] // 2
    if settings.granularity == "sequence":
        end = output.end_scores  # (2B,)
        if settings.task == "helpful":
            margin = batch.get("margin") if settings.use_margin else None
            return reward_pairwise_loss(end[:n], end[n:], margin=margin, regularization=settings.regularization,
                                        center_coef=settings.center_coef)
        return cost_loss(end[:n], end[n:], batch["is_chosen_safe"], batch["is_rejected_safe"],
                         regularization=settings.regularization, use_sign_terms=settings.use_sign_terms)
    scores, ids, mask = output.scores, batch["input_ids"], batch["attention_mask"]  # (2B, T) each
    divergence = first_divergence_index(ids[:n], ids[n:], mask[:n], mask[n:])  # (B,)
    if settings.task == "helpful":
        return reward_tokenwise_loss(scores[:n], scores[n:], mask[:n], mask[n:], divergence,
                                     regularization=settings.regularization)
    return cost_tokenwise_loss(scores[:n], scores[n:], mask[:n], mask[n:], divergence, batch["is_chosen_safe"],
                               batch["is_rejected_safe"], regularization=settings.regularization,
                               use_sign_terms=settings.use_sign_terms)


def forward_scores(model, batch: dict[str, Any]):
    """The score model's output on a pair batch: from its shared-prompt rows when the collator built them
    (``ScorePairCollator``; end scores only), else the plain forward of its (2B, T) rows (with their pixel
    values for a vision-language model: ``VisionScoreCollator``)."""
    return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                 shared_rows=batch.get(SHARED_ROWS_KEY), **batch.get(IMAGE_INPUTS, {}))


@torch.no_grad()
def shared_rows_agree(model, probe: dict[str, Any], tolerance: float) -> bool:
    """Whether the shared-prompt end scores of ``probe`` (a pair batch with its ``SHARED_ROWS_KEY`` rows, on the
    model's device) match the plain forward's within ``tolerance`` (relative, absolute below 1), in eval mode
    (no dropout, so no random numbers are drawn)."""
    was_training = model.training
    model.eval()
    try:
        plain = model(input_ids=probe["input_ids"], attention_mask=probe["attention_mask"]).end_scores  # (2B,)
        shared = forward_scores(model, probe).end_scores  # (2B,)
    finally:
        model.train(was_training)
    return bool(((shared - plain).abs() <= tolerance * plain.abs().clamp(min=1)).all())


def pick_pair_layout(cfg: RewardModelConfig, engine: Engine, model, score_model, collate: ScorePairCollator,
                     features: Sequence[dict[str, Any]]) -> str:
    """Turn the collator's shared-prompt rows on when ``model`` can score pairs that way and, on the first two
    training pairs, gives the plain forward's end scores; else every batch takes the plain forward. Says which
    in the run log and returns "shared" or "plain"."""
    refusal = score_model.shared_prompt_refusal()
    if refusal is None and cfg.loss_granularity == "token":
        refusal = "the token-wise loss reads the score at every position of both rows"
    if refusal is None and (engine.distributed_type == DistributedType.FSDP or engine.zero_stage == 3):
        refusal = "sharded parameters (FSDP, ZeRO-3): not checked with the shared-prompt rows"
    if refusal is None:
        collate.shared = True
        probe = engine.to_device(collate(list(features[:2])))
        low_precision = cfg.mixed_precision not in ("no", "auto") or any(
            p.dtype in (torch.bfloat16, torch.float16) for p in score_model.parameters())
        tolerance = 5e-2 if low_precision else 1e-3
        agree = shared_rows_agree(model, probe, tolerance)
        if not agree and score_model.end_rows_only:  # the whole last layer, before giving the layout up
            score_model.end_rows_only = False
            agree = shared_rows_agree(model, probe, tolerance)
        if not agree:
            collate.shared = False
            refusal = "the shared-prompt rows did not reproduce the plain forward's scores on two training pairs"
    if refusal is None:
        ends = score_model.last_layer_at_ends()
        last = "the last layer and the head on the 2 end tokens" if ends else "the head on the 2 end tokens"
        engine.print(f"[{NAME}] pair forward: one row per pair (the prompt once, 4-D mask), {last}")
        return "shared"
    engine.print(f"[{NAME}] pair forward: plain (chosen and rejected rows, the prompt twice): {refusal}")
    return "plain"


def val_scores(engine: Engine, model, loader, settings: LossSettings) -> tuple[list, ...]:
    """Per-pair losses, chosen and rejected end scores and (harmless) the answers' is_safe labels (None when
    unlabelled) over the whole validation set, gathered from every process."""
    was_training = model.training
    model.eval()
    losses, chosen, rejected, chosen_safe, rejected_safe = [], [], [], [], []
    with torch.no_grad():
        for batch in loader:
            output = forward_scores(model, batch)
            n = batch["input_ids"].shape[0] // 2
            per_pair = score_pair_loss(output, batch, settings).losses
            values = [per_pair.float(), output.end_scores[:n].float(), output.end_scores[n:].float()]
            if settings.task == "harmless":
                values += [batch["is_chosen_safe"].float(), batch["is_rejected_safe"].float()]
            gathered = engine.gather_for_metrics(tuple(values))
            losses += gathered[0].tolist()
            chosen += gathered[1].tolist()
            rejected += gathered[2].tolist()
            if settings.task == "harmless":
                chosen_safe += [None if v < 0 else v > 0.5 for v in gathered[3].tolist()]
                rejected_safe += [None if v < 0 else v > 0.5 for v in gathered[4].tolist()]
    model.train(was_training)
    return losses, chosen, rejected, chosen_safe, rejected_safe


def evaluate(engine: Engine, model, loader, settings: LossSettings) -> dict[str, float]:
    """Loss, pair accuracy and mean scores over the whole validation set; for cost models with labels also the
    sign accuracy and the AUC (the same ``rm_metrics`` as `humanalign eval rm`)."""
    losses, chosen, rejected, chosen_safe, rejected_safe = val_scores(engine, model, loader, settings)
    score_type = "reward" if settings.task == "helpful" else "cost"
    m = rm_metrics(chosen, rejected, chosen_safe or None, rejected_safe or None, score_type=score_type)
    finite = [x for x in losses if math.isfinite(x)]
    out = {"loss": sum(finite) / max(len(finite), 1), "accuracy": m["accuracy"], "margin":
           m["mean_chosen_minus_rejected"], "score_chosen": m["mean_chosen"], "score_rejected": m["mean_rejected"],
           "pairs": float(m["pairs"])}
    if score_type == "cost":
        out["margin"] = -out["margin"]  # cost(unsafer) - cost(safer), positive when right, as in training
        out["sign_accuracy"] = m["sign_accuracy"]
        out["auc"] = m["auc"]
    return {k: float(v) for k, v in out.items() if v is not None}


# ----------------------------------------------------------------------------------------------- model


class NormalizerState:
    """Checkpoint adapter (state_dict / load_state_dict) around a ``ScoreNormalizer``, restored in place."""

    def __init__(self, normalizer):
        self.normalizer = normalizer

    def state_dict(self) -> dict[str, Any]:
        return self.normalizer.to_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        restored = ScoreNormalizer.from_dict(state)
        for key in ("kind", "momentum", "epsilon", "mean", "var", "count"):
            setattr(self.normalizer, key, getattr(restored, key))


def encoder_pair_template(sep: str) -> str:
    """A chat template that renders a conversation the way BERT-style encoders read text pairs: every message's
    text followed by the separator, the final answer without one (``encode_score_input`` closes it), so a score
    input is ``[CLS] prompt [SEP] answer [SEP]``. Prefix-stable, as the loss masks require."""
    return ("{%- for message in messages -%}"
            "{%- if message['role'] == 'assistant' -%}{{ message['content'] }}"
            f"{{%- if not loop.last %}}{{{{ ' {sep} ' }}}}{{%- endif -%}}"
            f"{{%- else -%}}{{{{ message['content'] + ' {sep} ' }}}}{{%- endif -%}}"
            "{%- endfor -%}")


def use_encoder_template(cfg: RewardModelConfig, score_model, tokenizer, say: Callable[[str], None]) -> None:
    """An encoder without a chat template of its own (``model.chat_template: auto`` fell back to ChatML, whose
    markers an encoder's vocabulary splits into ~30 word pieces per input) gets ``encoder_pair_template``
    instead. The template is saved with the model, so ``Scorer`` renders inputs the same way."""
    chatml = (CHATML_TEMPLATE, CHATML_TEMPLATE.replace("'<|im_end|>'", "eos_token"))
    if (not score_model.is_encoder or cfg.model.chat_template != "auto" or tokenizer.sep_token is None
            or tokenizer.cls_token is None or getattr(tokenizer, "chat_template", None) not in chatml):
        return
    tokenizer.chat_template = encoder_pair_template(tokenizer.sep_token)
    say(f"[{NAME}] the encoder has no chat template: it reads {tokenizer.cls_token} prompt {tokenizer.sep_token} "
        f"answer {tokenizer.sep_token} (set model.chat_template to choose another)")


def effective_lengths(cfg: RewardModelConfig, score_model, tokenizer, say: Callable[[str], None]) -> tuple[int, int]:
    """max_length capped at what an encoder's positions allow (the same cap ``Scorer`` applies), and a
    max_prompt_length below it (half of it when the configured one does not fit, as ``Scorer`` does)."""
    max_length = min(cfg.max_length, _position_limit(score_model, tokenizer))
    if max_length < cfg.max_length:
        say(f"[{NAME}] max_length {cfg.max_length} -> {max_length}: the encoder reads at most {max_length} tokens")
    max_prompt_length = cfg.max_prompt_length if cfg.max_prompt_length < max_length else max_length // 2
    return max_length, max_prompt_length


def check_backbone(cfg: RewardModelConfig, score_model) -> None:
    if cfg.loss_granularity == "token" and score_model.layout == "vision":
        raise ConfigError("loss_granularity: token is not supported for a vision-language score model yet; "
                          "use sequence")
    if cfg.loss_granularity == "token" and score_model.layout != "decoder":
        raise ConfigError("loss_granularity: token needs a decoder backbone (a causal LM scores every token); "
                          f"{cfg.base_model_path} is an encoder that scores its first token: use sequence")


def score_groups(cfg: RewardModelConfig, score_model) -> list[dict] | None:
    """Parameter groups with per-group learning rates when ``head_lr_multiplier`` or ``layer_lr_decay`` asks for
    them (``score_param_groups``); None otherwise, so the engine builds its default groups (and checkpoints of
    earlier runs keep their two-group layout). The engine builds the optimizer over them: its AdamW, or under
    a DeepSpeed config with an ``optimizer`` section DeepSpeed's own (CPU Adam)."""
    if cfg.head_lr_multiplier == 1.0 and cfg.layer_lr_decay == 1.0:
        return None
    return score_param_groups(score_model, cfg.learning_rate, cfg.weight_decay,
                              head_lr_multiplier=cfg.head_lr_multiplier, layer_lr_decay=cfg.layer_lr_decay)


def remove_legacy_model(run_dir: Path, final: Path) -> list[str]:
    """Delete the model files that an earlier version saved at the run folder's top level (``config.json``
    first, so no reader sees the old config without its weights) once ``final`` holds the new model: the
    folder then stands for ``final/``, not for the stale copy. Returns the names removed (none for a run folder
    of this version: its top level holds no model)."""
    if not is_score_model_dir(run_dir):
        return []
    names = {p.name for p in final.iterdir() if p.is_file()}  # what the new save wrote, and any weight shards
    names |= {p.name for pattern in ("model*.safetensors", "model.safetensors.index.json")
              for p in run_dir.glob(pattern)}
    removed = sorted((n for n in names if (run_dir / n).is_file()), key=lambda n: (n != "config.json", n))
    for name in removed:
        (run_dir / name).unlink()
    return removed


# ----------------------------------------------------------------------------------------------- run


class ScoreModelTrainer:
    """One reward / cost model run on the engine: the model and its data (``__init__``), the micro-batch step,
    the loop with its timed evaluations, then the final model and its summary (``finish``)."""

    def __init__(self, cfg: RewardModelConfig, engine: Engine, train_pairs: Sequence[PreferencePair],
                 val_pairs: Sequence[PreferencePair], skipped: dict[str, Counter[str]], sources: dict[str, str]):
        self.cfg, self.engine = cfg, engine
        self.normalizer = ScoreNormalizer(cfg.normalizer, cfg.normalizer_momentum)
        self.vision = is_vision_model(cfg.base_model_path, cfg.model)
        score_model, collate, length_of = (self._vision_model_and_data if self.vision else self._text_model_and_data)(
            train_pairs, val_pairs, skipped, sources)
        if engine.is_main_process:
            atomic_write_json(engine.run_dir / "data_stats.json", self.data.stats)
        trainable, total = count_parameters(score_model)
        engine.print(f"[{NAME}] {cfg.score_type} model on {cfg.base_model_path} ({score_model.layout}): "
                     f"{trainable:,} of {total:,} parameters trained" + (" (LoRA)" if cfg.lora.enabled else "")
                     + f", {cfg.loss_granularity}-wise loss")
        if self.vision:
            engine.print(f"[{NAME}] vision-language score model, trainable: {score_model.describe()} (images: the "
                         "shared-prompt fast path does not apply)")
        self.settings = LossSettings(
            task=cfg.task, granularity=cfg.loss_granularity, regularization=cfg.regularization,
            center_coef=cfg.center_rewards_coefficient, use_margin=cfg.use_margin,
            use_sign_terms=cfg.use_sign_terms and (cfg.task == "helpful" or self.data.labelled_train > 0))
        self.metric_keys = REWARD_METRICS if cfg.task == "helpful" else COST_METRICS
        train_set = EncodedDataset(self.data.train, length_of)
        self.train_loader = engine.train_loader(train_set, collate, lengths=train_set.lengths())
        self.eval_loader = None
        if self.data.val:
            val_set = EncodedDataset(self.data.val, length_of)
            self.eval_loader = engine.eval_loader(val_set, collate, lengths=val_set.lengths())
        engine.register_state(NORMALIZER_STATE, NormalizerState(self.normalizer))
        self.model, _, _ = engine.prepare(score_model, self.train_loader, groups=score_groups(cfg, score_model))
        self.pair_forward = pick_pair_layout(cfg, engine, self.model, score_model, collate, self.data.train)
        self.eval_seconds = self.eval_cpu = 0.0  # wall and process CPU time spent evaluating

    def _text_model_and_data(self, train_pairs, val_pairs, skipped, sources):
        """A text score model (``load_score_model``) and its pairs encoded as ``Scorer`` encodes them."""
        cfg, engine = self.cfg, self.engine
        score_model, self.tokenizer = load_score_model(cfg.base_model_path, cfg.model, cfg.lora,
                                                       score_type=cfg.score_type, normalizer=self.normalizer)
        check_backbone(cfg, score_model)
        use_encoder_template(cfg, score_model, self.tokenizer, engine.print)
        self.max_length, self.max_prompt_length = effective_lengths(cfg, score_model, self.tokenizer, engine.print)
        self.data = prepare_score_data(cfg, self.tokenizer, encoder=score_model.is_encoder,
                                       max_length=self.max_length, max_prompt_length=self.max_prompt_length,
                                       train_pairs=train_pairs, val_pairs=val_pairs, skipped=skipped,
                                       sources=sources, say=engine.print)
        # shared rows: turned on by pick_pair_layout
        return score_model, ScorePairCollator(score_model.pad_token_id), pair_length

    def _vision_model_and_data(self, train_pairs, val_pairs, skipped, sources):
        """A vision-language score model (``models.vision_score``: frozen tower, LoRA on the language model)
        and its pairs tokenised with their images by the processor (saved as ``self.tokenizer``)."""
        cfg = self.cfg
        score_model, self.tokenizer = load_vision_score_model(
            cfg.base_model_path, cfg.model, cfg.lora, score_type=cfg.score_type, normalizer=self.normalizer,
            freeze_vision_tower=cfg.freeze_vision_tower, freeze_projector=cfg.freeze_projector)
        check_backbone(cfg, score_model)
        self.max_length, self.max_prompt_length = cfg.max_length, cfg.max_length  # the prompt is never cut
        self.data = prepare_vision_score_data(cfg, self.tokenizer, train_pairs=train_pairs, val_pairs=val_pairs,
                                              skipped=skipped, sources=sources, say=self.engine.print)
        return score_model, VisionScoreCollator(self.tokenizer.tokenizer.pad_token_id), vision_pair_length

    def step(self, batch: dict[str, Any]) -> None:
        """Forward, loss and backward of one micro-batch; the normaliser learns from its end scores."""
        engine = self.engine
        with engine.accumulate(self.model):
            output = forward_scores(self.model, batch)
            result = score_pair_loss(output, batch, self.settings)
            loss = result.losses.mean()
            engine.backward(loss)
            self.normalizer.update(engine.gather(output.end_scores.detach()))
            engine.record({"loss": loss, **{k: result.metrics[k] for k in self.metric_keys}})
            if self.cfg.task == "harmless":  # over the labelled responses only (weight 0 when none)
                sign = result.metrics["sign_accuracy"]
                labelled = result.metrics["labeled_fraction"] * 2 * result.losses.shape[0]
                engine.record({"sign_accuracy": torch.nan_to_num(sign)}, weight=labelled)

    def run_eval(self) -> dict[str, float]:
        """Evaluate and log, adding the time it took to the evaluation totals."""
        began, began_cpu = time.perf_counter(), time.process_time()
        values = self.engine.log_eval(evaluate(self.engine, self.model, self.eval_loader, self.settings))
        self.eval_seconds += time.perf_counter() - began
        self.eval_cpu += time.process_time() - began_cpu
        return values

    def train(self) -> dict[str, Any]:
        """The training loop, then ``finish``; returns the summary that ``final_metrics.json`` holds."""
        cfg, engine = self.cfg, self.engine
        loop_start, loop_cpu, first_step = time.perf_counter(), time.process_time(), engine.step
        start_eval = None
        if self.eval_loader is not None and cfg.eval_on_start and engine.step == 0:
            start_eval = self.run_eval()
        self.model.train()
        for micro_batches in engine.train_steps(self.train_loader):
            for batch in micro_batches:
                self.step(batch)
            engine.optimizer_step()
            if self.eval_loader is not None and engine.should_evaluate():
                self.run_eval()
            if engine.should_save():
                engine.save_checkpoint()
        loop_seconds, loop_cpu = time.perf_counter() - loop_start, time.process_time() - loop_cpu
        return self.finish(start_eval, loop_seconds, loop_cpu, engine.step - first_step)

    def save_fn(self, unwrapped, folder: Path, state_dict: dict | None) -> None:
        """The engine's final save: the score model with its normaliser and the lengths it was trained with."""
        cfg = self.cfg
        extra = {"max_length": self.max_length, "max_prompt_length": self.max_prompt_length, "task": cfg.task,
                 "loss_granularity": cfg.loss_granularity, "base_model": cfg.base_model_path}
        kwargs = {"state_dict": state_dict} if state_dict is not None else {}
        if isinstance(unwrapped, VisionScoreModel):
            save_vision_score_model(unwrapped, self.tokenizer, folder, normalizer_state=self.normalizer,
                                    score_type=cfg.score_type, extra=extra, **kwargs)
            return
        save_score_model(unwrapped, self.tokenizer, folder, normalizer_state=self.normalizer,
                         score_type=cfg.score_type, extra=extra, **kwargs)

    def finish(self, start_eval: dict[str, float] | None, loop_seconds: float, loop_cpu: float,
               steps_this_run: int) -> dict[str, Any]:
        """Save the final model (the best checkpoint's with load_best_model_at_end) into ``<run>/final``, measure
        it on the validation set, and write ``final_metrics.json``."""
        cfg, engine = self.cfg, self.engine
        best = engine.best_checkpoint
        loaded_best = bool(cfg.load_best_model_at_end and best and (engine.run_dir / best).is_dir())
        if loaded_best:  # the weights come back in finish(); the statistics that go with them come back here
            extra = engine.run_dir / best / ckpt.EXTRA_FILE
            if extra.is_file():
                state = torch.load(extra, weights_only=True)[NORMALIZER_STATE]
                NormalizerState(self.normalizer).load_state_dict(state)
        summary = self.summary(start_eval, loop_seconds, loop_cpu, steps_this_run)  # the restored normaliser
        final = engine.finish(self.model, self.tokenizer, save_fn=self.save_fn, summary={NAME: summary})
        final_eval = engine.last_eval[1] if engine.last_eval else None
        if loaded_best and self.eval_loader is not None:  # the saved model is the best checkpoint's: measure it
            measured = evaluate(engine, self.model, self.eval_loader, self.settings)
            final_eval = {f"eval/{k}": v for k, v in measured.items()}
        summary["eval"] = final_eval
        summary["best_checkpoint"] = best if loaded_best else None
        summary["model"] = str(final)
        choice = self.sign_offset_choice()
        if engine.is_main_process:
            removed = remove_legacy_model(engine.run_dir, final)
            if removed:
                engine.print(f"[{NAME}] removed the model an earlier version saved at the top of {engine.run_dir} "
                             f"({len(removed)} files): the run folder now stands for {final}")
            if choice is not None:  # the saved folder's scores move; the eval above is of the uncalibrated ones
                summary["sign_calibration"] = write_sign_calibration(final, choice)
                engine.print(calibration_line(summary["sign_calibration"]))
            atomic_write_json(engine.run_dir / FINAL_METRICS_FILE, summary)
        engine.wait()
        engine.print(final_line(summary))
        return summary

    def sign_offset_choice(self) -> dict[str, Any] | None:
        """The cost model's sign offset on the validation split's labelled answers (``calibrate_sign``; null:
        on for cost models whose validation pairs carry labels), or None."""
        cfg = self.cfg
        if cfg.task != "harmless" or cfg.calibrate_sign is False or self.eval_loader is None:
            return None
        _, chosen, rejected, chosen_safe, rejected_safe = val_scores(self.engine, self.model, self.eval_loader,
                                                                     self.settings)
        costs, unsafe = costs_and_labels(chosen, rejected, chosen_safe, rejected_safe)
        if not costs:
            if cfg.calibrate_sign:
                raise UserError(f"calibrate_sign: the validation pairs ({cfg.val_path}) carry no is_safe labels")
            return None
        return choose_sign_offset(costs, unsafe)

    def summary(self, start_eval: dict[str, float] | None, loop_seconds: float, loop_cpu: float,
                steps_this_run: int) -> dict[str, Any]:
        cfg, engine, harmless = self.cfg, self.engine, self.cfg.task == "harmless"
        return {
            "task": cfg.task, "score_type": cfg.score_type, "base_model": cfg.base_model_path,
            "steps": engine.step, "pair_forward": self.pair_forward, "vision": self.vision, "train_pairs": len(self.data.train), "val_pairs": len(self.data.val),
            "labelled_train_pairs": self.data.labelled_train if harmless else None,
            "sign_terms": self.settings.use_sign_terms if harmless else None,
            "max_length": self.max_length, "max_prompt_length": self.max_prompt_length,
            "train": engine.last_train_metrics,
            "eval_on_start": start_eval,
            "normalizer": self.normalizer.to_dict(),
            "skipped_nonfinite": engine.nonfinite_skipped,
            # the loop's time without evaluations (checkpoints included), over the steps this process ran
            "train_seconds": round(loop_seconds - self.eval_seconds, 2), "eval_seconds": round(self.eval_seconds, 2),
            "train_cpu_seconds": round(loop_cpu - self.eval_cpu, 2), "eval_cpu_seconds": round(self.eval_cpu, 2),
            "steps_this_run": steps_this_run,
        }


def train_score_model(
    cfg: RewardModelConfig,
    train_pairs: Sequence[PreferencePair],
    val_pairs: Sequence[PreferencePair] = (),
    *,
    skipped: dict[str, Counter[str]] | None = None,
    sources: dict[str, str] | None = None,
) -> dict[str, Any]:
    """Train a reward (task helpful) or cost (task harmless) model on in-memory pairs; see the module docstring.

    ``run`` reads the pairs from the config's paths; scripts and benchmarks that build their own split call
    this directly. Returns the summary that ``final_metrics.json`` holds."""
    skipped, sources = skipped or {}, dict(sources or {})
    sources.setdefault("train", "training pairs")
    sources.setdefault("val", "validation pairs")
    with Engine(cfg, name=NAME) as engine:
        return ScoreModelTrainer(cfg, engine, train_pairs, val_pairs, skipped, sources).train()


def final_line(summary: dict[str, Any]) -> str:
    ev = summary.get("eval")
    if not ev:
        return f"[{NAME}] final model in {summary['model']} (no validation set: no final accuracy)"
    parts = [f"accuracy {ev['eval/accuracy']:.4f}"]
    if "eval/sign_accuracy" in ev:
        parts.append(f"sign accuracy {ev['eval/sign_accuracy']:.4f}")
    parts.append(f"loss {ev['eval/loss']:.4f}")
    return (f"[{NAME}] final validation ({int(ev['eval/pairs'])} pairs): " + ", ".join(parts)
            + f" | model: {summary['model']}")


def calibration_line(block: dict[str, Any]) -> str:
    where = "folded into the head bias" if block["folded_into_head_bias"] else "saved in config.json"
    name = block["objective"].replace("_", " ")
    return (f"[{NAME}] sign calibration on {block['answers']} labelled validation answers: offset "
            f"{block['offset']:+.4f} ({where}); {name} {block['before'][block['objective']]:.4f} at cost 0 -> "
            f"{block['after'][block['objective']]:.4f} at the calibrated 0")


def run(cfg: RewardModelConfig) -> dict[str, Any]:
    """`humanalign train rm`: read the task's train/val pairs, train, save the score model in output_dir/final."""
    images = is_vision_model(cfg.base_model_path, cfg.model)  # a vision-language score model reads image pairs
    limit = (max_images_per_prompt(model_config(cfg.base_model_path, cfg.model),
                                   load_processor(cfg.base_model_path, cfg.model), cfg.max_images_per_prompt)
             if images else None)
    train_pairs, train_skipped = load_pairs(cfg, cfg.train_path, cfg.max_train_samples, allow_images=images,
                                            max_images=limit)
    val_pairs, val_skipped = [], Counter()
    if cfg.val_path:
        val_pairs, val_skipped = load_pairs(cfg, cfg.val_path, cfg.max_eval_samples, allow_images=images,
                                            max_images=limit)
    sources = {"train": cfg.train_path, "val": cfg.val_path or ""}
    return train_score_model(cfg, train_pairs, val_pairs, skipped={"train": train_skipped, "val": val_skipped},
                             sources=sources)


__all__ = [
    "LossSettings", "score_groups", "NormalizerState", "ScoreModelTrainer", "evaluate", "score_pair_loss",
    "train_score_model", "run",
]
