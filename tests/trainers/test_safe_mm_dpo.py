"""The Safe-MM-DPO trainer: two streams sharing their responses, the reductions to DPO and MM-DPO on a real
tiny-model batch, the exact KL term, margins from score models (cached) and their degeneracy warnings, and
end-to-end runs: held-out harmless accuracy rises, lambda follows the constraint, resume == uninterrupted."""

from __future__ import annotations

import json
import math
from contextlib import nullcontext
from functools import partial
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from humanalign.cli import main
from humanalign.config.base import load_config
from humanalign.config.safe_mm_dpo import SafeMMDPOConfig
from humanalign.data.joint_pairs import (
    HARMLESS,
    HELPFUL,
    NOT_SHARED,
    JointCollator,
    JointDataset,
    StreamView,
    match_streams,
)
from humanalign.data.pairs import load_preference_pairs
from humanalign.data.preference_dataset import PairCollator, build_pair_dataset
from humanalign.errors import ConfigError
from humanalign.losses.preference import dpo_loss
from humanalign.models.load import load_causal_lm, load_tokenizer
from humanalign.models.logprobs import concatenated_forward
from humanalign.models.margins import attach_margins, label_costs
from humanalign.models.reference import FrozenReference
from humanalign.paths import PROJECT_ROOT
from humanalign.trainers.dpo import LossSettings, pair_loss
from humanalign.trainers.safe_mm_dpo import StepSettings, score_on_ranks, step_loss

LN2 = math.log(2.0)


# ----------------------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def demo_data(tmp_path_factory) -> Path:
    """The demo set (600 records) prepared: 485 / 59 / 56 helpful pairs and as many harmless pairs, which
    come from the same records (same prompt, same two responses, ordered by helpfulness and by safety)."""
    from humanalign.config.data import PrepareDataConfig
    from humanalign.data.demo_data import write_demo_raw
    from humanalign.data.prepare import run as prepare

    root = tmp_path_factory.mktemp("smd_demo")
    raw = write_demo_raw(root / "raw", n=600, seed=0)
    prepare(load_config(PrepareDataConfig, values={"input_dir": str(raw.parent), "output_dir": str(root / "data"),
                                                   "seed": 0}))
    return root / "data"


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer("tiny")


def _datasets(demo_data, tokenizer, split="val", n=None):
    out = {}
    for kind in (HELPFUL, HARMLESS):
        pairs, _ = load_preference_pairs(demo_data / split / f"{kind}_pairs.jsonl", kind=kind)
        out[kind], _, _ = build_pair_dataset(pairs[:n] if n else pairs, tokenizer, max_length=96, max_prompt_length=32)
    return out[HELPFUL], out[HARMLESS]


@pytest.fixture(scope="module")
def val_streams(demo_data, tokenizer):
    """Validation helpful and harmless pairs with hand-set margins and label costs."""
    helpful, harmless = _datasets(demo_data, tokenizer)
    helpful.add_field("delta", [(0.0, 0.5, 2.0, -1.0)[i % 4] for i in range(len(helpful))])
    harmless.add_field("delta", [(1.0, 0.0, -0.5, 3.0)[i % 4] for i in range(len(harmless))])
    chosen, rejected, has = label_costs(harmless.pairs)
    harmless.add_field("cost_chosen", chosen)
    harmless.add_field("cost_rejected", rejected)
    harmless.add_field("has_cost", has)
    return helpful, harmless


@pytest.fixture(scope="module")
def models():
    """A policy moved away from the tiny model (so log-ratios are not 0) and the tiny model as reference."""
    torch.manual_seed(0)
    policy = load_causal_lm("tiny")
    with torch.no_grad():
        for p in policy.parameters():
            p.add_(0.05 * torch.randn_like(p))
    policy.eval()  # no dropout: the tiny model has none, but keep the test independent of it
    return policy, FrozenReference(load_causal_lm("tiny", trainable=False))


def _shared_items(helpful, harmless, n=4):
    matched = match_streams(helpful, harmless)[:n]
    return matched


def _joint_batch(helpful, harmless, items, tokenizer):
    dataset = JointDataset(helpful, harmless, items)
    return JointCollator(tokenizer.pad_token_id)([dataset[i] for i in range(len(dataset))])


SETTINGS = StepSettings(beta_ori=0.1, w=0.5, k=0.5, kl_coeff=0.0, average=False)


# ----------------------------------------------------------------------------------------- reductions


def _dpo_reference_values(policy, reference, dataset, indices, tokenizer):
    """Policy and reference summed log-probs of pairs, through DPO's own batch and forward."""
    batch = PairCollator(tokenizer.pad_token_id)([dataset[i] for i in indices])
    out = concatenated_forward(policy, batch)
    ref_c, ref_r = reference.logps(batch)
    return batch, out["chosen_logps"], out["rejected_logps"], ref_c, ref_r


