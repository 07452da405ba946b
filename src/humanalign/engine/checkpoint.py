"""Full-state checkpoints: written to a temporary folder, then renamed into place.

A checkpoint ``<output_dir>/checkpoint-<step>/`` holds:

- what ``accelerator.save_state`` writes: the model weights (``model.safetensors``; for a model with frozen
  parameters, e.g. a LoRA adapter, only the trainable parameters; FSDP and DeepSpeed write their own sharded
  folders from every rank), ``optimizer.bin``, ``random_states_<rank>.pkl`` (python, numpy, torch and CUDA RNG
  states of every rank) and ``scaler.pt`` under fp16;
- ``scheduler.pt`` (the LR scheduler), ``trainer_state.json`` (step, epoch, data position, best metric,
  non-finite counters, accelerator micro-step), ``extra_state.pt`` (states the trainer registered, e.g. a
  Lagrange multiplier) and ``config.resolved.yaml``.

Atomicity: everything is written into ``.tmp-checkpoint-<step>`` and fsynced; only then is the folder renamed
to ``checkpoint-<step>``. A process killed during a save leaves a ``.tmp-*`` folder that is ignored and deleted
by the next run, and the previous checkpoint untouched. ``latest`` is the complete checkpoint with the highest
step; a folder counts as complete when its ``trainer_state.json`` (written last) exists. Replacing or deleting
a checkpoint renames it to a ``.tmp-*`` name first, so a folder named ``checkpoint-<step>`` is never half
deleted. Before a resume, ``verify`` checks that the files are there and whole (see ``verify``).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import struct
import zipfile
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from humanalign.data.io import atomic_write_json
from humanalign.errors import UserError

PREFIX = "checkpoint-"
TMP_PREFIX = ".tmp-" + PREFIX
STATE_FILE = "trainer_state.json"
SCHEDULER_FILE = "scheduler.pt"
EXTRA_FILE = "extra_state.pt"
CONFIG_FILE = "config.resolved.yaml"
FINAL_DIR = "final"
RUN_FILES = (FINAL_DIR, FINAL_DIR + "-merged", "metrics.jsonl", CONFIG_FILE, "run_summary.json", "wandb_run_id.txt")
_STEP = re.compile(rf"^{re.escape(PREFIX)}(\d+)$")
_UMASK = os.umask(0)  # read once (setting it is the only way to read it), restored at once
os.umask(_UMASK)


def checkpoint_dir(run_dir: Path, step: int) -> Path:
    return Path(run_dir) / f"{PREFIX}{step}"


def list_checkpoints(run_dir: Path) -> list[tuple[int, Path]]:
    """Complete checkpoints of a run folder, oldest first."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        return []
    found = []
    for child in run_dir.iterdir():
        match = _STEP.match(child.name)
        if match and child.is_dir() and (child / STATE_FILE).is_file():
            found.append((int(match.group(1)), child))
    return sorted(found)


def latest_checkpoint(run_dir: Path) -> Path | None:
    found = list_checkpoints(run_dir)
    return found[-1][1] if found else None


def resolve_checkpoint(value: str | None, run_dir: Path) -> Path | None:
    """``resume_from_checkpoint`` -> a complete checkpoint folder, or None ('latest' with nothing saved yet)."""
    if not value:
        return None
    if value == "latest":
        return latest_checkpoint(run_dir)
    path = Path(value)
    if not path.is_dir():
        raise UserError(f"resume_from_checkpoint: {path} is not a folder")
    if not (path / STATE_FILE).is_file():
        raise UserError(f"resume_from_checkpoint: {path} is not a complete checkpoint (no {STATE_FILE})")
    return path


