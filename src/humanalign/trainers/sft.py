"""`humanalign train sft`: supervised fine-tuning, loss on assistant tokens only.

Data: any source the data package reads. SFT conversations (``messages``, or ``prompt`` + ``response``) are
used as they are, every assistant turn of a multi-turn conversation carrying loss; preference data becomes
prompt + preferred response (``pair_kind``: helpful = the better one, harmless = the safer one). What is
skipped (bad records, unsafe responses with ``only_safe_responses``, prompts without a response) and truncated
is counted, printed, and written to ``data_stats.json`` in the run folder.

Loss: next-token cross-entropy summed over the assistant tokens of the whole optimizer step and divided by
their number (across micro-batches and processes), so every target token weighs the same however the step is
split. Eval: the same token-mean loss on the validation set, and perplexity = exp(loss).

Packing (``packing: true``): examples go into rows of at most ``max_length`` tokens (best-fit decreasing).
Each example keeps its own position ids starting at 0 and no attention mask is passed, so transformers builds a
block-diagonal causal mask from the position ids (sdpa, eager, flex) or runs variable-length flash attention
(flash_attention_2): no token attends to another example, and each example's first token carries no loss.
transformers detects packed rows only without a KV cache, hence ``use_cache=False`` in every forward. Before
training, a self-check runs the two shortest examples packed and apart and stops with an error if they
differ (a model whose attention code ignores packed position ids would let examples see each other).

A vision-language model (``models.vision.is_vision_model``: its config has a vision config) trains on
conversations with images (``SFTRecord.images``, or a preference pair's images): its processor renders and
tokenises them (``data.vision_sft``: image tokens expanded, labels on the assistant turns only) and each batch
carries the pixel values (and Qwen2-VL's ``image_grid_thw``); the forward is the model's own, with the 2-D
padding mask. ``freeze_vision_tower`` (default), ``freeze_projector`` and ``freeze_language_model`` choose what
trains (projector only: LLaVA's first stage); LoRA adapts the language model only. Packing is refused with
images. The final folder holds the processor and loads with ``AutoProcessor`` / ``AutoModelForImageTextToText``.
"""

from __future__ import annotations

import bisect
import math
import random
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import partial
from typing import Any, NamedTuple

import torch

from humanalign.config.data import SourceSpec
from humanalign.config.sft import SFTConfig
from humanalign.data.images import reject_images
from humanalign.data.io import atomic_write_json
from humanalign.data.load import load_source
from humanalign.data.pairs import records_to_pairs
from humanalign.data.records import Message, SFTRecord, prompt_key
from humanalign.data.tokenize import (
    IGNORE_INDEX,
    TruncationStats,
    collate_sft,
    encode_conversation,
    pad_sequences,
)
from humanalign.data.vision_sft import VisionConversation, VisionSFTCollator, tokenize_vision_conversations
from humanalign.engine import Engine
from humanalign.engine.data import EncodedDataset
from humanalign.errors import ConfigError, UserError
from humanalign.losses.sft import sft_loss_sums
from humanalign.models.load import count_parameters, load_causal_lm, load_tokenizer, resolve_model_path
from humanalign.models.logprobs import image_inputs, right_padded_mask
from humanalign.models.vision import (
    describe_parts,
    is_vision_model,
    load_processor,
    load_vision_lm,
    max_images_per_prompt,
    model_config,
)

# ----------------------------------------------------------------------------------------------- data


def source_spec(cfg: SFTConfig, path: str) -> SourceSpec:
    return SourceSpec(source=cfg.source, path=path, field_map=cfg.field_map, record_type=cfg.record_type,
                      pair_kind=cfg.pair_kind)


def read_conversations(cfg: SFTConfig, path: str, limit: int | None, *, images: bool = False,
                       max_images: int | None = None) -> tuple[list[VisionConversation], Counter[str], str]:
    """Conversations to imitate (with their images) from a data path, the skip counts by reason, and a one-line
    description. Without ``images`` (a text model) records with images are refused, never stripped; with them,
    a record showing more than ``max_images`` (the model's limit per prompt) is a bad record."""
    spec = source_spec(cfg, path)
    result = load_source(spec, skip_invalid=cfg.skip_invalid, seed=cfg.seed, max_images=max_images)
    if not images:
        reject_images(result.records, spec.describe(), "`train sft` with a text model")
    skipped: Counter[str] = Counter(result.skipped)
    conversations = [VisionConversation(list(r.messages), list(r.images)) for r in result.records
                     if isinstance(r, SFTRecord)]
    others = [r for r in result.records if not isinstance(r, SFTRecord)]
    for pair in records_to_pairs(others, cfg.pair_kind, skipped, plain_kind=cfg.pair_kind):
        if cfg.only_safe_responses and getattr(pair, "is_chosen_safe", None) is False:
            skipped["response labelled unsafe (only_safe_responses)"] += 1
            continue
        conversations.append(VisionConversation([*pair.prompt, {"role": "assistant", "content": pair.chosen}],
                                                list(pair.images)))
    if cfg.system_prompt:
        for c in conversations:
            if not c.messages or c.messages[0]["role"] != "system":
                c.messages.insert(0, {"role": "system", "content": cfg.system_prompt})
    if limit is not None and len(conversations) > limit:
        skipped[f"beyond the first {limit} (max samples)"] += len(conversations) - limit
        conversations = conversations[:limit]
    via = "+".join(result.sources) or spec.source
    return conversations, skipped, f"{path} ({result.read} records via {via})"


