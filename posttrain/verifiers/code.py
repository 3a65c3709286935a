"""Score a candidate program against unit tests without trusting anything it says.

Only test *inputs* enter the sandbox; the candidate's return values come back as tagged JSON,
are rebuilt here as values of standard types only, with bounded work whatever the reply holds
(:mod:`posttrain.verifiers.values`: a subclass arrives as its base's value, so no ``__eq__`` of
the candidate's ever runs), and are compared with the expected values on the trusted side by
Python's ``==``, as in the reference harness. HumanEval-style ``check(candidate)`` code runs
here too, with ``candidate`` a proxy whose every call is a round trip into the sandbox. So
``os._exit(0)``, ``atexit``, ``sys.excepthook``, patched ``unittest``/``assert``, fake success
markers or an always-true ``__eq__`` cannot turn a wrong program into a pass.
"""

from __future__ import annotations

import builtins
import dataclasses
import json
import re
import time
from collections.abc import Sequence
from typing import Any

from posttrain.verifiers import _runner, values
from posttrain.verifiers.sandbox import Isolation, Limits, Sandbox, SandboxError

# Error kinds carried by results (for metrics): why a sample failed, or "passed".
PASSED, WRONG, TIMEOUT, MEMORY, CRASH = "passed", "wrong_answer", "timeout", "memory", "crash"
SYNTAX, RUNTIME, OUTPUT_LIMIT, INFRA = "syntax_error", "runtime_error", "output_limit", "infra"


@dataclasses.dataclass
class CodeResult:
    """Verdict for one program. ``kind == "infra"`` means *not scored*: never count it as 0."""

    passed: bool
    kind: str
    seconds: float
    detail: str = ""
    log: str = ""  # first bytes of the program's stdout/stderr
    output: str = ""  # run_program only: what the program printed (stdout and stderr, a traceback), bounded

    @property
    def reward(self) -> float | None:
        return None if self.kind == INFRA else float(self.passed)


class SandboxAbort(BaseException):
    """Raised through the trusted test code when the sandbox run is over (timeout, crash...).

    A BaseException so that a test's ``except Exception`` cannot swallow it.
    """

    def __init__(self, kind: str, detail: str) -> None:
        super().__init__(f"{kind}: {detail}")
        self.kind, self.detail = kind, detail


class CandidateRaised(Exception):
    """The candidate raised inside the sandbox (tests may expect this, so it is an Exception)."""


_FAILURE_KINDS = {"timeout": TIMEOUT, "memory": MEMORY, "crash": CRASH, "output_limit": OUTPUT_LIMIT,
                  "malformed": WRONG, "syntax_error": SYNTAX, "recursion": RUNTIME}


def decode_value(obj: Any) -> Any:
    """Tagged JSON from the sandbox to fresh values of standard types; anything odd is ValueError."""
    return values.decode(obj)


def candidate_raised(reply: dict[str, Any]) -> CandidateRaised:
    """The candidate's exception as the trusted side raises it: a CandidateRaised that is also
    the nearest built-in exception class, so a test's ``except ValueError:`` behaves as in the
    reference harness. Only built-in classes: nothing the candidate defined is ever raised here."""
    message = f"{reply.get('type')}: {reply.get('message')}"
    base = getattr(builtins, str(reply.get("builtin")), None)
    if not (isinstance(base, type) and issubclass(base, Exception)) or issubclass(base, CandidateRaised):
        return CandidateRaised(message)
    try:
        if base not in _RAISED_AS:
            _RAISED_AS[base] = type(f"CandidateRaised{base.__name__}", (CandidateRaised, base), {})
        return _RAISED_AS[base](message)
    except TypeError:  # a built-in whose constructor wants more arguments (UnicodeDecodeError...)
        return CandidateRaised(message)


_RAISED_AS: dict[type, type[CandidateRaised]] = {}


