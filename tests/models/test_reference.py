"""Reference log-probs three ways (frozen model, adapter disabled, precomputed + cached) give the same loss."""

from __future__ import annotations

import math
import os

import numpy as np
import pytest
import torch

from humanalign.config.base import load_config
from humanalign.config.dpo import DPOConfig
from humanalign.data.preference_dataset import REF_CHOSEN, REF_REJECTED, PairCollator, build_pair_dataset
from humanalign.data.records import PreferencePair, user_prompt
from humanalign.engine import Engine
from humanalign.errors import ConfigError, UserError
from humanalign.models.load import load_causal_lm, load_tokenizer
from humanalign.models.logprobs import concatenated_forward, per_token_kl
from humanalign.models.reference import (
    AdapterDisabledReference,
    FrozenReference,
    PrecomputedReference,
    _read_cache,
    _write_cache,
    build_reference,
    resolve_reference_mode,
    weights_fingerprint,
)
from humanalign.trainers.dpo import LossSettings, pair_loss

PAIRS = [
    PreferencePair(user_prompt("How do I bake simple bread?"),
                   "First, wash and measure the ingredients first. Then, let it rest before serving.",
                   "I'm sorry, but I can't help with that."),
    PreferencePair(user_prompt("How can I sort a list?"), "Use the sorted function.",
                   "That depends on many things. You could search online for more information about programming."),
    PreferencePair(user_prompt("Give me simple steps to start running."),
                   "Start slow with short sessions. Drink water before and after.", "Just try one and see."),
    PreferencePair(user_prompt("What is the best way to grow tomatoes?"), "Choose a sunny spot and water deeply.",
                   "I am not sure. Maybe ask a friend who knows about gardening."),
]


def dpo_config(tmp_path, **values) -> DPOConfig:
    base = dict(output_dir=str(tmp_path / "run"), policy_model_path="tiny", max_length=96, max_prompt_length=32,
                batch_size=4, report_to=["none"], progress_bar=False, precompute_cache_dir=str(tmp_path / "cache"),
                lora={"enabled": True, "r": 4, "alpha": 8, "dropout": 0.0})
    base.update(values)
    return load_config(DPOConfig, values=base)


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer("tiny")


def lora_policy(cfg: DPOConfig):
    torch.manual_seed(0)
    return load_causal_lm(cfg.policy_model_path, cfg.model, cfg.lora)


def perturb_adapter(policy) -> None:
    """Give lora_B non-zero values (it starts at 0): the policy now differs from its base, the reference."""
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, param in policy.named_parameters():
            if "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=gen) * 0.5)


def test_three_modes_give_the_same_loss(tmp_path, tokenizer):
    cfg = dpo_config(tmp_path)
    dataset, skipped, _ = build_pair_dataset(PAIRS, tokenizer, max_length=96, max_prompt_length=32)
    assert len(dataset) == 4 and not skipped
    settings = LossSettings.from_config(cfg)
    with Engine(cfg, name="ref-test") as engine:
        policy = lora_policy(cfg)
        # precomputed first: it is computed from the reference's starting weights, before training moves anything
        precomputed = build_reference(cfg.model_copy(update={"reference_mode": "precomputed"}), policy, engine,
                                      [dataset], pad_token_id=tokenizer.pad_token_id)
        frozen = build_reference(cfg.model_copy(update={"reference_mode": "model"}), policy, engine, [dataset])
        disabled = build_reference(cfg, policy, engine, [dataset])  # auto + LoRA -> adapter-disabled
        assert isinstance(precomputed, PrecomputedReference) and isinstance(frozen, FrozenReference)
        assert isinstance(disabled, AdapterDisabledReference)
        perturb_adapter(policy)  # as if training had moved the policy away from the reference
        batch = PairCollator(tokenizer.pad_token_id)(list(dataset))
        assert REF_CHOSEN in batch and batch[REF_CHOSEN].shape == (4,)

        losses, refs = {}, {}
        for name, ref in (("model", frozen), ("adapter-disabled", disabled), ("precomputed", precomputed)):
            with torch.no_grad():
                losses[name] = pair_loss(policy, ref, batch, settings, beta=0.1).loss.item()
            refs[name] = torch.stack(ref.logps(batch, average=False))  # (2, B)
        with torch.no_grad():
            pol = concatenated_forward(policy, batch)
    # the reference really is the base: the perturbed policy's log-probs differ, and the loss is not ln 2
    assert (torch.stack([pol["chosen_logps"], pol["rejected_logps"]]) - refs["model"]).abs().max() > 1.0
    assert abs(losses["model"] - math.log(2)) > 0.01
    for name in ("adapter-disabled", "precomputed"):
        assert losses[name] == pytest.approx(losses["model"], abs=1e-5), name
        torch.testing.assert_close(refs[name], refs["model"], atol=1e-4, rtol=1e-6)


