"""Batched generation with a model's chat template, and `humanalign generate` (resumable JSONL output).

Prompts of a batch are left-padded so that every answer starts at the same position and the KV cache is used.
Each batch is seeded from the run's seed and the keys of its prompts: the same prompts, seed and batch size give
the same answers, whichever run (or resumed run) generates them.

Prompts may show images (``data.records.PromptRecord.images``); a vision-language model (``models.vision``)
answers them through its processor (``eval.vision_generate`` builds the batch), a text model refuses them.

Output records: ``{"prompt", "response", "model", "sample_index", "prompt_hash"}`` (and ``"images"``, the
prompt's image references, when it has any), one JSON object per line, appended and flushed batch by batch. A
resumed run skips every (prompt hash, sample index) already in the file and drops a truncated last line left by a
killed run. A prompt's hash covers its images' bytes: the same question about two pictures is two prompts. The
decoding settings are kept beside the output in ``<output>.settings.json``; resuming with other settings is
refused (mixing them would mix two experiments).
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm
from transformers import GenerationConfig

from humanalign.data.io import atomic_write_json
from humanalign.data.prompts import prompt_hash, read_prompt_records, read_prompts  # noqa: F401 (re-exported)
from humanalign.data.records import Message, PromptRecord, prompt_from_jsonable, prompt_to_jsonable
from humanalign.data.tokenize import encode_prompt, pad_sequences, stop_token_ids
from humanalign.errors import RecordError, UserError
from humanalign.eval.vision_generate import is_processor, vision_generation_inputs
from humanalign.models.load import load_causal_lm, load_tokenizer, resolve_model_path
from humanalign.models.vision import (
    is_vision_model,
    load_processor,
    load_vision_lm,
    max_images_per_prompt,
    model_config,
)

PromptLike = Sequence[Message] | str | PromptRecord


@dataclass(frozen=True)
class Sampling:
    """Decoding settings; everything that changes what the model writes."""

    max_new_tokens: int = 256
    do_sample: bool = True
    temperature: float = 0.7
    top_p: float = 0.9
    top_k: int = 0
    repetition_penalty: float = 1.0
    max_prompt_length: int = 512
    seed: int = 42

    @classmethod
    def from_config(cls, cfg: Any) -> Sampling:
        """Pick the decoding fields out of any config that has them (GenerateConfig, ArenaConfig, ...)."""
        return cls(**{name: getattr(cfg, name) for name in cls.__dataclass_fields__})


# ---------------------------------------------------------------------------------------------------- prompts


def as_record(value: PromptLike) -> PromptRecord:
    """A prompt as any caller gives it (a user string, messages, a ``PromptRecord``) -> a ``PromptRecord``."""
    if isinstance(value, PromptRecord):
        return value
    return PromptRecord(prompt=prompt_from_jsonable(value) if isinstance(value, (str, list)) else list(value))


def record_hash(record: PromptRecord) -> str:
    return prompt_hash(record.prompt, record.images)


def with_images(row: dict[str, Any], record: PromptRecord) -> dict[str, Any]:
    """``row`` with the prompt's image references beside it (text prompts: no field, files as before)."""
    return {**row, "images": list(record.images)} if record.images else row


def check_takes_images(records: Sequence[PromptRecord], model_name: str, settings: Any, where: str,
                       role: str = "model") -> None:
    """Refuse, before anything is loaded or written, image prompts given to a text-only model."""
    shown = sum(bool(r.images) for r in records)
    if shown and not is_vision_model(model_name, settings):
        raise UserError(f"{where}: {shown} of {len(records)} prompts show images, but the {role} '{model_name}' is "
                        "a text-only model (a vision-language model's config.json has a vision_config); "
                        "give a vision-language model or text-only prompts")


def prompt_image_limit(model_names: Sequence[str], settings: Any, override: int | None = None) -> int | None:
    """The most images one prompt may show to every vision-language model of ``model_names`` (``override`` when
    set; None: no known limit). A text-only model sets none: ``check_takes_images`` refuses its image prompts."""
    if override is not None:
        return override
    limits = [max_images_per_prompt(model_config(name, settings), load_processor(name, settings))
              for name in model_names if is_vision_model(name, settings)]
    return min((n for n in limits if n is not None), default=None)


