"""Writing the workbench's own files so that nothing finished is lost or left half-written.

- `write_text` replaces a file atomically: a temporary file in the same folder, flushed,
  then `os.replace`d over the target. A crash, a full disk or Ctrl-C leaves the old file
  or the new one, never a mix, and no temporary file behind.
- `append_line` adds one line to a log-like file (the history) with a single write; when
  an earlier crash cut the last line short, the new line starts on a line of its own, so
  one damaged line never swallows the next record.
- `check_writable` is the check made before any work: the folder can be created, written
  to, and has room.

Every `OSError` becomes a `WorkbenchError` that says what happened in words (disk full,
read-only, no permission) and what to do.
"""

from __future__ import annotations

import errno
import os
import shutil
import tempfile
from pathlib import Path

from workbench.core.errors import WorkbenchError

MIN_FREE_BYTES = 1024 * 1024
"""Free space an output folder needs before any work: results and reports are a few hundred kB."""

FULL = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)
NOT_ALLOWED = (errno.EROFS, errno.EACCES, errno.EPERM)
UMASK = os.umask(0o022)  # the process's umask can only be read by setting it: read once, put back
os.umask(UMASK)


def describe(exc: OSError) -> tuple[str, str]:
    """(what happened, what to do) for an `OSError` met while writing."""
    if exc.errno in FULL:
        return (
            "the disk is full" if exc.errno != errno.EDQUOT else "the disk quota is used up",
            "free some space or give another folder, then run again",
        )
    if exc.errno == errno.EROFS:
        return "the file system is read-only", "give a folder you can write to"
    if exc.errno in NOT_ALLOWED:
        return "no permission to write there", "give a folder you can write to"
    return exc.strerror or str(exc), "check the path and the disk"


def write_error(path: Path, exc: OSError, what: str = "cannot write it") -> WorkbenchError:
    """An `OSError` from writing `path` as one sentence a person can act on."""
    reason, hint = describe(exc)
    return WorkbenchError(f"{path}: {what} ({reason}); {hint}.")


def write_text(path: Path, text: str) -> None:
    """Replace `path` with `text` atomically (UTF-8); the old file stays whole until the new one is complete."""
    with atomic_open(path) as out:
        out.write(text)


class atomic_open:
    """`with atomic_open(path) as out:` writes a temporary file next to `path` and renames it over
    `path` only when the block ends without an error; otherwise the temporary file is removed."""

    def __init__(self, path: Path, newline: str | None = None):
        self.path, self.newline, self.temp = Path(path), newline, None

    def __enter__(self):
        try:
            fd, name = tempfile.mkstemp(dir=self.path.parent, prefix=f".{self.path.name}.", suffix=".partial")
        except OSError as exc:
            raise write_error(self.path, exc) from None
        self.temp = Path(name)
        self.file = os.fdopen(fd, "w", encoding="utf-8", newline=self.newline)
        return self.file

    def __exit__(self, kind, exc, tb) -> bool:
        try:
            if kind is None:
                self.file.flush()
                os.fsync(self.file.fileno())
            self.file.close()
            if kind is None:
                os.chmod(self.temp, 0o666 & ~UMASK)  # mkstemp makes 0600 files; give the usual mode
                os.replace(self.temp, self.path)
        except OSError as error:
            self.temp.unlink(missing_ok=True)
            raise write_error(self.path, error) from None
        if kind is not None:
            self.temp.unlink(missing_ok=True)
            if issubclass(kind, OSError):
                raise write_error(self.path, exc) from None
        return False


def append_line(path: Path, line: str) -> None:
    """Append one line (a newline is added) with a single write, after the last complete line."""
    data = (line.rstrip("\n") + "\n").encode("utf-8")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with path.open("ab") as out:
            if out.tell() and _last_byte(path) != b"\n":
                data = b"\n" + data  # the previous writer was cut short: keep its fragment on its own line
            out.write(data)
            out.flush()
    except OSError as exc:
        raise write_error(path, exc, "cannot append to it") from None


def _last_byte(path: Path) -> bytes:
    with path.open("rb") as file:
        file.seek(-1, os.SEEK_END)
        return file.read(1)


def check_writable(folder: Path, what: str) -> None:
    """Before any work: `folder` can be written to (or created: its nearest existing parent can
    be written to; nothing is created yet) and has room for the results. `what` names the
    setting in the message (e.g. "--out 'results'")."""
    folder = Path(folder).expanduser().absolute()
    existing = next(p for p in (folder, *folder.parents) if p.exists())
    if not existing.is_dir():
        raise WorkbenchError(
            f"{what}: cannot write there ({existing} is a file, not a folder); give a folder you can write to."
        )
    try:
        if existing == folder:  # the folder itself: try a real write
            fd, name = tempfile.mkstemp(dir=folder, prefix=".workbench-write-test-")
            os.close(fd)
            os.unlink(name)
        elif os.statvfs(existing).f_flag & os.ST_RDONLY:
            raise OSError(errno.EROFS, "read-only file system")
        elif not os.access(existing, os.W_OK | os.X_OK):
            raise OSError(errno.EACCES, "permission denied")
    except OSError as exc:
        reason, hint = describe(exc)
        raise WorkbenchError(f"{what}: cannot write there ({reason}); {hint}.") from None
    free = shutil.disk_usage(existing).free
    if free < MIN_FREE_BYTES:
        raise WorkbenchError(
            f"{what}: the disk is full ({free // 1024} kB free in {existing}); free some space or give "
            "another folder, then run again."
        )
