"""Verifiers: sandboxed code execution, math and instruction checkers (issue: Verifiers)."""
