"""Run one bench measurement in its own process and read back its ``RESULT {json}`` line.

A fresh process per measurement keeps peak RSS honest (nothing left from the previous one); a
timeout or a crash becomes a row with ``error`` instead of ending the whole bench.
"""

from __future__ import annotations

import json
import subprocess
from typing import Any


def run_worker(cmd: list[str], row: dict[str, Any], timeout: float) -> dict[str, Any]:
    """``cmd``'s RESULT line as a dict; else ``row`` (what was measured) with an ``error``."""
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {**row, "error": f"timeout {timeout:.0f}s"}
    for line in proc.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[7:])
    tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["no output"]
    return {**row, "error": tail[0][:200]}


def publish(table: str, results: list[dict[str, Any]], json_path: str | None) -> None:
    """Print the bench's table; with ``json_path`` also keep every row there."""
    print(table)
    if json_path:
        with open(json_path, "w") as fh:
            json.dump(results, fh, indent=1)
