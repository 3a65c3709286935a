"""The `posttrain` command: help, dry runs, errors, and real chats (end-to-end smoke)."""

from __future__ import annotations

import argparse
import re
import subprocess
import sys

import pytest
import yaml

from posttrain.cli import build_parser, main


def posttrain(*args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "posttrain", *args], capture_output=True, text=True,
                          timeout=timeout)


def _leaf_commands(parser: argparse.ArgumentParser, path: tuple[str, ...] = ()) -> dict[tuple[str, ...], object]:
    """Every runnable command path (``("genrm", "eval")``, ...) and the function it runs."""
    subs = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    if not subs:
        return {path: parser.get_default("func")}
    return {leaf: func for name, sub in subs[0].choices.items()
            for leaf, func in _leaf_commands(sub, (*path, name)).items()}


def test_help_lists_only_working_commands(capsys):
    """`posttrain --help` names exactly the registered commands, and every command (each action of
    a command with actions) runs a function of its own module and answers --help."""
    with pytest.raises(SystemExit) as exit_:
        main(["--help"])
    assert exit_.value.code == 0
    listed = re.findall(r"^    ([a-z][a-z-]*)(?:\s|$)", capsys.readouterr().out, re.MULTILINE)
    parser = build_parser()
    (top,) = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    assert sorted(listed) == sorted(top.choices) and len(listed) >= 10
    leaves = _leaf_commands(parser)
    assert ("genrm", "eval") in leaves and ("models", "prepare") in leaves and ("verify", "math") in leaves
    for path, func in leaves.items():
        assert callable(func), f"posttrain {' '.join(path)} runs nothing"
        assert func.__module__.startswith("posttrain") and func.__module__ != "argparse"
        with pytest.raises(SystemExit) as exit_:
            main([*path, "--help"])
        assert exit_.value.code == 0, path


def test_chat_dry_run_prints_resolved_config(capsys):
    assert main(["chat", "--model", "tiny-llama", "--no-think", "--budget", "5",
                 "--set", "generation.top_p=0.5", "--dry-run", "hi"]) == 0
    cfg = yaml.safe_load(capsys.readouterr().out)
    assert cfg["model"]["name"] == "tiny-llama"
    assert cfg["generation"] == {**cfg["generation"], "enable_thinking": False, "reasoning_budget": 5, "top_p": 0.5}


def test_config_error_exits_2_with_the_key(capsys):
    assert main(["chat", "--set", "generation.temprature=1", "--dry-run", "hi"]) == 2
    err = capsys.readouterr().err
    assert "generation.temprature: unknown key" in err and "did you mean 'temperature'" in err


def test_unknown_model_is_a_clear_error(capsys):
    assert main(["models", "prepare", "nope"]) == 2
    assert "unknown built-in model 'nope'" in capsys.readouterr().err


def test_user_error_is_one_line_and_verbose_adds_the_traceback(tmp_path, capsys):
    assert main(["report", str(tmp_path / "nope")]) == 2
    err = capsys.readouterr().err
    assert err.splitlines() == [f"posttrain: error: run folder {str(tmp_path / 'nope')!r} does not exist; "
                                "pass a pipeline or stage run folder"]
    assert main(["-v", "report", str(tmp_path / "nope")]) == 2
    assert "Traceback" in capsys.readouterr().err


@pytest.mark.parametrize("error", [ValueError("bad shape deep inside"), OSError(5, "Input/output error")])
def test_internal_errors_print_their_traceback(error, tmp_path, capsys, monkeypatch):
    """A ValueError or OSError that is not a user error is a bug or an outage: its traceback is shown."""
    from posttrain import report_data

    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "metrics.jsonl").write_text('{"step": 1}\n')

    def read_metrics(path):
        raise error

    monkeypatch.setattr(report_data, "read_metrics", read_metrics)
    assert main(["report", str(tmp_path / "run")]) == 1
    err = capsys.readouterr().err
    assert "Traceback (most recent call last)" in err and "in read_metrics" in err
    assert err.rstrip().splitlines()[-1] == f"{type(error).__name__}: {error}"


def test_verify_input_errors_stay_one_line(tmp_path, capsys):
    """`verify` reports bad input files with plain ValueError / OSError raised in its own module."""
    assert main(["verify", "math", "--pairs", str(tmp_path / "missing.jsonl")]) == 2
    err = capsys.readouterr().err
    assert len(err.splitlines()) == 1 and "missing.jsonl" in err and "Traceback" not in err


def test_config_describe(capsys):
    assert main(["config", "chat"]) == 0
    out = capsys.readouterr().out
    assert "generation.reasoning_budget: int | None = null  # max reasoning tokens" in out


