"""Where environments run untrusted programs: the stage's ``sandbox-N`` actors when a pool is
bound, else this process (the sandbox isolates the program either way).

The RLVR loop binds its :class:`~posttrain.verifiers.pool.VerifierPool` with :func:`using`
for the length of a run, so scoring shows up on the dashboard as the ``sandbox-N`` actors'
work and a crashed worker is restarted by Ray; ``posttrain env check`` and unit tests score
locally with no Ray at all. Environments declare ``sandboxed = True`` to ask for a pool.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from posttrain.verifiers.code import CodeResult
from posttrain.verifiers.pool import CodeJob, run_job

_pool: Any = None


@contextmanager
def using(pool: Any) -> Iterator[None]:
    """Route :func:`run_code` through ``pool`` (a VerifierPool, or None = locally) inside the block."""
    global _pool
    previous, _pool = _pool, pool
    try:
        yield
    finally:
        _pool = previous


async def run_code(job: CodeJob) -> CodeResult:
    """Score ``job``: on an idle ``sandbox-N`` actor of the bound pool, else in a local thread."""
    pool = _pool
    if pool is None:
        return await asyncio.to_thread(run_job, job)
    return await pool.arun(job)


def needs_sandbox(envs: Any) -> bool:
    """True when any environment runs programs (declares ``sandboxed = True``)."""
    return any(getattr(env, "sandboxed", False) for env in envs)
