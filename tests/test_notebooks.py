"""Notebooks are committed clean and in the Colab-ready shape (nbval executes them separately)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

NOTEBOOKS = sorted((Path(__file__).resolve().parents[1] / "notebooks").glob("*.ipynb"))


def test_there_are_notebooks():
    assert {p.name for p in NOTEBOOKS} >= {"01_quantization_basics.ipynb", "02_compare_methods.ipynb"}


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_is_clean_and_colab_ready(path):
    cells = json.loads(path.read_text())["cells"]
    code = [("".join(c["source"])) for c in cells if c["cell_type"] == "code"]
    for cell in (c for c in cells if c["cell_type"] == "code"):
        assert not cell.get("outputs") and not cell.get("execution_count"), "commit notebooks without outputs"
    assert "colab-badge.svg" in "".join(cells[0]["source"])
    assert '"google.colab" in sys.modules' in code[0] and "%pip" in code[0]  # installs only on Colab
    assert "os.environ.get(" in code[1]  # parameters overridable by environment variables
    assert not any(line.lstrip().startswith(("def ", "class ")) for cell in code for line in cell.splitlines()), (
        "reusable code belongs in the package, not in a notebook"
    )