def test_models_list(capsys, tiny_llama_dir, tmp_path, monkeypatch):
    assert main(["models", "list"]) == 0
    states = {line.split()[0]: line.split()[1:3] for line in capsys.readouterr().out.splitlines()[:-1]}
    assert states["tiny-llama"][0] == "prepared"  # the fixture prepared it
    assert set(states) == {"smollm2-135m-instruct", "tiny-llama", "tiny-nemotron-h"}
    monkeypatch.setenv("POSTTRAIN_CACHE", str(tmp_path))  # an empty cache: nothing prepared
    assert main(["models", "list"]) == 0
    lines = capsys.readouterr().out.splitlines()[:-1]
    assert [line.split()[1:3] for line in lines] == [["not", "prepared"]] * 3


@pytest.mark.parametrize("model", ["tiny-llama", "tiny-nemotron-h"])
def test_chat_runs_on_tiny_models(model, tiny_llama_dir, tiny_nemotron_dir):
    proc = posttrain("chat", "--model", model, "--max-new-tokens", "12", "--budget", "4", "hi")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.startswith("<think>\n") and "</think>" in proc.stdout  # budget 4 forced the close
    assert "12 tokens" in proc.stderr


def test_chat_smollm2_gives_a_real_answer(smollm2_dir):
    proc = posttrain("chat", "--model", "smollm2-135m-instruct", "--no-think", "--max-new-tokens", "32",
                     "What is the capital of France? Answer in one sentence.")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "Paris" in proc.stdout


def _config_commands():
    """(parser, defaults) of every command that takes config overrides."""
    from posttrain.cli import build_parser

    parser = build_parser()
    subs = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)][0]
    stack, out = list(subs.choices.items()), []
    while stack:
        name, p = stack.pop()
        for action in p._actions:
            if isinstance(action, argparse._SubParsersAction):
                stack.extend(action.choices.items())
        if p.get_default("config_command"):
            out.append((name, p))
    return out


def test_every_help_example_parses_with_its_commands_config():
    from posttrain.config import load_config
    from posttrain.stage_cli import CONFIGS, config_class

    commands = _config_commands()
    assert {p.get_default("config_command") for _, p in commands} == set(CONFIGS)
    for name, p in commands:
        examples = p.get_default("help_examples")
        assert examples and all(e in p.format_help().replace("\n", " ").replace("  ", " ") or "=" in e
                                for e in examples), name
        load_config(config_class(p.get_default("config_command")), None, examples)  # raises if one is wrong


def test_config_lists_the_keys_of_every_command(capsys):
    from posttrain.stage_cli import CONFIGS

    for command in CONFIGS:
        assert main(["config", *command.split()]) == 0
        assert "model.name: str" in capsys.readouterr().out or command == "eval"
    assert main(["config", "sft", "preview"]) == 2
    assert "no config for 'sft preview'; commands with one: chat, sft" in capsys.readouterr().err


def test_set_is_the_positional_override_and_applies_after_it(capsys):
    assert main(["rlvr", "--dry-run", "run.steps=3", "environments.0.options.size=4", "--set", "run.steps=4",
                 "--set", "train.lr=1e-6"]) == 0
    out = capsys.readouterr().out
    assert "  steps: 4\n" in out and "  lr: 1.0e-06\n" in out


def test_sft_preview_has_its_own_help(capsys):
    with pytest.raises(SystemExit):
        main(["sft", "preview", "--help"])
    out = capsys.readouterr().out
    assert out.startswith("usage: posttrain sft preview") and "--mode" in out and "--resume" not in out


def test_a_model_name_typo_gets_did_you_mean_at_once(capsys):
    assert main(["chat", "--model", "tiny-lama", "hi"]) == 2
    assert "unknown model 'tiny-lama' (did you mean 'tiny-llama'?)" in capsys.readouterr().err


def test_third_party_request_logs_are_warnings_unless_verbose(capsys):
    import logging

    main(["config", "chat"])
    assert logging.getLogger("httpx").level == logging.WARNING


def test_keys_show_the_defaults_that_run():
    """Every `posttrain config COMMAND` line's default is the value that command's config really has
    (a section's own defaults, not its class's: genrm eval generates 96 tokens, not 256)."""
    import json

    from posttrain.config import describe, load_config
    from posttrain.stage_cli import CONFIGS, config_class

    for command in CONFIGS:
        cls = config_class(command)
        resolved = load_config(cls, None, []).model_dump(mode="json")
        for line in describe(cls):
            key, _, rest = line.partition(": ")
            if " = " not in rest.split("  # ")[0]:
                continue  # required, no default
            shown = json.loads(rest.split("  # ")[0].split(" = ", 1)[1])
            value = resolved
            for part in key.split("."):
                value = value[part]
            assert shown == value, (command, key, shown, value)
