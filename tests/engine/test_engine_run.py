"""A whole toy run: the run folder, refusing to overwrite, rotation and the best checkpoint, accumulation,
registered trainer state, and LoRA checkpoints that hold only the adapter."""

from __future__ import annotations

import json
import os

import pytest
import torch
import yaml
from engine_toy import ToyData, read_metrics, run_toy, tiny_llama, toy_loop
from safetensors.torch import load_file
from transformers import LlamaForCausalLM

from humanalign.config.training import TrainingConfig
from humanalign.engine import Engine
from humanalign.engine.checkpoint import latest_checkpoint, list_checkpoints
from humanalign.errors import ConfigError, UserError


def test_run_folder_holds_metrics_checkpoints_config_and_an_hf_model(tmp_path):
    final = run_toy({"output_dir": str(tmp_path), "max_steps": 6, "save_steps": 3, "eval_steps": 3,
                     "learning_rate": 1e-2})
    assert [s for s, _ in list_checkpoints(tmp_path)] == [3, 6]
    state = json.loads((tmp_path / "checkpoint-6" / "trainer_state.json").read_text())
    assert (state["step"], state["micro_batches_done"], state["examples_per_step"]) == (6, 6, 4)
    assert state["epoch"] == pytest.approx(0.6)  # 6 steps x 4 examples of 40
    assert {"model.safetensors", "optimizer.bin", "scheduler.pt", "random_states_0.pkl",
            "config.resolved.yaml"} <= {p.name for p in (tmp_path / "checkpoint-6").iterdir()}
    resolved = TrainingConfig(**yaml.safe_load((tmp_path / "config.resolved.yaml").read_text()))
    assert resolved.max_steps == 6 and resolved.learning_rate == 1e-2
    losses = read_metrics(tmp_path, "eval/loss")
    assert losses[6] < losses[3] - 0.02  # the toy learns: measured 4.054 -> 4.011
    reloaded = LlamaForCausalLM.from_pretrained(final)
    ckpt = load_file(str(tmp_path / "checkpoint-6" / "model.safetensors"))
    for name, tensor in reloaded.state_dict().items():
        if name in ckpt:
            assert torch.equal(tensor, ckpt[name])
    summary = json.loads((tmp_path / "run_summary.json").read_text())
    assert summary["step"] == 6 and summary["eval"]["eval/loss"] == pytest.approx(losses[6])
    umask = os.umask(0)
    os.umask(umask)
    modes = {p.stat().st_mode & 0o777 for p in tmp_path.rglob("*") if p.is_file()}
    assert modes == {0o666 & ~umask}  # readable like any file (safetensors alone writes 0600)
    assert {p.stat().st_mode & 0o777 for p in tmp_path.rglob("*") if p.is_dir()} == {0o777 & ~umask}


def test_refuses_a_folder_that_holds_a_run(tmp_path):
    run_toy({"output_dir": str(tmp_path), "max_steps": 2, "save_steps": 1})
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(UserError, match="already holds a run"):
        run_toy({"output_dir": str(tmp_path), "max_steps": 2})
    run_toy({"output_dir": str(tmp_path), "max_steps": 1, "overwrite_output_dir": True})
    assert [s for s, _ in list_checkpoints(tmp_path)] == [1]  # the old run's checkpoint-2 is gone
    assert (tmp_path / "notes.txt").read_text() == "mine"  # files that are not ours stay


def test_rotation_keeps_the_limit_and_the_best_checkpoint(tmp_path):
    # greater_is_better on a falling loss makes the first checkpoint the best one, so rotation must skip it.
    final = run_toy({"output_dir": str(tmp_path), "max_steps": 8, "save_steps": 2, "eval_steps": 2,
                     "save_total_limit": 2, "load_best_model_at_end": True, "greater_is_better": True,
                     "learning_rate": 1e-2})
    assert [s for s, _ in list_checkpoints(tmp_path)] == [2, 8]
    evals = read_metrics(tmp_path, "eval/loss")
    assert max(evals, key=evals.get) == 2
    best = load_file(str(tmp_path / "checkpoint-2" / "model.safetensors"))
    final_weights = load_file(str(final / "model.safetensors"))
    assert all(torch.equal(final_weights[k], best[k]) for k in best)  # the final model is the best checkpoint
    with pytest.raises(ConfigError, match="multiple of eval_steps"):
        run_toy({"output_dir": str(tmp_path / "x"), "max_steps": 4, "save_steps": 3, "eval_steps": 2,
                 "load_best_model_at_end": True})


