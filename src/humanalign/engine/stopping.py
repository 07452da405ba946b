"""Stopping cleanly on SIGINT (Ctrl-C) or SIGTERM (a scheduler's notice): finish the step, checkpoint, exit.

While training steps run, the first SIGINT or SIGTERM only sets a flag. ``Engine.optimizer_step`` sums the flag
over the ranks with the step's one existing collective, so every rank agrees to stop after the same step; the
engine then saves a checkpoint (atomically, as always), prints the command that resumes and raises
``errors.Interrupted`` (exit 130 / 143). A second SIGINT aborts at once (KeyboardInterrupt): a checkpoint being
written is left as a ``.tmp-checkpoint-*`` folder and the last complete one is untouched. A later SIGTERM is
ignored (torchrun's agent sends one to every worker after a Ctrl-C; the workers are stopping already).
Before the first step and after the last one the handlers are not installed: there is nothing to save then.
"""

from __future__ import annotations

import os
import shlex
import shutil
import signal
import sys
import threading
from pathlib import Path


class StopSignals:
    """SIGINT / SIGTERM handlers that record a stop request instead of killing the process."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self, announce):
        self.received: int | None = None  # the first signal's number
        self._previous: dict[int, object] = {}
        self._announce = announce  # prints one line (main process only)

    @property
    def installed(self) -> bool:
        return bool(self._previous)

    def install(self) -> None:
        if self._previous or threading.current_thread() is not threading.main_thread():
            return  # signal handlers can only be set from the main thread
        for sig in self.SIGNALS:
            self._previous[sig] = signal.signal(sig, self._handle)

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous = {}

    def _handle(self, signum: int, frame) -> None:
        if self.received is None:
            self.received = signum
            self._announce(f"{signal.Signals(signum).name} received: stopping after this step and saving a "
                           "checkpoint (press Ctrl-C again to abort at once)")
        elif signum == signal.SIGINT:
            self.restore()
            raise KeyboardInterrupt


def _strip_flag(tokens: list[str], names: set[str]) -> list[str]:
    """Drop ``--name VALUE`` / ``--name=VALUE`` / a bare ``--name`` (as cli.parse_flags reads them) and
    ``--set name=VALUE`` for the given field names."""
    out, i = [], 0
    while i < len(tokens):
        tok = tokens[i]
        name = tok[2:].partition("=")[0].replace("-", "_") if tok.startswith("--") else None
        has_value = "=" not in tok and i + 1 < len(tokens) and not tokens[i + 1].startswith("--")
        if name in names:
            i += 2 if has_value else 1
        elif name == "set" and has_value and tokens[i + 1].partition("=")[0] in names:
            i += 2
        else:
            out.append(tok)
            i += 1
    return out


def launcher_argv() -> list[str]:
    """The command line the user typed: this process's, or under torchrun / accelerate launch (workers are
    children of the launcher, which sets TORCHELASTIC_RUN_ID) the launcher's, read from /proc on Linux."""
    if os.environ.get("TORCHELASTIC_RUN_ID"):
        try:
            raw = Path(f"/proc/{os.getppid()}/cmdline").read_bytes()
            parent = [part.decode("utf-8", "replace") for part in raw.split(b"\0") if part]
            if len(parent) > 1 and Path(parent[1]).name in ("torchrun", "accelerate"):
                parent = [Path(parent[1]).name, *parent[2:]]  # "python .../bin/torchrun ..." -> "torchrun ..."
            if parent:
                return parent
        except OSError:
            pass
    argv = list(sys.argv)
    if not argv:
        return ["humanalign"]
    script = Path(argv[0])
    if script.name == "humanalign":  # the console script: by name when that is the one on PATH
        found = shutil.which("humanalign")
        head = ["humanalign"] if found and Path(found).resolve() == script.resolve() else [argv[0]]
    elif script.name == "cli.py" and script.parent.name == "humanalign":  # python -m humanalign.cli
        head = [sys.executable, "-m", "humanalign.cli"]
    else:
        head = [sys.executable, argv[0]]
    return [*head, *argv[1:]]


def resume_command(argv: list[str] | None = None) -> str:
    """``argv`` (default: the launching command) with ``--resume-from-checkpoint latest`` instead of any
    resume or overwrite flag."""
    argv = launcher_argv() if argv is None else argv
    kept = _strip_flag(argv, {"resume_from_checkpoint", "overwrite_output_dir"})
    return shlex.join([*kept, "--resume-from-checkpoint", "latest"])
