"""Progress output: a tqdm bar (step, ETA, key metrics) on a terminal, plain lines in logs and CI.

Only the main process shows progress. On a non-TTY stderr (a log file, CI) tqdm's redraws would be noise, so
a line like ``[sft] step 20/100 (20%) | loss 2.310 | lr 4.8e-05 | 3.1 step/s | ETA 0:00:26`` is printed at
every logging step instead.
"""

from __future__ import annotations

import sys
import time
from datetime import timedelta

from tqdm.auto import tqdm

KEY_METRICS = ("train/loss", "train/lr", "eval/loss")


def _fmt(value: float) -> str:
    if value == 0 or 1e-3 <= abs(value) < 1e4:
        return f"{value:.4g}"
    return f"{value:.2e}"


def short_metrics(metrics: dict[str, float], keys: tuple[str, ...] = KEY_METRICS) -> dict[str, str]:
    """The key metrics, shortened ("train/loss" -> "loss"), for the bar's postfix."""
    out = {}
    for key in keys:
        if key in metrics:
            out[key.split("/", 1)[1] if key.startswith("train/") else key] = _fmt(metrics[key])
    return out


class Progress:
    def __init__(self, total: int, initial: int = 0, *, enabled: bool = True, desc: str = "train"):
        self.total, self.step, self.desc = total, initial, desc
        self.enabled = enabled
        self.start_time, self.start_step = time.time(), initial
        self.shown: dict[str, str] = {}
        self.bar = None
        if enabled and sys.stderr.isatty():
            self.bar = tqdm(total=total, initial=initial, desc=desc, unit="step", dynamic_ncols=True)

    def eta_seconds(self) -> float | None:
        done = self.step - self.start_step
        if done <= 0:
            return None
        return (time.time() - self.start_time) / done * (self.total - self.step)

    def update(self, step: int, metrics: dict[str, float] | None = None) -> None:
        """Advance to ``step``; ``metrics`` (at logging steps) refresh the postfix or print a line."""
        if not self.enabled:
            return
        delta, self.step = step - self.step, step
        if metrics:
            self.shown.update(short_metrics(metrics))
        if self.bar is not None:
            if metrics:
                self.bar.set_postfix(self.shown, refresh=False)
            self.bar.update(delta)
        elif metrics:
            print(self.line(), file=sys.stderr, flush=True)

    def note(self, metrics: dict[str, float]) -> None:
        """Show new key metrics (e.g. eval) from now on, without printing a line."""
        if not self.enabled:
            return
        self.shown.update(short_metrics(metrics))
        if self.bar is not None:
            self.bar.set_postfix(self.shown)

    def line(self) -> str:
        parts = [f"[{self.desc}] step {self.step}/{self.total} ({100 * self.step / max(1, self.total):.0f}%)"]
        parts += [f"{k} {v}" for k, v in self.shown.items()]
        elapsed = time.time() - self.start_time
        done = self.step - self.start_step
        if done > 0 and elapsed > 0:
            parts.append(f"{done / elapsed:.3g} step/s")
        eta = self.eta_seconds()
        if eta is not None:
            parts.append(f"ETA {timedelta(seconds=int(eta))}")
        return " | ".join(parts)

    def write(self, message: str) -> None:
        """Print a message without breaking the bar."""
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.write(message, file=sys.stderr)
        else:
            print(message, file=sys.stderr, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None
