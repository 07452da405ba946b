"""RolloutSchedule: the online trainers' step plan, worked by hand."""

from types import SimpleNamespace

import pytest

from humanalign.errors import UserError
from humanalign.rollout.schedule import RolloutSchedule


def _cfg(**kw):
    base = dict(rollout_batch_size=4, seed=0, batch_size=4, gradient_accumulation_steps=2, update_iters=2,
                sequences_per_rollout=16, max_steps=None, epochs=1.0)
    return SimpleNamespace(**{**base, **kw})


def test_steps_per_rollout_and_rollouts_per_epoch():
    # 16 sequences x 2 passes / (4 x 2 per step) = 4 steps per rollout; 10 prompts / 4 per rollout = 3 rollouts
    schedule = RolloutSchedule(10, _cfg(), num_processes=1, process_index=0)
    assert (schedule.steps_per_rollout, schedule.total_rollouts, schedule.total_steps) == (4, 3, 12)


def test_max_steps_rounds_up_to_whole_rollouts_and_says_so():
    schedule = RolloutSchedule(100, _cfg(max_steps=5), num_processes=1, process_index=0)
    assert (schedule.total_rollouts, schedule.total_steps) == (2, 8)
    line = schedule.describe(4, first=0)
    assert "2 rollouts = 8 steps (max_steps 5 rounded up to whole rollouts)" in line
    assert "resuming" not in line and "resuming after rollout 1" in schedule.describe(4, first=1)


def test_each_rank_gets_its_own_prompts_and_epochs_cover_every_prompt():
    cfg = _cfg(rollout_batch_size=2)
    ranks = [RolloutSchedule(8, cfg, num_processes=2, process_index=r) for r in (0, 1)]
    per_epoch = ranks[0].prompt_sampler.micro_batches_per_epoch  # 8 prompts / (2 x 2 ranks) = 2 rollouts
    assert per_epoch == 2
    seen = [i for index in range(per_epoch) for s in ranks for i in s.prompt_rows(index)]
    assert sorted(seen) == list(range(8))
    assert ranks[0].prompt_rows(0) == RolloutSchedule(8, cfg, 2, 0).prompt_rows(0)  # seeded: reproducible


def test_resume_only_on_rollout_boundaries():
    schedule = RolloutSchedule(10, _cfg(), num_processes=1, process_index=0)
    assert schedule.first_rollout(0, "PPO") == 0 and schedule.first_rollout(8, "PPO") == 2
    with pytest.raises(UserError, match="cannot resume at step 6: PPO checkpoints lie on rollout boundaries"):
        schedule.first_rollout(6, "PPO")


@pytest.mark.parametrize("every,before,after,due", [
    (4, 0, 4, True), (4, 4, 8, True), (3, 0, 4, True), (5, 0, 4, False), (None, 0, 4, False),
    (None, 8, 12, True),  # the last step is always due
])
def test_due(every, before, after, due):
    schedule = RolloutSchedule(10, _cfg(), num_processes=1, process_index=0)  # 12 steps in all
    assert schedule.due(every, before, after) is due
