"""Fixtures shared by the pair-forward tests (test_logprobs_layouts.py, test_kl.py) and the score-model tests
(test_score_model.py, test_score_model_shared.py, test_calibration.py)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import AutoTokenizer, BertConfig, BertModel

from humanalign.data.records import PreferencePair, user_prompt
from humanalign.models.load import resolve_model_path
from humanalign.models.tiny import build_tiny_model

# Three pairs of unequal prompt and response lengths: the shared and padded layouts both get work to do.
PAIRS = [
    PreferencePair(user_prompt("How do I bake simple bread?"),
                   "First, wash and measure the ingredients. Then, let it rest before serving.",
                   "I'm sorry, but I can't help with that."),
    PreferencePair(user_prompt("How can I sort a list?"), "Use the sorted function.",
                   "That depends on many things. You could search online for more information about programming."),
    PreferencePair(user_prompt("Hi"), "Hello there!", "Go away."),
]


@pytest.fixture(scope="module")
def pair_batch():
    """(the tokenised PAIRS for the tiny model's tokenizer, their collated batch)."""
    from humanalign.data.preference_dataset import PairCollator, build_pair_dataset
    from humanalign.models.load import load_tokenizer

    tokenizer = load_tokenizer("tiny")
    dataset, _, _ = build_pair_dataset(PAIRS, tokenizer, max_length=96, max_prompt_length=32)
    return dataset, PairCollator(tokenizer.pad_token_id)(list(dataset))


# what the score-model backbones' tokenizer is trained on
SCORE_TEXTS = ["Hello there, how are you doing today?", "The quick brown fox jumps over the lazy dog.",
               "I cannot help with that request, it could hurt someone.", "Here is a recipe for a cake."] * 10


@pytest.fixture(scope="module")
def decoder_dir(tmp_path_factory) -> Path:
    """A 2-layer Llama causal LM (hidden 16; its score head has no bias) with a byte-level BPE tokenizer; pad
    <|endoftext|> != eos."""
    return build_tiny_model(tmp_path_factory.mktemp("dec") / "tiny", texts=SCORE_TEXTS, vocab_size=300,
                            hidden_size=16, num_layers=2, num_heads=2, num_kv_heads=1, intermediate_size=32, seed=1)


@pytest.fixture(scope="module")
def encoder_dir(tmp_path_factory) -> Path:
    """A 2-layer BERT backbone (BertModel, no head; its classifier gets a bias) with the all-MiniLM-L6-v2
    WordPiece tokenizer."""
    folder = tmp_path_factory.mktemp("enc") / "bert"
    torch.manual_seed(0)
    BertModel(BertConfig(vocab_size=30522, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                         intermediate_size=64, max_position_embeddings=128)).save_pretrained(folder)
    AutoTokenizer.from_pretrained(resolve_model_path("minilm-l6-v2")).save_pretrained(folder)
    return folder