# ---------------------------------------------------------------------------------------------------- decoding


@dataclass
class PromptCuts:
    """Prompts longer than max_prompt_length: text ones lose their beginning (``prompt_truncated``, the field
    ``data.tokenize.encode_prompt`` counts in), ones with images are kept whole (``kept_whole``: a cut would
    cut their image tokens)."""

    prompt_truncated: int = 0
    kept_whole: int = 0


def _pad_token_id(tokenizer: Any, stops: list[int]) -> int:
    if tokenizer.pad_token_id is not None:
        return int(tokenizer.pad_token_id)
    if stops:
        return stops[0]
    raise UserError("the tokenizer has neither a pad nor an EOS token; cannot pad a batch")


def batch_seed(seed: int, keys: Iterable[str]) -> int:
    digest = hashlib.sha256(f"{seed}|{'|'.join(keys)}".encode()).hexdigest()
    return int(digest[:15], 16)


@torch.inference_mode()
def generate_token_ids(
    model: Any,
    tokenizer: Any,
    prompt_ids: Sequence[Sequence[int]],
    sampling: Sampling,
    num_return_sequences: int = 1,
    seed: int | None = None,
) -> list[list[int]]:
    """One left-padded batch -> the answer token ids (stop token and padding removed), prompt-major order:
    answers of prompt 0 (samples 0..n-1), then prompt 1, ... ``seed`` seeds this batch (default: sampling.seed).
    """
    stops = stop_token_ids(model, tokenizer)
    pad_id = _pad_token_id(tokenizer, stops)
    inputs = {"input_ids": pad_sequences(prompt_ids, pad_id, side="left"),  # (B, P)
              "attention_mask": pad_sequences([[1] * len(ids) for ids in prompt_ids], 0, side="left")}  # (B, P)
    return generate_from_inputs(model, inputs, sampling, stops, pad_id, num_return_sequences, seed)


@torch.inference_mode()
def generate_image_token_ids(
    model: Any,
    processor: Any,
    prompts: Sequence[PromptRecord],
    sampling: Sampling,
    num_return_sequences: int = 1,
    seed: int | None = None,
    cuts: PromptCuts | None = None,
) -> list[list[int]]:
    """``generate_token_ids`` for a vision-language model: prompts with their images through the processor
    (``eval.vision_generate``), in the same order, with the same seeding. Prompts longer than
    ``max_prompt_length`` are counted in ``cuts``."""
    stops = stop_token_ids(model, processor.tokenizer)
    pad_id = _pad_token_id(processor.tokenizer, stops)
    batch = vision_generation_inputs(processor, [r.prompt for r in prompts], [r.images for r in prompts],
                                     sampling.max_prompt_length, pad_id, num_return_sequences)
    if cuts is not None:
        cuts.prompt_truncated += batch.prompt_truncated
        cuts.kept_whole += batch.long_image_prompts
    dtype = next(model.parameters()).dtype  # pixel values in the model's precision (bf16 on a GPU)
    inputs = {k: v.to(dtype) if v.is_floating_point() else v for k, v in batch.inputs.items()}
    return generate_from_inputs(model, inputs, sampling, stops, pad_id, 1, seed)  # rows already repeated


def generate_from_inputs(model: Any, inputs: dict[str, torch.Tensor], sampling: Sampling, stops: list[int],
                         pad_id: int, num_return_sequences: int = 1, seed: int | None = None) -> list[list[int]]:
    """HF ``generate`` on one left-padded batch of model inputs (KV cache on) -> each row's answer ids, cut at
    the first stop token; ``seed`` seeds the batch (default: sampling.seed) without touching the caller's RNG."""
    width = inputs["input_ids"].shape[1]
    device = next(model.parameters()).device
    # Every field that matters is set, so that a checkpoint's own generation_config (often do_sample=True,
    # top_k=50) cannot change what was asked for; the sampling warpers are only applied when sampling.
    warpers = {"temperature": sampling.temperature, "top_p": sampling.top_p, "top_k": sampling.top_k}
    config = GenerationConfig(
        max_new_tokens=sampling.max_new_tokens,
        do_sample=sampling.do_sample,
        **(warpers if sampling.do_sample else {}),
        repetition_penalty=sampling.repetition_penalty,
        num_return_sequences=num_return_sequences,
        num_beams=1,
        eos_token_id=stops or None,
        pad_token_id=pad_id,
        use_cache=True,
    )
    was_training = model.training
    model.eval()
    # A forked RNG: seeding here must not change the caller's random stream (a trainer's dropout, data order).
    with torch.random.fork_rng(devices=[device.index or 0] if device.type == "cuda" else []):
        torch.manual_seed(sampling.seed if seed is None else seed)
        try:
            out = model.generate(
                **{k: v.to(device) for k, v in inputs.items()}, generation_config=config
            )  # (B * n, P + new)
        finally:
            model.train(was_training)
    answers: list[list[int]] = []
    stop_set = set(stops)
    for row in out[:, width:].tolist():
        cut = next((i for i, tok in enumerate(row) if tok in stop_set), len(row))
        answers.append(row[:cut])
    return answers


