"""`humanalign train safe-mm-dpo`: margin-scaled DPO on a helpful and a harmless stream, balanced by a Lagrange
multiplier raised by dual ascent while the policy's expected cost is above a threshold.

The method, its symbols and ablations: docs/algorithms/safe_mm_dpo.md. Below it, the two-stream data
(``data/joint_pairs.py``) and the margins with their checks (``models/margins.py``); this file reads top to
bottom: config helpers, data loading, the step (one shared forward of both streams), evaluation, the dual
update (and J_c sampled from the policy), and the loop (``run`` and its stages):

1. load helpful and harmless pairs (train, val) and tokenise them; score every pair once with the Helpful-RM and
   the cost model (cached on disk): per-pair margins delta_h, delta_s and costs C(y_w), C(y_l);
2. pair every helpful pair with a harmless pair (the same record's, when both streams hold the same prompt and
   responses, so each distinct response is forwarded once per step);
3. each step: per micro-batch one policy forward and one reference forward over the batch's distinct sequences,
   per-pair betas from the margins, L = (L_help + lambda L_safe) / (1 + lambda) + kl_coeff KL;
4. after each optimizer step: the harmless pairs' expected costs J (pairwise) enter a window of recent pairs,
   and every ``lambda_update_interval`` steps after ``lambda_update_delay_steps``
   lambda <- clamp(lambda + lambda_lr (J_c - d), 0, lambda_max);
5. evaluation on the validation pairs (before training too, with ``eval_on_start``), checkpoints carrying lambda
   and its window, the final policy in ``<output_dir>/final``, and ``final_metrics.json``: held-out implicit
   accuracies of both streams and expected cost before and after, and lambda's path.

Metrics (train/ per logging step, eval/ on the validation pairs): loss_total, loss_helpful, loss_safety,
loss_kl, reward_helpful_mean, reward_safety_mean (implicit reward margins beta * h), delta_helpful_mean,
delta_safety_mean (reward-model margins), lambda, beta_helpful_mean, beta_safety_mean, kl_divergence,
perplexity (of the preferred responses), expected_cost, accuracy_helpful, accuracy_safety.

A vision-language policy (``models.vision.is_vision_model``) trains on helpful and harmless pairs with images,
with the same config: its processor tokenises both streams (``data.vision_joint``: pairs share rows only when
their images are the same too), the parts train as ``freeze_vision_tower`` / ``freeze_projector`` and LoRA say,
and every forward, policy and reference (a frozen copy or the adapter-disabled policy), is the plain
concatenated one with the pixel values: the text fast paths and the fused KL do not apply (docs/multimodal.md).
A text-only reward or cost model would score the answers without their pictures, so it is refused (margins 0
and label costs work); so are precomputed reference log-probs and ``expected_cost: sampled``.
"""

from __future__ import annotations

import math
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from functools import partial
from typing import Any, NamedTuple

import torch
from accelerate.utils import broadcast_object_list

from humanalign.config.safe_mm_dpo import SafeMMDPOConfig
from humanalign.data.io import atomic_write_json
from humanalign.data.joint_pairs import (
    COST_CHOSEN,
    COST_REJECTED,
    DELTA,
    HARMLESS,
    HAS_COST,
    HELPFUL,
    PREFERRED_ROWS,
    JointCollator,
    JointDataset,
    StreamView,
    build_joint_dataset,
)
from humanalign.data.preference_dataset import PairDataset, load_pair_dataset
from humanalign.data.tokenize import IGNORE_INDEX
from humanalign.data.vision_joint import VisionJointCollator, load_vision_stream
from humanalign.engine import Engine
from humanalign.errors import ConfigError, UserError
from humanalign.eval.generate import generate_responses, read_prompts
from humanalign.losses.preference import pair_accuracy
from humanalign.losses.safe_mm_dpo import (
    LambdaState,
    expected_cost_pairwise,
    margin_scaled_beta,
    safe_mm_dpo_loss,
)
from humanalign.models.kl import pair_kl_forward
from humanalign.models.load import count_parameters, load_causal_lm, load_tokenizer
from humanalign.models.logprobs import (
    LAYOUT_NOTES,
    concatenated_forward,
    pair_layout,
    per_token_kl,
    sequence_logps,
)
from humanalign.models.margins import attach_margins
from humanalign.models.pretrained import disable_dropout_outside_lora
from humanalign.models.reference import ReferenceModel, build_reference
from humanalign.models.scorer import Scorer, cached_score_pairs, load_scorer
from humanalign.models.vision import (
    describe_parts,
    is_vision_model,
    load_processor,
    load_vision_lm,
    max_images_per_prompt,
    model_config,
)

FINAL_METRICS_FILE = "final_metrics.json"


# --------------------------------------------------------------------------------------------- config


def uses_harmless_stream(cfg: SafeMMDPOConfig) -> bool:
    return cfg.use_harmless_stream and cfg.train_harmless_path is not None


def lambda_state(cfg: SafeMMDPOConfig) -> LambdaState:
    return LambdaState(init=cfg.lambda_init, lr=cfg.lambda_lr, lam_max=cfg.lambda_max, threshold=cfg.cost_threshold,
                       update_interval=cfg.lambda_update_interval, delay_steps=cfg.lambda_update_delay_steps,
                       window_size=cfg.cost_window_size)


