"""SFT: the loss, packing boundaries, reading every data shape, and whole runs on the tiny model."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from humanalign.cli import main
from humanalign.config.base import load_config
from humanalign.config.sft import SFTConfig
from humanalign.data.io import atomic_write_jsonl, read_jsonl
from humanalign.data.tokenize import IGNORE_INDEX, collate_sft, encode_conversation
from humanalign.losses.sft import sft_loss_sums
from humanalign.trainers.sft import (
    collate_packed,
    load_conversations,
    pack_examples,
    prepare_data,
)

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def demo_data(tmp_path_factory) -> Path:
    """Prepared demo data: {train,val,test}/{helpful,harmless}_pairs.jsonl from 600 PKU-SafeRLHF-shaped records."""
    from humanalign.config.data import PrepareDataConfig
    from humanalign.data.demo_data import write_demo_raw
    from humanalign.data.prepare import run as prepare

    root = tmp_path_factory.mktemp("sft_data")
    raw = write_demo_raw(root / "raw", n=600, seed=0)
    prepare(load_config(PrepareDataConfig, values={"input_dir": str(raw.parent), "output_dir": str(root / "data"),
                                                   "seed": 0}))
    return root / "data"


@pytest.fixture(scope="module")
def tiny():
    from humanalign.models.load import load_causal_lm, load_tokenizer, resolve_model_path

    path = resolve_model_path("tiny")
    return load_causal_lm(path, trainable=False), load_tokenizer(path)


def conversation(i: int) -> list[dict[str, str]]:
    return [{"role": "user", "content": f"Question number {i}: how do I water a plant?" + " Quickly." * i},
            {"role": "assistant", "content": f"Answer {i}: water it a little every {i + 2} days." + " Really." * i}]


# ----------------------------------------------------------------------------------------------- loss, packing


def test_sft_loss_sums_only_target_tokens():
    # Vocabulary of 2, uniform logits: every target costs ln 2. Row 0 targets tokens 2 and 3, row 1 token 3.
    logits = torch.zeros(2, 4, 2)
    labels = torch.tensor([[IGNORE_INDEX, IGNORE_INDEX, 1, 0], [IGNORE_INDEX, IGNORE_INDEX, IGNORE_INDEX, 1]])
    sums, counts = sft_loss_sums(logits, labels)
    assert counts.tolist() == [2, 1]
    assert sums.tolist() == pytest.approx([2 * math.log(2), math.log(2)])
    logits[0, 1, 1] = 10.0  # position 1 predicts the token at 2 (label 1) almost surely
    sums, _ = sft_loss_sums(logits, labels)
    assert sums[0].item() == pytest.approx(math.log(1 + math.exp(-10)) + math.log(2), rel=1e-5)


def test_pack_examples_best_fit_decreasing():
    lengths = [5, 4, 3, 3, 2, 1]
    feats = [{"input_ids": [10 + i] * n, "labels": [20 + i] * n} for i, n in enumerate(lengths)]
    rows = pack_examples(feats, max_length=8)
    # 5 opens row 0 (room 3); 4 opens row 1 (room 4); 3 fills row 0; 3 -> row 1 (room 1); 2 opens row 2; 1 -> row 1
    assert [r["input_ids"] for r in rows] == [[10] * 5 + [12] * 3, [11] * 4 + [13] * 3 + [15], [14] * 2]
    assert rows[1]["position_ids"] == [0, 1, 2, 3, 0, 1, 2, 0]
    assert rows[1]["labels"] == [-100, 21, 21, 21, -100, 23, 23, -100]  # no example's first token is a target
    batch = collate_packed(rows, pad_token_id=0)
    assert batch["input_ids"].shape == (3, 8) and "attention_mask" not in batch
    assert batch["position_ids"][2].tolist() == [0, 1, 0, 1, 2, 3, 4, 5]  # the pad tail is its own segment
    assert batch["labels"][2, 2:].tolist() == [-100] * 6


def test_a_packed_row_scores_like_its_examples_apart(tiny):
    model, tokenizer = tiny
    feats = [encode_conversation(tokenizer, conversation(i), 128) for i in range(3)]
    apart = collate_sft(feats, tokenizer.pad_token_id)
    with torch.no_grad():
        logits = model(input_ids=apart["input_ids"], attention_mask=apart["attention_mask"], use_cache=False).logits
        sums, counts = sft_loss_sums(logits, apart["labels"])
        packed = collate_packed(pack_examples(feats, 400), tokenizer.pad_token_id)
        assert packed["input_ids"].shape[0] == 1  # all three in one row
        p_sums, p_counts = sft_loss_sums(model(input_ids=packed["input_ids"], position_ids=packed["position_ids"],
                                               use_cache=False).logits, packed["labels"])
        # Plain positions (one long sequence): later examples attend to earlier ones.
        l_sums, _ = sft_loss_sums(model(input_ids=packed["input_ids"], use_cache=False).logits, packed["labels"])
    assert len({len(f["input_ids"]) for f in feats}) == 3
    assert p_counts.item() == counts.sum().item()
    assert p_sums.item() == pytest.approx(sums.sum().item(), rel=1e-6)  # measured: 1e-7 relative
    assert abs(l_sums.item() - sums.sum().item()) > 0.1  # measured: 0.28 apart without the boundaries


# ----------------------------------------------------------------------------------------------- data shapes


def test_every_data_shape_becomes_conversations(tmp_path):
    cfg = SFTConfig()
    multi = tmp_path / "chat.jsonl"
    atomic_write_jsonl(multi, [{"messages": [*conversation(1), {"role": "user", "content": "And cacti?"},
                                             {"role": "assistant", "content": "Rarely."}]}])
    convs, skipped, _ = load_conversations(cfg, str(multi), None)
    assert len(convs) == 1 and [m["role"] for m in convs[0]] == ["user", "assistant", "user", "assistant"]
    pr = tmp_path / "pr.jsonl"
    atomic_write_jsonl(pr, [{"prompt": "Hi?", "response": "Hello."}, {"prompt": "Bye?", "response": "Bye."}])
    convs, _, _ = load_conversations(cfg.model_copy(update={"system_prompt": "Be kind."}), str(pr), None)
    assert convs[0] == [{"role": "system", "content": "Be kind."}, {"role": "user", "content": "Hi?"},
                        {"role": "assistant", "content": "Hello."}]
    pairs = tmp_path / "pairs.jsonl"
    atomic_write_jsonl(pairs, [{"prompt": "Q?", "chosen": "Good.", "rejected": "Bad."}])
    convs, _, _ = load_conversations(cfg, str(pairs), None)
    assert convs == [[{"role": "user", "content": "Q?"}, {"role": "assistant", "content": "Good."}]]


def test_pku_records_give_the_safer_or_better_response_and_count_skips(tmp_path):
    from humanalign.data.demo_data import generate_demo_records

    raw = generate_demo_records(200, seed=3)
    path = tmp_path / "pku.jsonl"
    atomic_write_jsonl(path, raw)
    cfg = SFTConfig(pair_kind="harmless", only_safe_responses=True)
    convs, skipped, desc = load_conversations(cfg, str(path), None)
    safer_unsafe = sum(1 for r in raw if not r[f"is_response_{r['safer_response_id']}_safe"])
    assert skipped["response labelled unsafe (only_safe_responses)"] == safer_unsafe > 0
    assert len(convs) == 200 - safer_unsafe and "pku-saferlhf" in desc
    first_kept = next(r for r in raw if r[f"is_response_{r['safer_response_id']}_safe"])
    assert convs[0][-1]["content"] == first_kept[f"response_{first_kept['safer_response_id']}"]
    helpful, _, _ = load_conversations(SFTConfig(pair_kind="helpful"), str(path), 50)
    assert len(helpful) == 50 and helpful[0][-1]["content"] == raw[0][f"response_{raw[0]['better_response_id']}"]


def test_prepare_data_reports_skips_and_truncation(demo_data, tiny):
    _, tokenizer = tiny
    said: list[str] = []
    cfg = SFTConfig(train_path=str(demo_data / "train" / "harmless_pairs.jsonl"), pair_kind="harmless",
                    only_safe_responses=True, max_length=40, max_prompt_length=16, val_ratio=0.1)
    data = prepare_data(cfg, tokenizer, said.append)
    stats = data.stats["train"]
    text = "\n".join(said)
    assert f"response labelled unsafe (only_safe_responses): {stats['skipped']['response labelled unsafe (only_safe_responses)']}" in text
    assert "truncation (max_length 40)" in text and stats["truncation"]["response_truncated"] > 0
    assert all(len(f["input_ids"]) <= 40 for f in data.train)
    assert data.val and data.stats["val"]["conversations"] == len(data.val) + data.stats["val"]["truncation"]["dropped_empty"]


# ----------------------------------------------------------------------------------------------- whole runs


def val_loss(model, tokenizer, path: Path) -> float:
    """Token-mean loss of prompt + chosen over a validation file, computed apart from the trainer's loop."""
    rows = read_jsonl(path)
    feats = [encode_conversation(tokenizer, [{"role": "user", "content": r["prompt"]},
                                             {"role": "assistant", "content": r["chosen"]}], 256) for r in rows]
    total, count = 0.0, 0
    with torch.no_grad():
        for i in range(0, len(feats), 16):
            batch = collate_sft(feats[i:i + 16], tokenizer.pad_token_id)
            sums, counts = sft_loss_sums(model(input_ids=batch["input_ids"],
                                               attention_mask=batch["attention_mask"]).logits, batch["labels"])
            total, count = total + sums.sum().item(), count + counts.sum().item()
    return total / count


