"""`humanalign train safe-mm-dpo`: margin-scaled DPO on a helpful and a harmless stream, balanced by a Lagrange
multiplier raised by dual ascent while the policy's expected cost is above a threshold.

The method, its symbols and ablations: docs/algorithms/safe_mm_dpo.md. The pieces: ``safe_mm_dpo_margins.py``
(margins and their checks) and ``safe_mm_dpo_parts.py`` (two-stream data, the shared forward, evaluation,
sampled J_c); this file is the loop:

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
"""

from __future__ import annotations

import math
import time
from typing import Any

import torch

from humanalign.config.safe_mm_dpo import SafeMMDPOConfig
from humanalign.losses.safe_mm_dpo import LambdaState
from humanalign.trainers.safe_mm_dpo_margins import attach_margins
from humanalign.trainers.safe_mm_dpo_parts import (
    HARMLESS,
    HELPFUL,
    JointCollator,
    SampledCost,
    StepSettings,
    StreamView,
    build_joint_dataset,
    evaluate,
    expected_cost_of,
    response_tokens,
    step_loss,
)

FINAL_METRICS_FILE = "final_metrics.json"


def uses_safety_stream(cfg: SafeMMDPOConfig) -> bool:
    return cfg.use_safety_stream and cfg.train_harmless_path is not None


def lambda_state(cfg: SafeMMDPOConfig) -> LambdaState:
    return LambdaState(init=cfg.lambda_init, lr=cfg.lambda_lr, lam_max=cfg.lambda_max, threshold=cfg.cost_threshold,
                       update_interval=cfg.lambda_update_interval, delay_steps=cfg.lambda_update_delay_steps,
                       window_size=cfg.cost_window_size)


def describe(cfg: SafeMMDPOConfig) -> str:
    parts = [f"beta_ori {cfg.beta_ori:g}, w {cfg.w:g}, k {cfg.k:g}" + (" (fixed beta)" if cfg.w == 0 else ""),
             f"{'averaged' if cfg.average_log_prob else 'summed'} log-probs", f"kl_coeff {cfg.kl_coeff:g}"]
    if uses_safety_stream(cfg):
        if cfg.update_lambda:
            parts.append(f"lambda {cfg.lambda_init:g} by dual ascent (lr {cfg.lambda_lr:g}, max {cfg.lambda_max:g}, "
                         f"d {cfg.cost_threshold:g}, every {cfg.lambda_update_interval} step(s) after "
                         f"{cfg.lambda_update_delay_steps}, J_c {cfg.expected_cost})")
        else:
            parts.append(f"fixed lambda {cfg.lambda_init:g} (reward shaping)")
    else:
        parts.append("no safety stream (MM-DPO)" if cfg.w > 0 else "no safety stream, fixed beta (DPO)")
    return "[safe-mm-dpo] " + " | ".join(parts)


def held_out(values: dict[str, float] | None) -> dict[str, float | None] | None:
    """The validation numbers the demo and the benchmark compare, under plain names."""
    if not values:
        return None
    names = {"helpful_accuracy": "eval/accuracy_helpful", "harmless_accuracy": "eval/accuracy_safety",
             "expected_cost": "eval/expected_cost", "loss_helpful": "eval/loss_helpful",
             "loss_safety": "eval/loss_safety", "kl_divergence": "eval/kl_divergence",
             "perplexity": "eval/perplexity"}
    return {name: values.get(key) for name, key in names.items()}


def load_streams(cfg: SafeMMDPOConfig, tokenizer, engine) -> dict[str, dict[str, Any]]:
    """{"helpful": {"train": PairDataset, "val": ...}, "harmless": {...}}; harmless training pairs only with the
    safety stream, harmless validation pairs whenever given (an MM-DPO run still measures harmlessness)."""
    from humanalign.data.preference_dataset import load_pair_dataset

    def load(path, kind, split):
        return load_pair_dataset(path, kind, tokenizer, cfg, engine, name=f"{split} {path}") if path else None

    return {
        HELPFUL: {"train": load(cfg.train_helpful_path, "helpful", "train"),
                  "val": load(cfg.val_helpful_path, "helpful", "val")},
        HARMLESS: {"train": load(cfg.train_harmless_path, "harmless", "train") if uses_safety_stream(cfg) else None,
                   "val": load(cfg.val_harmless_path, "harmless", "val")},
    }