def describe(cfg: SafeMMDPOConfig) -> str:
    parts = [f"beta_ori {cfg.beta_ori:g}, w {cfg.w:g}, k {cfg.k:g}" + (" (fixed beta)" if cfg.w == 0 else ""),
             f"{'averaged' if cfg.average_log_prob else 'summed'} log-probs", f"kl_coeff {cfg.kl_coeff:g}"]
    if uses_harmless_stream(cfg):
        if cfg.update_lambda:
            parts.append(f"lambda {cfg.lambda_init:g} by dual ascent (lr {cfg.lambda_lr:g}, max {cfg.lambda_max:g}, "
                         f"d {cfg.cost_threshold:g}, every {cfg.lambda_update_interval} step(s) after "
                         f"{cfg.lambda_update_delay_steps}, J_c {cfg.expected_cost})")
        else:
            parts.append(f"fixed lambda {cfg.lambda_init:g} (reward shaping)")
    else:
        parts.append("no harmless stream (MM-DPO)" if cfg.w > 0 else "no harmless stream, fixed beta (DPO)")
    return "[safe-mm-dpo] " + " | ".join(parts)


# --------------------------------------------------------------------------------------------- data and margins


def load_streams(cfg: SafeMMDPOConfig, tokenizer, engine, processor=None) -> dict[str, dict[str, Any]]:
    """{"helpful": {"train": PairDataset, "val": ...}, "harmless": {...}}; harmless training pairs only with the
    harmless stream, harmless validation pairs whenever given (an MM-DPO run still measures harmlessness).
    With ``processor`` (a vision-language policy's) the pairs keep their images (``VisionStream`` datasets), at
    most as many per pair as the policy takes (``max_images_per_prompt``)."""
    limit = (max_images_per_prompt(model_config(cfg.policy_model_path, cfg.model), processor,
                                   cfg.max_images_per_prompt) if processor is not None else None)

    def load(path, kind, split):
        if not path:
            return None
        if processor is not None:
            return load_vision_stream(path, kind, processor, cfg, engine, name=f"{split} {path}", max_images=limit)
        return load_pair_dataset(path, kind, tokenizer, cfg, engine, name=f"{split} {path}")

    return {
        HELPFUL: {"train": load(cfg.train_helpful_path, "helpful", "train"),
                  "val": load(cfg.val_helpful_path, "helpful", "val")},
        HARMLESS: {"train": load(cfg.train_harmless_path, "harmless", "train") if uses_harmless_stream(cfg) else None,
                   "val": load(cfg.val_harmless_path, "harmless", "val")},
    }


def check_vision_run(cfg: SafeMMDPOConfig) -> None:
    """What a vision-language policy cannot do yet, refused before any loading."""
    if cfg.reference_mode == "precomputed":
        raise ConfigError("reference_mode precomputed is not supported with a vision-language policy yet (the "
                          "reference log-prob cache is keyed on token ids, not pixels): use model or adapter-disabled")
    if cfg.expected_cost == "sampled" and uses_harmless_stream(cfg):
        raise ConfigError("expected_cost: sampled is not supported with a vision-language policy yet (it samples "
                          "answers to text prompts): use expected_cost: pairwise")


def check_score_models(cfg: SafeMMDPOConfig, streams: Mapping[str, Mapping[str, Any]]) -> None:
    """A text-only reward or cost model would score answers to pictures without the pictures: refused, with the
    settings that need no model (margins 0; costs from the is_safe labels). A model whose config cannot be read
    here is left to the scorer's loader to report."""
    for stream, field, path, instead in (
            (HELPFUL, "helpful_rm_path", cfg.helpful_rm_path, "delta_h = 0, beta = beta_ori"),
            (HARMLESS, "harmless_rm_path", cfg.harmless_rm_path, "delta_s = 0, costs from the is_safe labels")):
        with_images = sum(d.images for d in streams[stream].values() if d is not None)
        config = model_config(path, cfg.model) if path and with_images else None
        if config is not None and not isinstance(config.get("vision_config"), dict):
            raise ConfigError(f"{field} '{path}' is a text-only model, but {with_images} {stream} pairs carry "
                              f"images it would score without them: set {field}: null ({instead}) or give a "
                              "vision-language model")


def score_on_ranks(cfg, engine, model_path: str, datasets: Sequence[PairDataset], expected_type: str
                   ) -> tuple[list[tuple[list[float], list[float]]], Scorer]:
    """``models.margins.ScorePairs`` for this run: (chosen scores, rejected scores) of every dataset's pairs,
    through the disk cache, and the scorer. The model loads whole on every process; the main process scores
    first, the others then read the cache."""
    # the policy's dtype and kernel settings, not its GGUF file or chat template (a score model keeps its own)
    settings = cfg.model.model_copy(update={"gguf_file": None, "chat_template": "auto"})
    with engine.loading_whole_models():  # used outside the engine: not partitioned under ZeRO-3
        scorer = load_scorer(model_path, device=engine.device, batch_size=cfg.margin_batch_size, settings=settings,
                             progress=engine.is_main_process)
    if scorer.score_type != expected_type:
        engine.print(f"[safe-mm-dpo] warning: {model_path} is a {scorer.score_type} model, used here as the "
                     f"{expected_type} model (swapped helpful_rm_path / harmless_rm_path?)")
    results: list[tuple[list[float], list[float]]] = []
    for first_pass in (True, False):
        if first_pass == engine.is_main_process:
            results = [cached_score_pairs(scorer, ds.pairs) for ds in datasets]
        engine.wait()
    return results, scorer


