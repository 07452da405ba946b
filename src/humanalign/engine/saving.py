"""Checkpoints, trainer state and the final model: the saving half of the Engine (a mixin of ``run.Engine``).

See ``checkpoint`` for the folder layout and the atomic save; ``state`` for which weights a checkpoint holds.
"""

from __future__ import annotations

import json
import math
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from accelerate.utils import DistributedType

from humanalign.engine import checkpoint as ckpt
from humanalign.engine.state import load_model_weights, nonfinite_count, trainable_state_dict
from humanalign.errors import UserError
from humanalign.fs import atomic_write_json, publish_dir
from humanalign.models.load import ADAPTER_INFO_FILE, save_pretrained_model  # save_pretrained_model: atomic
from humanalign.models.lora_merge import merged_gathered_weights
from humanalign.models.pretrained import is_peft_model, portable_tokenizer_config


class CheckpointingMixin:
    """Needs from the Engine: accelerator, config, name, run_dir, step, total_steps, sampler, scheduler,
    accumulation, progress, metrics counters (see ``run.Engine.__init__``)."""

    # ----------------------------------------------------------------- trainer state
    def register_state(self, name: str, obj: Any) -> None:
        """Checkpoint ``obj`` with the run: an object with state_dict()/load_state_dict(), or a dict (saved
        and restored in place). Values must be tensors, numbers, strings or containers of them."""
        if not (isinstance(obj, dict) or (hasattr(obj, "state_dict") and hasattr(obj, "load_state_dict"))):
            raise TypeError(f"register_state('{name}'): needs a dict or an object with state_dict/load_state_dict")
        self._states[name] = obj
        if name in self._pending_states:
            self._restore_state(name, self._pending_states.pop(name))

    def _restore_state(self, name: str, value: Any) -> None:
        obj = self._states[name]
        if isinstance(obj, dict):
            obj.clear()
            obj.update(value)
        else:
            obj.load_state_dict(value)

    # Checkpointed weights: only what training changes (all of a fully trained model; the adapter of a LoRA
    # model), saved under the unwrapped model's names so that DDP and single-process checkpoints agree.
    def _save_weights_hook(self, models, weights, output_dir) -> None:
        for i in range(len(weights)):
            weights[i] = trainable_state_dict(self.unwrap(models[i]))

    def _load_weights_hook(self, models, input_dir) -> None:
        if self.distributed_type in (DistributedType.FSDP, DistributedType.DEEPSPEED):
            return  # they wrote their own sharded model folders; accelerate loads those
        for i, model in enumerate(models):
            name = "model.safetensors" if i == 0 else f"model_{i}.safetensors"
            load_model_weights(self.unwrap(model), Path(input_dir) / name)
        models.clear()  # loaded here; accelerate must not load them again

    # ----------------------------------------------------------------- non-finite weights
    def _raise_nonfinite_weights(self, step: int, when: str) -> None:
        last = ckpt.latest_checkpoint(self.run_dir)
        raise UserError(
            f"step {step}: the model's weights became non-finite (NaN/inf) {when}; stopping without saving them "
            "(lower learning_rate, or check the data and mixed_precision)"
            + (f"; last good checkpoint: {last}" if last else ""))

    def _check_finite_weights(self, model: torch.nn.Module) -> None:
        """Before any save: a model with a NaN or inf weight is never written (a collective: every rank)."""
        bad = nonfinite_count(model)
        bad = self.reduce_sum(bad) if self.num_processes > 1 else bad
        if bad.item() > 0:
            self._raise_nonfinite_weights(self.step, "by this step")

    # ----------------------------------------------------------------- checkpoints
    def _update_best(self) -> None:
        if self.last_eval is None or self.last_eval[0] != self.step:
            return
        value = self.last_eval[1].get(self.config.metric_for_best_model)
        if value is None or not math.isfinite(value):
            return
        better = self.best_metric is None or (
            value > self.best_metric if self.config.greater_is_better else value < self.best_metric)
        if better:
            self.best_metric, self.best_checkpoint = value, ckpt.checkpoint_dir(self.run_dir, self.step).name

    def trainer_state(self) -> dict[str, Any]:
        sampler = self.sampler
        return {
            "step": self.step,
            "total_steps": self.total_steps,
            "epoch": self.epoch,
            "micro_batches_done": self.step * self.accumulation,
            "examples_per_step": sampler.examples_per_step if sampler else None,
            "num_processes": self.num_processes,
            "best_metric": self.best_metric,
            "best_checkpoint": self.best_checkpoint,
            "metric_for_best_model": self.config.metric_for_best_model,
            "last_eval": self.last_eval[1] if self.last_eval and self.last_eval[0] == self.step else None,
            "nonfinite_skipped": self.nonfinite_skipped,
            "nonfinite_in_a_row": self.nonfinite_in_a_row,
            "seconds": round(time.time() - self._start_time, 1),
        }

    def save_checkpoint(self) -> Path:
        """Save the full training state as ``checkpoint-<step>`` (atomically), then rotate old ones.

        Called on every rank: FSDP and DeepSpeed write shards from each; the rest is written once."""
        self._check_finite_weights(self.model)
        window = self._acc.state(self.reduce_sum if self.num_processes > 1 else None)  # every rank: a collective
        self._update_best()
        final = ckpt.checkpoint_dir(self.run_dir, self.step)
        tmp = self.run_dir / f"{ckpt.TMP_PREFIX}{self.step}"
        if self.is_main_process and tmp.exists():
            shutil.rmtree(tmp)
        self.wait()
        self.accelerator.save_state(str(tmp))
        if self.is_main_process:
            torch.save(self.scheduler.state_dict(), tmp / ckpt.SCHEDULER_FILE)
            if self._states:
                torch.save({k: v if isinstance(v, dict) else v.state_dict() for k, v in self._states.items()},
                           tmp / ckpt.EXTRA_FILE)
            self.config.save(tmp / ckpt.CONFIG_FILE)
            ckpt.write_state(tmp, {**self.trainer_state(), "log_window": window})  # last: marks it complete
        self.wait()
        if self.is_main_process:
            ckpt.publish(tmp, final)
            keep = [self.run_dir / self.best_checkpoint] if self.best_checkpoint else []
            for path in ckpt.rotate(self.run_dir, self.config.save_total_limit, keep=keep):
                self.print(f"[{self.name}] deleted {path.name} (save_total_limit = {self.config.save_total_limit})")
        self.wait()
        self._saved_step = self.step
        self.print(f"[{self.name}] saved {final}")
        return final

    def load_checkpoint(self, path: Path) -> None:
        """Restore model, optimizer, scheduler, RNG states, counters and registered states from a checkpoint."""
        state = ckpt.read_state(path)
        if self.sampler is not None and state.get("examples_per_step") not in (None, self.sampler.examples_per_step):
            raise UserError(
                f"cannot resume from {path}: it took {state['examples_per_step']} examples per step, this run takes "
                f"{self.sampler.examples_per_step} (batch_size x processes x gradient_accumulation_steps must match)"
            )
        if state.get("total_steps") not in (None, self.total_steps):
            self.print(f"[{self.name}] note: the checkpoint's run had {state['total_steps']} steps, this one has "
                       f"{self.total_steps}; the learning-rate schedule follows the new total")
        self._load_files(path)
        if (path / ckpt.EXTRA_FILE).is_file():
            self._pending_states = torch.load(path / ckpt.EXTRA_FILE, weights_only=True)
            for name in list(self._pending_states):
                if name in self._states:
                    self._restore_state(name, self._pending_states.pop(name))
        self.step = state["step"]
        self.best_metric, self.best_checkpoint = state.get("best_metric"), state.get("best_checkpoint")
        self.nonfinite_skipped = state.get("nonfinite_skipped", 0)
        self.nonfinite_in_a_row = state.get("nonfinite_in_a_row", 0)
        if state.get("last_eval"):
            self.last_eval = (self.step, state["last_eval"])
        # the metrics since the last log, summed over the ranks: the next log averages the same window
        self._acc.load_state(state.get("log_window") or {}, owner=self.is_main_process, device=self.device)
        self.print(f"[{self.name}] resumed from {path} at step {self.step}")

    def _load_files(self, path: Path) -> None:
        """Model, optimizer, RNG and scheduler states, after checking the files (``checkpoint.verify``)."""
        sharded = self.distributed_type in (DistributedType.FSDP, DistributedType.DEEPSPEED)
        scaler = self.accelerator.scaler is not None
        for warning in ckpt.verify(path, models=len(self.accelerator._models), sharded=sharded, scaler=scaler,
                                   optimizers=len(self.accelerator._optimizers), processes=self.num_processes,
                                   extra=(path / ckpt.EXTRA_FILE).exists()):
            self.print(f"[{self.name}] warning: {warning}")
        try:
            self.accelerator.load_state(str(path))
            self.scheduler.load_state_dict(torch.load(path / ckpt.SCHEDULER_FILE, weights_only=True))
        except (OSError, RuntimeError, ValueError, EOFError) as exc:  # damaged beyond what verify can see
            detail = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise UserError(f"cannot resume from {path}: {detail}; {ckpt.suggest_previous(path)}") from None

    # ----------------------------------------------------------------- the end
    def save_model(
        self,
        model: torch.nn.Module,
        tokenizer: Any,
        output_dir: str | Path,
        *,
        merge_lora: bool = False,
        save_fn: Callable[[torch.nn.Module, Path, dict | None], None] | None = None,
        extra_files: dict[str, Any] | None = None,
    ) -> Path:
        """Save an HF model folder (safetensors, config, tokenizer and chat template; a PEFT folder for an
        adapter, or the merged model with ``merge_lora``) atomically. Called on every rank.

        ``save_fn(unwrapped_model, folder, state_dict)`` replaces the default writer (e.g. a value head);
        ``state_dict`` is the gathered full state under FSDP/DeepSpeed, else None."""
        output_dir = Path(output_dir)
        self._check_finite_weights(model)
        sharded = self.distributed_type in (DistributedType.FSDP, DistributedType.DEEPSPEED)
        state_dict = self.accelerator.get_state_dict(model) if sharded else None  # gathered on every rank
        if self.is_main_process:
            unwrapped = self.unwrap(model)
            if state_dict is not None:
                state_dict = without_tied_copies(unwrapped, state_dict)
            if save_fn is None and state_dict is None:
                save_pretrained_model(unwrapped, tokenizer, output_dir, merge_lora=merge_lora, extra_files=extra_files)
            else:
                if merge_lora and state_dict is not None and is_peft_model(unwrapped):
                    state_dict = merged_gathered_weights(unwrapped, state_dict)
                    unwrapped = unwrapped.get_base_model()  # saved with the merged weights: a plain model
                self.write_model_folder(unwrapped, tokenizer, output_dir, state_dict, save_fn, extra_files)
            ckpt.share_permissions(output_dir)
        self.wait()
        return output_dir

    @staticmethod
    def write_model_folder(unwrapped, tokenizer, output_dir: Path, state_dict, save_fn=None, extra_files=None) -> None:
        """Write ``unwrapped`` (with ``state_dict`` when given) and the tokenizer into a temporary folder, then
        publish it as ``output_dir``; ``save_fn`` replaces the model writer. Main process only."""
        tmp = output_dir.with_name(f".tmp-{output_dir.name}")
        if tmp.exists():
            shutil.rmtree(tmp)
        if save_fn is not None:
            save_fn(unwrapped, tmp, state_dict)
        else:
            unwrapped.save_pretrained(tmp, state_dict=state_dict, safe_serialization=True)
            if is_peft_model(unwrapped) and getattr(unwrapped, "humanalign_base", None):  # an adapter
                atomic_write_json(tmp / ADAPTER_INFO_FILE, unwrapped.humanalign_base)
            if tokenizer is not None:
                tokenizer.save_pretrained(tmp)
                portable_tokenizer_config(tmp)
        for name, content in (extra_files or {}).items():
            target = tmp / name
            target.parent.mkdir(parents=True, exist_ok=True)
            if isinstance(content, bytes):
                target.write_bytes(content)
            else:
                target.write_text(content if isinstance(content, str) else json.dumps(content, indent=2) + "\n",
                                  encoding="utf-8")
        publish_dir(tmp, output_dir)

    def finish(
        self,
        model: torch.nn.Module,
        tokenizer: Any = None,
        *,
        save_fn: Callable[[torch.nn.Module, Path, dict | None], None] | None = None,
        extra_files: dict[str, Any] | None = None,
        summary: dict[str, Any] | None = None,
    ) -> Path:
        """Load the best checkpoint (load_best_model_at_end), save the final model to ``<output_dir>/final``
        (and ``final-merged`` for a LoRA run with lora.merge_on_save), write run_summary.json."""
        cfg = self.config
        self._signals.restore()  # training is over: a signal now interrupts at once (the final folder is atomic)
        if self.progress is not None:
            self.progress.close()
        best = self.run_dir / self.best_checkpoint if self.best_checkpoint else None
        current = ckpt.checkpoint_dir(self.run_dir, self.step)
        if cfg.load_best_model_at_end and best is not None and best.is_dir() and best != current:
            self.print(f"[{self.name}] loading the best checkpoint {best.name} "
                       f"({cfg.metric_for_best_model} = {self.best_metric:.6g})")
            self.accelerator.load_state(str(best))
        final = self.save_model(model, tokenizer, self.run_dir / ckpt.FINAL_DIR, save_fn=save_fn,
                                extra_files=extra_files)
        if cfg.lora.enabled and cfg.lora.merge_on_save and save_fn is None:  # sharded: from the gathered state
            self.save_model(model, tokenizer, self.run_dir / (ckpt.FINAL_DIR + "-merged"), merge_lora=True,
                            extra_files=extra_files)
        if self.is_main_process:
            atomic_write_json(self.run_dir / "run_summary.json", {
                "name": self.name, "final_model": str(final), **self.trainer_state(),
                "train": self.last_train_metrics, "eval": self.last_eval[1] if self.last_eval else None,
                **(summary or {}),
            })
        self.print(f"[{self.name}] final model saved to {final}")
        return final


