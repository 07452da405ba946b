"""Sign calibration of a cost model: move its decision point so that "cost > 0 = unsafe" is a good judge.

A cost model trained with Safe RLHF's loss orders pairs well (pair accuracy) while its zero can sit off the
point that best splits safe from unsafe answers: the MiniLM cost model of docs/benchmarks.md orders 0.73 of
held-out pairs but gives 0.62 of answers a cost of their label's sign. ``choose_sign_offset`` picks, on labelled
validation answers, the offset t such that ``cost - t > 0`` calls the answers unsafe as well as possible;
``write_sign_calibration`` stores it with a saved model folder so that every loader gives calibrated costs:

- **folded into the head's bias** when the head's last linear layer has one (BERT-style encoders: the
  ``classifier.bias`` of ``*ForSequenceClassification``): the saved weights then give the calibrated cost
  directly, so plain ``AutoModelForSequenceClassification`` users get exactly our scores. This is preferred:
  nothing to remember, no second convention.
- **kept beside the weights** when it has none (decoders: Llama/Qwen's ``score`` layer has no bias): our
  loaders (``load_score_model``, ``Scorer``) subtract ``offset`` from every end and token-wise score; plain
  transformers users must subtract ``humanalign_score.sign_calibration.offset`` from the logits themselves
  (the block says so in its ``note``).

Objective: plain sign accuracy (the share of labelled answers on the right side of 0) when the two classes are
near balance (the minority is at least ``BALANCE_FLOOR`` of the answers), else balanced accuracy (the mean of the
safe and the unsafe answers' accuracies). With unbalanced labels plain accuracy is maximised by calling
(almost) everything the majority class, which makes the judge useless on the minority, usually the unsafe
answers we want it to find. PKU-SafeRLHF's safe-vs-unsafe pairs hold one answer of each class per pair, so there
the two objectives coincide.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from safetensors.torch import load_file, save_file

from humanalign.errors import UserError
from humanalign.models.score_model import CALIBRATION_KEY, SCORE_CONFIG_KEY

BALANCE_FLOOR = 0.4  # minority share below which balanced accuracy is maximised instead of accuracy
HEAD_BIAS_KEYS = ("classifier.bias", "score.bias")  # the scalar head's bias in a saved *ForSequenceClassification


def sign_accuracies(costs: Sequence[float], unsafe: Sequence[bool], offset: float = 0.0) -> dict[str, float]:
    """Accuracy and balanced accuracy of the rule ``cost - offset > 0 <=> unsafe`` (NaN costs left out)."""
    kept = [(c, u) for c, u in zip(costs, unsafe) if math.isfinite(c)]
    right_safe = sum(c - offset <= 0 for c, u in kept if not u)
    right_unsafe = sum(c - offset > 0 for c, u in kept if u)
    n_unsafe = sum(u for _, u in kept)
    n_safe = len(kept) - n_unsafe
    per_class = [r / n for r, n in ((right_safe, n_safe), (right_unsafe, n_unsafe)) if n]
    return {"accuracy": (right_safe + right_unsafe) / len(kept) if kept else float("nan"),
            "balanced_accuracy": sum(per_class) / len(per_class) if per_class else float("nan")}


def choose_sign_offset(costs: Sequence[float], unsafe: Sequence[bool]) -> dict[str, Any]:
    """The offset t maximising the objective (module docstring) of ``cost - t > 0 <=> unsafe``.

    Candidates: 0 and the midpoints between consecutive distinct costs (plus one below the lowest and one above
    the highest), so t never sits on a cost. Ties go to the candidate nearest 0 (the smallest move). Returns
    ``{"offset", "objective", "answers", "unsafe_share", "before": {...}, "after": {...}}`` with both accuracies
    at t = 0 and at t."""
    kept = [(float(c), bool(u)) for c, u in zip(costs, unsafe) if math.isfinite(c)]
    if not kept:
        raise UserError("sign calibration needs labelled answers with finite costs; none were given")
    n_unsafe = sum(u for _, u in kept)
    minority = min(n_unsafe, len(kept) - n_unsafe) / len(kept)
    objective = "accuracy" if minority >= BALANCE_FLOOR else "balanced_accuracy"
    values = sorted({c for c, _ in kept})
    candidates = [0.0, values[0] - 1.0, values[-1] + 1.0]
    candidates += [(a + b) / 2 for a, b in zip(values, values[1:])]
    best_t, best = 0.0, -1.0
    for t in sorted(candidates, key=abs):  # nearest 0 first: a later candidate must be strictly better
        value = _objective(kept, t, objective)
        if value > best + 1e-12:
            best_t, best = t, value
    costs_, unsafe_ = [c for c, _ in kept], [u for _, u in kept]
    return {"offset": best_t, "objective": objective, "answers": len(kept), "unsafe_share": n_unsafe / len(kept),
            "before": sign_accuracies(costs_, unsafe_, 0.0), "after": sign_accuracies(costs_, unsafe_, best_t)}


def _objective(kept: list[tuple[float, bool]], offset: float, objective: str) -> float:
    acc = sign_accuracies([c for c, _ in kept], [u for _, u in kept], offset)
    return acc[objective]


def write_sign_calibration(model_dir: str | Path, choice: dict[str, Any]) -> dict[str, Any]:
    """Store ``choice`` (from ``choose_sign_offset``) in a saved score model folder; returns the block written.

    The head bias, when the saved weights have one, is lowered by the offset (single-file or sharded
    safetensors) and the block says ``folded_into_head_bias: true``; our loaders then subtract nothing.
    Otherwise the offset stays in ``config.json`` for the loaders to subtract. The normaliser's mean moves with
    the scores (a normalised score is unchanged). A folder calibrated before (``choice`` then measured on its
    calibrated costs) ends with the sum of both offsets."""
    folder = Path(model_dir)
    cfg_file = folder / "config.json"
    config = json.loads(cfg_file.read_text(encoding="utf-8"))
    block = config.get(SCORE_CONFIG_KEY) or {}
    prior = block.get(CALIBRATION_KEY) or {}
    step = float(choice["offset"])
    offset = float(prior.get("offset", 0.0)) + step
    unfolded = step + (0.0 if prior.get("folded_into_head_bias") else float(prior.get("offset", 0.0)))
    folded = False
    for weights in sorted(folder.glob("model*.safetensors")):
        tensors = load_file(str(weights))
        key = next((k for k in HEAD_BIAS_KEYS if k in tensors), None)
        if key is not None:
            tensors[key] = (tensors[key].float() - unfolded).to(tensors[key].dtype)
            save_file(tensors, str(weights), metadata={"format": "pt"})
            folded = True
            break
    normalizer = block.get("normalizer")
    if normalizer and normalizer.get("count"):
        normalizer["mean"] = float(normalizer["mean"]) - step
    how = ("folded into the head bias: the saved weights give calibrated costs, in transformers too" if folded
           else "plain AutoModelForSequenceClassification users must subtract `offset` from the logits; "
           "humanalign's loaders do it")
    block[CALIBRATION_KEY] = {"offset": offset, "folded_into_head_bias": folded,
                              **{k: choice[k] for k in ("objective", "answers", "unsafe_share", "before", "after")},
                              "note": f"cost > 0 means unsafe at the validated operating point; {how}"}
    config[SCORE_CONFIG_KEY] = block
    tmp = cfg_file.with_name(".config.json.tmp")
    tmp.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    tmp.replace(cfg_file)
    return block[CALIBRATION_KEY]


def costs_and_labels(chosen: Sequence[float], rejected: Sequence[float], chosen_safe: Sequence[bool | None],
                     rejected_safe: Sequence[bool | None]) -> tuple[list[float], list[bool]]:
    """The labelled answers of scored pairs as (costs, is_unsafe); answers without a label are left out."""
    costs, unsafe = [], []
    for cost, safe in zip([*chosen, *rejected], [*chosen_safe, *rejected_safe]):
        if safe is not None:
            costs.append(float(cost))
            unsafe.append(not safe)
    return costs, unsafe


__all__ = ["CALIBRATION_KEY", "BALANCE_FLOOR", "sign_accuracies", "choose_sign_offset", "write_sign_calibration",
           "costs_and_labels"]
