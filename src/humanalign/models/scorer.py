"""Score text with a reward or cost model: batched, no grad, and cached on disk per model and text.

A ``Scorer`` takes *text* (prompt messages + response strings), never another model's token ids: it renders
them with the score model's own tokenizer and chat template (``encode_score_input``, the same function the
reward-model trainer uses), so a policy with a different tokenizer can be judged. Sequences are sorted by
length before batching (less padding), padded on the right, and the scores come back in input order.

``cached_score`` / ``cached_score_pairs`` keep every score in an SQLite file under
``paths.cache_dir()/scores/<model fingerprint>.sqlite``; the fingerprint hashes the model's config and
tokenizer files and the names, sizes and modification times of its weight files, so a retrained model (new
weight files) never reuses old scores while a data set scored once is not scored again.
"""

from __future__ import annotations

import hashlib
import json
import sqlite3
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from humanalign.data.records import Message, prompt_from_jsonable
from humanalign.data.tokenize import TruncationStats, pad_sequences, render_prompt
from humanalign.data.vision_collate import VisionPairCollator, tokenize_vision_pair
from humanalign.errors import UserError
from humanalign.models.load import resolve_model_path
from humanalign.models.score_model import ScoreModel, encode_score_input, load_score_model, read_score_config
from humanalign.models.vision_score import VisionScoreModel, is_vision_score_dir, load_vision_score_model
from humanalign.paths import cache_dir

DEFAULT_MAX_LENGTH = 512
PromptLike = str | Sequence[Message]

# files whose content decides what a model computes (metrics, logs and README changes do not matter)
_HASHED_BY_CONTENT = ("config.json", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                      "added_tokens.json", "chat_template.jinja", "chat_template.json", "vocab.txt", "vocab.json",
                      "merges.txt", "tokenizer.model", "spiece.model", "model.safetensors.index.json")
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".gguf", ".pt")


def model_fingerprint(model_dir: str | Path) -> str:
    """sha256 over config/tokenizer file contents and each weight file's name, size and mtime (ns).

    Weights are not read (a 7B model would take a minute); a save rewrites them, which changes their mtime.
    """
    model_dir = Path(model_dir)
    digest = hashlib.sha256()
    for path in sorted(p for p in model_dir.iterdir() if p.is_file()):
        if path.name in _HASHED_BY_CONTENT:
            digest.update(f"{path.name}\0".encode())
            digest.update(path.read_bytes())
        elif path.name.endswith(_WEIGHT_SUFFIXES):
            stat = path.stat()
            digest.update(f"{path.name}\0{stat.st_size}\0{stat.st_mtime_ns}\0".encode())
    return digest.hexdigest()


def _position_limit(model: ScoreModel, tokenizer) -> int:
    """Longest input an encoder can read (learned absolute positions); decoders are not capped here."""
    if not model.is_encoder:
        return sys.maxsize
    limits = [getattr(model.config, "max_position_embeddings", None), getattr(tokenizer, "model_max_length", None)]
    limits = [int(x) for x in limits if isinstance(x, int) and 8 <= x < 1_000_000]
    return min(limits, default=sys.maxsize)


def _as_prompt(prompt: PromptLike) -> list[Message]:
    return prompt_from_jsonable(prompt if isinstance(prompt, str) else list(prompt))