class CandidateProxy:
    """Stands in for the candidate function on the trusted side: each call runs in the sandbox."""

    def __init__(self, sandbox: Sandbox) -> None:
        self._sandbox = sandbox
        self.calls = 0

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        try:
            request = {"args": _runner.encode(list(args)), "kwargs": {k: _runner.encode(v) for k, v in kwargs.items()}}
        except (TypeError, ValueError) as exc:
            raise SandboxAbort(INFRA, f"test passes an argument the sandbox cannot carry: {exc}") from None
        self.calls += 1
        reply = self._sandbox.request(request)
        status = reply.get("status")
        if status == "ok":
            try:
                return decode_value(reply.get("value"))
            except ValueError as exc:
                raise SandboxAbort(WRONG, str(exc)) from None
        if status == "raised":
            raise candidate_raised(reply)
        if status == "unserializable":
            raise SandboxAbort(WRONG, f"candidate returned a non-plain value ({reply.get('message')})")
        raise SandboxAbort(_FAILURE_KINDS.get(str(status), CRASH), str(reply.get("message", status)))


def _setup_failure(reply: dict[str, Any]) -> tuple[str, str]:
    status = reply.get("status")
    detail = f"{reply.get('type', '')}: {reply.get('message', '')}".strip(": ")
    if status == "syntax_error":
        return SYNTAX, detail
    if status in ("raised", "recursion", "memory"):
        return (MEMORY if status == "memory" else RUNTIME), f"while loading: {detail}"
    if status == "missing_entry_point":
        return WRONG, detail
    return _FAILURE_KINDS.get(str(status), CRASH), detail


def check_function(program: str, entry_point: str, test: str, *, helpers: str = "",
                   limits: Limits | None = None, isolation: Isolation | None = None) -> CodeResult:
    """Run ``test`` (asserts, or a ``check(candidate)`` function) against ``entry_point`` of ``program``.

    ``helpers`` is trusted code (e.g. a HumanEval prompt that defines helper functions the test
    uses) executed on the trusted side before ``test``. The program itself only runs sandboxed.
    """
    start = time.monotonic()
    try:
        with Sandbox(limits, isolation) as sandbox:
            kind, detail = _run_function_tests(sandbox, program, entry_point, test, helpers)
            log_text = sandbox.log_text()
    except SandboxError as exc:
        kind, detail, log_text = INFRA, str(exc), ""
    return CodeResult(kind == PASSED, kind, time.monotonic() - start, detail, log_text)


def _run_function_tests(sandbox: Sandbox, program: str, entry_point: str, test: str,
                        helpers: str) -> tuple[str, str]:
    """The verdict of ``test`` on the candidate. A broken test is INFRA (not scored), never a 0:
    one that does not compile, raises before it calls the candidate, or names something undefined
    or unimportable (NameError/ImportError: no value the candidate returns can cause those)."""
    try:
        code = compile(test, "<test>", "exec")  # trusted dataset code
    except (SyntaxError, ValueError, TypeError) as exc:
        return INFRA, f"the test does not compile ({type(exc).__name__}: {exc}): fix the problem's test"[:500]
    reply = sandbox.start(program, entry_point)
    if reply.get("status") != "ready":
        return _setup_failure(reply)
    proxy = CandidateProxy(sandbox)
    namespace: dict[str, Any] = {"__name__": "__verifier__"}
    if helpers:
        try:  # trusted dataset code; a prompt that is only a signature does not compile, and is not needed
            exec(compile(helpers, "<helpers>", "exec"), namespace)
        except Exception:  # noqa: BLE001
            namespace = {"__name__": "__verifier__"}
    try:
        namespace.update({entry_point: proxy, "candidate": proxy})
        exec(code, namespace)
        if callable(namespace.get("check")):
            namespace["check"](proxy)
    except SandboxAbort as exc:
        return exc.kind, exc.detail
    except CandidateRaised as exc:
        return RUNTIME, str(exc)[:500]
    except Exception as exc:  # noqa: BLE001 - the test's own error on a bad value means: wrong
        if proxy.calls == 0 or isinstance(exc, (NameError, ImportError)):
            when = "before calling the candidate" if proxy.calls == 0 else f"after {proxy.calls} calls"
            return INFRA, f"the test itself failed {when} ({type(exc).__name__}: {exc}): fix the problem's test"[:500]
        if isinstance(exc, AssertionError):
            return WRONG, f"assertion failed {exc}"[:500]
        return WRONG, f"{type(exc).__name__}: {exc}"[:500]
    if proxy.calls == 0:
        return INFRA, "the test never called the candidate: check the test code"
    return PASSED, f"{proxy.calls} calls"


