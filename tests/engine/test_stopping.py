"""Signal handling and the printed resume command (unit level; the end-to-end runs are in test_signals.py)."""

from __future__ import annotations

import os
import signal
import sys

import pytest

from humanalign.engine import stopping
from humanalign.engine.stopping import StopSignals, resume_command


def test_first_signal_sets_the_flag_a_second_sigint_aborts():
    said = []
    signals = StopSignals(said.append)
    previous = signal.getsignal(signal.SIGINT)
    signals.install()
    try:
        os.kill(os.getpid(), signal.SIGTERM)
        assert signals.received == signal.SIGTERM and "SIGTERM received: stopping after this step" in said[0]
        os.kill(os.getpid(), signal.SIGTERM)  # a later SIGTERM (torchrun's agent after a Ctrl-C) changes nothing
        assert signals.received == signal.SIGTERM and len(said) == 1
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
        assert not signals.installed  # the old handlers are back
    finally:
        signals.restore()
    assert signal.getsignal(signal.SIGINT) is previous


def test_resume_command_replaces_resume_and_overwrite_flags():
    argv = ["humanalign", "train", "dpo", "--config", "c.yaml", "--overwrite-output-dir", "--max-steps", "9",
            "--resume-from-checkpoint=runs/x/checkpoint-4", "--set", "resume_from_checkpoint=a", "--set", "lora.r=4",
            "--overwrite-output-dir", "true", "--output-dir", "runs/my run"]
    assert resume_command(argv) == ("humanalign train dpo --config c.yaml --max-steps 9 --set lora.r=4 "
                                    "--output-dir 'runs/my run' --resume-from-checkpoint latest")


def test_the_command_as_launched(monkeypatch):
    monkeypatch.setattr(sys, "argv", [str(stopping.Path(stopping.__file__).parents[1] / "cli.py"), "train", "sft"])
    monkeypatch.delenv("TORCHELASTIC_RUN_ID", raising=False)
    assert stopping.launcher_argv() == [sys.executable, "-m", "humanalign.cli", "train", "sft"]
