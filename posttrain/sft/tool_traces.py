"""Generated tool-use SFT traces in the ``python_tool`` environment's format (``posttrain:tool_traces``).

A warm start for RL on ``python_tool``: a small model has never seen ``<tool_call>`` blocks, so
RL from scratch would rarely get a reward. Each trace is one solved episode exactly as the
environment plays it -- its system prompt and tool schema, its problem, an assistant turn that
calls ``python`` with code printing the result, the tool's output, and a final ``\\boxed{N}``::

    system (the env's)  ·  user problem  ·  assistant: <tool_call>{"name": "python", ...}</tool_call>
    tool: 35719638      ·  assistant: The answer is \\boxed{35719638}.

A share of traces think first (``reasoning_content`` on both assistant turns; rendered as
``<think>...</think>``), the rest answer with thinking off, so both generation prompts are
covered. The mix is made here, per trace, because ``posttrain.sft.data``'s reasoning transforms
only see the last assistant turn: train these rows with ``data.reasoning_off_share=0`` and
``data.budget_cut_share=0`` (``configs/sft/smollm2_tool_traces.yaml``).

The tool's output is computed here in Python (the code only multiplies and prints integers),
never run in a sandbox. Problems come from the environment's own generator on a seed stream of
this module, and any problem of the environment's test split is left out, so a model trained on
these traces is evaluated on problems it has not seen. Regenerate with
``python -m posttrain.sft.tool_traces [DIR]``.

Rows: ``{"messages": [...], "tools": [...], "answer": "N", "expression": "a * b", "thinking": bool}``; ``tools`` is the
environment's OpenAI-style schema list, passed to the chat template as ``tools``.
"""

from __future__ import annotations

import json
import random
import sys
from pathlib import Path
from typing import Any

from posttrain.environments.base import Sample, user_prompt
from posttrain.environments.python_tool_env import PythonToolEnv, generate_problem

TRAIN_SIZE, TEST_SIZE = 600, 100
THINKING_SHARE = 0.25  # traces that reason in <think> before the call (the bench runs RL with thinking off)

# Code the assistant writes: a few equivalent spellings, so the model learns "code that prints", not one string.
CODE_STYLES = (
    "print({a} * {b})",
    "print({a}*{b})",
    "a = {a}\nb = {b}\nprint(a * b)",
    "result = {a} * {b}\nprint(result)",
    "x, y = {a}, {b}\nprint(x * y)",
)
LEADS = ("", "", "I'll compute this with Python.", "Let me use the python tool.")
FINALS = ("The answer is \\boxed{{{n}}}.", "\\boxed{{{n}}}", "{a} x {b} = \\boxed{{{n}}}.")
FIRST_THOUGHTS = (
    "I need {a} x {b}. Multiplying numbers this large in my head is error-prone, so I'll run it in Python.",
    "The product of {a} and {b} has many digits; the python tool computes it exactly.",
    "This is {a} times {b}. I should not guess the digits: let me call the python tool.",
)
FINAL_THOUGHTS = (
    "The tool printed {n}, so {a} x {b} = {n}.",
    "Python says {n}. That is the product.",
)


def expression_value(expression: str) -> int:
    """The value of an environment expression (integers joined by ``+``, ``-``, ``*``), computed
    from its syntax tree: the traces' tool output, never from running the code."""
    import ast
    import operator

    ops = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul}

    def value(node: ast.AST) -> int:
        if isinstance(node, ast.Constant) and type(node.value) is int:
            return node.value
        if isinstance(node, ast.BinOp) and type(node.op) in ops:
            return ops[type(node.op)](value(node.left), value(node.right))
        raise ValueError(f"expression {expression!r}: only integers with + - * are expected")

    return value(ast.parse(expression, mode="eval").body)