def test_precomputed_cache_hit_and_key(tmp_path, tokenizer, capsys):
    cfg = dpo_config(tmp_path, reference_mode="precomputed", lora={"enabled": False})
    dataset, _, _ = build_pair_dataset(PAIRS, tokenizer, max_length=96, max_prompt_length=32)
    again, _, _ = build_pair_dataset(PAIRS, tokenizer, max_length=96, max_prompt_length=32)
    with Engine(cfg, name="ref-test") as engine:
        policy = load_causal_lm("tiny")
        first = build_reference(cfg, policy, engine, [dataset])
        capsys.readouterr()
        second = build_reference(cfg, policy, engine, [again])
        err = capsys.readouterr().err
    assert "from the cache" in err and "precomputing" not in err
    assert first.cache_files == second.cache_files and len(list((tmp_path / "cache").glob("*.safetensors"))) == 1
    assert [e[REF_CHOSEN] for e in dataset] == [e[REF_CHOSEN] for e in again]
    assert all(e[REF_CHOSEN] < 0 and e[REF_REJECTED] < 0 for e in dataset)
    # other weights -> another key; other data -> another fingerprint
    model = load_causal_lm("tiny")
    before = weights_fingerprint(model)
    with torch.no_grad():
        next(model.parameters())[0, 0] += 1e-3
    assert weights_fingerprint(model) != before
    shorter, _, _ = build_pair_dataset(PAIRS[:3], tokenizer, max_length=96, max_prompt_length=32)
    assert shorter.fingerprint() != dataset.fingerprint()


class _Interrupted(Exception):
    pass


class _CountingReference:
    """A reference whose ``logps`` counts its batches and raises after ``stop_after`` of them (an interrupt)."""

    def __init__(self, inner, stop_after: int | None = None):
        self.inner, self.stop_after, self.batches = inner, stop_after, 0

    def logps(self, batch, average=False):
        if self.stop_after is not None and self.batches == self.stop_after:
            raise _Interrupted()
        self.batches += 1
        return self.inner.logps(batch, average=average)


def test_an_interrupted_precompute_resumes_where_it_stopped(tmp_path, tokenizer, capsys):
    from humanalign.models.reference import compute_reference_logps

    cfg = dpo_config(tmp_path, reference_mode="precomputed", lora={"enabled": False})
    dataset, _, _ = build_pair_dataset(PAIRS * 6, tokenizer, max_length=96, max_prompt_length=32)  # 24 pairs
    partial = tmp_path / "key.partial.safetensors"
    with Engine(cfg, name="ref-test") as engine:
        frozen = FrozenReference(load_causal_lm("tiny").eval())
        whole = compute_reference_logps(_CountingReference(frozen), dataset, engine, 2, tokenizer.pad_token_id)
        with pytest.raises(_Interrupted):  # 12 batches, progress (and a save) every 1: stopped in batch 6
            compute_reference_logps(_CountingReference(frozen, stop_after=5), dataset, engine, 2,
                                    tokenizer.pad_token_id, partial=partial)
        assert partial.is_file()
        capsys.readouterr()
        rest = _CountingReference(frozen)
        resumed = compute_reference_logps(rest, dataset, engine, 2, tokenizer.pad_token_id, partial=partial)
        # another batch size is another batch order: the partial file is not used
        other = _CountingReference(frozen)
        compute_reference_logps(other, dataset, engine, 3, tokenizer.pad_token_id, partial=partial)
    assert "resuming at batch 6/12" in capsys.readouterr().err
    assert rest.batches == 7 and other.batches == 8
    np.testing.assert_array_equal(resumed[0], whole[0])
    np.testing.assert_array_equal(resumed[1], whole[1])


