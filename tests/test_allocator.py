"""Memory freed by one phase does not stay resident into the next (glibc): a worker's peak
counts what the method holds rather than what the allocator kept from quantizing."""

import subprocess
import sys

import pytest

from workbench import allocator

# One big block freed first (glibc then raises its mmap threshold above that size), then big
# blocks between small ones that stay alive: the big ones come from the heap, and when they
# are freed their holes stay resident until the heap is trimmed.
SCRIPT = """
import sys
import torch
from workbench import allocator, measure
torch.ones(4 * 2**20 // 4).sum()
keep, big = [], []
for _ in range(40):
    big.append(torch.ones(3 * 2**20 // 4))
    keep.append(torch.ones(64 * 1024))
before = measure.rss_bytes()
del big
freed = measure.rss_bytes()
assert allocator.release_freed()
print((before - freed) / 2**20, (before - measure.rss_bytes()) / 2**20)
"""


@pytest.mark.skipif(allocator._glibc() is None, reason="glibc only")
def test_release_freed_hands_freed_heap_memory_back():
    out = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, check=True).stdout
    returned_by_free, returned_by_release = map(float, out.split())
    assert returned_by_free < 20 and returned_by_release > 100, out  # 40 x 3 MB freed