def is_logging_step(engine, step: int) -> bool:
    """Whether optimizer step ``step`` (1-based) is one the engine logs (as Engine._log_train decides)."""
    return step % engine.config.logging_steps == 0 or step == engine.total_steps


def run(cfg: SafeMMDPOConfig) -> dict[str, Any]:
    """Train the policy; returns (and writes to ``<output_dir>/final_metrics.json``) the held-out accuracies and
    expected cost before and after training, lambda's path and the run's figures."""
    from humanalign.data.io import atomic_write_json
    from humanalign.engine import Engine
    from humanalign.models.load import count_parameters, load_causal_lm, load_tokenizer
    from humanalign.models.reference import build_reference
    from humanalign.trainers.dpo import disable_dropout

    start = time.time()
    safety = uses_safety_stream(cfg)
    settings = StepSettings.from_config(cfg)
    with Engine(cfg, name="safe-mm-dpo") as engine:
        engine.print(describe(cfg))
        tokenizer = load_tokenizer(cfg.policy_model_path, cfg.model)
        streams = load_streams(cfg, tokenizer, engine)
        margins, cost_scorer = attach_margins(cfg, engine, streams)
        policy = load_causal_lm(cfg.policy_model_path, cfg.model, cfg.lora,
                                gradient_checkpointing=cfg.gradient_checkpointing)
        if cfg.disable_dropout:
            disable_dropout(policy)
        trainable, total = count_parameters(policy)
        engine.print(f"[safe-mm-dpo] policy {cfg.policy_model_path}: {trainable:,} of {total:,} parameters trained")
        datasets = [d for parts in streams.values() for d in parts.values() if d is not None]
        reference = build_reference(cfg, policy, engine, datasets, pad_token_id=tokenizer.pad_token_id)
        engine.print(f"[safe-mm-dpo] reference: {reference.describe()}")
        # the exact KL needs a live reference's distributions; with kl_coeff 0 it is only measured (measure_kl)
        measure_kl = reference.mode != "precomputed" and (cfg.kl_coeff > 0 or cfg.measure_kl)

        joint = build_joint_dataset(streams[HELPFUL]["train"], streams[HARMLESS]["train"], cfg.seed,
                                    share_responses=cfg.share_responses)
        engine.print(f"[safe-mm-dpo] {joint.describe()}")
        collate = JointCollator(tokenizer.pad_token_id)
        train_loader = engine.train_loader(joint, collate, lengths=joint.lengths)
        eval_loaders = {s: engine.eval_loader(StreamView(parts["val"], s), collate, lengths=parts["val"].lengths)
                        for s, parts in streams.items() if parts["val"] is not None}
        model, _, _ = engine.prepare(policy, train_loader)
        reference.attach(model)

        lam = lambda_state(cfg)
        history: dict[str, Any] = {"lambda_path": [[0, lam.value]], "cost_path": [], "before": {},
                                   "sampled_rounds": 0}
        engine.register_state("lambda", lam)  # value, window of recent costs, update counters
        engine.register_state("history", history)
        sampler = SampledCost(cfg, cost_scorer, tokenizer, engine) if safety and cfg.expected_cost == "sampled" else None

        def current_lambda() -> float:
            return lam.value if safety else 0.0

        def run_eval() -> dict[str, float]:
            return engine.log_eval(evaluate(model, reference, eval_loaders, engine, settings, current_lambda(),
                                            with_kl=measure_kl, use_safety=safety))

        if cfg.eval_on_start and eval_loaders and engine.step == 0:
            history["before"] = run_eval()
        train_seconds, steps_run = 0.0, 0
        for micro_batches in engine.train_steps(train_loader):
            step_start = time.time()
            # the KL term is computed on every micro-batch (each model's LM head on the response positions only,
            # models/kl.py); with kl_coeff 0 the KL is only measured, on the first micro-batch of a logged step
            log_kl = measure_kl and is_logging_step(engine, engine.step + 1)
            kl_tokens = None
            if settings.kl_coeff > 0:  # the KL term: a mean over every response token of the step, on all ranks
                step_tokens = engine.reduce_sum(sum(response_tokens(b) for b in micro_batches))
                kl_tokens = step_tokens.clamp(min=1) / (len(micro_batches) * engine.num_processes)
            step_costs: list[torch.Tensor] = []
            for i, batch in enumerate(micro_batches):
                with_kl = settings.kl_coeff > 0 or (log_kl and i == 0)
                with engine.accumulate(model):
                    out = step_loss(model, reference, batch, settings, current_lambda(), with_kl, kl_tokens)
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
            stepped = engine.optimizer_step()
            if stepped and safety:
                update_lambda(cfg, engine, lam, history, step_costs, sampler, model)
            history["lambda_path"].append([engine.step, lam.value])
            train_seconds += time.time() - step_start
            steps_run += 1
            if eval_loaders and engine.should_evaluate():
                run_eval()
            if engine.should_save():
                engine.save_checkpoint()

        after = engine.last_eval[1] if engine.last_eval and engine.last_eval[0] == engine.step else None
        path = [[int(s), float(v)] for s, v in history["lambda_path"]]
        values = [v for _, v in path]
        result: dict[str, Any] = {
            "before": held_out(history["before"]),
            "after": held_out(after),
            "lambda": {"init": cfg.lambda_init, "final": lam.value, "min": min(values), "max": max(values),
                       "updates": lam.num_updates, "threshold": cfg.cost_threshold, "path": path,
                       # J_c (the window's mean expected cost) that each update used: [step, J_c]
                       "expected_cost_path": [[int(s), float(j)] for s, j in history["cost_path"]]}
            if safety else None,
            "margins": margins,
            "pairs": {"train_helpful": len(streams[HELPFUL]["train"]),
                      "train_harmless": len(streams[HARMLESS]["train"]) if safety else 0,
                      "shared": joint.num_shared, "items_per_epoch": len(joint)},
            "seconds_per_step": train_seconds / steps_run if steps_run else None,
        }
        summary = {"reference": reference.describe(), "margins": margins, "pairs": result["pairs"],
                   "skipped": {f"{split} {s}": dict(d.skipped) for s, parts in streams.items()
                               for split, d in parts.items() if d is not None}}
        final = engine.finish(model, tokenizer, summary=summary)
        result.update({"final_model": str(final), "steps": engine.step, "seconds": round(time.time() - start, 1)})
        if engine.is_main_process:
            atomic_write_json(engine.run_dir / FINAL_METRICS_FILE, result)
        if result["before"] and result["after"]:
            engine.print("[safe-mm-dpo] held-out implicit accuracy: helpful "
                         f"{_fmt(result['before']['helpful_accuracy'])} -> {_fmt(result['after']['helpful_accuracy'])}"
                         f", harmless {_fmt(result['before']['harmless_accuracy'])} -> "
                         f"{_fmt(result['after']['harmless_accuracy'])}"
                         + (f"; lambda {cfg.lambda_init:g} -> {lam.value:.4g}" if safety else ""))
    return result


def _fmt(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.3f}"


def update_lambda(cfg, engine, lam: LambdaState, history: dict[str, Any], step_costs: list[torch.Tensor],
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


__all__ = ["run", "update_lambda", "lambda_state", "load_streams", "held_out", "describe", "uses_safety_stream",
           "FINAL_METRICS_FILE"]
