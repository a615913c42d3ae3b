"""Memory: what a model stores (weight bytes, bits per weight) and the peak memory of a
measurement (resident set size, the kernel's high-water mark where it has one).
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Iterable

from workbench.core.allocator import LARGE_BLOCK_BYTES
from workbench.sources.models import block_linears


@dataclass(frozen=True)
class Storage:
    """What a model stores, counted right after quantizing or loading, before any forward
    pass (bitsandbytes repacks 4-bit weights for CPU inference on the first one)."""

    weight_bytes: int
    bits_per_weight: float | None
    """Mean stored bits per block-linear weight (scales, zeros and adapters included)."""
    kernel: str

    def result_fields(self) -> dict:
        """The `Result` fields this metric fills."""
        return {"weight_bytes": self.weight_bytes, "bits_per_weight": self.bits_per_weight}


def _leaf_tensors(tensor) -> Iterable:
    """Plain tensors behind a tensor subclass (quanto, torchao) or the tensor itself."""
    import torch

    flatten = getattr(tensor, "__tensor_flatten__", None)
    if flatten is not None and type(tensor) not in (torch.Tensor, torch.nn.Parameter):
        names, _ = flatten()
        for name in names:
            yield from _leaf_tensors(getattr(tensor, name))
    else:
        yield tensor


def _module_tensors(module, side_tensors, skip_bias: bool = False) -> Iterable:
    """Every tensor a module holds, its sub-modules included, and the method's side tensors."""
    for name, tensor in list(module.named_parameters()) + list(module.named_buffers()):
        if skip_bias and name.rsplit(".", 1)[-1] == "bias":
            continue
        yield from _leaf_tensors(tensor)
    if side_tensors is not None:
        for sub in module.modules():
            yield from side_tensors(sub)


def _unique_bytes(tensors: Iterable) -> int:
    seen, total = set(), 0
    for t in tensors:
        if t is None or t.device.type == "meta":
            continue
        key = (t.data_ptr(), t.numel(), t.dtype)
        if key not in seen:  # tied embeddings share storage: count once
            seen.add(key)
            total += t.numel() * t.element_size()
    return total


def storage(model, side_tensors=None) -> Storage:
    """Bytes of the tensors the model really holds (not `get_memory_footprint()`, which
    reports fp32 sizes for quanto and torchao), and bits per block-linear weight."""
    layers = block_linears(model)
    bits = sum(8 * _unique_bytes(_module_tensors(m, side_tensors, skip_bias=True)) for _, m in layers)
    weights = sum(m.out_features * m.in_features for _, m in layers)
    kernel = type(layers[0][1]).__name__ if layers else ""
    return Storage(_unique_bytes(_module_tensors(model, side_tensors)), bits / weights if weights else None, kernel)


def rss_bytes() -> int:
    import psutil

    return psutil.Process().memory_info().rss


def peak_rss_bytes() -> int | None:
    """The kernel's exact peak resident memory of this process image, since it started or since
    `reset_peak_rss` (Linux's VmHWM); None where /proc is missing.

    Not getrusage's ru_maxrss: Linux keeps the high-water mark of the forked copy across exec,
    so a worker spawned by a 4 GB parent reported 4 GB for every method."""
    try:
        with open("/proc/self/status", encoding="ascii") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def reset_peak_rss() -> bool:
    """Set this process's peak to its current resident memory (Linux: "5" into
    /proc/self/clear_refs); False where that is not possible."""
    try:
        with open("/proc/self/clear_refs", "w", encoding="ascii") as clear_refs:
            clear_refs.write("5")
        return True
    except OSError:
        return False


class PeakMemory:
    """Peak memory over a block: CUDA max allocated (and reserved) on GPU; on CPU the peak RSS:
    the kernel's exact high-water mark, reset when the block starts (Linux), else sampled every
    10 ms (plus, in a fresh worker process, the kernel's peak since the process started).

    `baseline_bytes` is what the process held when the block started, unless given: the run
    phase counts from the baseline before the build (`phase_fields`)."""

    def __init__(
        self,
        device: str,
        whole_process: bool = False,
        large_blocks_apart: bool = False,
        baseline_bytes: int | None = None,
    ):
        self.device, self.whole_process, self._given_baseline = device, whole_process, baseline_bytes
        self.peak_bytes, self.reserved_bytes, self.baseline_bytes = 0, None, 0
        apart = f" (blocks of {LARGE_BLOCK_BYTES >> 20} MiB and more mapped apart)" if large_blocks_apart else ""
        self.kind = "cuda max allocated" if device == "cuda" else f"peak RSS{apart}"

    @property
    def above_baseline_bytes(self) -> int:
        return max(self.peak_bytes - self.baseline_bytes, 0)

    def __enter__(self):
        if self.device == "cuda":
            import torch

            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.baseline_bytes = torch.cuda.memory_allocated()
        else:
            self._exact = reset_peak_rss()
            self.baseline_bytes = self.peak_bytes = rss_bytes()
            self._thread = None
            if not self._exact:  # no kernel peak for this block: sample
                self._stop = threading.Event()
                self._thread = threading.Thread(target=self._sample, daemon=True)
                self._thread.start()
        if self._given_baseline is not None:
            self.baseline_bytes = self._given_baseline
        return self

    def _sample(self):
        while not self._stop.wait(0.01):
            self.peak_bytes = max(self.peak_bytes, rss_bytes())

    def __exit__(self, *exc):
        if self.device == "cuda":
            import torch

            torch.cuda.synchronize()
            self.peak_bytes = torch.cuda.max_memory_allocated()
            self.reserved_bytes = torch.cuda.max_memory_reserved()
        else:
            if self._thread:
                self._stop.set()
                self._thread.join()
            kernel_peak = peak_rss_bytes() if self._exact or self.whole_process else None
            self.peak_bytes = max(self.peak_bytes, rss_bytes(), kernel_peak or 0)
        return False


def phase_fields(build: PeakMemory, run: PeakMemory) -> dict:
    """The `Result` fields of a build's peak (load, quantize, warm-up) and the run's after it
    (perplexity and decoding from the built model, counted from the same baseline, after the
    build's freed memory went back to the system)."""
    reserved = [p.reserved_bytes for p in (build, run) if p.reserved_bytes is not None]
    return {
        "peak_bytes": max(build.peak_bytes, run.peak_bytes),
        "peak_above_baseline_bytes": max(build.above_baseline_bytes, run.above_baseline_bytes),
        "peak_reserved_bytes": max(reserved) if reserved else None,
        "peak_kind": build.kind,
        "build_peak_bytes": build.above_baseline_bytes,
        "run_peak_bytes": run.above_baseline_bytes,
    }
