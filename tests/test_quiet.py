"""Library chatter goes to the log file, not to the console (or a notebook cell)."""

from __future__ import annotations

import subprocess
import sys

from workbench.quiet import library_output


SCRIPT = """
import logging, os, sys, warnings
from workbench.quiet import library_output

console = logging.getLogger("console")  # like transformers: its own handler on the console
console.addHandler(logging.StreamHandler(sys.stderr))
console.propagate = False
with library_output(sys.argv[1]):
    print("a print")
    logging.getLogger("unhandled").warning("a record nobody handles")  # bitsandbytes' case
    console.warning("a record on a console handler")
    warnings.warn("a warning", UserWarning)
    os.write(1, b"native stdout\\n")
    os.write(2, b"native stderr\\n")
console.warning("after the block")
print("after the block")
"""


def test_every_kind_of_library_output_goes_to_the_file(tmp_path):
    """In a plain process (pytest captures logging and warnings itself)."""
    path = tmp_path / "logs" / "library.log"
    done = subprocess.run([sys.executable, "-c", SCRIPT, str(path)], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    written = path.read_text()
    for line in ("a print", "a record nobody handles", "a record on a console handler", "a warning",
                 "native stdout", "native stderr"):
        assert line in written
    assert "after the block" not in written
    assert done.stdout == "after the block\n" and done.stderr == "after the block\n"


def test_nested_blocks_write_to_the_outer_file(tmp_path):
    with library_output(tmp_path / "outer.log"):
        with library_output(tmp_path / "inner.log"):
            print("inside both")
        print("inside the outer")
    assert (tmp_path / "outer.log").read_text() == "inside both\ninside the outer\n"
    assert not (tmp_path / "inner.log").exists()


def test_a_notebook_started_quietly_loads_a_model_without_library_output(tmp_path, tiny_folder):
    """Import-time warnings (torchao, torch's pytree) and transformers' loading bar stay out of the cell."""
    script = ("import sys; from workbench import models, quiet; quiet.start_notebook(sys.argv[1]); "
              "models.load_model(models.resolve(sys.argv[2]), 'cpu'); print('loaded')")
    log = tmp_path / "library.log"
    done = subprocess.run([sys.executable, "-c", script, str(log), str(tiny_folder)], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout == "loaded\n" and "Loading weights" not in done.stderr and "Failed to load" not in done.stderr, done.stderr
    loud = subprocess.run([sys.executable, "-c", script.replace("quiet.start_notebook(sys.argv[1]); ", ""), str(log), str(tiny_folder)],
                          capture_output=True, text=True, timeout=120)
    assert "Loading weights" in loud.stderr  # the check can fail: without it, the bar is there