def load_conversations(cfg: SFTConfig, path: str, limit: int | None) -> tuple[list[list[Message]], Counter[str], str]:
    """Conversations to imitate from a data path (text only), the skip counts by reason, and a description."""
    conversations, skipped, description = read_conversations(cfg, path, limit)
    return [c.messages for c in conversations], skipped, description


def prompt_of(conversation: list[Message]) -> list[Message]:
    """Everything before the last assistant turn."""
    last = max(i for i, m in enumerate(conversation) if m["role"] == "assistant")
    return conversation[:last]


def split_validation(conversations: list, ratio: float, seed: int,
                     key: Callable[[Any], str] = lambda c: prompt_key(prompt_of(c))):
    """Hold out a seeded share of the prompts; every conversation of a prompt (``key``: for conversations with
    images, the prompt and its pictures) lands on the same side."""
    keys = sorted({key(c) for c in conversations})
    random.Random(seed).shuffle(keys)
    held = set(keys[:max(1, round(ratio * len(keys)))])
    train = [c for c in conversations if key(c) not in held]
    val = [c for c in conversations if key(c) in held]
    return train, val


def encode_all(tokenizer, conversations: list[list[Message]], max_length: int):
    stats = TruncationStats()
    features = [f for c in conversations if (f := encode_conversation(tokenizer, c, max_length, stats)) is not None]
    return features, stats


def pack_examples(features: Sequence[dict[str, list[int]]], max_length: int) -> list[dict[str, list[int]]]:
    """Best-fit decreasing: each example goes into the fullest row it still fits in. Rows carry position_ids
    restarting at 0 for each example; each example's first label is -100 (nothing before it to predict it)."""
    order = sorted(range(len(features)), key=lambda i: (-len(features[i]["input_ids"]), i))
    rows: list[dict[str, list[int]]] = []
    free: list[tuple[int, int]] = []  # (room left, row index), sorted
    for i in order:
        ids, labels = features[i]["input_ids"], features[i]["labels"]
        n = len(ids)
        at = bisect.bisect_left(free, (n, -1))
        if at < len(free):
            room, row_index = free.pop(at)
        else:
            rows.append({"input_ids": [], "labels": [], "position_ids": []})
            room, row_index = max_length, len(rows) - 1
        row = rows[row_index]
        row["input_ids"] += ids
        row["labels"] += [IGNORE_INDEX, *labels[1:]]
        row["position_ids"] += list(range(n))
        bisect.insort(free, (room - n, row_index))
    return rows


def collate_packed(rows: Sequence[dict[str, list[int]]], pad_token_id: int) -> dict[str, torch.Tensor]:
    """Packed rows -> input_ids, labels, position_ids (B, T). The padding tail is a segment of its own
    (positions from 0) so that real tokens never attend to it; no attention_mask (see the module docstring)."""
    width = max(len(r["input_ids"]) for r in rows)
    positions = [r["position_ids"] + list(range(width - len(r["position_ids"]))) for r in rows]
    return {
        "input_ids": pad_sequences([r["input_ids"] for r in rows], pad_token_id),
        "labels": pad_sequences([r["labels"] for r in rows], IGNORE_INDEX),
        "position_ids": torch.tensor(positions, dtype=torch.long),
    }


@dataclass
class SFTData:
    train: list[dict[str, list[int]]]  # packed rows when packing
    val: list[dict[str, list[int]]]
    stats: dict[str, Any] = field(default_factory=dict)
    train_unpacked: list[dict[str, list[int]]] = field(default_factory=list)