# --------------------------------------------------------------------------------------------- one step


@dataclass(frozen=True)
class StepSettings:
    """What a step computes, from the config."""

    beta_ori: float
    w: float
    k: float
    kl_coeff: float
    average: bool  # mean instead of sum of response-token log-probs

    @classmethod
    def from_config(cls, cfg) -> StepSettings:
        return cls(beta_ori=cfg.beta_ori, w=cfg.w, k=cfg.k, kl_coeff=cfg.kl_coeff, average=cfg.average_log_prob)


class StreamPairs(NamedTuple):
    """Per-pair values of one stream in a batch, each (B,)."""

    h: torch.Tensor  # log-ratio difference, differentiable
    beta: torch.Tensor  # MM-DPO beta, detached
    delta: torch.Tensor  # reward / cost margin
    cost: torch.Tensor | None  # expected cost J per pair (harmless only), detached
    has_cost: torch.Tensor | None  # 1 where the pair has costs


class StepOutput(NamedTuple):
    loss: torch.Tensor  # () differentiable
    metrics: dict[str, torch.Tensor]  # scalars, detached
    streams: dict[str, StreamPairs]
    kl_parts: tuple[torch.Tensor, torch.Tensor] | None  # (sum over response tokens of KL, token count)
    nll_parts: tuple[torch.Tensor, torch.Tensor]  # (NLL summed over preferred responses' tokens, token count)


def stream_pairs(stream: str, part: Mapping[str, torch.Tensor], sums: torch.Tensor, counts: torch.Tensor,
                 ref_sums: torch.Tensor, settings: StepSettings) -> StreamPairs:
    """One stream's pairs from the summed log-probs of the batch's rows (2P,), policy and reference."""
    chosen_row, rejected_row = part["chosen_row"], part["rejected_row"]  # (B,)
    scale = counts.clamp(min=1).to(sums.dtype) if settings.average else torch.ones_like(sums)  # (2P,)
    policy_chosen = sums[chosen_row] / scale[chosen_row]  # (B,)
    policy_rejected = sums[rejected_row] / scale[rejected_row]
    ref_chosen = ref_sums[chosen_row].to(sums.dtype) / scale[chosen_row]
    ref_rejected = ref_sums[rejected_row].to(sums.dtype) / scale[rejected_row]
    h = (policy_chosen - ref_chosen) - (policy_rejected - ref_rejected)  # (B,)
    delta = part.get(DELTA, torch.zeros_like(h)).to(h.device)
    beta = margin_scaled_beta(delta, settings.beta_ori, settings.w, settings.k).to(h.dtype)  # (B,)
    cost = has_cost = None
    if stream == HARMLESS and COST_CHOSEN in part:
        # p = sigmoid(beta_s h): the policy's implied chance of picking the safer answer; J = p C_w + (1-p) C_l
        cost = expected_cost_pairwise(h.detach(), beta, part[COST_CHOSEN], part[COST_REJECTED])  # (B,)
        has_cost = part[HAS_COST]
    return StreamPairs(h, beta, delta, cost, has_cost)


def response_tokens(batch: Mapping[str, Any]) -> torch.Tensor:
    """Response (label) tokens of a joint batch's distinct sequences: the count its KL mean is over."""
    return (batch["labels"][:, 1:] != IGNORE_INDEX).sum()


