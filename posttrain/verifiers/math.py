"""Math answers: extract the final answer, decide equivalence with math-verify, in bounded time.

math-verify's own timeouts use SIGALRM (main thread only: ValueError in a threaded Ray actor)
and some parsed results hang *after* its timeout, so each check runs in a worker process that
is killed and respawned on a hard deadline. Model text is never given to ``sympify`` (it
evaluates code): both sides are parsed with math-verify's LaTeX grammar only, the gold
wrapped in ``$…$`` (189/193 right vs 142/193 raw, measured), and answers are length-capped.
When the gold is a plain number, only a plain number literal can be right (``plain_number``):
``\\frac{40}{2}`` or ``\\sqrt{400}`` for 20 is arithmetic handed to the verifier, kind "unsimplified".
A verdict is always a bool or an error kind — never an exception turned silently into 0.
:class:`MathCheckerPool` runs checks on a few such workers, each owned by one of the pool's
threads (a worker dies with the thread that started it), until ``close()`` kills them all.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import os
import re
import select
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from math import gcd
from typing import Any

EXTRACTORS = ("boxed", "answer_is", "last_number")
_NUMBER = re.compile(r"-?\d{1,3}(?:,\d{3})+(?:\.\d+)?(?:/\d+)?%?|-?\d+(?:\.\d+)?(?:/\d+)?%?|-?\.\d+%?")
_ANSWER_IS = re.compile(r"answer is[:\s]*", re.IGNORECASE)


@dataclasses.dataclass(frozen=True)
class MathConfig:
    """How predictions are read and how long a check may take."""

    extract: tuple[str, ...] = EXTRACTORS  # tried in order: "boxed", "answer_is", "last_number"
    max_answer_chars: int = 256  # longer extracted answers score 0 (kind "answer_too_long")
    max_text_chars: int = 200_000  # only the tail of longer completions is searched
    timeout_s: float = 6.0  # hard deadline per check (the worker is killed and respawned)
    parse_timeout_s: int = 2  # math-verify's own (SIGALRM) timeouts inside the worker
    # A plain-number gold needs a plain-number answer: math-verify evaluates "13 + 7", \frac{40}{2},
    # \sqrt{400}, \binom{6}{3} to 20, and an RL policy learns to restate the question's arithmetic
    # (measured: greedy accuracy 0.13 -> "1.00" in 21 steps of bench/rlvr_learning.py before this
    # check). Any answer that is not a number literal (see plain_number) scores 0 without being
    # evaluated: kind "unsimplified" (written with digits, operators or commands), else wrong_answer.
    require_simplified: bool = True

    def __post_init__(self) -> None:
        unknown = [e for e in self.extract if e not in EXTRACTORS]
        if unknown or not self.extract:
            raise ValueError(f"math extract must be a non-empty subset of {EXTRACTORS} (got {self.extract!r})")
        if not (isinstance(self.timeout_s, (int, float)) and 0 < self.timeout_s < float("inf")):
            raise ValueError(f"math timeout_s must be a positive number of seconds (got {self.timeout_s!r})")


@dataclasses.dataclass
class MathResult:
    """``kind``: correct, wrong_answer, no_answer, answer_too_long, unsimplified, timeout, or infra (not scored).

    ``unsimplified``: the gold is a plain number and the answer is not a number literal (an
    expression or a command, whatever its value: it is never evaluated).
    """

    correct: bool
    kind: str
    seconds: float
    extracted: str | None = None
    detail: str = ""

    @property
    def reward(self) -> float | None:
        return None if self.kind == "infra" else float(self.correct)


def _boxed(text: str) -> str | None:
    """Content of the last ``\\boxed{…}`` (or ``\\fbox{…}``), braces balanced; linear time."""
    start = max(text.rfind("\\boxed{"), text.rfind("\\fbox{"))
    if start < 0:
        return None
    i = text.index("{", start) + 1
    depth, j = 1, i
    while j < len(text):
        depth += {"{": 1, "}": -1}.get(text[j], 0)
        if depth == 0:
            return text[i:j]
        j += 1
    return None


def _answer_is(text: str) -> str | None:
    matches = list(_ANSWER_IS.finditer(text[-10_000:]))
    if not matches:
        return None
    rest = text[-10_000:][matches[-1].end():].strip()
    line = rest.split("\n", 1)[0].strip().rstrip(".").strip()
    return line.strip("$ ") or None


def _last_number(text: str) -> str | None:
    numbers = _NUMBER.findall(text[-10_000:])
    return numbers[-1].replace(",", "") if numbers else None


# A plain number literal: the only answer form a plain-number gold accepts (see plain_number).
_PLAIN = re.compile(r"""(?P<sign>[-+\u2212]?)\s*
    (?: (?P<whole>\d+)?\s*\\[cdt]?frac\s*(?:\{\s*(?P<n1>\d+)\s*\}\s*\{\s*(?P<d1>\d+)\s*\}|(?P<n2>\d)\s*(?P<d2>\d))
      | (?P<n3>\d+)\s*/\s*(?P<d3>\d+)
      | (?P<dec>\d{1,3}(?:,\d{3})+(?:\.\d*)?|\d+(?:\.\d*)?|\.\d+) )
    \s*(?P<pct>\\?%)? (?P<tail>.*)""", re.X | re.S | re.ASCII)
_DEGREES = re.compile(r"\^\s*\{?\s*\\circ\s*\}?|\\circ|\\degree|\u00b0")
# units after the number are words ("cm", "m/s", "cm^2"); a letter run is matched whole (no backtracking)
_UNITS = re.compile(r"(?:[A-Za-z]+(?![A-Za-z])(?:\s*\^\s*\{?[23]\}?)?|[\s/])*")
_WRAPPER = re.compile(r"\\(?:boxed|fbox|text|textbf|textit|textrm|textnormal|mathrm|mathbf|mathit|mbox)\s*\{([^{}]*)\}")
_THOUSANDS = re.compile(r"(?<=\d)(?:\{,\}|\\,|\\!)(?=\d{3}(?!\d))")  # 1{,}000 and 1\,000
_SPACING = re.compile(r"\\[,;:! ]|\\q?quad\b|\\displaystyle\b|~")
_FINAL_EQUALS = re.compile(r"(?<![<>!=])=(?!=)")
_COMPUTED = re.compile(r"[\d\\+\-*/^!×÷·√\u2212]")  # what arithmetic (rather than a word) is written with


def plain_number(text: str, *, strict: bool = True) -> str | None:
    """``text`` as one plain number literal, canonical (``"-20"``, ``"0.5"``, ``"\\frac{1}{2}"``,
    ``"50\\%"``), or None when it is anything else: an expression, a command, two numbers.

    Allowed around the number: ``$``, ``\\boxed{}``/``\\text{}`` wrappers, a sign, thousands
    separators (``1,000``, ``1{,}000``, ``1\\,000``), a trailing period, a percent sign, and units
    that are words (``20 \\text{ cm}``, ``20 m/s``, ``20^\\circ``); worked answers count by what
    follows the last ``=``. Fractions (``a/b``, ``\\frac{a}{b}``, ``\\dfrac``, ``\\tfrac``,
    ``\\frac12``, a mixed ``2\\frac{1}{2}``) must be in lowest terms with a denominator above 1
    when ``strict`` (answers): ``\\frac{40}{2}`` is arithmetic left to do. Not literals, on
    purpose: ``2e1``/``2.0E1`` (a product in disguise, read inconsistently by math-verify),
    ``(20)``, ``2 \\times 10^1``, ``\\sqrt{400}``, ``4!``.
    """
    text = _FINAL_EQUALS.split(text)[-1]
    text = _THOUSANDS.sub(",", text)
    for _ in range(4):  # nested wrappers: \boxed{\text{20}}
        text = _WRAPPER.sub(r" \1 ", text)
    text = _SPACING.sub(" ", text.replace("\\$", " ").replace("$", " ")).strip().rstrip(".").strip()
    while text.startswith("{") and text.endswith("}") and _closing_brace(text) == len(text) - 1:
        text = text[1:-1].strip()
    match = _PLAIN.fullmatch(text)
    if match is None or not _UNITS.fullmatch(_DEGREES.sub(" ", match["tail"])):
        return None
    g = match.groupdict()
    sign = "-" if g["sign"] in ("-", "\u2212") else ""
    pct = "\\%" if g["pct"] else ""
    if g["dec"] is not None:
        return sign + g["dec"].replace(",", "").rstrip(".") + pct
    i = next(i for i in "123" if g[f"n{i}"] is not None)  # which fraction form matched
    n, d, whole = int(g[f"n{i}"]), int(g[f"d{i}"]), int(g["whole"] or 0)
    if d == 0 or strict and (d < 2 or gcd(n, d) != 1 or (g["whole"] is not None and n >= d)):
        return None
    return f"{sign}\\frac{{{whole * d + n}}}{{{d}}}{pct}"


def _closing_brace(text: str) -> int:
    """Index of the brace that closes ``text[0]``, or -1."""
    depth = 0
    for i, ch in enumerate(text):
        depth += {"{": 1, "}": -1}.get(ch, 0)
        if depth == 0:
            return i
    return -1


def is_unsimplified(answer: str, gold: str) -> bool:
    """True when ``gold`` is a plain number but ``answer`` is written with arithmetic or commands
    instead of as a plain number literal (``\\frac{40}{2}``, ``\\sqrt{400}``, ``13 + 7``...).

    Worked answers count by their result: in "80 * 10 = 800" only "800" is the answer.
    """
    return (plain_number(gold, strict=False) is not None and plain_number(answer) is None
            and bool(_COMPUTED.search(answer)))


def extract_answer(text: str, methods: Sequence[str] = EXTRACTORS, max_text_chars: int = 200_000) -> str | None:
    """The final answer of a completion by the first method that finds one, or None."""
    text = text[-max_text_chars:]
    for method in methods:
        found = {"boxed": _boxed, "answer_is": _answer_is, "last_number": _last_number}[method](text)
        if found is not None and found.strip():
            return found.strip()
    return None


class BadGold(ValueError):
    """The gold answer does not parse: the dataset row is broken, not the model's answer."""


