"""Where environments run untrusted programs: a :class:`CodeRunner`, handed to them by the stage.

An RL stage starts its ``sandbox-N`` actors (:class:`~posttrain.verifiers.pool.VerifierPool`,
built with the stage's ``sandbox`` limits) and passes that pool to every environment it starts
(``Environment.start(StageResources(code_runner=...))``), so training and held-out evaluation
score programs on the same actors, under the same limits. Nothing that scores without a stage
(``posttrain env check``, unit tests) has actors: it gets a :class:`LocalRunner`, which runs the
program from this process (the sandbox isolates it either way). No module state decides where
code runs: whoever holds the runner passes it.
"""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING, Protocol

from posttrain.verifiers.sandbox import Limits

if TYPE_CHECKING:
    from posttrain.verifiers.code import CodeResult
    from posttrain.verifiers.pool import CodeJob


class CodeRunner(Protocol):
    """Runs one program job and returns its verdict (``kind == "infra"`` when it could not)."""

    async def arun(self, job: CodeJob) -> CodeResult: ...


class LocalRunner:
    """Programs run from this process, in a thread, under ``limits`` (default: ``Limits()``)."""

    def __init__(self, limits: Limits | None = None) -> None:
        self.limits = limits or Limits()

    async def arun(self, job: CodeJob) -> CodeResult:
        from posttrain.verifiers.pool import run_job

        return await asyncio.to_thread(run_job, job, self.limits)
