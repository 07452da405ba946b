"""Atomic checkpoints: a save that crashes half-way leaves the last good checkpoint, and `latest` resumes it."""

from __future__ import annotations

import shutil

import pytest
import torch
from accelerate import Accelerator
from engine_toy import read_metrics, run_toy
from safetensors.torch import load_file

from humanalign.engine.checkpoint import latest_checkpoint, list_checkpoints, resolve_checkpoint, rotate
from humanalign.errors import UserError

VALUES = {"max_steps": 6, "save_steps": 2, "eval_steps": 2}


def test_a_save_that_crashes_midway_leaves_the_last_checkpoint_loadable(tmp_path, monkeypatch):
    reference = tmp_path / "reference"
    run_toy({"output_dir": str(reference), **VALUES})

    run_dir = tmp_path / "run"
    original = Accelerator.save_state

    def crash_in_step_4_save(self, output_dir=None, **kwargs):
        result = original(self, output_dir, **kwargs)  # model, optimizer and RNG files are on disk now...
        if output_dir.endswith("checkpoint-4"):
            with open(f"{output_dir}/scheduler.pt", "wb") as fh:
                fh.write(b"half a file")
            raise OSError("disk full (simulated)")  # ...and the save dies before it completes
        return result

    monkeypatch.setattr(Accelerator, "save_state", crash_in_step_4_save)
    with pytest.raises(OSError, match="simulated"):
        run_toy({"output_dir": str(run_dir), **VALUES})
    monkeypatch.undo()

    assert [s for s, _ in list_checkpoints(run_dir)] == [2]
    assert (run_dir / ".tmp-checkpoint-4" / "model.safetensors").is_file()  # the partial save, set aside
    assert latest_checkpoint(run_dir) == run_dir / "checkpoint-2"

    resumed_steps = []
    run_toy({"output_dir": str(run_dir), **VALUES, "resume_from_checkpoint": "latest"},
            on_step=lambda engine, model: resumed_steps.append(engine.step))
    assert resumed_steps == [3, 4, 5, 6]  # resumed after step 2, nothing re-run
    assert not (run_dir / ".tmp-checkpoint-4").exists()  # cleaned up by the resumed run
    assert read_metrics(run_dir) == pytest.approx(read_metrics(reference), abs=1e-6)
    assert read_metrics(run_dir, "eval/loss") == pytest.approx(read_metrics(reference, "eval/loss"), abs=1e-6)
    a = load_file(str(run_dir / "final" / "model.safetensors"))
    b = load_file(str(reference / "final" / "model.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_resolving_checkpoints(tmp_path):
    assert resolve_checkpoint(None, tmp_path) is None
    assert resolve_checkpoint("latest", tmp_path) is None  # nothing saved yet: start from scratch
    (tmp_path / "checkpoint-9").mkdir()  # no trainer_state.json: incomplete
    (tmp_path / "checkpoint-3").mkdir()
    (tmp_path / "checkpoint-3" / "trainer_state.json").write_text("{}")
    (tmp_path / "checkpoint-10").mkdir()
    (tmp_path / "checkpoint-10" / "trainer_state.json").write_text("{}")
    assert resolve_checkpoint("latest", tmp_path) == tmp_path / "checkpoint-10"  # numeric, not text, order
    with pytest.raises(UserError, match="not a complete checkpoint"):
        resolve_checkpoint(str(tmp_path / "checkpoint-9"), tmp_path)
    with pytest.raises(UserError, match="not a folder"):
        resolve_checkpoint(str(tmp_path / "nope"), tmp_path)


def test_latest_with_no_checkpoint_refuses_to_start_over_a_finished_run(tmp_path):
    """Resuming 'latest' where no checkpoint is left must not start afresh over the final model and metrics."""
    run_dir = tmp_path / "run"
    run_toy({"output_dir": str(run_dir), "max_steps": 2})  # saves only at the end
    shutil.rmtree(run_dir / "checkpoint-2")
    before = {p.name: p.stat().st_mtime_ns for p in run_dir.rglob("*")}
    with pytest.raises(UserError, match=r"latest: .* holds no complete checkpoint to resume, but a run "
                                        r"\(config.resolved.yaml, events.*, final/, metrics.jsonl, run_summary.json\); "
                                        r"pass --overwrite-output-dir"):
        run_toy({"output_dir": str(run_dir), "max_steps": 2, "resume_from_checkpoint": "latest"})
    assert {p.name: p.stat().st_mtime_ns for p in run_dir.rglob("*")} == before  # nothing touched, no lock left
    steps = []
    run_toy({"output_dir": str(run_dir), "max_steps": 2, "resume_from_checkpoint": "latest",
             "overwrite_output_dir": True}, on_step=lambda engine, model: steps.append(engine.step))
    assert steps == [1, 2]  # explicitly asked: starts over
    fresh = tmp_path / "fresh"  # 'latest' on a folder that holds nothing yet simply starts
    run_toy({"output_dir": str(fresh), "max_steps": 1, "resume_from_checkpoint": "latest"})
    assert (fresh / "final").is_dir()


@pytest.mark.parametrize("name, damage, message", [
    ("optimizer.bin", "truncate", "optimizer.bin is truncated or damaged"),
    ("scheduler.pt", "delete", "scheduler.pt is missing"),
    ("model.safetensors", "truncate", "model.safetensors is truncated"),
])
def test_a_damaged_checkpoint_file_is_named_with_the_previous_checkpoint(tmp_path, name, damage, message):
    run_toy({"output_dir": str(tmp_path), "max_steps": 4, "save_steps": 2})
    target = tmp_path / "checkpoint-4" / name
    if damage == "delete":
        target.unlink()
    else:
        target.write_bytes(target.read_bytes()[: target.stat().st_size // 2])
    with pytest.raises(UserError, match=rf"cannot resume: .*checkpoint-4/{message}; resume from the previous "
                                        r"checkpoint instead: --resume-from-checkpoint .*checkpoint-2$"):
        run_toy({"output_dir": str(tmp_path), "max_steps": 4, "resume_from_checkpoint": "latest"})
    assert (tmp_path / "final").is_dir()  # a refused resume deletes nothing


def test_missing_random_states_warn_and_resume(tmp_path, capsys):
    run_toy({"output_dir": str(tmp_path), "max_steps": 3, "save_steps": 2})
    (tmp_path / "checkpoint-2" / "random_states_0.pkl").unlink()
    shutil.rmtree(tmp_path / "checkpoint-3")
    steps = []
    run_toy({"output_dir": str(tmp_path), "max_steps": 3, "resume_from_checkpoint": "latest"},
            on_step=lambda engine, model: steps.append(engine.step))
    assert steps == [3]
    assert "random_states_0.pkl is missing: the resume is not exact" in capsys.readouterr().err


def test_rotation_never_deletes_the_newest_checkpoint(tmp_path):
    for step in (2, 4, 6):
        (tmp_path / f"checkpoint-{step}").mkdir()
        (tmp_path / f"checkpoint-{step}" / "trainer_state.json").write_text("{}")
    deleted = rotate(tmp_path, 1, keep=[tmp_path / "checkpoint-2"])  # the best is the oldest
    assert deleted == [tmp_path / "checkpoint-4"]
    assert [s for s, _ in list_checkpoints(tmp_path)] == [2, 6]
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # deleted via a .tmp- name
