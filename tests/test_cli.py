"""CLI plumbing: flag mapping, help, unknown commands exit 2 with one line."""

from __future__ import annotations

import errno
import os
import subprocess
import sys

import pytest
from transformers.utils import logging as hf_logging

from humanalign import report
from humanalign.cli import main, parse_flags, quiet_transformers


def test_flags_map_onto_fields():
    config, sets, values, pos = parse_flags(
        ["--config", "c.yaml", "--train-ratio", "0.8", "--overwrite", "--set", "a.b=1", "--seed=7", "x"]
    )
    assert config == "c.yaml" and sets == ["a.b=1"] and pos == ["x"]
    assert values == {"train_ratio": 0.8, "overwrite": True, "seed": 7}


def test_unknown_command_exits_2(capsys):
    assert main(["frobnicate"]) == 2
    assert "unknown command 'frobnicate'" in capsys.readouterr().err


def test_group_without_subcommand(capsys):
    assert main(["train"]) == 2
    assert "sft" in capsys.readouterr().err


def test_help_lists_commands(capsys):
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    assert "train safe-mm-dpo" in out and "prepare-data" in out


def test_transformers_noise_is_kept_out_unless_verbose():
    quiet_transformers(verbose=False)
    assert hf_logging.get_verbosity() == hf_logging.ERROR  # "Token indices sequence length ..." warnings
    assert not hf_logging.is_progress_bar_enabled()  # "Loading weights" bars
    quiet_transformers(verbose=True)
    assert hf_logging.get_verbosity() == hf_logging.WARNING and hf_logging.is_progress_bar_enabled()


def test_verbose_is_accepted_anywhere(capsys):
    assert main(["--verbose", "train", "sft", "--help"]) == 0
    assert main(["train", "dpo", "--help", "--verbose"]) == 0
    assert "usage: humanalign train dpo" in capsys.readouterr().out


def test_a_file_system_refusal_on_a_user_path_is_one_line(monkeypatch, capsys):
    def refuse(positionals, **flags):
        raise PermissionError(errno.EACCES, "Permission denied", "/data/locked.jsonl")

    monkeypatch.setattr(report, "run_cli", refuse)
    assert main(["report", "run"]) == 2
    assert capsys.readouterr().err == "humanalign: error: /data/locked.jsonl: Permission denied\n"

    def broken(positionals, **flags):
        raise OSError(errno.EIO, "Input/output error", "/dev/sda")  # not a user mistake: keeps its traceback

    monkeypatch.setattr(report, "run_cli", broken)
    with pytest.raises(OSError, match="Input/output error"):
        main(["report", "run"])


def test_a_fresh_process_is_quiet_before_transformers_is_imported():
    script = ("import sys; from humanalign.cli import quiet_transformers; assert 'transformers' not in sys.modules; "
              "quiet_transformers(False); from transformers.utils import logging as l; "
              "print(l.get_verbosity() == l.ERROR, l.is_progress_bar_enabled())")
    env = {k: v for k, v in os.environ.items() if k not in ("TRANSFORMERS_VERBOSITY", "HF_HUB_DISABLE_PROGRESS_BARS")}
    out = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, check=True).stdout
    assert out.split() == ["True", "False"]


@pytest.mark.parametrize("world_size, code", [("2", 3), ("1", 4), ("", 0)])
def test_a_worker_of_a_multi_process_run_leaves_through_os_exit_with_its_output_flushed(world_size, code):
    """`leave`: under WORLD_SIZE > 1 the process ends by os._exit (no interpreter finalisation, where gloo's
    worker thread can abort it), after flushing what it printed; otherwise a plain sys.exit. The atexit hook
    tells the two apart: finalisation runs it, os._exit does not."""
    script = ("import atexit, sys; from humanalign.cli import leave; atexit.register(print, 'finalised'); "
              f"print('out', end=''); print('err', end='', file=sys.stderr); leave({code or None})")
    env = {**os.environ, "WORLD_SIZE": world_size}
    done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == code
    assert done.stderr == "err"
    assert done.stdout == ("out" if world_size == "2" else "outfinalised\n")
