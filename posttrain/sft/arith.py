"""A generated arithmetic reasoning dataset with ``<think>`` traces, and a format checker.

Small enough to ship (``posttrain:arith_reasoning``) and to train SmolLM2-135M on a CPU in a few
minutes; the point is the *format* (reason in ``<think>``, then answer; or answer directly when
thinking is off), not arithmetic skill. Regenerate with ``python -m posttrain.sft.arith DIR``.
"""

from __future__ import annotations

import json
import random
import sys
from pathlib import Path
from typing import Any

from posttrain.chat_template import THINK_CLOSE, THINK_OPEN

TEMPLATES = ("What is {a} {op} {b}?", "Compute {a} {op} {b}.", "Calculate {a} {op} {b}, please.",
             "How much is {a} {op} {b}?")


def _steps(a: int, op: str, b: int) -> tuple[str, int]:
    if op == "+":
        tens, ones = b // 10 * 10, b % 10
        mid = a + tens
        return (f"I need to add {a} and {b}. First add the tens: {a} + {tens} = {mid}. "
                f"Then the ones: {mid} + {ones} = {mid + ones}. So the sum is {a + b}."), a + b
    if op == "-":
        tens, ones = b // 10 * 10, b % 10
        mid = a - tens
        return (f"I need to subtract {b} from {a}. First the tens: {a} - {tens} = {mid}. "
                f"Then the ones: {mid} - {ones} = {mid - ones}. So the difference is {a - b}."), a - b
    tens, ones = a // 10 * 10, a % 10
    return (f"I need to multiply {a} by {b}. Split {a} into {tens} + {ones}. {tens} x {b} = {tens * b}, "
            f"{ones} x {b} = {ones * b}. Adding: {tens * b} + {ones * b} = {a * b}."), a * b


def make_row(rng: random.Random) -> dict[str, Any]:
    op = rng.choice("+-*")
    a, b = (rng.randint(10, 99), rng.randint(2, 9)) if op == "*" else (rng.randint(20, 999), rng.randint(11, 99))
    reasoning, answer = _steps(a, op, b)
    question = rng.choice(TEMPLATES).format(a=a, op="x" if op == "*" else op, b=b)
    return {"messages": [{"role": "user", "content": question},
                         {"role": "assistant", "reasoning_content": reasoning, "content": f"The answer is {answer}."}],
            "answer": answer}


def generate(n: int, seed: int) -> list[dict[str, Any]]:
    rng = random.Random(seed)
    return [make_row(rng) for _ in range(n)]


def well_formed(completion: str, thinking: bool) -> bool:
    """Thinking on (prompt ends ``<think>\\n``): reasoning, one ``</think>``, a non-empty answer.
    Thinking off (prompt ends ``<think></think>``): a non-empty answer with no think tags."""
    text = completion.strip()
    if thinking:
        reasoning, sep, answer = text.partition(THINK_CLOSE)
        return (bool(sep) and bool(reasoning.strip()) and bool(answer.strip())
                and THINK_OPEN not in answer and THINK_CLOSE not in answer)
    return bool(text) and THINK_OPEN not in text and THINK_CLOSE not in text


def main(argv: list[str]) -> int:
    out = Path(argv[0] if argv else "posttrain/data/arith_reasoning")
    out.mkdir(parents=True, exist_ok=True)
    for split, n, seed in (("train", 1000, 0), ("test", 50, 1)):
        rows = generate(n, seed)
        (out / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