def read_state(checkpoint: Path) -> dict[str, Any]:
    try:
        return json.loads((Path(checkpoint) / STATE_FILE).read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise UserError(f"{checkpoint}: cannot read {STATE_FILE} ({exc}); {suggest_previous(checkpoint)}") from None


def _ours(name: str) -> bool:
    """A name that a run of ours writes into its folder (what ``clear_run`` deletes), temporaries aside."""
    return name in RUN_FILES or name.startswith(PREFIX) or name.startswith("events.out.tfevents.")


def run_contents(run_dir: Path) -> list[str]:
    """What of a training run of ours a folder holds (names, folders with a slash), empty if none: exactly
    what ``clear_run`` would delete besides interrupted saves, so nothing is cleared without overwrite."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        return []
    return sorted(p.name + ("/" if p.is_dir() else "") for p in run_dir.iterdir() if _ours(p.name))


def holds_run(run_dir: Path) -> bool:
    """Whether a folder already holds a training run of ours."""
    return bool(run_contents(run_dir))


def clear_run(run_dir: Path, keep_checkpoints: bool = False) -> None:
    """Delete what an earlier run of ours wrote (our own file names only, never the user's other files)."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        return
    for child in run_dir.iterdir():
        name = child.name
        ours = name.startswith(TMP_PREFIX) or (_ours(name) and not (keep_checkpoints and name.startswith(PREFIX)))
        if not ours:
            continue
        if child.is_dir():
            shutil.rmtree(child)
        else:
            child.unlink()


def remove_stale_temporaries(run_dir: Path) -> list[Path]:
    """Delete ``.tmp-checkpoint-*`` folders left by a save that was interrupted."""
    removed = []
    run_dir = Path(run_dir)
    if run_dir.is_dir():
        for child in run_dir.iterdir():
            if child.name.startswith(TMP_PREFIX) and child.is_dir():
                shutil.rmtree(child, ignore_errors=True)
                removed.append(child)
    return removed


def share_permissions(folder: Path) -> None:
    """Give a written folder the permissions of files made the ordinary way (0644 / 0755 under umask 022):
    safetensors writes 0600 files and ``mkdtemp`` makes 0700 folders, which other users could not read."""
    os.chmod(folder, 0o777 & ~_UMASK)
    for root, dirs, files in os.walk(folder):
        for name in dirs:
            os.chmod(os.path.join(root, name), 0o777 & ~_UMASK)
        for name in files:
            path = os.path.join(root, name)
            if not os.path.islink(path):
                os.chmod(path, 0o666 & ~_UMASK)


def fsync_tree(folder: Path) -> None:
    """Flush every file of a folder (and the folder entries) to disk before it is renamed into place."""
    for root, _, files in os.walk(folder):
        for name in files:
            fd = os.open(os.path.join(root, name), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        fd = os.open(root, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def write_state(folder: Path, state: dict[str, Any]) -> None:
    atomic_write_json(Path(folder) / STATE_FILE, state)


def publish(tmp: Path, final: Path) -> None:
    """fsync, then rename the finished temporary folder to its final name (an older folder of that name is
    renamed aside first and deleted after: ``final`` is always either the old or the new complete folder)."""
    share_permissions(tmp)
    fsync_tree(tmp)
    if final.exists():
        _delete(final)
    os.replace(tmp, final)
    fd = os.open(final.parent, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _delete(folder: Path) -> None:
    """Rename a checkpoint to a ``.tmp-*`` name (atomic), then delete it: an interrupted deletion leaves a
    folder that is ignored and tidied up, never a ``checkpoint-<step>`` with files missing."""
    aside = folder.with_name(f"{TMP_PREFIX}{folder.name[len(PREFIX):]}.old")
    if aside.exists():
        shutil.rmtree(aside)
    os.replace(folder, aside)
    shutil.rmtree(aside, ignore_errors=True)


def rotate(run_dir: Path, limit: int | None, keep: Iterable[Path] = ()) -> list[Path]:
    """Delete the oldest checkpoints beyond ``limit``; the newest one and the folders in ``keep`` (the best
    one) are never deleted, so a limit of 1 with a best checkpoint that is not the newest keeps 2."""
    if limit is None:
        return []
    found = list_checkpoints(run_dir)
    if not found:
        return []
    keep_resolved = {Path(p).resolve() for p in keep if p is not None} | {found[-1][1].resolve()}
    removable = [p for _, p in found if p.resolve() not in keep_resolved]
    excess = len(found) - limit
    deleted = []
    for path in removable[:max(0, excess)]:
        _delete(path)
        deleted.append(path)
    return deleted


# ----------------------------------------------------------------------------------------------- verify

def _check_safetensors(path: Path) -> str | None:
    """None if the file is whole: its header parses and the file is as long as the header says."""
    size = path.stat().st_size
    with open(path, "rb") as fh:
        head = fh.read(8)
        if len(head) < 8:
            return "truncated"
        (n,) = struct.unpack("<Q", head)
        if n > size - 8:
            return "truncated"
        try:
            header = json.loads(fh.read(n))
        except (UnicodeDecodeError, json.JSONDecodeError):
            return "damaged (unreadable header)"
    end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
    return None if size >= 8 + n + end else "truncated"


def _check_torch_file(path: Path) -> str | None:
    """None if a ``torch.save`` file (a zip archive) is whole: the zip directory, at its end, reads."""
    try:
        with zipfile.ZipFile(path) as archive:
            archive.infolist()
    except (zipfile.BadZipFile, OSError, EOFError):
        return "truncated or damaged"
    return None


def verify(checkpoint: Path, *, models: int, optimizers: int, sharded: bool, processes: int,
           scaler: bool, extra: bool = False) -> list[str]:
    """Check a checkpoint's files before resuming from it: a missing or truncated model, optimizer, scheduler,
    scaler or trainer-state file is a UserError naming it and the previous checkpoint; returns warnings (a
    missing or unreadable ``random_states_<rank>.pkl``: the resume is not exact). Sharded (FSDP/DeepSpeed)
    model and optimizer folders are checked by their loaders."""
    checkpoint = Path(checkpoint)
    names = [SCHEDULER_FILE]
    if not sharded:
        names += ["model.safetensors" if i == 0 else f"model_{i}.safetensors" for i in range(models)]
        names += ["optimizer.bin" if i == 0 else f"optimizer_{i}.bin" for i in range(optimizers)]
    names += ["scaler.pt"] * scaler + [EXTRA_FILE] * extra
    for name in names:
        path = checkpoint / name
        if not path.is_file():
            problem = "is missing"
        else:
            check = _check_safetensors if name.endswith(".safetensors") else _check_torch_file
            problem = check(path)
            problem = f"is {problem}" if problem else None
        if problem:
            raise UserError(f"cannot resume: {path} {problem}; {suggest_previous(checkpoint)}")
    warnings = []
    for rank in range(processes):
        path = checkpoint / f"random_states_{rank}.pkl"
        if not path.is_file() or _check_torch_file(path):
            warnings.append(f"{path} is {'missing' if not path.is_file() else 'damaged'}: the resume is not exact "
                            "(dropout and sampling will draw other random numbers than an uninterrupted run)")
    return warnings


def suggest_previous(checkpoint: Path) -> str:
    """What to do instead of resuming from a damaged checkpoint: the previous complete one, if any."""
    checkpoint = Path(checkpoint)
    match = _STEP.match(checkpoint.name)
    earlier = [p for s, p in list_checkpoints(checkpoint.parent) if match and s < int(match.group(1))]
    if earlier:
        return f"resume from the previous checkpoint instead: --resume-from-checkpoint {earlier[-1]}"
    return "there is no earlier checkpoint: start over with --overwrite-output-dir"

