"""Learning-rate schedule shapes, AdamW weight-decay groups, and groups by role (PPO's actor and critics)."""

from __future__ import annotations

import math

import pytest
import torch
from engine_toy import tiny_llama

from humanalign.config.base import load_config
from humanalign.config.ppo import PPOConfig
from humanalign.config.training import TrainingConfig
from humanalign.engine.optim import (
    build_optimizer,
    build_scheduler,
    clip_per_role,
    lr_factor,
    param_groups,
    per_group_scheduler,
    warmup_steps_for,
)


def factors(kind: str, total: int, warmup: int = 0) -> list[float]:
    return [lr_factor(s, kind=kind, warmup=warmup, total=total) for s in range(total + 1)]


def test_cosine_floor_ends_at_a_tenth_of_the_peak():
    f = factors("cosine_floor", 100)
    assert f[0] == 1.0
    assert f[50] == pytest.approx(0.55)  # 0.1 + 0.45 * (1 + cos(pi/2))
    assert f[100] == pytest.approx(0.1, abs=1e-12)
    assert min(f) == pytest.approx(0.1, abs=1e-12)  # never below the floor
    assert all(a >= b for a, b in zip(f, f[1:]))  # monotone


def test_cosine_linear_and_constant_shapes():
    cos, lin, const = factors("cosine", 100), factors("linear", 100), factors("constant", 100)
    assert (cos[0], cos[50], cos[100]) == pytest.approx((1.0, 0.5, 0.0), abs=1e-12)
    assert cos[25] == pytest.approx(0.5 * (1 + math.cos(math.pi / 4)))  # 0.8536
    assert (lin[0], lin[25], lin[100]) == pytest.approx((1.0, 0.75, 0.0))
    assert set(const) == {1.0}


def test_warmup_rises_linearly_then_decays():
    f = factors("cosine", 20, warmup=4)
    assert f[:5] == pytest.approx([0.2, 0.4, 0.6, 0.8, 1.0])  # (s + 1) / (warmup + 1), then the cosine's start
    assert f[12] == pytest.approx(0.5)  # halfway through the 16 decay steps
    assert f[20] == pytest.approx(0.0, abs=1e-12)
    cfg = TrainingConfig(warmup_ratio=0.1)
    assert warmup_steps_for(cfg, 95) == 10  # ceil(9.5)
    assert warmup_steps_for(TrainingConfig(warmup_steps=7, warmup_ratio=0.5), 95) == 7


def test_scheduler_over_a_run_ends_at_lr_over_ten():
    cfg = TrainingConfig(learning_rate=1e-3, lr_scheduler="cosine_floor", warmup_steps=2)
    param = torch.nn.Parameter(torch.zeros(2))
    opt = torch.optim.AdamW([param], lr=cfg.learning_rate)
    sched = build_scheduler(opt, cfg, total_steps=10)
    used = []
    for _ in range(10):
        used.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert used[:3] == pytest.approx([1e-3 / 3, 2e-3 / 3, 1e-3])
    assert used == sorted(used[:3]) + sorted(used[3:], reverse=True)  # up, then down
    assert opt.param_groups[0]["lr"] == pytest.approx(1e-4, rel=1e-9)  # after the last step: lr / 10


def test_weight_decay_skips_norms_and_biases():
    model = tiny_llama()
    groups = param_groups(model, weight_decay=0.1)
    names = {id(p): n for n, p in model.named_parameters()}
    decayed = sorted(names[id(p)] for p in groups[0]["params"])
    plain = sorted(names[id(p)] for p in groups[1]["params"])
    # 1 layer: q, k, v, o, gate, up, down + embeddings + lm_head are matrices; 3 RMSNorm scales are not.
    assert len(decayed) == 9 and groups[0]["weight_decay"] == 0.1
    assert plain == ["model.layers.0.input_layernorm.weight", "model.layers.0.post_attention_layernorm.weight",
                     "model.norm.weight"]
    assert groups[1]["weight_decay"] == 0.0
    model.model.embed_tokens.weight.requires_grad_(False)  # frozen parameters are left out
    opt = build_optimizer(model, TrainingConfig(weight_decay=0.1, adam_beta2=0.95, adam_epsilon=1e-6))
    assert sum(len(g["params"]) for g in opt.param_groups) == 11
    assert opt.defaults["betas"] == (0.9, 0.95) and opt.defaults["eps"] == 1e-6


