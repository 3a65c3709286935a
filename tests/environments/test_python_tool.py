"""`python_tool`: generated problems, the sandboxed python tool, the boxed final answer, and hostile
tool code that costs only its own call."""

from __future__ import annotations

import asyncio
import os
import time
from pathlib import Path

import pytest

from posttrain.environments.base import ScoreKind, StageResources
from posttrain.environments.check import play_episode
from posttrain.environments.multiturn import AssistantTurn, Episode, ToolCall
from posttrain.environments.python_tool_env import SYSTEM_PROMPT, PythonToolEnv
from posttrain.verifiers.code import CodeResult
from posttrain.verifiers.pool import CodeJob, run_job
from posttrain.verifiers.sandbox import Limits

PROJECT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def env():
    env = PythonToolEnv(size=12, test_size=6, tool_timeout_s=2.0, max_output_chars=300)
    yield env
    env.close()


def call(code: str, content: str = "") -> AssistantTurn:
    return AssistantTurn(content=content, reasoning=None, tool_calls=(ToolCall("python", {"code": code}),))


def answer(text: str) -> AssistantTurn:
    return AssistantTurn(content=text, reasoning=None)


def run(env, *turns, sample=None):
    """The observations of the turns, on a fresh episode of ``sample`` (default: the first)."""
    async def go():
        sample_ = sample or env.samples("train", 0)[0]
        episode = await env.reset(sample_)
        return [await env.step(episode, t) for t in turns]
    return asyncio.run(go())


def test_samples_are_seeded_split_and_in_range(env):
    train, again, test = env.samples("train", 0), env.samples("train", 0), env.samples("test", 0)
    assert [s.messages for s in train] == [s.messages for s in again] and len(train) == 12 and len(test) == 6
    assert not {s.messages[1]["content"] for s in train} & {s.messages[1]["content"] for s in test}
    assert env.samples("train", 1)[0].messages != train[0].messages
    for s in train + test:
        assert s.messages[0] == {"role": "system", "content": SYSTEM_PROMPT}
        assert str(eval(s.info["expression"])) == s.answer
        assert all(4 <= d <= 6 for d in s.info["digits"])
    with pytest.raises(ValueError, match="split"):
        env.samples("validation", 0)


def test_digits_and_word_problem_options():
    only = PythonToolEnv(digits=[4, 4], word_problems=0.0, size=20)
    samples = only.samples("train", 0)
    assert all(s.info == {"kind": "multiply", "expression": s.info["expression"], "digits": [4, 4]} for s in samples)
    assert all(s.messages[1]["content"] == f"What is {s.info['expression']}?" for s in samples)
    words = PythonToolEnv(word_problems=1.0, size=20).samples("train", 0)
    assert {s.info["kind"] for s in words} == {"word"}
    for bad in ({"digits": [6, 4]}, {"digits": [0, 3]}, {"digits": 5}, {"word_problems": 2.0}, {"max_turns": 0}):
        with pytest.raises(ValueError):
            PythonToolEnv(**bad)
    only.close()


def test_tool_schema_is_the_python_function(env):
    assert env.tools == [{"type": "function", "function": {
        "name": "python", "description": "Run a Python program and return what it prints (stdout and stderr).",
        "parameters": {"type": "object", "properties": {"code": {"type": "string",
                                                                 "description": "the Python program to run"}},
                       "required": ["code"], "additionalProperties": False}}}]
    assert env.max_turns == 4 and env.sandboxed


def test_tool_output_then_boxed_answer_scores_one(env):
    sample = env.samples("train", 0)[0]
    tool_obs, final = run(env, call(f"print({sample.info['expression']})"),
                          answer(f"So the answer is \\boxed{{{sample.answer}}}."), sample=sample)
    assert not tool_obs.done and tool_obs.messages == [{"role": "tool", "name": "python", "content": sample.answer + "\n"}]
    assert tool_obs.metrics == {"tool_calls": 1.0, "tool_errors": 0.0} and tool_obs.errors == ()
    assert final.done and final.score.reward == 1.0 and final.score.kind == ScoreKind.OK
    assert final.metrics == {"tool_calls": 0.0, "tool_errors": 0.0}  # present in every episode's sums


def test_last_expression_is_shown_and_silence_is_explained(env):
    (obs,) = run(env, call("x = 6\nx * 7"))
    assert obs.messages[0]["content"] == "42\n"
    (obs,) = run(env, call("x = 6"))
    assert obs.messages[0]["content"].startswith("(no output")


