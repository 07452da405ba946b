"""The embedded tiny model: a byte-level BPE tokenizer trained locally and a small random-init Llama.

Nothing is downloaded: the tokenizer is trained on local text (the demo data set by default) and the weights are
initialised from a seed, so the same seed and texts give the same bytes on every machine. The folder is an
ordinary Hugging Face model folder (config.json, model.safetensors, tokenizer.json, chat_template.jinja) that
plain ``AutoModelForCausalLM`` / ``AutoTokenizer`` load.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import shutil
import sys
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from humanalign.data.demo_data import demo_texts
from humanalign.data.io import atomic_write_json, iter_records, publish_dir
from humanalign.data.tokenize import CHAT_TEMPLATES
from humanalign.errors import UserError
from humanalign.models.pretrained import portable_tokenizer_config
from humanalign.paths import cache_dir

try:
    import fcntl
except ImportError:  # Windows: no advisory lock, the atomic rename alone keeps the folder whole
    fcntl = None

TINY_MODEL_NAME = "tiny-model-v1"  # bump when the recipe or the default corpus changes
PAD_TOKEN, IM_START, IM_END = "<|endoftext|>", "<|im_start|>", "<|im_end|>"
SPECIAL_TOKENS = (PAD_TOKEN, IM_START, IM_END)  # ids 0, 1, 2 (as in SmolLM2)
REQUIRED_FILES = ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json")


def _default_texts() -> list[str]:
    return demo_texts()


def train_tokenizer(texts: Sequence[str], vocab_size: int = 2048, model_max_length: int = 512):
    """Train a byte-level BPE tokenizer on ``texts``; returns a transformers fast tokenizer with ChatML.

    Byte-level means every string is encodable (no unknown token). ``<|endoftext|>`` pads, ``<|im_end|>`` ends an
    assistant turn and is the eos token, so generation stops at the end of a turn.
    """
    texts = [t for t in texts if isinstance(t, str) and t.strip()]
    if not texts:
        raise UserError("the tokenizer corpus holds no text")
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    backend.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        show_progress=False,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    backend.train_from_iterator(texts, trainer=trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        eos_token=IM_END,
        pad_token=PAD_TOKEN,
        additional_special_tokens=[IM_START],
        model_max_length=model_max_length,
        clean_up_tokenization_spaces=False,
    )
    tokenizer.chat_template = CHAT_TEMPLATES["chatml"]
    return tokenizer


def _check_target(output_dir: Path, overwrite: bool) -> None:
    if output_dir.exists() and not output_dir.is_dir():
        raise UserError(f"{output_dir}: exists and is not a folder")
    if output_dir.is_dir() and any(output_dir.iterdir()) and not overwrite:
        raise UserError(f"{output_dir}: folder is not empty (pass --overwrite to replace it)")


def build_tiny_model(
    output_dir: str | Path,
    *,
    texts: Sequence[str] | None = None,
    vocab_size: int = 2048,
    hidden_size: int = 64,
    num_layers: int = 2,
    num_heads: int = 4,
    num_kv_heads: int = 2,
    intermediate_size: int = 192,
    max_position_embeddings: int = 512,
    seed: int = 0,
    overwrite: bool = False,
) -> Path:
    """Build the tiny model into ``output_dir`` (written to a temporary folder, then renamed); returns the path."""
    output_dir = Path(output_dir)
    _check_target(output_dir, overwrite)
    if hidden_size % num_heads or num_heads % num_kv_heads:
        raise UserError(f"num_heads ({num_heads}) must divide hidden_size ({hidden_size}) "
                        f"and num_kv_heads ({num_kv_heads}) must divide num_heads")
    texts = list(_default_texts() if texts is None else texts)
    tokenizer = train_tokenizer(texts, vocab_size, max_position_embeddings)
    eos_id, pad_id = tokenizer.convert_tokens_to_ids(IM_END), tokenizer.convert_tokens_to_ids(PAD_TOKEN)
    config = LlamaConfig(
        vocab_size=len(tokenizer),  # exactly the trained vocabulary (a small corpus may give fewer merges)
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_kv_heads,
        max_position_embeddings=max_position_embeddings,
        tie_word_embeddings=True,
        bos_token_id=None,
        eos_token_id=eos_id,
        pad_token_id=pad_id,
    )
    # Forked RNG: seeding for the build must not change the caller's random stream.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config)
    model.generation_config = GenerationConfig(eos_token_id=eos_id, pad_token_id=pad_id, bos_token_id=None)

    output_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{output_dir.name}.", suffix=".tmp", dir=output_dir.parent))
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        portable_tokenizer_config(tmp)
        corpus_hash = hashlib.sha256("\x1e".join(texts).encode("utf-8")).hexdigest()
        atomic_write_json(tmp / "build_info.json", {
            "recipe": TINY_MODEL_NAME, "seed": seed, "parameters": sum(p.numel() for p in model.parameters()),
            "vocab_size": len(tokenizer), "requested_vocab_size": vocab_size, "corpus_texts": len(texts),
            "corpus_sha256": corpus_hash,
        })
        publish_dir(tmp, output_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return output_dir


def _is_complete(folder: Path) -> bool:
    return all((folder / name).is_file() for name in REQUIRED_FILES)


@contextlib.contextmanager
def _file_lock(path: Path) -> Iterator[None]:
    """An exclusive advisory lock (POSIX); elsewhere the atomic rename alone keeps the folder whole."""
    if fcntl is None:
        yield
        return
    with open(path, "a+") as fh:
        fcntl.flock(fh.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh.fileno(), fcntl.LOCK_UN)


def tiny_model_path() -> Path:
    """The default tiny model in the cache, built on first use (once, even with concurrent callers)."""
    final = cache_dir() / TINY_MODEL_NAME
    if _is_complete(final):
        return final
    with _file_lock(cache_dir() / f"{TINY_MODEL_NAME}.lock"):
        if not _is_complete(final):  # another process may have finished it while we waited
            print(f"[humanalign] building the tiny model into {final} (once)", file=sys.stderr)
            build_tiny_model(final, overwrite=True)
    return final


def _strings(value: Any) -> Iterator[str]:
    if isinstance(value, str):
        yield value
    elif isinstance(value, dict):
        for item in value.values():
            yield from _strings(item)
    elif isinstance(value, (list, tuple)):
        for item in value:
            yield from _strings(item)


def read_corpus(path: str | Path) -> list[str]:
    """Texts for the tokenizer: lines of a .txt file, or every string field of a data file's records."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: corpus file not found")
    if path.suffix.lower() == ".txt":
        try:
            lines = path.read_text(encoding="utf-8").splitlines()
        except UnicodeDecodeError:
            raise UserError(f"{path}: not UTF-8 text") from None
        return [line for line in lines if line.strip()]
    return [text for _, record in iter_records(path) for text in _strings(record) if text.strip()]


def run(cfg) -> Path:
    """`humanalign tiny-model`: build the tiny model into cfg.output_dir."""
    texts = read_corpus(cfg.corpus) if cfg.corpus else None
    path = build_tiny_model(
        cfg.output_dir, texts=texts, vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size,
        num_layers=cfg.num_layers, num_heads=cfg.num_heads, num_kv_heads=cfg.num_kv_heads,
        intermediate_size=cfg.intermediate_size, max_position_embeddings=cfg.max_position_embeddings,
        seed=cfg.seed, overwrite=cfg.overwrite,
    )
    info = json.loads((path / "build_info.json").read_text(encoding="utf-8"))
    print(f"tiny model written to {path}: {info['parameters']:,} parameters, vocabulary {info['vocab_size']} "
          f"(tokenizer trained on {info['corpus_texts']} texts)")
    return path


__all__ = ["build_tiny_model", "tiny_model_path", "train_tokenizer", "read_corpus", "run", "TINY_MODEL_NAME"]
