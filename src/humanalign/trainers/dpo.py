"""`humanalign train dpo`: offline preference optimisation, the DPO family on one loop.

Loss types (``loss_type``; formulas, papers and TRL-parity notes in docs/algorithms/dpo_family.md): sigmoid (DPO;
cDPO with ``label_smoothing``; MiniMind's DPO with ``average_log_prob: true``), hinge, ipo, robust, and the
reference-free cpo, orpo, simpo. ``sft_weight`` adds the chosen response's NLL to the DPO types (DPO+SFT, RPO);
``beta_schedule: linear`` moves beta from beta_min to beta_max over the run.

Each step: one forward of the policy over the chosen and rejected sequences together (a (2B, T) batch; on most
models one row per pair, the prompt computed once, and the LM head only on response tokens: see
``models.logprobs``, the run prints which), the reference's log-probs of the same batch (a frozen model, the
LoRA policy with its adapter off, or precomputed values carried in the batch; none for reference-free losses),
log-probs summed or averaged over response tokens as ``LOSS_SPECS`` says (``average_log_prob`` overrides), then
``compute_preference_loss``. Batches are grouped by the length of the rows computed. Logged per logging
step under train/ and on the validation pairs every ``eval_steps`` under eval/: loss, rewards/chosen,
rewards/rejected, rewards/margins, rewards/accuracies, logps/chosen, logps/rejected, logits/chosen,
logits/rejected, nll (when the loss has an NLL term) and beta. The final policy is saved to
``<output_dir>/final`` as a Hugging Face folder (a PEFT adapter folder for LoRA).

A vision-language policy (``models.vision.is_vision_model``: its config has a vision config) trains on pairs
with images: its processor tokenises them (``data.vision_pairs``), the vision tower stays frozen
(``freeze_vision_tower``), the projector trains (``freeze_projector``), LoRA adapts the language model only, and
every forward, policy and reference, is the plain concatenated one with the pixel values passed through: the
shared-prompt row and the response-only LM head are text-only fast paths (docs/multimodal.md). Precomputed
reference log-probs are refused with images; the final folder holds the processor and loads with
``AutoProcessor`` / ``AutoModelForImageTextToText``.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch

from humanalign.config.dpo import DPOConfig
from humanalign.data.preference_dataset import PairCollator, load_pair_dataset
from humanalign.data.vision_pairs import VisionPairCollator, load_vision_pair_dataset
from humanalign.engine import Engine
from humanalign.errors import ConfigError
from humanalign.losses.preference import LOSS_SPECS, beta_schedule, compute_preference_loss, pair_accuracy
from humanalign.models.load import count_parameters, load_causal_lm, load_tokenizer
from humanalign.models.logprobs import LAYOUT_NOTES, concatenated_forward, pair_layout, shared_layout_possible
from humanalign.models.pretrained import disable_dropout_outside_lora
from humanalign.models.reference import ReferenceModel, build_reference
from humanalign.models.vision import (
    is_vision_model,
    load_processor,
    load_vision_lm,
    max_images_per_prompt,
    model_config,
)


@dataclass(frozen=True)
class LossSettings:
    """What a step computes, resolved once from the config and ``LOSS_SPECS``."""

    loss_type: str
    average: bool  # mean instead of sum of response-token log-probs
    label_smoothing: float = 0.0
    simpo_gamma: float = 0.5
    sft_weight: float = 0.0
    cpo_alpha: float = 1.0
    nll_used: bool = False

    @classmethod
    def from_config(cls, cfg: DPOConfig) -> LossSettings:
        spec = LOSS_SPECS[cfg.loss_type]
        average = spec.average_log_probs if cfg.average_log_prob is None else cfg.average_log_prob
        return cls(loss_type=cfg.loss_type, average=average, label_smoothing=cfg.label_smoothing,
                   simpo_gamma=cfg.simpo_gamma, nll_used=cfg.nll_used(), **cfg.nll_weights())


def current_beta(cfg: DPOConfig, step: int, total_steps: int) -> float:
    """Beta for the optimizer step with 0-based index ``step`` (constant, or MiniMind's linear schedule)."""
    if cfg.beta_schedule == "linear":
        return beta_schedule(step, total_steps, cfg.beta_min, cfg.beta_max)
    return cfg.beta


class PairStep(NamedTuple):
    loss: torch.Tensor  # () differentiable: mean over the batch's pairs
    metrics: dict[str, torch.Tensor]  # each (B,), detached: per-pair values for logging


def pair_loss(
    model: torch.nn.Module,
    reference: ReferenceModel | None,
    batch: Mapping[str, Any],
    settings: LossSettings,
    beta: float,
) -> PairStep:
    """The loss of one ``PairCollator`` batch: one concatenated policy forward, reference log-probs, the loss.

    The NLL term (CPO, ORPO, DPO+SFT) is TRL's: the token-mean negative log-likelihood of the batch's chosen
    responses (a scalar shared by the batch's pairs)."""
    # the reference first: its no-grad forward may go through the same (DDP-wrapped) policy with the adapter off
    ref_chosen, ref_rejected = (None, None) if reference is None else reference.logps(batch, settings.average)
    policy = concatenated_forward(model, batch, average=settings.average)
    counts = policy["chosen_token_counts"]  # (B,)
    chosen_sums = policy["chosen_mean_logps"] * counts  # (B,) summed log-probs whatever ``average`` is
    nll = -chosen_sums.sum() / counts.sum().clamp(min=1)  # () token-mean NLL of the chosen responses
    out = compute_preference_loss(
        settings.loss_type, policy["chosen_logps"], policy["rejected_logps"], ref_chosen, ref_rejected,
        beta=beta, label_smoothing=settings.label_smoothing, chosen_nll=nll, sft_weight=settings.sft_weight,
        cpo_alpha=settings.cpo_alpha, simpo_gamma=settings.simpo_gamma,
    )
    chosen, rejected = out.chosen_rewards, out.rejected_rewards  # (B,) detached
    metrics = {
        "loss": out.losses.detach(),
        "rewards/chosen": chosen,
        "rewards/rejected": rejected,
        "rewards/margins": chosen - rejected,
        "rewards/accuracies": pair_accuracy(chosen - rejected),  # a tie (every pair at the start) counts 1/2
        "logps/chosen": policy["chosen_logps"].detach(),
        "logps/rejected": policy["rejected_logps"].detach(),
        "logits/chosen": policy["chosen_logits_mean"],
        "logits/rejected": policy["rejected_logits_mean"],
    }
    if settings.nll_used:
        metrics["nll"] = nll.detach().expand_as(chosen)
    return PairStep(out.losses.mean(), metrics)


@torch.no_grad()
def evaluate(model, reference, loader, engine, settings: LossSettings, beta: float) -> dict[str, float]:
    """Mean of every per-pair metric over the whole validation set (each pair once, across processes)."""
    was_training = model.training
    model.eval()
    totals: dict[str, torch.Tensor] = {}
    count = 0
    for batch in loader:
        step = pair_loss(model, reference, batch, settings, beta)
        gathered = engine.gather_for_metrics(step.metrics)
        count += int(gathered["loss"].numel())
        for key, value in gathered.items():
            totals[key] = totals.get(key, 0.0) + value.float().sum()
    model.train(was_training)
    values = {f"eval/{key}": float(total) / max(count, 1) for key, total in totals.items()}
    values["eval/beta"] = beta
    return values


def _describe(cfg: DPOConfig, settings: LossSettings) -> str:
    spec = LOSS_SPECS[cfg.loss_type]
    parts = [f"loss {cfg.loss_type}: {spec.summary}", f"{'averaged' if settings.average else 'summed'} log-probs"]
    if cfg.beta_schedule == "linear":
        parts.append(f"beta {cfg.beta_min} -> {cfg.beta_max} (linear)")
    else:
        parts.append(f"beta {cfg.beta}")
    if cfg.label_smoothing:
        parts.append(f"label_smoothing {cfg.label_smoothing}")
    if settings.nll_used:
        weight = settings.cpo_alpha if cfg.loss_type == "cpo" else settings.sft_weight or 1.0
        parts.append(f"NLL weight {weight:g}")
    return "[dpo] " + " | ".join(parts)


class RunInputs(NamedTuple):
    """What ``run`` trains on, text or vision-language alike."""

    policy: torch.nn.Module
    saver: Any  # the tokenizer (text) or processor (vision-language), saved beside the final model
    train_set: Any  # PairDataset or VisionPairDataset
    val_set: Any
    collate: Any
    lengths: Callable[[Any], list[int]]  # tokens per example, for length-grouped batches
    pad_token_id: int


def _text_inputs(cfg: DPOConfig, engine) -> RunInputs:
    tokenizer = load_tokenizer(cfg.policy_model_path, cfg.model)
    train_set = load_pair_dataset(cfg.train_path, cfg.pair_kind, tokenizer, cfg, engine, name=f"train {cfg.train_path}")
    val_set = (load_pair_dataset(cfg.val_path, cfg.pair_kind, tokenizer, cfg, engine, name=f"val {cfg.val_path}")
               if cfg.val_path else None)
    policy = load_causal_lm(cfg.policy_model_path, cfg.model, cfg.lora, gradient_checkpointing=cfg.gradient_checkpointing)
    # group batches by the length of the rows the model will compute: one row per pair (prompt once) or two
    shared = shared_layout_possible(policy)
    return RunInputs(policy, tokenizer, train_set, val_set, PairCollator(tokenizer.pad_token_id),
                     lambda d: d.shared_lengths if shared else d.lengths, tokenizer.pad_token_id)


def _vision_inputs(cfg: DPOConfig, engine) -> RunInputs:
    """A vision-language policy: its processor tokenises the pairs with their images; every forward is the plain
    concatenated one with the pixel values (``models.logprobs``: the text fast paths do not apply)."""
    if cfg.reference_mode == "precomputed" and LOSS_SPECS[cfg.loss_type].needs_reference:
        raise ConfigError("reference_mode precomputed is not supported with a vision-language policy yet (the "
                          "reference log-prob cache is keyed on token ids, not pixels): use model or adapter-disabled")
    processor = load_processor(cfg.policy_model_path, cfg.model)
    limit = max_images_per_prompt(model_config(cfg.policy_model_path, cfg.model), processor, cfg.max_images_per_prompt)
    train_set = load_vision_pair_dataset(cfg.train_path, cfg.pair_kind, processor, cfg, engine,
                                         name=f"train {cfg.train_path}", max_images=limit)
    val_set = (load_vision_pair_dataset(cfg.val_path, cfg.pair_kind, processor, cfg, engine, name=f"val {cfg.val_path}",
                                        max_images=limit)
               if cfg.val_path else None)
    policy = load_vision_lm(cfg.policy_model_path, cfg.model, cfg.lora, freeze_vision_tower=cfg.freeze_vision_tower,
                            freeze_projector=cfg.freeze_projector, gradient_checkpointing=cfg.gradient_checkpointing)
    pad = processor.tokenizer.pad_token_id
    return RunInputs(policy, processor, train_set, val_set, VisionPairCollator(pad), lambda d: d.lengths, pad)


def run(cfg: DPOConfig) -> dict[str, Any]:
    """Train the policy on preference pairs; returns the run summary (also in run_summary.json)."""
    settings = LossSettings.from_config(cfg)
    start = time.time()
    with Engine(cfg, name="dpo") as engine:
        engine.print(_describe(cfg, settings))
        vision = is_vision_model(cfg.policy_model_path, cfg.model)
        inputs = _vision_inputs(cfg, engine) if vision else _text_inputs(cfg, engine)
        policy, train_set, val_set, collate = inputs.policy, inputs.train_set, inputs.val_set, inputs.collate
        if cfg.disable_dropout:
            disable_dropout_outside_lora(policy)
        trainable, total = count_parameters(policy)
        engine.print(f"[dpo] {'vision-language ' if vision else ''}policy {cfg.policy_model_path}: {trainable:,} of "
                     f"{total:,} parameters trained")
        reference = build_reference(cfg, policy, engine, [train_set, val_set], pad_token_id=inputs.pad_token_id)
        engine.print(f"[dpo] reference: {reference.describe() if reference else 'none (reference-free loss)'}")

        train_loader = engine.train_loader(train_set, collate, lengths=inputs.lengths(train_set))
        eval_loader = engine.eval_loader(val_set, collate, lengths=inputs.lengths(val_set)) if val_set else None
        model, _, _ = engine.prepare(policy, train_loader)
        model.train()  # from_pretrained leaves models in eval mode; LoRA dropout needs train mode
        if reference is not None:
            reference.attach(model)
        probe = engine.to_device(collate([train_set[i] for i in range(min(2, len(train_set)))]))
        layout = pair_layout(model, probe)
        engine.print(f"[dpo] pair forward: {LAYOUT_NOTES[layout]}"
                     + (" (images: the text fast paths do not apply)" if vision else ""))

        first_eval = None
        if cfg.eval_on_start and eval_loader is not None and engine.step == 0:
            first_eval = engine.log_eval(evaluate(model, reference, eval_loader, engine, settings,
                                                  current_beta(cfg, 0, engine.total_steps)))
        for micro_batches in engine.train_steps(train_loader):
            beta = current_beta(cfg, engine.step, engine.total_steps)
            for batch in micro_batches:
                with engine.accumulate(model):
                    step = pair_loss(model, reference, batch, settings, beta)
                    engine.backward(step.loss)
                    pairs = step.metrics["loss"].numel()
                    engine.record({f"train/{k}": v.mean() for k, v in step.metrics.items()}, weight=pairs)
            engine.record({"train/beta": beta})
            engine.optimizer_step()
            if eval_loader is not None and engine.should_evaluate():
                engine.log_eval(evaluate(model, reference, eval_loader, engine, settings,
                                         current_beta(cfg, engine.step, engine.total_steps)))
            if engine.should_save():
                engine.save_checkpoint()

        summary: dict[str, Any] = {
            "loss_type": cfg.loss_type,
            "reference": reference.describe() if reference else None,
            "average_log_prob": settings.average,
            "train_pairs": len(train_set),
            "val_pairs": len(val_set) if val_set else 0,
            "skipped": {"train": dict(train_set.skipped), "val": dict(val_set.skipped) if val_set else {}},
            "truncation": {"train": train_set.truncation.as_dict(),
                           "val": val_set.truncation.as_dict() if val_set else {}},
            "eval_on_start": first_eval,
        }
        if vision:
            summary["vision"] = {"pair_forward": layout, "images": {"train": train_set.images,
                                                                    "val": val_set.images if val_set else 0}}
        final = engine.finish(model, inputs.saver, summary=summary)
        summary.update({"final_model": str(final), "steps": engine.step, "seconds": round(time.time() - start, 1),
                        "eval": engine.last_eval[1] if engine.last_eval else None})
    return summary


__all__ = ["LossSettings", "PairStep", "RunInputs", "current_beta", "pair_loss", "evaluate",
           "run"]
