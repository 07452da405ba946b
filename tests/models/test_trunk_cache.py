"""The cached lower trunk (models/trunk_cache.py) on the tiny model: LoRA on the top layer only, the forward
over cached states gives the full forward's log-probs (every pair layout, policy and adapter-disabled
reference, cache cold and warm) and the same gradients on the LoRA weights; the cache is keyed by content, not
by batch, and refuses a trained lower trunk."""

from __future__ import annotations

import pytest
import torch

from humanalign.config.training import LoraSettings
from humanalign.errors import UserError
from humanalign.models.load import load_causal_lm
from humanalign.models.logprobs import concatenated_forward
from humanalign.models.trunk_cache import decoder_of, install_trunk_cache, row_lengths


def _policies(tmp_path):
    """(plain, cached): the same tiny LoRA policy (top layer adapted, B made non-zero so the adapter matters)."""
    lora = LoraSettings(enabled=True, r=4, alpha=8, dropout=0.0, top_layers=1)
    torch.manual_seed(0)
    plain = load_causal_lm("tiny", lora=lora)
    cached = load_causal_lm("tiny", lora=lora.model_copy(update={"trunk_cache_dir": str(tmp_path / "trunk")}))
    with torch.no_grad():
        for name, p in plain.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.3)
    cached.load_state_dict(plain.state_dict())
    return plain, cached


def test_lora_sits_on_the_top_layers_only(tmp_path):
    plain, _ = _policies(tmp_path)
    trained = {n.split(".layers.")[1].split(".")[0] for n, p in plain.named_parameters() if p.requires_grad}
    assert trained == {"1"}  # the tiny model has 2 layers: only the top one is adapted


@pytest.mark.parametrize("layout", ["shared", "padded", "plain"])
def test_cached_trunk_gives_the_full_forwards_logps_and_lora_gradients(tmp_path, pair_batch, layout):
    _, batch = pair_batch
    plain, cached = _policies(tmp_path)
    store = decoder_of(cached).forward.store
    expected = concatenated_forward(plain, batch, layout=layout)
    loss = (expected["chosen_logps"] - 0.5 * expected["rejected_logps"]).sum()
    loss.backward()
    for warm in (False, True):  # the first forward fills the cache, the second reads it
        cached.zero_grad()
        got = concatenated_forward(cached, batch, layout=layout)
        for key in ("chosen_logps", "rejected_logps"):
            torch.testing.assert_close(got[key], expected[key], atol=1e-5, rtol=0)
        (got["chosen_logps"] - 0.5 * got["rejected_logps"]).sum().backward()
        grads = {n: p.grad for n, p in cached.named_parameters() if p.requires_grad}
        assert grads and all(g is not None and g.abs().sum() > 0 for g in grads.values())
        for name, p in plain.named_parameters():
            if p.requires_grad:
                torch.testing.assert_close(grads[name], p.grad, atol=1e-5, rtol=1e-4)
        assert (store.hits > 0) == warm
    rows = 3 if layout == "shared" else 6  # one row per pair in the shared layout, two otherwise
    assert store.misses == rows and store.hits == rows
    with cached.disable_adapter(), plain.disable_adapter(), torch.no_grad():  # the reference: same cache
        ref_cached = concatenated_forward(cached, batch, layout=layout)["chosen_logps"]
        ref_plain = concatenated_forward(plain, batch, layout=layout)["chosen_logps"]
    torch.testing.assert_close(ref_cached, ref_plain, atol=1e-5, rtol=0)
    assert store.misses == rows  # nothing recomputed
    assert not torch.allclose(ref_plain, expected["chosen_logps"].detach())  # the adapter mattered


def test_a_row_hits_the_cache_whatever_batch_it_is_padded_in(tmp_path, pair_batch):
    """The key is the row's real content: the first pair alone (less padding) reuses the states of the full
    batch's forward."""
    _, batch = pair_batch
    _, cached = _policies(tmp_path)
    store = decoder_of(cached).forward.store
    with torch.no_grad():
        full = concatenated_forward(cached, batch, layout="padded")
        rows = [0, batch["input_ids"].shape[0] // 2]
        width = int(batch["attention_mask"][rows].sum(-1).max())
        one = {k: batch[k][rows, :width] for k in ("input_ids", "labels", "attention_mask")}
        misses = store.misses
        alone = concatenated_forward(cached, one, layout="padded")
    assert store.misses == misses  # both rows came from the cache
    torch.testing.assert_close(alone["chosen_logps"], full["chosen_logps"][:1], atol=1e-5, rtol=0)


def test_generation_keeps_the_plain_forward_and_left_padding_is_not_cached(tmp_path):
    _, cached = _policies(tmp_path)
    store = decoder_of(cached).forward.store
    ids = torch.tensor([[5, 6, 7, 8]])
    with torch.no_grad():
        out = cached.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=3, do_sample=False)
    assert out.shape == (1, 7) and store.misses == store.hits == 0
    assert row_lengths(torch.tensor([[0, 1, 1], [1, 1, 0]]), 2, 3) is None  # left padding: plain forward
    assert row_lengths(torch.tensor([[1, 1, 1], [1, 1, 0]]), 2, 3) == [3, 2]


def test_a_trained_lower_trunk_is_refused(tmp_path):
    everywhere = load_causal_lm("tiny", lora=LoraSettings(enabled=True, r=4, alpha=8, dropout=0.0))
    with pytest.raises(UserError, match="trainable parameters sit in the cached lower trunk"):
        install_trunk_cache(everywhere, 1, tmp_path / "trunk")
    with pytest.raises(ValueError, match="set enabled: true and top_layers"):
        LoraSettings(enabled=True, trunk_cache_dir=str(tmp_path))


def test_a_frozen_reference_of_the_base_fills_the_policys_cache(tmp_path, pair_batch):
    """The precomputed reference loads the base frozen with the policy's LoRA settings: same trunk fingerprint,
    so the rows it forwards are cache hits for the policy, with the adapter-disabled policy's log-probs."""
    _, batch = pair_batch
    lora = LoraSettings(enabled=True, r=4, alpha=8, dropout=0.0, top_layers=1, trunk_cache_dir=str(tmp_path / "t"))
    frozen = load_causal_lm("tiny", lora=lora, trainable=False)
    policy = load_causal_lm("tiny", lora=lora)
    assert not any(p.requires_grad for p in frozen.parameters())
    with torch.no_grad():
        ref = concatenated_forward(frozen, batch, layout="shared")["chosen_logps"]
        store = decoder_of(policy).forward.store
        assert store.folder == decoder_of(frozen).forward.store.folder
        with policy.disable_adapter():
            again = concatenated_forward(policy, batch, layout="shared")["chosen_logps"]
    assert store.misses == 0 and store.hits == 3
    torch.testing.assert_close(again, ref, atol=1e-5, rtol=0)