class Scorer:
    """Scores (prompt, response) texts with a ``ScoreModel``; see the module docstring."""

    def __init__(self, model: ScoreModel, tokenizer, device: torch.device | str | None = None, batch_size: int = 32,
                 max_length: int = DEFAULT_MAX_LENGTH, max_prompt_length: int | None = None,
                 normalize: bool = False, fingerprint: str | None = None, progress: bool = True):
        # pad with the id the end-score rule treats as padding (the model config's; ours equal the tokenizer's)
        self.pad_token_id = model.pad_token_id if model.pad_token_id is not None else tokenizer.pad_token_id
        if self.pad_token_id is None:
            raise ValueError("the score model has no pad token id")
        self.device = torch.device(device) if device is not None else next(model.parameters()).device
        self.model = model.to(self.device).eval()
        self.tokenizer = tokenizer
        self.batch_size = int(batch_size)
        self.max_length = min(int(max_length), _position_limit(model, tokenizer))
        if max_prompt_length is None or max_prompt_length >= self.max_length:
            max_prompt_length = self.max_length // 2
        self.max_prompt_length = int(max_prompt_length)
        self.normalize = bool(normalize)
        self.fingerprint = fingerprint
        self.progress = progress
        self.stats = TruncationStats()
        self.forward_calls = 0  # batches run through the model (tests check the cache with it)

    @property
    def score_type(self) -> str:
        return self.model.score_type

    def settings_key(self) -> dict[str, Any]:
        """What, besides the model and the text, changes a score (part of every cache key)."""
        return {"max_length": self.max_length, "max_prompt_length": self.max_prompt_length,
                "normalize": self.normalize}

    def encode(self, prompt: PromptLike, response: str) -> list[int]:
        """Token ids of one (prompt, response) for this score model; an answer with no room is scored empty."""
        encoded = encode_score_input(self.tokenizer, _as_prompt(prompt), response, self.max_length,
                                     self.max_prompt_length, encoder=self.model.is_encoder, stats=self.stats)
        if encoded is None:  # nothing of the answer fits: score the prompt alone (still a defined score)
            encoded = encode_score_input(self.tokenizer, _as_prompt(prompt), "", self.max_length,
                                         self.max_prompt_length, encoder=self.model.is_encoder)
        if encoded is None:  # an empty answer under a template that adds no end-of-turn token (BERT's pair
            return self._prompt_only(prompt)  # template): the prompt alone, its score defined and finite
        return encoded["input_ids"]

    def _prompt_only(self, prompt: PromptLike) -> list[int]:
        """The rendered prompt's last tokens (the answer side empty), wrapped as ``encode_score_input`` wraps."""
        tokenizer = self.tokenizer
        cls_id, sep_id = tokenizer.cls_token_id, tokenizer.sep_token_id
        wrap = self.model.is_encoder and cls_id is not None
        tail = [sep_id] if wrap and sep_id is not None else []
        ids = tokenizer(render_prompt(tokenizer, _as_prompt(prompt)), add_special_tokens=False)["input_ids"]
        ids = list(ids)[-max(1, self.max_length - 1 - len(tail)):] if ids else [tokenizer.pad_token_id or 0]
        return [cls_id, *ids, *tail] if wrap else ids

    @torch.inference_mode()
    def score_ids(self, sequences: Sequence[Sequence[int]], batch_size: int | None = None) -> list[float]:
        """End scores of already-encoded sequences, in input order (longest first internally)."""
        batch_size = int(batch_size or self.batch_size)
        order = sorted(range(len(sequences)), key=lambda i: -len(sequences[i]))
        out: list[float] = [float("nan")] * len(sequences)
        starts = range(0, len(order), batch_size)
        bar = None
        if self.progress and len(starts) > 1:
            bar = tqdm(total=len(order), desc="scoring", unit="seq", file=sys.stderr, leave=False)
        for start in starts:
            idx = order[start : start + batch_size]
            seqs = [sequences[i] for i in idx]
            input_ids = pad_sequences(seqs, self.pad_token_id, "right").to(self.device)  # (B, T)
            attention_mask = pad_sequences([[1] * len(s) for s in seqs], 0, "right").to(self.device)  # (B, T)
            result = self.model(input_ids=input_ids, attention_mask=attention_mask, normalize=self.normalize)
            self.forward_calls += 1
            for i, value in zip(idx, result.end_scores.float().cpu().tolist()):
                out[i] = float(value)
            if bar is not None:
                bar.update(len(idx))
        if bar is not None:
            bar.close()
        return out

    def score(self, prompts: Sequence[PromptLike], responses: Sequence[str], batch_size: int | None = None) -> list[float]:
        """One score per (prompt, response); a prompt is a message list or a plain user string."""
        if len(prompts) != len(responses):
            raise ValueError(f"{len(prompts)} prompts but {len(responses)} responses")
        encoded = [tuple(self.encode(p, r)) for p, r in zip(prompts, responses)]
        unique = list(dict.fromkeys(encoded))  # identical inputs are scored once
        values = dict(zip(unique, self.score_ids(unique, batch_size)))
        return [values[e] for e in encoded]

    def score_pairs(self, pairs: Sequence[Any], batch_size: int | None = None) -> tuple[list[float], list[float]]:
        """(chosen scores, rejected scores) of preference pairs (anything with prompt / chosen / rejected)."""
        prompts = [p.prompt for p in pairs]
        scores = self.score(prompts + prompts, [p.chosen for p in pairs] + [p.rejected for p in pairs], batch_size)
        return scores[: len(pairs)], scores[len(pairs) :]