def step_loss(model, reference: ReferenceModel, batch: Mapping[str, Any], settings: StepSettings, lam: float,
              with_kl: bool, kl_tokens: torch.Tensor | float | None = None) -> StepOutput:
    """The Safe-MM-DPO loss of one joint batch: one policy forward over its distinct pairs (the pair trainers'
    ``concatenated_forward``: prompt once per pair, LM head on response tokens only, where the model allows),
    the reference's log-probs of the same rows, then each stream's pairs.

    ``with_kl``: compute the exact per-token KL (needs a live reference); it enters the loss with kl_coeff, and
    is only measured (no gradient) when kl_coeff is 0. It comes from the same fast forward as the log-probs,
    each model's LM head on the response positions only (``models/kl.py``); a model that keeps the plain
    forward (FSDP / DeepSpeed, post-processed logits, a head that is not a plain linear layer) computes it from
    both models' full logits instead. ``kl_tokens``: the count the KL sum is divided by (default: this batch's
    response tokens); a trainer passes the optimizer step's tokens / (micro-batches x processes), so that the
    KL term is the mean over every response token of the step however the step is split."""
    with_kl = with_kl and reference.mode != "precomputed"  # no reference distributions to compare with
    fast = pair_kl_forward(model, reference, batch, kl_grad=settings.kl_coeff > 0) if with_kl else None
    kl_sum = None
    if fast is not None:  # one fast forward of each model: log-probs and the KL at the response positions
        sums, counts, ref_sums, kl_sum = fast.logps, fast.counts, fast.ref_logps, fast.kl.sum()
    else:
        out = concatenated_forward(model, batch, average=False, return_logits=with_kl)
        sums = torch.cat([out["chosen_logps"], out["rejected_logps"]])  # (2P,) summed over response tokens
        counts = torch.cat([out["chosen_token_counts"], out["rejected_token_counts"]])  # (2P,)
        if with_kl:  # the plain forward: KL(pi || pi_ref) per position from both models' full logits
            ref_logits = reference.forward_logits(batch)  # (2P, T, V), no grad
            ref_sums = sequence_logps(ref_logits, batch["labels"])[0].detach()  # (2P,)
            policy_logits = out["logits"] if settings.kl_coeff > 0 else out["logits"].detach()
            per_sequence = per_token_kl(policy_logits, ref_logits, batch["labels"])  # (2P,) mean over each row
            kl_sum = (per_sequence * counts.to(per_sequence.dtype)).sum()
            del ref_logits
        else:
            ref_chosen, ref_rejected = reference.logps(batch, average=False)  # (P,), (P,)
            ref_sums = torch.cat([ref_chosen, ref_rejected]).detach()
    kl = kl_parts = None
    if kl_sum is not None:  # the mean over every response token of the batch (or of the step: kl_tokens)
        kl_parts = (kl_sum, counts.sum().to(kl_sum.dtype))
        kl = kl_parts[0] / (kl_parts[1].clamp(min=1) if kl_tokens is None else kl_tokens)
    streams = {s: stream_pairs(s, batch[s], sums, counts, ref_sums, settings) for s in (HELPFUL, HARMLESS)
               if s in batch}
    empty = sums.new_zeros(0)
    help_pairs, safe_pairs = streams.get(HELPFUL), streams.get(HARMLESS)
    loss, parts = safe_mm_dpo_loss(
        help_pairs.h if help_pairs else empty, safe_pairs.h if safe_pairs else empty,
        help_pairs.beta if help_pairs else empty, safe_pairs.beta if safe_pairs else empty,
        lam, kl=kl if settings.kl_coeff > 0 else None, kl_coeff=settings.kl_coeff,
    )
    nll_parts = _preferred_nll(sums, counts, batch)
    metrics = stream_metrics(loss, parts, streams, settings, kl, nll_parts)
    return StepOutput(loss, metrics, streams, kl_parts, nll_parts)


def _preferred_nll(sums, counts, batch) -> tuple[torch.Tensor, torch.Tensor]:
    """NLL summed over the tokens of the batch's distinct preferred responses, and their count (perplexity)."""
    preferred = batch[PREFERRED_ROWS].to(sums.dtype)  # (2P,) 1 on a row some stream prefers
    return -(sums.detach() * preferred).sum(), (counts.to(sums.dtype) * preferred).sum()


def stream_metrics(loss, parts, streams: Mapping[str, StreamPairs], settings: StepSettings, kl, nll_parts):
    """The run-book's metric names (scalars, detached) from ``safe_mm_dpo_loss``'s parts and the streams."""
    # Public output: these names (the harmless stream as "safety") are what metrics.jsonl, the report and the
    # run-book use; internally the stream is "harmless". Keep them as they are.
    zero = loss.detach().new_zeros(())
    metrics = {
        "loss_total": loss.detach(),
        "loss_helpful": parts["loss_helpful"],
        "loss_safety": parts["loss_safety"],
        "loss_kl": settings.kl_coeff * kl.detach() if kl is not None and settings.kl_coeff > 0 else zero,
        "lambda": parts["lambda"],
        "perplexity": torch.exp(nll_parts[0] / nll_parts[1].clamp(min=1)),
    }
    for stream, short in ((HELPFUL, "helpful"), (HARMLESS, "safety")):
        pairs = streams.get(stream)
        if pairs is None:
            continue
        metrics[f"reward_{short}_mean"] = (pairs.beta * pairs.h.detach()).mean()  # implicit reward margin
        metrics[f"delta_{short}_mean"] = pairs.delta.float().mean()
        metrics[f"beta_{short}_mean"] = pairs.beta.float().mean()
        metrics[f"accuracy_{short}"] = pair_accuracy(pairs.h.detach()).mean()  # a tie (h = 0) counts 1/2
    if kl is not None:
        metrics["kl_divergence"] = kl.detach()
    return metrics