def _verify(gold: str, answer: str, parse_timeout_s: int) -> bool:
    """Inside the worker: parse both with the LaTeX grammar only (no sympify of model text)."""
    from math_verify import LatexExtractionConfig, parse, verify

    config = [LatexExtractionConfig(boxed_match_priority=0)]
    gold_parsed = parse(f"${gold}$", extraction_config=config, parsing_timeout=parse_timeout_s)
    answer_parsed = parse(f"${answer}$", extraction_config=config, parsing_timeout=parse_timeout_s)
    if not gold_parsed:
        raise BadGold(f"gold answer {gold[:80]!r} does not parse as LaTeX: fix the dataset row")
    return bool(answer_parsed) and verify(gold_parsed, answer_parsed, timeout_seconds=parse_timeout_s)


def _die_with_parent() -> None:
    """Linux: SIGKILL us when the process that started us dies (a killed Ray actor, say),
    so a check stuck in sympy cannot outlive its owner."""
    parent = os.getppid()
    try:
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        return
    if os.getppid() != parent:  # the parent died before prctl took effect
        os._exit(1)


def serve() -> None:
    """The checker process: JSON lines ``[gold, answer, timeout]`` in, ``[status, value]`` out.

    ``status``: ``ok`` (value: the verdict), ``bad_gold`` (the gold does not parse) or ``error``
    (checking the answer raised); the caller decides on the status, never on the message.

    Started as ``python -c`` (not multiprocessing: spawn re-imports ``__main__``, which breaks
    under stdin scripts and some launchers; fork is unsafe in threaded Ray actors).
    """
    _die_with_parent()
    out = os.fdopen(os.dup(1), "w")
    sys.stdout = sys.stderr  # nothing the libraries print can corrupt the protocol
    import math_verify  # noqa: F401  (import once, before the first deadline starts)

    out.write('["ready", null]\n')
    out.flush()
    for line in sys.stdin:
        gold, answer, parse_timeout_s = json.loads(line)
        try:
            reply = ["ok", _verify(gold, answer, parse_timeout_s)]
        except BadGold as exc:
            reply = ["bad_gold", str(exc)[:300]]
        except Exception as exc:  # noqa: BLE001 - reported to the caller as an error kind
            reply = ["error", f"{type(exc).__name__}: {exc}"[:300]]
        out.write(json.dumps(reply) + "\n")
        out.flush()


