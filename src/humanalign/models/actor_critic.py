"""The PPO actor and its critics as one trained module, and where each critic starts.

``PolicyAndCritics`` holds the actor and its reward / cost critics (score models with a per-token head) so
that one optimizer, one prepare() and one checkpoint cover them all; ``ActorGeneration`` is the actor as a
rollout engine sees it under sharding. ``critic_source`` / ``load_critic`` pick and load a critic that reads
the actor's token ids.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from humanalign.errors import UserError
from humanalign.models.load import enable_gradient_checkpointing, load_tokenizer, resolve_model
from humanalign.models.score_model import ScoreModel, is_score_model_dir, load_score_model


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
                generate_kwargs: dict[str, Any] | None = None, logits_to_keep: int = 0,
                position_ids: torch.Tensor | None = None,
                sample_fn: Callable[[nn.Module], torch.Tensor] | None = None
                ) -> dict[str, torch.Tensor] | torch.Tensor:
        """``logits_to_keep`` > 0: the actor's LM head runs on the last that many positions only.
        ``position_ids``: the actor's own (a packed layout, e.g. GRPO's shared prompt; critics never get them).
        ``generate_kwargs`` / ``sample_fn``: sampling through the prepared module's forward (ActorGeneration)."""
        if generate_kwargs is not None:
            return self.actor.generate(**generate_kwargs)
        if sample_fn is not None:
            return sample_fn(self.actor)
        keep = {"logits_to_keep": logits_to_keep} if logits_to_keep else {}
        if position_ids is not None:
            keep["position_ids"] = position_ids
        out = {"logits": self.actor(input_ids=input_ids, attention_mask=attention_mask, use_cache=False,
                                    **keep).logits}
        for name, critic in self.critics().items():
            out[f"{name}_values"] = critic(input_ids=input_ids, attention_mask=attention_mask).scores  # (B, L)
        if ptx_input_ids is not None:
            out["ptx_logits"] = self.actor(input_ids=ptx_input_ids, attention_mask=ptx_attention_mask,
                                           use_cache=False).logits
        return out


class ActorGeneration:
    """The actor as a rollout engine sees it, its ``generate`` (and the rollout engine's own sampling loop,
    ``sample``) run through the prepared module's forward.

    Under FSDP2 only the root module's forward hooks initialise the sharding and gather the root unit's
    parameters (embeddings, final norm, LM head), and under ZeRO-3 the engine's hooks gather each sub-module's
    shard, so calling ``actor.generate`` directly would meet sharded weights. Inside, every decoder layer
    gathers its shard in each forward: all ranks must run the same number of forwards, so with
    ``synced_gpus`` a rank whose answers have all ended keeps stepping until every rank's have (as
    transformers does under ZeRO-3; the loop does the same with one all-reduce per step). Under DDP or one
    process the rollout engine samples with ``actor`` directly."""

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

    def sample(self, fn: Callable[[nn.Module], torch.Tensor]) -> torch.Tensor:
        """``fn(actor)`` run inside the prepared module's forward (a sampling loop that syncs its own stops)."""
        return self.prepared(sample_fn=fn)


def disable_all_dropout(model: nn.Module) -> None:
    """PPO's dropout switch: dropout off everywhere (LoRA's and attention's included), so the old and new
    log-probs of a rollout agree exactly. The DPO family keeps LoRA's (``pretrained.disable_dropout_outside_lora``)."""
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
    if explicit:
        return explicit
    if score_model and is_score_model_dir(resolve_model(score_model).path):
        if vocabulary_mismatch(actor_tokenizer, load_tokenizer(score_model, cfg.model)) is None:
            return score_model
    return actor_path


__all__ = ["PolicyAndCritics", "ActorGeneration", "disable_all_dropout", "load_critic", "vocabulary_mismatch",
           "critic_source"]
