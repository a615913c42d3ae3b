"""Quiet notebooks, checked on every nbval run (`make test`, or `pytest --nbval-lax notebooks/`):
a cell fails when its output has more than a few lines of stderr, a library banner or warning,
or a stray value (`<DisplayHandle ...>`, a `'done'` left by a call whose result nobody reads)."""

from __future__ import annotations

import re

import pytest

MAX_STDERR_LINES = 3
LIBRARY_NOISE = re.compile(r"Warning:|WARNING|Failed to load|GIL is enabled|GPTQModel|gptqmodel|MatMul8bitLt|"
                           r"_pytree|torchao|Loading weights|it/s\]|UserWarning|FutureWarning|DeprecationWarning")
STRAY_VALUE = re.compile(r"^(<DisplayHandle|<.* object at 0x[0-9a-f]+>$|'done'$|'cancelled'$|None$)")


def cell_noise(outputs) -> list[str]:
    """What a learner should not have to read in a cell's outputs."""
    problems, stderr = [], ""
    for out in outputs or ():
        if out.get("output_type") == "stream":
            text = out.get("text", "")
            if out.get("name") == "stderr":
                stderr += text
            for line in text.splitlines():
                if LIBRARY_NOISE.search(line):
                    problems.append(f"library output: {line[:160]}")
        elif out.get("output_type") == "execute_result":
            plain = out.get("data", {}).get("text/plain", "")
            if STRAY_VALUE.match(plain.strip()):
                problems.append(f"stray value: {plain.strip()[:80]}")
    lines = [line for line in stderr.splitlines() if line.strip()]
    if len(lines) > MAX_STDERR_LINES:
        problems.append(f"{len(lines)} lines of stderr, e.g. {lines[0][:160]}")
    return problems[:5]


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    if call.when != "call" or report.failed or not hasattr(item, "test_outputs"):
        return
    problems = cell_noise(item.test_outputs)
    if problems:
        report.outcome = "failed"
        report.longrepr = f"cell {getattr(item, 'cell_num', '?')} is not quiet:\n  " + "\n  ".join(problems)