@pytest.mark.parametrize(("text", "reward", "kind"), [
    ("\\boxed{1}", 0.0, ScoreKind.OK),
    ("I think it is large.", 0.0, ScoreKind.INVALID),
    ("", 0.0, ScoreKind.INVALID),
])
def test_wrong_or_missing_answers_score_zero(env, text, reward, kind):
    (obs,) = run(env, answer(text))
    assert obs.done and (obs.score.reward, obs.score.kind) == (reward, kind)


def test_only_the_boxed_answer_counts(env):
    sample = env.samples("train", 0)[0]
    (obs,) = run(env, answer(f"The answer is {sample.answer}."), sample=sample)  # right number, not boxed
    assert obs.score.reward == 0.0


def test_tool_errors_are_messages_and_counted(env):
    turn = AssistantTurn(content="", reasoning=None, tool_call_errors=("unclosed <tool_call>",),
                         tool_calls=(ToolCall("python", {"code": "1/0"}), ToolCall("shell", {"cmd": "ls"}),
                                     ToolCall("python", {"source": "print(1)"})))
    (obs,) = run(env, turn)
    contents = [m["content"] for m in obs.messages]
    assert not obs.done and len(contents) == 4 and all(c.startswith("error: ") for c in contents)
    assert "unclosed" in contents[0] and "ZeroDivisionError" in contents[1]
    assert "unknown tool 'shell'" in contents[2] and "bad arguments for python" in contents[3]
    assert obs.metrics == {"tool_calls": 3.0, "tool_errors": 4.0} and len(obs.errors) == 4


def test_code_runs_on_the_stage_runner():
    jobs = []

    class Runner:
        async def arun(self, job):
            jobs.append(job)
            return CodeResult(True, "passed", 0.01, output="from the stage\n")

    env = PythonToolEnv(size=2, tool_timeout_s=3.0, max_output_chars=100)
    env.start(StageResources(code_runner=Runner()))
    (obs,) = run(env, call("print(1)"))
    assert obs.messages[0]["content"] == "from the stage\n"
    assert jobs == [CodeJob("print(1)", execute=True, timeout_s=3.0, max_output_chars=100)]
    env.close()


@pytest.mark.parametrize(("result", "shown"), [
    (CodeResult(False, "timeout", 2.0, "wall limit 2s"), "error: timed out after 2s"),
    (CodeResult(False, "infra", 0.0, "sandbox actor died"), "error: the sandbox could not run the code: sandbox"),
    (CodeResult(False, "memory", 1.0, "cap"), "error: out of memory"),
])
def test_failed_runs_become_error_messages(result, shown):
    class Runner:
        async def arun(self, job):
            return result

    env = PythonToolEnv(size=2, tool_timeout_s=2.0)
    env.start(StageResources(code_runner=Runner()))
    (obs,) = run(env, call("print(1)"))
    assert obs.messages[0]["content"].startswith(shown) and obs.metrics["tool_errors"] == 1.0
    env.close()


def test_execute_job_uses_the_runner_limits_with_a_shorter_wall():
    start = time.monotonic()
    result = run_job(CodeJob("while True:\n    pass\n", execute=True, timeout_s=1.0), Limits(wall_s=20))
    assert result.kind == "timeout" and time.monotonic() - start < 5
    result = run_job(CodeJob("print('a' * 50)\nprint(undefined)", execute=True, max_output_chars=30), Limits())
    assert result.kind == "runtime_error" and result.output.startswith("a" * 30 + "\n... [output truncated")


HOSTILE = {
    "hang": "while True:\n    pass",
    "sleep": "import time\ntime.sleep(60)",
    "output_flood": "while True:\n    print('x' * 10000)",
    "big_print": "print('y' * 2_000_000)",
    "huge_print": "print('y' * 50_000_000)",
    "fork_bomb": "import os\nwhile True:\n    try:\n        os.fork()\n    except OSError:\n        pass",
    "memory_bomb": "x = []\nwhile True:\n    x.append(bytearray(10**7))",
    "write_outside": "for p in {targets!r}:\n    try:\n        open(p, 'w').write('pwned')\n    except OSError as e:\n"
                     "        print(type(e).__name__)",
    "read_host_files": "for p in ['/etc/shadow', {project_file!r}]:\n    try:\n        print(open(p).read()[:20])\n"
                       "    except OSError as e:\n        print(type(e).__name__)",
    "network": "import socket\nsocket.create_connection(('127.0.0.1', {port}), timeout=1)",
    "kill_parent": "import os, signal\nfor pid in (os.getppid(), {host_pid}, 1, -1):\n    try:\n"
                   "        os.kill(pid, signal.SIGKILL)\n    except OSError:\n        pass",
    "exit_early": "import os\nos._exit(0)",
    "daemon": "import os, time\nif os.fork() == 0:\n    os.setsid()\n    time.sleep(60)\nprint('parent done')",
}


