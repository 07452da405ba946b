"""The Engine: one `accelerate.Accelerator`, the run folder, and the helpers a trainer's visible loop calls.

A trainer owns its loop; the engine owns everything around it::

    with Engine(cfg, name="sft") as engine:
        train_loader = engine.train_loader(train_set, collate, lengths=lengths)
        eval_loader = engine.eval_loader(val_set, collate)
        model, optimizer, scheduler = engine.prepare(model, train_loader)   # resumes when asked
        for micro_batches in engine.train_steps(train_loader):            # one optimizer step each
            for batch in micro_batches:
                with engine.accumulate(model):
                    loss = compute_loss(model, batch)
                    engine.backward(loss)
                    engine.record({"loss": loss})
            engine.optimizer_step()                       # clip, NaN guard, step, schedule, log
            if engine.should_evaluate():
                engine.log_eval(evaluate(model, eval_loader))
            if engine.should_save():
                engine.save_checkpoint()
        engine.finish(model, tokenizer)                   # best checkpoint, final HF model, summary

Reliability (docs/engine.md, "Checkpoints" and "Stopping on a signal"): one run per folder (a lock),
SIGINT/SIGTERM stop after the current step with a checkpoint, weights are checked finite before every save, a
fresh run that fails before its first step leaves nothing behind.

Works unchanged on one CPU, one GPU, DDP, FSDP and DeepSpeed (``accelerate launch`` or ``torchrun``). See
docs/engine.md for the data order, checkpoint layout, NaN guard and the DeepSpeed caveats.
"""

from __future__ import annotations

import math
import signal
import sys
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager, nullcontext
from pathlib import Path
from typing import Any

import torch
from accelerate.state import AcceleratorState, GradientState
from accelerate.utils import DistributedType, send_to_device, set_seed
from accelerate.utils.deepspeed import DummyOptim  # accelerate.utils has it only when DeepSpeed is installed
from accelerate.utils.fsdp_utils import fsdp2_prepare_model
from torch.utils.data import DataLoader, Dataset, Subset

from humanalign.config.training import TrainingConfig
from humanalign.engine import checkpoint as ckpt
from humanalign.engine import launch
from humanalign.engine.data import StepBatchSampler
from humanalign.engine.metrics import METRICS_FILE, MetricAccumulator, MetricsWriter
from humanalign.engine.optim import build_optimizer, build_scheduler, param_groups
from humanalign.engine.progress import Progress
from humanalign.engine.saving import CheckpointingMixin
from humanalign.engine.state import nonfinite_count
from humanalign.engine.stopping import StopSignals, resume_command
from humanalign.errors import Interrupted, UserError
from humanalign.models.load import enable_gradient_checkpointing, is_gradient_checkpointing

resolve_mixed_precision = launch.resolve_mixed_precision


