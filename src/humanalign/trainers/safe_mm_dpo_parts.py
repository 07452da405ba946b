"""Pieces of the Safe-MM-DPO trainer (``trainers/safe_mm_dpo.py`` holds the loop; docs/algorithms/safe_mm_dpo.md).

- Two streams on one sampler: ``build_joint_dataset`` pairs every helpful pair with a harmless pair. When both
  hold the same prompt and the same two responses (one PKU-SafeRLHF record gives both, ordered by helpfulness
  and by safety), the two are *shared*: ``JointCollator`` puts each distinct response in the batch once, so a
  step of B helpful + B harmless pairs forwards 2B sequences, as DPO does for B pairs.
- Margins (before training, with their checks): ``safe_mm_dpo_margins.py``.
- ``step_loss``: one policy forward (and one reference forward) over the batch's distinct sequences, the
  per-stream log-ratios h, the per-pair betas, the exact KL when asked (``models/kl.py``), ``safe_mm_dpo_loss``,
  the expected cost J of each harmless pair.
- ``evaluate``: every metric on the validation pairs of each stream; ``SampledCost``: J_c from the policy's
  own answers scored by the cost model (``expected_cost: sampled``).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

import numpy as np
import torch
from torch.utils.data import Dataset

from humanalign.data.pairs import normalized
from humanalign.data.preference_dataset import INDEX_KEY, PAIR_KEYS, PairCollator, PairDataset
from humanalign.data.records import prompt_key
from humanalign.data.tokenize import IGNORE_INDEX
from humanalign.errors import UserError
from humanalign.losses.safe_mm_dpo import expected_cost_pairwise, margin_scaled_beta, safe_mm_dpo_loss
from humanalign.models.kl import pair_kl_forward
from humanalign.models.logprobs import concatenated_forward, per_token_kl, sequence_logps
from humanalign.models.reference import REF_CHOSEN, REF_REJECTED, ReferenceModel

HELPFUL, HARMLESS = "helpful", "harmless"
# how a joint item's harmless pair relates to its helpful pair
NOT_SHARED, SHARED_SAME_ORDER, SHARED_SWAPPED = 0, 1, 2
# per-pair fields carried from a stream's examples into its batch
DELTA, COST_CHOSEN, COST_REJECTED, HAS_COST = "delta", "cost_chosen", "cost_rejected", "has_cost"  # per pair
STREAM_FIELDS = (DELTA, COST_CHOSEN, COST_REJECTED, HAS_COST)
PREFERRED_ROWS = "preferred_rows"


# --------------------------------------------------------------------------------------------- two streams


def _text_key(pair) -> tuple[str, frozenset[str]]:
    return prompt_key(pair.prompt), frozenset((normalized(pair.chosen), normalized(pair.rejected)))


def _relation(helpful: Mapping[str, Any], harmless: Mapping[str, Any]) -> int:
    """Whether two tokenised pairs hold the same two sequences, in the same or in swapped order."""
    def seq(example, side):
        return example[f"{side}_input_ids"], example[f"{side}_labels"]

    if seq(helpful, "chosen") == seq(harmless, "chosen") and seq(helpful, "rejected") == seq(harmless, "rejected"):
        return SHARED_SAME_ORDER
    if seq(helpful, "chosen") == seq(harmless, "rejected") and seq(helpful, "rejected") == seq(harmless, "chosen"):
        return SHARED_SWAPPED
    return NOT_SHARED


def match_streams(helpful: PairDataset, harmless: PairDataset) -> list[tuple[int, int, int]]:
    """(helpful index, harmless index, SHARED_SAME_ORDER or SHARED_SWAPPED) for pairs with the same prompt and
    the same two responses; found by text, confirmed on token ids (each pair used at most once)."""
    by_key: dict[tuple[str, frozenset[str]], list[int]] = {}
    for j, pair in enumerate(harmless.pairs):
        by_key.setdefault(_text_key(pair), []).append(j)
    matched = []
    for i, pair in enumerate(helpful.pairs):
        candidates = by_key.get(_text_key(pair))
        for pos, j in enumerate(candidates or ()):
            relation = _relation(helpful[i], harmless[j])
            if relation != NOT_SHARED:
                matched.append((i, j, relation))
                del candidates[pos]
                break
    return matched


class JointDataset(Dataset):
    """Items (helpful index, harmless index or None, relation): one helpful and one harmless pair per item.

    An epoch covers every pair of both streams at least once: shared pairs first, then the unshared pairs of the
    larger stream, each with a partner from the other stream (its unshared pairs first, then repeats drawn in a
    seeded order)."""

    def __init__(self, helpful: PairDataset, harmless: PairDataset | None,
                 items: Sequence[tuple[int, int | None, int]]):
        self.helpful, self.harmless, self.items = helpful, harmless, list(items)
        self.num_shared = sum(1 for _, _, rel in self.items if rel != NOT_SHARED)

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> dict[str, Any]:
        h, s, relation = self.items[i]
        item: dict[str, Any] = {HELPFUL: self.helpful[h], "relation": relation}
        if s is not None:
            item[HARMLESS] = self.harmless[s]
        return item

    @property
    def lengths(self) -> list[int]:
        """Longest sequence of each item (for length-grouped batching)."""
        h_len, s_len = self.helpful.lengths, self.harmless.lengths if self.harmless is not None else []
        return [max(h_len[h], s_len[s] if s is not None else 0) for h, s, _ in self.items]

    def describe(self) -> str:
        if self.harmless is None:
            return f"{len(self.helpful)} helpful pairs (no safety stream)"
        nh, ns, n = len(self.helpful), len(self.harmless), len(self.items)
        parts = [f"{n} items per epoch, each a helpful and a harmless pair, from {nh} helpful + {ns} harmless pairs",
                 f"{self.num_shared} items share their prompt and both responses (each response forwarded once)"]
        if n > nh or n > ns:
            parts.append(f"repeated to fill the epoch: {n - nh} helpful, {n - ns} harmless")
        return "; ".join(parts)


def build_joint_dataset(helpful: PairDataset, harmless: PairDataset | None, seed: int,
                        share_responses: bool = True) -> JointDataset:
    if harmless is None:
        return JointDataset(helpful, None, [(i, None, NOT_SHARED) for i in range(len(helpful))])
    matched = match_streams(helpful, harmless) if share_responses else []
    used_h, used_s = {i for i, _, _ in matched}, {j for _, j, _ in matched}
    free_h = [i for i in range(len(helpful)) if i not in used_h]
    free_s = [j for j in range(len(harmless)) if j not in used_s]
    rng = np.random.default_rng([seed, 0x5AFE])

    def partners(free: list[int], total: int, count: int) -> list[int]:
        out = [free[k] for k in rng.permutation(len(free))] if free else []
        while len(out) < count:
            out.extend(rng.permutation(total).tolist())
        return out[:count]

    if len(free_h) >= len(free_s):
        extra = list(zip(free_h, partners(free_s, len(harmless), len(free_h))))
    else:
        extra = list(zip(partners(free_h, len(helpful), len(free_s)), free_s))
    items = list(matched) + [(int(h), int(s), NOT_SHARED) for h, s in extra]
    return JointDataset(helpful, harmless, items)


class StreamView(Dataset):
    """One stream's pairs as joint items (for evaluation and precomputing): {stream: example}."""

    def __init__(self, dataset: PairDataset, stream: str):
        self.dataset, self.stream = dataset, stream

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i: int) -> dict[str, Any]:
        return {self.stream: self.dataset[i], "relation": NOT_SHARED}


