"""GRPO / DAPO / Dr. GRPO / RLOO losses: hand-worked numbers, then agreement with TRL 1.16 to 1e-6.

TRL entry points: the losses are called through TRL's own ``GRPOTrainer._compute_loss`` and
``RLOOTrainer._compute_loss`` on trainers built with ``__new__`` and only the attributes those methods read
(a stand-in ``_get_per_token_logps_and_entropies`` hands over the per-token log-probs). The advantages are
computed inline in TRL's ``_generate_and_score_completions`` (not callable on its own), so their formulas are
reproduced here, citing the lines of trl 1.16: trl/trainer/grpo_trainer.py 2759-2790 (sum_then_normalize,
scale_rewards group / batch / none) and trl/trainer/rloo_trainer.py 1663-1690 (KL in the reward, leave-one-out
baseline); TRL's own ``nanstd`` is used.
"""

from __future__ import annotations

import math
import os
import warnings
from collections import defaultdict
from types import SimpleNamespace

import pytest
import torch

from humanalign.losses.grpo import (
    group_advantages,
    grpo_loss,
    k3_kl,
    kl_penalized_scores,
    reduce_grpo_loss,
    rloo_advantages,
    rloo_loss,
)
from humanalign.losses.ppo import lagrangian_advantage

# --------------------------------------------------------------------------------------------- hand-worked


def test_group_advantages_hand_worked():
    # groups of 2: [1, 3] has mean 2 and unbiased std sqrt(((1-2)^2 + (3-2)^2) / 1) = sqrt(2) = 1.414214;
    # A = -+1 / (1.414214 + 1e-4) = -+0.707057. [0, 0] has std 0: A = 0 / 1e-4 = 0 (no signal).
    scores = torch.tensor([1.0, 3.0, 0.0, 0.0])
    adv, spread = group_advantages(scores, 2)
    torch.testing.assert_close(adv, torch.tensor([-0.707057, 0.707057, 0.0, 0.0]), atol=1e-6, rtol=0)
    torch.testing.assert_close(spread, torch.tensor([math.sqrt(2), 0.0]))
    # Dr. GRPO (no std scaling): A = r - mean = [-1, 1, 0, 0]
    assert group_advantages(scores, 2, scale="none")[0].tolist() == [-1.0, 1.0, 0.0, 0.0]
    # batch std: mean 1, deviations [0, 2, -1, -1], unbiased var (0 + 4 + 1 + 1) / 3 = 2, std 1.414214
    torch.testing.assert_close(group_advantages(scores, 2, scale="batch")[0],
                               torch.tensor([-0.707057, 0.707057, 0.0, 0.0]), atol=1e-6, rtol=0)
    with pytest.raises(ValueError, match="groups of 3"):
        group_advantages(scores, 3)


def test_rloo_advantages_hand_worked():
    # one group [1, 3, 5]: baselines (3+5)/2 = 4, (1+5)/2 = 3, (1+3)/2 = 2 -> A = [-3, 0, 3]
    assert rloo_advantages(torch.tensor([1.0, 3.0, 5.0]), 3).tolist() == [-3.0, 0.0, 3.0]
    # KL inside the reward: r - beta * sum_t (logp - ref) = 1 - 0.5 * (0.2 + 0.4) = 0.7 (padding ignored)
    logps, ref = torch.tensor([[0.2, 0.4, 9.0]]), torch.zeros(1, 3)
    mask = torch.tensor([[1, 1, 0]])
    torch.testing.assert_close(kl_penalized_scores(torch.tensor([1.0]), logps, ref, mask, 0.5), torch.tensor([0.7]))


def test_k3_kl_hand_worked():
    # pi = 0.5, ref = 0.25: d = log ref - log pi = log 0.5 = -0.693147; k3 = e^d - d - 1 = 0.5 + 0.693147 - 1
    value = k3_kl(torch.tensor([math.log(0.5)]), torch.tensor([math.log(0.25)]))
    assert float(value) == pytest.approx(0.193147, abs=1e-6)
    assert float(k3_kl(torch.tensor([-1.0]), torch.tensor([-1.0]))) == 0.0  # same policy: no divergence


