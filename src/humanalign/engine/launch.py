"""Starting a run: the Accelerator (precision, accumulation, CPU processes, FSDP2 and DeepSpeed on CPUs), the run
folder, DeepSpeed settings.

Everything here runs once, before the first step; ``run.Engine`` calls it.
"""

from __future__ import annotations

import os
import shutil
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
import yaml
from accelerate import Accelerator
from accelerate.state import PartialState
from accelerate.utils import (
    DistributedType,
    FullyShardedDataParallelPlugin,
    GradientAccumulationPlugin,
    InitProcessGroupKwargs,
    broadcast_object_list,
)
from transformers.integrations import unset_hf_deepspeed_config

from humanalign.config.training import TrainingConfig
from humanalign.engine import checkpoint as ckpt
from humanalign.engine.runlock import RunLock, describe
from humanalign.errors import ConfigError, UserError


def resolve_mixed_precision(value: str) -> str:
    """'auto' -> what the launcher asked for (accelerate config), else bf16 on a GPU that supports it, else no."""
    if value != "auto":
        return value
    launcher = os.environ.get("ACCELERATE_MIXED_PRECISION", "no")
    if launcher in ("bf16", "fp16"):
        return launcher
    if torch.cuda.is_available() and torch.cuda.is_bf16_supported():
        return "bf16"
    return "no"


def cpu_processes() -> bool:
    """Several processes without a GPU (torchrun on CPUs): accelerate needs cpu=True to pick gloo."""
    if os.environ.get("ACCELERATE_USE_CPU", "false").lower() in ("1", "true", "yes"):
        return True
    return not torch.cuda.is_available() and int(os.environ.get("WORLD_SIZE", "1")) > 1


def check_settings(config: TrainingConfig) -> None:
    """Combinations of settings the engine cannot honour, caught before anything starts."""
    if config.load_best_model_at_end and config.save_steps and config.eval_steps is None:
        raise ConfigError("load_best_model_at_end needs eval_steps so that every checkpoint has an eval metric")
    if config.load_best_model_at_end and config.save_steps and config.save_steps % config.eval_steps:
        raise ConfigError(f"load_best_model_at_end: save_steps ({config.save_steps}) must be a multiple of "
                          f"eval_steps ({config.eval_steps}) so that every checkpoint has an eval metric")


def make_accelerator(config: TrainingConfig) -> Accelerator:
    """One Accelerator per run: gradient accumulation over exactly ``gradient_accumulation_steps`` micro-batches
    (never cut short at the end of a dataloader), the schedule stepped by the engine, not by accelerate."""
    plugin = GradientAccumulationPlugin(
        num_steps=config.gradient_accumulation_steps, adjust_scheduler=False, sync_with_dataloader=False
    )
    cpu = cpu_processes()
    handlers = []
    if cpu and _flag("ACCELERATE_USE_DEEPSPEED"):
        # accelerate starts DeepSpeed only for cpu=False; a gloo process group lets DeepSpeed's CPU
        # accelerator run it on CPU processes
        cpu = False
        handlers.append(InitProcessGroupKwargs(backend="gloo"))
    accelerator = Accelerator(
        mixed_precision=resolve_mixed_precision(config.mixed_precision),
        gradient_accumulation_plugin=plugin,
        step_scheduler_with_optimizer=False,
        cpu=cpu,
        kwargs_handlers=handlers or None,
    )
    if cpu and accelerator.distributed_type == DistributedType.MULTI_CPU and _flag("ACCELERATE_USE_FSDP"):
        shard_on_cpus(accelerator)
    return accelerator


def _flag(name: str) -> bool:
    return os.environ.get(name, "false").lower() in ("1", "true", "yes")


def shard_on_cpus(accelerator: Accelerator) -> None:
    """FSDP2 over CPU processes (gloo): what ``accelerate launch --config_file configs/accelerate/fsdp.yaml``
    asks for on a machine without GPUs.

    accelerate enables its FSDP plugin only for GPU-like process groups and otherwise quietly falls back to
    DDP-style CPU processes, ignoring the FSDP_* settings. PyTorch's ``fully_shard`` runs on CPU tensors over
    gloo, so the engine switches the (already initialised) CPU process group to FSDP with the plugin that the
    same FSDP_* variables describe: one code path for checkpoints, frozen models and the final model on CPUs
    and GPUs (tests/engine/test_scale_out_*.py runs it)."""
    plugin = FullyShardedDataParallelPlugin()  # reads FSDP_VERSION, FSDP_AUTO_WRAP_POLICY, FSDP_STATE_DICT_TYPE...
    if plugin.fsdp_version != 2:
        raise ConfigError("FSDP on CPU processes needs FSDP2 (fsdp_version: 2 in the accelerate config); "
                          "FSDP1 shards on GPUs only")
    state = accelerator.state
    if state.mixed_precision != "no":
        plugin.set_mixed_precision(state.mixed_precision)
    state.fsdp_plugin = plugin
    state.distributed_type = DistributedType.FSDP
    PartialState._shared_state["distributed_type"] = DistributedType.FSDP  # as AcceleratorState's own init does


