"""Chat templates, tokenisation with loss masks, truncation accounting and batch collators.

Loss masks are found by rendering *prefixes* of a conversation with the tokenizer's own chat template (the text
up to the start of an assistant turn, with the generation prompt, and the text up to its end), never by
searching for marker strings, so they are right for any prefix-stable template. Labels use the Hugging Face
convention: ``labels`` is aligned with ``input_ids`` (the causal shift happens in the loss) and ``-100`` marks a
token that carries no loss. An assistant turn's labels end at its end-of-turn token (``<|im_end|>``, ``</s>``...)
so the model learns to stop; template text after that token (ChatML's newline) carries no loss.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import torch
from jinja2 import TemplateError

from humanalign.errors import UserError

IGNORE_INDEX = -100

# ChatML (Qwen, SmolLM2, the tiny model). The {% generation %} markers let transformers' and TRL's
# assistant-only masks work with this template too; our own masks do not depend on them.
CHATML_TEMPLATE = (
    "{%- for message in messages %}"
    "{%- if message['role'] == 'assistant' %}"
    "{{- '<|im_start|>assistant\\n' }}"
    "{% generation %}{{- message['content'] + '<|im_end|>' }}{% endgeneration %}"
    "{{- '\\n' }}"
    "{%- else %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)

# Safe RLHF (PKU-Alignment): "BEGINNING OF CONVERSATION: USER: {prompt} ASSISTANT:{response}</s>", with no space
# after "ASSISTANT:" (as in safe_rlhf/configs/constants.py); later turns follow the end-of-sequence token directly.
SAFE_RLHF_TEMPLATE = (
    "{{- 'BEGINNING OF CONVERSATION: ' }}"
    "{%- for message in messages %}"
    "{%- if message['role'] == 'system' %}{{- message['content'] + ' ' }}"
    "{%- elif message['role'] == 'user' %}{{- 'USER: ' + message['content'] + ' ' }}"
    "{%- elif message['role'] == 'assistant' %}{{- 'ASSISTANT:' }}"
    "{% generation %}{{- message['content'] + eos_token }}{% endgeneration %}"
    "{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- 'ASSISTANT:' }}{%- endif %}"
)

CHAT_TEMPLATES: dict[str, str] = {"chatml": CHATML_TEMPLATE, "safe-rlhf": SAFE_RLHF_TEMPLATE}

# Tokens that close an assistant turn in common templates, besides the tokenizer's own eos token.
END_OF_TURN_TOKENS = ("<|im_end|>", "<|eot_id|>", "<end_of_turn>", "<|end|>", "<|endoftext|>", "</s>")


# --------------------------------------------------------------------------------------------- chat templates


def _single_token_id(tokenizer, token: str) -> int | None:
    """The id of ``token`` if the tokenizer encodes it as exactly one token, else None."""
    ids = tokenizer(token, add_special_tokens=False)["input_ids"]
    return ids[0] if len(ids) == 1 else None


def ensure_chat_template(tokenizer, name: str = "auto"):
    """Give ``tokenizer`` a chat template and return it.

    ``auto`` keeps the tokenizer's own template and falls back to ChatML; ``chatml`` and ``safe-rlhf`` force
    those; anything else is read as a path to a Jinja file. ChatML needs ``<|im_end|>`` to be one token to end a
    turn; for a tokenizer without it, turns end with the tokenizer's eos token instead so generation still stops.
    """
    if name == "auto":
        if getattr(tokenizer, "chat_template", None):
            return tokenizer
        name = "chatml"
    if name in CHAT_TEMPLATES:
        template = CHAT_TEMPLATES[name]
        if name == "chatml" and _single_token_id(tokenizer, "<|im_end|>") is None and tokenizer.eos_token:
            template = template.replace("'<|im_end|>'", "eos_token")
    else:
        path = Path(name).expanduser()
        if not path.is_file():
            known = ", ".join(["auto", *CHAT_TEMPLATES])
            raise UserError(f"chat_template '{name}' is neither one of {known} nor an existing Jinja file")
        template = path.read_text(encoding="utf-8")
    tokenizer.chat_template = template
    return tokenizer


def _check_messages(messages: Sequence[dict[str, str]]) -> list[dict[str, str]]:
    out = []
    for i, msg in enumerate(messages):
        if not isinstance(msg, dict) or not isinstance(msg.get("content"), str) or "role" not in msg:
            raise ValueError(f"message {i} must be a dict with 'role' and string 'content', got {msg!r}")
        out.append({"role": msg["role"], "content": msg["content"]})
    return out


def render(tokenizer, messages: Sequence[dict[str, str]], add_generation_prompt: bool = False) -> str:
    """The chat template's text for ``messages``."""
    if not getattr(tokenizer, "chat_template", None):
        ensure_chat_template(tokenizer, "auto")
    try:
        return tokenizer.apply_chat_template(
            _check_messages(messages), tokenize=False, add_generation_prompt=add_generation_prompt
        )
    except TemplateError as exc:  # e.g. a template that insists on alternating user/assistant turns
        roles = "/".join(m["role"] for m in messages)
        raise UserError(f"the chat template rejected a conversation ({roles}): {exc}") from None


