"""Environment options as typed config: checked before the environment is built, listed by
`env show`, reachable by dotted overrides of list items; `--dry-run` builds environments."""

from __future__ import annotations

import os
import sys

import pytest

from posttrain.cli import main
from posttrain.config import load_config
from posttrain.environments.options import check_options, describe_options, option_help
from posttrain.environments.registry import EnvConfig, check_environments, load_environment
from posttrain.errors import ConfigError, EnvironmentLoadError
from posttrain.pipeline import PipelineConfig
from posttrain.rlvr.config import RLVRConfig

PLUGIN = '''
from posttrain.environments.base import Sample, Score


class CountEnv:
    """Say a number.

    Options:
        size: train prompts
        words: spell numbers out
            (continued help)
    """

    name = "count"

    def __init__(self, size: int = 3, words: bool = False, *, scale: float) -> None:
        self.size, self.words, self.scale = size, words, scale

    def samples(self, split, seed):
        return [Sample(id=f"{split}/{i}", messages=[{"role": "user", "content": f"Say {i}."}], answer=str(i))
                for i in range(self.size)]

    async def score(self, sample, completion):
        return Score(float(completion.strip() == sample.answer))
'''


def test_a_wrong_type_is_one_error_naming_the_environment_and_option():
    with pytest.raises(EnvironmentLoadError) as err:
        load_environment("math", size="many", levels=["x"])
    text = str(err.value)
    assert text.startswith("environment 'math': bad options (`posttrain env show math` lists them)")
    assert "size = 'many': Input should be a valid integer" in text and "levels" in text


def test_an_unknown_option_gets_did_you_mean_and_the_allowed_list():
    with pytest.raises(EnvironmentLoadError, match=r"levls: unknown option \(did you mean 'levels'\?\); allowed: "
                                                   r"format, levels, limit"):
        load_environment("math", levls=[1])


def test_values_are_coerced_to_the_declared_types():
    from posttrain.environments.math_env import MathEnv

    assert check_options("math", MathEnv, {"size": "7", "test_size": 3.0}) == {"size": 7, "test_size": 3}
    env = load_environment("math", size="7", test_size=2)
    assert len(env.samples("train", 0)) == 7
    env.close()


def test_options_of_a_plain_class_from_its_signature_and_docstring(tmp_path, monkeypatch):
    (tmp_path / "count_env_mod.py").write_text(PLUGIN)
    monkeypatch.syspath_prepend(str(tmp_path))
    from count_env_mod import CountEnv

    assert option_help(CountEnv) == {"size": "train prompts", "words": "spell numbers out (continued help)"}
    assert describe_options(CountEnv) == ["size: int = 3  # train prompts",
                                          "words: bool = false  # spell numbers out (continued help)",
                                          "scale: float"]
    with pytest.raises(EnvironmentLoadError, match="scale: required, not given"):
        load_environment("count_env_mod:CountEnv")
    assert load_environment("count_env_mod:CountEnv", scale="0.5").scale == 0.5


def test_kwargs_pass_unknown_options_and_a_declared_model_is_used_as_is():
    def factory(size: int = 1, **extra):
        return extra

    assert check_options("f", factory, {"size": "2", "anything": 1}) == {"size": 2, "anything": 1}
    assert describe_options(factory)[-1] == "(other options are passed on unchecked)"
    from posttrain.genrm.environment import GenRMEnv

    with pytest.raises(EnvironmentLoadError, match=r"judge.max_tokns: unknown option \(did you mean 'max_tokens'\?\)"):
        check_options("genrm", GenRMEnv, {"judge": {"max_tokns": 3}})
    assert any(line.startswith("judge.timeout_s: float = 120.0  # ") for line in describe_options(GenRMEnv))


def test_env_show_lists_the_options(capsys):
    assert main(["env", "show", "math", "-o", "size=3", "--n", "1"]) == 0
    out = capsys.readouterr().out
    assert "  levels: tuple[int, ...] | list[int] = [1, 2, 3, 4, 5]  # generator difficulty levels" in out
    assert main(["env", "show", "math", "-o", "size=many"]) == 2
    assert "size = 'many'" in capsys.readouterr().err


def test_every_builtin_documents_every_option():
    from posttrain.environments.registry import builtin_names, find_class

    for name in builtin_names():
        lines = describe_options(find_class(name))
        undocumented = [line for line in lines if "  # " not in line]
        assert not undocumented, (name, undocumented)


def test_overrides_reach_list_items_by_index_and_by_name():
    cfg = load_config(RLVRConfig, None, ["environments=[{name: math}, {name: code}]",
                                         "environments.0.options.size=5", "environments.code.weight=2"])
    assert cfg.environments[0].options == {"size": 5} and cfg.environments[1].weight == 2.0
    # the preset's default list is edited in place when no file or earlier override names it
    cfg = load_config(PipelineConfig, None, ["rlvr.environments.0.options.size=9"])
    assert cfg.rlvr.environments[0].name == RLVRConfig().environments[0].name
    assert cfg.rlvr.environments[0].options["size"] == 9
    with pytest.raises(ConfigError, match=r"rlvr.environments has no item 'kode' \(it holds 1: 0=math\)"):
        load_config(PipelineConfig, None, ["rlvr.environments.kode.weight=2"])
    with pytest.raises(ConfigError, match="has no item '3'"):
        load_config(RLVRConfig, None, ["environments.3.weight=2"])


def test_dry_run_builds_every_environment_and_writes_nothing(tmp_path, capsys):
    run = tmp_path / "run"
    args = ["rlvr", "--dry-run", f"run_dir={run}", "environments=[{name: math, options: {size: 4, test_size: 2}}]"]
    assert main(args) == 0
    assert "# environment math: ok, 4 train / 2 test samples" in capsys.readouterr().out
    assert main([*args, "environments.math.options.levls=[1]"]) == 2
    assert "did you mean 'levels'" in capsys.readouterr().err
    assert not run.exists()


def test_pipeline_dry_run_prints_each_stages_resolved_config(tmp_path, capsys):
    assert main(["pipeline", "--dry-run", "--config", "configs/pipeline/tiny_smoke.yaml", f"run_dir={tmp_path}/p"]) == 0
    out = capsys.readouterr().out
    assert f"# stage rlvr (run_dir {tmp_path}/p/rlvr)" in out
    assert f"init_from: {tmp_path}/p/sft/model" in out  # the SFT stage's model, as the pipeline will hand it on
    assert "# environment genrm_preference: ok" in out and not (tmp_path / "p").exists()


def test_check_environments_refuses_an_environment_without_train_data(tmp_path, monkeypatch):
    (tmp_path / "empty_env_mod.py").write_text(PLUGIN)
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(EnvironmentLoadError, match="'empty_env_mod:CountEnv' has no train samples"):
        check_environments([EnvConfig(name="empty_env_mod:CountEnv", options={"size": 0, "scale": 1})])


def test_module_class_imports_from_the_current_folder(tmp_path, monkeypatch):
    (tmp_path / "cwd_env_mod.py").write_text(PLUGIN)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", [p for p in sys.path if p not in ("", str(tmp_path))])
    monkeypatch.delenv("PYTHONPATH", raising=False)
    assert load_environment("cwd_env_mod:CountEnv", scale=1).name == "count"
    assert os.environ["PYTHONPATH"] == str(tmp_path)  # Ray workers started later find it too