class VisionScorer:
    """Scores preference pairs with images with a ``VisionScoreModel``: each pair tokenised by the model's
    processor exactly as `train rm` tokenised it (``tokenize_vision_pair``), batched by ``VisionPairCollator``.
    Scores are not cached on disk (the cache keys hold no images). A pair that cannot be tokenised (its prompt
    alone reaches ``max_length``) scores NaN, counted in ``skipped``."""

    def __init__(self, model: VisionScoreModel, processor, device: torch.device | str | None = None,
                 batch_size: int = 8, max_length: int = DEFAULT_MAX_LENGTH, normalize: bool = False):
        self.device = torch.device(device) if device is not None else next(model.parameters()).device
        self.model, self.processor = model.to(self.device).eval(), processor
        self.batch_size, self.max_length, self.normalize = int(batch_size), int(max_length), bool(normalize)
        self.max_prompt_length = None  # the prompt (with its image tokens) is never cut
        self.stats = TruncationStats()
        self.skipped: dict[str, int] = {}
        self.fingerprint = None
        self.forward_calls = 0

    @property
    def score_type(self) -> str:
        return self.model.score_type

    def score(self, prompts, responses, batch_size=None) -> list[float]:
        raise UserError("a vision-language score model scores preference pairs (with their images), not loose "
                        "(prompt, response) texts")

    @torch.inference_mode()
    def score_pairs(self, pairs: Sequence[Any], batch_size: int | None = None) -> tuple[list[float], list[float]]:
        """(chosen scores, rejected scores) of preference pairs with their images, in input order."""
        batch_size = int(batch_size or self.batch_size)
        collate = VisionPairCollator(self.processor.tokenizer.pad_token_id)
        chosen, rejected = [float("nan")] * len(pairs), [float("nan")] * len(pairs)
        examples = []
        for i, pair in enumerate(pairs):
            out = tokenize_vision_pair(pair, self.processor, self.max_length)
            if isinstance(out, str):
                self.skipped[out] = self.skipped.get(out, 0) + 1
            else:
                examples.append((i, out))
        for start in range(0, len(examples), batch_size):
            chunk = examples[start:start + batch_size]
            batch = collate([e for _, e in chunk])
            batch.pop("labels", None)
            batch = {k: v.to(self.device) for k, v in batch.items()}
            end = self.model(normalize=self.normalize, **batch).end_scores.float().cpu().tolist()  # (2B,)
            self.forward_calls += 1
            for k, (i, _) in enumerate(chunk):
                chosen[i], rejected[i] = end[k], end[len(chunk) + k]
        return chosen, rejected


def load_scorer(model_dir: str, device: torch.device | str | None = None, batch_size: int = 32,
                max_length: int | None = None, max_prompt_length: int | None = None, normalize: bool = False,
                settings=None, progress: bool = True) -> Scorer | VisionScorer:
    """A ``Scorer`` for a saved score model (folder or preset name; a bare backbone is refused); a
    ``VisionScorer`` for a vision-language one (``models.vision_score``).

    ``max_length`` / ``max_prompt_length`` default to the values the model was trained with (when its
    config records them), else 512 and half of it. ``device`` defaults to CUDA when available; the dtype comes
    from ``settings.dtype`` (auto: bf16 on a GPU that supports it, fp32 on the CPU: the model only scores).
    """
    device = torch.device(device) if device is not None else torch.device("cuda" if torch.cuda.is_available() else "cpu")
    local = Path(str(resolve_model_path(model_dir)))
    block = read_score_config(local) or {}
    if is_vision_score_dir(local):
        vision_model, processor = load_vision_score_model(model_dir, settings, allow_new_head=False, device=device,
                                                          trainable=False)
        return VisionScorer(vision_model, processor, device=device, batch_size=batch_size,
                            max_length=max_length or int(block.get("max_length") or DEFAULT_MAX_LENGTH),
                            normalize=normalize)
    model, tokenizer = load_score_model(model_dir, settings, allow_new_head=False, device=device, trainable=False)
    if max_length is None:
        max_length = int(block.get("max_length") or DEFAULT_MAX_LENGTH)
        if max_prompt_length is None and block.get("max_prompt_length"):
            max_prompt_length = int(block["max_prompt_length"])
    fingerprint = model_fingerprint(local) if local.is_dir() else None
    return Scorer(model, tokenizer, device=device, batch_size=batch_size, max_length=max_length,
                  max_prompt_length=max_prompt_length, normalize=normalize, fingerprint=fingerprint,
                  progress=progress)