def outputs_match(got: str, expected: str) -> bool:
    """Competitive-programming comparison: same whitespace-separated tokens."""
    return got.split() == expected.split()


def check_io(program: str, cases: Sequence[tuple[str, str]], *, limits: Limits | None = None,
             isolation: Isolation | None = None) -> CodeResult:
    """Run ``program`` as a script on each ``(stdin, expected_stdout)`` case; all must match."""
    start = time.monotonic()
    kind, detail, log_text = PASSED, f"{len(cases)} cases", ""
    try:
        with Sandbox(limits, isolation) as sandbox:
            reply = sandbox.start(program, None)
            if reply.get("status") != "ready":
                kind, detail = _setup_failure(reply)
            for i, (stdin, expected) in enumerate(cases if kind == PASSED else ()):
                reply = sandbox.request({"stdin": stdin})
                status, out = reply.get("status"), reply.get("stdout")
                if status != "ok" or not isinstance(out, str):
                    kind = RUNTIME if status == "raised" else _FAILURE_KINDS.get(str(status), CRASH)
                    detail = f"case {i}: {reply.get('type', '')} {reply.get('message', status)}"[:500]
                    break
                if not outputs_match(out, expected):
                    kind, detail = WRONG, f"case {i}: output differs"
                    break
            log_text = sandbox.log_text()
    except SandboxError as exc:
        kind, detail = INFRA, str(exc)
    return CodeResult(kind == PASSED, kind, time.monotonic() - start, detail, log_text)


# Runs the tool's code as __main__ with stderr on stdout, a traceback printed there (this wrapper's own
# frame left out) and, like a notebook, the value of a last bare expression shown. Trusted text: the
# candidate is only ever a string literal in it.
_EXECUTE = """import ast as _a, sys as _s, traceback as _t
_s.stderr = _s.stdout
_g = {{"__name__": "__main__", "__builtins__": __builtins__}}
try:
    _m = _a.parse({source!r}, "<code>")
    _e = _m.body.pop() if _m.body and isinstance(_m.body[-1], _a.Expr) else None
    exec(compile(_m, "<code>", "exec"), _g)
    if _e is not None:
        _v = eval(compile(_a.Expression(_e.value), "<code>", "eval"), _g)
        if _v is not None:
            print(repr(_v))
except SystemExit:
    raise
except BaseException as _x:
    _b = None if isinstance(_x, SyntaxError) or _x.__traceback__ is None else _x.__traceback__.tb_next
    _t.print_exception(type(_x), _x, _b, file=_s.stdout)
    raise SystemExit(1)
"""


def run_program(program: str, *, stdin: str = "", max_output_chars: int = 4000, limits: Limits | None = None,
                isolation: Isolation | None = None) -> CodeResult:
    """Run ``program`` as a script (a tool call's code) and return what it printed in ``output``.

    ``kind`` says how it ended: passed (ran to the end), runtime_error (raised, traceback in the
    output), timeout, memory, output_limit, crash, or infra (the sandbox failed: not the program's
    doing). The output is cut to ``max_output_chars`` with a marker: a flood costs only that call.
    """
    start = time.monotonic()
    stdout, log_text = "", ""
    try:
        with Sandbox(limits, isolation) as sandbox:
            reply = sandbox.start(_EXECUTE.format(source=program), None)
            if reply.get("status") != "ready":
                kind, detail = _setup_failure(reply)
            else:
                reply = sandbox.request({"stdin": stdin})
                status, out = reply.get("status"), reply.get("stdout")
                stdout = out if isinstance(out, str) else ""
                if status == "ok":
                    kind, detail = PASSED, ""
                else:
                    kind = RUNTIME if status == "raised" else _FAILURE_KINDS.get(str(status), CRASH)
                    detail = f"{reply.get('type', '')} {reply.get('message', status)}".strip()[:500]
            log_text = sandbox.log_text()
    except SandboxError as exc:
        kind, detail = INFRA, str(exc)[:500]
    return CodeResult(kind == PASSED, kind, time.monotonic() - start, detail, log_text,
                      truncated(stdout, max_output_chars))


