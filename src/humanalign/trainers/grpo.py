"""`humanalign train grpo` / `train grpo-lag`: critic-free online RL (GRPO, DAPO, Dr. GRPO, RLOO) and GRPO-Lagrangian.

Each iteration is one rollout followed by its update phase::

    rollout r:  prompts -> actor samples G answers per prompt (RolloutEngine, KV cache)
                -> reward (and cost) scores: score models on the decoded text, Python functions, weighted sum
                -> group advantages: (r - group mean) / group std (GRPO), / batch std, no division (Dr. GRPO),
                   or r - mean of the G - 1 siblings (RLOO); one advantage per answer, on all of its tokens
                -> grpo-lag: lambda ascends on the rollout's mean cost over the threshold (PPO-Lagrangian's
                   dual ascent, shared), A = (A_r - lambda A_c) / (1 + lambda) with A_c the cost's group advantage
                -> no-grad forwards: old log-probs (only when the rollout is trained on off-policy) and reference
                   log-probs (only with beta > 0)
    update:     update_iters passes over the rollout in shuffled micro-batches: clipped surrogate + beta x k3 KL,
                reduced per loss_type over the whole optimizer step, one engine step per accumulation window

No critic: the module is the actor alone (inside ``PolicyAndCritics`` without critics, so that sharded
generation goes through the prepared module's forward as in PPO). The engine keeps the run folder, checkpoints
(actor, optimizer, schedule, RNG, lambda), metrics and progress; checkpoints and evaluations happen on rollout
boundaries, so a resumed run regenerates nothing and continues exactly.
"""

from __future__ import annotations

import contextlib
import time
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from accelerate.utils import DistributedType

from humanalign.config.grpo import GRPOConfig, GRPOLagConfig
from humanalign.data.prompts import load_online_prompts
from humanalign.engine import Engine
from humanalign.engine.optim import build_param_groups
from humanalign.engine.progress import Progress
from humanalign.engine.saving import save_submodel, state_dict_part
from humanalign.errors import UserError
from humanalign.losses.grpo import group_advantages, grpo_token_loss, reduce_grpo_loss, rloo_advantages
from humanalign.losses.ppo import PPOLagLambda, lagrangian_advantage, masked_mean
from humanalign.models.actor_critic import PolicyAndCritics, disable_all_dropout
from humanalign.models.load import load_causal_lm, load_tokenizer, resolve_model
from humanalign.models.logprobs import shared_layout_possible
from humanalign.models.pretrained import is_peft_model
from humanalign.rollout import GenerationSettings, actor_rollout_engine
from humanalign.rollout.batch import (
    RolloutBatch,
    response_logps,
    rollout_seed,
    shared_prompt_plan,
    shared_response_logps,
)
from humanalign.rollout.schedule import RolloutSchedule
from humanalign.rollout.scorers import SequenceScorer, score_held_out_prompts


class WeightedScorer:
    """The total score of each answer: a weighted sum of score models and Python functions (each a
    ``SequenceScorer``); the metrics hold each part's mean under its own name."""

    def __init__(self, kind: str, parts: Sequence[tuple[str, float, SequenceScorer]]):
        self.kind, self.parts = kind, list(parts)

    def __call__(self, prompts, texts) -> tuple[list[float], dict[str, float]]:
        total = [0.0] * len(texts)
        metrics: dict[str, float] = {}
        for name, weight, scorer in self.parts:
            values, _ = scorer(prompts, texts)
            total = [t + weight * v for t, v in zip(total, values)]
            metrics[f"{self.kind}_{name}_score"] = sum(values) / max(len(values), 1)
        return total, metrics