def describe_processes(accelerator: Accelerator) -> str | None:
    """One line on how several processes share the work (None for one process), e.g. "2 processes: FSDP2
    (SHARDED_STATE_DICT checkpoints), gloo on cpu"."""
    if accelerator.num_processes == 1:
        return None
    kind = accelerator.distributed_type
    if kind == DistributedType.FSDP:
        plugin = accelerator.state.fsdp_plugin
        what = f"FSDP{plugin.fsdp_version} ({getattr(plugin.state_dict_type, 'name', plugin.state_dict_type)} checkpoints)"
    elif kind == DistributedType.DEEPSPEED:
        zero = accelerator.state.deepspeed_plugin.deepspeed_config.get("zero_optimization", {})
        offload = [part for part in ("optimizer", "param")
                   if zero.get(f"offload_{part}", {}).get("device", "none") not in ("none", None)]
        what = f"DeepSpeed ZeRO-{zero.get('stage', 0)}" + (f" (offload: {', '.join(offload)})" if offload else "")
    else:
        what = "data parallel (DDP)"
    backend = torch.distributed.get_backend() if torch.distributed.is_initialized() else "?"
    return f"{accelerator.num_processes} processes: {what}, {backend} on {accelerator.device.type}"


@dataclass
class RunFolder:
    """The run folder as ``prepare_run_dir`` left it: the checkpoint to resume from (None: a fresh run), the
    lock (main process only) and whether this run created the folder."""

    resume: Path | None
    lock: RunLock | None = None
    created: bool = False


def prepare_run_dir(accelerator: Accelerator, config: TrainingConfig, name: str) -> RunFolder:
    """Lock the output_dir (one run per folder), refuse it when it holds a run (unless overwriting or
    resuming), clear or tidy it, write config.resolved.yaml. The main process decides; every rank gets the
    same outcome (the same error, or the same checkpoint to resume from)."""
    run_dir = Path(config.output_dir)
    folder, error = RunFolder(None), None
    if accelerator.is_main_process:
        try:
            folder = _claim_run_dir(run_dir, config, name)
        except BaseException as exc:
            if accelerator.num_processes == 1:
                raise
            error = str(exc) if isinstance(exc, UserError) else f"the main process failed: {exc!r}"
            failure = exc
    if accelerator.num_processes > 1:
        shared = broadcast_object_list([error, str(folder.resume) if folder.resume else None])
        if shared[0] is not None:
            if accelerator.is_main_process:
                raise failure
            raise UserError(shared[0])
        folder.resume = Path(shared[1]) if shared[1] else None
    accelerator.wait_for_everyone()
    return folder


def _claim_run_dir(run_dir: Path, config: TrainingConfig, name: str) -> RunFolder:
    """Main process: create and lock the folder, then decide (see ``prepare_run_dir``). On a refusal the lock
    is released and a folder this call created is removed again."""
    try:
        run_dir.mkdir(parents=True)  # atomic: of two runs starting together, only one has created it
        created = True
    except FileExistsError:
        created = False
    except OSError as exc:
        raise UserError(f"output_dir: cannot create {run_dir} ({exc.strerror})") from None
    if not run_dir.is_dir():
        raise UserError(f"output_dir: {run_dir} is a file, not a folder")
    lock = None
    try:
        lock = RunLock.acquire(run_dir)
        if lock.stale:
            print(f"[{name}] took over the lock of a run that ended without releasing it ({describe(lock.stale)})",
                  file=sys.stderr)
        resume = ckpt.resolve_checkpoint(config.resume_from_checkpoint, run_dir)
        found = ckpt.run_contents(run_dir)
        if resume is None and found and not config.overwrite_output_dir:
            if config.resume_from_checkpoint == "latest":
                raise UserError(
                    f"resume_from_checkpoint: latest: {run_dir} holds no complete checkpoint to resume, but a run "
                    f"({', '.join(found)}); pass --overwrite-output-dir to delete it and start over, or choose "
                    "another output_dir")
            raise UserError(
                f"{run_dir} already holds a run ({', '.join(found)}); set overwrite_output_dir: true to replace it, "
                "resume_from_checkpoint: latest to continue it, or choose another output_dir")
        metrics = Path(config.logging_dir or run_dir) / "metrics.jsonl"
        if resume is None and metrics.is_file() and not config.overwrite_output_dir:  # a logging_dir of its own
            raise UserError(f"logging_dir: {metrics} holds another run's metrics; set overwrite_output_dir: true "
                            "to replace them, or choose another logging_dir")
        if resume is None:
            ckpt.clear_run(run_dir)
            config.save(run_dir / ckpt.CONFIG_FILE)
        else:  # config.resolved.yaml is replaced once the checkpoint has loaded (Engine.prepare): a resume
            # that fails on a damaged checkpoint leaves the run's files as they were
            for path in ckpt.remove_stale_temporaries(run_dir):
                print(f"[{name}] removed {path.name} (a save that was interrupted)", file=sys.stderr)
            warn_config_changes(config, resume, name)
    except BaseException:
        if created:
            _remove_folder(run_dir)  # made a moment ago, only for this run; while still locked
        if lock is not None:
            lock.release()
        raise
    return RunFolder(resume, lock, created)