def test_lambda_0_w_0_kl_0_equals_dpo_on_a_real_batch(val_streams, models, tokenizer):
    helpful, harmless = val_streams
    policy, reference = models
    items = _shared_items(helpful, harmless, 4)
    batch = _joint_batch(helpful, harmless, items, tokenizer)
    settings = StepSettings(beta_ori=0.1, w=0.0, k=0.5, kl_coeff=0.0, average=False)
    ours = step_loss(policy, reference, batch, settings, lam=0.0, with_kl=False)

    help_batch, pc, pr, rc, rr = _dpo_reference_values(policy, reference, helpful, [i for i, _, _ in items], tokenizer)
    theirs = dpo_loss(pc, pr, rc, rr, beta=0.1).losses.mean()
    trainer_dpo = pair_loss(policy, reference, help_batch, LossSettings("sigmoid", False), beta=0.1).loss
    assert abs(theirs.item() - LN2) > 1e-3  # the policy is not the reference: a real, non-trivial loss
    assert ours.loss.item() == pytest.approx(theirs.item(), abs=1e-6)
    assert ours.loss.item() == pytest.approx(trainer_dpo.item(), abs=1e-6)
    # the margins (0, 0.5, 2, -1) do not matter with w = 0: every beta is beta_ori
    assert ours.metrics["beta_helpful_mean"].item() == pytest.approx(0.1, abs=1e-7)
    # the same gradient as DPO's on the policy's weights
    g_ours = torch.autograd.grad(ours.loss, policy.lm_head.weight)[0]
    g_dpo = torch.autograd.grad(trainer_dpo, policy.lm_head.weight)[0]
    torch.testing.assert_close(g_ours, g_dpo, atol=1e-6, rtol=1e-4)


def test_no_safety_stream_equals_mm_dpo(val_streams, models, tokenizer):
    helpful, _ = val_streams
    policy, reference = models
    view = StreamView(helpful, HELPFUL)
    batch = JointCollator(tokenizer.pad_token_id)([view[i] for i in range(4)])
    ours = step_loss(policy, reference, batch, SETTINGS, lam=3.0, with_kl=False)  # lambda unused without safety

    _, pc, pr, rc, rr = _dpo_reference_values(policy, reference, helpful, range(4), tokenizer)
    # beta = 0.1 (1 + 0.5 (1 - exp(-0.5 max(delta, 0)))) for delta (0, 0.5, 2, -1):
    #   0.1; 0.1 (1 + 0.5 (1 - e^-0.25)) = 0.1 x 1.1105996 = 0.11106; 0.1 (1 + 0.5 (1 - e^-1)) = 0.131606; 0.1
    beta = torch.tensor([0.1, 0.11105996, 0.13160603, 0.1])
    mm_dpo = dpo_loss(pc, pr, rc, rr, beta=beta).losses.mean()
    assert ours.loss.item() == pytest.approx(mm_dpo.item(), abs=1e-6)
    assert ours.metrics["beta_helpful_mean"].item() == pytest.approx(beta.mean().item(), abs=1e-6)
    assert ours.metrics["loss_safety"].item() == 0.0 and "accuracy_safety" not in ours.metrics


def test_both_streams_combine_as_the_lagrangian(val_streams, models, tokenizer):
    """L = (L_help + lambda L_safe) / (1 + lambda) with each stream's DPO loss at its own per-pair betas."""
    helpful, harmless = val_streams
    policy, reference = models
    items = _shared_items(helpful, harmless, 4)
    batch = _joint_batch(helpful, harmless, items, tokenizer)
    ours = step_loss(policy, reference, batch, SETTINGS, lam=2.0, with_kl=False)

    def stream_loss(dataset, indices, deltas):
        _, pc, pr, rc, rr = _dpo_reference_values(policy, reference, dataset, indices, tokenizer)
        beta = 0.1 * (1 + 0.5 * (1 - torch.exp(-0.5 * torch.tensor(deltas).clamp(min=0))))
        return dpo_loss(pc, pr, rc, rr, beta=beta).losses.mean(), (pc - rc) - (pr - rr), beta

    l_help, _, _ = stream_loss(helpful, [i for i, _, _ in items], [helpful[i]["delta"] for i, _, _ in items])
    l_safe, h_safe, beta_s = stream_loss(harmless, [j for _, j, _ in items], [harmless[j]["delta"] for _, j, _ in items])
    assert ours.loss.item() == pytest.approx(((l_help + 2.0 * l_safe) / 3.0).item(), abs=1e-6)
    assert ours.metrics["loss_safety"].item() == pytest.approx(l_safe.item(), abs=1e-6)
    # J = p C_w + (1 - p) C_l with p = sigmoid(beta_s h_safe), costs from labels (-1 safe, +1 unsafe)
    p = torch.sigmoid(beta_s * h_safe)
    c_w = torch.tensor([harmless[j]["cost_chosen"] for _, j, _ in items])
    c_l = torch.tensor([harmless[j]["cost_rejected"] for _, j, _ in items])
    torch.testing.assert_close(ours.streams[HARMLESS].cost, p * c_w + (1 - p) * c_l, atol=1e-6, rtol=0)


