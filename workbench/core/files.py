"""Writing the workbench's own files so that nothing finished is lost or left half-written.

- `write_text` replaces a file atomically: a temporary file in the same folder, flushed,
  then `os.replace`d over the target. A crash, a full disk or Ctrl-C leaves the old file
  or the new one, never a mix, and no temporary file behind.
- `append_line` adds one line to a log-like file (the history) with a single write; when
  an earlier crash cut the last line short, the new line starts on a line of its own, so
  one damaged line never swallows the next record.
- `check_writable` is the check made before any work: the folder can be created, written
  to, and has room.
- A file the workbench appends to or reads back as its own (the history, the library log,
  caches) must be a regular file: `check_own_file` refuses a symbolic link (its target could
  be any file: a record appended to it would land there), a FIFO (reading or writing it
  blocks), a device or a folder, and `append_line` / `read_own_text` open without following
  links and without blocking.

Every `OSError` becomes a `WorkbenchError` that says what happened in words (disk full,
read-only, no permission) and what to do.
"""

from __future__ import annotations

import errno
import os
import re
import shutil
import stat
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


OWN_FLAGS = os.O_NOFOLLOW | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0)


def _kind(mode: int) -> str:
    for test, name in (
        (stat.S_ISLNK, "a symbolic link"),
        (stat.S_ISFIFO, "a FIFO (named pipe)"),
        (stat.S_ISDIR, "a folder"),
        (stat.S_ISSOCK, "a socket"),
        (stat.S_ISCHR, "a device"),
        (stat.S_ISBLK, "a device"),
    ):
        if test(mode):
            return name
    return "not a regular file"


def not_own_file(path: Path, mode: int, what: str) -> WorkbenchError:
    return WorkbenchError(
        f"{what} {path}: it is {_kind(mode)}, not a regular file; the workbench only reads and appends to plain files "
        "it wrote. Move it away (or give another folder) and run again."
    )


def check_own_file(path: Path, what: str) -> None:
    """Before any work: `path`, if it exists, is a regular file (not a link, FIFO, device or folder)."""
    try:
        mode = os.lstat(path).st_mode
    except FileNotFoundError:
        return
    except OSError as exc:
        raise WorkbenchError(f"{what} {path}: cannot read it ({exc.strerror}).") from None
    if not stat.S_ISREG(mode):
        raise not_own_file(path, mode, what)


def _open_own(path: Path, flags: int, what: str) -> int:
    """A descriptor of the regular file `path`, opened without following a link or blocking on a FIFO."""
    fd = os.open(path, flags | OWN_FLAGS, 0o666)
    mode = os.fstat(fd).st_mode
    if not stat.S_ISREG(mode):
        os.close(fd)
        raise not_own_file(path, mode, what)
    os.set_blocking(fd, True)
    return fd


def append_line(path: Path, line: str, what: str = "history") -> None:
    """Append one line (a newline is added) with a single write, after the last complete line."""
    data = (line.rstrip("\n") + "\n").encode("utf-8")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = _open_own(path, os.O_RDWR | os.O_APPEND | os.O_CREAT, what)
    except OSError as exc:
        if exc.errno in (errno.ELOOP, errno.ENXIO):  # a link (O_NOFOLLOW), or a FIFO nobody reads
            check_own_file(path, what)
        raise write_error(path, exc, "cannot append to it") from None
    try:
        end = os.lseek(fd, 0, os.SEEK_END)
        if end and os.pread(fd, 1, end - 1) != b"\n":
            data = b"\n" + data  # the previous writer was cut short: keep its fragment on its own line
        view = memoryview(data)
        while view:  # a write may take part of it (a disk filling up): the rest, or the error, follows
            view = view[os.write(fd, view) :]
    except OSError as exc:
        raise write_error(path, exc, "cannot append to it") from None
    finally:
        os.close(fd)


def open_own_log(path: Path, what: str):
    """The workbench's own log file `path` open for appending text, line by line (created if
    missing), refused unless it is a regular file."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = _open_own(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, what)
    except OSError as exc:
        if exc.errno in (errno.ELOOP, errno.ENXIO):
            check_own_file(path, what)
        raise write_error(path, exc, "cannot append to it") from None
    return os.fdopen(fd, "a", encoding="utf-8", errors="replace", buffering=1)


def open_own_text(path: Path, what: str):
    """The workbench's own file `path` open for reading text (None when there is none), refused
    unless it is a regular file; undecodable bytes are replaced (the caller validates what it reads)."""
    try:
        fd = _open_own(path, os.O_RDONLY, what)
    except FileNotFoundError:
        return None
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            check_own_file(path, what)
        raise WorkbenchError(f"{what} {path}: cannot read it ({exc.strerror}).") from None
    return os.fdopen(fd, encoding="utf-8-sig", errors="replace")


def read_own_text(path: Path, what: str) -> str | None:
    """All of the workbench's own file `path` (see `open_own_text`), or None when there is none."""
    file = open_own_text(path, what)
    if file is None:
        return None
    with file:
        return file.read()


def scratch_folder(kind: str) -> Path:
    """A new temporary folder named `workbench-<kind>-<this process id>-...`: when the process is
    killed (kill -9) before it removes it, a later run can tell it is stale (`remove_stale_folders`)."""
    try:
        return Path(tempfile.mkdtemp(prefix=f"workbench-{kind}-{os.getpid()}-"))
    except OSError as exc:
        raise write_error(Path(tempfile.gettempdir()), exc, "cannot create a temporary folder") from None


STALE_FOLDER = re.compile(r"^workbench-[a-z]+-(\d+)-")


def remove_stale_folders(log=None) -> int:
    """Remove this user's `scratch_folder`s whose process is gone (killed before it could clean up);
    never a folder of a process that is running, nor another user's. Returns how many went."""
    removed = 0
    for folder in Path(tempfile.gettempdir()).glob("workbench-*-*-*"):
        match = STALE_FOLDER.match(folder.name)
        if not match or folder.is_symlink() or not folder.is_dir() or int(match.group(1)) == os.getpid():
            continue
        try:
            if folder.stat().st_uid != os.getuid() or _running(int(match.group(1))):
                continue
        except OSError:
            continue
        shutil.rmtree(folder, ignore_errors=True)
        removed += 1
    if removed and log:
        log(f"removed {removed} temporary folder(s) left by workbench processes that were killed")
    return removed


def _running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # someone else's process
    return True


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
