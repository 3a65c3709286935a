"""Every built-in passes `env check`; dataset loaders read the common formats and report bad rows."""

from __future__ import annotations

import asyncio
import json

import pytest

from posttrain.environments.base import score_safely
from posttrain.environments.check import check_environment
from posttrain.environments.data import DataError
from posttrain.environments.registry import load_environment

BUILTIN_OPTIONS = {
    "math": {"size": 20},
    "code": {},
    "instruction_following": {"size": 30},
    "json_schema": {"size": 30},
    "reasoning_gym": {"tasks": ["basic_arithmetic", "leg_counting"], "size": 5},
    "genrm_preference": {"size": 20, "test_size": 8},
}


@pytest.mark.parametrize("name", sorted(BUILTIN_OPTIONS))
def test_builtin_passes_env_check(name):
    env = load_environment(name, **BUILTIN_OPTIONS[name])
    report = check_environment(env, n=8)
    assert report.ok, "\n".join(report.lines())
    assert report.n_gold == 8
    env.close()


@pytest.mark.parametrize("name", sorted(BUILTIN_OPTIONS))
def test_builtin_splits_are_deterministic_and_disjoint(name):
    env = load_environment(name, **BUILTIN_OPTIONS[name])
    train, again, test = env.samples("train", 0), env.samples("train", 0), env.samples("test", 0)
    assert [s.messages for s in train] == [s.messages for s in again]
    assert train and test
    assert not {s.id for s in train} & {s.id for s in test}
    with pytest.raises(ValueError, match="split"):
        env.samples("validation", 0)


def write_jsonl(path, rows):
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return str(path)


def test_math_loads_gsm8k_and_math_formats(tmp_path):
    gsm = write_jsonl(tmp_path / "gsm.jsonl", [
        {"question": "Tom has 3 apples and buys 1,200 more. How many?", "answer": "3 + 1200 = 1203\n#### 1,203"},
        {"question": "", "answer": "#### 4"},  # empty prompt
        {"answer": "#### 5"},  # missing question
        {"question": "q", "answer": 7},
    ])
    env = load_environment("math", source=gsm, format="gsm8k")
    samples = env.samples("train", 0)
    assert [s.answer for s in samples] == ["1203", "7"]
    assert asyncio.run(score_safely(env, samples[0], "so \\boxed{1203}")).reward == 1.0
    math_file = write_jsonl(tmp_path / "math.jsonl", [
        {"problem": "Simplify 2/4.", "solution": "It is $\\boxed{\\frac{1}{2}}$."},
        {"problem": "No answer here", "solution": "forgot the box"},
    ])
    env = load_environment("math", source=math_file)
    (sample,) = env.samples("train", 0)
    assert sample.answer == "\\frac{1}{2}"
    assert asyncio.run(score_safely(env, sample, "The answer is \\boxed{0.5}")).reward == 1.0
    env.close()


def test_bad_rows_are_reported_with_row_and_field(tmp_path, caplog):
    path = write_jsonl(tmp_path / "bad.jsonl", [
        {"question": "ok", "answer": "#### 1"}, {"question": "", "answer": "2"}, {"question": "x"},
        {"question": ["not", "a", "string"], "answer": "3"},
    ])
    env = load_environment("math", source=path, format="gsm8k")
    assert len(env.samples("train", 0)) == 1
    log = caplog.text
    assert "3 invalid row(s)" in log
    assert "row 1: field 'question' is empty" in log
    assert "row 2: field 'answer' missing" in log
    assert "row 3: field 'question' is list, expected str" in log
    strict = load_environment("math", source=path, format="gsm8k", on_invalid="error")
    with pytest.raises(DataError, match="row 2: field 'answer' missing"):
        strict.samples("train", 0)


def test_all_rows_bad_is_an_error(tmp_path):
    path = write_jsonl(tmp_path / "bad.jsonl", [{"foo": 1}])
    with pytest.raises(DataError, match="no valid rows"):
        load_environment("code", source=path).samples("train", 0)


def test_missing_dataset_is_a_clear_error(tmp_path):
    with pytest.raises(DataError, match="unsupported file type"):
        (tmp_path / "data.txt").write_text("x")
        load_environment("math", source=str(tmp_path / "data.txt")).samples("train", 0)