def test_fused_adamw_is_the_default_and_matches_the_foreach_loop():
    torch.manual_seed(0)
    weights = [torch.randn(4, 3), torch.randn(4)]
    built = {}
    for optim in ("adamw_torch_fused", "adamw_torch"):
        model = torch.nn.Linear(3, 4)
        with torch.no_grad():
            model.weight.copy_(weights[0])
            model.bias.copy_(weights[1])
        opt = build_optimizer(model, TrainingConfig(optim=optim, learning_rate=1e-2, weight_decay=0.1))
        for step in range(5):  # the same gradients in both: a fixed quadratic pull towards step-dependent targets
            opt.zero_grad()
            loss = ((model(torch.ones(2, 3)) - step) ** 2).sum()
            loss.backward()
            opt.step()
        built[optim] = (opt, [p.detach().clone() for p in model.parameters()])
    assert built["adamw_torch_fused"][0].defaults["fused"] is True
    assert not built["adamw_torch"][0].defaults["fused"]
    for fused, loop in zip(built["adamw_torch_fused"][1], built["adamw_torch"][1], strict=True):
        torch.testing.assert_close(fused, loop, rtol=1e-6, atol=1e-6)  # one update rule, float round-off apart


def test_fused_adamw_falls_back_where_torch_has_no_fused_kernel():
    from humanalign.engine.optim import fused_supported

    assert fused_supported([torch.zeros(2), torch.zeros(3, dtype=torch.bfloat16)])
    assert not fused_supported([torch.zeros(2, dtype=torch.float64)])
    assert not fused_supported([torch.zeros(2), torch.zeros(2, device="meta")])  # two devices
    model = torch.nn.Linear(2, 2).double()
    assert not build_optimizer(model, TrainingConfig()).defaults["fused"]


def test_per_group_scheduler_and_resume_position():
    actor = torch.nn.Parameter(torch.zeros(2))
    critic = torch.nn.Parameter(torch.zeros(2))
    opt = torch.optim.AdamW([{"params": [actor], "lr": 1.0, "role": "actor"},
                             {"params": [critic], "lr": 0.5, "role": "reward_critic"}], lr=1.0)
    cfg = load_config(PPOConfig, values={"reward_fn": "a:b", "lr_scheduler": "cosine",
                                         "critic_lr_scheduler": "constant"})
    sched = per_group_scheduler(opt, cfg, total_steps=10, last_step=0)
    assert [g["lr"] for g in opt.param_groups] == [1.0, 0.5]
    for _ in range(5):
        opt.step()
        sched.step()
    # step 5 of 10 on the cosine: 0.5 (1 + cos(pi/2)) = 0.5; the critic stays at its constant 0.5
    assert [g["lr"] for g in opt.param_groups] == pytest.approx([0.5, 0.5])
    resumed = per_group_scheduler(opt, cfg, total_steps=10, last_step=5)  # a new scheduler at step 5
    assert resumed.last_epoch == 5 and [g["lr"] for g in opt.param_groups] == pytest.approx([0.5, 0.5])


def test_clip_per_role_hand_worked():
    a, b = torch.nn.Parameter(torch.zeros(2)), torch.nn.Parameter(torch.zeros(2))
    a.grad, b.grad = torch.tensor([3.0, 4.0]), torch.tensor([6.0, 8.0])  # norms 5 and 10
    opt = torch.optim.SGD([{"params": [a], "role": "actor"}, {"params": [b], "role": "reward_critic"}], lr=0.1)
    norms = clip_per_role(opt, max_norm=math.sqrt(2), roles=["actor", "reward_critic"])
    assert norms == pytest.approx({"actor": 5.0, "reward_critic": 10.0})
    # each role clipped to sqrt(2) / sqrt(2) = 1 on its own: [0.6, 0.8] both
    torch.testing.assert_close(a.grad, torch.tensor([0.6, 0.8]), atol=1e-5, rtol=0)
    torch.testing.assert_close(b.grad, torch.tensor([0.6, 0.8]), atol=1e-5, rtol=0)
