"""PPO(-Lag) and GRPO(-Lag) configs share their fields through config/online_rl.py; sharing must not change one key.

When the fields were moved (2026-12-05), a snapshot of the four configs taken before they shared anything (every
field's key, aliases, default, constraints and description, the JSON schema, the docstring; commit be610fe) was
asserted equal to the shared version; it is not kept as a test, since it would freeze the schema (and pydantic's
reprs). What stays tested: the differences the two commands keep, unknown keys and the validators.
"""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from humanalign.config.grpo import GRPOConfig, GRPOLagConfig
from humanalign.config.ppo import PPOConfig, PPOLagConfig


def test_ppo_and_grpo_keep_their_differences():
    ppo, grpo = PPOConfig.model_fields, GRPOConfig.model_fields
    assert (ppo["rollout_batch_size"].default, grpo["rollout_batch_size"].default) == (16, 8)
    assert (ppo["learning_rate"].default, grpo["learning_rate"].default) == (1e-5, 1e-6)
    assert "num_iterations" in grpo["update_iters"].validation_alias.choices
    assert ppo["update_iters"].validation_alias is None
    assert "λ_init" in PPOLagConfig.model_fields["lambda_init"].validation_alias.choices
    assert GRPOLagConfig.model_fields["lambda_init"].validation_alias is None


@pytest.mark.parametrize("cls", [PPOConfig, PPOLagConfig, GRPOConfig, GRPOLagConfig])
def test_unknown_keys_and_validators_still_bite(cls):
    base = {"reward_fn": "m:f", "cost_fn": "m:c"}
    cls.model_validate(base)
    with pytest.raises(ValidationError, match="not_a_key"):
        cls.model_validate({**base, "not_a_key": 1})
    with pytest.raises(ValidationError, match="must fit in max_length"):
        cls.model_validate({**base, "max_length": 64, "max_prompt_length": 60, "max_new_tokens": 32})
    with pytest.raises(ValidationError, match="whole optimizer steps"):
        cls.model_validate({**base, "rollout_batch_size": 3, "batch_size": 5})


@pytest.mark.parametrize("cls", [PPOLagConfig, GRPOLagConfig])
def test_lagrangian_checks(cls):
    with pytest.raises(ValidationError, match="needs cost_model_path"):
        cls.model_validate({"reward_fn": "m:f"})
    with pytest.raises(ValidationError, match="above lambda_max"):
        cls.model_validate({"reward_fn": "m:f", "cost_fn": "m:c", "lambda_init": 5, "lambda_max": 2})
    config = cls.model_validate({"reward_fn": "m:f", "cost_fn": "m:c", "threshold": 0.5, "lambda_lr": 0.2})
    assert (config.cost_threshold, config.lambda_lr, config.is_lagrangian) == (0.5, 0.2, True)