def test_normalisations_hand_worked():
    # ratio 1 everywhere, beta 0: the token loss is -A. Answers: 2 tokens with A = 2, 1 token with A = -1.
    # token losses [-2, -2] and [1]:
    #   grpo    (per-answer mean, then mean):  ((-2 - 2) / 2 + 1) / 2 = (-2 + 1) / 2 = -0.5
    #   dapo    (token mean over the batch):   (-2 - 2 + 1) / 3 = -1
    #   dr_grpo (sum / (answers x L), L = 4):  -3 / (2 x 4) = -0.375
    logps = torch.zeros(2, 2)
    mask = torch.tensor([[1, 1], [1, 0]])
    adv = torch.tensor([2.0, -1.0])
    expected = {"grpo": -0.5, "dapo": -1.0, "dr_grpo": -0.375}
    for loss_type, value in expected.items():
        loss, metrics = grpo_loss(logps, logps, adv, mask, loss_type=loss_type, max_completion_length=4)
        assert float(loss) == pytest.approx(value), loss_type
        assert float(metrics["clipfrac"]) == 0.0 and float(metrics["ratio_mean"]) == 1.0
    # the accumulation form: numerators add up, counts add up
    token_loss = -adv.unsqueeze(1).expand(2, 2)
    num, count = reduce_grpo_loss(token_loss, mask, "dapo")
    assert (float(num), float(count)) == (-3.0, 3.0)


def test_clipping_and_kl_hand_worked():
    # one token per answer, eps 0.2:
    #   ratio 1.5, A = +1: min(1.5, 1.2) = 1.2 -> loss -1.2 (clipped)
    #   ratio 1.5, A = -1: min(-1.5, -1.2) = -1.5 -> loss 1.5 (not clipped: the pessimistic side)
    #   ratio 0.5, A = -1: min(-0.5, -0.8) = -0.8 -> loss 0.8 (clipped)
    old = torch.zeros(3, 1)
    logps = torch.log(torch.tensor([[1.5], [1.5], [0.5]]))
    adv = torch.tensor([1.0, -1.0, -1.0])
    mask = torch.ones(3, 1)
    loss, metrics = grpo_loss(logps, old, adv, mask, epsilon_low=0.2)
    assert float(loss) == pytest.approx((-1.2 + 1.5 + 0.8) / 3)
    assert float(metrics["clipfrac"]) == pytest.approx(2 / 3)
    # DAPO's clip-higher (eps_high 0.28): the first answer is clipped at 1.28 instead: (-1.28 + 1.5 + 0.8) / 3
    loss, _ = grpo_loss(logps, old, adv, mask, epsilon_low=0.2, epsilon_high=0.28)
    assert float(loss) == pytest.approx((-1.28 + 1.5 + 0.8) / 3)
    # KL to the reference: beta 0.1 x k3 with pi = ref on every token adds 0; with ref = pi / 2 adds
    # 0.1 x (0.5 - log 0.5 - 1) = 0.1 x 0.193147 per token
    ref = logps + math.log(0.5)
    loss_kl, metrics = grpo_loss(logps, old, adv, mask, epsilon_low=0.2, beta=0.1, ref_logps=ref)
    assert float(loss_kl) == pytest.approx((-1.2 + 1.5 + 0.8) / 3 + 0.0193147, abs=1e-6)
    assert float(metrics["kl"]) == pytest.approx(0.193147, abs=1e-6)
    with pytest.raises(ValueError, match="needs ref_logps"):
        grpo_loss(logps, old, adv, mask, beta=0.1)