def encode_prompts(tokenizer: Any, prompts: Sequence[Sequence[Message]], max_prompt_length: int,
                   stats: Any = None) -> list[list[int]]:
    """Prompt token ids with the chat template's generation prompt, cut from the left (counted in ``stats``)."""
    return [encode_prompt(tokenizer, list(p), max_prompt_length, stats) for p in prompts]


def generate_batches(
    model: Any,
    tokenizer: Any,
    prompts: Sequence[PromptLike],
    sampling: Sampling,
    num_return_sequences: int = 1,
    batch_size: int = 8,
    progress: bool = False,
    desc: str = "generate",
) -> Iterable[tuple[int, list[str]]]:
    """Yield (index of the batch's first prompt, answers of the batch in prompt-major order), batch by batch.

    ``tokenizer`` is a vision-language model's processor for a vision-language model (prompts may then show
    images); a text tokenizer refuses prompts with images."""
    records = [as_record(p) for p in prompts]
    vision = is_processor(tokenizer)
    shown = sum(bool(r.images) for r in records)
    if shown and not vision:
        raise UserError(f"{shown} of {len(records)} prompts show images, which a text-only model cannot see; "
                        "give a vision-language model (and its processor) or text-only prompts")
    text_tokenizer = tokenizer.tokenizer if vision else tokenizer
    cuts = PromptCuts()
    bar = tqdm(total=len(records), desc=desc, unit="prompt", disable=not progress, dynamic_ncols=True)
    try:
        for start in range(0, len(records), batch_size):
            chunk = records[start:start + batch_size]
            seed = batch_seed(sampling.seed, (record_hash(r) for r in chunk))
            if vision:
                answer_ids = generate_image_token_ids(model, tokenizer, chunk, sampling, num_return_sequences,
                                                      seed=seed, cuts=cuts)
            else:
                ids = encode_prompts(tokenizer, [r.prompt for r in chunk], sampling.max_prompt_length, cuts)
                answer_ids = generate_token_ids(model, tokenizer, ids, sampling, num_return_sequences, seed=seed)
            texts = [text_tokenizer.decode(a, skip_special_tokens=True).strip() for a in answer_ids]
            bar.update(len(chunk))
            yield start, texts
    finally:
        bar.close()
        if cuts.prompt_truncated:
            print(f"[humanalign] {cuts.prompt_truncated} prompts were longer than max_prompt_length="
                  f"{sampling.max_prompt_length} tokens and lost their beginning")
        if cuts.kept_whole:
            print(f"[humanalign] {cuts.kept_whole} prompts with images were longer than max_prompt_length="
                  f"{sampling.max_prompt_length} tokens and were kept whole (a cut would cut their image tokens)")


def generate_responses(
    model: Any,
    tokenizer: Any,
    prompts: Sequence[PromptLike],
    *,
    num_return_sequences: int = 1,
    batch_size: int = 8,
    progress: bool = False,
    **sampling: Any,
) -> list[str]:
    """Answer each prompt (a message list, a plain user string, or a ``PromptRecord`` with images for a
    vision-language model and its processor) ``num_return_sequences`` times.

    ``sampling``: the fields of ``Sampling`` (max_new_tokens, do_sample, temperature, top_p, top_k,
    repetition_penalty, max_prompt_length, seed). Returns len(prompts) * num_return_sequences strings,
    prompt-major: [p0 s0, p0 s1, ..., p1 s0, ...].
    """
    params = Sampling(**sampling)
    out: list[str] = []
    for _, texts in generate_batches(model, tokenizer, prompts, params, num_return_sequences, batch_size, progress):
        out.extend(texts)
    return out