def test_gradient_accumulation_matches_a_bigger_batch(tmp_path):
    runs = {}
    for batch, accum in [(4, 1), (2, 2), (1, 4)]:
        out = tmp_path / f"b{batch}"
        final = run_toy({"output_dir": str(out), "max_steps": 5, "batch_size": batch,
                         "gradient_accumulation_steps": accum})
        runs[(batch, accum)] = (read_metrics(out), load_file(str(final / "model.safetensors")))
    ref_losses, ref_weights = runs[(4, 1)]
    for key, (losses, weights) in runs.items():
        assert losses == pytest.approx(ref_losses, abs=1e-6), key  # token-weighted: the same objective
        assert max((weights[k] - ref_weights[k]).abs().max().item() for k in weights) < 1e-6, key


def test_registered_trainer_state_is_checkpointed_and_restored(tmp_path):
    def run(values, seen):
        cfg = TrainingConfig(output_dir=str(tmp_path), batch_size=4, max_steps=4, save_steps=2, logging_steps=1,
                             progress_bar=False, **values)
        with Engine(cfg, name="toy") as engine:
            state = {"lambda": torch.tensor(1.0), "updates": 0}
            engine.register_state("lagrangian", state)

            def on_step(eng, model):
                seen.append((eng.step, float(state["lambda"]), state["updates"]))
                state["lambda"] = state["lambda"] * 2
                state["updates"] += 1

            toy_loop(engine, tiny_llama(), ToyData(40, seed=1), on_step=on_step)

    first: list = []
    run({}, first)
    assert first == [(1, 1.0, 0), (2, 2.0, 1), (3, 4.0, 2), (4, 8.0, 3)]
    resumed: list = []
    run({"resume_from_checkpoint": str(tmp_path / "checkpoint-2")}, resumed)
    assert resumed == first[2:]  # lambda and the counter continue from where checkpoint-2 left them


def test_lora_checkpoint_holds_only_the_adapter_and_resumes_exactly(tmp_path):
    from peft import LoraConfig, get_peft_model

    def lora_model():
        return get_peft_model(tiny_llama(), LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))

    values = {"max_steps": 6, "save_steps": 3, "learning_rate": 1e-2}
    run_toy({"output_dir": str(tmp_path / "a"), **values}, model=lora_model())
    saved = load_file(str(tmp_path / "a" / "checkpoint-3" / "model.safetensors"))
    assert len(saved) == 4 and all("lora_" in k for k in saved)  # A and B of q_proj and v_proj, 1 layer
    assert (tmp_path / "a" / "final" / "adapter_model.safetensors").is_file()  # a PEFT folder
    run_toy({"output_dir": str(tmp_path / "b"), **values, "resume_from_checkpoint":
             str(tmp_path / "a" / "checkpoint-3")}, model=lora_model())
    assert read_metrics(tmp_path / "b") == pytest.approx({k: v for k, v in read_metrics(tmp_path / "a").items()
                                                          if k > 3}, abs=1e-7)
    assert latest_checkpoint(tmp_path / "b").name == "checkpoint-6"
    a_final = load_file(str(tmp_path / "a" / "checkpoint-6" / "model.safetensors"))
    b_final = load_file(str(tmp_path / "b" / "checkpoint-6" / "model.safetensors"))
    assert all(torch.equal(a_final[k], b_final[k]) for k in a_final)


def test_frozen_models_are_prepared_but_never_checkpointed(tmp_path):
    cfg = TrainingConfig(output_dir=str(tmp_path), batch_size=4, max_steps=1, progress_bar=False)
    with Engine(cfg, name="toy") as engine:
        reference = engine.prepare_frozen(tiny_llama(seed=1))
        assert not any(p.requires_grad for p in reference.parameters()) and not reference.training
        toy_loop(engine, tiny_llama(), ToyData(8, seed=1))
    names = {p.name for p in (tmp_path / "checkpoint-1").iterdir()}
    assert "model.safetensors" in names and "model_1.safetensors" not in names


def test_mixed_precision_auto(monkeypatch):
    from humanalign.engine import resolve_mixed_precision

    monkeypatch.delenv("ACCELERATE_MIXED_PRECISION", raising=False)
    expected = "bf16" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "no"
    assert resolve_mixed_precision("auto") == expected
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "fp16")  # what `accelerate launch` was told wins
    assert resolve_mixed_precision("auto") == "fp16"
    assert resolve_mixed_precision("no") == "no"


def test_wandb_without_the_package_is_a_clear_error(tmp_path):
    try:
        import wandb  # noqa: F401
    except ImportError:
        with pytest.raises(UserError, match="wandb is not installed"):
            run_toy({"output_dir": str(tmp_path), "max_steps": 1, "report_to": ["wandb"]})
    else:
        pytest.skip("wandb is installed here")
