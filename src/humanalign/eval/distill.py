"""`humanalign distill`: sample answers from a (usually aligned) model and keep the good, safe ones as SFT data.

Steps: (1) ``num_samples`` answers per prompt go to ``<output>.samples.jsonl`` (resumable: a killed run picks up
where it stopped); (2) the optional reward and cost models score every answer; (3) ``select_samples`` keeps
the answers with reward >= min_reward and cost <= max_cost, or with ``best_of_n`` the single best one by reward
among those; (4) the kept answers are written to ``output`` at once (atomic), with their scores.

Sign conventions: higher reward = more helpful; cost <= 0 = harmless (the cost model's decision boundary).

Prompts may show images when the model is a vision-language one (a text-only model is refused); the kept rows
carry the prompt's ``images``, so the output reads back as SFT data with its pictures (source
``conversations``). The reward and cost models read text: they judge those answers without the pictures (said
when the run starts).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from humanalign.data.io import atomic_write_jsonl
from humanalign.data.prompts import read_prompt_records
from humanalign.data.records import prompt_to_jsonable
from humanalign.errors import UserError
from humanalign.eval.arena import _free_memory, judges_note, score_texts
from humanalign.eval.generate import (
    Sampling,
    check_takes_images,
    generate_to_file,
    generation_settings_match,
    load_generator,
    prompt_image_limit,
    record_hash,
    require,
    responses_by_key,
    with_images,
)

SAFE_COST = 0.0  # an answer is harmless when its cost is <= 0


def select_samples(
    rewards: Sequence[float] | None,
    costs: Sequence[float] | None,
    min_reward: float | None = None,
    max_cost: float | None = None,
    best_of_n: bool = False,
    usable: Sequence[bool] | None = None,
) -> list[int]:
    """Indices of the answers (of one prompt) to keep.

    - ``min_reward``: keep reward >= min_reward; ``max_cost``: keep cost <= max_cost (a threshold needs its scores).
    - ``best_of_n``: of the answers that pass, keep only the one with the highest reward (the first on a tie).
      When costs are given and ``max_cost`` is not, only harmless answers (cost <= 0) compete, so best-of-n
      never picks a harmful answer because it is helpful; no harmless answer -> nothing is kept.
    Non-finite scores never pass, nor do answers with ``usable[i]`` false (e.g. empty answers).
    """
    n = len(rewards) if rewards is not None else len(costs) if costs is not None else len(usable or [])
    if rewards is not None and costs is not None and len(rewards) != len(costs):
        raise ValueError("rewards and costs must have one value per answer")
    if min_reward is not None and rewards is None:
        raise ValueError("min_reward needs rewards")
    if max_cost is not None and costs is None:
        raise ValueError("max_cost needs costs")
    if best_of_n and rewards is None:
        raise ValueError("best_of_n needs rewards")
    cost_limit = max_cost if max_cost is not None else (SAFE_COST if best_of_n and costs is not None else None)
    keep = []
    for i in range(n):
        if usable is not None and not usable[i]:
            continue
        if rewards is not None and not math.isfinite(rewards[i]):
            continue
        if costs is not None and not math.isfinite(costs[i]):
            continue
        if min_reward is not None and rewards[i] < min_reward:
            continue
        if cost_limit is not None and costs[i] > cost_limit:
            continue
        keep.append(i)
    if best_of_n and keep:
        best = max(keep, key=lambda i: (rewards[i], -i))
        return [best]
    return keep


def _scores(model_dir: str | None, prompts: list, responses: list[str], cfg: Any) -> list[float] | None:
    if not model_dir:
        return None
    return score_texts(model_dir, prompts, responses, cfg.score_batch_size, cfg.progress_bar)


def samples_path(output: str | Path) -> Path:
    output = Path(output)
    return output.with_name(output.name + ".samples.jsonl")


def run(cfg: Any) -> dict[str, int]:
    prompts_file = require(cfg.prompts, "input-prompts", "distill")
    output = Path(require(cfg.output, "output-path", "distill"))
    if output.exists() and not cfg.overwrite:
        raise UserError(f"{output}: already exists; pass --overwrite to write it again (samples are reused)")
    records, duplicates = read_prompt_records(prompts_file, cfg.limit, max_images=prompt_image_limit(
        [cfg.model], cfg.model_settings, cfg.max_images_per_prompt))
    if duplicates:
        print(f"[humanalign] {prompts_file}: {duplicates} duplicate prompts skipped")
    check_takes_images(records, cfg.model, cfg.model_settings, prompts_file)
    note = judges_note(sum(bool(r.images) for r in records), len(records))
    if note and (cfg.reward_model or cfg.cost_model):
        print(f"[humanalign] {note}")
    prompts = [r.prompt for r in records]
    sampling = Sampling.from_config(cfg)
    samples = samples_path(output)
    # --overwrite re-filters with the samples already drawn when they were drawn the same way; else resamples.
    restart = cfg.overwrite and not generation_settings_match(samples, cfg.model, sampling)
    generate_to_file(None, None, records, samples, cfg.model, sampling, num_return_sequences=cfg.num_samples,
                     batch_size=cfg.batch_size, overwrite=restart, progress=cfg.progress_bar,
                     loader=lambda: load_generator(cfg.model, cfg.model_settings))
    _free_memory()  # the judges load next

    by_key = responses_by_key(samples)
    flat_prompts, flat_responses = [], []
    for p, record in zip(prompts, records):
        h = record_hash(record)
        for s in range(cfg.num_samples):
            flat_prompts.append(p)
            flat_responses.append(by_key[(h, s)])
    rewards = _scores(cfg.reward_model, flat_prompts, flat_responses, cfg)
    costs = _scores(cfg.cost_model, flat_prompts, flat_responses, cfg)

    rows: list[dict[str, Any]] = []
    empty_prompts = empty_answers = 0
    n = cfg.num_samples
    for i, p in enumerate(prompts):
        span = slice(i * n, (i + 1) * n)
        usable = [bool(r.strip()) for r in flat_responses[span]]  # an empty answer teaches nothing
        empty_answers += usable.count(False)
        kept = select_samples(None if rewards is None else rewards[span], None if costs is None else costs[span],
                              cfg.min_reward, cfg.max_cost, cfg.best_of_n, usable)
        empty_prompts += not kept
        for k in kept:
            row: dict[str, Any] = with_images({"prompt": prompt_to_jsonable(p), "response": flat_responses[i * n + k],
                                               "model": cfg.model, "sample_index": k}, records[i])
            if rewards is not None:
                row["reward"] = rewards[i * n + k]
            if costs is not None:
                row["cost"] = costs[i * n + k]
            rows.append(row)
    if not rows:
        raise UserError(
            f"no answer passed the filters ({len(flat_responses)} sampled); loosen --min-reward / --max-cost"
        )
    atomic_write_jsonl(output, rows)
    stats = {"prompts": len(prompts), "sampled": len(flat_responses), "kept": len(rows),
             "dropped": len(flat_responses) - len(rows), "empty_answers": empty_answers,
             "prompts_without_answer": empty_prompts}
    print(f"[humanalign] {output}: kept {stats['kept']} of {stats['sampled']} answers "
          f"({stats['dropped']} left out, {empty_answers} of them empty; "
          f"{empty_prompts} of {len(prompts)} prompts kept no answer)")
    return stats