def read_splits(cfg: SFTConfig, images: bool, max_images: int | None = None) -> tuple[list[VisionConversation], list[VisionConversation],
                                                      dict[str, tuple[Counter[str], str]]]:
    """(train conversations, validation conversations, {split: (skip counts, description)}): val_path, else a
    seeded val_ratio share of the training prompts (a prompt with its pictures never lands on both sides)."""
    train_conv, train_skipped, train_desc = read_conversations(cfg, cfg.train_path, cfg.max_train_samples,
                                                               images=images, max_images=max_images)
    val_conv, val_skipped, val_desc = [], Counter(), ""
    if cfg.val_path:
        val_conv, val_skipped, val_desc = read_conversations(cfg, cfg.val_path, cfg.max_eval_samples, images=images,
                                                             max_images=max_images)
    elif cfg.val_ratio > 0:
        train_conv, val_conv = split_validation(train_conv, cfg.val_ratio, cfg.seed, key=VisionConversation.key)
        val_conv = val_conv[:cfg.max_eval_samples] if cfg.max_eval_samples else val_conv
        val_desc = f"{len(val_conv)} conversations held out of the training data (val_ratio {cfg.val_ratio})"
    if not train_conv:
        why = ", ".join(f"{k}: {v}" for k, v in train_skipped.most_common()) or "no records"
        raise UserError(f"{cfg.train_path}: no conversations to train on ({why})")
    return train_conv, val_conv, {"train": (train_skipped, train_desc), "val": (val_skipped, val_desc)}


def _target_count(example: dict[str, Any]) -> int:
    return sum(1 for x in list(example["labels"])[1:] if int(x) != IGNORE_INDEX)


def prepare_data(cfg: SFTConfig, tokenizer, say: Callable[[str], None], processor=None,
                 max_images: int | None = None) -> SFTData:
    """Read, split, tokenise (and pack) the data, reporting everything skipped or truncated. With ``processor``
    (a vision-language model's) conversations keep their images and ``data.vision_sft`` tokenises them."""
    train_conv, val_conv, read = read_splits(cfg, images=processor is not None, max_images=max_images)
    (train_skipped, train_desc), (val_skipped, val_desc) = read["train"], read["val"]
    if processor is None:
        train, train_trunc = encode_all(tokenizer, [c.messages for c in train_conv], cfg.max_length)
        val, val_trunc = encode_all(tokenizer, [c.messages for c in val_conv], cfg.max_length)
    else:  # what cannot be tokenised whole (image tokens past max_length, ...) is counted with the skips
        train, more, train_trunc = tokenize_vision_conversations(train_conv, processor, cfg.max_length)
        train_skipped.update(more)
        val, more, val_trunc = tokenize_vision_conversations(val_conv, processor, cfg.max_length)
        val_skipped.update(more)
    if not train:
        why = ", ".join(f"{k}: {v}" for k, v in train_skipped.most_common())
        raise UserError(f"{cfg.train_path}: every conversation lost its assistant tokens to max_length "
                        f"({cfg.max_length}); raise max_length" + (f" (skipped: {why})" if processor else ""))
    stats: dict[str, Any] = {
        "train": {"source": train_desc, "conversations": len(train_conv), "examples": len(train),
                  "skipped": dict(train_skipped), "truncation": train_trunc.as_dict(),
                  "target_tokens": sum(_target_count(f) for f in train)},
        "val": {"source": val_desc, "conversations": len(val_conv), "examples": len(val),
                "skipped": dict(val_skipped), "truncation": val_trunc.as_dict()},
    }
    if processor is not None:
        stats["train"]["with_images"] = sum(1 for c in train_conv if c.images)
        stats["val"]["with_images"] = sum(1 for c in val_conv if c.images)
    say(f"[sft] train: {train_desc}: {len(train_conv)} conversations -> {len(train)} examples, "
        f"{stats['train']['target_tokens']:,} assistant tokens"
        + (f"; {stats['train']['with_images']} conversations with images" if processor is not None else ""))
    for name, skipped, trunc in (("train", train_skipped, train_trunc), ("val", val_skipped, val_trunc)):
        if skipped:
            say(f"[sft] {name} skipped: " + ", ".join(f"{k}: {v}" for k, v in skipped.most_common()))
        if trunc.total and (trunc.response_truncated or trunc.dropped_empty):
            say(f"[sft] {name} truncation (max_length {cfg.max_length}): {trunc.summary()}")
    if val_conv:
        say(f"[sft] val: {val_desc}: {len(val)} examples")
    if cfg.packing:
        rows = pack_examples(train, cfg.max_length)
        used = sum(len(r["input_ids"]) for r in rows)
        stats["train"]["packed_rows"] = len(rows)
        say(f"[sft] packing: {len(train)} examples -> {len(rows)} rows of <= {cfg.max_length} tokens "
            f"({100 * used / (len(rows) * cfg.max_length):.0f}% filled)")
        return SFTData(train=rows, val=val, stats=stats, train_unpacked=train)
    return SFTData(train=train, val=val, stats=stats, train_unpacked=train)