def build_scorers(cfg: GRPOConfig, device: torch.device, log) -> tuple[WeightedScorer, WeightedScorer | None]:
    """The reward scorer (model, reward_fn, more_reward_fns, weighted) and the cost scorer (model + cost_fn)."""
    bs = cfg.forward_batch_size or cfg.batch_size

    def one(kind: str, model: str | None, fn: str | None, kwargs: dict) -> SequenceScorer:
        return SequenceScorer(kind, model, fn, kwargs, device, bs, cfg.model, log=log)

    rewards = []
    if cfg.reward_model_path:
        rewards.append(("model", cfg.reward_model_weight, one("reward", cfg.reward_model_path, None, {})))
    if cfg.reward_fn:
        rewards.append(("fn", cfg.reward_fn_weight, one("reward", None, cfg.reward_fn, cfg.reward_fn_kwargs)))
    for i, extra in enumerate(cfg.more_reward_fns):
        rewards.append((f"fn{i + 1}", extra.weight, one("reward", None, extra.fn, extra.kwargs)))
    cost = None
    if cfg.uses_cost:
        cost = WeightedScorer("cost", [("total", 1.0, one("cost", cfg.cost_model_path, cfg.cost_fn,
                                                              cfg.cost_fn_kwargs))])
    return WeightedScorer("reward", rewards), cost


