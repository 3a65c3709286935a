"""Finding environments by built-in name, module:Class path, and an installed entry point."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

from posttrain.cli import main
from posttrain.environments import registry
from posttrain.environments.registry import load_environment
from posttrain.errors import EnvironmentLoadError

PLUGIN = '''
from posttrain.environments.base import Sample, Score


class EchoEnv:
    """Reward 1 when the answer repeats the word the prompt asks for.

    Options:
        word: the word to repeat
    """

    name = "echo"

    def __init__(self, word: str = "banana"):
        self.word = word

    def samples(self, split, seed):
        return [Sample(id=f"{split}/0", messages=[{"role": "user", "content": f"Say {self.word}."}],
                       answer=self.word)]

    async def score(self, sample, completion):
        return Score(float(completion.strip().lower() == sample.answer))
'''


@pytest.fixture(scope="module")
def plugin_path(tmp_path_factory):
    """A throwaway pip package declaring a posttrain.environments entry point."""
    root = tmp_path_factory.mktemp("plugin")
    (root / "src" / "echo_env").mkdir(parents=True)
    (root / "src" / "echo_env" / "__init__.py").write_text(PLUGIN)
    (root / "pyproject.toml").write_text(textwrap.dedent('''
        [build-system]
        requires = ["setuptools>=68"]
        build-backend = "setuptools.build_meta"
        [project]
        name = "echo-env"
        version = "0.0.1"
        [project.entry-points."posttrain.environments"]
        echo = "echo_env:EchoEnv"
        [tool.setuptools.packages.find]
        where = ["src"]
    '''))
    target = root / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation",
                    "--target", str(target), str(root)], check=True, capture_output=True)
    sys.path.insert(0, str(target))
    yield target
    sys.path.remove(str(target))


def test_entry_point_environment_is_found(plugin_path):
    assert "echo" in registry.entry_point_names()
    env = load_environment("echo", word="kiwi")
    assert env.samples("train", 0)[0].answer == "kiwi"


def test_entry_point_env_passes_check_via_cli(plugin_path, capsys):
    assert main(["env", "check", "echo", "-o", "word=kiwi", "--n", "1"]) == 0
    assert "gold answers scoring 1.0: 1/1" in capsys.readouterr().out


def test_module_class_path(tmp_path, monkeypatch):
    (tmp_path / "my_env_mod.py").write_text(PLUGIN)
    monkeypatch.syspath_prepend(str(tmp_path))
    env = load_environment("my_env_mod:EchoEnv")
    assert env.name == "echo"


@pytest.mark.parametrize(
    ("name", "options", "message"),
    [
        ("nope", {}, "unknown environment 'nope'; known: code, genrm, genrm_preference, guess_number, http, instruction_following"),
        ("no_such_module_xyz:Env", {}, "cannot import 'no_such_module_xyz'"),
        ("posttrain.environments.base:Missing", {}, "has no attribute 'Missing'"),
        ("math", {"levels": [9]}, "levels must be a non-empty subset of 1..5"),
        ("math", {"colour": "red"}, "bad options"),
        ("posttrain.environments.base:Score", {"reward": 1.0}, "lacks name, samples"),
    ],
)
def test_load_errors_name_the_problem(name, options, message):
    with pytest.raises(EnvironmentLoadError, match=message.replace("(", r"\(")):
        load_environment(name, **options)


def test_env_list_cli(capsys):
    assert main(["env", "list"]) == 0
    out = capsys.readouterr().out
    for name in registry.builtin_names():
        assert name in out


def test_env_check_cli_failure_exit_code(tmp_path, monkeypatch, capsys):
    broken = PLUGIN.replace("float(completion.strip().lower() == sample.answer)", "1.0")  # rewards garbage
    (tmp_path / "broken_env_mod.py").write_text(broken)
    monkeypatch.syspath_prepend(str(tmp_path))
    assert main(["env", "check", "broken_env_mod:EchoEnv", "--n", "1"]) == 1
    assert "FAILED" in capsys.readouterr().out


def test_readme_example_is_the_tested_plugin():
    """The README's worked example is exactly the plug-in these tests install and check."""
    from pathlib import Path

    readme = (Path(__file__).parents[2] / "README.md").read_text()
    block = readme.split("```python\n", 1)[1].split("```", 1)[0]
    assert block.strip() == PLUGIN.strip()
    assert 'echo = "echo_env:EchoEnv"' in readme


def test_env_check_samples_from_a_model(capsys, tiny_llama_dir):
    assert main(["env", "check", "math", "-o", "size=4", "--n", "2", "--model", "tiny-llama"]) == 0
    out = capsys.readouterr().out
    assert "reward distribution of 2 completions sampled from tiny-llama" in out
