"""Reference-model log-probabilities for the DPO family and Safe-MM-DPO, three ways (``reference_mode``).

- ``model``: a separate frozen model (``ref_model_path``, default the policy's starting weights loaded a second
  time), prepared with ``engine.prepare_frozen`` (eval mode, same mixed precision, sharded under FSDP/ZeRO-3).
- ``adapter-disabled``: the LoRA policy itself with its adapter switched off (peft's ``disable_adapter``), in
  eval mode and under ``no_grad``: no second copy of the model in memory. Exactly the start of a freshly
  initialised LoRA policy (lora_B starts at zero).
- ``precomputed``: the frozen model's summed log-probs of every pair, computed once before training and cached on
  disk under ``<precompute_cache_dir>/<key>.safetensors``, where the key hashes the reference model's weights,
  the tokenised pairs (token ids and labels) and the mixed-precision mode; a resumed or repeated run finds them
  there. They travel in the batch (``ref_chosen_logps`` / ``ref_rejected_logps``), so no reference model is
  held during training. No logits are kept, so a per-token KL term needs one of the two live modes.
- ``auto``: ``model`` when ``ref_model_path`` is set, else ``adapter-disabled`` for a LoRA policy, else ``model``.

All three give the same numbers (up to float round-off): ``ReferenceModel.logps(batch, average)`` returns the
(B,) chosen and rejected log-probs of a ``PairCollator`` batch, summed over response tokens or averaged.
Reference-free losses (``LOSS_SPECS[...].needs_reference`` false: CPO, ORPO, SimPO) load no reference at all.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import safe_open
from safetensors.numpy import load_file, save_file

from humanalign.data.preference_dataset import INDEX_KEY, REF_CHOSEN, REF_REJECTED, PairCollator
from humanalign.data.tokenize import IGNORE_INDEX
from humanalign.errors import ConfigError, UserError
from humanalign.fs import FILE_MODE, temp_file_beside
from humanalign.losses.preference import LOSS_SPECS
from humanalign.models.load import load_causal_lm
from humanalign.models.logprobs import concatenated_forward, forward_logits, image_inputs
from humanalign.models.pretrained import is_peft_model
from humanalign.models.vision import is_vision_model, load_vision_lm
from humanalign.paths import cache_dir

CACHE_VERSION = "ref-logps-v1"  # bump when what the cache holds, or how it is computed, changes
LIVE_MODES = ("model", "adapter-disabled")


def _response_counts(labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Response tokens of the chosen and rejected rows of a (2B, T) pair batch: (B,), (B,)."""
    counts = (labels[:, 1:] != IGNORE_INDEX).sum(-1)  # (2B,)
    half = labels.shape[0] // 2
    return counts[:half], counts[half:]