def test_sharing_responses_changes_no_number(val_streams, models, tokenizer):
    helpful, harmless = val_streams
    policy, reference = models
    items = _shared_items(helpful, harmless, 4)
    settings = StepSettings(beta_ori=0.1, w=0.5, k=0.5, kl_coeff=0.05, average=False)
    shared = step_loss(policy, reference, _joint_batch(helpful, harmless, items, tokenizer), settings, 1.5, True)
    apart = step_loss(policy, reference, _joint_batch(helpful, harmless, [(i, j, NOT_SHARED) for i, j, _ in items],
                                                      tokenizer), settings, 1.5, True)
    assert shared.loss.item() == pytest.approx(apart.loss.item(), abs=1e-6)
    for key, value in shared.metrics.items():
        assert value.item() == pytest.approx(apart.metrics[key].item(), rel=1e-5, abs=1e-6), key


@pytest.mark.parametrize("average", [False, True])
def test_precomputed_reference_gives_the_same_loss(val_streams, models, tokenizer, average):
    """Reference log-probs carried in the batch (summed, as the precomputed cache stores them) give the same loss
    as the live frozen reference, with summed and with averaged log-probs."""
    from humanalign.data.preference_dataset import PairDataset
    from humanalign.models.reference import PrecomputedReference

    helpful, harmless = val_streams
    policy, reference = models
    items = _shared_items(helpful, harmless, 4)
    carried = []
    for dataset, indices in ((helpful, [i for i, _, _ in items]), (harmless, [j for _, j, _ in items])):
        examples = [dict(dataset[i]) for i in indices]
        for example in examples:
            batch = PairCollator(tokenizer.pad_token_id)([example])
            chosen, rejected = reference.logps(batch)
            example["ref_chosen_logps"], example["ref_rejected_logps"] = chosen.item(), rejected.item()
        carried.append(PairDataset(examples, [dataset.pairs[i] for i in indices]))
    same_items = [(k, k, rel) for k, (_, _, rel) in enumerate(items)]
    settings = StepSettings(beta_ori=0.1, w=0.5, k=0.5, kl_coeff=0.0, average=average)
    live = step_loss(policy, reference, _joint_batch(helpful, harmless, items, tokenizer), settings, 1.0, False)
    cached = step_loss(policy, PrecomputedReference(), _joint_batch(*carried, same_items, tokenizer), settings, 1.0,
                       with_kl=True)  # no logits to compare with: the KL is skipped, not an error
    assert cached.loss.item() == pytest.approx(live.loss.item(), abs=1e-6)
    assert "kl_divergence" not in cached.metrics


def test_kl_term_is_the_exact_token_mean_kl(val_streams, models, tokenizer):
    helpful, harmless = val_streams
    policy, reference = models
    batch = _joint_batch(helpful, harmless, _shared_items(helpful, harmless, 3), tokenizer)
    with_kl = StepSettings(beta_ori=0.1, w=0.5, k=0.5, kl_coeff=0.2, average=False)
    out = step_loss(policy, reference, batch, with_kl, lam=1.0, with_kl=True)
    base = step_loss(policy, reference, batch, SETTINGS, lam=1.0, with_kl=False)

    # direct: over every response position of every distinct sequence, sum_v p (log p - log q), then the mean
    logits_p = policy(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1]
    with torch.no_grad():
        logits_q = reference.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1]
    mask = batch["labels"][:, 1:] != -100  # (N, T-1)
    log_p, log_q = F.log_softmax(logits_p.float(), -1), F.log_softmax(logits_q.float(), -1)
    kl_direct = (log_p.exp() * (log_p - log_q)).sum(-1)[mask].mean()
    assert kl_direct.item() > 1e-3  # the policy was moved: a real divergence
    assert out.metrics["kl_divergence"].item() == pytest.approx(kl_direct.item(), rel=1e-5)
    assert out.metrics["loss_kl"].item() == pytest.approx(0.2 * kl_direct.item(), rel=1e-5)
    assert out.loss.item() == pytest.approx(base.loss.item() + 0.2 * kl_direct.item(), abs=2e-6)
    # its gradient is kl_coeff x the gradient of the direct KL
    weight = policy.lm_head.weight
    g_kl = torch.autograd.grad(out.loss, weight)[0] - torch.autograd.grad(base.loss, weight)[0]
    torch.testing.assert_close(g_kl, 0.2 * torch.autograd.grad(kl_direct, weight)[0], atol=1e-6, rtol=1e-4)
    # with kl_coeff 0 the KL is measured but carries no gradient and no loss
    measured = step_loss(policy, reference, batch, SETTINGS, lam=1.0, with_kl=True)
    assert measured.metrics["kl_divergence"].item() == pytest.approx(kl_direct.item(), rel=1e-5)
    assert measured.loss.item() == pytest.approx(base.loss.item(), abs=2e-6)
    assert not measured.kl_parts[0].requires_grad


