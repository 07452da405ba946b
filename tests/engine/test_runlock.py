"""One run per folder: a second run is refused naming the holder; a stale lock is taken over; a fresh run that
fails before its first step leaves nothing behind."""

from __future__ import annotations

import json
import os
import socket

import pytest
from engine_toy import run_toy, tiny_llama

from humanalign.engine.runlock import LOCK_FILE, RunLock
from humanalign.errors import UserError


@pytest.mark.parametrize("extra", [{}, {"resume_from_checkpoint": "latest"}, {"overwrite_output_dir": True}])
def test_a_second_run_into_a_locked_folder_is_refused_naming_the_holder(tmp_path, extra):
    run_dir = tmp_path / "run"
    run_toy({"output_dir": str(run_dir), "max_steps": 2, "save_steps": 1})
    before = sorted(p.name for p in run_dir.iterdir())
    held = RunLock.acquire(run_dir)  # as a running run holds it (a second open file: a separate flock)
    try:
        with pytest.raises(UserError, match=rf"is in use by another run \(pid {os.getpid()} on "
                                            rf"{socket.gethostname()}, started 20\d\d-.* UTC\)"):
            run_toy({"output_dir": str(run_dir), "max_steps": 2, **extra})
    finally:
        held.release()
    assert sorted(p.name for p in run_dir.iterdir()) == [n for n in before if n != LOCK_FILE]  # untouched
    assert not (run_dir / LOCK_FILE).exists()  # released: the file goes with it


def test_a_stale_lock_is_taken_over(tmp_path, capsys):
    run_dir = tmp_path / "run"
    run_toy({"output_dir": str(run_dir), "max_steps": 2, "save_steps": 1})
    # What a run killed with SIGKILL leaves: the file with its record, but no flock (the kernel dropped it).
    (run_dir / LOCK_FILE).write_text(json.dumps({"pid": 999999, "host": "gone", "started": "2026-01-01 00:00:00 UTC"}))
    run_toy({"output_dir": str(run_dir), "max_steps": 3, "resume_from_checkpoint": "latest"})
    assert "took over the lock of a run that ended without releasing it (pid 999999 on gone" in capsys.readouterr().err
    assert (run_dir / "checkpoint-3").is_dir() and not (run_dir / LOCK_FILE).exists()


def test_a_fresh_run_that_fails_before_its_first_step_leaves_nothing(tmp_path):
    new = tmp_path / "new"
    with pytest.raises(RuntimeError):
        run_toy({"output_dir": str(new)}, model=broken_model())
    assert not new.exists()  # created by the run: removed entirely

    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("kept")
    with pytest.raises(RuntimeError):
        run_toy({"output_dir": str(mine)}, model=broken_model())
    assert sorted(p.name for p in mine.iterdir()) == ["notes.txt"]  # only the run's files went
    run_toy({"output_dir": str(mine), "max_steps": 1})  # nothing blocks a rerun
    assert (mine / "final").is_dir()


def broken_model():
    """A model that fails in its first forward: after the run folder was set up, before any step."""
    model = tiny_llama()

    def forward(*args, **kwargs):
        raise RuntimeError("boom in the first forward")

    model.forward = forward
    return model