def expected_cost_of(pairs: StreamPairs | None) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(sum of J over the pairs with costs, their number), or None when the stream has no costs."""
    if pairs is None or pairs.cost is None:
        return None
    mask = pairs.has_cost.to(pairs.cost.device)
    return (pairs.cost * mask).sum(), mask.sum()


# --------------------------------------------------------------------------------------------- evaluation


@torch.no_grad()
def evaluate(model, reference: ReferenceModel, loaders: Mapping[str, Any], engine, settings: StepSettings,
             lam: float, with_kl: bool, use_harmless: bool = True) -> dict[str, float]:
    """Every metric over each stream's whole validation set (each pair once, across processes); the total loss
    is ``safe_mm_dpo_loss`` over all validation pairs with the current lambda. Without a harmless stream in
    training (``use_harmless`` false, MM-DPO) the harmless pairs are still measured but weigh 0 in the loss."""
    was_training = model.training
    model.eval()
    per_pair: dict[str, dict[str, list[torch.Tensor]]] = {}
    sums = {"kl": 0.0, "kl_tokens": 0.0, "nll": 0.0, "nll_tokens": 0.0}
    for stream, loader in loaders.items():
        collected = per_pair.setdefault(stream, {})
        for batch in loader:
            out = step_loss(model, reference, batch, settings, lam, with_kl)
            pairs = out.streams[stream]
            values = {"h": pairs.h.detach().float(), "beta": pairs.beta.float(), "delta": pairs.delta.float()}
            if pairs.cost is not None:
                values["cost"], values["has_cost"] = pairs.cost.float(), pairs.has_cost.float()
            for key, value in engine.gather_for_metrics(values).items():
                collected.setdefault(key, []).append(value.cpu())
            parts = {"nll": out.nll_parts[0], "nll_tokens": out.nll_parts[1]}
            if out.kl_parts is not None:
                parts.update(kl=out.kl_parts[0], kl_tokens=out.kl_parts[1])
            for key, value in parts.items():  # sums over processes (duplicated end-of-set rows count twice here)
                sums[key] += float(engine.reduce_sum(value.detach().float()))
    model.train(was_training)
    cat = {s: {k: torch.cat(v) for k, v in d.items()} for s, d in per_pair.items()}
    empty = torch.zeros(0)
    h_help, h_safe = cat.get(HELPFUL, {}).get("h", empty), cat.get(HARMLESS, {}).get("h", empty)
    kl = torch.tensor(sums["kl"] / max(sums["kl_tokens"], 1.0)) if sums["kl_tokens"] else None
    loss, parts = safe_mm_dpo_loss(h_help, h_safe, cat.get(HELPFUL, {}).get("beta", empty),
                                   cat.get(HARMLESS, {}).get("beta", empty), lam if use_harmless else 0.0,
                                   kl=kl if settings.kl_coeff > 0 else None, kl_coeff=settings.kl_coeff)
    streams = {s: StreamPairs(v["h"], v["beta"], v["delta"], v.get("cost"), v.get("has_cost")) for s, v in cat.items()}
    nll = (torch.tensor(sums["nll"]), torch.tensor(sums["nll_tokens"]))
    metrics = stream_metrics(loss, parts, streams, settings, kl, nll)
    out = {f"eval/{k}": float(v) for k, v in metrics.items()}
    cost = expected_cost_of(streams.get(HARMLESS))
    if cost is not None and float(cost[1]) > 0:
        out["eval/expected_cost"] = float(cost[0] / cost[1])
    return out


# --------------------------------------------------------------------------------------------- the dual update


class SampledCost:
    """J_c from the policy's own answers (``expected_cost: sampled``): round r answers the next
    ``sampled_num_prompts`` prompts of ``sampled_prompts_path`` (cycling through the file), sampled at
    temperature 1 (the policy's own distribution, seeded by the run's seed and r), and the cost model scores
    them. Every process generates the same answers; the main process's costs are broadcast so that every rank
    holds the same lambda."""

    def __init__(self, cfg, scorer, tokenizer, engine):
        self.prompts, duplicates = read_prompts(cfg.sampled_prompts_path)
        if not self.prompts:
            raise UserError(f"{cfg.sampled_prompts_path}: no prompts for expected_cost: sampled")
        engine.print(f"[safe-mm-dpo] expected cost sampled from {len(self.prompts)} prompts of "
                     f"{cfg.sampled_prompts_path} ({cfg.sampled_num_prompts} per lambda update"
                     + (f"; {duplicates} duplicate prompts skipped" if duplicates else "") + ")")
        self.cfg, self.scorer, self.tokenizer, self.engine = cfg, scorer, tokenizer, engine

    def measure(self, model, round_index: int) -> list[float]:
        cfg, n = self.cfg, self.cfg.sampled_num_prompts
        start = round_index * n
        prompts = [self.prompts[(start + i) % len(self.prompts)] for i in range(n)]
        answers = generate_responses(
            model, self.tokenizer, prompts, batch_size=cfg.eval_batch_size or cfg.batch_size,
            max_new_tokens=cfg.sampled_max_new_tokens, do_sample=True, temperature=1.0, top_p=1.0, top_k=0,
            max_prompt_length=cfg.max_prompt_length, seed=cfg.seed + round_index,
        )
        costs = [float(c) for c in self.scorer.score(prompts, answers)]
        if self.engine.num_processes > 1:
            box = [costs]
            broadcast_object_list(box, from_process=0)
            costs = box[0]
        return [c for c in costs if math.isfinite(c)]


def dual_ascent_step(cfg, engine, lam: LambdaState, history: dict[str, Any], step_costs: list[torch.Tensor],
                     sampler: SampledCost | None, model) -> None:
    """The dual step after optimizer step ``engine.step`` (skipped steps never reach here): add this step's
    expected costs to lambda's window (pairwise) or sample fresh answers when an update is due (sampled), then
    lambda <- clamp(lambda + lambda_lr (J_c - d), 0, lambda_max) when due. Every rank holds the same window."""
    if sampler is None:
        for costs in step_costs:
            costs = costs.detach().float().cpu()
            lam.observe(costs[torch.isfinite(costs)])
    elif lam.due(engine.step):
        costs = sampler.measure(engine.unwrap(model), history["sampled_rounds"])
        history["sampled_rounds"] += 1
        lam.observe(costs)
        if costs:
            engine.metrics.write(engine.step, {"train/expected_cost_sampled": sum(costs) / len(costs)})
    if cfg.update_lambda:
        j_c = lam.window_mean
        if lam.maybe_update(engine.step):
            history["cost_path"].append([engine.step, j_c])


# --------------------------------------------------------------------------------------------- the loop


def is_logging_step(engine, step: int) -> bool:
    """Whether optimizer step ``step`` (1-based) is one the engine logs (as Engine._log_train decides)."""
    return step % engine.config.logging_steps == 0 or step == engine.total_steps


def load_policy(cfg: SafeMMDPOConfig, engine, streams: Mapping[str, Mapping[str, PairDataset | None]],
                pad_token_id: int, vision: bool = False) -> tuple[Any, ReferenceModel]:
    """The policy to train (dropout off when asked; a vision-language one with its parts frozen as configured)
    and its reference (precomputed over every dataset when ``reference_mode`` says so)."""
    if vision:
        policy = load_vision_lm(cfg.policy_model_path, cfg.model, cfg.lora, freeze_vision_tower=cfg.freeze_vision_tower,
                                freeze_projector=cfg.freeze_projector, gradient_checkpointing=cfg.gradient_checkpointing)
    else:
        policy = load_causal_lm(cfg.policy_model_path, cfg.model, cfg.lora,
                                gradient_checkpointing=cfg.gradient_checkpointing)
    if cfg.disable_dropout:
        disable_dropout_outside_lora(policy)
    trainable, total = count_parameters(policy)
    engine.print(f"[safe-mm-dpo] {'vision-language ' if vision else ''}policy {cfg.policy_model_path}: {trainable:,} "
                 f"of {total:,} parameters trained" + (f" ({describe_parts(policy)})" if vision else ""))
    datasets = [d for parts in streams.values() for d in parts.values() if d is not None]
    reference = build_reference(cfg, policy, engine, datasets, pad_token_id=pad_token_id)
    engine.print(f"[safe-mm-dpo] reference: {reference.describe()}")
    return policy, reference


def make_loaders(cfg: SafeMMDPOConfig, engine, streams: Mapping[str, Mapping[str, PairDataset | None]],
                 pad_token_id: int, vision: bool = False) -> tuple[JointDataset, Any, dict[str, Any]]:
    """(the joint training set, its loader, a validation loader per stream with validation pairs)."""
    joint = build_joint_dataset(streams[HELPFUL]["train"], streams[HARMLESS]["train"], cfg.seed,
                                share_responses=cfg.share_responses)
    engine.print(f"[safe-mm-dpo] {joint.describe()}")
    collate = VisionJointCollator(pad_token_id) if vision else JointCollator(pad_token_id)
    train_loader = engine.train_loader(joint, collate, lengths=joint.lengths)
    eval_loaders = {s: engine.eval_loader(StreamView(parts["val"], s), collate, lengths=parts["val"].lengths)
                    for s, parts in streams.items() if parts["val"] is not None}
    return joint, train_loader, eval_loaders


@dataclass
class Loop:
    """What the training loop's stages share: the prepared policy and reference, lambda and its history."""

    cfg: SafeMMDPOConfig
    engine: Any
    model: Any
    reference: ReferenceModel
    eval_loaders: dict[str, Any]
    settings: StepSettings
    harmless: bool  # a harmless stream in training (else MM-DPO: lambda weighs 0)
    measure_kl: bool  # the exact KL is computed (a live reference), in the loss or only measured
    lam: LambdaState
    history: dict[str, Any]  # lambda_path, cost_path, before (eval on start), sampled_rounds
    sampler: SampledCost | None

    @property
    def current_lambda(self) -> float:
        return self.lam.value if self.harmless else 0.0

    def run_eval(self) -> dict[str, float]:
        return self.engine.log_eval(evaluate(self.model, self.reference, self.eval_loaders, self.engine,
                                             self.settings, self.current_lambda, with_kl=self.measure_kl,
                                             use_harmless=self.harmless))


