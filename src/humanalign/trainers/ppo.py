"""`humanalign train ppo` / `train ppo-lag`: online RLHF with PPO (InstructGPT) and PPO-Lagrangian (Safe RLHF).

Each iteration is one rollout followed by its update phase::

    rollout r:  prompts -> actor samples answers (RolloutEngine, KV cache)
                -> reward / cost scores (score models on the decoded text, Python functions, or both)
                -> no-grad forwards: old log-probs, reference log-probs, critics' values
                -> per-token rewards (score at the last token, KL penalty on every token) -> GAE
                -> PPO-Lag: lambda update from the recent episode costs, A = (A_r - lambda A_c) / (1 + lambda)
    update:     update_iters passes over the rollout in shuffled micro-batches: clipped surrogate + clipped
                value losses (+ ptx_coeff x SFT loss), one engine optimizer step per
                gradient_accumulation_steps micro-batches

Actor and critics form one module (``PolicyAndCritics``) with one AdamW: actor groups at learning_rate with
lr_scheduler, critic groups at critic_learning_rate with critic_lr_scheduler, each role's gradients clipped
apart. The engine keeps the run folder, checkpoints (actor, critics, optimizer, schedule, RNG, plus the KL
controller, lambda and its cost window, reward statistics), metrics and progress. Checkpoints and evaluations
happen on rollout boundaries, so a resumed run regenerates nothing and continues exactly; with ``eval_on_start``
the held-out prompts are also answered once before the first rollout (the baseline, logged at step 0).

Where the pieces live: the trained module and its critics in ``models/actor_critic.py``, the rollout tensors
and scorers in ``rollout/batch.py`` / ``rollout/scorers.py``, the prompts and ptx data in ``data/prompts.py``,
the per-role optimizer groups in ``engine/optim.py``, the losses in ``losses/ppo.py`` and ``losses/sft.py``.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import torch
from accelerate.utils import DistributedType

from humanalign.config.ppo import PPOConfig, PPOLagConfig
from humanalign.data.prompts import PtxStream, load_online_prompts, load_ptx_examples
from humanalign.engine import Engine
from humanalign.engine.data import StepBatchSampler
from humanalign.engine.optim import build_param_groups, clip_per_role, per_group_scheduler
from humanalign.engine.progress import Progress
from humanalign.engine.saving import save_submodel, state_dict_part
from humanalign.errors import UserError
from humanalign.losses.ppo import (
    AdaptiveKLController,
    FixedKLController,
    PPOLagLambda,
    clipped_surrogate_loss,
    clipped_value_loss,
    gae,
    kl_shaped_rewards,
    lagrangian_advantage,
    masked_mean,
    masked_whiten,
)
from humanalign.losses.sft import ptx_loss
from humanalign.models.actor_critic import (
    PolicyAndCritics,
    critic_source,
    disable_all_dropout,
    load_critic,
)
from humanalign.models.load import load_causal_lm, load_tokenizer, resolve_model
from humanalign.models.pretrained import is_peft_model
from humanalign.models.score_model import save_score_model
from humanalign.rollout import GenerationSettings, actor_rollout_engine
from humanalign.rollout.batch import RolloutBatch, response_logps, response_values, rollout_seed
from humanalign.rollout.schedule import RolloutSchedule
from humanalign.rollout.scorers import RunningScoreStats, SequenceScorer, score_held_out_prompts


class PPOTrainer:
    """PPO / PPO-Lagrangian on top of the shared engine; see the module docstring."""

    def __init__(self, cfg: PPOConfig, engine: Engine):
        self.cfg, self.engine = cfg, engine
        self.lagrangian = cfg.is_lagrangian
        self.shaping = bool(getattr(cfg, "reward_shaping", False))
        self._load_data()
        module = self._load_models()
        self.schedule = RolloutSchedule(len(self.prompts), cfg, engine.num_processes, engine.process_index)
        groups = build_param_groups(module, cfg.learning_rate, cfg.critic_learning_rate, cfg.weight_decay)
        self.model, self.optimizer, _ = engine.prepare(module, groups=groups, total_steps=self.schedule.total_steps)
        # the engine's schedule is one curve for every group; actor and critics each get their own
        engine.scheduler = per_group_scheduler(self.optimizer, cfg, self.schedule.total_steps, engine.step)
        self.roles = ["actor", *(f"{k}_critic" for k in module.critics())]
        # Clipping each role apart needs unscaled, unsharded gradients: not under fp16 loss scaling or sharding.
        self.clip_apart = (engine.accelerator.mixed_precision != "fp16" and engine.distributed_type in (
            DistributedType.NO, DistributedType.MULTI_GPU, DistributedType.MULTI_CPU))
        self.unwrapped: PolicyAndCritics = engine.unwrap(self.model)
        self._register_states()
        self.rollout_engine = actor_rollout_engine(engine, self.model, self.unwrapped.actor, self.tokenizer,
                                                   batch_size=cfg.generation_batch_size)
        self.generation = GenerationSettings(cfg.max_new_tokens, cfg.temperature, cfg.top_p, cfg.top_k,
                                             cfg.repetition_penalty)
        self.last_rollout: dict[str, float] = {}

    def _load_data(self) -> None:
        """Tokenizer, prompts (encoded once), scorers, ptx examples and evaluation prompts."""
        cfg, engine = self.cfg, self.engine
        self.tokenizer = load_tokenizer(cfg.actor_model_path, cfg.model)
        self.pad_id = self.tokenizer.pad_token_id
        self.prompts, self.prompt_ids, self.eval_prompts = load_online_prompts(cfg, self.tokenizer, engine.print,
                                                                               engine.name)
        device, forward_bs = engine.device, cfg.forward_batch_size or cfg.batch_size
        with engine.loading_whole_models():  # each rank scores its own answers with a whole score model
            self.reward_scorer = SequenceScorer("reward", cfg.reward_model_path, cfg.reward_fn, cfg.reward_fn_kwargs,
                                                device, forward_bs, cfg.model, log=engine.print)
            self.cost_scorer = SequenceScorer("cost", cfg.cost_model_path, cfg.cost_fn, cfg.cost_fn_kwargs, device,
                                              forward_bs, cfg.model, log=engine.print) if cfg.uses_cost else None
        self.ptx = None
        if cfg.ptx_path and cfg.ptx_coeff > 0:
            examples = load_ptx_examples(cfg.ptx_path, cfg.ptx_source, self.tokenizer, cfg.max_length,
                                         log=engine.print)
            sampler = StepBatchSampler(len(examples), cfg.batch_size, num_processes=engine.num_processes,
                                       process_index=engine.process_index,
                                       accumulation=cfg.gradient_accumulation_steps, seed=cfg.seed + 1)
            self.ptx = PtxStream(examples, sampler, self.pad_id)

    def _load_models(self) -> PolicyAndCritics:
        """Actor (LoRA when asked), critics, and the frozen reference unless the adapter-disabled actor serves."""
        cfg, engine = self.cfg, self.engine
        actor = load_causal_lm(cfg.actor_model_path, cfg.model, cfg.lora,
                               gradient_checkpointing=cfg.gradient_checkpointing)
        self.critic_tokenizers: dict[str, Any] = {}
        critics = {}
        streams = [("reward", cfg.reward_model_path, cfg.reward_critic_model_path)]
        if self.lagrangian:
            streams.append(("cost", cfg.cost_model_path, cfg.cost_critic_model_path))
        for kind, score_model, explicit in streams:
            source = critic_source(explicit, score_model, cfg.actor_model_path, self.tokenizer, cfg)
            engine.print(f"[{engine.name}] {kind} critic starts from {source}")
            critics[kind], self.critic_tokenizers[kind] = load_critic(source, self.tokenizer, cfg, kind)
        module = PolicyAndCritics(actor, critics["reward"], critics.get("cost"))
        if cfg.disable_dropout:
            disable_all_dropout(module)
        self.ref = None  # None: the actor with its LoRA adapter disabled
        if cfg.ref_model_path is not None or not is_peft_model(actor):
            ref = load_causal_lm(cfg.ref_model_path or cfg.actor_model_path, cfg.model, trainable=False)
            self.ref = engine.prepare_frozen(ref)
        return module

    def _register_states(self) -> None:
        """What a checkpoint carries besides weights, optimizer and schedule (restored here on resume)."""
        cfg, engine = self.cfg, self.engine
        adaptive = cfg.adaptive_kl
        init = adaptive.init_kl_coef if adaptive.init_kl_coef is not None else cfg.kl_coeff
        self.kl_ctl = (AdaptiveKLController(init, adaptive.target, adaptive.horizon) if adaptive.enabled
                       else FixedKLController(cfg.kl_coeff))
        engine.register_state("kl_controller", self.kl_ctl)
        self.reward_stats = RunningScoreStats()
        engine.register_state("reward_stats", self.reward_stats)
        self.lam = None
        if self.lagrangian:
            self.lam = PPOLagLambda(cfg.lambda_init, cfg.lambda_lr, cfg.lambda_max, cfg.cost_threshold,
                                    cfg.lambda_update_delay_steps, cfg.episode_cost_window_size)
            engine.register_state("lagrangian", self.lam)

    # ------------------------------------------------------------------------------------------ rollout

    def _ref_logits(self, batch: RolloutBatch) -> torch.Tensor:
        if self.ref is not None:
            return self.ref(input_ids=batch.input_ids, attention_mask=batch.attention_mask, use_cache=False).logits
        with self.unwrapped.actor.disable_adapter():
            return self.unwrapped.actor(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                                        use_cache=False).logits

    @torch.no_grad()
    def _forward_rollout(self, batch: RolloutBatch) -> None:
        """Old log-probs, reference log-probs and old values of every sequence, in no-grad chunks."""
        size = self.cfg.forward_batch_size or self.cfg.batch_size
        outputs: dict[str, torch.Tensor] = {}
        for start in range(0, len(batch), size):
            rows = list(range(start, min(start + size, len(batch))))
            chunk = batch.select(rows)
            with self.engine.accelerator.autocast():
                out = self.unwrapped(chunk.input_ids, chunk.attention_mask)
                parts = {"old_logps": response_logps(out["logits"], chunk)[0],
                         "ref_logps": response_logps(self._ref_logits(chunk), chunk)[0]}
            for kind in self.unwrapped.critics():
                parts[f"old_{kind}_values"] = response_values(out[f"{kind}_values"], chunk)
            for name, value in parts.items():
                full = outputs.setdefault(name, batch.response_mask.new_zeros(batch.response_mask.shape,
                                                                              dtype=torch.float32))
                full[start:start + len(rows), : value.shape[1]] = value
        for name, value in outputs.items():
            setattr(batch, name, value)

    @torch.no_grad()
    def rollout(self, index: int) -> RolloutBatch:
        """Sample, score and evaluate rollout ``index``; records its metrics; returns the batch with advantages."""
        cfg, engine = self.cfg, self.engine
        rows = self.schedule.prompt_rows(index)
        started = time.perf_counter()
        gen = self.rollout_engine.generate([self.prompt_ids[i] for i in rows], self.generation,
                                           cfg.num_return_sequences, seed=rollout_seed(cfg.seed, index, engine.process_index))
        prompts = [self.prompts[rows[i]] for i in gen.prompt_index]
        scores, metrics = self.reward_scorer(prompts, gen.texts)
        device = engine.device
        scores_t = torch.tensor(scores, device=device)  # (N,)
        costs_t = None
        if self.cost_scorer is not None:
            costs, cost_parts = self.cost_scorer(prompts, gen.texts)
            costs_t = torch.tensor(costs, device=device)
            metrics.update(cost_parts)
        scored = time.perf_counter()

        batch = RolloutBatch.from_generation(gen.prompt_ids, gen.response_ids, self.pad_id, device)
        self._forward_rollout(batch)
        mask = batch.response_mask
        reward_in = scores_t
        if cfg.normalize_reward:
            self.reward_stats.normalizer.update(engine.gather(scores_t))
            reward_in = self.reward_stats.normalizer.normalize(scores_t)
        if self.shaping:  # the fixed-lambda baseline: one stream, R - lambda C
            reward_in = reward_in - cfg.lambda_init * costs_t
        kl_share = 0.5 if self.lagrangian else 1.0  # Safe RLHF splits the KL penalty between the two streams
        kl_coef = self.kl_ctl.value
        rewards = kl_shaped_rewards(reward_in, batch.old_logps, batch.ref_logps, mask, kl_coef, cfg.clip_range_score,
                                    "reward", kl_share)
        adv_r, batch.reward_returns = gae(batch.old_reward_values, rewards, mask, cfg.gamma, cfg.lam)
        advantages = adv_r
        if self.lagrangian:
            self.lam.observe(engine.gather(costs_t))
            self.lam.maybe_update(engine.step)
            cost_rewards = kl_shaped_rewards(costs_t, batch.old_logps, batch.ref_logps, mask, kl_coef,
                                             cfg.clip_range_score, "cost", kl_share)
            adv_c, batch.cost_returns = gae(batch.old_cost_values, cost_rewards, mask, cfg.gamma, cfg.lam)
            advantages = lagrangian_advantage(adv_r, adv_c, self.lam.value)
            metrics.update({"lambda": self.lam.value, "lambda_updates": self.lam.num_updates,
                            "episode_cost_window": self.lam.window_mean,
                            "cost_advantage_mean": masked_mean(adv_c, mask)})
        batch.advantages = masked_whiten(advantages, mask) if cfg.whiten_advantages else advantages

        lengths = mask.sum(-1).float()  # (N,)
        seq_kl = ((batch.old_logps - batch.ref_logps) * mask).sum(-1)  # (N,)
        global_kl = float(engine.gather(seq_kl).mean())
        self.kl_ctl.update(global_kl, len(batch) * engine.num_processes)
        metrics.update({
            "reward": scores_t.mean(), "kl": seq_kl.mean(), "kl_coef": kl_coef, "response_length": lengths.mean(),
            "finished": sum(gen.finished) / len(gen), "advantage_mean": masked_mean(advantages, mask),
            "advantage_std": masked_mean((advantages - masked_mean(advantages, mask)) ** 2, mask).sqrt(),
            "reward_return_mean": masked_mean(batch.reward_returns, mask),
            "reward_value_mean": masked_mean(batch.old_reward_values, mask),
            "generation_tokens_per_s": gen.response_tokens / max(gen.seconds, 1e-9),
            "rollout_seconds": time.perf_counter() - started, "scoring_seconds": scored - started - gen.seconds,
        })
        if costs_t is not None:
            metrics["cost"] = costs_t.mean()
            metrics["cost_violation_rate"] = (costs_t > getattr(cfg, "cost_threshold", 0.0)).float().mean()
        if cfg.normalize_reward:
            metrics["reward_normalized"] = reward_in.mean()
        self.last_rollout = {k: float(v) for k, v in metrics.items() if v is not None}
        engine.record({k: v for k, v in metrics.items() if v is not None})
        return batch

    # ------------------------------------------------------------------------------------------ update

    def _loss(self, mb: RolloutBatch, ptx: dict[str, torch.Tensor] | None) -> tuple[torch.Tensor, dict[str, Any]]:
        cfg = self.cfg
        out = self.model(mb.input_ids, mb.attention_mask, ptx_input_ids=ptx["input_ids"] if ptx else None,
                         ptx_attention_mask=ptx["attention_mask"] if ptx else None)
        mask = mb.response_mask
        logps, entropy = response_logps(out["logits"], mb, with_entropy=True)
        pg_loss, pg = clipped_surrogate_loss(logps, mb.old_logps, mb.advantages, mask, cfg.clip_range_ratio,
                                             cfg.loss_aggregation)
        metrics: dict[str, Any] = {"pg_loss": pg_loss.detach(), "clipfrac": pg["clipfrac"],
                                   "approx_kl": pg["approx_kl"], "ratio_mean": pg["ratio_mean"],
                                   "entropy": masked_mean(entropy, mask)}
        total = pg_loss
        for kind in self.unwrapped.critics():
            values = response_values(out[f"{kind}_values"], mb)
            v_loss, vm = clipped_value_loss(values, getattr(mb, f"old_{kind}_values"), getattr(mb, f"{kind}_returns"),
                                            mask, cfg.clip_range_value, cfg.loss_aggregation)
            total = total + v_loss
            metrics.update({f"{kind}_value_loss": v_loss.detach(), f"{kind}_value_clipfrac": vm["value_clipfrac"]})
        if ptx is not None:
            lm_loss = ptx_loss(out["ptx_logits"], ptx["labels"])
            total = total + cfg.ptx_coeff * lm_loss
            metrics["ptx_loss"] = lm_loss.detach()
        metrics["loss"] = total.detach()
        return total, metrics

    def update(self, batch: RolloutBatch, index: int) -> None:
        """update_iters shuffled passes over the rollout, one optimizer step per accumulation window."""
        cfg, engine = self.cfg, self.engine
        for it in range(cfg.update_iters):
            generator = torch.Generator().manual_seed(rollout_seed(cfg.seed, index, it, engine.process_index))
            micro_batches = torch.randperm(len(batch), generator=generator).split(cfg.batch_size)
            for first in range(0, len(micro_batches), engine.accumulation):
                for j, rows in enumerate(micro_batches[first:first + engine.accumulation]):
                    ptx = engine.to_device(self.ptx.batch(engine.step, j)) if self.ptx else None
                    with engine.accumulate(self.model):
                        loss, metrics = self._loss(batch.select(rows), ptx)
                        engine.backward(loss)
                        engine.record(metrics)
                if self.clip_apart:
                    norms = clip_per_role(self.optimizer, cfg.max_grad_norm, self.roles)
                    engine.record({f"{role}_grad_norm": v for role, v in norms.items()})
                groups = self.optimizer.param_groups  # actor groups first, critic groups last
                engine.record({"actor_lr": groups[0]["lr"], "critic_lr": groups[-1]["lr"]})
                engine.optimizer_step()

    # ------------------------------------------------------------------------------------------ evaluation

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        """Answer the held-out prompts (this rank's share) and log their mean reward, cost and length."""
        return self.engine.log_eval(score_held_out_prompts(
            self.engine, self.rollout_engine, self.tokenizer, self.eval_prompts, self.generation,
            self.cfg.max_prompt_length, rollout_seed(self.cfg.seed, -1), self.reward_scorer, self.cost_scorer))

    # ------------------------------------------------------------------------------------------ the loop

    def _save_final(self, unwrapped: PolicyAndCritics, folder: Path, state_dict: dict | None) -> None:
        """The actor into ``folder`` (the engine's final model), each critic into ``<run>/<kind>_critic``, and
        with lora.merge_on_save the merged actor into ``<run>/final-merged``. ``state_dict``: the whole
        module's weights gathered from FSDP / DeepSpeed shards (the live parameters are shards then)."""
        run_dir = self.engine.run_dir
        merge = self.cfg.lora.enabled and self.cfg.lora.merge_on_save
        save_submodel(unwrapped.actor, self.tokenizer, folder, state_dict_part(state_dict, "actor."),
                      merged_folder=run_dir / "final-merged" if merge else None)
        for kind, critic in unwrapped.critics().items():
            save_score_model(critic, self.critic_tokenizers[kind], run_dir / f"{kind}_critic",
                             state_dict=state_dict_part(state_dict, f"{kind}_critic."))

    def train(self) -> dict[str, Any]:
        cfg, engine, schedule = self.cfg, self.engine, self.schedule
        first = schedule.first_rollout(engine.step, "PPO")
        engine.print(f"[{engine.name}] " + schedule.describe(cfg.num_return_sequences, first))
        engine.progress = Progress(engine.total_steps, initial=engine.step,
                                   enabled=engine.is_main_process and cfg.progress_bar, desc=engine.name)
        start_eval = None
        if cfg.eval_on_start and self.eval_prompts and engine.step == 0:  # the baseline, logged at step 0
            start_eval = self.evaluate()
        for index in range(first, schedule.total_rollouts):
            self.model.train()
            batch = self.rollout(index)
            before = engine.step
            self.update(batch, index)
            self.rollout_engine.sync_weights(self.unwrapped.actor)
            if self.eval_prompts and schedule.due(cfg.eval_steps, before, engine.step):
                self.evaluate()
            if schedule.due(cfg.save_steps, before, engine.step):
                engine.save_checkpoint()
            engine.stop_if_requested()  # SIGINT/SIGTERM: checkpoint here, at a rollout boundary, and exit
        summary = {"rollouts": schedule.total_rollouts, "last_rollout": self.last_rollout, "eval_on_start": start_eval}
        if self.lam is not None:
            summary["lambda"] = self.lam.value
        final = engine.finish(self.model, self.tokenizer, save_fn=self._save_final, summary=summary)
        return {"final_model": str(final), **summary}


def check_inputs(cfg: PPOConfig) -> None:
    """Fail before the run folder is touched when a data file or a local model folder is missing."""
    prompts = [cfg.prompts_path] if isinstance(cfg.prompts_path, str) else list(cfg.prompts_path)
    for key, path in [*(("prompts_path", p) for p in prompts), ("eval_prompts_path", cfg.eval_prompts_path),
                      ("ptx_path", cfg.ptx_path)]:
        if path and not Path(path).is_file():
            raise UserError(f"{key}: {path} not found")
    models = ("actor_model_path", "ref_model_path", "reward_model_path", "cost_model_path",
              "reward_critic_model_path", "cost_critic_model_path")
    for key in models:
        if getattr(cfg, key, None):
            resolve_model(getattr(cfg, key))  # a missing local path is an error here, a Hub id passes


def run(cfg: PPOConfig) -> dict[str, Any]:
    """Entry point of `humanalign train ppo` and `humanalign train ppo-lag` (chosen by the config class)."""
    check_inputs(cfg)
    name = "ppo-lag" if isinstance(cfg, PPOLagConfig) else "ppo"
    with Engine(cfg, name=name) as engine:
        return PPOTrainer(cfg, engine).train()


__all__ = ["PPOTrainer", "check_inputs", "run"]
