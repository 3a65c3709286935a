"""Typed config: presets, dotted overrides, errors that name the key, resolved config on disk."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from posttrain.config import ChatConfig, ConfigError, load_config, parse_overrides, write_resolved

PRESET = Path(__file__).parents[1] / "configs" / "chat" / "default.yaml"


def test_preset_loads_and_overrides_win():
    cfg = load_config(ChatConfig, PRESET, ["generation.max_new_tokens=7", "model.name=tiny-llama"])
    assert cfg.generation.max_new_tokens == 7
    assert cfg.model.name == "tiny-llama"
    assert cfg.generation.reasoning_budget == 128  # from the preset


def test_override_values_are_yaml_typed():
    assert parse_overrides(["a.b=1e-5", "a.c=true", "d=[1, 2]", "e=null", "f="]) == {
        "a": {"b": "1e-5", "c": True}, "d": [1, 2], "e": None, "f": ""}
    cfg = load_config(ChatConfig, overrides=["generation.temperature=1e-1"])
    assert cfg.generation.temperature == pytest.approx(0.1)


def test_unknown_key_names_key_and_suggests():
    with pytest.raises(ConfigError) as err:
        load_config(ChatConfig, overrides=["generation.max_new_token=5"])
    msg = str(err.value)
    assert "generation.max_new_token: unknown key" in msg
    assert "did you mean 'max_new_tokens'" in msg
    assert "allowed:" in msg and "temperature" in msg


def test_unknown_section_is_an_error():
    with pytest.raises(ConfigError, match="trainer: unknown key"):
        load_config(ChatConfig, overrides=["trainer.lr=1"])


@pytest.mark.parametrize(
    ("override", "fragment"),
    [
        ("generation.temperature=hot", "generation.temperature = 'hot'"),
        ("generation.max_new_tokens=0", "greater than or equal to 1"),
        ("model.dtype=float8", "'auto', 'float32', 'bfloat16' or 'float16'"),
        ("generation.reasoning_budget=-3", "generation.reasoning_budget = -3"),
    ],
)
def test_bad_values_name_key_value_and_allowed(override, fragment):
    with pytest.raises(ConfigError) as err:
        load_config(ChatConfig, overrides=[override])
    assert fragment in str(err.value)


@pytest.mark.parametrize("bad", ["novalue", "=3", "a..b=1"])
def test_malformed_override(bad):
    with pytest.raises(ConfigError, match="section.key=value"):
        parse_overrides([bad])


def test_override_conflict():
    with pytest.raises(ConfigError, match="conflicts"):
        parse_overrides(["a=1", "a.b=2"])


def test_bad_yaml_files(tmp_path):
    (tmp_path / "list.yaml").write_text("- 1\n- 2\n")
    (tmp_path / "broken.yaml").write_text("model: [\n")
    with pytest.raises(ConfigError, match="mapping"):
        load_config(ChatConfig, tmp_path / "list.yaml")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(ChatConfig, tmp_path / "broken.yaml")
    with pytest.raises(ConfigError, match="not found"):
        load_config(ChatConfig, tmp_path / "missing.yaml")


def test_resolved_config_round_trips(tmp_path):
    cfg = load_config(ChatConfig, PRESET, ["generation.seed=3"])
    path = write_resolved(cfg, tmp_path / "run")
    assert load_config(ChatConfig, path) == cfg
    assert yaml.safe_load(path.read_text())["generation"]["seed"] == 3
    assert [p.name for p in path.parent.iterdir()] == ["config.yaml"]  # no temp files left


def test_assignment_is_validated():
    cfg = ChatConfig()
    with pytest.raises(Exception, match="max_new_tokens"):
        cfg.generation.max_new_tokens = -1


def test_config_imports_without_torch():
    code = "import sys, posttrain.config, posttrain.cli; assert 'torch' not in sys.modules, 'torch imported'"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_a_section_given_in_part_keeps_its_fields_default():
    from posttrain.config import Config, GenerationConfig

    class Judge(Config):
        generation: GenerationConfig = GenerationConfig(temperature=0.0, enable_thinking=False)

    class Outer(Config):
        judge: Judge = Judge()

    cfg = load_config(Outer, None, ["judge.generation.max_new_tokens=7"])
    assert (cfg.judge.generation.max_new_tokens, cfg.judge.generation.temperature) == (7, 0.0)
    assert cfg.judge.generation.enable_thinking is False  # not GenerationConfig's own default (True)
    assert load_config(Outer, None, ["judge.generation.enable_thinking=true"]).judge.generation.enable_thinking
    with pytest.raises(ConfigError, match="max_new_token"):
        load_config(Outer, None, ["judge.generation.max_new_token=7"])


def test_extends_starts_from_another_file_and_catches_cycles(tmp_path) -> None:
    from posttrain.config import load_yaml

    (tmp_path / "base.yaml").write_text("a: {b: 1, c: 2}\nitems: [1, 2]\nname: base\n")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "child.yaml").write_text("extends: ../base.yaml\na: {c: 3}\nitems: [9]\n")
    assert load_yaml(tmp_path / "sub" / "child.yaml") == {"a": {"b": 1, "c": 3}, "items": [9], "name": "base"}
    (tmp_path / "x.yaml").write_text("extends: y.yaml\n")
    (tmp_path / "y.yaml").write_text("extends: x.yaml\n")
    with pytest.raises(ConfigError, match="cycle"):
        load_yaml(tmp_path / "x.yaml")
    (tmp_path / "lost.yaml").write_text("extends: nowhere.yaml\n")
    with pytest.raises(ConfigError, match="nowhere.yaml.*extended by"):
        load_yaml(tmp_path / "lost.yaml")
    (tmp_path / "bad.yaml").write_text("extends: [1]\n")
    with pytest.raises(ConfigError, match="extends must be the path"):
        load_yaml(tmp_path / "bad.yaml")


def test_gpus_per_engine_above_one_must_be_whole() -> None:
    from posttrain.config import RolloutConfig

    assert RolloutConfig(gpus_per_engine=0.5).gpus_per_engine == 0.5
    assert RolloutConfig(gpus_per_engine=4).gpus_per_engine == 4
    with pytest.raises(ValueError, match="whole GPUs"):
        RolloutConfig(gpus_per_engine=1.5)
