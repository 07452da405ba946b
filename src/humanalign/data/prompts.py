"""Prompt files (eval generation, PPO rollouts) and the SFT examples of PPO's ptx term.

``read_prompt_records`` reads one file's prompts with their images (generation, arena, distill with a
vision-language model), ``read_prompts`` its text prompts for a consumer that takes no images (refusing a
prompt with images), ``load_prompts`` merges several (each distinct prompt once), ``load_online_prompts`` an
online RL run's training prompts (encoded once) and held-out ones;
``load_ptx_examples`` encodes conversations or pairs' chosen answers for the ptx loss, and ``PtxStream`` hands
out their micro-batch for any optimizer step.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Protocol

import torch

from humanalign.config.data import SourceSpec
from humanalign.config.online_rl import OnlineRLConfig
from humanalign.data.images import IMAGE_FIELDS, check_image_count, image_digest, reject_images
from humanalign.data.io import iter_records
from humanalign.data.load import load_source
from humanalign.data.records import Message, PreferencePair, PromptRecord, SFTRecord, prompt_key
from humanalign.data.sources import SourceContext
from humanalign.data.sources.generic import PROMPT_TEXT_FIELDS
from humanalign.data.sources.generic import prompts as prompts_adapter
from humanalign.data.tokenize import TruncationStats, collate_sft, encode_conversation, encode_prompt
from humanalign.errors import RecordError, UserError

# Named in the refusal of every consumer that takes text prompts only
IMAGE_PROMPT_COMMANDS = "`generate`, `eval arena` and `distill` with a vision-language model"


def prompt_hash(prompt: Sequence[Message], images: Sequence[str] = ()) -> str:
    """Stable short id of a prompt (whitespace-normalised, see ``prompt_key``), and of its images' bytes when it
    shows any: the same question about two pictures is two prompts. A text prompt keeps its old id."""
    key = prompt_key(list(prompt))
    if images:
        key += "\x1d" + ",".join(image_digest(ref) for ref in images)
    return hashlib.sha256(key.encode("utf-8")).hexdigest()[:16]


def _image_field(raw: dict[str, Any]) -> str | None:
    """The raw field holding images (``images``/``image``), or None; image content parts are found by parsing."""
    return next((k for k in IMAGE_FIELDS if raw.get(k) not in (None, [])), None)


def _refuse_images(path: str | Path, line: int, field: str, consumer: str) -> RecordError:
    return RecordError(path, line, field, f"prompts with images are not taken by {consumer} (text only); they are "
                                          f"taken by {IMAGE_PROMPT_COMMANDS} (see docs/multimodal.md)")


def read_prompt_records(path: str | Path, limit: int | None = None, text_only: str | None = None,
                        max_images: int | None = None) -> tuple[list[PromptRecord], int]:
    """The prompts of a file with their images, first occurrence of each kept (text and images both count).

    A record holds ``prompt`` (string or messages, OpenAI-style image parts allowed), ms-swift's ``query`` or
    RLAIF-V's ``question``, optional ``system`` and ``images``/``image``; images follow the conventions of
    every image source (``data.images``: paths relative to the file, data: URIs, checked when read). Other
    fields are ignored. ``text_only`` names a consumer that takes no images: a record with images then stops
    the read with one line naming it; so does a record with more than ``max_images`` images (the model's limit
    per prompt). Returns (records, number of duplicate prompts skipped).
    """
    records: list[PromptRecord] = []
    seen: set[str] = set()
    duplicates = 0
    for line, raw in iter_records(path):
        field = _image_field(raw)
        if text_only and field:
            raise _refuse_images(path, line, field, text_only)
        ctx = SourceContext(str(path), line, "prompts")
        (record,) = prompts_adapter(raw, ctx)
        text_field = next((k for k in PROMPT_TEXT_FIELDS if k in raw), "prompt")
        if text_only and record.images:  # image parts inside a message list
            raise _refuse_images(path, line, text_field, text_only)
        check_image_count(raw, [record], ctx, max_images, parts_field=text_field)
        key = prompt_hash(record.prompt, record.images)
        if key in seen:
            duplicates += 1
            continue
        seen.add(key)
        records.append(record)
        if limit is not None and len(records) >= limit:
            break
    return records, duplicates


def read_prompts(path: str | Path, limit: int | None = None,
                 consumer: str = "this command") -> tuple[list[list[Message]], int]:
    """Text prompts of a file (see ``read_prompt_records``), first occurrence of each kept; a prompt with images
    is refused with one line naming ``consumer`` and the commands that take them.

    Returns (prompts, number of duplicate prompts skipped).
    """
    records, duplicates = read_prompt_records(path, limit, text_only=consumer)
    return [r.prompt for r in records], duplicates


def load_prompts(paths: str | Sequence[str], max_prompts: int | None = None,
                 log: Callable[[str], None] = print,
                 consumer: str = "PPO and GRPO rollouts") -> list[list[dict[str, str]]]:
    """Prompts of one or more files (records with a 'prompt'), each distinct prompt once, in file order."""
    seen: set[str] = set()
    prompts, duplicates = [], 0
    for path in [paths] if isinstance(paths, str) else list(paths):
        found, dup = read_prompts(path, consumer=consumer)
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


def encode_prompts(tokenizer, prompts: Sequence[list[Message]], max_prompt_length: int,
                   say: Callable[[str], None], name: str) -> list[list[int]]:
    """Each prompt through the chat template once (the online trainers sample from these ids every rollout),
    cut from the left to ``max_prompt_length``; says how many were cut."""
    stats = TruncationStats()
    ids = [encode_prompt(tokenizer, p, max_prompt_length, stats) for p in prompts]
    if stats.prompt_truncated:
        say(f"[{name}] {stats.prompt_truncated} of {len(prompts)} prompts cut from the left "
            f"to max_prompt_length = {max_prompt_length}")
    return ids


def load_online_prompts(cfg: OnlineRLConfig, tokenizer, say: Callable[[str], None], name: str
                        ) -> tuple[list[list[Message]], list[list[int]], list[list[Message]]]:
    """PPO's and GRPO's prompts: the training ones (each distinct prompt once, at most ``max_prompts``), their
    chat-template ids, and the held-out evaluation ones (none without ``eval_prompts_path``)."""
    prompts = load_prompts(cfg.prompts_path, cfg.max_prompts, log=say)
    prompt_ids = encode_prompts(tokenizer, prompts, cfg.max_prompt_length, say, name)
    eval_prompts = (load_prompts(cfg.eval_prompts_path, cfg.eval_max_prompts, log=say)
                    if cfg.eval_prompts_path else [])
    return prompts, prompt_ids, eval_prompts


def load_ptx_examples(path: str, source: str, tokenizer, max_length: int,
                      log: Callable[[str], None] = print) -> list[dict[str, list[int]]]:
    """SFT examples for the ptx loss: 'messages' records as they are, or pairs / other sources through their
    adapter (a pair's chosen answer is imitated). Conversations with no assistant token left are counted."""
    first = next(iter_records(path), (0, {}))[1]
    conversations: list[list[dict[str, str]]] = []
    if "messages" in first:
        for line, rec in iter_records(path):
            field = _image_field(rec)
            if field:
                raise RecordError(path, line, field, "ptx data does not take images yet (see docs/multimodal.md); "
                                  "use text-only records")
            msgs = rec.get("messages")
            if not isinstance(msgs, list) or not all(isinstance(m, dict) and "role" in m and "content" in m
                                                     for m in msgs):
                raise RecordError(path, line, "messages", "must be a list of {role, content} messages")
            conversations.append(msgs)
    else:
        records = load_source(SourceSpec(path=path, source=source)).records
        reject_images(records, path, "ptx data")
        for record in records:
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


class MicroBatchSampler(Protocol):
    """What ``PtxStream`` needs of a sampler (the engine's ``StepBatchSampler`` over the ptx examples)."""

    accumulation: int
    micro_batches_per_epoch: int

    def epoch_order(self, epoch: int) -> Any: ...

    def micro_batch(self, order: Any, micro: int) -> list[int]: ...


class PtxStream:
    """The ptx micro-batch of every (optimizer step, micro-batch): a pure function of the step, so a resumed
    run draws the same SFT batches as an uninterrupted one. ``sampler`` orders the examples (this rank's share
    of each micro-batch, seeded per epoch)."""

    def __init__(self, examples: list[dict[str, list[int]]], sampler: MicroBatchSampler, pad_id: int):
        self.examples, self.pad_id, self.sampler = examples, pad_id, sampler
        self.accumulation = sampler.accumulation
        self._order: tuple[int, Any] | None = None

    def batch(self, step: int, micro: int) -> dict[str, torch.Tensor]:
        epoch, index = divmod(step * self.accumulation + micro, self.sampler.micro_batches_per_epoch)
        if self._order is None or self._order[0] != epoch:
            self._order = (epoch, self.sampler.epoch_order(epoch))
        rows = self.sampler.micro_batch(self._order[1], index)
        return collate_sft([self.examples[i] for i in rows], self.pad_id)


__all__ = ["IMAGE_PROMPT_COMMANDS", "prompt_hash", "read_prompt_records", "read_prompts", "load_prompts",
           "encode_prompts", "load_ptx_examples", "MicroBatchSampler", "PtxStream"]