def test_sft_lowers_validation_loss_and_saves_a_plain_hf_model(demo_data, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = tmp_path / "sft"
    val = demo_data / "val" / "helpful_pairs.jsonl"
    code = main(["train", "sft", "--config", str(ROOT / "configs" / "sft_tiny.yaml"), "--output_dir", str(out),
                 "--train_path", str(demo_data / "train" / "helpful_pairs.jsonl"), "--val_path", str(val),
                 "--max_steps", "40", "--eval_steps", "20", "--progress_bar", "false"])
    assert code == 0
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    evals = {r["step"]: r for r in rows if "eval/loss" in r}
    assert sorted(evals) == [0, 20, 40]
    start, end = evals[0]["eval/loss"], evals[40]["eval/loss"]
    # Measured: 7.38 -> 6.02 (perplexity 1600 -> 410) in 40 steps of 8 examples.
    assert start - end > 0.9
    assert evals[40]["eval/ppl"] == pytest.approx(math.exp(end), rel=1e-6)
    model = AutoModelForCausalLM.from_pretrained(out / "final")
    tokenizer = AutoTokenizer.from_pretrained(out / "final")
    assert tokenizer.chat_template and "<|im_start|>" in tokenizer.chat_template
    assert val_loss(model, tokenizer, val) == pytest.approx(end, abs=1e-4)
    stats = json.loads((out / "data_stats.json").read_text())
    assert stats["train"]["examples"] == len(read_jsonl(demo_data / "train" / "helpful_pairs.jsonl"))
    assert stats["val"]["examples"] == len(read_jsonl(val)) and stats["train"]["skipped"] == {}
    summary = json.loads((out / "run_summary.json").read_text())
    assert summary["sft"]["eval_loss_at_start"] == pytest.approx(start)


def test_lora_sft_saves_a_peft_adapter_and_a_merged_copy(demo_data, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from humanalign.models.load import resolve_model_path
    from humanalign.trainers.sft import run

    out = tmp_path / "lora"
    val = demo_data / "val" / "helpful_pairs.jsonl"
    cfg = load_config(SFTConfig, ROOT / "configs" / "sft_tiny.yaml", values={
        "output_dir": str(out), "train_path": str(demo_data / "train" / "helpful_pairs.jsonl"),
        "val_path": str(val), "max_steps": 12, "eval_steps": 6, "progress_bar": False, "packing": True,
        "learning_rate": 5e-3, "gradient_checkpointing": True, "lora": {"enabled": True, "r": 8, "alpha": 16, "dropout": 0.0,
                                        "target_modules": "all-linear", "merge_on_save": True}})
    summary = run(cfg)
    assert summary["eval_loss"] < summary["eval_loss_at_start"] - 0.1  # measured: 7.38 -> 7.17 (LoRA, 12 steps)
    assert (out / "final" / "adapter_config.json").is_file() and not (out / "final" / "config.json").exists()
    base = AutoModelForCausalLM.from_pretrained(resolve_model_path("tiny"))
    adapted = PeftModel.from_pretrained(base, out / "final")
    tokenizer = AutoTokenizer.from_pretrained(out / "final")
    assert val_loss(adapted, tokenizer, val) == pytest.approx(summary["eval_loss"], abs=1e-4)
    merged = AutoModelForCausalLM.from_pretrained(out / "final-merged")
    assert val_loss(merged, tokenizer, val) == pytest.approx(summary["eval_loss"], abs=1e-4)
    state = json.loads((out / "checkpoint-12" / "trainer_state.json").read_text())
    assert state["step"] == 12
    from safetensors.torch import load_file

    assert all("lora_" in k for k in load_file(str(out / "checkpoint-12" / "model.safetensors")))


def test_val_ratio_holds_out_whole_prompts():
    from humanalign.trainers.sft import split_validation

    convs = [[{"role": "system", "content": "Be kind."}, {"role": "user", "content": f"Q{i % 10}"},
              {"role": "assistant", "content": f"A{i}"}] for i in range(40)]  # 10 prompts, 4 answers each
    train, val = split_validation(convs, 0.2, seed=0)
    assert (len(train), len(val)) == (32, 8)  # 2 of 10 prompts held out, with all 4 of their answers
    assert not {c[1]["content"] for c in train} & {c[1]["content"] for c in val}
    assert split_validation(convs, 0.2, seed=0) == (train, val)
