"""Print which sandbox isolation the verifier tests actually ran under (CI reads this line)."""

from __future__ import annotations


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    from posttrain.verifiers.sandbox import detect_isolation

    if detect_isolation.cache_info().currsize:  # only when a verifier test ran
        terminalreporter.write_line(f"verifiers sandbox: {detect_isolation().describe()}")