class MathChecker:
    """Checks (prediction, gold) pairs in a killable worker process. Use as a context manager."""

    def __init__(self, config: MathConfig | None = None) -> None:
        self.config = config or MathConfig()
        self._proc: subprocess.Popen[bytes] | None = None
        self.restarts = 0

    def __enter__(self) -> MathChecker:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _ensure_worker(self) -> subprocess.Popen[bytes]:
        if self._proc is None or self._proc.poll() is not None:
            self.close()
            self._proc = subprocess.Popen(
                [sys.executable, "-c", "from posttrain.verifiers.math import serve; serve()"],
                stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, start_new_session=True)
            if self._readline(120.0) != ["ready", None]:
                self.close()
                raise RuntimeError("math-verify worker did not start: pip install 'math-verify[antlr4_13_2]'")
        return self._proc

    def _readline(self, timeout_s: float) -> Any:
        """One reply line, or None at the deadline (never blocks past it)."""
        assert self._proc is not None and self._proc.stdout is not None
        ready, _, _ = select.select([self._proc.stdout], [], [], timeout_s)
        if not ready:
            return None
        line = self._proc.stdout.readline()  # the worker writes whole lines with one flush
        return json.loads(line) if line else None

    def check(self, prediction: str, gold: str) -> MathResult:
        """Is the final answer of ``prediction`` equivalent to ``gold``?"""
        start = time.monotonic()
        answer = extract_answer(prediction, self.config.extract, self.config.max_text_chars)

        def result(correct: bool, kind: str, detail: str = "") -> MathResult:
            return MathResult(correct, kind, time.monotonic() - start, answer, detail)

        if answer is None:
            return result(False, "no_answer")
        if len(answer) > self.config.max_answer_chars:
            return result(False, "answer_too_long", f"{len(answer)} > {self.config.max_answer_chars} chars")
        gold, to_verify = str(gold), answer
        plain_gold = plain_number(gold, strict=False) if self.config.require_simplified else None
        if plain_gold is not None:  # a number is asked for: only a number literal can be right
            literal = plain_number(answer)
            if literal is None:
                kind = "unsimplified" if _COMPUTED.search(answer) else "wrong_answer"
                return result(False, kind, f"{answer[:80]!r} is not a plain number; the gold {gold[:40]!r} is")
            gold, to_verify = plain_gold, literal
        try:
            proc = self._ensure_worker()
            assert proc.stdin is not None
            proc.stdin.write((json.dumps([gold, to_verify, self.config.parse_timeout_s]) + "\n").encode())
            proc.stdin.flush()
            reply = self._readline(self.config.timeout_s)
        except (OSError, ValueError, RuntimeError) as exc:
            self.close()
            return result(False, "infra", f"checker worker failed: {exc}")
        if reply is None:
            self.restarts += 1
            self.close()
            return result(False, "timeout", f"no verdict within {self.config.timeout_s}s; worker restarted")
        status, value = reply
        if status == "bad_gold":
            return result(False, "infra", str(value))
        if status == "error":  # the answer made math-verify raise: not a match
            return result(False, "wrong_answer", str(value))
        return result(bool(value), "correct" if value else "wrong_answer")

    def close(self) -> None:
        """Kill the worker (and anything it started) and reap it."""
        if self._proc is not None:
            try:
                os.killpg(self._proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            self._proc.wait(5)
            for stream in (self._proc.stdin, self._proc.stdout):
                if stream is not None:
                    stream.close()
            self._proc = None


class MathCheckerPool:
    """Checks on up to ``size`` worker processes at once, from any thread or event loop.

    Each worker belongs to one long-lived thread of the pool: ``_die_with_parent`` ties a worker
    to the *thread* that started it, so checks run on borrowed threads (``asyncio.to_thread`` in
    a loop that lives one step) would restart their workers every step. ``close()`` ends the
    threads and kills every worker, busy ones included; a later check starts afresh.
    """

    def __init__(self, size: int = 2, config: MathConfig | None = None) -> None:
        self.size, self.config = max(1, size), config or MathConfig()
        self._lock = threading.Lock()
        self._threads: ThreadPoolExecutor | None = None
        self._checkers: list[MathChecker] = []
        self._mine = threading.local()  # the checker of the pool thread running a check

    def submit(self, prediction: str, gold: str) -> Future[MathResult]:
        with self._lock:
            if self._threads is None:
                self._threads = ThreadPoolExecutor(self.size, thread_name_prefix="math-check")
            return self._threads.submit(self._check, prediction, gold)

    def check(self, prediction: str, gold: str) -> MathResult:
        return self.submit(prediction, gold).result()

    async def acheck(self, prediction: str, gold: str) -> MathResult:
        return await asyncio.wrap_future(self.submit(prediction, gold))

    def _check(self, prediction: str, gold: str) -> MathResult:
        checker: MathChecker | None = getattr(self._mine, "checker", None)
        if checker is None:
            checker = self._mine.checker = MathChecker(self.config)
            with self._lock:
                self._checkers.append(checker)
        return checker.check(prediction, gold)

    def close(self) -> None:
        """Kill every worker and end the pool's threads (running checks end at their deadline)."""
        with self._lock:
            threads, self._threads = self._threads, None
            checkers, self._checkers = self._checkers, []
        for checker in checkers:  # a busy check fails fast ("infra"), so the threads end at once
            checker.close()
        if threads is not None:
            threads.shutdown(wait=True, cancel_futures=True)
        for checker in checkers:  # reap any worker a check restarted meanwhile
            checker.close()


def check_pairs(pairs: Sequence[tuple[str, str]], config: MathConfig | None = None) -> list[MathResult]:
    """Check many (prediction, gold) pairs with one worker process."""
    with MathChecker(config) as checker:
        return [checker.check(pred, gold) for pred, gold in pairs]