def render_prompt(tokenizer, prompt_messages: Sequence[dict[str, str]]) -> str:
    """The prompt's text followed by the generation prompt (the model's turn starts right after it)."""
    return render(tokenizer, prompt_messages, add_generation_prompt=True)


def _encode(tokenizer, text: str) -> list[int]:
    # Chat templates write their own bos/special tokens, as apply_chat_template(tokenize=True) assumes.
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def end_of_turn_ids(tokenizer) -> set[int]:
    """Token ids that end an assistant turn for this tokenizer."""
    ids = {tokenizer.eos_token_id} if tokenizer.eos_token_id is not None else set()
    for token in END_OF_TURN_TOKENS:
        token_id = tokenizer.convert_tokens_to_ids(token)
        if token_id is not None and token_id != tokenizer.unk_token_id:
            ids.add(token_id)
    return ids


def stop_token_ids(model: Any, tokenizer: Any) -> list[int]:
    """Every token that ends an answer: the template's end-of-turn tokens, EOS and the model's own EOS ids
    (its ``generation_config.eos_token_id``); evaluation and rollouts stop on the same set."""
    ids = set(end_of_turn_ids(tokenizer))
    gen_eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    ids.update(gen_eos if isinstance(gen_eos, (list, tuple)) else [gen_eos] if gen_eos is not None else [])
    return sorted(int(i) for i in ids if i is not None)


def _common_prefix_len(a: Sequence[int], b: Sequence[int]) -> int:
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


def _boundary(tokenizer, prefix_text: str, full_text: str, full_ids: Sequence[int]) -> int:
    """Token index in ``full_ids`` where ``prefix_text`` ends.

    A token that straddles the boundary (a merge across it) counts as before the boundary, so it carries no
    loss rather than teaching the model template text.
    """
    if not full_text.startswith(prefix_text):
        raise UserError(
            "the chat template renders a conversation's prefix differently from the whole conversation, so "
            "assistant tokens cannot be located; use model.chat_template: chatml (or another prefix-stable template)"
        )
    return _common_prefix_len(_encode(tokenizer, prefix_text), full_ids)


def _turn_end(ids: Sequence[int], start: int, end: int, eot: set[int]) -> int:
    """End (exclusive) of an assistant span: just after its last end-of-turn token, if it has one."""
    for i in range(end - 1, start - 1, -1):
        if ids[i] in eot:
            return i + 1
    return end


# --------------------------------------------------------------------------------------------- truncation stats


@dataclass
class TruncationStats:
    """How many examples were cut or dropped while encoding (reported, never silent)."""

    prompt_truncated: int = 0
    response_truncated: int = 0
    dropped_empty: int = 0
    total: int = 0

    def update(self, other: TruncationStats) -> TruncationStats:
        for f in fields(self):
            setattr(self, f.name, getattr(self, f.name) + getattr(other, f.name))
        return self

    def as_dict(self) -> dict[str, int]:
        return {f.name: getattr(self, f.name) for f in fields(self)}

    def summary(self) -> str:
        def pct(n: int) -> str:
            return f"{100.0 * n / self.total:.1f}%" if self.total else "0%"

        return (
            f"{self.total} examples: {self.prompt_truncated} ({pct(self.prompt_truncated)}) prompts cut from the left, "
            f"{self.response_truncated} ({pct(self.response_truncated)}) responses cut from the right, "
            f"{self.dropped_empty} ({pct(self.dropped_empty)}) dropped with no response token left"
        )


def _truncate_left(ids: list[int], keep: int, bos_id: int | None) -> list[int]:
    """Keep the last ``keep`` tokens; a leading bos token survives the cut (models expect it first)."""
    if len(ids) <= keep:
        return ids
    if keep >= 2 and bos_id is not None and ids and ids[0] == bos_id:
        return [bos_id, *ids[len(ids) - keep + 1 :]]
    return ids[len(ids) - keep :]


# --------------------------------------------------------------------------------------------- encoders


