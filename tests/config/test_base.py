"""Config loading: aliases (Greek run-book keys), overrides, strict keys, one-line errors."""

from __future__ import annotations

import pytest

from humanalign.cli import main
from humanalign.config.base import load_config
from humanalign.config.dpo import DPOConfig
from humanalign.config.evaluation import PerplexityConfig
from humanalign.config.ppo import PPOConfig
from humanalign.config.rm import RewardModelConfig
from humanalign.config.safe_mm_dpo import SafeMMDPOConfig
from humanalign.config.sft import SFTConfig
from humanalign.config.training import TrainingConfig
from humanalign.errors import ConfigError

RUNBOOK_SAFE_MM_DPO = """\
policy_model_path: models/sft
ref_model_path: models/sft
helpful_rm_path: models/helpful_rm
harmless_rm_path: models/harmless_rm
train_helpful_path: data/train/helpful_pairs.jsonl
train_harmless_path: data/train/harmless_pairs.jsonl
val_helpful_path: data/val/helpful_pairs.jsonl
val_harmless_path: data/val/harmless_pairs.jsonl
β_ori: 0.1
w: 0.5
k: 0.5
λ_init: 1.0
λ_lr: 0.01
kl_coeff: 0.05
learning_rate: 5.0e-7
batch_size: 8
epochs: 3
gradient_accumulation_steps: 4
max_grad_norm: 1.0
warmup_steps: 100
save_steps: 500
eval_steps: 100
"""


def test_runbook_keys_greek_included(tmp_path):
    path = tmp_path / "safe_mm_dpo.yaml"
    path.write_text(RUNBOOK_SAFE_MM_DPO, encoding="utf-8")
    cfg = load_config(SafeMMDPOConfig, path)
    assert cfg.beta_ori == 0.1 and cfg.lambda_init == 1.0 and cfg.lambda_lr == 0.01
    assert cfg.kl_coeff == 0.05 and cfg.epochs == 3 and cfg.gradient_accumulation_steps == 4
    assert cfg.ref_model_path == "models/sft" and cfg.val_harmless_path == "data/val/harmless_pairs.jsonl"
    # The resolved config uses our own names and loads back to the same values.
    again = tmp_path / "again.yaml"
    cfg.save(again)
    assert "lambda_init: 1.0" in again.read_text(encoding="utf-8")
    assert load_config(SafeMMDPOConfig, again) == cfg


def test_overrides_reach_nested_fields_and_aliases(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("λ_init: 2.0\n", encoding="utf-8")
    cfg = load_config(SafeMMDPOConfig, path, ["λ_init=3", "lora.r=4", "lora.enabled=true", "learning_rate=1e-4"])
    assert cfg.lambda_init == 3.0 and cfg.lora.r == 4 and cfg.lora.enabled is True
    assert cfg.learning_rate == pytest.approx(1e-4)


def test_the_earlier_name_use_safety_stream_still_works(tmp_path):
    """use_harmless_stream was called use_safety_stream: configs that say so keep working, in YAML and --set."""
    path = tmp_path / "c.yaml"
    path.write_text("use_safety_stream: false\n", encoding="utf-8")
    assert load_config(SafeMMDPOConfig, path).use_harmless_stream is False
    assert load_config(SafeMMDPOConfig, None, ["use_safety_stream=false"]).use_harmless_stream is False
    assert load_config(SafeMMDPOConfig, None, ["use_harmless_stream=false"]).use_harmless_stream is False


def test_unknown_key_is_an_error_naming_it(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("learning_rat: 0.1\n", encoding="utf-8")
    with pytest.raises(ConfigError, match="unknown key 'learning_rat'"):
        load_config(TrainingConfig, path)


def test_same_field_twice_is_an_error(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("λ_init: 1.0\nlambda_init: 2.0\n", encoding="utf-8")
    with pytest.raises(ConfigError, match="given twice"):
        load_config(SafeMMDPOConfig, path)


def test_bad_value_names_the_field(tmp_path):
    with pytest.raises(ConfigError, match="field 'batch_size'"):
        load_config(TrainingConfig, None, ["batch_size=0"])


def test_every_field_has_a_description():
    from humanalign.config.dpo import DPOConfig
    from humanalign.config.rm import RewardModelConfig

    for schema in (TrainingConfig, SafeMMDPOConfig, DPOConfig, RewardModelConfig):
        missing = [n for n, f in schema.model_fields.items() if not f.description]
        assert not missing, f"{schema.__name__}: fields without description: {missing}"


def test_validate_command_prints_resolved_config(tmp_path, capsys):
    path = tmp_path / "safe_mm_dpo.yaml"
    path.write_text(RUNBOOK_SAFE_MM_DPO, encoding="utf-8")
    assert main(["validate", str(path)]) == 0
    out = capsys.readouterr().out
    assert "valid config for `humanalign train safe-mm-dpo`" in out
    assert "beta_ori: 0.1" in out and "lambda_update_interval: 1" in out


def test_validate_rejects_unknown_key_with_exit_2(tmp_path, capsys):
    path = tmp_path / "safe_mm_dpo.yaml"
    path.write_text("lambda_init: 1.0\nlamda_lr: 0.1\n", encoding="utf-8")
    assert main(["validate", str(path)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "unknown key 'lamda_lr'" in err and str(path) in err


@pytest.mark.parametrize("schema", [SFTConfig, DPOConfig, RewardModelConfig, SafeMMDPOConfig, PerplexityConfig])
def test_max_length_alone_lowers_the_default_prompt_length(schema):
    cfg = load_config(schema, values={"max_length": 128})
    assert cfg.max_prompt_length == 64  # half of max_length, instead of an error about a default
    assert load_config(schema, values={"max_length": 1000}).max_prompt_length == schema().max_prompt_length
    with pytest.raises(ConfigError, match=r"max_prompt_length \(200\) must be below max_length \(128\)"):
        load_config(schema, values={"max_length": 128, "max_prompt_length": 200})  # the user's own choice


def test_ppo_max_length_alone_leaves_room_for_the_answer():
    cfg = load_config(PPOConfig, values={"max_length": 200, "reward_fn": "a:b"})
    assert cfg.max_prompt_length == 200 - cfg.max_new_tokens == 72


def test_inf_and_nan_are_rejected_in_every_float_field_nested_too(tmp_path):
    for text, key in (("learning_rate: .inf\n", "learning_rate"), ("lora:\n  dropout: .nan\n", "lora.dropout"),
                      ("max_grad_norm: -.inf\n", "max_grad_norm")):
        path = tmp_path / "sft.yaml"
        path.write_text(text)
        with pytest.raises(ConfigError, match=rf"sft.yaml: field '{key}': Input should be a finite number"):
            load_config(TrainingConfig, path)


def test_duplicate_yaml_keys_name_file_and_line(tmp_path):
    path = tmp_path / "dpo.yaml"
    path.write_text("beta: 0.1\nlora:\n  r: 8\n  alpha: 16\n  r: 4\n")
    with pytest.raises(ConfigError, match=r"dpo.yaml:5: key 'r' given twice \(first on line 3\)"):
        load_config(TrainingConfig, path)


def test_yaml_boolean_words_are_given_back_to_word_fields():
    # YAML 1.1 reads `no` as False: `--mixed-precision no` / `mixed_precision: no` must mean the word "no"
    assert load_config(DPOConfig, values={"mixed_precision": False}).mixed_precision == "no"
    assert load_config(DPOConfig, None, ["mixed_precision=no"]).mixed_precision == "no"
    assert load_config(DPOConfig, values={"disable_dropout": False}).disable_dropout is False  # a real boolean
