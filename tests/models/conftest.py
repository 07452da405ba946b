"""Fixtures shared by the pair-forward tests (test_logprobs_layouts.py, test_kl.py)."""

from __future__ import annotations

import pytest

from humanalign.data.records import PreferencePair, user_prompt

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
