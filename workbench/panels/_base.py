"""Long work for a panel: one button, a status, progress, a captured log, and cancel.

States go `idle -> running -> done | error | cancelled` (`JobState`, a str Enum, so a
state also compares equal to its lowercase name) and every transition is kept in
`Job.states`, so tests can click a button and assert the sequence. `on_done` may return a
message (e.g. which methods failed): the job is then done, in amber, with that message.
Work runs in a worker thread so the notebook stays responsive; its log is an HTML widget
whose value the thread sets (a `with out:` block from a thread loses or misroutes output),
scrolled to its newest line. What libraries print while the work runs goes to a log file (`quiet.library_output`); the
panel's log says how many lines and where.
Works with ipywidgets 7.7.1 (Colab) and 8.x.
"""

from __future__ import annotations

import html
import threading
import time
import traceback
from enum import Enum
from pathlib import Path
from typing import Any, Callable

import ipywidgets as widgets

from workbench.core.errors import WorkbenchError
from workbench.core.quiet import LIBRARY_LOG, library_output
from workbench.report.display import FigureArea  # noqa: F401 (panels import it from here)


class JobState(str, Enum):
    """Where a job is; `str` so that `job.state == "done"` and lists of plain names compare equal."""

    IDLE = "idle"
    RUNNING = "running"
    DONE = "done"
    ERROR = "error"
    CANCELLED = "cancelled"

    def __str__(self) -> str:
        return self.value


COLORS = {
    JobState.IDLE: "#555",
    JobState.RUNNING: "#1f77b4",
    JobState.DONE: "#2ca02c",
    JobState.ERROR: "#d62728",
    JobState.CANCELLED: "#ff7f0e",
}
AMBER = "#b8860b"
"""A run that finished with failures (some methods failed), and "cancelling..."."""


class LogView:
    """A job's log: the newest line stays in view (the box scrolls to its end by itself: a
    reversed flex column), tracebacks in red. An HTML widget, so writing from a worker
    thread only sets its value."""

    MAX_LINES = 2000

    def __init__(self):
        self.widget = widgets.HTML()
        self._lines: list[tuple[str, bool]] = []
        self._lock = threading.Lock()

    @property
    def text(self) -> str:
        return "".join(line + "\n" for line, _ in self._lines)

    def write(self, text: str, error: bool = False) -> None:
        with self._lock:
            self._lines.extend((line, error) for line in text.rstrip("\n").split("\n"))
            del self._lines[: -self.MAX_LINES]
            body = "".join(
                f"<div style='color:#d62728'>{html.escape(line)}</div>" if red else f"<div>{html.escape(line)}</div>"
                for line, red in self._lines
            )
            self.widget.value = (
                "<div style='max-height:220px;overflow:auto;display:flex;flex-direction:column-reverse;"
                "border:1px solid #ddd;font-family:monospace;font-size:12px;white-space:pre-wrap;"
                f"word-break:break-word;padding:2px 4px'><div>{body}</div></div>"
            )


