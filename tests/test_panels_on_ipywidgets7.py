"""The panel tests again on ipywidgets 7.7.1, the version Google Colab ships.

`make test` installs 7.7.1 into `.widgets7`; here the panel test files run in a pytest of their
own with that folder first on PYTHONPATH, as one test of this suite, so that they run beside the
other files on `make test`'s pytest workers instead of after them. Each file checks the version
it imported (`WORKBENCH_EXPECT_IPYWIDGETS`)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
WIDGETS7 = ROOT / ".widgets7"
PANEL_TESTS = ("tests/test_panels.py", "tests/test_sensitivity_panel.py")

pytestmark = pytest.mark.model  # the panel tests load models: `make test`'s, not `make check`'s (63 s)


def test_the_panels_pass_on_ipywidgets_7_7_1():
    if not (WIDGETS7 / "ipywidgets").is_dir():
        pytest.skip("ipywidgets 7.7.1 is not in .widgets7: `make test` installs it there")
    env = {**os.environ, "PYTHONPATH": str(WIDGETS7), "WORKBENCH_EXPECT_IPYWIDGETS": "7.7.1"}
    # a pytest of its own: not one of this run's workers, nor its crash bookkeeping (tests/conftest.py)
    env = {name: value for name, value in env.items() if not name.startswith(("PYTEST_", "WORKBENCH_PYTEST_"))}
    done = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *PANEL_TESTS],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    summary = done.stdout.strip().splitlines()[-1] if done.stdout.strip() else done.stderr[-2000:]
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-2000:]
    assert " passed" in summary and "failed" not in summary, summary