@pytest.mark.parametrize("lora", [False, True])
def test_kl_step_on_the_fast_forward_equals_the_full_logits_step(val_streams, models, tokenizer, monkeypatch, lora):
    """A KL step computes the KL from each model's LM head on the response positions only (models/kl.py); the
    full-logits KL (the plain forward of both models, kept for models without the fast path) gives the same
    loss, metrics and policy gradients: frozen-model reference, and a LoRA policy against its own base."""
    import humanalign.trainers.safe_mm_dpo as trainer
    from humanalign.config.training import LoraSettings
    from humanalign.models.reference import AdapterDisabledReference

    helpful, harmless = val_streams
    policy, reference = models
    if lora:
        torch.manual_seed(0)
        policy = load_causal_lm("tiny", lora=LoraSettings(enabled=True, r=4, alpha=8, dropout=0.0))
        with torch.no_grad():
            for name, param in policy.named_parameters():
                if "lora_B" in name:
                    param.normal_(0, 0.3)
        reference = AdapterDisabledReference(policy)
    batch = _joint_batch(helpful, harmless, _shared_items(helpful, harmless, 3), tokenizer)
    settings = StepSettings(beta_ori=0.1, w=0.5, k=0.5, kl_coeff=0.05, average=False)
    trained = [p for p in policy.parameters() if p.requires_grad]
    runs, fast_results, fast_forward = {}, [], trainer.pair_kl_forward
    for path, forward in (("fast", lambda *a, **k: fast_results.append(fast_forward(*a, **k)) or fast_results[-1]),
                          ("plain", lambda *args, **kwargs: None)):
        monkeypatch.setattr(trainer, "pair_kl_forward", forward)
        out = step_loss(policy, reference, batch, settings, lam=1.0, with_kl=True)
        runs[path] = (out, torch.autograd.grad(out.loss, trained))
    assert len(fast_results) == 1 and fast_results[0] is not None  # the fast step did take the fast path
    (fast, fast_grads), (plain, plain_grads) = runs["fast"], runs["plain"]
    assert fast.metrics["kl_divergence"].item() > 1e-3  # a real divergence
    for key, value in plain.metrics.items():
        assert fast.metrics[key].item() == pytest.approx(value.item(), rel=1e-5, abs=1e-6), key
    for got, expected in zip(fast_grads, plain_grads):
        assert (got - expected).abs().max().item() <= 1e-5 * max(expected.abs().max().item(), 1e-3)


# ----------------------------------------------------------------------------------------- margins
# (their statistics and the J_c range: tests/models/test_margins.py)


def _scoring(cfg, engine):
    """The trainer's ``score`` and ``say`` for ``attach_margins``, on a stand-in engine."""
    return partial(score_on_ranks, cfg, engine), engine.print


def _score_model(root: Path, name: str, score_type: str, scale: float) -> Path:
    from humanalign.models.score_model import load_score_model, save_score_model

    torch.manual_seed(1 if score_type == "reward" else 2)
    model, tok = load_score_model("tiny")
    with torch.no_grad():
        for p in model.model.score.parameters():
            p.mul_(scale)  # scale 0: every score 0 (a degenerate model); 50: scores spread over several units
    save_score_model(model, tok, root / name, score_type=score_type)
    return root / name


@pytest.fixture
def score_cache(tmp_path, monkeypatch) -> Path:
    """A fresh cache folder (scores cached by a test stay in it) that still holds the built tiny model."""
    from humanalign.models.tiny import tiny_model_path

    tiny = tiny_model_path()
    root = tmp_path / "cache"
    root.mkdir()
    (root / tiny.name).symlink_to(tiny, target_is_directory=True)
    monkeypatch.setenv("HUMANALIGN_CACHE", str(root))
    return root