class JointCollator:
    """Joint items -> one pair batch of the distinct sequences plus, per stream, where its pairs' rows are.

    The batch is a ``PairCollator`` batch of P *distinct pairs* (``input_ids`` / ``attention_mask`` / ``labels``
    (2P, T): rows 0..P-1 the first responses, P..2P-1 the second ones; its ``score_plan``; the precomputed
    reference log-probs when the examples carry them), so the pair trainers' fast forward applies to it. A
    shared item is one distinct pair for both streams, an unshared item two. For each stream present,
    ``batch[stream]`` = {``chosen_row``, ``rejected_row`` (B,) long: rows of its chosen and rejected sequences;
    ``index`` (B,) long; the numeric STREAM_FIELDS present (B,) float}. Picklable (DataLoader workers)."""

    def __init__(self, pad_token_id: int):
        self.pairs = PairCollator(pad_token_id)

    def __call__(self, features: Sequence[dict[str, Any]]) -> dict[str, Any]:
        distinct: list[dict[str, Any]] = []  # the distinct pairs, as PairCollator features
        placed: dict[str, list[tuple[int, bool]]] = {}  # stream -> (distinct pair, swapped) per item
        examples: dict[str, list[dict[str, Any]]] = {}

        def add(example: Mapping[str, Any]) -> int:
            distinct.append({k: example[k] for k in (*PAIR_KEYS, REF_CHOSEN, REF_REJECTED) if k in example})
            return len(distinct) - 1

        for feature in features:
            relation = feature.get("relation", NOT_SHARED)
            helpful, harmless = feature.get(HELPFUL), feature.get(HARMLESS)
            if helpful is not None:
                placed.setdefault(HELPFUL, []).append((add(helpful), False))
                examples.setdefault(HELPFUL, []).append(helpful)
            if harmless is not None:
                if helpful is not None and relation != NOT_SHARED:
                    where = (placed[HELPFUL][-1][0], relation == SHARED_SWAPPED)
                else:
                    where = (add(harmless), False)
                placed.setdefault(HARMLESS, []).append(where)
                examples.setdefault(HARMLESS, []).append(harmless)
        batch = self.pairs(distinct)
        count = len(distinct)  # P: the second response of distinct pair k is row P + k
        for stream, where in placed.items():
            index = torch.tensor([k for k, _ in where], dtype=torch.long)  # (B,)
            swapped = torch.tensor([flip for _, flip in where], dtype=torch.long)  # (B,)
            part: dict[str, torch.Tensor] = {
                "chosen_row": index + count * swapped,  # (B,)
                "rejected_row": index + count * (1 - swapped),  # (B,)
                INDEX_KEY: torch.tensor([int(e[INDEX_KEY]) for e in examples[stream]], dtype=torch.long),
            }
            for name in (DELTA, COST_CHOSEN, COST_REJECTED, HAS_COST):
                if name in examples[stream][0]:
                    part[name] = torch.tensor([float(e[name]) for e in examples[stream]], dtype=torch.float32)
            batch[stream] = part
        preferred = torch.zeros(2 * count, dtype=torch.bool)  # (2P,) rows some stream prefers (perplexity)
        for part in (batch[s] for s in placed):
            preferred[part["chosen_row"]] = True
        batch[PREFERRED_ROWS] = preferred
        return batch


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
        metrics[f"accuracy_{short}"] = (pairs.h.detach() > 0).float().mean()
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
             lam: float, with_kl: bool, use_safety: bool = True) -> dict[str, float]:
    """Every metric over each stream's whole validation set (each pair once, across processes); the total loss
    is ``safe_mm_dpo_loss`` over all validation pairs with the current lambda. Without a safety stream in
    training (``use_safety`` false, MM-DPO) the harmless pairs are still measured but weigh 0 in the loss."""
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
                                   cat.get(HARMLESS, {}).get("beta", empty), lam if use_safety else 0.0,
                                   kl=kl if settings.kl_coeff > 0 else None, kl_coeff=settings.kl_coeff)
    streams = {s: StreamPairs(v["h"], v["beta"], v["delta"], v.get("cost"), v.get("has_cost")) for s, v in cat.items()}
    nll = (torch.tensor(sums["nll"]), torch.tensor(sums["nll_tokens"]))
    metrics = stream_metrics(loss, parts, streams, settings, kl, nll)
    out = {f"eval/{k}": float(v) for k, v in metrics.items()}
    cost = expected_cost_of(streams.get(HARMLESS))
    if cost is not None and float(cost[1]) > 0:
        out["eval/expected_cost"] = float(cost[0] / cost[1])
    return out