# --------------------------------------------------------------------------------------------- disk cache


class ScoreCache:
    """Scores of one model, keyed by a hash of (text, scorer settings), in an SQLite file."""

    def __init__(self, fingerprint: str, root: str | Path | None = None):
        root = Path(root) if root is not None else cache_dir() / "scores"
        root.mkdir(parents=True, exist_ok=True)
        self.path = root / f"{fingerprint[:40]}.sqlite"
        self._conn = sqlite3.connect(self.path, timeout=60)
        with self._conn:
            self._conn.execute("CREATE TABLE IF NOT EXISTS scores (key TEXT PRIMARY KEY, value REAL NOT NULL)")

    @staticmethod
    def key(prompt: PromptLike, response: str, settings: dict[str, Any]) -> str:
        payload = json.dumps([_as_prompt(prompt), response, settings], ensure_ascii=False, sort_keys=True)
        return hashlib.sha256(payload.encode("utf-8")).hexdigest()

    def get_many(self, keys: Sequence[str]) -> dict[str, float]:
        found: dict[str, float] = {}
        unique = list(dict.fromkeys(keys))
        for start in range(0, len(unique), 500):
            chunk = unique[start : start + 500]
            marks = ",".join("?" * len(chunk))
            rows = self._conn.execute(f"SELECT key, value FROM scores WHERE key IN ({marks})", chunk)
            found.update({k: float(v) for k, v in rows})
        return found

    def put_many(self, items: dict[str, float]) -> None:
        finite = [(k, v) for k, v in items.items() if v == v and abs(v) != float("inf")]  # NaN/inf: never cached
        with self._conn:
            self._conn.executemany("INSERT OR REPLACE INTO scores (key, value) VALUES (?, ?)", finite)

    def close(self) -> None:
        self._conn.close()


def cached_score(scorer: Scorer, prompts: Sequence[PromptLike], responses: Sequence[str],
                 cache_root: str | Path | None = None) -> list[float]:
    """``scorer.score`` through the disk cache: only texts this model never scored go through the model.

    A scorer built around an in-memory model (no fingerprint) scores everything, uncached.
    """
    if len(prompts) != len(responses):
        raise ValueError(f"{len(prompts)} prompts but {len(responses)} responses")
    if scorer.fingerprint is None:
        return scorer.score(prompts, responses)
    cache = ScoreCache(scorer.fingerprint, cache_root)
    try:
        settings = scorer.settings_key()
        keys = [ScoreCache.key(p, r, settings) for p, r in zip(prompts, responses)]
        known = cache.get_many(keys)
        missing = [i for i, k in enumerate(keys) if k not in known]
        if missing:
            fresh = scorer.score([prompts[i] for i in missing], [responses[i] for i in missing])
            new = {keys[i]: value for i, value in zip(missing, fresh)}
            cache.put_many(new)
            known.update(new)
        return [known[k] for k in keys]
    finally:
        cache.close()


def cached_score_pairs(scorer: Scorer, pairs: Sequence[Any],
                       cache_root: str | Path | None = None) -> tuple[list[float], list[float]]:
    """(chosen scores, rejected scores) of preference pairs, through the disk cache (a ``VisionScorer``
    scores them uncached: the cache keys hold no images)."""
    if isinstance(scorer, VisionScorer):
        return scorer.score_pairs(pairs)
    prompts = [p.prompt for p in pairs]
    scores = cached_score(scorer, prompts + prompts, [p.chosen for p in pairs] + [p.rejected for p in pairs],
                          cache_root)
    return scores[: len(pairs)], scores[len(pairs) :]


__all__ = ["Scorer", "VisionScorer", "load_scorer", "model_fingerprint", "ScoreCache", "cached_score", "cached_score_pairs"]