@pytest.fixture(scope="module")
def score_models(tmp_path_factory):
    root = tmp_path_factory.mktemp("smd_rms")
    return {"helpful": _score_model(root, "helpful_rm", "reward", 50.0),
            "harmless": _score_model(root, "harmless_rm", "cost", 50.0),
            "flat": _score_model(root, "flat_rm", "reward", 0.0)}


def test_margins_come_from_the_score_models_once(demo_data, tokenizer, score_models, score_cache, monkeypatch):
    from humanalign.models.scorer import Scorer, load_scorer

    printed: list[str] = []
    engine = SimpleNamespace(print=printed.append, device=torch.device("cpu"), is_main_process=True,
                             wait=lambda: None, loading_whole_models=nullcontext)
    cfg = load_config(SafeMMDPOConfig, values={"helpful_rm_path": str(score_models["helpful"]),
                                               "harmless_rm_path": str(score_models["harmless"])})
    helpful, harmless = _datasets(demo_data, tokenizer, n=20)
    streams = {HELPFUL: {"train": helpful}, HARMLESS: {"train": harmless}}
    summary, scorer = attach_margins(cfg, streams, *_scoring(cfg, engine))
    assert scorer is None  # pairwise expected cost: the cost model is not kept

    reward, cost = load_scorer(str(score_models["helpful"])), load_scorer(str(score_models["harmless"]))
    r_w, r_l = reward.score_pairs(helpful.pairs)
    c_w, c_l = cost.score_pairs(harmless.pairs)
    for i in range(20):
        assert helpful[i]["delta"] == pytest.approx(r_w[i] - r_l[i], abs=1e-5)  # delta_h = R(y_w) - R(y_l)
        assert harmless[i]["delta"] == pytest.approx(c_l[i] - c_w[i], abs=1e-5)  # delta_s = C(y_l) - C(y_w)
        assert harmless[i]["cost_chosen"] == pytest.approx(c_w[i], abs=1e-5)
        assert harmless[i]["cost_rejected"] == pytest.approx(c_l[i], abs=1e-5) and harmless[i]["has_cost"] == 1.0
    assert max(abs(helpful[i]["delta"]) for i in range(20)) > 0.1  # the scaled head spreads the scores
    assert summary[HELPFUL]["margins"]["n"] == 20 and 0 <= summary[HARMLESS]["cost_sign_accuracy"] <= 1
    assert any(line.startswith("[margins] helpful delta_h: n 20, mean") for line in printed)
    assert f"[margins] scored 20 helpful pairs with {score_models['helpful']} (cached on disk)" in printed

    # a second run reads every score from the disk cache: the models are never called
    def no_forward(self, *args, **kwargs):
        raise AssertionError("scored again instead of reading the cache")

    monkeypatch.setattr(Scorer, "score_ids", no_forward)
    again_h, again_s = _datasets(demo_data, tokenizer, n=20)
    attach_margins(cfg, {HELPFUL: {"train": again_h}, HARMLESS: {"train": again_s}}, *_scoring(cfg, engine))
    assert [e["delta"] for e in again_h] == [e["delta"] for e in helpful]


def test_flat_reward_model_warns_with_statistics(demo_data, tokenizer, score_models, score_cache):
    printed: list[str] = []
    engine = SimpleNamespace(print=printed.append, device=torch.device("cpu"), is_main_process=True,
                             wait=lambda: None, loading_whole_models=nullcontext)
    cfg = load_config(SafeMMDPOConfig, values={"helpful_rm_path": str(score_models["flat"]), "harmless_rm_path": None})
    helpful, harmless = _datasets(demo_data, tokenizer, n=12)
    streams = {HELPFUL: {"train": helpful}, HARMLESS: {"train": harmless}}
    summary, _ = attach_margins(cfg, streams, *_scoring(cfg, engine))
    assert all(e["delta"] == 0.0 for e in helpful)  # zero head: R = bias for every answer
    warning = [line for line in printed if "look degenerate" in line]
    assert len(warning) == 1 and "100% of margins are within 1e-3 of 0" in warning[0]
    assert summary[HELPFUL]["margins"]["near_zero"] == 1.0
    # no cost model: costs from the labels, -1 safe / +1 unsafe, delta_s = 0
    assert summary[HARMLESS]["model"] is None and summary[HARMLESS]["pairs_with_costs"] == 12
    assert any("J_c is" in line and "for a policy that always prefers the safer answer" in line for line in printed)
    for e, pair in zip(harmless, harmless.pairs):
        assert e["cost_chosen"] == (-1.0 if pair.is_chosen_safe else 1.0) and e["delta"] == 0.0