# ---------------------------------------------------------------------------------------------------- resumable file


def load_done(path: str | Path) -> dict[tuple[str, int], dict[str, Any]]:
    """Records already in a resumable output, keyed by (prompt hash, sample index).

    A last line cut short by a kill (no newline and not valid JSON) is removed from the file; any other bad line
    is an error, since it is not what an interrupted run leaves behind.
    """
    path = Path(path)
    if not path.exists():
        return {}
    data = path.read_bytes()
    end = data.rfind(b"\n") + 1
    tail = data[end:]
    if tail.strip():
        try:
            json.loads(tail.decode("utf-8"))
            with open(path, "ab") as fh:  # a complete record that only lacks its newline
                fh.write(b"\n")
            data += b"\n"
        except (json.JSONDecodeError, UnicodeDecodeError):
            print(f"[humanalign] {path}: dropped a truncated last line ({len(tail)} bytes) left by an interrupted run")
            with open(path, "r+b") as fh:
                fh.truncate(end)
            data = data[:end]
    done: dict[tuple[str, int], dict[str, Any]] = {}
    for line_no, raw in enumerate(data.split(b"\n"), start=1):
        if not raw.strip():
            continue
        try:
            rec = json.loads(raw.decode("utf-8"))
            prompt = prompt_from_jsonable(rec["prompt"])
            index = int(rec.get("sample_index", 0))
            # A prompt with images is known by the hash written beside it (its pictures need not be read again)
            key = str(rec["prompt_hash"]) if rec.get("images") else prompt_hash(prompt)
        except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError, ValueError) as exc:
            raise RecordError(path, line_no, None, f"not a generation record ({exc}); pass --overwrite to start over") \
                from None
        done[(key, index)] = rec
    return done


def _settings_path(output: Path) -> Path:
    return output.with_name(output.name + ".settings.json")


def _settings_diff(output: Path, settings: dict[str, Any]) -> list[str]:
    side = _settings_path(output)
    if not side.exists():
        return []
    try:
        old = json.loads(side.read_text(encoding="utf-8"))
    except json.JSONDecodeError:
        raise UserError(f"{side}: not valid JSON; pass --overwrite to start over") from None
    return [f"{k} {old.get(k)!r} -> {v!r}" for k, v in settings.items() if old.get(k) != v]


def generation_settings_match(output: str | Path, model_name: str, sampling: Sampling) -> bool:
    """Whether a resumable output was (or may be) written by this model with these decoding settings."""
    return not _settings_diff(Path(output), {"model": model_name, **asdict(sampling)})


def _check_settings(output: Path, settings: dict[str, Any]) -> None:
    diff = _settings_diff(output, settings)
    if diff:
        raise UserError(
            f"{output}: was generated with other settings ({', '.join(diff)}); "
            "pass --overwrite to start over or choose another output"
        )