def _remove_folder(run_dir: Path) -> None:
    """Rename aside, then delete: a run starting meanwhile creates a fresh folder, never loses files to us."""
    aside = run_dir.with_name(f".{run_dir.name}.abandoned-{os.getpid()}")
    try:
        os.replace(run_dir, aside)
    except OSError:
        return
    shutil.rmtree(aside, ignore_errors=True)


def abandon_run_dir(folder: RunFolder, run_dir: Path) -> None:
    """Main process, after a fresh run failed before its first step: remove what it wrote, so that nothing
    blocks a rerun and no half-made folder looks like a run (a folder it created goes entirely)."""
    if folder.created:
        _remove_folder(run_dir)
    else:
        ckpt.clear_run(run_dir)


def warn_config_changes(config: TrainingConfig, resume: Path, name: str) -> None:
    path = resume / ckpt.CONFIG_FILE
    if not path.is_file():
        return
    old = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    new = config.model_dump(mode="json")
    ignored = {"resume_from_checkpoint", "overwrite_output_dir", "output_dir", "logging_dir", "progress_bar"}
    changed = sorted(k for k in new if k not in ignored and old.get(k) != new[k])
    if changed:
        print(f"[{name}] resuming with changed settings: " + ", ".join(
            f"{k}: {old.get(k)!r} -> {new[k]!r}" for k in changed), file=sys.stderr)


def configure_deepspeed(accelerator: Accelerator, config: TrainingConfig) -> None:
    """Fill the DeepSpeed config's "auto" values accelerate cannot infer without a prepared dataloader."""
    if accelerator.distributed_type != DistributedType.DEEPSPEED:
        return
    ds = accelerator.state.deepspeed_plugin.deepspeed_config
    if "scheduler" in ds:
        raise ConfigError("remove the 'scheduler' section of the DeepSpeed config: the engine schedules the "
                          "learning rate (lr_scheduler, warmup_steps)")
    if ds.get("train_micro_batch_size_per_gpu", "auto") == "auto":
        ds["train_micro_batch_size_per_gpu"] = config.batch_size
    if ds.get("gradient_clipping", "auto") == "auto":
        ds["gradient_clipping"] = config.max_grad_norm or 0.0
    params = ds.get("optimizer", {}).get("params", {})  # accelerate fills lr and weight_decay itself
    for key, value in (("betas", [config.adam_beta1, config.adam_beta2]), ("eps", config.adam_epsilon)):
        if params.get(key) == "auto":
            params[key] = value
    accumulation = ds.get("gradient_accumulation_steps", "auto")
    if accumulation not in ("auto", config.gradient_accumulation_steps):
        raise ConfigError(f"the DeepSpeed config sets gradient_accumulation_steps: {accumulation} but the training "
                          f"config {config.gradient_accumulation_steps}; write \"auto\" in the DeepSpeed config")


def deepspeed_frozen(accelerator: Accelerator, model: torch.nn.Module) -> torch.nn.Module:
    """A frozen model under DeepSpeed: sharded for inference under ZeRO-3, else simply on the device."""
    import deepspeed

    ds = accelerator.state.deepspeed_plugin.deepspeed_config
    if ds.get("zero_optimization", {}).get("stage") != 3:
        return model.to(accelerator.device)
    config = {"train_micro_batch_size_per_gpu": ds["train_micro_batch_size_per_gpu"],
              "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0},
              "bf16": ds.get("bf16", {"enabled": False}), "fp16": ds.get("fp16", {"enabled": False})}
    engine, *_ = deepspeed.initialize(model=model, config=config)
    engine.eval()
    return engine


@contextmanager
def without_zero3_init(plugin) -> Iterator[None]:
    """transformers partitions every model it loads while a ZeRO-3 config is registered (``zero.Init``); inside
    this context none is, so models load whole. accelerate's ``zero3_init_context_manager(enable=False)``
    re-registers the same stage-3 config and so does not stop it (versions checked: docs/engine.md, "Dated
    library notes")."""
    unset_hf_deepspeed_config()
    try:
        yield
    finally:
        plugin.set_deepspeed_weakref()  # the registration accelerate made at start