class ReferenceModel:
    """Reference log-probs for pair batches (rows 0..B-1 chosen, B..2B-1 rejected; see ``PairCollator``)."""

    mode = ""

    def logps(self, batch: Mapping[str, Any], average: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """(ref_chosen (B,), ref_rejected (B,)): summed, or with ``average`` mean, response-token log-probs;
        detached, float32."""
        raise NotImplementedError

    def forward_logits(self, batch: Mapping[str, Any]) -> torch.Tensor:
        """The reference's logits (2B, T, V) for the batch, without gradient (for a per-token KL term)."""
        raise UserError(f"reference_mode {self.mode} keeps no reference model, so it has no logits; a KL term "
                        "needs reference_mode model or adapter-disabled")

    def attach(self, policy: torch.nn.Module) -> None:
        """Hand over the prepared (wrapped) policy after ``engine.prepare``; only adapter-disabled needs it."""

    def describe(self) -> str:
        return self.mode


class FrozenReference(ReferenceModel):
    """A separate frozen model (already through ``engine.prepare_frozen``)."""

    mode = "model"

    def __init__(self, model: torch.nn.Module, source: str = ""):
        self.model, self.source = model, source

    @torch.no_grad()
    def logps(self, batch, average=False):
        out = concatenated_forward(self.model, batch, average=average)
        return out["chosen_logps"].detach(), out["rejected_logps"].detach()

    @torch.no_grad()
    def forward_logits(self, batch):
        return forward_logits(self.model, batch["input_ids"], batch.get("attention_mask"), **image_inputs(batch))

    def describe(self) -> str:
        return f"model ({self.source})" if self.source else "model"


class AdapterDisabledReference(ReferenceModel):
    """The LoRA policy with its adapter disabled, in eval mode (no dropout), under no_grad.

    The forward goes through the prepared wrapper (so accelerate's autocast applies); the adapter is switched
    off on the unwrapped ``PeftModel`` (``unwrap``, e.g. ``engine.unwrap``)."""

    mode = "adapter-disabled"

    def __init__(self, policy: torch.nn.Module, unwrap: Callable[[torch.nn.Module], torch.nn.Module] = lambda m: m):
        self.unwrap = unwrap
        self.policy = policy
        if not is_peft_model(unwrap(policy)):
            raise ConfigError("reference_mode adapter-disabled needs a LoRA policy (lora.enabled: true)")

    def attach(self, policy):
        if not is_peft_model(self.unwrap(policy)):
            raise ConfigError("reference_mode adapter-disabled needs a LoRA policy (lora.enabled: true)")
        self.policy = policy

    @contextlib.contextmanager
    def base_model(self) -> Iterator[torch.nn.Module]:
        """Context in which the (wrapped) policy computes as its base model: adapter off, eval mode, no grad."""
        was_training = self.policy.training
        self.policy.eval()
        try:
            with torch.no_grad(), self.unwrap(self.policy).disable_adapter():
                yield self.policy
        finally:
            if was_training:
                self.policy.train()

    def logps(self, batch, average=False):
        with self.base_model() as base:
            out = concatenated_forward(base, batch, average=average)
        return out["chosen_logps"].detach(), out["rejected_logps"].detach()

    def forward_logits(self, batch):
        with self.base_model() as base:
            return forward_logits(base, batch["input_ids"], batch.get("attention_mask"), **image_inputs(batch))


class PrecomputedReference(ReferenceModel):
    """Summed reference log-probs read from the batch (``ref_chosen_logps`` / ``ref_rejected_logps``)."""

    mode = "precomputed"

    def __init__(self, source: str = "", cache_files: Sequence[str] = ()):
        self.source, self.cache_files = source, list(cache_files)

    def logps(self, batch, average=False):
        if REF_CHOSEN not in batch or REF_REJECTED not in batch:
            raise RuntimeError("this batch carries no precomputed reference log-probs: pass its dataset to "
                               "build_reference() before building the loader")
        chosen = batch[REF_CHOSEN].float()  # (B,)
        rejected = batch[REF_REJECTED].float()  # (B,)
        if average:
            chosen_counts, rejected_counts = _response_counts(batch["labels"])
            chosen = chosen / chosen_counts.clamp(min=1).to(chosen.device)
            rejected = rejected / rejected_counts.clamp(min=1).to(rejected.device)
        return chosen, rejected

    def describe(self) -> str:
        return f"precomputed ({self.source})" if self.source else "precomputed"


# --------------------------------------------------------------------------------------------- choosing a mode


def resolve_reference_mode(cfg, policy: torch.nn.Module) -> str:
    """The concrete mode for ``cfg.reference_mode`` (checks it fits the policy and ``ref_model_path``)."""
    mode = getattr(cfg, "reference_mode", "auto")
    lora = is_peft_model(policy)
    ref_path = getattr(cfg, "ref_model_path", None)
    if mode == "adapter-disabled":
        if not lora:
            raise ConfigError("reference_mode adapter-disabled needs a LoRA policy (lora.enabled: true)")
        if ref_path:
            raise ConfigError(f"reference_mode adapter-disabled uses the policy's own base, but ref_model_path "
                              f"names another model ({ref_path}); use reference_mode: model (or precomputed)")
        return mode
    if mode == "auto":
        return "adapter-disabled" if lora and not ref_path else "model"
    return mode


def load_reference_model(cfg, engine) -> tuple[torch.nn.Module, str]:
    """The frozen reference on the CPU, not yet prepared: ``ref_model_path``, else the policy's start."""
    source = getattr(cfg, "ref_model_path", None) or cfg.policy_model_path
    engine.print(f"[reference] loading the frozen reference model from {source}")
    if is_vision_model(source, cfg.model):
        return load_vision_lm(source, cfg.model, trainable=False), source
    lora = getattr(cfg, "lora", None)
    trunk = lora if lora is not None and lora.trunk_cache_dir else None  # fills the policy's trunk cache
    return load_causal_lm(source, cfg.model, trunk, trainable=False), source


def weights_fingerprint(model: torch.nn.Module) -> str:
    """sha256 over every tensor of the state dict: name, dtype, shape and bytes (tied weights once)."""
    digest = hashlib.sha256()
    seen: set[int] = set()
    for name, tensor in model.state_dict().items():
        key = tensor.data_ptr()
        if key in seen and tensor.numel():
            continue
        seen.add(key)
        flat = tensor.detach().to("cpu").contiguous().reshape(-1)
        digest.update(f"{name}\0{flat.dtype}\0{tuple(tensor.shape)}\0".encode())
        digest.update(flat.view(torch.uint8).numpy().tobytes() if flat.numel() else b"")
    return digest.hexdigest()


def cache_key(weights_hash: str, data_hash: str, mixed_precision: str) -> str:
    text = f"{CACHE_VERSION}\0{weights_hash}\0{data_hash}\0{mixed_precision}"
    return hashlib.sha256(text.encode()).hexdigest()[:32]


def default_cache_dir() -> Path:
    return cache_dir() / "ref_logps"


# --------------------------------------------------------------------------------------------- precomputing


def compute_reference_logps(
    reference: ReferenceModel, dataset, engine, batch_size: int, pad_token_id: int = 0,
    partial: Path | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Summed reference log-probs of every example of ``dataset`` (in dataset order): (N,), (N,) float32.

    Batches are sharded across processes (longest first) and gathered, so every rank gets the full arrays.
    (The pad id only fills positions that the attention mask and the -100 labels already exclude.)
    ``partial``: a file where the main process saves what is done at each progress line, and from which an
    interrupted precompute resumes (the same batches in the same order: same processes and batch size)."""
    # longest first, by the rows the forward computes (one per pair, prompt once), so batches carry little padding
    lengths = getattr(dataset, "shared_lengths", None) or dataset.lengths
    loader = engine.eval_loader(dataset, PairCollator(pad_token_id), lengths=lengths, batch_size=batch_size)
    n = len(dataset)
    layout = {"processes": str(engine.num_processes), "batch_size": str(batch_size), "batches": str(len(loader))}
    resumed = _read_partial(partial, n, layout) if partial is not None else None
    chosen, rejected, done = resumed or (np.full(n, np.nan, dtype=np.float32), np.full(n, np.nan, dtype=np.float32), 0)
    if done:
        engine.print(f"[reference] {dataset.name or 'pairs'}: resuming at batch {done + 1}/{len(loader)} from {partial}")
    every = max(1, len(loader) // 10)
    start = time.time()
    for i, batch in enumerate(loader):
        if i < done:  # every process skips the same batches: each gather below still meets all of them
            continue
        ref_chosen, ref_rejected = reference.logps(batch, average=False)
        gathered = engine.gather_for_metrics({"index": batch[INDEX_KEY], "chosen": ref_chosen.float(),
                                              "rejected": ref_rejected.float()})
        index = gathered["index"].cpu().numpy()
        chosen[index] = gathered["chosen"].cpu().numpy()
        rejected[index] = gathered["rejected"].cpu().numpy()
        if (i + 1) % every == 0 or i + 1 == len(loader):
            engine.print(f"[reference] {dataset.name or 'pairs'}: batch {i + 1}/{len(loader)} "
                         f"({time.time() - start:.1f}s)")
            if partial is not None and engine.is_main_process and i + 1 < len(loader):
                _write_cache(partial, chosen, rejected, metadata={**layout, "batches_done": str(i + 1)})
    missing = int(np.isnan(chosen).sum() + np.isnan(rejected).sum())
    if missing:
        raise RuntimeError(f"precomputing reference log-probs left {missing} values unset")
    return chosen, rejected


def _read_partial(path: Path, n: int, layout: dict[str, str]) -> tuple[np.ndarray, np.ndarray, int] | None:
    """An interrupted precompute's arrays and batches done, or None when ``path`` holds none for this layout."""
    try:
        with safe_open(str(path), framework="numpy") as handle:
            metadata = handle.metadata() or {}
    except Exception:  # absent or damaged: start from the first batch
        return None
    found = _read_cache(path, n)
    if found is None or any(metadata.get(key) != value for key, value in layout.items()):
        return None
    return found[0], found[1], int(metadata.get("batches_done", 0))


def _read_cache(path: Path, n: int) -> tuple[np.ndarray, np.ndarray] | None:
    try:
        loaded = load_file(str(path))
    except Exception:  # a damaged cache file is recomputed, not fatal
        return None
    chosen, rejected = loaded.get("chosen"), loaded.get("rejected")
    if chosen is None or rejected is None or chosen.shape != (n,) or rejected.shape != (n,):
        return None
    return chosen, rejected


def _write_cache(path: Path, chosen: np.ndarray, rejected: np.ndarray, metadata: dict[str, str]) -> None:
    fd, tmp = temp_file_beside(path)
    os.close(fd)
    try:
        save_file({"chosen": chosen, "rejected": rejected}, tmp, metadata=metadata)
        os.chmod(tmp, FILE_MODE)  # safetensors writes 0600; a cache file is readable like any result
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def precompute_reference(cfg, engine, datasets: Sequence[Any], pad_token_id: int = 0) -> PrecomputedReference:
    """Fill every dataset's ``ref_chosen_logps`` / ``ref_rejected_logps`` from the cache, computing (with a
    frozen reference loaded only on a cache miss, freed afterwards) what is not cached yet."""
    cache = Path(getattr(cfg, "precompute_cache_dir", None) or default_cache_dir())
    model, source = load_reference_model(cfg, engine)
    weights_hash = weights_fingerprint(model)
    mixed = str(engine.accelerator.mixed_precision)
    live: FrozenReference | None = None
    files = []
    for dataset in datasets:
        path = cache / f"{cache_key(weights_hash, dataset.fingerprint(), mixed)}.safetensors"
        files.append(str(path))
        found = _read_cache(path, len(dataset)) if path.is_file() else None
        engine.wait()  # every rank decides from the same file, before the main process may write it
        if found is not None:
            engine.print(f"[reference] {dataset.name or 'pairs'}: reference log-probs from the cache {path}")
        else:
            if live is None:
                live = FrozenReference(engine.prepare_frozen(model), source)
            start = time.time()
            engine.print(f"[reference] precomputing reference log-probs of {len(dataset)} pairs "
                         f"({dataset.name or 'pairs'}) with {source}")
            batch_size = getattr(cfg, "eval_batch_size", None) or cfg.batch_size
            partial = path.with_name(path.stem + ".partial.safetensors")
            found = compute_reference_logps(live, dataset, engine, batch_size, pad_token_id, partial=partial)
            if engine.is_main_process:
                _write_cache(path, *found, metadata={"reference": source, "data": dataset.name or "",
                                                     "pairs": str(len(dataset)), "version": CACHE_VERSION})
                partial.unlink(missing_ok=True)
            engine.print(f"[reference] {dataset.name or 'pairs'}: done in {time.time() - start:.1f}s, cached "
                         f"in {path}")
        engine.wait()
        dataset.add_field(REF_CHOSEN, [float(v) for v in found[0]])
        dataset.add_field(REF_REJECTED, [float(v) for v in found[1]])
    del live, model  # the reference is not needed during training
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return PrecomputedReference(source, files)


def build_reference(
    cfg, policy: torch.nn.Module, engine, datasets: Mapping[str, Any] | Sequence[Any] = (), *, pad_token_id: int = 0
) -> ReferenceModel | None:
    """The reference for ``cfg`` (reference_mode, ref_model_path, policy_model_path, model settings), or None
    when ``cfg.loss_type`` is reference-free. Call it BEFORE ``engine.prepare`` (precomputed mode needs the
    datasets before their loaders exist; its cache key uses the reference's starting weights), and pass the
    prepared policy to ``reference.attach`` afterwards. ``datasets``: every PairDataset the run will batch
    (train and validation; None entries are ignored); ``pad_token_id`` pads the precomputing batches."""
    loss_type = getattr(cfg, "loss_type", "sigmoid")
    mode = getattr(cfg, "reference_mode", "auto")
    if not LOSS_SPECS[loss_type].needs_reference:
        if mode != "auto":
            engine.print(f"[reference] loss_type {loss_type} is reference-free: reference_mode {mode} is ignored")
        return None
    mode = resolve_reference_mode(cfg, policy)
    if mode == "adapter-disabled":
        engine.print("[reference] the policy with its LoRA adapter disabled (no second model in memory)")
        return AdapterDisabledReference(policy, engine.unwrap)
    if mode == "precomputed":
        items = datasets.values() if isinstance(datasets, Mapping) else datasets
        return precompute_reference(cfg, engine, [d for d in items if d is not None], pad_token_id)
    model, source = load_reference_model(cfg, engine)
    return FrozenReference(engine.prepare_frozen(model), source)


__all__ = [
    "ReferenceModel", "FrozenReference", "AdapterDisabledReference",
    "PrecomputedReference", "build_reference", "resolve_reference_mode", "load_reference_model",
    "precompute_reference", "compute_reference_logps", "weights_fingerprint", "cache_key", "is_peft_model",
]
