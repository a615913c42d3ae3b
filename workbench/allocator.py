"""Peak memory that counts what a method holds, not what the allocator kept (glibc, Linux).

glibc keeps memory a process frees: after the first large block is freed it raises its
mmap threshold (up to 32 MiB), so later blocks of that size come from the heap and stay
resident after they are freed. Measuring a method right after quantizing it then starts
from a varying amount of freed-but-resident memory: gptq on the bundled model, in three
fresh workers, held 1031-1110 MB after quantizing and peaked at 1262-1324 MB above the
baseline. Handing the heap's free memory back before measuring (`release_freed`) leaves
833-845 MB and peaks of 981-1017 MB.

Not done: giving every block over 1 MiB its own mapping (`mallopt(M_MMAP_THRESHOLD)`) made
the peaks agree to 0.5%, but every freed block then costs page faults when it is
allocated again, and fp32 perplexity took 45% longer (4.3 s -> 6.2 s on 2,048 tokens).

Elsewhere (macOS, Windows, musl) `release_freed` only collects garbage and says so.
"""

from __future__ import annotations

import ctypes
import gc
import platform


def _glibc():
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return None
    try:
        return ctypes.CDLL("libc.so.6")
    except OSError:
        return None


def release_freed() -> bool:
    """Collect garbage and return the heap's free memory to the system (`malloc_trim`, every
    arena). False where the C library is not glibc."""
    gc.collect()
    libc = _glibc()
    return bool(libc and libc.malloc_trim(0) in (0, 1))