# ----------------------------------------------------------------------------------------------- loss


def forward_logits(model, batch: dict[str, torch.Tensor], vision: bool = False) -> torch.Tensor:
    """Logits (B, T, V). Packed rows: the position ids mark example boundaries. Right-padded rows: the padding
    mask as a 4-D mask where the model takes one (``right_padded_mask``: no host sync per forward). A
    vision-language model (``vision``) gets the 2-D mask and the batch's image inputs (its own forward places
    the image features and, for Qwen2-VL, the multimodal positions)."""
    if "position_ids" in batch:
        return model(input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False).logits
    if vision:
        return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False,
                     **image_inputs(batch)).logits
    mask = right_padded_mask(model, batch["attention_mask"])
    return model(input_ids=batch["input_ids"], attention_mask=mask, use_cache=False).logits


def evaluate(engine: Engine, model, loader, vision: bool = False) -> dict[str, float]:
    """Token-mean loss and perplexity over the whole validation set (each example counted once)."""
    was_training = model.training
    model.eval()
    total, tokens = 0.0, 0
    with torch.no_grad():
        for batch in loader:
            sums, counts = sft_loss_sums(forward_logits(model, batch, vision), batch["labels"])
            sums, counts = engine.gather_for_metrics((sums.double(), counts))
            total += sums.sum().item()
            tokens += int(counts.sum().item())
    model.train(was_training)
    loss = total / max(tokens, 1)
    return {"loss": loss, "ppl": math.exp(min(loss, 50.0)), "tokens": float(tokens)}


def check_packing(engine: Engine, model, features: Sequence[dict[str, list[int]]]) -> float:
    """Logits of the two shortest examples packed in one row must match those computed apart; returns the
    largest difference. Runs on every rank (the same examples), so it is safe under DDP, FSDP and DeepSpeed."""
    pair = sorted(features, key=lambda f: len(f["input_ids"]))[:2]
    if len(pair) < 2:
        return 0.0
    was_training = model.training
    model.eval()
    with torch.no_grad():
        apart = [model(input_ids=torch.tensor([f["input_ids"]], device=engine.device), use_cache=False).logits[0]
                 for f in pair]
        row = {"input_ids": pair[0]["input_ids"] + pair[1]["input_ids"],
               "position_ids": list(range(len(pair[0]["input_ids"]))) + list(range(len(pair[1]["input_ids"])))}
        packed = model(input_ids=torch.tensor([row["input_ids"]], device=engine.device),
                       position_ids=torch.tensor([row["position_ids"]], device=engine.device), use_cache=False).logits[0]
    model.train(was_training)
    diff = (packed.float() - torch.cat(apart).float()).abs().max().item()
    scale = torch.cat(apart).float().abs().max().item()
    tolerance = 1e-3 * max(1.0, scale) if packed.dtype == torch.float32 else 5e-2 * max(1.0, scale)
    if not diff <= tolerance:
        raise UserError(f"packing: this model's attention lets packed examples see each other (logits differ by "
                        f"{diff:.3g} > {tolerance:.3g}); set packing: false, or attn_implementation: sdpa")
    return diff


def target_tokens(batch: dict[str, torch.Tensor]) -> torch.Tensor:
    return (batch["labels"][:, 1:] != IGNORE_INDEX).sum()


# ----------------------------------------------------------------------------------------------- run


class RunInputs(NamedTuple):
    """What ``run`` trains on, text or vision-language alike."""

    model: torch.nn.Module
    saver: Any  # the tokenizer (text) or processor (vision-language), saved beside the final model
    data: SFTData
    collate: Callable  # training batches (packed rows or padded examples)
    collate_eval: Callable  # validation batches (padded examples)


def _text_inputs(cfg: SFTConfig, engine: Engine, model_path: str) -> RunInputs:
    tokenizer = load_tokenizer(model_path, cfg.model)
    data = prepare_data(cfg, tokenizer, engine.print)
    model = load_causal_lm(model_path, cfg.model, cfg.lora, gradient_checkpointing=cfg.gradient_checkpointing)
    trainable, total = count_parameters(model)
    engine.print(f"[sft] model {cfg.model_name_or_path}: {trainable:,} of {total:,} parameters trained"
                 + (" (LoRA)" if cfg.lora.enabled else ""))
    pad = tokenizer.pad_token_id
    collate = partial(collate_packed, pad_token_id=pad) if cfg.packing else partial(collate_sft, pad_token_id=pad)
    return RunInputs(model, tokenizer, data, collate, partial(collate_sft, pad_token_id=pad))