def test_precompute_removes_its_partial_file(tmp_path, tokenizer):
    cfg = dpo_config(tmp_path, reference_mode="precomputed", lora={"enabled": False})
    dataset, _, _ = build_pair_dataset(PAIRS * 6, tokenizer, max_length=96, max_prompt_length=32)
    cfg = cfg.model_copy(update={"batch_size": 2})
    with Engine(cfg, name="ref-test") as engine:
        build_reference(cfg, load_causal_lm("tiny"), engine, [dataset])
    files = sorted(p.name for p in (tmp_path / "cache").iterdir())
    assert len(files) == 1 and ".partial" not in files[0]


def test_precomputed_average_divides_by_response_tokens():
    # chosen row: 3 response labels, rejected row: 1 -> averages -6/3 = -2 and -4/1 = -4
    labels = torch.tensor([[-100, 5, 6, 7], [-100, -100, 9, -100]])
    batch = {"labels": labels, REF_CHOSEN: torch.tensor([-6.0]), REF_REJECTED: torch.tensor([-4.0])}
    ref = PrecomputedReference()
    assert [t.item() for t in ref.logps(batch, average=False)] == [-6.0, -4.0]
    assert [t.item() for t in ref.logps(batch, average=True)] == [-2.0, -4.0]
    with pytest.raises(UserError, match="KL term needs"):
        ref.forward_logits(batch)
    with pytest.raises(RuntimeError, match="no precomputed"):
        ref.logps({"labels": labels})


def test_adapter_disabled_logits_match_frozen_for_kl(tmp_path, tokenizer):
    cfg = dpo_config(tmp_path)
    dataset, _, _ = build_pair_dataset(PAIRS[:2], tokenizer, max_length=96, max_prompt_length=32)
    batch = PairCollator(tokenizer.pad_token_id)(list(dataset))
    with Engine(cfg, name="ref-test") as engine:
        policy = lora_policy(cfg)
        perturb_adapter(policy)
        policy.train()
        disabled = AdapterDisabledReference(policy, engine.unwrap)
        frozen = FrozenReference(engine.prepare_frozen(load_causal_lm("tiny", trainable=False)))
        a, b = disabled.forward_logits(batch), frozen.forward_logits(batch)
        assert policy.training  # restored after the reference forward
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
        assert not a.requires_grad
        # KL(policy || reference) > 0 once the adapter moved, and exactly 0 against itself
        with torch.no_grad():
            logits = policy(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        assert per_token_kl(logits, a, batch["labels"]).min() > 0
        assert per_token_kl(b, a, batch["labels"]).abs().max() < 1e-5


def test_mode_resolution(tmp_path):
    lora_cfg = dpo_config(tmp_path)
    full_cfg = dpo_config(tmp_path, lora={"enabled": False})
    lora_model, full_model = lora_policy(lora_cfg), load_causal_lm("tiny")
    assert resolve_reference_mode(lora_cfg, lora_model) == "adapter-disabled"
    assert resolve_reference_mode(full_cfg, full_model) == "model"
    assert resolve_reference_mode(lora_cfg.model_copy(update={"ref_model_path": "tiny"}), lora_model) == "model"
    with pytest.raises(ConfigError, match="needs a LoRA policy"):
        resolve_reference_mode(full_cfg.model_copy(update={"reference_mode": "adapter-disabled"}), full_model)
    with pytest.raises(ConfigError, match="ref_model_path"):
        resolve_reference_mode(lora_cfg.model_copy(update={"reference_mode": "adapter-disabled",
                                                           "ref_model_path": "tiny"}), lora_model)


def test_reference_free_losses_load_nothing(tmp_path, capsys):
    for loss_type in ("cpo", "orpo", "simpo"):
        cfg = dpo_config(tmp_path, loss_type=loss_type, reference_mode="model", overwrite_output_dir=True)
        with Engine(cfg, name="ref-test") as engine:
            assert build_reference(cfg, load_causal_lm("tiny"), engine) is None
        assert "reference-free" in capsys.readouterr().err


def test_reference_cache_file_is_readable_like_any_result(tmp_path):
    """The cache file gets the umask's usual mode (0644 under 022), not safetensors' 0600, and reads back."""
    umask = os.umask(0)
    os.umask(umask)
    path = tmp_path / "cache" / "x.safetensors"
    _write_cache(path, np.arange(3, dtype=np.float32), np.ones(3, dtype=np.float32), {"k": "v"})
    assert path.stat().st_mode & 0o777 == 0o666 & ~umask
    chosen, rejected = _read_cache(path, 3)
    assert chosen.tolist() == [0.0, 1.0, 2.0] and rejected.tolist() == [1.0, 1.0, 1.0]
