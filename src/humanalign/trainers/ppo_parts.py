"""Pieces of the PPO trainer: the trained module (actor + critics), rollout tensors, scoring, ptx data.

Layout of a rollout: each sequence is ``[prompt | response]`` right-padded to (N, L), so positions are the
natural 0..L-1 (as in generation, where transformers derives positions from the attention mask). Response
token t of row i sits at ``start_i + t``; the logits (and the critic's value) that "choose" it sit one position
earlier, at ``start_i - 1 + t``. Every per-token PPO tensor is response-aligned: (N, R) with R the longest
response and ``response_mask`` 1 on real response tokens (``humanalign.losses.ppo`` expects this layout).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import torch
from torch import nn

from humanalign.errors import UserError
from humanalign.models.score import ScoreModel, ScoreNormalizer

# --------------------------------------------------------------------------------------------- trained module


class PolicyAndCritics(nn.Module):
    """The actor and its critics as one module, so that one optimizer, one prepare() and one checkpoint hold
    them all. ``forward`` runs every sub-model in one call (DDP syncs gradients only for what goes through the
    wrapper's forward): actor logits, the critics' token-wise values and, when given, the ptx batch's logits."""

    def __init__(self, actor: nn.Module, reward_critic: ScoreModel | None, cost_critic: ScoreModel | None = None):
        super().__init__()
        self.actor, self.reward_critic, self.cost_critic = actor, reward_critic, cost_critic
        self.is_gradient_checkpointing = False  # enabled per sub-model at load time (the engine skips it here)

    @property
    def config(self):
        """The actor's config (DeepSpeed's "auto" settings read the hidden size from ``model.config``)."""
        return self.actor.config

    def tie_weights(self) -> None:
        """Re-tie each sub-model's tied weights (the actor's embeddings and LM head): accelerate's FSDP2
        preparation moves the weights through the meta device and re-ties them through the root's
        ``tie_weights``; without this the actor's two copies would train apart."""
        for model in (self.actor, *(critic.model for critic in self.critics().values())):
            if hasattr(model, "tie_weights"):
                model.tie_weights()

    def critics(self) -> dict[str, ScoreModel]:
        return {name: m for name, m in (("reward", self.reward_critic), ("cost", self.cost_critic)) if m is not None}

    def forward(self, input_ids: torch.Tensor | None = None, attention_mask: torch.Tensor | None = None,
                ptx_input_ids: torch.Tensor | None = None, ptx_attention_mask: torch.Tensor | None = None,
                generate_kwargs: dict[str, Any] | None = None) -> dict[str, torch.Tensor] | torch.Tensor:
        if generate_kwargs is not None:  # sampling, through the prepared module's forward: see ActorGeneration
            return self.actor.generate(**generate_kwargs)
        out = {"logits": self.actor(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits}
        for name, critic in self.critics().items():
            out[f"{name}_values"] = critic(input_ids=input_ids, attention_mask=attention_mask).scores  # (B, L)
        if ptx_input_ids is not None:
            out["ptx_logits"] = self.actor(input_ids=ptx_input_ids, attention_mask=ptx_attention_mask,
                                           use_cache=False).logits
        return out


class ActorGeneration:
    """The actor as a rollout engine sees it, its ``generate`` run through the prepared module's forward.

    Under FSDP2 only the root module's forward hooks initialise the sharding and gather the root unit's
    parameters (embeddings, final norm, LM head), and under ZeRO-3 the engine's hooks gather each sub-module's
    shard, so calling ``actor.generate`` directly would meet sharded weights. Inside, every decoder layer
    gathers its shard in each forward: all ranks must run the same number of forwards, so with
    ``synced_gpus`` a rank whose answers have all ended keeps stepping until every rank's have (as
    transformers does under ZeRO-3). Under DDP or one process this is the plain ``actor.generate``."""

    def __init__(self, prepared: nn.Module, actor: nn.Module, synced_gpus: bool):
        self.prepared, self.actor, self.synced_gpus = prepared, actor, synced_gpus

    @property
    def generation_config(self):
        return self.actor.generation_config

    @property
    def training(self) -> bool:
        return self.actor.training

    def parameters(self):
        return self.actor.parameters()

    def eval(self) -> ActorGeneration:
        self.actor.eval()
        return self

    def train(self, mode: bool = True) -> ActorGeneration:
        self.actor.train(mode)
        return self

    def generate(self, **kwargs) -> torch.Tensor:
        return self.prepared(generate_kwargs={**kwargs, "synced_gpus": self.synced_gpus})


def disable_dropout(model: nn.Module) -> None:
    """Dropout off everywhere (LoRA's included): old and new log-probs of a rollout then agree exactly."""
    for module in model.modules():
        if isinstance(module, nn.Dropout):
            module.p = 0.0
        if isinstance(getattr(module, "attention_dropout", None), float):
            module.attention_dropout = 0.0


def load_critic(path: str, actor_tokenizer, cfg, score_type: str) -> tuple[ScoreModel, Any]:
    """A critic and its tokenizer: a score model (token-wise values from its scalar head) started from ``path``.

    A trained score model keeps its head; a causal LM gets a fresh one. The critic reads the ACTOR's token
    ids, so its vocabulary must agree with the actor's on every actor token (a pad token added on top is fine).
    """
    from humanalign.models.load import enable_gradient_checkpointing, resolve_model
    from humanalign.models.score import load_score_model

    local = Path(resolve_model(path).path)
    if (local / "adapter_config.json").is_file() and not (local / "config.json").is_file():
        raise UserError(f"{score_type} critic: {path} is a LoRA adapter folder, not a full model; set "
                        f"{score_type}_critic_model_path to a full model (the adapter's base, or the run's "
                        "final-merged folder saved with lora.merge_on_save)")
    settings = cfg.model.model_copy(update={"chat_template": "auto"})
    lora = cfg.lora if cfg.lora.enabled else None
    critic, tokenizer = load_score_model(path, settings, lora=lora, score_type=score_type, allow_new_head=True)
    if critic.layout != "decoder":
        raise UserError(f"{score_type} critic '{path}': needs a decoder (causal) backbone with a per-token head; "
                        "set the critic's model path to the actor or a decoder score model")
    mismatch = vocabulary_mismatch(actor_tokenizer, tokenizer)
    if mismatch:
        raise UserError(f"{score_type} critic '{path}': its tokenizer differs from the actor's ({mismatch}); "
                        f"set {score_type}_critic_model_path to the actor or a score model on the same tokenizer")
    if cfg.gradient_checkpointing:
        enable_gradient_checkpointing(critic.model)
    return critic, tokenizer


def vocabulary_mismatch(actor_tokenizer, other_tokenizer) -> str | None:
    """None when every actor token has the same id in ``other_tokenizer``; else a short description."""
    other = other_tokenizer.get_vocab()
    for token, index in actor_tokenizer.get_vocab().items():
        if other.get(token) != index:
            return f"token {token!r} is id {index} for the actor but {other.get(token)} here"
    return None


def critic_source(explicit: str | None, score_model: str | None, actor_path: str, actor_tokenizer, cfg) -> str:
    """Where a critic starts: the configured path, else the score model when it is a decoder score model on the
    actor's tokenizer (Safe RLHF's choice), else the actor (a fresh value head)."""
    from humanalign.models.load import load_tokenizer, resolve_model
    from humanalign.models.score import is_score_model_dir

    if explicit:
        return explicit
    if score_model and is_score_model_dir(resolve_model(score_model).path):
        if vocabulary_mismatch(actor_tokenizer, load_tokenizer(score_model, cfg.model)) is None:
            return score_model
    return actor_path


# --------------------------------------------------------------------------------------------- rollout tensors


@dataclass
class RolloutBatch:
    """One rollout's sequences and everything PPO computes on them; tensors on one device.

    (N, L): ``input_ids``, ``attention_mask``. (N,): ``starts`` (first response position). (N, R)
    response-aligned: ``response_ids``, ``response_mask``, ``old_logps``,
    ``ref_logps``, ``old_reward_values``, ``old_cost_values``, ``advantages``, ``reward_returns``,
    ``cost_returns`` (None when not used).
    """

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    starts: torch.Tensor
    response_ids: torch.Tensor
    response_mask: torch.Tensor
    old_logps: torch.Tensor | None = None
    ref_logps: torch.Tensor | None = None
    old_reward_values: torch.Tensor | None = None
    old_cost_values: torch.Tensor | None = None
    advantages: torch.Tensor | None = None
    reward_returns: torch.Tensor | None = None
    cost_returns: torch.Tensor | None = None

    def __len__(self) -> int:
        return self.input_ids.shape[0]

    @classmethod
    def from_generation(cls, prompt_ids: Sequence[Sequence[int]], response_ids: Sequence[Sequence[int]],
                        pad_id: int, device: torch.device) -> RolloutBatch:
        from humanalign.data.tokenize import pad_sequences

        sequences = [list(p) + list(r) for p, r in zip(prompt_ids, response_ids)]
        return cls(
            input_ids=pad_sequences(sequences, pad_id, "right").to(device),  # (N, L)
            attention_mask=pad_sequences([[1] * len(s) for s in sequences], 0, "right").to(device),  # (N, L)
            starts=torch.tensor([len(p) for p in prompt_ids], dtype=torch.long, device=device),  # (N,)
            response_ids=pad_sequences(response_ids, pad_id, "right").to(device),  # (N, R)
            response_mask=pad_sequences([[1] * len(r) for r in response_ids], 0, "right").to(device),  # (N, R)
        )

    def select(self, index: torch.Tensor | Sequence[int]) -> RolloutBatch:
        """Rows ``index``, trimmed to the longest sequence and response among them."""
        index = torch.as_tensor(index, dtype=torch.long, device=self.input_ids.device)
        width = int(self.attention_mask[index].sum(-1).max())
        resp = int(self.response_mask[index].sum(-1).max())
        values: dict[str, Any] = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if value is None:
                values[f.name] = None
            elif f.name in ("input_ids", "attention_mask"):
                values[f.name] = value[index, :width]
            elif f.name == "starts":
                values[f.name] = value[index]
            else:
                values[f.name] = value[index, :resp]
        return RolloutBatch(**values)

    def action_positions(self) -> torch.Tensor:
        """(N, R): position of the logits / value that chooses each response token (clamped on padding)."""
        offsets = torch.arange(self.response_ids.shape[1], device=self.starts.device)  # (R,)
        positions = self.starts.unsqueeze(1) - 1 + offsets.unsqueeze(0)  # (N, R)
        return positions.clamp(max=self.input_ids.shape[1] - 1)


def response_logps(logits: torch.Tensor, batch: RolloutBatch, with_entropy: bool = False
                   ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """log pi(response token t) (N, R), and the policy entropy at each response position (N, R, no grad).

    Row by row in float32, so that only one (R, V) slice of log-softmax exists at a time.
    """
    positions = batch.action_positions()  # (N, R)
    logps, entropies = [], []
    for row_logits, row_pos, row_targets in zip(logits, positions, batch.response_ids):
        picked = row_logits[row_pos].float()  # (R, V)
        log_probs = torch.log_softmax(picked, dim=-1)
        logps.append(log_probs.gather(-1, row_targets.unsqueeze(-1)).squeeze(-1))  # (R,)
        if with_entropy:
            with torch.no_grad():
                entropies.append(-(log_probs.exp() * log_probs).sum(-1))  # (R,)
    mask = batch.response_mask.to(torch.float32)
    entropy = torch.stack(entropies) * mask if with_entropy else None
    return torch.stack(logps) * mask, entropy


def response_values(values: torch.Tensor, batch: RolloutBatch) -> torch.Tensor:
    """Token-wise critic values (N, L) -> the value of each response token's state (N, R), 0 on padding."""
    return values.float().gather(1, batch.action_positions()) * batch.response_mask.to(torch.float32)


def ptx_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean next-token NLL over the labelled tokens of an SFT batch (the InstructGPT 'ptx' term)."""
    from humanalign.models.logprobs import token_logps

    logps = token_logps(logits, labels)  # (B, T-1)
    mask = (labels[:, 1:] != -100).to(logps.dtype)
    return -(logps * mask).sum() / mask.sum().clamp(min=1)


# --------------------------------------------------------------------------------------------- scoring


class SequenceScorer:
    """A score per (prompt, answer) text from a score model, a Python function, or the sum of both."""

    def __init__(self, kind: str, model_path: str | None, fn_spec: str | None, fn_kwargs: dict[str, Any],
                 device: torch.device, batch_size: int, settings, log: Callable[[str], None] = print):
        from humanalign.rewards import load_score_fn

        self.kind = kind
        self.scorer = None
        if model_path:
            from humanalign.models.scoring import load_scorer

            self.scorer = load_scorer(model_path, device=device, batch_size=batch_size, progress=False,
                                      settings=settings.model_copy(update={"chat_template": "auto", "gguf_file": None}))
            if self.scorer.score_type != kind:
                log(f"[ppo] note: {model_path} was trained as a {self.scorer.score_type} model and is used as the "
                      f"{kind} model here")
        self.fn = load_score_fn(fn_spec, fn_kwargs, name=f"{kind}_fn") if fn_spec else None

    def __call__(self, prompts: Sequence[list[dict[str, str]]], texts: Sequence[str]
                 ) -> tuple[list[float], dict[str, float]]:
        """(total score per answer, mean of each part for the metrics)."""
        total = [0.0] * len(texts)
        parts: dict[str, float] = {}
        if self.scorer is not None:
            values = self.scorer.score(prompts, texts)
            total = [t + v for t, v in zip(total, values)]
            parts[f"{self.kind}_model_score"] = sum(values) / max(len(values), 1)
        if self.fn is not None:
            values = self.fn(prompts, texts)
            total = [t + v for t, v in zip(total, values)]
            parts[f"{self.kind}_fn_score"] = sum(values) / max(len(values), 1)
        return total, parts


class RunningScoreStats:
    """Running mean / std of reward scores (``normalize_reward``), checkpointed with the run."""

    def __init__(self) -> None:
        self.normalizer = ScoreNormalizer("running")

    def state_dict(self) -> dict[str, Any]:
        return self.normalizer.to_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.normalizer = ScoreNormalizer.from_dict(state)


# --------------------------------------------------------------------------------------------- data


def load_prompts(paths: str | Sequence[str], max_prompts: int | None = None,
                 log: Callable[[str], None] = print) -> list[list[dict[str, str]]]:
    """Prompts of one or more files (records with a 'prompt'), each distinct prompt once, in file order."""
    from humanalign.eval.generate import prompt_hash, read_prompts

    seen: set[str] = set()
    prompts, duplicates = [], 0
    for path in [paths] if isinstance(paths, str) else list(paths):
        found, dup = read_prompts(path)
        duplicates += dup
        for prompt in found:
            key = prompt_hash(prompt)
            if key in seen:
                duplicates += 1
                continue
            seen.add(key)
            prompts.append(prompt)
    if duplicates:
        log(f"[ppo] {duplicates} duplicate prompts skipped (each distinct prompt is used once per epoch)")
    if max_prompts is not None:
        prompts = prompts[:max_prompts]
    if not prompts:
        raise UserError(f"no prompts in {paths}")
    return prompts


def load_ptx_examples(path: str, source: str, tokenizer, max_length: int,
                      log: Callable[[str], None] = print) -> list[dict[str, list[int]]]:
    """SFT examples for the ptx loss: 'messages' records as they are, or pairs / other sources through their
    adapter (a pair's chosen answer is imitated). Conversations with no assistant token left are counted."""
    from humanalign.data.io import iter_records
    from humanalign.data.load import load_source
    from humanalign.data.records import PreferencePair, SFTRecord
    from humanalign.data.tokenize import TruncationStats, encode_conversation
    from humanalign.errors import RecordError

    first = next(iter_records(path), (0, {}))[1]
    conversations: list[list[dict[str, str]]] = []
    if "messages" in first:
        for line, rec in iter_records(path):
            msgs = rec.get("messages")
            if not isinstance(msgs, list) or not all(isinstance(m, dict) and "role" in m and "content" in m
                                                     for m in msgs):
                raise RecordError(path, line, "messages", "must be a list of {role, content} messages")
            conversations.append(msgs)
    else:
        from humanalign.config.data import SourceSpec

        for record in load_source(SourceSpec(path=path, source=source)).records:
            if isinstance(record, SFTRecord):
                conversations.append(record.messages)
            elif isinstance(record, PreferencePair):
                conversations.append([*record.prompt, {"role": "assistant", "content": record.chosen}])
            else:
                raise UserError(f"{path}: ptx data must be conversations or preference pairs, "
                                f"not {type(record).__name__} records")
    stats = TruncationStats()
    examples = [e for e in (encode_conversation(tokenizer, c, max_length, stats) for c in conversations) if e]
    if stats.dropped_empty or stats.response_truncated:
        log(f"[ppo] ptx data: {stats.summary()}")
    if not examples:
        raise UserError(f"{path}: no usable ptx example")
    return examples


class PtxStream:
    """The ptx micro-batch of every (optimizer step, micro-batch): a pure function of the step, so a resumed
    run draws the same SFT batches as an uninterrupted one."""

    def __init__(self, examples: list[dict[str, list[int]]], batch_size: int, accumulation: int, pad_id: int,
                 seed: int, num_processes: int = 1, process_index: int = 0):
        from humanalign.engine.data import StepBatchSampler

        self.examples, self.pad_id, self.accumulation = examples, pad_id, accumulation
        self.sampler = StepBatchSampler(len(examples), batch_size, num_processes=num_processes,
                                        process_index=process_index, accumulation=accumulation, seed=seed)
        self._order: tuple[int, Any] | None = None

    def batch(self, step: int, micro: int) -> dict[str, torch.Tensor]:
        from humanalign.data.tokenize import collate_sft

        epoch, index = divmod(step * self.accumulation + micro, self.sampler.micro_batches_per_epoch)
        if self._order is None or self._order[0] != epoch:
            self._order = (epoch, self.sampler.epoch_order(epoch))
        rows = self.sampler.micro_batch(self._order[1], index)
        return collate_sft([self.examples[i] for i in rows], self.pad_id)


# --------------------------------------------------------------------------------------------- optimisation


def build_param_groups(model: PolicyAndCritics, actor_lr: float, critic_lr: float, weight_decay: float
                       ) -> list[dict[str, Any]]:
    """AdamW groups: actor (decay / no decay) at ``actor_lr``, then critics at ``critic_lr``; each group is
    tagged with ``role`` so the schedule and the gradient clipping can tell them apart."""
    from humanalign.engine.optim import param_groups

    groups = []
    for role, module, lr in (("actor", model.actor, actor_lr), *(
            (f"{name}_critic", critic, critic_lr) for name, critic in model.critics().items())):
        for group in param_groups(module, weight_decay):
            groups.append({**group, "lr": lr, "role": role})
    return groups


def per_group_scheduler(optimizer: torch.optim.Optimizer, cfg, total_steps: int, last_step: int):
    """LambdaLR with the actor's schedule (lr_scheduler) on actor groups and critic_lr_scheduler on critic
    groups, positioned at optimizer step ``last_step`` (a resumed run continues its curve)."""
    from functools import partial

    from torch.optim.lr_scheduler import LambdaLR

    from humanalign.engine.optim import lr_factor, warmup_steps_for

    warmup = warmup_steps_for(cfg, total_steps)
    fns = [partial(lr_factor, kind=cfg.lr_scheduler if g.get("role") == "actor" else cfg.critic_lr_scheduler,
                   warmup=warmup, total=total_steps) for g in optimizer.param_groups]
    return LambdaLR(optimizer, fns, last_epoch=last_step - 1)


def clip_per_role(optimizer: torch.optim.Optimizer, max_norm: float | None, roles: Sequence[str]
                  ) -> dict[str, float]:
    """Clip the gradients of each role (actor, each critic) to ``max_norm / sqrt(len(roles))`` separately.

    Separate clipping keeps a large value-loss gradient from shrinking the policy's step (Safe RLHF clips
    actor and critic apart); dividing by sqrt(#roles) keeps the joint norm within ``max_norm``, so the
    engine's joint clip that follows changes nothing. Returns each role's norm before clipping.
    """
    norms = {}
    limit = (max_norm / math.sqrt(len(roles))) if max_norm else float("inf")
    for role in roles:
        params = [p for g in optimizer.param_groups if g.get("role") == role for p in g["params"]
                  if p.grad is not None]
        if params:
            norms[role] = float(torch.nn.utils.clip_grad_norm_(params, limit))
    return norms


__all__ = [
    "PolicyAndCritics", "ActorGeneration", "RolloutBatch", "SequenceScorer", "RunningScoreStats", "PtxStream", "disable_dropout",
    "load_critic", "critic_source", "vocabulary_mismatch", "response_logps", "response_values", "ptx_loss",
    "load_prompts", "load_ptx_examples", "build_param_groups", "per_group_scheduler", "clip_per_role",
]