class Job:
    """Runs `work(job)` on a button click, in a worker thread, then `on_done(result)`; shows what happens."""

    def __init__(
        self,
        button: widgets.Button,
        work: Callable[["Job"], Any],
        on_done: Callable[[Any], None],
        cancellable: bool = False,
        library_log: Path = LIBRARY_LOG,
    ):
        self.button, self._work, self._on_done, self.library_log = (button, work, on_done, Path(library_log))
        button.on_click(lambda _: self.start())
        self.status = widgets.HTML()
        self.progress = widgets.IntProgress(
            value=0, min=0, max=1, layout=widgets.Layout(width="200px", visibility="hidden")
        )
        self.cancel_button = widgets.Button(
            description="Cancel", disabled=True, layout=widgets.Layout(display="" if cancellable else "none")
        )
        self.cancel_button.on_click(lambda _: self.cancel())
        self.log = LogView()
        self.widget = widgets.VBox(
            [widgets.HBox([button, self.cancel_button, self.progress, self.status]), self.log.widget]
        )
        self.states: list[JobState] = []
        self.error: str | None = None
        self.warning: str | None = None
        """Set when the work finished but not all of it succeeded (`on_done` returned a message)."""
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._set_state(JobState.IDLE)

    @property
    def state(self) -> JobState:
        return self.states[-1]

    def start(self, background: bool = True) -> None:
        """Run the work (in a worker thread unless `background` is False) unless it is already running."""
        if self.state is JobState.RUNNING:
            return
        self._stop.clear()
        self.error = self.warning = None
        self.button.disabled = True
        self.cancel_button.disabled = False
        self._set_state(JobState.RUNNING)
        if background:
            self._thread = threading.Thread(target=self._run, daemon=True)
            self._thread.start()
        else:
            self._run()

    def _run(self) -> None:
        started = time.perf_counter()
        try:
            lines_before = _line_count(self.library_log)
            with library_output(self.library_log):
                result = self._work(self)
            if (lines := _line_count(self.library_log) - lines_before) > 0:
                self.write(f"library messages: {lines} line(s) in {self.library_log}")
            self.warning = self._on_done(result) or None
            state = JobState.CANCELLED if self._stop.is_set() else JobState.DONE
        except WorkbenchError as exc:
            self.error, state = str(exc), JobState.ERROR
        except Exception as exc:  # show the traceback in the panel instead of losing it in the kernel log
            self.error, state = f"{type(exc).__name__}: {exc}", JobState.ERROR
            self.log.write(traceback.format_exc(), error=True)
        self.button.disabled = False
        self.cancel_button.disabled = True
        self.progress.layout.visibility = "hidden"
        self._set_state(state, f" after {time.perf_counter() - started:.1f} s")

    def _set_state(self, state: JobState, detail: str = "") -> None:
        self.states.append(state)
        text = (
            state.value
            + detail
            + (f": {self.error}" if self.error else "")
            + (f"; {self.warning}" if self.warning else "")
        )
        color = AMBER if self.warning and state is JobState.DONE else COLORS[state]
        self._show_status(text, color)

    def _show_status(self, text: str, color: str) -> None:
        self.status.value = f"<b style='color:{color};white-space:normal;word-break:break-word'>{html.escape(text)}</b>"

    def write(self, message: str) -> None:
        self.log.write(message)

    def set_progress(self, done: int, total: int) -> None:
        self.progress.layout.visibility = "visible"
        self.progress.max = max(total, 1)
        self.progress.value = done

    def cancel(self) -> None:
        """Ask the work to stop: a worker process ends at once, other work at its next
        checkpoint (between methods, between steps). The status says so at once."""
        if self.state is not JobState.RUNNING:
            return
        self._stop.set()
        self.cancel_button.disabled = True
        self._show_status("cancelling...", AMBER)
        self.write("cancelling...")

    def should_stop(self) -> bool:
        return self._stop.is_set()

    def wait(self, timeout: float | None = None) -> JobState:
        """Block until the work finishes (for tests and headless notebooks); returns the final state."""
        if self._thread is not None:
            self._thread.join(timeout)
        return self.state


def _line_count(path: Path) -> int:
    try:
        with path.open("rb") as file:
            return sum(chunk.count(b"\n") for chunk in iter(lambda: file.read(1 << 20), b""))
    except FileNotFoundError:
        return 0


def table_html(rows: list[dict]) -> str:
    """A plain HTML table (renders the same in Colab and JupyterLab); long cells (error
    messages) wrap instead of being clipped."""
    if not rows:
        return ""
    cell = "padding:2px 8px;vertical-align:top;white-space:normal;word-break:break-word;max-width:32em;text-align:left"
    head = "".join(f"<th style='{cell}'>{html.escape(str(c))}</th>" for c in rows[0])
    body = "".join(
        "<tr>" + "".join(f"<td style='{cell}'>{html.escape(str(v))}</td>" for v in row.values()) + "</tr>"
        for row in rows
    )
    return f"<table style='border-collapse:collapse;font-size:12px'><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


class Panel:
    """Displaying a panel displays its widget (`panel` alone on a cell's last line)."""

    widget: widgets.Widget

    def _ipython_display_(self):
        from IPython.display import display

        display(self.widget)

    def run(self) -> None:
        """Do what the button does, in this cell (notebooks run headless by nbval, CI); the
        outcome is `job.state`. A failed run raises, so the cell shows the message instead of
        passing silently. Returns nothing, so a cell ending in `.run()` shows no stray value."""
        self.job.start(background=False)
        if self.job.state is JobState.ERROR:
            raise WorkbenchError(self.job.error)
