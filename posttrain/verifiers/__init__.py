"""Verifiers: sandboxed code execution, math and instruction checkers (issue: Verifiers).

Environments call these plain functions; every result says *why* (an error kind) and marks
infrastructure failures (``kind == "infra"``, ``reward is None``) so they are never scored 0.

- :func:`check_humaneval`, :func:`check_function`, :func:`check_io` — code, run in
  :class:`Sandbox` (bubblewrap as an unprivileged uid with a seccomp filter, sized tmpfs and
  per-run memory/process/CPU cgroup caps, or a loudly-warned rlimits fallback);
- :class:`MathChecker` — math-verify in a killable worker process; :class:`MathCheckerPool` — a
  few of them, checked from any thread or event loop until ``close()``;
- :func:`check_instructions`, :func:`check_json` — IFEval-style constraints, JSON Schema;
- ``posttrain.verifiers.pool.VerifierPool`` — code jobs on named Ray actors ``sandbox-N`` (imports
  ray); ``posttrain.verifiers.service`` — the ``CodeRunner`` a stage hands its environments.
"""

from posttrain.verifiers.code import CodeResult, check_function, check_humaneval, check_io
from posttrain.verifiers.instructions import check_instructions, check_json
from posttrain.verifiers.math import MathChecker, MathCheckerPool, MathConfig, MathResult, extract_answer
from posttrain.verifiers.sandbox import Isolation, Limits, Sandbox, SandboxError, detect_isolation

__all__ = [
    "CodeResult", "Isolation", "Limits", "MathChecker", "MathCheckerPool", "MathConfig", "MathResult", "Sandbox", "SandboxError",
    "check_function", "check_humaneval", "check_instructions", "check_io", "check_json", "detect_isolation",
    "extract_answer",
]