def encode_conversation(
    tokenizer, messages: Sequence[dict[str, str]], max_length: int, stats: TruncationStats | None = None
) -> dict[str, list[int]] | None:
    """A whole conversation for SFT: labels on every assistant turn (end-of-turn token included), -100 elsewhere.

    Too-long conversations are cut from the right; one with no assistant token left is dropped (None, counted).
    """
    stats = stats if stats is not None else TruncationStats()
    stats.total += 1
    messages = _check_messages(messages)
    full_text = render(tokenizer, messages)
    input_ids = _encode(tokenizer, full_text)
    labels = [IGNORE_INDEX] * len(input_ids)
    eot = end_of_turn_ids(tokenizer)
    for i, msg in enumerate(messages):
        if msg["role"] != "assistant":
            continue
        start = _boundary(tokenizer, render(tokenizer, messages[:i], add_generation_prompt=True), full_text, input_ids)
        end = _boundary(tokenizer, render(tokenizer, messages[: i + 1]), full_text, input_ids)
        end = _turn_end(input_ids, start, end, eot)
        labels[start:end] = input_ids[start:end]
    if len(input_ids) > max_length:
        input_ids, labels = input_ids[:max_length], labels[:max_length]
        stats.response_truncated += 1
    if all(label == IGNORE_INDEX for label in labels):
        stats.dropped_empty += 1
        return None
    return {"input_ids": input_ids, "labels": labels}


def _response_ids(tokenizer, prompt_messages, prompt_text: str, prompt_ids: list[int], response: str) -> list[int]:
    """Tokens of the assistant's answer (through its end-of-turn token) as they follow the prompt's tokens."""
    messages = [*_check_messages(prompt_messages), {"role": "assistant", "content": response}]
    full_text = render(tokenizer, messages)
    full_ids = _encode(tokenizer, full_text)
    start = _boundary(tokenizer, prompt_text, full_text, full_ids)
    if start == len(prompt_ids):
        ids = full_ids[start:]
    else:  # a token merged across the prompt/response boundary: tokenise the answer's text on its own
        ids = _encode(tokenizer, full_text[len(prompt_text) :])
    return ids[: _turn_end(ids, 0, len(ids), end_of_turn_ids(tokenizer))]


def encode_prompt(
    tokenizer, prompt_messages: Sequence[dict[str, str]], max_prompt_length: int, stats: TruncationStats | None = None
) -> list[int]:
    """Prompt tokens with the generation prompt, cut from the left to ``max_prompt_length``."""
    ids = _encode(tokenizer, render_prompt(tokenizer, prompt_messages))
    if len(ids) > max_prompt_length:
        ids = _truncate_left(ids, max_prompt_length, tokenizer.bos_token_id)
        if stats is not None:
            stats.prompt_truncated += 1
    return ids


def _join(prompt_ids: list[int], response_ids: list[int]) -> tuple[list[int], list[int]]:
    return prompt_ids + response_ids, [IGNORE_INDEX] * len(prompt_ids) + list(response_ids)


def encode_preference(
    tokenizer,
    prompt_messages: Sequence[dict[str, str]],
    chosen: str,
    rejected: str,
    max_length: int,
    max_prompt_length: int,
    stats: TruncationStats | None = None,
) -> dict[str, list[int]] | None:
    """A preference pair as two sequences sharing the same prompt tokens.

    The prompt is cut from the left to ``max_prompt_length``; a response is cut from the right only when it does
    not fit in what is left of ``max_length`` (so it always keeps at least ``max_length - max_prompt_length``
    tokens). Labels are -100 on the prompt and cover the response and its end-of-turn token. A pair where a
    response has no token is dropped (None, counted).
    """
    if max_prompt_length >= max_length:
        raise ValueError(f"max_prompt_length ({max_prompt_length}) must be below max_length ({max_length})")
    stats = stats if stats is not None else TruncationStats()
    stats.total += 1
    prompt_text = render_prompt(tokenizer, prompt_messages)
    full_prompt_ids = _encode(tokenizer, prompt_text)
    responses = [_response_ids(tokenizer, prompt_messages, prompt_text, full_prompt_ids, r) for r in (chosen, rejected)]
    prompt_ids = _truncate_left(full_prompt_ids, max_prompt_length, tokenizer.bos_token_id)
    if len(prompt_ids) < len(full_prompt_ids):
        stats.prompt_truncated += 1
    room = max_length - len(prompt_ids)
    if any(len(r) > room for r in responses):
        stats.response_truncated += 1
        responses = [r[:room] for r in responses]
    if any(len(r) == 0 for r in responses):
        stats.dropped_empty += 1
        return None
    chosen_ids, chosen_labels = _join(prompt_ids, responses[0])
    rejected_ids, rejected_labels = _join(prompt_ids, responses[1])
    return {
        "chosen_input_ids": chosen_ids,
        "chosen_labels": chosen_labels,
        "rejected_input_ids": rejected_ids,
        "rejected_labels": rejected_labels,
    }


