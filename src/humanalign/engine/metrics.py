"""Metrics: weighted averages reduced across ranks, written to metrics.jsonl, TensorBoard and (optionally) W&B.

``metrics.jsonl`` holds one JSON object per logging event: ``{"step": 10, "time": ..., "train/loss": 2.31, ...}``;
train and eval metrics are separate objects. Only the main process writes. When a run resumes at step k, the
lines after step k (written by the interrupted run past its last checkpoint) are dropped and TensorBoard purges
its events after k, so the curves hold each step once.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any

import torch
from torch.utils.tensorboard import SummaryWriter

from humanalign.data.io import atomic_write_text
from humanalign.errors import UserError

METRICS_FILE = "metrics.jsonl"


def _as_tensor(value: Any) -> torch.Tensor:
    if isinstance(value, torch.Tensor):
        return value.detach().float().reshape(())
    return torch.tensor(float(value))


class MetricAccumulator:
    """Weighted sums of metrics since the last log; values stay on the device until ``reduce``.

    A window (one optimizer step) is staged first, then committed, or discarded when the step was skipped
    for a non-finite loss so that NaN never reaches the logged averages.
    """

    def __init__(self) -> None:
        self.totals: dict[str, list[torch.Tensor]] = {}
        self.window: dict[str, list[torch.Tensor]] = {}

    def add(self, values: dict[str, Any], weight: Any = 1.0) -> None:
        w = _as_tensor(weight)
        for key, value in values.items():
            v = _as_tensor(value)
            w = w.to(v.device)
            slot = self.window.setdefault(key, [torch.zeros((), device=v.device), torch.zeros((), device=v.device)])
            slot[0] = slot[0] + v * w
            slot[1] = slot[1] + w

    def commit(self) -> None:
        for key, (vw, w) in self.window.items():
            slot = self.totals.setdefault(key, [torch.zeros((), device=vw.device), torch.zeros((), device=vw.device)])
            slot[0], slot[1] = slot[0] + vw, slot[1] + w
        self.window = {}

    def discard(self) -> None:
        self.window = {}

    def state(self, reduce_fn=None) -> dict[str, list[float]]:
        """The committed sums since the last log, summed over the ranks (``reduce_fn``, a collective: call it on
        every rank), for a checkpoint: ``{key: [sum of value x weight, sum of weight]}``. Left unchanged."""
        keys = sorted(self.totals)
        if not keys:
            return {}
        packed = torch.stack([t for key in keys for t in (self.totals[key][0],
                                                           self.totals[key][1].to(self.totals[key][0].device))])
        if reduce_fn is not None:
            packed = reduce_fn(packed)
        flat = packed.float().cpu().tolist()
        return {key: [flat[2 * i], flat[2 * i + 1]] for i, key in enumerate(keys)}

    def load_state(self, state: dict[str, list[float]], *, owner: bool, device: torch.device | str = "cpu") -> None:
        """Restore ``state`` (see ``state``): the sums go to one rank (``owner``), zeros under the same keys to
        the others, so that the next log's sum over the ranks is the uninterrupted run's."""
        self.totals = {key: [torch.tensor(vw if owner else 0.0, device=device),
                             torch.tensor(w if owner else 0.0, device=device)] for key, (vw, w) in state.items()}
        self.window = {}

    def reduce(self, reduce_fn=None) -> dict[str, float]:
        """Averages since the last call; ``reduce_fn`` sums a tensor across ranks (one collective for all keys).

        Every rank must have recorded the same keys (they run the same trainer code)."""
        keys = sorted(self.totals)
        self.totals, totals = {}, self.totals
        if not keys:
            return {}
        packed = torch.stack([t for key in keys for t in (totals[key][0], totals[key][1].to(totals[key][0].device))])
        if reduce_fn is not None:
            packed = reduce_fn(packed)
        flat = packed.float().cpu().tolist()
        out = {}
        for i, key in enumerate(keys):
            vw, w = flat[2 * i], flat[2 * i + 1]
            if w > 0:
                out[key] = vw / w
        return out


def truncate_metrics(path: Path, last_step: int) -> int:
    """Drop lines with step > last_step (kept atomically); returns how many were dropped."""
    if not path.is_file():
        return 0
    kept, dropped = [], 0
    for line in path.read_text(encoding="utf-8").splitlines():
        if not line.strip():
            continue
        try:
            step = json.loads(line).get("step", 0)
        except json.JSONDecodeError:  # a line cut by the kill: drop it
            dropped += 1
            continue
        if step > last_step:
            dropped += 1
        else:
            kept.append(line + "\n")
    if dropped:
        atomic_write_text(path, "".join(kept))
    return dropped


def _jsonable(value: float) -> float | str | None:
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)  # JSON has no NaN/inf; keep them visible as strings
    return value


class MetricsWriter:
    """Writes metrics on the main process; a no-op elsewhere."""

    def __init__(
        self,
        logging_dir: Path,
        report_to: list[str],
        *,
        enabled: bool,
        resume_step: int | None = None,
        run_name: str = "",
        wandb_project: str = "humanalign",
        config: dict[str, Any] | None = None,
    ):
        self.enabled = enabled
        self.path = Path(logging_dir) / METRICS_FILE
        self.tb = None
        self.wandb = None
        if not enabled:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if resume_step is not None:
            truncate_metrics(self.path, resume_step)
        elif self.path.exists():
            self.path.unlink()
        if "tensorboard" in report_to:
            purge = resume_step + 1 if resume_step is not None else None
            self.tb = SummaryWriter(log_dir=str(logging_dir), purge_step=purge)
        if "wandb" in report_to:
            self.wandb = _start_wandb(Path(logging_dir), wandb_project, run_name, config or {}, resume_step is not None)
        self._fh = open(self.path, "a", encoding="utf-8")

    def write(self, step: int, metrics: dict[str, float]) -> None:
        if not self.enabled or not metrics:
            return
        row = {"step": step, "time": round(time.time(), 3), **{k: _jsonable(v) for k, v in metrics.items()}}
        self._fh.write(json.dumps(row) + "\n")
        self._fh.flush()
        if self.tb is not None:
            for key, value in metrics.items():
                self.tb.add_scalar(key, value, step)
            self.tb.flush()
        if self.wandb is not None:
            self.wandb.log(dict(metrics), step=step)

    def close(self) -> None:
        if not self.enabled:
            return
        self._fh.close()
        if self.tb is not None:
            self.tb.close()
        if self.wandb is not None:
            self.wandb.finish()


def _start_wandb(logging_dir: Path, project: str, run_name: str, config: dict[str, Any], resuming: bool):
    try:
        import wandb
    except ImportError:
        raise UserError("report_to has 'wandb' but wandb is not installed (pip install 'humanalign[wandb]')") from None
    id_file = logging_dir / "wandb_run_id.txt"
    run_id = id_file.read_text().strip() if resuming and id_file.is_file() else wandb.util.generate_id()
    id_file.write_text(run_id + "\n")
    return wandb.init(project=project, name=run_name or None, id=run_id, resume="allow", config=config,
                      dir=str(logging_dir))