def test_config_guards():
    with pytest.raises(ConfigError, match="precomputed"):
        load_config(SafeMMDPOConfig, values={"kl_coeff": 0.1, "reference_mode": "precomputed"})
    with pytest.raises(ConfigError, match="harmless_rm_path"):
        load_config(SafeMMDPOConfig, values={"expected_cost": "sampled", "sampled_prompts_path": "p.jsonl",
                                             "harmless_rm_path": None})
    with pytest.raises(ConfigError, match="exceeds lambda_max"):
        load_config(SafeMMDPOConfig, values={"λ_init": 5.0, "lambda_max": 2.0})


# ----------------------------------------------------------------------------------------- end to end


def read_metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text(encoding="utf-8").splitlines()]


def train_lines(run_dir: Path) -> dict[int, dict]:
    return {m["step"]: m for m in read_metrics(run_dir) if "train/loss_total" in m}


def _values(demo_data: Path, out: Path, **extra) -> dict:
    return {"train_helpful_path": str(demo_data / "train" / "helpful_pairs.jsonl"),
            "train_harmless_path": str(demo_data / "train" / "harmless_pairs.jsonl"),
            "val_helpful_path": str(demo_data / "val" / "helpful_pairs.jsonl"),
            "val_harmless_path": str(demo_data / "val" / "harmless_pairs.jsonl"),
            "output_dir": str(out), "report_to": ["none"], **extra}


@pytest.mark.slow
def test_tiny_end_to_end_harmless_accuracy_rises_and_lambda_follows_the_constraint(demo_data, tmp_path):
    """configs/safe_mm_dpo_tiny.yaml (labels as costs: -1 safe, +1 unsafe; d = -0.6) on the demo pairs (485 train,
    59 held out per stream), 24 steps of 8 + 8 pairs.

    Measured (seed 0; seeds 1 and 2 alike): held-out harmless implicit accuracy 0 -> 1.0, helpful 0 -> 0.85,
    held-out expected cost -0.46 -> -0.81. The window's J_c starts at -0.38 (above d), so lambda rises from 1 to
    1.71 by step 10; J_c crosses d at step 10 as the policy learns to prefer the safer answers, and lambda falls
    back to 0.58. Every update moved lambda by exactly lambda_lr x (J_c - d) (clamped to [0, 10])."""
    from humanalign.trainers.safe_mm_dpo import run

    cfg = load_config(SafeMMDPOConfig, PROJECT_ROOT / "configs" / "safe_mm_dpo_tiny.yaml",
                      values=_values(demo_data, tmp_path / "run", max_steps=24, eval_steps=None, save_steps=None))
    result = run(cfg)
    before, after = result["before"], result["after"]
    assert before["harmless_accuracy"] == 0.5 and before["helpful_accuracy"] == 0.5  # policy == reference: ties, 1/2 each
    assert after["harmless_accuracy"] >= 0.9  # measured 1.0 (59 held-out pairs)
    assert after["helpful_accuracy"] >= 0.7  # measured 0.85
    # p = 1/2 on every pair at the start: J = (C_w + C_l) / 2, i.e. -1 (both safe), 0 (one unsafe), +1 (both unsafe)
    assert before["expected_cost"] == pytest.approx(-27 / 59, abs=1e-6)  # measured -0.4576 = -27/59
    assert after["expected_cost"] < before["expected_cost"] - 0.2  # measured -0.46 -> -0.81

    lam = result["lambda"]
    path = dict((s, v) for s, v in lam["path"])
    assert lam["updates"] == 24 and len(lam["expected_cost_path"]) == 24
    for step, j_c in lam["expected_cost_path"]:  # the direction (and size) the constraint asks for
        expected = min(max(path[step - 1] + 0.5 * (j_c - (-0.6)), 0.0), 10.0)
        assert path[step] == pytest.approx(expected, abs=1e-9), step
    rises = [j for _, j in lam["expected_cost_path"] if j > -0.6]
    falls = [j for _, j in lam["expected_cost_path"] if j < -0.6]
    assert rises and falls  # the run saw both sides of the constraint
    values = [v for _, v in lam["path"]]
    assert max(values) > 1.3 and values[-1] < max(values) - 0.5  # measured: up to 1.71, then down to 0.58
    first, last = [j for _, j in lam["expected_cost_path"][:6]], [j for _, j in lam["expected_cost_path"][-6:]]
    assert sum(last) / 6 < sum(first) / 6 - 0.1  # J_c fell as safety was learned
    written = json.loads((tmp_path / "run" / "final_metrics.json").read_text(encoding="utf-8"))
    assert written["after"] == after and written["lambda"]["path"] == lam["path"]
    line = train_lines(tmp_path / "run")[24]
    for key in ("loss_total", "loss_helpful", "loss_safety", "loss_kl", "reward_helpful_mean", "reward_safety_mean",
                "delta_helpful_mean", "delta_safety_mean", "lambda", "beta_helpful_mean", "beta_safety_mean",
                "kl_divergence", "perplexity", "expected_cost", "accuracy_helpful", "accuracy_safety"):
        assert f"train/{key}" in line, key


