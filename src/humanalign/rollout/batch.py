"""A rollout's sequences as tensors, and the per-token log-probs and values read off them.

Layout: each sequence is ``[prompt | response]`` right-padded to (N, L), so positions are the natural 0..L-1
(as in generation, where transformers derives positions from the attention mask). Response token t of row i
sits at ``start_i + t``; the logits (and the critic's value) that "choose" it sit one position earlier, at
``start_i - 1 + t``. Every per-token tensor is response-aligned: (N, R) with R the longest response and
``response_mask`` 1 on real response tokens (``humanalign.losses.ppo`` expects this layout).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, fields
from typing import Any

import torch

from humanalign.data.tokenize import pad_sequences
from humanalign.models.logprobs import score_positions, shared_inputs


def rollout_seed(*parts: int) -> int:
    """A 63-bit seed from integers (rollout sampling and shuffling are pure functions of the run's position)."""
    value = 0
    for part in parts:
        value = (value * 1_000_003 + int(part)) % (2**63 - 1)
    return value


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

    def logits_to_keep(self) -> int:
        """How many trailing positions hold every action's logits (transformers' ``logits_to_keep``): from the
        earliest response's first action position to the end, so the LM head skips the prompts' common part."""
        return self.input_ids.shape[1] - (int(self.starts.min()) - 1)


def response_logps(logits: torch.Tensor, batch: RolloutBatch, with_entropy: bool = False
                   ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """log pi(response token t) (N, R), and the policy entropy at each response position (N, R, no grad).

    ``logits``: (N, L, V), or only the last K positions (N, K, V) (a forward with ``logits_to_keep=K``, see
    ``RolloutBatch.logits_to_keep``). Row by row in float32, so that only one (R, V) slice of log-softmax
    exists at a time.
    """
    positions = batch.action_positions() - (batch.input_ids.shape[1] - logits.shape[1])  # (N, R)
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


def shared_prompt_plan(batch: RolloutBatch, device: torch.device | None = None) -> dict[str, torch.Tensor]:
    """Rows that share a prompt (the G answers of a GRPO group) packed into one row: ``[prompt | answer 1 | ...
    | answer k]``, the prompt once. Each answer's position ids restart at the prompt's end and a 4-D mask lets
    it see the prompt and itself only (DPO's shared layout, ``data.score_plan``, for k answers): every answer
    token has the very context it has in its own ``[prompt | answer]`` row.

    ``batch``: on any device (its ids are read on the host once). Returns, on ``device``: ``input_ids`` /
    ``position_ids`` (B', S) and ``attention_mask`` (B', 1, S, S) bool (True: may attend) for the packed rows;
    ``index`` (T,): the flattened position whose hidden state chooses each response token (an answer's first
    token is chosen at the prompt's last position); ``target`` (T,): that token; ``dense`` (T,): where its
    log-prob goes in the batch's (N, R) response grid. Rows are grouped by their prompt's token ids."""
    ids, starts = batch.input_ids.tolist(), batch.starts.tolist()
    lengths = batch.response_mask.sum(-1).tolist()
    width = batch.response_ids.shape[1]  # R
    groups: dict[tuple[int, ...], list[int]] = {}
    for row, start in enumerate(starts):
        groups.setdefault(tuple(ids[row][:start]), []).append(row)
    packed, positions, segment = [], [], []  # per packed row; segment: 0 prompt, j answer j, -1 padding
    index, target, dense = [], [], []
    span = max(len(prompt) + sum(lengths[r] for r in rows) for prompt, rows in groups.items())  # S
    for g, (prompt, rows) in enumerate(groups.items()):
        p = len(prompt)
        tokens, pos, seg = list(prompt), list(range(p)), [0] * p
        for j, row in enumerate(rows, start=1):
            n, offset = lengths[row], len(tokens)
            answer = ids[row][starts[row]:starts[row] + n]
            tokens += answer
            pos += range(p, p + n)
            seg += [j] * n
            index.append(g * span + p - 1)  # an answer's first token is chosen at the prompt's last position
            index += range(g * span + offset, g * span + offset + n - 1)
            target += answer
            dense += range(row * width, row * width + n)
        pad = span - len(tokens)
        packed.append(tokens + [0] * pad)
        positions.append(pos + [0] * pad)
        segment.append(seg + [-1] * pad)
    segment = torch.tensor(segment)  # (B', S)
    query, key = segment.unsqueeze(2), segment.unsqueeze(1)  # (B', S, 1), (B', 1, S)
    causal = torch.ones(span, span, dtype=torch.bool).tril()
    mask = causal & ((query == key) | (key == 0))  # own segment causally, and the whole prompt before it
    plan = {"input_ids": torch.tensor(packed), "position_ids": torch.tensor(positions),
            "attention_mask": mask.unsqueeze(1),
            "index": torch.tensor(index, dtype=torch.long), "target": torch.tensor(target, dtype=torch.long),
            "dense": torch.tensor(dense, dtype=torch.long)}
    return {k: v.to(device) for k, v in plan.items()} if device is not None else plan


def _scored_log_softmax(with_entropy: bool):
    """A scorer for ``models.logprobs.score_positions``: the head's logits on the scored positions only, then
    log-softmax in float32, as ``response_logps`` computes them (and the entropy, no grad, when asked)."""

    def scorer(head, hidden, target, forward) -> dict[str, torch.Tensor]:
        log_probs = torch.log_softmax(forward(hidden).float(), dim=-1)  # (T, V)
        out = {"logps": log_probs.gather(-1, target.unsqueeze(-1)).squeeze(-1)}  # (T,)
        if with_entropy:
            with torch.no_grad():
                out["entropy"] = -(log_probs.exp() * log_probs).sum(-1)  # (T,)
        return out

    return scorer


def shared_response_logps(forward, model, plan: dict[str, torch.Tensor], batch: RolloutBatch,
                          with_entropy: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``response_logps`` in the shared-prompt layout: (N, R) log-probs (and entropies, no grad, if asked), 0
    on padding. ``forward(**inputs)`` runs the model (or a wrapper of it: DDP, ``PolicyAndCritics``) on the
    plan's packed inputs; ``model``: the Hugging Face model (or PEFT model) whose LM head scores."""
    inputs = shared_inputs(model, plan)
    result = score_positions(lambda: forward(**inputs), model, plan["index"], plan["target"],
                             _scored_log_softmax(with_entropy))
    grid = batch.response_mask.shape  # (N, R)

    def place(values: torch.Tensor) -> torch.Tensor:
        return values.new_zeros(grid[0] * grid[1]).scatter(0, plan["dense"], values).view(grid)

    return place(result["logps"]), (place(result["entropy"]) if with_entropy else None)


def response_values(values: torch.Tensor, batch: RolloutBatch) -> torch.Tensor:
    """Token-wise critic values (N, L) -> the value of each response token's state (N, R), 0 on padding."""
    return values.float().gather(1, batch.action_positions()) * batch.response_mask.to(torch.float32)


__all__ = ["RolloutBatch", "response_logps", "response_values", "shared_prompt_plan", "shared_response_logps"]