class GRPOTrainer:
    """GRPO / GRPO-Lagrangian on top of the shared engine; see the module docstring."""

    def __init__(self, cfg: GRPOConfig, engine: Engine):
        self.cfg, self.engine = cfg, engine
        self.lagrangian = cfg.is_lagrangian
        self._load_data()
        module = self._load_models()
        self.schedule = RolloutSchedule(len(self.prompts), cfg, engine.num_processes, engine.process_index)
        # One pass and one step per rollout: the update sees the very policy that sampled (ratio 1), so the
        # old log-probs are the live ones, detached (as TRL does), and need no forward of their own.
        self.on_policy = cfg.update_iters == 1 and self.schedule.steps_per_rollout == 1
        groups = build_param_groups(module, cfg.learning_rate, cfg.learning_rate, cfg.weight_decay)
        self.model, self.optimizer, _ = engine.prepare(module, groups=groups, total_steps=self.schedule.total_steps)
        self.unwrapped: PolicyAndCritics = engine.unwrap(self.model)
        # the G answers of a prompt in one row, the prompt once (decided on the first rollout: None), unless a
        # model cannot take the packed layout (attention kind, sharded weights): padded rows then
        sharded = engine.distributed_type == DistributedType.FSDP or engine.zero_stage == 3
        possible = all(shared_layout_possible(m) for m in (self.unwrapped.actor, self.ref) if m is not None)
        self.shared: bool | None = None if possible and not sharded else False
        self.lam = None
        if self.lagrangian:  # J_c = the mean cost of the whole rollout (every rank's answers)
            window = cfg.sequences_per_rollout * engine.num_processes
            self.lam = PPOLagLambda(cfg.lambda_init, cfg.lambda_lr, cfg.lambda_max, cfg.cost_threshold,
                                    cfg.lambda_update_delay_steps, window)
            engine.register_state("lagrangian", self.lam)
        self.rollout_engine = actor_rollout_engine(engine, self.model, self.unwrapped.actor, self.tokenizer,
                                                   batch_size=cfg.generation_batch_size)
        self.generation = GenerationSettings(cfg.max_new_tokens, cfg.temperature, cfg.top_p, cfg.top_k,
                                             cfg.repetition_penalty)
        self.last_rollout: dict[str, float] = {}

    def _load_data(self) -> None:
        """Tokenizer, prompts (encoded once), scorers and evaluation prompts."""
        cfg, engine = self.cfg, self.engine
        self.tokenizer = load_tokenizer(cfg.actor_model_path, cfg.model)
        self.pad_id = self.tokenizer.pad_token_id
        self.prompts, self.prompt_ids, self.eval_prompts = load_online_prompts(cfg, self.tokenizer, engine.print,
                                                                               engine.name)
        with engine.loading_whole_models():  # each rank scores its own answers with a whole score model
            self.reward_scorer, self.cost_scorer = build_scorers(cfg, engine.device, engine.print)

    def _load_models(self) -> PolicyAndCritics:
        """The actor (LoRA when asked) and, with beta > 0, the frozen reference unless the adapter-disabled
        actor serves."""
        cfg, engine = self.cfg, self.engine
        actor = load_causal_lm(cfg.actor_model_path, cfg.model, cfg.lora,
                               gradient_checkpointing=cfg.gradient_checkpointing)
        module = PolicyAndCritics(actor, None)
        if cfg.disable_dropout:
            disable_all_dropout(module)
        self.ref = None  # None: the actor with its LoRA adapter disabled (or no KL term at all)
        if cfg.beta > 0 and (cfg.ref_model_path is not None or not is_peft_model(actor)):
            ref = load_causal_lm(cfg.ref_model_path or cfg.actor_model_path, cfg.model, trainable=False)
            self.ref = engine.prepare_frozen(ref)
        return module

    # ------------------------------------------------------------------------------------------ rollout

    def _response_logps(self, forward, model, chunk: RolloutBatch, with_entropy: bool = False, shared=None
                        ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(N, R) log-probs of ``chunk``'s answers (and entropies, no grad) under ``forward(**inputs) -> logits``
        (``model``: the Hugging Face model whose LM head scores): in the shared-prompt layout (each group's
        prompt once, the LM head on the answer tokens only), or as padded rows with the LM head on the response
        positions (``logits_to_keep``). Both equal the full forward's numbers up to float round-off."""
        if self.shared if shared is None else shared:
            plan = shared_prompt_plan(chunk, self.engine.device)
            return shared_response_logps(forward, model, plan, chunk, with_entropy)
        logits = forward(input_ids=chunk.input_ids, attention_mask=chunk.attention_mask,
                         logits_to_keep=chunk.logits_to_keep())
        return response_logps(logits, chunk, with_entropy)

    def _old_logps(self, chunk: RolloutBatch, shared=None) -> torch.Tensor:
        return self._response_logps(lambda **kw: self.unwrapped(**kw)["logits"], self.unwrapped.actor, chunk,
                                    shared=shared)[0]

    def _ref_logps(self, chunk: RolloutBatch, shared=None) -> torch.Tensor:
        """The reference's log-probs: the frozen reference, or the actor with its LoRA adapter disabled."""
        model = self.ref if self.ref is not None else self.unwrapped.actor
        adapter_off = self.unwrapped.actor.disable_adapter() if self.ref is None else contextlib.nullcontext()
        with adapter_off:
            return self._response_logps(lambda **kw: model(**kw, use_cache=False).logits, model, chunk,
                                        shared=shared)[0]

    @torch.no_grad()
    def _shared_layout_agrees(self, batch: RolloutBatch) -> bool:
        """Whether the shared-prompt layout reproduces the padded rows' log-probs (the policy's, and the
        reference's when it is a model of its own) on the rollout's first rows, in eval mode; checked once."""
        rows = batch.select(list(range(min(len(batch), self.cfg.num_generations + 2))))  # two groups at least
        was_training = self.model.training
        self.model.eval()
        try:
            pairs = [(self._old_logps(rows, shared=False), self._old_logps(rows, shared=True))]
            if self.ref is not None:
                pairs.append((self._ref_logps(rows, shared=False), self._ref_logps(rows, shared=True)))
        finally:
            self.model.train(was_training)
        tolerance = 1e-3 if pairs[0][0].dtype == torch.float32 else 5e-2
        agrees = all(((a - b).abs() <= tolerance * a.abs().clamp(min=1)).all() for a, b in pairs)
        if not agrees:
            warnings.warn(f"{type(self.unwrapped.actor).__name__}: GRPO's forwards use padded rows (the shared-"
                          "prompt layout did not reproduce the model's own log-probs)", stacklevel=2)
        return agrees

    @torch.no_grad()
    def _forward_rollout(self, batch: RolloutBatch) -> None:
        """Old log-probs (off-policy updates only) and reference log-probs (beta > 0 only), in no-grad chunks."""
        wanted = {"old_logps": not self.on_policy, "ref_logps": self.cfg.beta > 0}
        if not any(wanted.values()):
            return
        size = self.cfg.forward_batch_size or self.cfg.batch_size
        outputs = {name: batch.response_mask.new_zeros(batch.response_mask.shape, dtype=torch.float32)
                   for name, want in wanted.items() if want}
        for start in range(0, len(batch), size):
            rows = list(range(start, min(start + size, len(batch))))
            chunk = batch.select(rows)
            with self.engine.accelerator.autocast():
                if wanted["old_logps"]:
                    value = self._old_logps(chunk)
                    outputs["old_logps"][start:start + len(rows), : value.shape[1]] = value
                if wanted["ref_logps"]:
                    value = self._ref_logps(chunk)
                    outputs["ref_logps"][start:start + len(rows), : value.shape[1]] = value
        for name, value in outputs.items():
            setattr(batch, name, value)

    def _advantages(self, scores: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(advantages (N,), group spreads (P,)) of this rank's answers; groups never straddle ranks, only the
        batch std (scale_rewards=batch) is taken over every rank's scores."""
        cfg, g = self.cfg, self.cfg.num_generations
        if cfg.advantage_estimator == "rloo":
            return rloo_advantages(scores, g), group_advantages(scores, g, "none")[1]
        if cfg.scale_rewards != "batch" or self.engine.num_processes == 1:
            return group_advantages(scores, g, cfg.scale_rewards)
        everyone, _ = group_advantages(self.engine.gather(scores), g, "batch")
        mine = slice(self.engine.process_index * len(scores), (self.engine.process_index + 1) * len(scores))
        return everyone[mine], group_advantages(scores, g, "none")[1]

    @torch.no_grad()
    def rollout(self, index: int) -> tuple[RolloutBatch, torch.Tensor]:
        """Sample and score rollout ``index``; records its metrics; returns the batch and its advantages (N,)."""
        cfg, engine = self.cfg, self.engine
        rows = self.schedule.prompt_rows(index)
        started = time.perf_counter()
        gen = self.rollout_engine.generate([self.prompt_ids[i] for i in rows], self.generation,
                                           cfg.num_generations, seed=rollout_seed(cfg.seed, index, engine.process_index))
        prompts = [self.prompts[rows[i]] for i in gen.prompt_index]
        scores, metrics = self.reward_scorer(prompts, gen.texts)
        scores_t = torch.tensor(scores, device=engine.device)  # (N,)
        advantages, spread = self._advantages(scores_t)
        adv_r = advantages
        if self.cost_scorer is not None:
            costs, cost_parts = self.cost_scorer(prompts, gen.texts)
            costs_t = torch.tensor(costs, device=engine.device)  # (N,)
            metrics.update(cost_parts, cost=costs_t.mean())
            if self.lagrangian:
                advantages = self._lagrangian(costs_t, adv_r, metrics)
        scored = time.perf_counter()

        batch = RolloutBatch.from_generation(gen.prompt_ids, gen.response_ids, self.pad_id, engine.device)
        if self.shared is None:
            self.shared = self._shared_layout_agrees(batch)
        self._forward_rollout(batch)
        lengths = batch.response_mask.sum(-1).float()  # (N,)
        metrics.update({
            "reward": scores_t.mean(), "reward_std": scores_t.std() if len(scores_t) > 1 else 0.0,
            "group_reward_spread": spread.mean(), "zero_spread_groups": (spread < 1e-6).float().mean(),
            "response_length": lengths.mean(), "finished": sum(gen.finished) / len(gen),
            "advantage_mean": advantages.mean(), "advantage_std": advantages.std(),
            "reward_advantage_abs": adv_r.abs().mean(),
            "generation_tokens_per_s": gen.response_tokens / max(gen.seconds, 1e-9),
            "rollout_seconds": time.perf_counter() - started, "scoring_seconds": scored - started - gen.seconds,
        })
        self.last_rollout = {k: float(v) for k, v in metrics.items()}
        engine.record(metrics)
        return batch, advantages

    def _lagrangian(self, costs: torch.Tensor, adv_r: torch.Tensor, metrics: dict[str, Any]) -> torch.Tensor:
        """Lambda's dual-ascent step on the rollout's mean cost, then (A_r - lambda A_c) / (1 + lambda)."""
        cfg = self.cfg
        self.lam.observe(self.engine.gather(costs))
        self.lam.maybe_update(self.engine.step)
        adv_c, cost_spread = self._advantages(costs)  # the reward's estimator and scaling, on the costs
        metrics.update({"lambda": self.lam.value, "lambda_updates": self.lam.num_updates,
                        "episode_cost_window": self.lam.window_mean, "cost_advantage_abs": adv_c.abs().mean(),
                        "group_cost_spread": cost_spread.mean(),
                        "cost_violation_rate": (costs > cfg.cost_threshold).float().mean()})
        return lagrangian_advantage(adv_r, adv_c, self.lam.value)

    # ------------------------------------------------------------------------------------------ update

    def _loss(self, mb: RolloutBatch, advantages: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, dict]:
        """(loss numerator, its count, metrics) of one micro-batch (see ``reduce_grpo_loss``)."""
        cfg = self.cfg
        # the LM head on the answer tokens only (with a 49k vocabulary it is a fifth of a small model)
        logps, entropy = self._response_logps(lambda **kw: self.model(**kw)["logits"], self.unwrapped.actor, mb,
                                              with_entropy=True)
        mask = mb.response_mask
        old = logps.detach() if mb.old_logps is None else mb.old_logps
        token_loss, metrics = grpo_token_loss(logps, old, advantages, mask, cfg.epsilon_low, cfg.epsilon_high,
                                              cfg.beta, mb.ref_logps)
        numerator, count = reduce_grpo_loss(token_loss, mask, cfg.loss_type, cfg.max_new_tokens)
        metrics = {("kl_k3" if k == "kl" else k): v for k, v in metrics.items()}  # the token mean the loss sees
        if mb.ref_logps is not None:  # PPO's "kl": log pi - log ref summed over each answer, mean over answers
            metrics["kl"] = ((logps.detach() - mb.ref_logps) * mask).sum(-1).mean()
        metrics.update(loss=(numerator / count.clamp(min=1.0)).detach(), entropy=masked_mean(entropy, mask))
        return numerator, count, metrics

    def update(self, batch: RolloutBatch, advantages: torch.Tensor, index: int) -> None:
        """update_iters shuffled passes over the rollout, one optimizer step per accumulation window; each
        step's loss is its micro-batches' numerators over their total count on every rank."""
        cfg, engine = self.cfg, self.engine
        mask = batch.response_mask
        for it in range(cfg.update_iters):
            generator = torch.Generator().manual_seed(rollout_seed(cfg.seed, index, it, engine.process_index))
            micro_batches = torch.randperm(len(batch), generator=generator).split(cfg.batch_size)
            for first in range(0, len(micro_batches), engine.accumulation):
                window = micro_batches[first:first + engine.accumulation]
                counts = [reduce_grpo_loss(mask[rows].float(), mask[rows], cfg.loss_type, cfg.max_new_tokens)[1]
                          for rows in window]
                normalizer = engine.reduce_sum(torch.stack(counts).sum())
                for rows in window:
                    with engine.accumulate(self.model):
                        numerator, count, metrics = self._loss(batch.select(rows), advantages[rows])
                        engine.backward(numerator, normalizer=normalizer)
                        engine.record(metrics, weight=float(count))
                engine.record({"actor_lr": self.optimizer.param_groups[0]["lr"]})
                engine.optimizer_step()

    # ------------------------------------------------------------------------------------------ evaluation

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        """Answer the held-out prompts once each (this rank's share; every rank runs the same number of
        generate calls, as sharded models need) and log their mean reward, cost and length."""
        return self.engine.log_eval(score_held_out_prompts(
            self.engine, self.rollout_engine, self.tokenizer, self.eval_prompts, self.generation,
            self.cfg.max_prompt_length, rollout_seed(self.cfg.seed, -1), self.reward_scorer, self.cost_scorer))

    # ------------------------------------------------------------------------------------------ the loop

    def _save_final(self, unwrapped: PolicyAndCritics, folder: Path, state_dict: dict | None) -> None:
        """The actor into ``folder``; with lora.merge_on_save also merged into ``<run>/final-merged``.
        ``state_dict``: the module's weights gathered from FSDP / DeepSpeed shards (None: the live weights)."""
        merge = self.cfg.lora.enabled and self.cfg.lora.merge_on_save
        save_submodel(unwrapped.actor, self.tokenizer, folder, state_dict_part(state_dict, "actor."),
                      merged_folder=self.engine.run_dir / "final-merged" if merge else None)

    def train(self) -> dict[str, Any]:
        cfg, engine, schedule = self.cfg, self.engine, self.schedule
        first = schedule.first_rollout(engine.step, "GRPO")
        engine.print(f"[{engine.name}] " + schedule.describe(cfg.num_generations, first))
        engine.progress = Progress(engine.total_steps, initial=engine.step,
                                   enabled=engine.is_main_process and cfg.progress_bar, desc=engine.name)
        start_eval = None
        if cfg.eval_on_start and self.eval_prompts and engine.step == 0:  # the baseline, logged at step 0
            start_eval = self.evaluate()
        for index in range(first, schedule.total_rollouts):
            self.model.train()
            batch, advantages = self.rollout(index)
            before = engine.step
            self.update(batch, advantages, index)
            self.rollout_engine.sync_weights(self.unwrapped.actor)
            if self.eval_prompts and schedule.due(cfg.eval_steps, before, engine.step):
                self.evaluate()
            if schedule.due(cfg.save_steps, before, engine.step):
                engine.save_checkpoint()
            engine.stop_if_requested()  # SIGINT/SIGTERM: checkpoint here, at a rollout boundary, and exit
        summary: dict[str, Any] = {"rollouts": schedule.total_rollouts, "last_rollout": self.last_rollout,
                                   "eval_on_start": start_eval}
        if self.lam is not None:
            summary["lambda"] = self.lam.value
        final = engine.finish(self.model, self.tokenizer, save_fn=self._save_final, summary=summary)
        return {"final_model": str(final), **summary}


def check_inputs(cfg: GRPOConfig) -> None:
    """Fail before the run folder is touched when a data file or a local model folder is missing."""
    prompts = [cfg.prompts_path] if isinstance(cfg.prompts_path, str) else list(cfg.prompts_path)
    for key, path in [*(("prompts_path", p) for p in prompts), ("eval_prompts_path", cfg.eval_prompts_path)]:
        if path and not Path(path).is_file():
            raise UserError(f"{key}: {path} not found")
    for key in ("actor_model_path", "ref_model_path", "reward_model_path", "cost_model_path"):
        if getattr(cfg, key, None):
            resolve_model(getattr(cfg, key))  # a missing local path is an error here, a Hub id passes


def run(cfg: GRPOConfig) -> dict[str, Any]:
    """Entry point of `humanalign train grpo` and `humanalign train grpo-lag` (chosen by the config class)."""
    check_inputs(cfg)
    name = "grpo-lag" if isinstance(cfg, GRPOLagConfig) else "grpo"
    with Engine(cfg, name=name) as engine:
        return GRPOTrainer(cfg, engine).train()


__all__ = ["GRPOTrainer", "WeightedScorer", "build_scorers", "check_inputs", "run"]
