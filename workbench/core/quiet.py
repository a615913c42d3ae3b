"""Library chatter goes to a log file, not into a notebook cell.

bitsandbytes logs "MatMul8bitLt: inputs will be cast..." on every 8-bit forward pass,
gptqmodel prints banners and per-layer tables, transformers and torchao warn on import.
In a notebook that is thousands of red lines (and, past about a thousand messages, Jupyter
drops the cell's own "finished" message). `library_output(path)` sends all of it to `path`
while a block runs: Python's stdout/stderr, `warnings`, logging handlers that write to the
console (and records that have no handler), and native writes to file descriptors 1 and 2.
It is process-wide: while a panel works in a background thread, whatever else prints goes
to the same file. Nested uses write to the outermost file. A log record repeated word for
word is written once. `start_notebook()` does the libraries' imports quietly, in a
notebook's first cell.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import threading
from pathlib import Path
from typing import Iterator

from workbench.core import files

LIBRARY_LOG = Path("results") / "library.log"
"""Where notebooks and panels send library output (relative to the notebook's folder)."""
LIBRARIES = [
    "torch",
    "transformers",
    "transformers.modeling_utils",
    "transformers.generation.utils",
    "transformers.models.auto.modeling_auto",
    "transformers.models.auto.tokenization_auto",
    "transformers.tokenization_utils_tokenizers",
]
"""The heavy libraries every measurement imports, whatever its method: a notebook's first cell
imports them (what they print goes to the log), and so does the workers' fork server once
(transformers loads these submodules lazily: without them each worker spent seconds opening
the session)."""

# gptqmodel's progress bars (logbar) draw into a notebook through IPython display handles, past
# every redirect: even a tiny model's quantization sends hundreds of display messages, enough to
# make a notebook cell under nbval time out. Told it is not in a notebook, logbar
# writes to stdout, which `library_output` sends to the log.
os.environ.setdefault("LOGBAR_DISABLE_NOTEBOOK_DETECTION", "1")

_lock = threading.Lock()
_active = 0


@contextlib.contextmanager
def library_output(path: Path) -> Iterator[Path]:
    """Everything printed while the block runs is appended to `path` (created with its folder)."""
    global _active
    with _lock:
        _active += 1
        outermost = _active == 1
    try:
        if not outermost:
            yield path
            return
        path = Path(path).expanduser().absolute()
        with files.open_own_log(path, "library log") as log, _redirected(log):
            yield path
    finally:
        with _lock:
            _active -= 1


@contextlib.contextmanager
def _redirected(log) -> Iterator[None]:
    consoles = [stream for stream in (sys.stdout, sys.stderr, sys.__stdout__, sys.__stderr__) if stream is not None]
    # handlers that kept a console stream from when they were made (transformers' does)
    handlers = [
        h
        for h in _all_handlers()
        if isinstance(h, logging.StreamHandler) and "stream" in vars(h) and h.stream in consoles
    ]
    for stream in consoles:
        with contextlib.suppress(Exception):
            stream.flush()
    saved_fds = [os.dup(1), os.dup(2)]
    saved_streams = [h.setStream(log) for h in handlers]
    to_file = logging.StreamHandler(log)  # records from loggers without handlers (bitsandbytes')
    to_file.setLevel(logging.WARNING)
    to_file.addFilter(_Once())
    logging.getLogger().addHandler(to_file)
    try:
        os.dup2(log.fileno(), 1)
        os.dup2(log.fileno(), 2)
        with contextlib.redirect_stdout(log), contextlib.redirect_stderr(log):
            yield
    finally:
        log.flush()
        os.dup2(saved_fds[0], 1)
        os.dup2(saved_fds[1], 2)
        for fd in saved_fds:
            os.close(fd)
        logging.getLogger().removeHandler(to_file)
        for handler, stream in zip(handlers, saved_streams):
            handler.setStream(stream)


class _Once(logging.Filter):
    """Each distinct message once: bitsandbytes repeats its 8-bit cast warning on every forward pass."""

    def __init__(self):
        super().__init__()
        self.seen: set[str] = set()

    def filter(self, record: logging.LogRecord) -> bool:
        message = f"{record.name}: {record.getMessage()}"
        if message in self.seen:
            return False
        self.seen.add(message)
        return True


def _all_handlers() -> list[logging.Handler]:
    loggers = [logging.getLogger()] + [
        logger for logger in logging.Logger.manager.loggerDict.values() if isinstance(logger, logging.Logger)
    ]
    return [handler for logger in loggers for handler in logger.handlers]


def start_notebook(path: Path = LIBRARY_LOG) -> None:
    """A notebook's first cell: `import_libraries(path)`. Panels send their libraries' output to
    the same file while they work."""
    import_libraries(path)


def import_libraries(path: Path) -> None:
    """Import the heavy libraries now, with what they print on import (torchao's missing kernels,
    torch's pytree deprecations) going to `path` instead of the cell or terminal, and no loading
    progress bars from transformers (the workbench shows its own progress)."""
    import importlib

    with library_output(path):
        for name in LIBRARIES:
            with contextlib.suppress(ImportError):
                importlib.import_module(name)
        from transformers.utils import logging as transformers_logging

        transformers_logging.disable_progress_bar()