def test_lagrangian_combination_of_group_advantages_hand_worked():
    # a group of 2 where the more helpful answer also costs more: A_r = A_c = [-1, 1] (scale none)
    a_r, _ = group_advantages(torch.tensor([0.0, 2.0]), 2, scale="none")
    a_c, _ = group_advantages(torch.tensor([1.0, 3.0]), 2, scale="none")
    # lambda 1: (A_r - A_c) / 2 = 0: the two pulls cancel; lambda 3: (A_r - 3 A_c) / 4 = [0.5, -0.5]: safety wins
    assert lagrangian_advantage(a_r, a_c, 1.0).tolist() == [0.0, 0.0]
    assert lagrangian_advantage(a_r, a_c, 3.0).tolist() == [0.5, -0.5]


def test_rloo_loss_hand_worked():
    # sequence ratios exp(0) = 1 and exp(log 2) = 2 (clipped to 1.2 with A = +1): loss = mean(-(-1) x 1, -1.2)
    seq = torch.tensor([0.0, math.log(2.0)])
    loss, metrics = rloo_loss(seq, torch.zeros(2), torch.tensor([-1.0, 1.0]))
    assert float(loss) == pytest.approx((1.0 - 1.2) / 2)
    assert float(metrics["clipfrac"]) == 0.5


# --------------------------------------------------------------------------------------------- TRL agreement


def _trl():
    pytest.importorskip("trl")
    os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from trl import GRPOTrainer, RLOOTrainer
        from trl.trainer.utils import nanstd
    return GRPOTrainer, RLOOTrainer, nanstd


class _Accelerator:
    num_processes, sync_gradients = 1, True

    def gather(self, x):
        return x

    def reduce(self, x, reduction="sum"):
        return x


def _random_batch(seed: int, b: int = 6, t: int = 7):
    gen = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, t + 1, (b,), generator=gen)
    mask = (torch.arange(t).unsqueeze(0) < lengths.unsqueeze(1)).long()  # (B, T)
    logps = -torch.rand(b, t, generator=gen) * 3
    old = logps + 0.3 * torch.randn(b, t, generator=gen)
    ref = logps + 0.5 * torch.randn(b, t, generator=gen)
    return logps, old, ref, mask, gen


def _trl_grpo_trainer(GRPOTrainer, logps, loss_type, beta, max_len):
    trainer = GRPOTrainer.__new__(GRPOTrainer)
    entropies = torch.zeros_like(logps)
    attrs = dict(
        _get_per_token_logps_and_entropies=lambda *a, **k: (logps, entropies, None), aux_loss_enabled=False,
        top_entropy_quantile=1.0, off_policy_mask_threshold=None, importance_sampling_level="token", beta=beta,
        args=SimpleNamespace(use_bias_correction_kl=False, delta=None, steps_per_generation=1),
        loss_type=loss_type, epsilon_low=0.2, epsilon_high=0.28, use_vllm=False, model=SimpleNamespace(training=True),
        current_gradient_accumulation_steps=1, max_completion_length=max_len, _entropy_bonus_enabled=False,
        _metrics={"train": defaultdict(list), "eval": defaultdict(list)}, accelerator=_Accelerator())
    for name, value in attrs.items():
        object.__setattr__(trainer, name, value)
    return trainer


@pytest.mark.parametrize("loss_type", ["grpo", "dapo", "dr_grpo"])
@pytest.mark.parametrize("beta", [0.0, 0.04])
def test_grpo_loss_matches_trl(loss_type, beta):
    GRPOTrainer, _, _ = _trl()
    logps, old, ref, mask, gen = _random_batch(1)
    adv = torch.randn(logps.shape[0], generator=gen)
    b, t = logps.shape
    trainer = _trl_grpo_trainer(GRPOTrainer, logps, loss_type, beta, max_len=t + 3)
    inputs = {"prompt_ids": torch.zeros(b, 2, dtype=torch.long), "prompt_mask": torch.ones(b, 2, dtype=torch.long),
              "completion_ids": torch.zeros(b, t, dtype=torch.long), "completion_mask": mask, "advantages": adv,
              "old_per_token_logps": old, "ref_per_token_logps": ref, "num_items_in_batch": mask.sum()}
    expected = GRPOTrainer._compute_loss(trainer, None, inputs)
    ours, metrics = grpo_loss(logps, old, adv, mask, epsilon_low=0.2, epsilon_high=0.28, beta=beta, ref_logps=ref,
                              loss_type=loss_type, max_completion_length=t + 3)
    torch.testing.assert_close(ours, expected, atol=1e-6, rtol=0)
    assert float(metrics["clipfrac"]) == pytest.approx(trainer._metrics["train"]["clip_ratio/region_mean"][0],
                                                       abs=1e-6)
    if beta:
        assert float(metrics["kl"]) == pytest.approx(trainer._metrics["train"]["kl"][0], abs=1e-6)