def start_loop(cfg: SafeMMDPOConfig, engine, model, reference: ReferenceModel, eval_loaders: dict[str, Any],
               cost_scorer, tokenizer) -> Loop:
    """Lambda and its history, registered with the engine's checkpoints, and the sampler of J_c when
    ``expected_cost: sampled``."""
    harmless = uses_harmless_stream(cfg)
    lam = lambda_state(cfg)
    history: dict[str, Any] = {"lambda_path": [[0, lam.value]], "cost_path": [], "before": {}, "sampled_rounds": 0}
    engine.register_state("lambda", lam)  # value, window of recent costs, update counters
    engine.register_state("history", history)
    sampler = SampledCost(cfg, cost_scorer, tokenizer, engine) if harmless and cfg.expected_cost == "sampled" else None
    # the exact KL needs a live reference's distributions; with kl_coeff 0 it is only measured (measure_kl)
    measure_kl = reference.mode != "precomputed" and (cfg.kl_coeff > 0 or cfg.measure_kl)
    return Loop(cfg, engine, model, reference, eval_loaders, StepSettings.from_config(cfg), harmless, measure_kl,
                lam, history, sampler)


def train_step(loop: Loop, micro_batches: list[Any]) -> list[torch.Tensor]:
    """Forward and backward of one optimizer step's micro-batches, their metrics recorded; returns the harmless
    pairs' expected costs J (gathered over processes, NaN for a pair without costs) for the dual update."""
    engine, settings, model = loop.engine, loop.settings, loop.model
    # the KL term is computed on every micro-batch (each model's LM head on the response positions only,
    # models/kl.py); with kl_coeff 0 the KL is only measured, on the first micro-batch of a logged step
    log_kl = loop.measure_kl and is_logging_step(engine, engine.step + 1)
    kl_tokens = None
    if settings.kl_coeff > 0:  # the KL term: a mean over every response token of the step, on all ranks
        step_tokens = engine.reduce_sum(sum(response_tokens(b) for b in micro_batches))
        kl_tokens = step_tokens.clamp(min=1) / (len(micro_batches) * engine.num_processes)
    step_costs: list[torch.Tensor] = []
    for i, batch in enumerate(micro_batches):
        with_kl = settings.kl_coeff > 0 or (log_kl and i == 0)
        with engine.accumulate(model):
            out = step_loss(model, loop.reference, batch, settings, loop.current_lambda, with_kl, kl_tokens)
            engine.backward(out.loss)
            metrics = dict(out.metrics)
            metrics.pop("kl_divergence", None)
            metrics.pop("perplexity", None)  # token-weighted below
            engine.record(metrics, weight=len(batch[HELPFUL]["index"]))
            nll, nll_tokens = out.nll_parts  # perplexity = exp(NLL per token over the whole logged window)
            engine.record({"perplexity": nll / nll_tokens.clamp(min=1)}, weight=nll_tokens, then=math.exp)
            if out.kl_parts is not None:  # token-weighted: the KL of all the step's response tokens
                engine.record({"kl_divergence": out.kl_parts[0] / out.kl_parts[1].clamp(min=1)},
                              weight=out.kl_parts[1])
            cost = expected_cost_of(out.streams.get(HARMLESS))
            if cost is not None:
                engine.record({"expected_cost": cost[0] / cost[1].clamp(min=1)}, weight=cost[1])
                pairs = out.streams[HARMLESS]
                step_costs.append(engine.accelerator.gather(
                    torch.where(pairs.has_cost > 0, pairs.cost, torch.full_like(pairs.cost, math.nan))))
    return step_costs


