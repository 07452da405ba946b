"""The online trainers' test world: a word-level tiny Llama whose optimum is known, its prompts, and a run of a
trainer on two CPU processes (torchrun, gloo). Shared by the PPO, GRPO and GRPO-distributed tests."""

from __future__ import annotations

import json
import os
import random
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import torch

WORDS = ["good", "bad", "ok", "yes", "no", "maybe", "cat", "dog", "red", "blue", "sun", "moon", "tree", "car",
         "book", "fish", "say", "something", "please", "hello", "a", "word"]


def build_word_model(folder: Path, seed: int = 0) -> Path:
    """A ChatML word-level tokenizer over WORDS and a random one-layer Llama on it (an HF model folder)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    from humanalign.data.tokenize import CHAT_TEMPLATES

    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "[UNK]"]
    vocab = {t: i for i, t in enumerate(specials + ["user", "assistant", "system"] + WORDS)}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                        unk_token="[UNK]", additional_special_tokens=["<|im_start|>"])
    tokenizer.chat_template = CHAT_TEMPLATES["chatml"]
    config = LlamaConfig(vocab_size=len(vocab), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=128,
                         tie_word_embeddings=True, eos_token_id=2, pad_token_id=0, bos_token_id=None)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config)
    model.generation_config = GenerationConfig(eos_token_id=2, pad_token_id=0, bos_token_id=None)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def write_word_prompts(path: Path, n: int = 64, seed: int = 0, words: tuple[int, int] = (2, 5)) -> Path:
    """``n`` prompts of ``words`` (min, max) random WORDS each, one JSON record per line."""
    rng = random.Random(seed)
    path.write_text("".join(json.dumps({"prompt": " ".join(rng.choice(WORDS) for _ in range(rng.randint(*words)))})
                            + "\n" for _ in range(n)))
    return path


def run_on_two_processes(driver: str, values: dict, folder: Path, timeout: int) -> Path:
    """Run the Python ``driver`` (argv: the values file, the folder it writes rank0/1.json into) under
    ``torchrun --nproc_per_node 2``; returns that folder. Fails the test with the log's tail on a non-zero exit."""
    states = folder / "states"
    states.mkdir()
    (folder / "values.json").write_text(json.dumps(values))
    (folder / "driver.py").write_text(driver)
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    torchrun = shutil.which("torchrun") or str(Path(sys.executable).with_name("torchrun"))
    done = subprocess.run([torchrun, "--nproc_per_node", "2", "--master_port", str(port), str(folder / "driver.py"),
                           str(folder / "values.json"), str(states)], capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"})
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return states
