"""The README's multi-turn plug-in, run as a user would: `posttrain env check` on the file as printed."""

from __future__ import annotations

from pathlib import Path

from posttrain.cli import main

README = Path(__file__).parents[2] / "README.md"


def readme_plugin() -> str:
    section = README.read_text().split("## Plugging in a multi-turn environment", 1)[1]
    return section.split("```python\n", 1)[1].split("```", 1)[0]


def test_readme_multiturn_plugin_passes_env_check(tmp_path, monkeypatch, capsys):
    (tmp_path / "capitals_env.py").write_text(readme_plugin())
    monkeypatch.syspath_prepend(str(tmp_path))
    assert main(["env", "check", "capitals_env:CapitalsEnv", "--n", "3"]) == 0, capsys.readouterr().out


def test_env_check_fails_a_multiturn_env_that_rewards_garbage(tmp_path, monkeypatch, capsys):
    broken = readme_plugin().replace("float(turn.content.strip() == episode.sample.answer)", "1.0")
    assert broken != readme_plugin()
    (tmp_path / "capitals_broken.py").write_text(broken)
    monkeypatch.syspath_prepend(str(tmp_path))
    assert main(["env", "check", "capitals_broken:CapitalsEnv", "--n", "3"]) == 1
    assert "FAILED" in capsys.readouterr().out
