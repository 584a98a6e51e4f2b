"""Figures from the reliability tests (requests, errors by kind, leaks), printed after the test run.

A test calls `record("soak", requests=200, ...)`; pytest's terminal summary then shows a "reliability figures"
section, so the numbers are in every `./build.sh test` log.
"""
from __future__ import annotations

_LINES: list[str] = []


def record(section: str, **figures) -> None:
    _LINES.append(f"{section}: " + ", ".join(f"{k}={v}" for k, v in figures.items()))


def pytest_terminal_summary(terminalreporter):
    if _LINES:
        terminalreporter.section("reliability figures")
        for line in _LINES:
            terminalreporter.write_line(line)
