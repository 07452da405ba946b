"""PPO(-Lag) and GRPO(-Lag) configs share their fields through config/online_rl.py; sharing must not change one key.

online_rl_snapshot.json was written from the four configs before they shared anything: every field's key,
aliases, default, constraints and description, the JSON schema, the docstring. Field order may differ.
Regenerate only on purpose: ``PYTHONPATH=src python tests/config/test_online_rl.py``.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
from pydantic import ValidationError
from pydantic_core import PydanticUndefined

from humanalign.config.grpo import GRPOConfig, GRPOLagConfig
from humanalign.config.ppo import PPOConfig, PPOLagConfig

SNAPSHOT = Path(__file__).with_name("online_rl_snapshot.json")
CLASSES = {"PPOConfig": PPOConfig, "PPOLagConfig": PPOLagConfig, "GRPOConfig": GRPOConfig,
           "GRPOLagConfig": GRPOLagConfig}


def _default(field) -> object:
    if field.default_factory is not None:
        return {"factory": repr(field.default_factory())}
    return None if field.default is PydanticUndefined else repr(field.default)


def _describe(cls) -> dict:
    fields = {
        name: {
            "annotation": repr(field.annotation),
            "default": _default(field),
            "required": field.is_required(),
            "validation_alias": repr(field.validation_alias),
            "alias": field.alias,
            "description": field.description,
            "metadata": sorted(repr(m) for m in field.metadata),
        }
        for name, field in cls.model_fields.items()
    }
    return {"fields": fields, "json_schema": cls.model_json_schema(), "doc": cls.__doc__,
            "extra": cls.model_config.get("extra")}


def _snapshot() -> dict:
    # through JSON so that tuples and lists compare alike
    return json.loads(json.dumps({name: _describe(cls) for name, cls in CLASSES.items()}))


@pytest.mark.parametrize("name", list(CLASSES))
def test_fields_match_the_snapshot(name):
    want = json.loads(SNAPSHOT.read_text())[name]
    got = _snapshot()[name]
    assert sorted(got["fields"]) == sorted(want["fields"])  # same keys, none added or lost
    for key, field in want["fields"].items():
        assert got["fields"][key] == field, key
    assert got == want


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


if __name__ == "__main__":
    SNAPSHOT.write_text(json.dumps(_snapshot(), indent=1, sort_keys=True, ensure_ascii=False) + "\n")
    sys.exit(0)
