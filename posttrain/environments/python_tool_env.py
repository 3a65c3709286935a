"""`python_tool`: arithmetic a small model cannot do in its head, with a Python tool to do it.

Problems are generated (seeded): products of two 4-6-digit numbers, and word problems built on
the same products (plus or minus a smaller number). The model may call ``python`` (one argument,
``code``); the code runs in the verifiers' sandbox on the code runner the stage hands over in
``start`` (its ``sandbox-N`` actors, same isolation and limits as code scoring; a
:class:`~posttrain.verifiers.service.LocalRunner` when unstarted), with the wall limit lowered to
``tool_timeout_s``. What it prints comes back as a ``tool`` message; a timeout, crash, traceback or
flood costs only that call (an ``error: ...`` message and a counted error). A turn without a tool
call ends the episode: the last ``\\boxed{}`` of its answer is checked by the math verifier,
reward 1 or 0.
"""

from __future__ import annotations

import random
from typing import Any

from posttrain.environments.base import DefaultHooks, Sample, Score, ScoreKind, StageResources, user_prompt
from posttrain.environments.multiturn import AssistantTurn, Episode, Observation, ToolCall
from posttrain.environments.tools import Tool, ToolBox, ToolError
from posttrain.tool_calls import format_call

SYSTEM_PROMPT = (
    "You can run Python code with the `python` tool. Call it with one argument, `code`: a Python "
    "program. What the program prints is returned to you (the value of a last bare expression is shown "
    "too). Use it for any arithmetic you cannot do exactly in your head. When you know the answer, reply "
    "without a tool call and put the final answer within \\boxed{}.")
PYTHON_PARAMETERS: dict[str, Any] = {
    "type": "object",
    "properties": {"code": {"type": "string", "description": "the Python program to run"}},
    "required": ["code"],
    "additionalProperties": False,
}
PYTHON_DESCRIPTION = "Run a Python program and return what it prints (stdout and stderr)."

# (question template, expression template); {a} and {b} are the factors, {c} a smaller number
WORD_PROBLEMS: tuple[tuple[str, str], ...] = (
    ("A factory makes {a} bolts every day. How many bolts does it make in {b} days?", "{a} * {b}"),
    ("A stadium has {a} rows with {b} seats in each row. {c} seats are taken. How many seats are free?",
     "{a} * {b} - {c}"),
    ("A shop sells {a} boxes of nails, each holding {b} nails, and then gets {c} loose nails. How many nails "
     "did it sell and get in total?", "{a} * {b} + {c}"),
    ("A train carries {a} crates, and each crate weighs {b} grams. What is the total weight in grams?",
     "{a} * {b}"),
    ("A farmer plants {a} rows of {b} trees each, and {c} of the trees die. How many trees are alive?",
     "{a} * {b} - {c}"),
)


def _number(rng: random.Random, digits: int) -> int:
    return rng.randint(10 ** (digits - 1), 10 ** digits - 1)


def generate_problem(rng: random.Random, digits: tuple[int, int], word_share: float) -> tuple[str, str, dict[str, Any]]:
    """(question, answer, info) of one problem; ``digits`` is the (lowest, highest) factor length."""
    da, db = rng.randint(*digits), rng.randint(*digits)
    a, b = _number(rng, da), _number(rng, db)
    if rng.random() < word_share:
        template, expression = WORD_PROBLEMS[rng.randrange(len(WORD_PROBLEMS))]
        c = rng.randint(1, min(a, b))
        question = template.format(a=a, b=b, c=c)
        expression = expression.format(a=a, b=b, c=c)
        kind = "word"
    else:
        expression = f"{a} * {b}"
        question, kind = f"What is {expression}?", "multiply"
    answer = str(eval(expression, {"__builtins__": {}}))  # our own template: digits and + - * only
    return question, answer, {"kind": kind, "expression": expression, "digits": [da, db]}


def result_text(result: Any, timeout_s: float) -> str:
    """What the model sees for one run (``CodeResult``); raises ToolError when the run failed."""
    kind = result.kind
    if kind == "passed":
        return result.output if result.output.strip() else "(no output: print() what you want to see)"
    if kind == "runtime_error":
        raise ToolError(result.output.strip() or f"the program failed: {result.detail}")
    reasons = {"timeout": "timed out after {t:g}s", "memory": "out of memory",
               "output_limit": "printed more output than the limit", "syntax_error": "syntax error: {d}",
               "crash": "the program crashed: {d}", "infra": "the sandbox could not run the code: {d}"}
    reason = reasons.get(kind, kind + ": {d}").format(t=timeout_s, d=result.detail[:200])
    partial = f"\n{result.output}" if result.output.strip() else ""
    raise ToolError(reason + partial)