def train(loop: Loop, train_loader) -> float | None:
    """Every optimizer step, each followed by the dual update, evaluation and checkpoints when due (and an
    evaluation before the first with ``eval_on_start``); returns the seconds per step of this process's steps."""
    engine = loop.engine
    if loop.cfg.eval_on_start and loop.eval_loaders and engine.step == 0:
        loop.history["before"] = loop.run_eval()
    train_seconds, steps_run = 0.0, 0
    for micro_batches in engine.train_steps(train_loader):
        step_start = time.time()
        step_costs = train_step(loop, micro_batches)
        stepped = engine.optimizer_step()
        if stepped and loop.harmless:
            dual_ascent_step(loop.cfg, engine, loop.lam, loop.history, step_costs, loop.sampler, loop.model)
        loop.history["lambda_path"].append([engine.step, loop.lam.value])
        train_seconds += time.time() - step_start
        steps_run += 1
        if loop.eval_loaders and engine.should_evaluate():
            loop.run_eval()
        if engine.should_save():
            engine.save_checkpoint()
    return train_seconds / steps_run if steps_run else None


def held_out(values: dict[str, float] | None) -> dict[str, float | None] | None:
    """The validation numbers the demo and the benchmark compare, under plain names."""
    if not values:
        return None
    # keys: plain names; values: the public metric names in metrics.jsonl (the harmless stream as "safety")
    names = {"helpful_accuracy": "eval/accuracy_helpful", "harmless_accuracy": "eval/accuracy_safety",
             "expected_cost": "eval/expected_cost", "loss_helpful": "eval/loss_helpful",
             "loss_safety": "eval/loss_safety", "kl_divergence": "eval/kl_divergence",
             "perplexity": "eval/perplexity"}
    return {name: values.get(key) for name, key in names.items()}


def _fmt(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.3f}"