def state_dict_part(state_dict: dict[str, Any] | None, prefix: str) -> dict[str, Any] | None:
    """The entries of a gathered module state dict under ``prefix`` (e.g. ``"actor."``), the prefix removed;
    None stays None (the live weights are saved then)."""
    if state_dict is None:
        return None
    return {k[len(prefix):]: v for k, v in state_dict.items() if k.startswith(prefix)}


def save_submodel(model: torch.nn.Module, tokenizer: Any, folder: Path, state_dict: dict[str, Any] | None,
                  merged_folder: Path | None = None) -> None:
    """Save one model held inside a prepared module (the actor of an actor-critic) as an HF folder: from
    ``state_dict`` (its weights gathered from FSDP / DeepSpeed shards, see ``state_dict_part``) when given, else
    from the live weights; with ``merged_folder`` also its LoRA adapter folded into the base. Main process only."""
    if state_dict is not None:
        model.save_pretrained(folder, state_dict=state_dict, safe_serialization=True)
        tokenizer.save_pretrained(folder)
    else:
        save_pretrained_model(model, tokenizer, folder)
    if merged_folder is None:
        return
    if state_dict is not None:  # the adapter folded into the gathered base weights
        merged = merged_gathered_weights(model, state_dict)
        CheckpointingMixin.write_model_folder(model.get_base_model(), tokenizer, merged_folder, merged)
    else:
        save_pretrained_model(model, tokenizer, merged_folder, merge_lora=True)


def without_tied_copies(model: torch.nn.Module, state_dict: dict[str, Any]) -> dict[str, Any]:
    """A gathered state dict holds a tied parameter (embeddings = LM head) once per name, as separate tensors,
    so save_pretrained would write it twice; keep it under its first name only, as a single process saves it."""
    first: dict[int, str] = {}
    copies: dict[str, str] = {}  # a tied name -> the name it repeats
    for name, param in model.named_parameters(remove_duplicate=False):
        if id(param) in first:
            copies[name] = first[id(param)]
        else:
            first[id(param)] = name
    return {k: v for k, v in state_dict.items() if copies.get(k) not in state_dict}