def generate_to_file(
    model: Any,
    tokenizer: Any,
    prompts: Sequence[PromptLike],
    output: str | Path,
    model_name: str,
    sampling: Sampling,
    num_return_sequences: int = 1,
    batch_size: int = 8,
    overwrite: bool = False,
    progress: bool = True,
    on_batch: Callable[[int], None] | None = None,
    loader: Callable[[], tuple[Any, Any]] | None = None,
) -> dict[str, int]:
    """Answer every prompt ``num_return_sequences`` times into a resumable JSONL file (a prompt's images, if any,
    written beside each of its answers).

    Pass ``model`` and ``tokenizer``, or None for both and a ``loader`` returning them: it is called only when
    something is left to generate (a finished file loads no model), and the model is dropped on return.
    Returns counts: prompts, samples_total, samples_skipped (already there), samples_written.
    ``on_batch(n_written)`` is called after each flushed batch (tests use it to interrupt a run).
    """
    output = Path(output)
    settings = {"model": model_name, **asdict(sampling)}
    if not overwrite:
        _check_settings(output, settings)
    done = {} if overwrite else load_done(output)
    others = {str(r.get("model")) for r in done.values()} - {model_name}
    if others:
        raise UserError(f"{output}: holds answers of another model ({', '.join(sorted(others))}); pass --overwrite")

    records = [as_record(p) for p in prompts]
    hashes = [record_hash(r) for r in records]
    pending = [i for i, h in enumerate(hashes) if any((h, s) not in done for s in range(num_return_sequences))]
    skipped = sum((h, s) in done for h in hashes for s in range(num_return_sequences))
    if skipped:
        print(f"[humanalign] {output}: resuming, {skipped} answers already there, {len(pending)} prompts to go")
    written = 0
    if pending and model is None:  # before anything is written: a model that does not load changes no file
        if loader is None:
            raise ValueError("generate_to_file needs a model and tokenizer, or a loader")
        model, tokenizer = loader()
    if overwrite:
        for stale in (output, _settings_path(output)):
            if stale.exists():
                stale.unlink()
    output.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(_settings_path(output), settings)
    with open(output, "a", encoding="utf-8") as fh:
        batches = generate_batches(
            model, tokenizer, [records[i] for i in pending], sampling, num_return_sequences, batch_size, progress
        )
        for start, texts in batches:
            lines = []
            for j, text in enumerate(texts):
                idx = pending[start + j // num_return_sequences]
                sample = j % num_return_sequences
                if (hashes[idx], sample) in done:  # a prompt whose other samples were missing
                    continue
                rec = with_images({"prompt": prompt_to_jsonable(records[idx].prompt), "response": text,
                                   "model": model_name, "sample_index": sample, "prompt_hash": hashes[idx]},
                                  records[idx])
                lines.append(json.dumps(rec, ensure_ascii=False) + "\n")
            fh.write("".join(lines))
            fh.flush()
            os.fsync(fh.fileno())
            written += len(lines)
            if on_batch is not None:
                on_batch(written)
    return {"prompts": len(prompts), "samples_total": len(prompts) * num_return_sequences,
            "samples_skipped": skipped, "samples_written": written}


def responses_by_key(path: str | Path) -> dict[tuple[str, int], str]:
    """(prompt hash, sample index) -> response, from a generation file."""
    return {key: str(rec.get("response", "")) for key, rec in load_done(path).items()}


# ---------------------------------------------------------------------------------------------------- command


def require(value: Any, flag: str, command: str) -> Any:
    if value in (None, ""):
        raise UserError(f"`humanalign {command}` needs --{flag}")
    return value


def load_generator(name: str, settings: Any) -> tuple[Any, Any]:
    """(model, tokenizer) ready for generation: resolved path, eval mode, on the GPU when there is one. For a
    vision-language model: (model, its processor)."""
    if is_vision_model(name, settings):
        tokenizer = load_processor(name, settings)
        model = load_vision_lm(name, settings, trainable=False)
    else:
        path = resolve_model_path(name)
        tokenizer = load_tokenizer(path, settings)
        model = load_causal_lm(path, settings, trainable=False)
    if torch.cuda.is_available() and next(model.parameters()).device.type == "cpu":
        model = model.to("cuda")
    model.eval()
    return model, tokenizer


def run(cfg: Any) -> dict[str, int]:
    model_name = require(cfg.model, "model", "generate")
    prompts_file = require(cfg.prompts, "prompts", "generate")
    output = Path(require(cfg.output, "output", "generate"))
    prompts, duplicates = read_prompt_records(prompts_file, cfg.limit, max_images=prompt_image_limit(
        [model_name], cfg.model_settings, cfg.max_images_per_prompt))
    if duplicates:
        print(f"[humanalign] {prompts_file}: {duplicates} duplicate prompts skipped (each prompt is answered once)")
    check_takes_images(prompts, model_name, cfg.model_settings, prompts_file)
    stats = generate_to_file(
        None, None, prompts, output, model_name, Sampling.from_config(cfg),
        num_return_sequences=cfg.num_return_sequences, batch_size=cfg.batch_size, overwrite=cfg.overwrite,
        progress=cfg.progress_bar, loader=lambda: load_generator(model_name, cfg.model_settings),
    )
    print(f"[humanalign] {output}: {stats['samples_written']} answers written, "
          f"{stats['samples_skipped']} already there ({stats['prompts']} prompts x {cfg.num_return_sequences})")
    return stats