def _vision_inputs(cfg: SFTConfig, engine: Engine, model_path: str) -> RunInputs:
    """A vision-language model: its processor tokenises the conversations with their images; the parts train as
    the freeze options and LoRA say (``models.vision.load_vision_lm``)."""
    if cfg.packing:
        raise ConfigError("packing is not supported with a vision-language model (each row's image inputs would "
                          "have to follow its examples): set packing: false")
    processor = load_processor(model_path, cfg.model)
    limit = max_images_per_prompt(model_config(model_path, cfg.model), processor, cfg.max_images_per_prompt)
    data = prepare_data(cfg, processor.tokenizer, engine.print, processor=processor, max_images=limit)
    model = load_vision_lm(model_path, cfg.model, cfg.lora, freeze_vision_tower=cfg.freeze_vision_tower,
                           freeze_projector=cfg.freeze_projector, freeze_language_model=cfg.freeze_language_model,
                           gradient_checkpointing=cfg.gradient_checkpointing)
    trainable, total = count_parameters(model)
    engine.print(f"[sft] vision-language model {cfg.model_name_or_path}: {trainable:,} of {total:,} parameters "
                 f"trained ({describe_parts(model)}" + (", LoRA on the language model)" if cfg.lora.enabled else ")"))
    collate = VisionSFTCollator(processor.tokenizer.pad_token_id)
    return RunInputs(model, processor, data, collate, collate)


def run(cfg: SFTConfig) -> dict[str, Any]:
    """Fine-tune, evaluate, checkpoint; the final model goes to ``<output_dir>/final``. Returns a summary."""
    with Engine(cfg, name="sft") as engine:
        model_path = resolve_model_path(cfg.model_name_or_path)
        vision = is_vision_model(model_path, cfg.model)
        inputs = (_vision_inputs if vision else _text_inputs)(cfg, engine, model_path)
        model, data = inputs.model, inputs.data
        if engine.is_main_process:
            atomic_write_json(engine.run_dir / "data_stats.json", data.stats)
        train_set = EncodedDataset(data.train)
        train_loader = engine.train_loader(train_set, inputs.collate, lengths=train_set.lengths(),
                                           item_name="packed rows" if cfg.packing else "examples")
        eval_loader = None
        if data.val:
            val_set = EncodedDataset(data.val)
            eval_loader = engine.eval_loader(val_set, inputs.collate_eval, lengths=val_set.lengths())
        model, _, _ = engine.prepare(model, train_loader)
        if cfg.packing:
            engine.print(f"[sft] packing self-check: packed and separate logits agree "
                         f"(max difference {check_packing(engine, model, data.val or data.train_unpacked):.2g})")

        start_eval = None
        if eval_loader is not None and cfg.eval_on_start and engine.step == 0:
            start_eval = engine.log_eval(evaluate(engine, model, eval_loader, vision))
        model.train()
        for micro_batches in engine.train_steps(train_loader):
            step_tokens = engine.reduce_sum(sum(target_tokens(b) for b in micro_batches))
            for batch in micro_batches:
                with engine.accumulate(model):
                    sums, counts = sft_loss_sums(forward_logits(model, batch, vision), batch["labels"])
                    loss_sum, n = sums.sum(), counts.sum()
                    engine.backward(loss_sum, normalizer=step_tokens)
                    engine.record({"loss": loss_sum / n.clamp(min=1)}, weight=n)
            engine.optimizer_step()
            if eval_loader is not None and engine.should_evaluate():
                engine.log_eval(evaluate(engine, model, eval_loader, vision))
            if engine.should_save():
                engine.save_checkpoint()

        last_eval = engine.last_eval[1] if engine.last_eval else {}
        summary = {
            "train_loss": engine.last_train_metrics.get("train/loss"),
            "eval_loss": last_eval.get("eval/loss"),
            "eval_ppl": last_eval.get("eval/ppl"),
            "eval_loss_at_start": start_eval["eval/loss"] if start_eval else None,
            "steps": engine.step,
            "train_examples": len(data.train),
            "skipped_nonfinite": engine.nonfinite_skipped,
        }
        if vision:
            summary["vision"] = {"with_images": {"train": data.stats["train"]["with_images"],
                                                 "val": data.stats["val"]["with_images"]}}
        final = engine.finish(model, inputs.saver, summary={"sft": summary})
        summary["final_model"] = str(final)
    return summary
