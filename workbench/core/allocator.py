"""Peak memory that counts what a method holds, not what the allocator kept (glibc, Linux).

glibc keeps memory a process frees: after the first large block is freed it raises its
mmap threshold (up to 32 MiB), so later blocks of that size come from the heap and stay
resident after they are freed, in holes whose layout changes from run to run. The same
method on the same input then peaks at a different memory in every fresh worker, and what
quantizing freed is counted as the measured method's. Three remedies:

- `release_freed` hands the heap's free memory back between quantizing and measuring, so
  the quantizer's leftovers are not counted in the method's peak.
- `large_blocks_apart` (while measuring on CPU) gives every block of 2 MiB or more its own
  mapping, returned to the system when it is freed: activations, dequantized weights and
  logit chunks then never leave holes in the heap, so repeated runs of one method peak at
  nearly the same memory. Its price is page faults when such a block is allocated again,
  which makes perplexity slower (most for methods that allocate many large blocks). A
  smaller threshold steadies the peak no better; 4 MiB and above no longer steady it.
- `share_one_heap` (workers) makes threads share one heap: a quantizer that works in a
  thread pool (gptqmodel) otherwise leaves freed memory in a heap per thread, which raises
  its peak and makes it vary more.
- `drop_file_pages` takes the pages of memory-mapped weight files out of the process's
  resident set after a build: a quantizer reads every full-precision weight through the
  file's mapping, and the mapping stays while any kept tensor (a tied embedding) points
  into it, so 500 MB the quantized model never reads again were counted as using it. Pages
  the model does read come back at its next access, and count again.

Elsewhere (macOS, Windows, musl) they do nothing beyond collecting garbage, and say so.
"""

from __future__ import annotations

import contextlib
import ctypes
import gc
import platform
from pathlib import Path


def glibc():
    """The C library when it is glibc on Linux, else None."""
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return None
    try:
        return ctypes.CDLL("libc.so.6")
    except OSError:
        return None


M_MMAP_THRESHOLD, M_ARENA_MAX = -3, -8  # glibc's mallopt parameter numbers
LARGE_BLOCK_BYTES = 2 * 2**20
"""While measuring, blocks of this size or more get their own mapping."""
GLIBC_CEILING_BYTES = 32 * 2**20
"""Where glibc's own threshold rises to on 64-bit Linux: the threshold after measuring."""


@contextlib.contextmanager
def large_blocks_apart(device: str):
    """While measuring on CPU, every block of LARGE_BLOCK_BYTES or more is mapped on its own
    and unmapped when freed (a fixed M_MMAP_THRESHOLD, which also stops glibc from raising
    it); afterwards the threshold is GLIBC_CEILING_BYTES. Yields whether this is in effect:
    not on GPU (its peak is CUDA's count), not without glibc."""
    libc = glibc() if device == "cpu" else None
    apart = bool(libc and libc.mallopt(M_MMAP_THRESHOLD, LARGE_BLOCK_BYTES) == 1)
    try:
        yield apart
    finally:
        if apart:
            libc.mallopt(M_MMAP_THRESHOLD, GLIBC_CEILING_BYTES)


def share_one_heap() -> bool:
    """Threads share the main heap from now on (M_ARENA_MAX 1), for a process that measures
    one method and exits: a quantizer's thread pool otherwise leaves holes in heaps of its
    own. False where the C library is not glibc."""
    libc = glibc()
    return bool(libc and libc.mallopt(M_ARENA_MAX, 1) == 1)


def release_freed() -> bool:
    """Collect garbage and return the heap's free memory to the system (`malloc_trim`, every
    arena). False where the C library is not glibc."""
    gc.collect()
    libc = glibc()
    return bool(libc and libc.malloc_trim(0) in (0, 1))


MADV_DONTNEED = 4  # Linux's madvise advice number


def drop_file_pages(folders) -> int:
    """Take out of this process's resident set the pages of every mapping of a file inside
    `folders` that holds no changes of its own (Linux `madvise(MADV_DONTNEED)`; safetensors
    maps files copy-on-write, so a mapping with any written page is left alone); returns the
    bytes of the mappings. What is dropped is read again from the file (usually from the page
    cache) when it is next touched. 0 elsewhere."""
    libc = glibc()
    if libc is None:
        return 0
    files = {str(f.resolve()) for folder in folders if Path(folder).is_dir() for f in Path(folder).rglob("*")}
    libc.madvise.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int)
    dropped = 0
    for start, end in _unchanged_mappings(files):
        if libc.madvise(start, end - start, MADV_DONTNEED) == 0:
            dropped += end - start
    return dropped


def _unchanged_mappings(files: set[str]) -> list[tuple[int, int]]:
    """(start, end) of each mapping of one of `files` with no anonymous (written) page."""
    found, current = [], None
    with open("/proc/self/smaps", encoding="utf-8", errors="replace") as smaps:
        for line in smaps:
            fields = line.split(maxsplit=5)
            if not fields[0].endswith(":"):  # a mapping's header: range, perms, offset, device, inode[, path]
                current = fields[0] if len(fields) == 6 and fields[5].strip() in files else None
            elif current and fields[0] == "Anonymous:":
                if fields[1] == "0":
                    found.append(tuple(int(x, 16) for x in current.split("-")))
                current = None
    return found
