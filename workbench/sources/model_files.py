"""What the workbench checks in a model's files before it loads them.

- `content_fingerprint`: a model folder's identity is its content (config, tokenizer and
  weight files by size and sha256), so `models/tiny` and `models2/tiny` with other weights
  never share history rows while two copies of one model do. Hashes of large files are
  cached by (absolute path, size, mtime, ctime, inode) in a small JSON file, so the second
  call reads no weights. The change time (ctime) is there because no copy tool can set it
  back: weights replaced by others of the same size with the old mtime restored (`cp -p`,
  `rsync -a`, `tar x`) are hashed again, not taken for the old ones.
- `check_folder` / `check_converted`: config.json that is not JSON and safetensors files cut
  short or not safetensors are refused with one message before any loader sees them (a
  damaged conversion cache names the command that clears it).
- `check_gguf`: an empty file, or one that does not start with the GGUF magic, is refused
  before the conversion (tens of seconds) starts.
- `conversion_lock`: two processes converting the same .gguf for the first time take turns;
  the second waits and reuses the first one's result.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import struct
import time
from pathlib import Path

from workbench.core import files
from workbench.core.errors import WorkbenchError

CACHED_HASH_BYTES = 1024 * 1024
"""Files at least this large have their sha256 cached; smaller ones are hashed on every call."""
RACY_NS = 2 * 10**9
"""A file changed less than this long ago is not cached: a rewrite within the same ctime tick
and of the same size would otherwise keep the old hash (git's "racily clean" rule)."""
SKIPPED_SUFFIXES = (".md", ".lock", ".partial")


def content_files(folder: Path) -> list[Path]:
    """The files that make a model what it is: every top-level file except hidden ones and docs."""
    return sorted(
        f
        for f in folder.iterdir()
        if f.is_file()
        and not f.name.startswith(".")
        and f.suffix not in SKIPPED_SUFFIXES
        and not f.name.upper().startswith("LICENSE")
    )


def content_fingerprint(folder: Path, cache_file: Path) -> str:
    """sha256 over each content file's name, size and sha256 (first 16 hex digits)."""
    cache = _read_cache(cache_file)
    digest, changed = hashlib.sha256(), False
    for file in content_files(folder):
        stat = file.stat()
        key, entry = str(file.resolve()), None
        cached = cache.get(key)
        seen = {"size": stat.st_size, "mtime_ns": stat.st_mtime_ns, "ctime_ns": stat.st_ctime_ns, "inode": stat.st_ino}
        if isinstance(cached, dict) and all(cached.get(name) == value for name, value in seen.items()):
            entry = cached.get("sha256")
        if not isinstance(entry, str):
            entry = _sha256(file)
            if stat.st_size >= CACHED_HASH_BYTES and time.time_ns() - stat.st_ctime_ns > RACY_NS:
                cache[key], changed = ({**seen, "sha256": entry}, True)
        digest.update(f"{file.name}\0{stat.st_size}\0{entry}\n".encode())
    if changed:
        _write_cache(cache_file, cache)
    return digest.hexdigest()[:16]


def _sha256(file: Path) -> str:
    digest = hashlib.sha256()
    with file.open("rb") as data:
        for block in iter(lambda: data.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _read_cache(cache_file: Path) -> dict:
    """The cached hashes; a missing or damaged cache is an empty one (it only saves time)."""
    try:
        value = json.loads(files.read_own_text(cache_file, "fingerprint cache") or "{}")
    except (WorkbenchError, ValueError, RecursionError):
        return {}
    return value if isinstance(value, dict) else {}


def _write_cache(cache_file: Path, cache: dict) -> None:
    """Keep entries whose files still exist; a cache that cannot be written is skipped, not an error."""
    kept = {path: entry for path, entry in cache.items() if Path(path).is_file()}
    try:
        cache_file.parent.mkdir(parents=True, exist_ok=True)
        files.write_text(cache_file, json.dumps(kept, indent=0, sort_keys=True))
    except (OSError, WorkbenchError):
        pass


# ---------------------------------------------------------------------------- checks


def folder_problem(folder: Path) -> str | None:
    """What is wrong with a model folder's config.json or safetensors files, or None."""
    try:
        config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    except UnicodeDecodeError:
        return "config.json is not UTF-8 text"
    except json.JSONDecodeError as exc:
        return f"config.json is not valid JSON ({exc.msg} at line {exc.lineno}, column {exc.colno})"
    except RecursionError:
        return "config.json is nested too deeply to be a model's settings"
    if not isinstance(config, dict):
        return f"config.json holds a JSON {type(config).__name__}, not an object of settings"
    for name in TOKENIZER_FILES:
        problem = _json_problem(folder / name)
        if problem:
            return f"{name} {problem}"
    for file in sorted(folder.glob("*.safetensors")):
        problem = safetensors_problem(file)
        if problem:
            return f"{file.name} {problem}"
    return _missing_shards(folder)


def safetensors_problem(file: Path) -> str | None:
    """Why a .safetensors file cannot be whole (cut short, padded, not safetensors), or None.
    Reads the header only: 8 bytes of length, then a JSON table of tensors and byte ranges."""
    size = file.stat().st_size
    try:
        with file.open("rb") as data:
            (length,) = struct.unpack("<Q", data.read(8))
            if length > size - 8 or length > 100 * 2**20:
                return f"is not a safetensors file, or is cut short ({size:,} bytes)"
            header = json.loads(data.read(length))
    except (struct.error, ValueError, RecursionError):
        return f"is not a safetensors file, or is cut short ({size:,} bytes)"
    if not isinstance(header, dict):
        return f"has a header that is a JSON {type(header).__name__}, not a table of tensors: it is damaged"
    ends = []
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        offsets = entry.get("data_offsets") if isinstance(entry, dict) else None
        if not (isinstance(offsets, list) and len(offsets) == 2 and all(type(o) is int and o >= 0 for o in offsets)):
            return f"has a damaged header: tensor {name[:80]!r} has no valid byte range"
        ends.append(offsets[1])
    expected = 8 + length + max(ends, default=0)
    if size != expected:
        return f"is {size:,} bytes but its header describes {expected:,}: it was cut short or damaged"
    return None


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")
"""JSON files a tokenizer loads from a model folder: checked here, so a damaged one is one error line."""


def _json_problem(file: Path) -> str | None:
    """Why a JSON file of a model folder cannot be read (a byte-order mark included: the loaders refuse it), or None."""
    if not file.is_file():
        return None
    try:
        json.loads(file.read_text(encoding="utf-8"))
    except UnicodeDecodeError:
        return "is not UTF-8 text"
    except json.JSONDecodeError as exc:
        return f"is not valid JSON ({exc.msg} at line {exc.lineno}, column {exc.colno})"
    except RecursionError:
        return "is nested too deeply"
    return None


def _missing_shards(folder: Path) -> str | None:
    index = folder / "model.safetensors.index.json"
    if not index.is_file():
        return None
    try:
        shards = set(json.loads(index.read_text(encoding="utf-8"))["weight_map"].values())
    except (ValueError, KeyError, TypeError, AttributeError):
        return f"{index.name} is not a valid shard index"
    missing = sorted(s for s in shards if not (folder / s).is_file())
    return (
        f"{len(missing)} weight shard(s) listed in {index.name} are missing: {', '.join(missing[:3])}"
        if missing
        else None
    )


def check_folder(folder: Path, name: str) -> None:
    """Refuse a user's model folder whose files are damaged, before anything loads it."""
    problem = folder_problem(folder)
    if problem:
        raise WorkbenchError(
            f"model {name!r}: {problem}. Copy or download the model again (save_pretrained writes a whole folder)."
        )


def check_converted(folder: Path, source_name: str) -> Path:
    """A cached conversion, or an error naming the command that clears it when it is damaged."""
    problem = folder_problem(folder)
    if problem:
        raise WorkbenchError(
            f"model {source_name!r}: its converted copy in the cache is damaged ({problem}). "
            f"Clear it with `rm -rf '{folder}'` and run again: it is converted anew (about 20 s)."
        )
    return folder


def check_gguf(path: Path, name: str) -> None:
    """Refuse an empty file, or one that is not GGUF, before the conversion starts."""
    with path.open("rb") as data:
        magic = data.read(4)
    if not magic:
        raise WorkbenchError(f"model {name!r}: the file is empty. Download the .gguf file again.")
    if magic != b"GGUF":
        raise WorkbenchError(
            f"model {name!r}: not a GGUF file (it does not start with the GGUF magic bytes). "
            "Give a .gguf model file, a model folder or a hub id."
        )


@contextlib.contextmanager
def conversion_lock(folder: Path, log=print):
    """Held while `folder` is being built; a second process waits here for the first one."""
    try:
        import fcntl
    except ImportError:  # not POSIX: no lock, conversions may repeat work but never mix (atomic rename)
        yield
        return
    folder.parent.mkdir(parents=True, exist_ok=True)
    with open(folder.with_name(folder.name + ".lock"), "a") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            log(f"Another process is converting into {folder}; waiting for it to finish...")
            fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)
