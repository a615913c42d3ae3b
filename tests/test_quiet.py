"""Library chatter goes to the log file, not to the console (or a notebook cell)."""

from __future__ import annotations

import subprocess
import sys

from workbench.core.quiet import library_output

SCRIPT = """
import logging, os, sys, warnings
from workbench.core.quiet import library_output

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
    done = subprocess.run([sys.executable, "-c", SCRIPT, str(path)], capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr
    written = path.read_text()
    for line in (
        "a print",
        "a record nobody handles",
        "a record on a console handler",
        "a warning",
        "native stdout",
        "native stderr",
    ):
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
    script = (
        "import sys; from workbench.core import quiet; from workbench.sources import models; quiet.start_notebook(sys.argv[1]); "
        "models.load_model(models.resolve(sys.argv[2]), 'cpu'); print('loaded')"
    )
    log = tmp_path / "library.log"
    done = subprocess.run(
        [sys.executable, "-c", script, str(log), str(tiny_folder)], capture_output=True, text=True, timeout=900
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout == "loaded\n" and "Loading weights" not in done.stderr and "Failed to load" not in done.stderr, (
        done.stderr
    )
    loud = subprocess.run(
        [sys.executable, "-c", script.replace("quiet.start_notebook(sys.argv[1]); ", ""), str(log), str(tiny_folder)],
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert "Loading weights" in loud.stderr  # the check can fail: without it, the bar is there


def _messages_of_a_cell(code: str, env: dict) -> list[str]:
    """The iopub message types a real Jupyter kernel sends while running `code`."""
    from jupyter_client.manager import start_new_kernel

    manager, client = start_new_kernel(kernel_name="python3", env=env)
    try:
        msg_id, kinds = client.execute(code), []
        while not kinds or kinds[-1] != "idle":
            msg = client.get_iopub_msg(timeout=300)
            if msg["parent_header"].get("msg_id") == msg_id:
                kinds.append("idle" if msg["content"].get("execution_state") == "idle" else msg["msg_type"])
        return kinds
    finally:
        manager.shutdown_kernel(now=True)


def test_gptqmodel_progress_bars_stay_out_of_a_notebook_cell(tmp_path):
    """gptqmodel's progress bars (logbar) draw through display handles, which no redirect
    catches (447 of them timed out an nbval cell); after importing the workbench they write to
    stdout, which the library log takes. Under pytest, as nbval runs notebooks."""
    import os

    # as a fresh kernel would be (this process imported the workbench), under pytest
    env = {k: v for k, v in os.environ.items() if k != "LOGBAR_DISABLE_NOTEBOOK_DETECTION"} | {
        "PYTEST_CURRENT_TEST": "nbval"
    }
    bar = "from logbar import LogBar\nfor _ in LogBar.shared().pb(range(20)).title('layers'): pass\n"
    quiet = (
        f"from workbench.core import quiet\nwith quiet.library_output({str(tmp_path / 'library.log')!r}):\n"
        + "".join(f"    {line}\n" for line in bar.splitlines())
    )
    assert "update_display_data" in _messages_of_a_cell(
        bar, env
    )  # the check can fail: without the workbench, they draw
    kinds = _messages_of_a_cell(quiet, env)
    assert not {"display_data", "update_display_data", "stream"} & set(kinds), kinds
    assert "layers" in (tmp_path / "library.log").read_text()
