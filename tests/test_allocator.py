"""Memory freed by one phase does not stay resident into the next (glibc): a worker's peak
counts what the method holds rather than what the allocator kept from quantizing, or the
holes that large blocks leave in the heap."""

import subprocess
import sys

import pytest

from workbench.core import allocator

# One big block freed first (glibc then raises its mmap threshold above that size), then big
# blocks between small ones that stay alive: the big ones come from the heap, and when they
# are freed their holes stay resident until the heap is trimmed; mapped apart, each goes back
# to the system when it is freed.
SCRIPT = """
import contextlib
import sys
import torch
from workbench.core import allocator
from workbench.metrics import memory
measuring = allocator.large_blocks_apart("cpu") if sys.argv[1] == "apart" else contextlib.nullcontext(True)
with measuring as in_effect:
    assert in_effect
    torch.ones(4 * 2**20 // 4).sum()
    keep, big = [], []
    for _ in range(40):
        big.append(torch.ones(3 * 2**20 // 4))
        keep.append(torch.ones(64 * 1024))
    before = memory.rss_bytes()
    del big
    freed = memory.rss_bytes()
assert allocator.release_freed()
print((before - freed) / 2**20, (before - memory.rss_bytes()) / 2**20)
"""


def _returned_mb(mode: str) -> tuple[float, float]:
    out = subprocess.run([sys.executable, "-c", SCRIPT, mode], capture_output=True, text=True, check=True).stdout
    by_free, by_release = map(float, out.split())
    return by_free, by_release


@pytest.mark.skipif(allocator.glibc() is None, reason="glibc only")
def test_release_freed_hands_freed_heap_memory_back():
    returned_by_free, returned_by_release = _returned_mb("heap")
    assert returned_by_free < 20 and returned_by_release > 100  # 40 x 3 MB freed


@pytest.mark.skipif(allocator.glibc() is None, reason="glibc only")
def test_large_blocks_mapped_apart_go_back_when_freed():
    returned_by_free, _ = _returned_mb("apart")
    assert returned_by_free > 100  # the same 40 x 3 MB, each its own mapping, unmapped by free


def test_large_blocks_apart_is_for_cpu_measurements_only():
    with allocator.large_blocks_apart("cuda") as in_effect:
        assert not in_effect  # a GPU's peak is CUDA's own count