def truncated(text: str, limit: int) -> str:
    """``text`` cut to ``limit`` characters, with a marker that says how much was left out."""
    if len(text) <= limit:
        return text
    return text[:limit] + f"\n... [output truncated: {len(text) - limit} more characters]"


def humaneval_program(problem: dict[str, Any], completion: str) -> str:
    """HumanEval convention: the program is the prompt followed by the completion."""
    return problem["prompt"] + completion


def check_humaneval(problem: dict[str, Any], completion: str, *, limits: Limits | None = None,
                    isolation: Isolation | None = None) -> CodeResult:
    """One HumanEval-shaped record (``prompt``, ``test``, ``entry_point``) and a completion.

    A broken problem (``humaneval_defect``, or a test that fails on its own) gives kind INFRA
    with a detail naming the problem: not scored, never a 0 for the model.
    """
    for key in ("prompt", "test", "entry_point"):
        if key not in problem:
            raise ValueError(f"problem {problem.get('task_id', '?')!r} lacks {key!r}: HumanEval records need "
                             "task_id, prompt, test, entry_point")
    if not isinstance(completion, str):
        raise ValueError(f"completion for problem {problem.get('task_id', '?')!r} must be a string "
                         f"(got {type(completion).__name__})")
    name = f"problem {problem.get('task_id', '?')!r}"
    defect = humaneval_defect(problem)
    if defect is not None:
        return CodeResult(False, INFRA, 0.0, f"{name}: {defect}")
    result = check_function(humaneval_program(problem, completion), problem["entry_point"], problem["test"],
                            helpers=problem["prompt"], limits=limits, isolation=isolation)
    if result.kind == INFRA:
        result.detail = f"{name}: {result.detail}"
    return result


_DEFINES = re.compile(r"^[ \t]*(?:async[ \t]+)?(?:def|class)[ \t]+([A-Za-z_]\w*)", re.MULTILINE)


def humaneval_defect(problem: dict[str, Any]) -> str | None:
    """Why a HumanEval-shaped problem cannot score any completion, found without running it; else None.

    ``prompt`` and ``entry_point`` must be strings, ``test`` Python that compiles, and when the
    prompt defines functions (HumanEval's signature and docstring) the entry point is one of them.
    """
    for key in ("prompt", "test", "entry_point"):
        value = problem.get(key)
        if not isinstance(value, str):
            got = "null" if value is None else f"{type(value).__name__} {repr(value)[:40]}"
            return f"its {key!r} must be a string (got {got}): fix the problem"
    if not problem["entry_point"].isidentifier():
        return f"its entry_point {problem['entry_point']!r} is not a Python name: fix the problem"
    try:
        compile(problem["test"], "<test>", "exec")
    except (SyntaxError, ValueError) as exc:
        return f"its test does not compile ({type(exc).__name__}: {exc}): fix the problem's test"
    defined = _DEFINES.findall(problem["prompt"])
    if defined and problem["entry_point"] not in defined:
        return (f"its entry_point {problem['entry_point']!r} is not defined by its prompt (which defines "
                f"{', '.join(defined)}): fix entry_point")
    return None


def to_json(result: CodeResult) -> str:
    return json.dumps(dataclasses.asdict(result))