# --------------------------------------------------------------------------------------------- sampled J_c


class SampledCost:
    """J_c from the policy's own answers (``expected_cost: sampled``): round r answers the next
    ``sampled_num_prompts`` prompts of ``sampled_prompts_path`` (cycling through the file), sampled at
    temperature 1 (the policy's own distribution, seeded by the run's seed and r), and the cost model scores
    them. Every process generates the same answers; the main process's costs are broadcast so that every rank
    holds the same lambda."""

    def __init__(self, cfg, scorer, tokenizer, engine):
        from humanalign.eval.generate import read_prompts

        self.prompts, duplicates = read_prompts(cfg.sampled_prompts_path)
        if not self.prompts:
            raise UserError(f"{cfg.sampled_prompts_path}: no prompts for expected_cost: sampled")
        engine.print(f"[safe-mm-dpo] expected cost sampled from {len(self.prompts)} prompts of "
                     f"{cfg.sampled_prompts_path} ({cfg.sampled_num_prompts} per lambda update"
                     + (f"; {duplicates} duplicate prompts skipped" if duplicates else "") + ")")
        self.cfg, self.scorer, self.tokenizer, self.engine = cfg, scorer, tokenizer, engine

    def measure(self, model, round_index: int) -> list[float]:
        from humanalign.eval.generate import generate_responses

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
            from accelerate.utils import broadcast_object_list

            box = [costs]
            broadcast_object_list(box, from_process=0)
            costs = box[0]
        return [c for c in costs if math.isfinite(c)]


__all__ = [
    "HELPFUL", "HARMLESS", "NOT_SHARED", "SHARED_SAME_ORDER", "SHARED_SWAPPED", "STREAM_FIELDS", "DELTA",
    "COST_CHOSEN", "COST_REJECTED", "HAS_COST", "PREFERRED_ROWS",
    "match_streams", "JointDataset", "build_joint_dataset", "StreamView", "JointCollator",
    "StepSettings", "StreamPairs", "StepOutput", "stream_pairs", "response_tokens", "step_loss", "stream_metrics", "expected_cost_of",
    "evaluate", "SampledCost",
]