def test_code_loads_humaneval_and_mbpp(tmp_path):
    he = write_jsonl(tmp_path / "he.jsonl", [{
        "task_id": "HE/0", "prompt": "def inc(x):\n    \"\"\"x + 1\"\"\"\n", "entry_point": "inc",
        "canonical_solution": "    return x + 1\n", "test": "def check(candidate):\n    assert candidate(1) == 2\n"}])
    mbpp = write_jsonl(tmp_path / "mbpp.jsonl", [
        {"task_id": 2, "text": "Write a function to square a number.", "code": "def sq(x):\n    return x * x",
         "test_list": ["assert sq(3) == 9", "assert sq(-2) == 4"], "test_setup_code": ""},
        {"task_id": 3, "text": "No tests", "test_list": []}])
    for source, good, bad in ((he, "```python\ndef inc(x):\n    return x + 1\n```", "def inc(x):\n    return x"),
                              (mbpp, "def sq(x):\n    return x ** 2", "def sq(x):\n    return 9")):
        env = load_environment("code", source=source)
        (sample,) = env.samples("train", 0)
        assert asyncio.run(score_safely(env, sample, good)).reward == 1.0
        assert asyncio.run(score_safely(env, sample, bad)).reward == 0.0
        assert asyncio.run(score_safely(env, sample, env.gold_answer(sample))).reward == 1.0


def test_humaneval_prompt_helpers_are_available_to_tests(tmp_path):
    """HumanEval tests may call functions the prompt defines (decode_cyclic style)."""
    prompt = ("def encode(s: str) -> str:\n    return s[::-1]\n\n\ndef decode(s: str) -> str:\n"
              "    \"\"\"Inverse of encode.\"\"\"\n")
    test = "def check(candidate):\n    assert candidate(encode('abc')) == 'abc'\n"
    path = write_jsonl(tmp_path / "he.jsonl", [{"task_id": "HE/38", "prompt": prompt, "entry_point": "decode",
                                                "canonical_solution": "    return s[::-1]\n", "test": test}])
    env = load_environment("code", source=path)
    (sample,) = env.samples("train", 0)
    assert asyncio.run(score_safely(env, sample, "def decode(s):\n    return s[::-1]")).reward == 1.0
    assert asyncio.run(score_safely(env, sample, "def decode(s):\n    return s")).reward == 0.0


def test_instruction_following_loads_ifeval_rows(tmp_path):
    path = write_jsonl(tmp_path / "ifeval.jsonl", [
        {"key": 1, "prompt": "Write about cats without commas.", "instruction_id_list": ["punctuation:no_comma"],
         "kwargs": [{}]},
        {"key": 2, "prompt": "x", "instruction_id_list": ["made_up:thing"], "kwargs": [{}]}])
    env = load_environment("instruction_following", source=path)
    (sample,) = env.samples("train", 0)
    assert asyncio.run(score_safely(env, sample, "Cats are nice and calm")).reward == 1.0
    assert asyncio.run(score_safely(env, sample, "Cats, dogs")).reward == 0.0
    assert env.gold_answer(sample) is None


def test_json_schema_loads_json_mode_rows(tmp_path):
    schema = {"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]}
    path = write_jsonl(tmp_path / "json.jsonl", [
        {"prompt": [{"role": "user", "content": "give a"}], "schema": json.dumps(schema), "completion": '{"a": 1}'},
        {"prompt": "bad schema", "schema": {"type": "nonsense"}}])
    env = load_environment("json_schema", source=path)
    (sample,) = env.samples("train", 0)
    assert sample.messages == [{"role": "user", "content": "give a"}]
    assert asyncio.run(score_safely(env, sample, '```json\n{"a": 5}\n```')).reward == 1.0
    assert asyncio.run(score_safely(env, sample, '{"a": "5"}')).reward == 0.0


def test_reasoning_gym_rejects_unknown_tasks():
    with pytest.raises(Exception, match="unknown reasoning-gym task"):
        load_environment("reasoning_gym", tasks=["not_a_task"])


@pytest.mark.parametrize(("name", "completion", "kind"), [
    ("math", "I cannot say.", "invalid"),  # no final answer
    ("math", "\\boxed{-1}", "ok"),  # a wrong answer is still a verdict
    ("code", "no code block at all", "invalid"),
    ("instruction_following", "  ", "invalid"),
    ("json_schema", "not json", "invalid"),
    ("genrm_preference", "no verdict", "invalid"),
])
def test_builtins_say_what_kind_of_score_they_give(name, completion, kind):
    env = load_environment(name, **BUILTIN_OPTIONS[name])
    try:
        score = asyncio.run(score_safely(env, env.samples("train", 0)[0], completion))
    finally:
        env.close()
    assert score.kind == kind, score


def test_a_broken_gold_answer_is_infra_not_a_wrong_answer():
    from posttrain.environments.base import Sample

    env = load_environment("math", size=1)
    try:
        score = asyncio.run(score_safely(env, Sample("bad", [{"role": "user", "content": "q"}], answer="\\"),
                                         "\\boxed{3}"))
    finally:
        env.close()
    assert score.kind == "infra" and not score.kind.trained