def run_result(loop: Loop, margins: dict[str, Any], streams: Mapping[str, Mapping[str, PairDataset | None]],
               joint: JointDataset, seconds_per_step: float | None) -> dict[str, Any]:
    """The held-out numbers before and after training, lambda's path, the margins and the pair counts."""
    cfg, engine, lam = loop.cfg, loop.engine, loop.lam
    after = engine.last_eval[1] if engine.last_eval and engine.last_eval[0] == engine.step else None
    path = [[int(s), float(v)] for s, v in loop.history["lambda_path"]]
    values = [v for _, v in path]
    return {
        "before": held_out(loop.history["before"]),
        "after": held_out(after),
        "lambda": {"init": cfg.lambda_init, "final": lam.value, "min": min(values), "max": max(values),
                   "updates": lam.num_updates, "threshold": cfg.cost_threshold, "path": path,
                   # J_c (the window's mean expected cost) that each update used: [step, J_c]
                   "expected_cost_path": [[int(s), float(j)] for s, j in loop.history["cost_path"]]}
        if loop.harmless else None,
        "margins": margins,
        "pairs": {"train_helpful": len(streams[HELPFUL]["train"]),
                  "train_harmless": len(streams[HARMLESS]["train"]) if loop.harmless else 0,
                  "shared": joint.num_shared, "items_per_epoch": len(joint)},
        "seconds_per_step": seconds_per_step,
    }


def finish_run(loop: Loop, saver, streams: Mapping[str, Mapping[str, PairDataset | None]],
               result: dict[str, Any], start: float) -> None:
    """Save the final policy (with ``saver``: the tokenizer, or a vision-language policy's processor) and the run
    summary, write ``final_metrics.json`` (the result, completed here) and print the held-out accuracies before
    and after."""
    cfg, engine = loop.cfg, loop.engine
    summary = {"reference": loop.reference.describe(), "margins": result["margins"], "pairs": result["pairs"],
               "skipped": {f"{split} {s}": dict(d.skipped) for s, parts in streams.items()
                           for split, d in parts.items() if d is not None}}
    if "vision" in result:
        summary["vision"] = result["vision"]
    final = engine.finish(loop.model, saver, summary=summary)
    result.update({"final_model": str(final), "steps": engine.step, "seconds": round(time.time() - start, 1)})
    if engine.is_main_process:
        atomic_write_json(engine.run_dir / FINAL_METRICS_FILE, result)
    if result["before"] and result["after"]:
        engine.print("[safe-mm-dpo] held-out implicit accuracy: helpful "
                     f"{_fmt(result['before']['helpful_accuracy'])} -> {_fmt(result['after']['helpful_accuracy'])}"
                     f", harmless {_fmt(result['before']['harmless_accuracy'])} -> "
                     f"{_fmt(result['after']['harmless_accuracy'])}"
                     + (f"; lambda {cfg.lambda_init:g} -> {loop.lam.value:.4g}" if loop.harmless else ""))


def run(cfg: SafeMMDPOConfig) -> dict[str, Any]:
    """Train the policy; returns (and writes to ``<output_dir>/final_metrics.json``) the held-out accuracies and
    expected cost before and after training, lambda's path and the run's figures."""
    start = time.time()
    with Engine(cfg, name="safe-mm-dpo") as engine:
        engine.print(describe(cfg))
        vision = is_vision_model(cfg.policy_model_path, cfg.model)
        if vision:
            check_vision_run(cfg)
        processor = load_processor(cfg.policy_model_path, cfg.model) if vision else None
        tokenizer = processor.tokenizer if vision else load_tokenizer(cfg.policy_model_path, cfg.model)
        streams = load_streams(cfg, tokenizer, engine, processor)
        if vision:
            check_score_models(cfg, streams)
        margins, cost_scorer = attach_margins(cfg, streams, partial(score_on_ranks, cfg, engine), engine.print)
        policy, reference = load_policy(cfg, engine, streams, tokenizer.pad_token_id, vision)
        joint, train_loader, eval_loaders = make_loaders(cfg, engine, streams, tokenizer.pad_token_id, vision)
        model, _, _ = engine.prepare(policy, train_loader)
        reference.attach(model)
        if vision:  # every forward is the plain one: the text fast paths would misplace the image tokens
            layout = pair_layout(model, engine.to_device(train_loader.collate_fn([joint[0]])))
            engine.print(f"[safe-mm-dpo] pair forward: {LAYOUT_NOTES[layout]} (images: the text fast paths and the "
                         "fused KL do not apply)")
        loop = start_loop(cfg, engine, model, reference, eval_loaders, cost_scorer, tokenizer)
        result = run_result(loop, margins, streams, joint, train(loop, train_loader))
        if vision:
            result["vision"] = {"pair_forward": layout, "images": {
                f"{split}_{s}": d.images for s, parts in streams.items() for split, d in parts.items() if d}}
        finish_run(loop, processor or tokenizer, streams, result, start)
    return result


__all__ = [
    "FINAL_METRICS_FILE", "uses_harmless_stream", "lambda_state", "describe", "load_streams", "score_on_ranks",
    "StepSettings", "StreamPairs", "StepOutput", "stream_pairs", "response_tokens", "step_loss", "stream_metrics",
    "expected_cost_of", "evaluate", "SampledCost", "dual_ascent_step", "is_logging_step", "load_policy",
    "make_loaders", "Loop", "start_loop", "train_step", "train", "run_result", "finish_run", "run", "held_out",
]