class Engine(CheckpointingMixin, AbstractContextManager):
    """Accelerator, run folder, data order, optimizer/scheduler, checkpoints, metrics and progress."""

    def __init__(self, config: TrainingConfig, *, name: str = "train"):
        self.config, self.name = config, name
        launch.check_settings(config)
        self.accelerator = launch.make_accelerator(config)
        set_seed(config.seed)
        self.run_dir = Path(config.output_dir)
        self.logging_dir = Path(config.logging_dir or config.output_dir)
        self.accumulation = config.gradient_accumulation_steps
        self.step = 0
        self.total_steps: int | None = None
        self.model = self.optimizer = self.scheduler = None
        self.sampler: StepBatchSampler | None = None
        self._item_name = "examples"
        self.progress: Progress | None = None
        self.last_train_metrics: dict[str, float] = {}
        self.last_eval: tuple[int, dict[str, float]] | None = None
        self.best_metric: float | None = None
        self.best_checkpoint: str | None = None
        self.nonfinite_skipped = 0
        self.nonfinite_in_a_row = 0
        self._states: dict[str, Any] = {}
        self._pending_states: dict[str, Any] = {}
        self._acc = MetricAccumulator()
        self._log_transforms: dict[str, Callable[[float], float]] = {}  # see record(then=...)
        self._nonfinite = torch.zeros((), dtype=torch.int64, device=self.device)
        self._weights_bad = torch.zeros((), device=self.device)  # after the last update; synced with the next step
        self._signals = StopSignals(self.print)
        self._stop_agreed = False  # every rank's flag summed: all ranks stop after the same step
        self._saved_step: int | None = None
        self._micro_in_window = 0
        self._start_time = time.time()
        self._closed = False
        self.folder = launch.RunFolder(None)
        try:
            # before any model is prepared: a frozen model under ZeRO-3 is initialised with these values too
            launch.configure_deepspeed(self.accelerator, config)
            self.folder = launch.prepare_run_dir(self.accelerator, config, name)
            self.resume_dir = self.folder.resume
            resume_state = ckpt.read_state(self.resume_dir) if self.resume_dir else None
            self.metrics = MetricsWriter(
                self.logging_dir, [r for r in config.report_to if r != "none"], enabled=self.is_main_process,
                resume_step=resume_state["step"] if resume_state else None, run_name=f"{name}:{self.run_dir.name}",
                wandb_project=config.wandb_project, config=config.model_dump(mode="json"),
            )
            processes = launch.describe_processes(self.accelerator)
            if processes:
                self.print(f"[{name}] {processes}")
        except BaseException:
            self._leave_run_dir(failed=True)
            self._end_accelerate()
            raise

    # ----------------------------------------------------------------- processes
    @property
    def device(self) -> torch.device:
        return self.accelerator.device

    @property
    def is_main_process(self) -> bool:
        return self.accelerator.is_main_process

    @property
    def num_processes(self) -> int:
        return self.accelerator.num_processes

    @property
    def process_index(self) -> int:
        return self.accelerator.process_index

    @property
    def distributed_type(self) -> DistributedType:
        return self.accelerator.distributed_type

    @property
    def zero_stage(self) -> int | None:
        """DeepSpeed's ZeRO stage (3: parameters sharded too), None when DeepSpeed is off."""
        if self.distributed_type != DistributedType.DEEPSPEED:
            return None
        return self.accelerator.state.deepspeed_plugin.deepspeed_config.get("zero_optimization", {}).get("stage")

    def loading_whole_models(self) -> AbstractContextManager[None]:
        """Models loaded inside stay whole on every rank: ZeRO-3's partitioning at load time (zero3_init_flag)
        is off, for models used outside the engine, such as PPO's reward and cost scorers."""
        if self.zero_stage != 3:
            return nullcontext()
        return launch.without_zero3_init(self.accelerator.state.deepspeed_plugin)

    def wait(self) -> None:
        self.accelerator.wait_for_everyone()

    def print(self, message: str) -> None:
        """Print once (main process), without breaking the progress bar."""
        if not self.is_main_process:
            return
        if self.progress is not None and self.progress.bar is not None:
            self.progress.write(message)
        else:
            print(message, file=sys.stderr, flush=True)

    def reduce_sum(self, value: torch.Tensor | float) -> torch.Tensor:
        """Sum a tensor over all processes (one collective; the identity on one process)."""
        tensor = value if isinstance(value, torch.Tensor) else torch.tensor(float(value))
        tensor = tensor.to(self.device)
        return self.accelerator.reduce(tensor, "sum") if self.num_processes > 1 else tensor

    def gather(self, value: torch.Tensor) -> torch.Tensor:
        """Every process's tensor, concatenated along dim 0 in rank order (the identity on one process)."""
        return self.accelerator.gather(value) if self.num_processes > 1 else value

    def gather_for_metrics(self, value: Any) -> Any:
        """Gather per-example tensors from every rank; the duplicates that even out eval batches are dropped."""
        return self.accelerator.gather_for_metrics(value)

    def unwrap(self, model: torch.nn.Module) -> torch.nn.Module:
        return self.accelerator.unwrap_model(model)

    # ----------------------------------------------------------------- data
    def train_loader(
        self, dataset: Dataset, collate_fn: Callable, *, lengths: Sequence[int] | None = None, shuffle: bool = True,
        item_name: str = "examples",
    ) -> DataLoader:
        """This rank's training batches in the seeded, resumable order of ``StepBatchSampler``.

        ``lengths`` (tokens per example) enable group_by_length when the config asks for it; ``item_name``
        names the items in the run's announcement (e.g. "packed rows")."""
        cfg = self.config
        sampler = StepBatchSampler(
            len(dataset), cfg.batch_size, num_processes=self.num_processes, process_index=self.process_index,
            accumulation=self.accumulation, seed=cfg.seed, shuffle=shuffle,
            lengths=lengths if cfg.group_by_length else None,
        )
        self.sampler = sampler
        self._item_name = item_name
        # Its own generator: starting a DataLoader iterator draws a worker seed, which must not come from the
        # global RNG (a resumed run starts an iterator where the original did not, and dropout would drift).
        return DataLoader(dataset, batch_sampler=sampler, collate_fn=collate_fn,
                          num_workers=cfg.dataloader_num_workers, pin_memory=self.device.type == "cuda",
                          generator=torch.Generator().manual_seed(cfg.seed))

    def eval_loader(
        self, dataset: Dataset, collate_fn: Callable, *, lengths: Sequence[int] | None = None,
        batch_size: int | None = None,
    ) -> DataLoader:
        """Evaluation batches, sharded across ranks by accelerate (longest first when ``lengths`` are given).

        Reduce per-example results with ``gather_for_metrics``: it drops the examples repeated to even out
        the ranks' batches, so metrics cover each example exactly once."""
        if lengths is not None:
            order = sorted(range(len(dataset)), key=lambda i: -lengths[i])
            dataset = Subset(dataset, order)
        loader = DataLoader(dataset, batch_size=batch_size or self.config.eval_batch_size or self.config.batch_size,
                            shuffle=False, collate_fn=collate_fn, num_workers=self.config.dataloader_num_workers,
                            generator=torch.Generator().manual_seed(self.config.seed))
        return self.accelerator.prepare_data_loader(loader)

    def to_device(self, batch: Any) -> Any:
        return send_to_device(batch, self.device, non_blocking=self.device.type == "cuda")

    # ----------------------------------------------------------------- models and optimizer
    def prepare(
        self,
        model: torch.nn.Module,
        train_loader: DataLoader | None = None,
        *,
        optimizer: torch.optim.Optimizer | None = None,
        groups: list[dict] | None = None,
        total_steps: int | None = None,
    ):
        """Wrap the trained model for the distributed setup, build AdamW (unless given; over ``groups`` when
        given: parameter groups with their own ``lr`` / ``weight_decay``) and the schedule over ``total_steps``
        (max_steps, else epochs x steps per epoch of ``train_loader``), and resume from the checkpoint when
        asked. Returns (model, optimizer, scheduler)."""
        cfg = self.config
        if total_steps is None:
            if cfg.max_steps is not None:
                total_steps = cfg.max_steps
            elif train_loader is not None and isinstance(train_loader.batch_sampler, StepBatchSampler):
                total_steps = max(1, math.ceil(cfg.epochs * train_loader.batch_sampler.steps_per_epoch))
            else:
                raise ValueError("prepare() needs a loader from engine.train_loader(), total_steps or max_steps")
        self.total_steps = total_steps
        if cfg.gradient_checkpointing and hasattr(model, "gradient_checkpointing_enable"):
            if not is_gradient_checkpointing(model):  # trainers usually enable it when loading
                enable_gradient_checkpointing(model)
        if optimizer is None:
            optimizer = self._default_optimizer(model, groups)
        model, optimizer = self.accelerator.prepare(model, optimizer)
        scheduler = build_scheduler(optimizer, cfg, total_steps)
        self.model, self.optimizer, self.scheduler = model, optimizer, scheduler
        self.accelerator.register_save_state_pre_hook(self._save_weights_hook)
        self.accelerator.register_load_state_pre_hook(self._load_weights_hook)
        if self.resume_dir is not None:
            self.load_checkpoint(self.resume_dir)
            if self.is_main_process:  # only now: a resume refused above leaves the run's files untouched
                cfg.save(self.run_dir / ckpt.CONFIG_FILE)
        return model, optimizer, scheduler

    def prepare_frozen(self, model: torch.nn.Module) -> torch.nn.Module:
        """A model used only for inference (a reference policy, a reward model): frozen, eval mode, on the
        device, under the same mixed precision; sharded with the trained model under FSDP/DeepSpeed; never
        part of a checkpoint."""
        model.requires_grad_(False)
        model.eval()
        if self.distributed_type == DistributedType.DEEPSPEED:
            return launch.deepspeed_frozen(self.accelerator, model)
        if self.accelerator.is_fsdp2:
            # accelerate's prepare_model refuses FSDP2 (its prepare() wants a model with an optimizer);
            # fully_shard the frozen model the same way the trained one is (wrap policy, mixed precision,
            # rank 0's weights broadcast under cpu_ram_efficient_loading), outside the checkpointed models.
            prepared = fsdp2_prepare_model(self.accelerator, model)
            prepared.eval()
            return prepared
        if self.distributed_type == DistributedType.FSDP:
            prepared = self.accelerator.prepare_model(model)
        else:
            prepared = self.accelerator.prepare_model(model, evaluation_mode=True)
        self.accelerator._models.remove(prepared)  # frozen: nothing to checkpoint
        prepared.eval()
        return prepared

    def _default_optimizer(self, model: torch.nn.Module, groups: list[dict] | None = None):
        groups = groups if groups is not None else param_groups(model, self.config.weight_decay)
        if self.distributed_type == DistributedType.DEEPSPEED:
            ds_config = self.accelerator.state.deepspeed_plugin.deepspeed_config
            if "optimizer" in ds_config:  # DeepSpeed builds its own (e.g. CPUAdam for ZeRO-Offload) from the groups
                return DummyOptim(groups, lr=self.config.learning_rate, weight_decay=self.config.weight_decay)
        return build_optimizer(model, self.config, groups=groups)

    # ----------------------------------------------------------------- the loop
    @property
    def epoch(self) -> float:
        if self.sampler is None:
            return 0.0
        return self.step * self.accumulation / self.sampler.micro_batches_per_epoch

    def train_steps(self, loader: DataLoader) -> Iterator[list[Any]]:
        """Yield, for each remaining optimizer step, the list of its ``gradient_accumulation_steps`` micro-batches
        (on the device). After a resume the consumed steps are skipped without loading them."""
        sampler = loader.batch_sampler
        if not isinstance(sampler, StepBatchSampler) or self.total_steps is None:
            raise RuntimeError("train_steps() needs a loader from engine.train_loader() and engine.prepare() first")
        self._announce(sampler)
        self.progress = Progress(self.total_steps, initial=self.step,
                                 enabled=self.is_main_process and self.config.progress_bar, desc=self.name)
        while self.step < self.total_steps:
            epoch, start = divmod(self.step * self.accumulation, sampler.micro_batches_per_epoch)
            sampler.set_position(epoch, start)
            iterator = iter(loader)
            while self.step < self.total_steps:
                window = []
                for batch in iterator:
                    window.append(batch)
                    if len(window) == self.accumulation:
                        break
                if not window:
                    break  # epoch done
                if len(window) < self.accumulation:
                    raise RuntimeError("an epoch ended inside a step (the sampler's epoch length is not whole steps)")
                expected = self.step + 1
                yield [self.to_device(b) for b in window]
                if self.step != expected:
                    raise RuntimeError("call engine.optimizer_step() once after each step's micro-batches")
                self.stop_if_requested()  # after the trainer's eval and save of this step

    def _announce(self, sampler: StepBatchSampler) -> None:
        parts = [f"[{self.name}] {sampler.num_examples:,} {self._item_name}",
                 f"{sampler.examples_per_step} per step = {self.config.batch_size} per micro-batch x "
                 f"{self.num_processes} process(es) x {self.accumulation} accumulation",
                 f"{sampler.steps_per_epoch} steps per epoch"]
        if sampler.padded_examples:
            parts[-1] += f" ({sampler.padded_examples} repeated to fill the last step)"
        parts.append(f"{self.total_steps} steps")
        if self.step:
            epoch, micro = divmod(self.step * self.accumulation, sampler.micro_batches_per_epoch)
            parts.append(f"resuming after step {self.step} (epoch {epoch}, micro-batch {micro} skipped to)")
        self.print(" | ".join(parts))

    def accumulate(self, model: torch.nn.Module):
        """Context for one micro-batch: gradients sync across ranks only on the step's last micro-batch."""
        return self.accelerator.accumulate(model)

    def backward(self, loss: torch.Tensor, *, normalizer: torch.Tensor | float | None = None) -> None:
        """Backpropagate one micro-batch's loss.

        Without ``normalizer`` the step's gradient is the mean over micro-batches and ranks of ``loss`` (a
        per-micro-batch mean). With it, ``loss`` is a sum (e.g. over target tokens) and the gradient is that of
        (sum over all micro-batches and ranks of ``loss``) / ``normalizer``; pass the step's global count,
        e.g. ``engine.reduce_sum(tokens_in_step)``, so that every token weighs the same however the step is split.
        """
        if normalizer is not None:
            scale = self.accumulation * self.num_processes  # undoes accelerate's 1/N and DDP's mean over ranks
            denom = normalizer.clamp(min=1) if isinstance(normalizer, torch.Tensor) else max(float(normalizer), 1.0)
            loss = loss * scale / denom
        self._nonfinite = self._nonfinite + (~torch.isfinite(loss.detach())).any().to(self._nonfinite.device)
        if self.distributed_type == DistributedType.DEEPSPEED and self.accelerator.sync_gradients:
            self._deepspeed_guard()
        self.accelerator.backward(loss)
        self._micro_in_window += 1

    def record(self, metrics: dict[str, Any], weight: Any = 1.0,
               then: Callable[[float], float] | None = None) -> None:
        """Train metrics of this micro-batch; logged as their ``weight``-weighted mean over the micro-batches
        since the last log, across all ranks. Keys get a 'train/' prefix unless they carry one. ``then`` maps
        the mean when it is logged: a perplexity is recorded as the NLL per token, weighted by the token count,
        with ``then=math.exp``, so it is exp of the mean over every token of every rank, as one process
        computes it, not a mean of per-batch perplexities."""
        named = {k if "/" in k else f"train/{k}": v for k, v in metrics.items()}
        if then is not None:
            self._log_transforms.update(dict.fromkeys(named, then))
        self._acc.add(named, weight)

    def _step_flags(self, *values: torch.Tensor) -> list[float]:
        """``values`` plus this rank's stop request and the last update's non-finite weights, summed over the
        ranks in one collective (the only host sync of a step)."""
        stop = 1.0 if self._signals.received is not None else 0.0
        device = self._nonfinite.device
        packed = torch.stack([*(v.detach().float().to(device) for v in values), self._weights_bad.float().to(device),
                              torch.tensor(stop, device=device)])
        if self.num_processes > 1:
            packed = self.accelerator.reduce(packed, "sum")
        *out, weights_bad, stop_sum = packed.tolist()
        if weights_bad > 0:
            self._raise_nonfinite_weights(self.step, "after its update")
        self._stop_agreed = self._stop_agreed or stop_sum > 0
        return out

    def _deepspeed_guard(self) -> None:
        # DeepSpeed steps the optimizer inside the last backward of a step, so a bad step cannot be undone
        # afterwards: check before it and stop (no NaN reaches the weights; the last checkpoint is intact).
        (bad,) = self._step_flags(self._nonfinite)
        if bad > 0:
            raise UserError(f"non-finite loss at step {self.step + 1}; DeepSpeed cannot skip a step after its "
                            "backward, so training stops here (resume from the last checkpoint with a lower lr)")

    def optimizer_step(self) -> bool:
        """End of a step: clip, check for non-finite loss/gradients (one sync), step the optimizer unless
        they are bad, step the schedule, log. Returns False when the step was skipped."""
        if self._micro_in_window != self.accumulation:
            raise RuntimeError(f"optimizer_step() after {self._micro_in_window} backward() calls; each step needs "
                               f"gradient_accumulation_steps = {self.accumulation}")
        lr = self.scheduler.get_last_lr()[0]
        fp16 = self.accelerator.mixed_precision == "fp16"
        if self.distributed_type == DistributedType.DEEPSPEED:  # synced in _deepspeed_guard
            norm = self.accelerator.clip_grad_norm_(self.model.parameters(), self.config.max_grad_norm or 0.0)
            bad_loss, norm_value = 0.0, float(norm) if norm is not None else float("nan")
        else:
            max_norm = self.config.max_grad_norm if self.config.max_grad_norm else float("inf")
            norm = self.accelerator.clip_grad_norm_(self.model.parameters(), max_norm)
            if hasattr(norm, "full_tensor"):  # FSDP2 returns a replicated DTensor
                norm = norm.full_tensor()
            bad_loss, norm_sum = self._step_flags(self._nonfinite, norm)
            norm_value = norm_sum / self.num_processes  # every rank holds the same synced gradients
        skipped = bad_loss > 0 or (not fp16 and not math.isfinite(norm_value)
                                   and self.distributed_type != DistributedType.DEEPSPEED)
        if skipped:
            self.optimizer.zero_grad(set_to_none=True)
            if fp16 and self.accelerator.scaler is not None:
                self.accelerator.scaler.update()  # the scaler unscaled this step; let it back off
            self._acc.discard()
            self.nonfinite_skipped += 1
            self.nonfinite_in_a_row += 1
            self.print(f"[{self.name}] step {self.step + 1}: non-finite "
                       f"{'loss' if bad_loss > 0 else 'gradients'}; step skipped "
                       f"({self.nonfinite_in_a_row} in a row, {self.nonfinite_skipped} in all)")
        else:
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
            self._weights_bad = nonfinite_count(self.model, only_on=self.device)  # synced with the next step
            self.nonfinite_in_a_row = 0
            self._acc.add({"train/grad_norm": norm_value})
            self._acc.commit()
        with warnings.catch_warnings():  # stepping the schedule on a skipped step is intended
            warnings.simplefilter("ignore", UserWarning)
            self.scheduler.step()
        self.step += 1
        self._micro_in_window = 0
        self._nonfinite = torch.zeros_like(self._nonfinite)
        # from the first finished step on, a signal stops the run after a step; installed before the step is
        # logged, so a signal sent on seeing the log line (a watcher, a test) finds the handler in place
        self._signals.install()
        self._log_train(lr)
        if self.nonfinite_in_a_row >= self.config.max_nonfinite_steps:
            last = ckpt.latest_checkpoint(self.run_dir)
            raise UserError(
                f"stopping: non-finite loss or gradients in {self.nonfinite_in_a_row} steps in a row (steps "
                f"{self.step - self.nonfinite_in_a_row + 1}-{self.step}, max_nonfinite_steps = "
                f"{self.config.max_nonfinite_steps}); lower learning_rate or check the data"
                + (f"; last good checkpoint: {last}" if last else "")
            )
        return not skipped

    def stop_if_requested(self) -> None:
        """Where the run can resume (the end of a step, after the trainer's eval and save; PPO: the end of a
        rollout): when a SIGINT/SIGTERM reached any rank, save a checkpoint unless this step has one, and raise
        ``Interrupted`` with the command that resumes. Called by ``train_steps``; a loop of its own calls it."""
        if self.num_processes == 1 and self._signals.received is not None:
            self._stop_agreed = True  # nothing to agree on: also a signal that came after this step's sync
        if not self._stop_agreed:
            return
        path = ckpt.checkpoint_dir(self.run_dir, self.step)
        if self._saved_step != self.step:
            path = self.save_checkpoint()
        self._signals.restore()
        signum = self._signals.received or signal.SIGTERM  # a rank that got none stops because another did
        raise Interrupted(
            f"stopped by {signal.Signals(signum).name} after step {self.step}/{self.total_steps}; checkpoint saved "
            f"to {path}; resume with: {resume_command()}", int(signum))

    def _log_train(self, lr: float) -> None:
        cfg = self.config
        if self.step % cfg.logging_steps and self.step != self.total_steps:
            if self.progress is not None:
                self.progress.update(self.step)
            return
        reduce = self.reduce_sum if self.num_processes > 1 else None
        values = self._acc.reduce(reduce)
        for key, then in self._log_transforms.items():
            if key in values:
                values[key] = then(values[key])
        values.update({"train/lr": lr, "train/epoch": round(self.epoch, 4),
                       "train/skipped_nonfinite": float(self.nonfinite_skipped)})
        self.last_train_metrics = values
        self.metrics.write(self.step, values)
        if self.progress is not None:
            self.progress.update(self.step, values)

    def should_evaluate(self) -> bool:
        """Every eval_steps steps, and after the last step."""
        every = self.config.eval_steps
        return self.step == self.total_steps or bool(every and self.step % every == 0)

    def should_save(self) -> bool:
        """Every save_steps steps, and after the last step."""
        every = self.config.save_steps
        return self.step == self.total_steps or bool(every and self.step % every == 0)

    def log_eval(self, metrics: dict[str, float]) -> dict[str, float]:
        """Log eval metrics (the same on every rank: reduce them first); keys get an 'eval/' prefix."""
        values = {k if "/" in k else f"eval/{k}": float(v) for k, v in metrics.items()}
        self.last_eval = (self.step, values)
        self.metrics.write(self.step, values)
        if self.progress is not None:
            self.progress.note(values)
        self.print(f"[{self.name}] eval at step {self.step}: "
                   + " | ".join(f"{k.split('/', 1)[-1]} {v:.4g}" for k, v in values.items()))
        return values

    def close(self, failed: bool = False) -> None:
        """Close loggers, release the run folder, end the process group and reset accelerate's global state
        (for a next Engine). ``failed``: leaving on an exception (see ``_leave_run_dir``)."""
        if self._closed:
            return
        self._closed = True
        self._signals.restore()
        if self.progress is not None:
            self.progress.close()
        self.metrics.close()
        self._leave_run_dir(failed)
        self._end_accelerate()

    def _leave_run_dir(self, failed: bool) -> None:
        """Release the folder's lock (main process). A fresh run that failed before its first step first
        removes what it wrote: nothing blocks a rerun, no half-made folder looks like a run."""
        lock = self.folder.lock
        if lock is None:
            return
        if failed and self.folder.resume is None and self.step == 0:
            launch.abandon_run_dir(self.folder, self.run_dir)
            if self.logging_dir.resolve() != self.run_dir.resolve():
                (self.logging_dir / METRICS_FILE).unlink(missing_ok=True)
        lock.release()
        self.folder.lock = None

    def _end_accelerate(self) -> None:
        self.accelerator.end_training()
        AcceleratorState._reset_state(reset_partial_state=True)
        GradientState._reset_state()

    def __exit__(self, exc_type, *exc) -> None:
        self.close(failed=exc_type is not None)
