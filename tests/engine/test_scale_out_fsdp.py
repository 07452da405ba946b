"""FSDP2 on two CPU processes against one process: DPO (with resume), SFT, Safe-MM-DPO; tied weights
in a gathered state dict. Setup and tolerances: tests/engine/scale_out.py."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from scale_out import (
    CONFIGS,
    LOG_EVAL_SAVE,
    STEPS,
    assert_close_weights,
    assert_loads_as_trained,
    assert_same_curve,
    metrics,
    run_cli,
    sharded,
    train_dpo,
)


@pytest.mark.slow
def test_fsdp2_dpo_matches_one_process_resumes_and_saves_a_plain_model(demo_pairs, one_process_dpo, tmp_path):
    one, two = one_process_dpo, tmp_path / "fsdp"
    log = train_dpo(sharded("fsdp"), two, demo_pairs, 4)
    assert "2 processes: FSDP2 (SHARDED_STATE_DICT checkpoints), gloo on cpu" in log
    assert "reference: model (tiny)" in log
    assert_same_curve(one, two, "train/loss", list(range(1, STEPS + 1)))
    assert metrics(two, "train/loss")[1] == pytest.approx(0.6931472, abs=1e-6)  # policy == reference: ln 2
    assert_same_curve(one, two, "eval/loss", [3, 6])
    assert_close_weights(one, two)

    # Sharded checkpoints: each rank wrote its shard of the model and of Adam's state (torch.distributed
    # .checkpoint), nothing was gathered; the step-6 shards put together are exactly the final model.
    ckpt = two / "checkpoint-6"
    for part in ("pytorch_model_fsdp_0", "optimizer_0"):
        assert sorted(p.name for p in (ckpt / part).glob("*.distcp")) == ["__0_0.distcp", "__1_0.distcp"]
    assert not (ckpt / "model.safetensors").exists()
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    dcp_to_torch_save(ckpt / "pytorch_model_fsdp_0", tmp_path / "gathered.pt")
    gathered = torch.load(tmp_path / "gathered.pt", weights_only=True)["model"]
    final = load_file(str(two / "final" / "model.safetensors"))
    assert all(torch.equal(gathered[k], v) for k, v in final.items())
    assert_loads_as_trained(two / "final")

    # Resume from the sharded step-3 checkpoint in a fresh folder: steps 4-6 as in the uninterrupted run.
    resumed = tmp_path / "resumed"
    log = train_dpo(sharded("fsdp"), resumed, demo_pairs, 4, "--resume-from-checkpoint", str(two / "checkpoint-3"))
    assert "resuming after step 3" in log
    a, b = metrics(two, "train/loss"), metrics(resumed, "train/loss")
    assert sorted(b) == [4, 5, 6] and max(abs(a[s] - b[s]) for s in b) < 1e-6  # measured: 2e-7
    wa, wb = final, load_file(str(resumed / "final" / "model.safetensors"))
    assert max((wa[k] - wb[k]).abs().max().item() for k in wa) < 1e-6  # measured: 1.2e-7


@pytest.mark.slow
def test_fsdp2_sft_matches_one_process(demo_pairs, tmp_path):
    def sft(prefix: list[str], out: Path, batch_size: int) -> str:
        return run_cli(prefix, ["train", "sft", "--config", str(CONFIGS / "sft_tiny.yaml"), "--output-dir", str(out),
                                "--train-path", str(demo_pairs / "val" / "helpful_pairs.jsonl"),
                                "--val-path", str(demo_pairs / "test" / "helpful_pairs.jsonl"),
                                "--batch-size", str(batch_size), *LOG_EVAL_SAVE, "--lr-scheduler", "constant",
                                "--warmup-ratio", "0"])

    one, two = tmp_path / "one", tmp_path / "fsdp"
    sft(["python"], one, 8)
    assert "FSDP2" in sft(sharded("fsdp"), two, 4)
    # token-weighted loss: the step's target tokens are counted across ranks (engine.backward's normalizer)
    assert_same_curve(one, two, "train/loss", list(range(1, STEPS + 1)))
    assert_same_curve(one, two, "eval/loss", [0, 3, 6])  # measured: 1.8e-7
    assert_close_weights(one, two)
    assert_loads_as_trained(two / "final")


@pytest.mark.slow
def test_fsdp2_safe_mm_dpo_matches_one_process(demo_pairs, tmp_path):
    """Two streams, a frozen reference with a per-token KL term (the reference's full logits) and the Lagrange
    multiplier (registered trainer state, its cost window gathered from both ranks)."""
    def safe_mm_dpo(prefix: list[str], out: Path, batch_size: int) -> str:
        args = ["train", "safe-mm-dpo", "--config", str(CONFIGS / "safe_mm_dpo_tiny.yaml"), "--output-dir",
                str(out), "--batch-size", str(batch_size), *LOG_EVAL_SAVE, "--eval-on-start", "false",
                "--set", "kl_coeff=0.05"]
        for kind in ("helpful", "harmless"):
            args += [f"--train-{kind}-path", str(demo_pairs / "val" / f"{kind}_pairs.jsonl"),
                     f"--val-{kind}-path", str(demo_pairs / "test" / f"{kind}_pairs.jsonl")]
        return run_cli(prefix, args)

    one, two = tmp_path / "one", tmp_path / "fsdp"
    safe_mm_dpo(["python"], one, 8)
    assert "FSDP2" in safe_mm_dpo(sharded("fsdp"), two, 4)
    for key in ("train/loss_total", "train/loss_safety", "train/kl_divergence"):
        assert_same_curve(one, two, key, list(range(1, STEPS + 1)))  # measured: 6e-7
    fa, fb = (json.loads((d / "final_metrics.json").read_text(encoding="utf-8")) for d in (one, two))
    assert fa["lambda"]["final"] != 1.0  # lambda moved
    for (sa, va), (sb, vb) in zip(fa["lambda"]["path"], fb["lambda"]["path"], strict=True):
        assert sa == sb and vb == pytest.approx(va, abs=1e-5)  # measured: 2e-7
    assert_close_weights(one, two)



def test_a_gathered_state_dict_keeps_tied_weights_once():
    """FSDP2 and ZeRO gather a tied embedding/LM-head matrix under both names as separate tensors."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from humanalign.engine.saving import without_tied_copies

    model = LlamaForCausalLM(LlamaConfig(vocab_size=32, hidden_size=8, intermediate_size=16, num_hidden_layers=1,
                                         num_attention_heads=2, num_key_value_heads=2, tie_word_embeddings=True))
    gathered = {k: v.clone() for k, v in model.state_dict().items()}  # 2 names, 2 storages for the tied matrix
    assert "lm_head.weight" in gathered and "model.embed_tokens.weight" in gathered
    kept = without_tied_copies(model, gathered)
    assert sorted(set(gathered) - set(kept)) == ["lm_head.weight"]  # kept under its first name only
    untied = {k: v for k, v in gathered.items() if k != "model.embed_tokens.weight"}
    assert without_tied_copies(model, untied) == untied  # a copy whose original is absent stays