@pytest.mark.parametrize("name", sorted(HOSTILE))
def test_hostile_tool_code_costs_only_its_call(name, env, host_listener, tmp_path):
    sentinel = tmp_path / "sentinel"
    sentinel.write_text("intact")
    targets = [str(sentinel), str(PROJECT / "pwned"), "/etc/pwned", "/usr/pwned"]
    code = HOSTILE[name].format(targets=targets, project_file=str(PROJECT / "pyproject.toml"),
                                port=host_listener.getsockname()[1], host_pid=os.getpid())
    sample = env.samples("train", 0)[0]
    start = time.monotonic()
    hostile, follow_up, final = run(env, call(code), call(f"print({sample.info['expression']})"),
                                    answer(f"\\boxed{{{sample.answer}}}"), sample=sample)
    assert time.monotonic() - start < 30, f"{name}: the tool call was not bounded"
    assert not hostile.done and len(hostile.messages) == 1 and hostile.messages[0]["role"] == "tool"
    assert len(hostile.messages[0]["content"]) <= env.max_output_chars + 300
    assert follow_up.messages[0]["content"] == sample.answer + "\n", f"after {name}: {follow_up.messages}"
    assert final.score.reward == 1.0
    # the host is intact
    assert sentinel.read_text() == "intact" and not (PROJECT / "pwned").exists()
    assert not Path("/etc/pwned").exists() and not Path("/usr/pwned").exists()
    with pytest.raises(BlockingIOError):
        host_listener.accept()
    if name in ("hang", "sleep"):
        assert hostile.messages[0]["content"] == "error: timed out after 2s"
    if name == "big_print":
        assert "[output truncated: 1999701 more characters]" in hostile.messages[0]["content"]
    if name == "huge_print":  # over the sandbox's reply limit: no output at all comes back
        assert hostile.messages[0]["content"] == "error: printed more output than the limit"
    if name == "read_host_files":
        assert "root:" not in hostile.messages[0]["content"] and "[project]" not in hostile.messages[0]["content"]


def test_gold_episode_scores_one_and_garbage_scores_zero(env):
    for sample in env.samples("train", 0)[:4]:
        gold = env.gold_episode(sample)
        assert len(gold) == 2 and '"name": "python"' in gold[0] and gold[1].endswith(f"\\boxed{{{sample.answer}}}.")
        score = asyncio.run(play_episode(env, sample, gold, repeat=False, max_turns=env.max_turns))
        assert (score.reward, score.kind) == (1.0, ScoreKind.OK), score
        score = asyncio.run(play_episode(env, sample, [gold[0]], repeat=True, max_turns=env.max_turns))
        assert score.reward == 0.0  # calling the tool forever never answers


def test_reset_copies_the_prompt(env):
    sample = env.samples("train", 0)[0]
    episode = asyncio.run(env.reset(sample))
    assert isinstance(episode, Episode) and episode.messages == sample.messages
    assert episode.messages is not sample.messages


@pytest.mark.slow  # a local Ray cluster takes 10-20 s to start
def test_tool_code_runs_on_the_stage_sandbox_actors():
    """Through a VerifierPool (the stage's sandbox-N actors): output, a hang bounded by the tool's wall limit
    (not the pool's longer one), and the same actor answering the next call."""
    ray = pytest.importorskip("ray")
    import shutil
    import tempfile

    from posttrain.verifiers.pool import VerifierPool

    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    if ray.is_initialized():
        ray.shutdown()
    temp_dir = tempfile.mkdtemp(prefix="/tmp/ptt-")  # short: Ray's socket paths have a length limit
    ray.init(num_cpus=1, include_dashboard=False, _temp_dir=temp_dir, namespace="python-tool-test",
             configure_logging=False, log_to_driver=False)
    env, pool = PythonToolEnv(size=2, tool_timeout_s=1.5), None
    try:
        pool = VerifierPool(num_workers=1, limits=Limits(wall_s=10), call_timeout_s=30)
        env.start(StageResources(code_runner=pool))
        sample = env.samples("train", 0)[0]
        start = time.monotonic()
        hang, good, final = run(env, call("while True:\n    pass"), call(f"print({sample.info['expression']})"),
                                answer(f"\\boxed{{{sample.answer}}}"), sample=sample)
        assert hang.messages[0]["content"] == "error: timed out after 1.5s" and time.monotonic() - start < 15
        assert good.messages[0]["content"] == sample.answer + "\n" and final.score.reward == 1.0
    finally:
        env.close()
        if pool is not None:
            pool.shutdown()
        ray.shutdown()
        shutil.rmtree(temp_dir, ignore_errors=True)