def encode_prompt_response(
    tokenizer,
    prompt_messages: Sequence[dict[str, str]],
    response: str,
    max_length: int,
    max_prompt_length: int,
    stats: TruncationStats | None = None,
) -> dict[str, list[int]] | None:
    """One prompt + response (for scoring with a reward/cost model, or a policy's log-probs).

    Same truncation rules as ``encode_preference``; labels cover the response and its end-of-turn token.
    """
    if max_prompt_length >= max_length:
        raise ValueError(f"max_prompt_length ({max_prompt_length}) must be below max_length ({max_length})")
    stats = stats if stats is not None else TruncationStats()
    stats.total += 1
    prompt_text = render_prompt(tokenizer, prompt_messages)
    full_prompt_ids = _encode(tokenizer, prompt_text)
    response_ids = _response_ids(tokenizer, prompt_messages, prompt_text, full_prompt_ids, response)
    prompt_ids = _truncate_left(full_prompt_ids, max_prompt_length, tokenizer.bos_token_id)
    if len(prompt_ids) < len(full_prompt_ids):
        stats.prompt_truncated += 1
    room = max_length - len(prompt_ids)
    if len(response_ids) > room:
        stats.response_truncated += 1
        response_ids = response_ids[:room]
    if not response_ids:
        stats.dropped_empty += 1
        return None
    input_ids, labels = _join(prompt_ids, response_ids)
    return {"input_ids": input_ids, "labels": labels}


# --------------------------------------------------------------------------------------------- collators


def pad_sequences(seqs: Sequence[Sequence[int]], pad_value: int, side: str = "right") -> torch.Tensor:
    """Ragged lists -> LongTensor (B, T) padded on the ``right`` (training) or ``left`` (generation)."""
    if side not in ("right", "left"):
        raise ValueError(f"side must be 'right' or 'left', got {side!r}")
    width = max((len(s) for s in seqs), default=0)
    out = torch.full((len(seqs), width), pad_value, dtype=torch.long)  # (B, T)
    for i, seq in enumerate(seqs):
        if len(seq) == 0:
            continue
        row = torch.as_tensor(list(seq), dtype=torch.long)
        if side == "right":
            out[i, : len(seq)] = row
        else:
            out[i, width - len(seq) :] = row
    return out


def _attention_mask(seqs: Sequence[Sequence[int]], side: str = "right") -> torch.Tensor:
    # Built from lengths, not from pad ids: the pad token is often the eos token, which also occurs in the text.
    return pad_sequences([[1] * len(s) for s in seqs], 0, side)


def collate_sft(features: Sequence[dict[str, Any]], pad_token_id: int) -> dict[str, torch.Tensor]:
    """{"input_ids", "labels"} examples -> right-padded input_ids, attention_mask, labels (B, T)."""
    ids = [f["input_ids"] for f in features]
    return {
        "input_ids": pad_sequences(ids, pad_token_id),
        "attention_mask": _attention_mask(ids),
        "labels": pad_sequences([f["labels"] for f in features], IGNORE_INDEX),
    }


_PAIR_KEYS = ("chosen_input_ids", "chosen_labels", "rejected_input_ids", "rejected_labels")


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float, bool)) and not isinstance(value, str)


def collate_pairs(features: Sequence[dict[str, Any]], pad_token_id: int) -> dict[str, Any]:
    """Preference pairs -> one (2B, T) batch: rows 0..B-1 are the chosen sequences, rows B..2B-1 the rejected.

    Other per-example fields: numbers (e.g. ``margin``, ``is_chosen_safe``) become float tensors (B,); anything
    else is passed through as a list. A numeric field may not be missing (None) in only some examples.
    """
    ids = [f["chosen_input_ids"] for f in features] + [f["rejected_input_ids"] for f in features]
    labels = [f["chosen_labels"] for f in features] + [f["rejected_labels"] for f in features]
    batch: dict[str, Any] = {
        "input_ids": pad_sequences(ids, pad_token_id),  # (2B, T)
        "attention_mask": _attention_mask(ids),  # (2B, T)
        "labels": pad_sequences(labels, IGNORE_INDEX),  # (2B, T)
    }
    extra_keys = [k for k in features[0] if k not in _PAIR_KEYS] if features else []
    for key in extra_keys:
        values = [f.get(key) for f in features]
        if all(_is_number(v) for v in values):
            batch[key] = torch.tensor([float(v) for v in values], dtype=torch.float32)  # (B,)
        elif any(_is_number(v) for v in values) and any(v is None for v in values):
            raise ValueError(f"field '{key}' is a number in some examples and missing in others")
        else:
            batch[key] = values
    return batch


__all__ = [
    "IGNORE_INDEX", "CHAT_TEMPLATES", "TruncationStats", "ensure_chat_template", "render", "render_prompt",
    "end_of_turn_ids", "stop_token_ids", "encode_conversation", "encode_preference", "encode_prompt", "encode_prompt_response",
    "pad_sequences", "collate_sft", "collate_pairs",
]