@pytest.mark.slow
def test_resume_equals_an_uninterrupted_run(demo_data, score_models, score_cache, tmp_path, monkeypatch):
    """Through the CLI, with reward-model margins and the cost model's costs: a run killed after step 5 (last
    checkpoint at 4) and resumed ends with the same losses (1e-6) and the same lambda, window included."""
    from humanalign.engine import Engine

    args = ["--helpful-rm-path", str(score_models["helpful"]), "--harmless-rm-path", str(score_models["harmless"]),
            "--max-steps", "7", "--save-steps", "2", "--logging-steps", "1", "--eval-steps", "4", "--batch-size", "4",
            "--set", "cost_window_size=12", "--set", "λ_lr=0.3", "--set", "kl_coeff=0.05", "--set", "lr_scheduler=cosine",
            "--set", "gradient_accumulation_steps=2", "--set", "report_to=[none]",
            "--set", "cost_threshold=-3.1"]  # near the random cost head's J_c: lambda moves both ways
    for kind in (HELPFUL, HARMLESS):  # small files: 59 training pairs per stream, 56 held out
        args += [f"--train-{kind}-path", str(demo_data / "val" / f"{kind}_pairs.jsonl"),
                 f"--val-{kind}-path", str(demo_data / "test" / f"{kind}_pairs.jsonl")]
    config = str(PROJECT_ROOT / "configs" / "safe_mm_dpo_tiny.yaml")

    def train(out: Path, *extra: str) -> int:
        return main(["train", "safe-mm-dpo", "--config", config, "--output-dir", str(out),
                     "--logging-dir", str(out / "logs"), *args, *extra])

    assert train(tmp_path / "whole") == 0
    original = Engine.optimizer_step

    def crash_in_step_5(self):
        result = original(self)
        if self.step == 5:
            raise KeyboardInterrupt("simulated kill")
        return result

    monkeypatch.setattr(Engine, "optimizer_step", crash_in_step_5)
    assert train(tmp_path / "crashed") == 130  # the CLI's exit code for an interrupt
    monkeypatch.setattr(Engine, "optimizer_step", original)
    assert (tmp_path / "crashed" / "checkpoint-4").is_dir()
    assert train(tmp_path / "crashed", "--resume-from-checkpoint", str(tmp_path / "crashed" / "checkpoint-4")) == 0

    a, b = train_lines(tmp_path / "whole" / "logs"), train_lines(tmp_path / "crashed" / "logs")
    assert sorted(a) == sorted(b) == list(range(1, 8))
    for step in a:
        for key in ("train/loss_total", "train/loss_safety", "train/kl_divergence", "train/expected_cost"):
            assert b[step][key] == pytest.approx(a[step][key], abs=1e-6), (step, key)
        assert b[step]["train/lambda"] == a[step]["train/lambda"], step
    fa = json.loads((tmp_path / "whole" / "final_metrics.json").read_text(encoding="utf-8"))
    fb = json.loads((tmp_path / "crashed" / "final_metrics.json").read_text(encoding="utf-8"))
    assert fb["lambda"]["path"] == fa["lambda"]["path"] and fb["lambda"]["final"] == fa["lambda"]["final"]
    assert len({v for _, v in fa["lambda"]["path"]}) == 8  # lambda moved at every step
    assert fb["before"] == fa["before"]  # the baseline survives the resume (kept in the checkpoint)
    assert abs(fa["margins"][HELPFUL]["margins"]["mean"]) > 0  # real reward-model margins were used