class PythonToolEnv(DefaultHooks):
    """Multi-turn: arithmetic too long to do in one's head, with a sandboxed Python tool.

    Options:
        digits: lowest and highest factor length, [low, high]
        word_problems: share of problems worded as a story, in [0, 1]
        size: train problems
        test_size: held-out problems
        max_turns: assistant turns per episode
        tool_timeout_s: wall limit of one tool call
        max_output_chars: a tool answer is cut to this length
        system: replaces the built-in system prompt
        workers: math-verify processes checking final answers
    """

    name = "python_tool"
    sandboxed = True  # the stage starts sandbox-N actors and hands them over in start()
    eval_metrics = ("tool_calls", "tool_errors")

    def __init__(self, digits: tuple[int, int] | list[int] = (4, 6), word_problems: float = 0.3, size: int = 500,
                 test_size: int = 100, max_turns: int = 4, tool_timeout_s: float = 5.0, max_output_chars: int = 2000,
                 system: str | None = None, workers: int = 2) -> None:
        lo, hi = _digit_range(digits)
        if not 0.0 <= word_problems <= 1.0:
            raise ValueError(f"word_problems is a share in [0, 1] (got {word_problems})")
        if size < 1 or test_size < 0 or max_turns < 1 or tool_timeout_s <= 0:
            raise ValueError(f"size and max_turns must be >= 1, test_size >= 0, tool_timeout_s > 0 "
                             f"(got {size}, {max_turns}, {test_size}, {tool_timeout_s})")
        self.digits, self.word_share, self.size, self.test_size = (lo, hi), word_problems, size, test_size
        self.max_turns, self.tool_timeout_s, self.max_output_chars = max_turns, tool_timeout_s, max_output_chars
        self.system = SYSTEM_PROMPT if system is None else system
        python = Tool("python", PYTHON_DESCRIPTION, PYTHON_PARAMETERS, self._run_python)
        # the ToolBox deadline only catches a stuck runner: the sandbox ends the program at tool_timeout_s
        self.toolbox = ToolBox([python], timeout_s=tool_timeout_s + 60.0, max_output_chars=max_output_chars + 200,
                               max_calls=4)
        self.tools = self.toolbox.schemas()
        self._runner: Any = None
        from posttrain.verifiers.math import MathCheckerPool, MathConfig

        self._checkers = MathCheckerPool(size=workers, config=MathConfig(extract=("boxed",)))

    def start(self, resources: StageResources) -> None:
        self._runner = resources.code_runner

    def close(self) -> None:
        self._runner = None  # the runner is the stage's: it shuts it down
        self._checkers.close()

    def samples(self, split: str, seed: int) -> list[Sample]:
        if split not in ("train", "test"):
            raise ValueError(f"split must be 'train' or 'test' (got {split!r})")
        rng = random.Random(f"python_tool/{split}/{seed}")  # train and test draw from different streams
        out = []
        for i in range(self.size if split == "train" else self.test_size):
            question, answer, info = generate_problem(rng, self.digits, self.word_share)
            out.append(Sample(id=f"python_tool/{split}/{seed}/{i}", messages=user_prompt(question, self.system),
                              answer=answer, info=info))
        return out

    async def reset(self, sample: Sample) -> Episode:
        return Episode(sample=sample, messages=[dict(m) for m in sample.messages])

    async def step(self, episode: Episode, turn: AssistantTurn) -> Observation:
        if turn.tool_calls or turn.tool_call_errors:
            results = await self.toolbox.run(turn)
            metrics = {"tool_calls": float(results.calls), "tool_errors": float(len(results.errors))}
            return Observation(results.messages, metrics=metrics, errors=tuple(results.errors))
        result = await self._checkers.acheck(turn.content, str(episode.sample.answer))
        none = {"tool_calls": 0.0, "tool_errors": 0.0}  # every episode reports both (means over all episodes)
        if result.reward is None:  # the checker could not judge (worker failed)
            return Observation(done=True, score=Score.failed(ScoreKind.INFRA, result.detail), metrics=none)
        if result.kind in ("correct", "wrong_answer"):
            return Observation(done=True, score=Score(result.reward), metrics=none)
        return Observation(done=True, score=Score(0.0, error=result.kind, kind=ScoreKind.INVALID), metrics=none)

    async def _run_python(self, arguments: dict[str, Any]) -> str:
        from posttrain.verifiers.pool import CodeJob
        from posttrain.verifiers.service import LocalRunner

        if self._runner is None:
            self._runner = LocalRunner()
        job = CodeJob(arguments["code"], execute=True, timeout_s=self.tool_timeout_s,
                      max_output_chars=self.max_output_chars)
        return result_text(await self._runner.arun(job), self.tool_timeout_s)

    def gold_episode(self, sample: Sample) -> list[str]:
        """Call python to print the value, then answer it boxed."""
        code = f"print({sample.info['expression']})"
        return [format_call(ToolCall("python", {"code": code})), f"The answer is \\boxed{{{sample.answer}}}."]


def _digit_range(digits: Any) -> tuple[int, int]:
    try:
        lo, hi = (int(d) for d in digits)
    except (TypeError, ValueError):
        raise ValueError(f"digits must be [lowest, highest] factor lengths, e.g. [4, 6] (got {digits!r})") from None
    if not 1 <= lo <= hi <= 18:
        raise ValueError(f"digits must satisfy 1 <= lowest <= highest <= 18 (got {digits!r})")
    return lo, hi
