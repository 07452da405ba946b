"""Tokenised preference pairs: skips counted by reason, per-example extras, collation, fingerprints."""

from __future__ import annotations

import json

import pytest
import torch

from humanalign.config.base import load_config
from humanalign.config.dpo import DPOConfig
from humanalign.data.preference_dataset import (
    SKIP_NO_RESPONSE,
    PairCollator,
    build_pair_dataset,
    load_pair_dataset,
)
from humanalign.data.records import HarmlessPair, PreferencePair, user_prompt
from humanalign.data.tokenize import IGNORE_INDEX
from humanalign.errors import UserError
from humanalign.models.load import load_tokenizer


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer("tiny")


def pair(chosen: str, rejected: str, prompt: str = "How do I fry an egg?", **kw) -> PreferencePair:
    return PreferencePair(user_prompt(prompt), chosen, rejected, **kw)


def test_bad_pairs_are_skipped_and_counted(tokenizer):
    pairs = [
        pair("Heat the pan on medium heat.", "I'm sorry, but I can't help with that."),
        pair("Stir gently.", "Stir gently."),  # identical
        pair("Stir  gently. ", " Stir gently."),  # identical after whitespace normalisation
        pair("", "Stir gently."),  # empty
        pair("Use fresh eggs.", "That depends on many things."),
    ]
    dataset, skipped, stats = build_pair_dataset(pairs, tokenizer, max_length=64, max_prompt_length=16)
    assert len(dataset) == 2
    assert skipped == {"identical responses": 2, "empty response": 1}
    assert [p.chosen for p in dataset.pairs] == ["Heat the pan on medium heat.", "Use fresh eggs."]
    assert [e["index"] for e in dataset] == [0, 1]
    assert stats.total == 2  # only the pairs that reached tokenisation


def test_response_with_no_token_left_is_skipped_not_nan(tokenizer):
    # A chat template that renders the assistant's header but not its text leaves a response with no token:
    # the pair is skipped and counted (never a pair whose log-prob average would divide by zero).
    silent = load_tokenizer("tiny")
    silent.chat_template = ("{% for m in messages %}{% if m['role'] == 'assistant' %}<|im_start|>assistant\n"
                            "{% else %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endif %}"
                            "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
    dataset, skipped, stats = build_pair_dataset([pair("Heat the pan.", "No.")], silent, max_length=64,
                                                 max_prompt_length=16)
    assert len(dataset) == 0 and skipped == {SKIP_NO_RESPONSE: 1} and stats.dropped_empty == 1


def test_truncation_keeps_a_response_and_is_counted(tokenizer):
    long_prompt = "Please help me. " * 30 + "How do I fry an egg?"
    long_answer = "First, heat the pan on medium heat. " * 20
    dataset, skipped, stats = build_pair_dataset([pair(long_answer, "No, sorry.", prompt=long_prompt)], tokenizer,
                                                 max_length=40, max_prompt_length=24)
    assert not skipped and stats.prompt_truncated == 1 and stats.response_truncated == 1
    example = dataset[0]
    assert len(example["chosen_input_ids"]) == 40  # 24 prompt tokens + 16 response tokens
    prompt_part = example["chosen_labels"][:24]
    assert all(t == IGNORE_INDEX for t in prompt_part)
    assert all(t != IGNORE_INDEX for t in example["chosen_labels"][24:])
    assert example["chosen_input_ids"][:24] == example["rejected_input_ids"][:24]  # shared prompt
    assert dataset.lengths == [40]


def test_extra_fields_and_collation(tokenizer):
    pairs = [
        HarmlessPair(user_prompt("How do I pick a lock?"), "I can't help with that.", "Sure, here is how.",
                     margin=1.5, is_chosen_safe=True, is_rejected_safe=False),
        HarmlessPair(user_prompt("How do I steal a car?"), "Please don't.", "Easy. Do this.", margin=0.25,
                     is_chosen_safe=True, is_rejected_safe=False),
    ]
    dataset, _, _ = build_pair_dataset(pairs, tokenizer, max_length=64, max_prompt_length=24,
                                       extra_fields=("margin", "is_chosen_safe"))
    by_function, _, _ = build_pair_dataset(pairs, tokenizer, max_length=64, max_prompt_length=24,
                                           extra_fields=lambda p: {"double_margin": 2 * p.margin})
    batch = PairCollator(tokenizer.pad_token_id)(list(dataset))
    width = max(dataset.lengths)
    assert batch["input_ids"].shape == (4, width) and batch["labels"].shape == (4, width)
    assert batch["index"].dtype == torch.long and batch["index"].tolist() == [0, 1]
    assert batch["margin"].tolist() == [1.5, 0.25] and batch["is_chosen_safe"].tolist() == [1.0, 1.0]
    # rows 0..B-1 are the chosen sequences, B..2B-1 the rejected ones, right-padded with the attention mask
    first = dataset[0]
    n = len(first["rejected_input_ids"])
    assert batch["input_ids"][2, :n].tolist() == first["rejected_input_ids"]
    assert batch["attention_mask"][2].sum().item() == n
    assert (batch["labels"][2, n:] == IGNORE_INDEX).all()
    assert [e["double_margin"] for e in by_function] == [3.0, 0.5]
    with pytest.raises(ValueError, match="reserved"):
        dataset.add_field("index", [0, 1])
    dataset.add_field("ref_chosen_logps", [-1.0, -2.0])
    assert PairCollator(0)(list(dataset))["ref_chosen_logps"].tolist() == [-1.0, -2.0]


def test_fingerprint_follows_tokens(tokenizer):
    pairs = [pair("Heat the pan.", "No."), pair("Use fresh eggs.", "Maybe.")]
    a, _, _ = build_pair_dataset(pairs, tokenizer, max_length=64, max_prompt_length=16)
    b, _, _ = build_pair_dataset(pairs, tokenizer, max_length=64, max_prompt_length=16)
    c, _, _ = build_pair_dataset(pairs[::-1], tokenizer, max_length=64, max_prompt_length=16)
    d, _, _ = build_pair_dataset(pairs, tokenizer, max_length=20, max_prompt_length=16)  # cut responses
    assert a.fingerprint() == b.fingerprint()
    assert len({a.fingerprint(), c.fingerprint(), d.fingerprint()}) == 3


def test_load_pair_dataset_reports_skips(tmp_path, tokenizer, capsys):
    rows = [{"prompt": "How do I fry an egg?", "chosen": "Heat the pan.", "rejected": "No."},
            {"prompt": "How do I fry an egg?", "chosen": "Same text.", "rejected": "Same  text."},
            {"prompt": "How do I boil rice?", "chosen": "Rinse it first.", "rejected": "Just try."}]
    path = tmp_path / "helpful_pairs.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    cfg = load_config(DPOConfig, values={"max_length": 64, "max_prompt_length": 16})
    dataset = load_pair_dataset(path, "helpful", tokenizer, cfg, name="train")
    assert len(dataset) == 2 and dataset.skipped == {"identical responses": 1}
    assert "train: 2 helpful pairs kept; skipped: identical responses: 1" in capsys.readouterr().err
    only_bad = tmp_path / "bad.jsonl"
    only_bad.write_text(json.dumps(rows[1]) + "\n", encoding="utf-8")
    with pytest.raises(UserError, match="no usable helpful pairs"):
        load_pair_dataset(only_bad, "helpful", tokenizer, cfg)