@pytest.mark.slow
def test_sampled_expected_cost_drives_lambda(demo_data, score_models, score_cache, tmp_path):
    """expected_cost: sampled, on a LoRA policy (reference = the adapter disabled): at each update the policy
    answers the next 3 held-out prompts (temperature 1), the cost model scores them, and lambda moves by
    lambda_lr x (their mean cost - d)."""
    from humanalign.data.demo_data import demo_prompts
    from humanalign.data.io import atomic_write_jsonl
    from humanalign.trainers.safe_mm_dpo import run

    prompts = tmp_path / "prompts.jsonl"
    atomic_write_jsonl(prompts, [{"prompt": p} for p in demo_prompts("harmful", 5)])
    values = _values(demo_data, tmp_path / "run", train_helpful_path=str(demo_data / "val" / "helpful_pairs.jsonl"),
                     train_harmless_path=str(demo_data / "val" / "harmless_pairs.jsonl"), val_helpful_path=None,
                     val_harmless_path=None, helpful_rm_path=None, harmless_rm_path=str(score_models["harmless"]),
                     expected_cost="sampled", sampled_prompts_path=str(prompts), sampled_num_prompts=3,
                     sampled_max_new_tokens=8, cost_window_size=3, max_steps=3, batch_size=4, logging_steps=1,
                     cost_threshold=-2.0, eval_on_start=False, lora={"enabled": True, "r": 4, "alpha": 8},
                     measure_kl=False)
    values["λ_lr"] = 0.25
    result = run(load_config(SafeMMDPOConfig, PROJECT_ROOT / "configs" / "safe_mm_dpo_tiny.yaml", values=values))
    sampled = {m["step"]: m["train/expected_cost_sampled"] for m in read_metrics(tmp_path / "run")
               if "train/expected_cost_sampled" in m}
    assert sorted(sampled) == [1, 2, 3] and len(set(sampled.values())) == 3  # new answers (and prompts) each time
    path = dict((s, v) for s, v in result["lambda"]["path"])
    for step in (1, 2, 3):  # the window holds exactly the 3 costs of this round
        assert result["lambda"]["expected_cost_path"][step - 1] == [step, pytest.approx(sampled[step], abs=1e-6)]
        assert path[step] == pytest.approx(max(path[step - 1] + 0.25 * (sampled[step] + 2.0), 0.0), abs=1e-9)
    assert result["before"] is None and result["after"] is None  # no validation pairs given
    assert (tmp_path / "run" / "final" / "adapter_config.json").is_file()  # a PEFT adapter folder
    lines = train_lines(tmp_path / "run")
    assert sorted(lines) == [1, 2, 3] and not any("train/kl_divergence" in m for m in lines.values())  # measure_kl off


@pytest.mark.slow
def test_two_processes_match_one_process(demo_data, tmp_path):
    """torchrun with 2 CPU processes (gloo) x 4 + 4 pairs against 1 process x 8 + 8: the engine gives both the
    same pairs per step, the costs of both ranks' harmless pairs are gathered into one window, so lambda's path
    agrees to float round-off (measured: 1e-6) and so do the losses and the held-out metrics."""
    import os
    import shutil
    import socket
    import subprocess
    import sys

    torchrun = shutil.which("torchrun") or str(Path(sys.executable).with_name("torchrun"))
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]

    def train(prefix: list[str], out: Path, batch_size: int) -> None:
        cmd = [*prefix, "-m", "humanalign.cli", "train", "safe-mm-dpo", "--config",
               str(PROJECT_ROOT / "configs" / "safe_mm_dpo_tiny.yaml"), "--output-dir", str(out),
               "--batch-size", str(batch_size), "--max-steps", "6", "--logging-steps", "1", "--eval-steps", "3",
               "--save-steps", "6", "--report-to", "[none]", "--set", "kl_coeff=0.05"]
        for kind in (HELPFUL, HARMLESS):
            cmd += [f"--train-{kind}-path", str(demo_data / "val" / f"{kind}_pairs.jsonl"),
                    f"--val-{kind}-path", str(demo_data / "test" / f"{kind}_pairs.jsonl")]
        env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
        done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]

    train([sys.executable], tmp_path / "one", 8)
    train([torchrun, "--nproc_per_node", "2", "--master_port", str(port)], tmp_path / "two", 4)
    state = json.loads((tmp_path / "two" / "checkpoint-6" / "trainer_state.json").read_text(encoding="utf-8"))
    assert state["num_processes"] == 2 and state["examples_per_step"] == 8
    fa = json.loads((tmp_path / "one" / "final_metrics.json").read_text(encoding="utf-8"))
    fb = json.loads((tmp_path / "two" / "final_metrics.json").read_text(encoding="utf-8"))
    for (sa, va), (sb, vb) in zip(fa["lambda"]["path"], fb["lambda"]["path"], strict=True):
        assert sa == sb and vb == pytest.approx(va, abs=1e-5)
    assert fa["lambda"]["final"] != 1.0
    a, b = train_lines(tmp_path / "one"), train_lines(tmp_path / "two")
    assert sorted(a) == sorted(b) == list(range(1, 7))
    for step in a:
        for key in ("train/loss_total", "train/loss_safety", "train/expected_cost", "train/kl_divergence"):
            assert b[step][key] == pytest.approx(a[step][key], abs=1e-5), (step, key)
        # exp of the token-weighted NLL over both ranks (a mean of per-rank perplexities was ~0.5% off)
        assert b[step]["train/perplexity"] == pytest.approx(a[step]["train/perplexity"], rel=1e-5), step
    for key in ("helpful_accuracy", "harmless_accuracy", "expected_cost", "kl_divergence"):
        assert fb["after"][key] == pytest.approx(fa["after"][key], abs=1e-5), key