def write_code(expression: str, rng: random.Random) -> str:
    """Python that prints the value of ``expression``, in one of a few equivalent spellings."""
    parts = expression.split()
    if len(parts) == 3 and parts[1] == "*" and rng.random() < 0.6:  # a plain product: any style
        a, b = parts[0], parts[2]
        return rng.choice(CODE_STYLES).format(a=a, b=b)
    return rng.choice(("print({e})", "result = {e}\nprint(result)", "print({c})")).format(
        e=expression, c=expression.replace(" ", ""))


def make_trace(sample: Any, tools: list[dict[str, Any]], rng: random.Random, thinking: bool) -> dict[str, Any]:
    """One solved episode of ``sample`` (a python_tool Sample) as an SFT row."""
    expression = sample.info["expression"]
    value = expression_value(expression)
    if str(value) != str(sample.answer):
        raise ValueError(f"sample {sample.id}: {expression} = {value}, but its answer is {sample.answer!r}")
    factors = expression.split()
    a, b = factors[0], factors[2]
    call: dict[str, Any] = {"role": "assistant", "content": "" if thinking else rng.choice(LEADS),
                            "tool_calls": [{"name": "python", "arguments": {"code": write_code(expression, rng)}}]}
    final: dict[str, Any] = {"role": "assistant", "content": rng.choice(FINALS).format(a=a, b=b, n=value)}
    if sample.info.get("kind") != "multiply":
        final["content"] = f"The answer is \\boxed{{{value}}}."  # "a x b = N" would be wrong for a word problem
    if thinking:
        call["reasoning_content"] = rng.choice(FIRST_THOUGHTS).format(a=a, b=b)
        final["reasoning_content"] = rng.choice(FINAL_THOUGHTS).format(a=a, b=b, n=value)
    tool = {"role": "tool", "name": "python", "content": f"{value}\n"}  # what print() writes, as the env returns it
    return {"messages": [*sample.messages, call, tool, final], "tools": tools, "answer": str(value),
            "expression": expression, "thinking": thinking}


def held_out_expressions(seeds: tuple[int, ...] = (0, 1, 2)) -> set[str]:
    """Expressions of the environment's test splits (default and 4-digit-product options, a few run
    seeds, 1000 problems each): left out of the traces, so evaluation is on unseen problems."""
    out: set[str] = set()
    for options in ({}, {"digits": [4, 4], "word_problems": 0.0}):
        env = PythonToolEnv(test_size=1000, **options)
        try:
            out |= {s.info["expression"] for seed in seeds for s in env.samples("test", seed)}
        finally:
            env.close()
    return out


def generate(n: int, seed: int, exclude: set[str] = frozenset()) -> list[dict[str, Any]]:
    """``n`` traces on problems of the environment's own generator (default options), drawn from this
    module's seed stream; none repeats an expression or uses one of ``exclude``. Deterministic."""
    env = PythonToolEnv(size=1, test_size=0)
    try:
        rng = random.Random(f"tool_traces/{seed}")
        rows: list[dict[str, Any]] = []
        seen = set(exclude)
        while len(rows) < n:
            question, answer, info = generate_problem(rng, env.digits, env.word_share)
            if info["expression"] in seen:
                continue
            seen.add(info["expression"])
            sample = Sample(id=f"tool_traces/{seed}/{len(rows)}", messages=user_prompt(question, env.system),
                            answer=answer, info=info)
            rows.append(make_trace(sample, env.tools, rng, thinking=rng.random() < THINKING_SHARE))
        return rows
    finally:
        env.close()


def main(argv: list[str]) -> int:
    out = Path(argv[0] if argv else "posttrain/data/tool_traces")
    out.mkdir(parents=True, exist_ok=True)
    held_out = held_out_expressions()
    train = generate(TRAIN_SIZE, seed=0, exclude=held_out)
    test = generate(TEST_SIZE, seed=1, exclude=held_out | {r["expression"] for r in train})
    for split, rows in (("train", train), ("test", test)):
        (out / f"{split}.jsonl").write_text("".join(json.dumps(r, separators=(",", ":")) + "\n" for r in rows))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