def _trl_grpo_advantages(rewards: torch.Tensor, num_generations: int, scale_rewards: str, nanstd) -> torch.Tensor:
    """trl/trainer/grpo_trainer.py 2759-2790 (multi_objective_aggregation="sum_then_normalize", one reward
    function of weight 1), as written there."""
    mean_grouped_rewards = torch.nanmean(rewards.view(-1, num_generations), dim=1)
    mean_grouped_rewards = mean_grouped_rewards.repeat_interleave(num_generations, dim=0)
    if scale_rewards in ["group", "none"]:
        std_rewards = nanstd(rewards.view(-1, num_generations), dim=1)
        std_rewards = std_rewards.repeat_interleave(num_generations, dim=0)
    else:
        std_rewards = nanstd(rewards).expand_as(rewards)
    advantages = rewards - mean_grouped_rewards
    if scale_rewards != "none":
        advantages = advantages / (std_rewards + 1e-4)
    return advantages


@pytest.mark.parametrize("scale", ["group", "batch", "none"])
def test_group_advantages_match_trl(scale):
    _, _, nanstd = _trl()
    gen = torch.Generator().manual_seed(2)
    rewards = torch.randn(5 * 4, generator=gen)
    rewards[4:8] = 0.7  # a group with zero spread
    expected = _trl_grpo_advantages(rewards, 4, scale, nanstd)
    torch.testing.assert_close(group_advantages(rewards, 4, scale=scale)[0], expected, atol=1e-6, rtol=0)


def test_rloo_matches_trl():
    _, RLOOTrainer, _ = _trl()
    logps, old, ref, mask, gen = _random_batch(3, b=6)
    scores = torch.randn(6, generator=gen)
    # trl/trainer/rloo_trainer.py 1663-1690: KL (k1, summed) in the reward, then the leave-one-out baseline
    beta, g = 0.05, 3
    rewards = scores - beta * ((old - ref) * mask).sum(-1)
    grouped = rewards.view(-1, g)
    baselines = ((grouped.sum(dim=1, keepdim=True) - grouped) / (g - 1)).view(-1)
    expected_adv = rewards - baselines
    adv = rloo_advantages(kl_penalized_scores(scores, old, ref, mask, beta), g)
    torch.testing.assert_close(adv, expected_adv, atol=1e-6, rtol=0)

    trainer = RLOOTrainer.__new__(RLOOTrainer)
    attrs = dict(_get_per_token_logps_and_entropies=lambda *a, **k: (logps, torch.zeros_like(logps), None),
                 aux_loss_enabled=False, epsilon_low=0.2, epsilon_high=0.2, model=SimpleNamespace(training=True),
                 _metrics={"train": defaultdict(list), "eval": defaultdict(list)}, accelerator=_Accelerator())
    for name, value in attrs.items():
        object.__setattr__(trainer, name, value)
    b, t = logps.shape
    old_seq = (old * mask).sum(1)
    inputs = {"prompt_ids": torch.zeros(b, 2, dtype=torch.long), "prompt_mask": torch.ones(b, 2, dtype=torch.long),
              "completion_ids": torch.zeros(b, t, dtype=torch.long), "completion_mask": mask, "advantages": adv,
              "old_logps": old_seq}
    expected = RLOOTrainer._compute_loss(trainer, None, inputs)
    ours, _ = rloo_loss((logps * mask).sum(1), old_seq, adv)
    torch.testing.assert_close(ours, expected, atol=1e-6, rtol=0)
