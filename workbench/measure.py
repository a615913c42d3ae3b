"""Measurements: perplexity, weight storage, peak memory, prefill latency, decode speed.

Perplexity is the exponential of the mean negative log-likelihood per scored token.
The sliding-window recipe in the transformers docs counts tokens wrongly (one per window
after the first) and leaves models that expect a BOS token without one; here every
token is scored exactly once, a BOS is put at each window start when the tokenizer adds
one, and the protocol (text, window, step, tokens scored) travels with the number,
because perplexities measured under different protocols are not comparable.
"""

from __future__ import annotations

import threading
import time
from dataclasses import asdict, dataclass
from typing import Callable, Iterable


@dataclass(frozen=True)
class Perplexity:
    ppl: float
    nll_sum: float
    n_tokens: int
    n_windows: int
    max_length: int
    stride: int
    """The step actually used (may be smaller than asked: see `windows`)."""
    bos: bool

    def protocol(self, text_name: str) -> dict:
        fields = asdict(self)
        del fields["ppl"], fields["nll_sum"]
        return {"text": text_name, **fields}


def windows(n: int, max_length: int, stride: int, bos: bool) -> tuple[list[tuple[int, int, int]], int]:
    """Windows `(begin, end, first_scored)` over n tokens, and the step used.

    Each token is scored exactly once, in the first window that has context for it.
    With a BOS the window holds `max_length - 1` text tokens and its first token is
    scored (the BOS is its context). Without one, a window's first token has no context,
    so consecutive windows must overlap by at least one token and the very first token
    of the text is never scored.
    """
    body = max_length - 1 if bos else max_length
    step = min(stride, body) if bos else min(stride, body - 1)
    result, scored_until, begin = [], 0 if bos else 1, 0
    while True:
        end = min(begin + body, n)
        result.append((begin, end, scored_until))
        scored_until = end
        if end >= n:
            return result, step
        begin += step


def perplexity(model, token_ids: list[int], max_length: int, stride: int, batch_size: int = 4,
               bos_token_id: int | None = None, progress: Callable[[int, int], None] | None = None) -> Perplexity:
    """Sliding-window perplexity of `model` on `token_ids`, batched over equal-length windows."""
    import torch
    import torch.nn.functional as F

    bos = bos_token_id is not None
    spans, step = windows(len(token_ids), max_length, stride, bos)
    device = next(model.parameters()).device
    nll_sum, n_scored, done = 0.0, 0, 0
    for batch in _equal_length_batches(spans, batch_size):
        rows, labels = [], []
        for begin, end, first in batch:
            ids = ([bos_token_id] if bos else []) + token_ids[begin:end]
            offset = 1 if bos else 0  # position of text token `begin` inside the row
            label = [-100] * len(ids)
            for pos in range(first - begin + offset, len(ids)):
                label[pos] = ids[pos]
            rows.append(ids)
            labels.append(label)
        inputs = torch.tensor(rows, device=device)
        targets = torch.tensor(labels, device=device)
        with torch.no_grad():  # not inference_mode: quanto's kernels fail under it
            logits = model(input_ids=inputs).logits
        # logits[:, t] predicts token t+1: shift, and score in fp32 whatever the model dtype.
        nll = F.cross_entropy(logits[:, :-1].float().reshape(-1, logits.shape[-1]), targets[:, 1:].reshape(-1),
                              ignore_index=-100, reduction="sum")
        nll_sum += nll.item()
        n_scored += int((targets[:, 1:] != -100).sum())
        done += len(batch)
        if progress:
            progress(done, len(spans))
    import math

    return Perplexity(math.exp(nll_sum / n_scored), nll_sum, n_scored, len(spans), max_length, step, bos)


def _equal_length_batches(spans, batch_size):
    batch = []
    for span in spans:
        if batch and (len(batch) == batch_size or span[1] - span[0] != batch[0][1] - batch[0][0]):
            yield batch
            batch = []
        batch.append(span)
    if batch:
        yield batch


def expects_bos(tokenizer) -> int | None:
    """The BOS id when the tokenizer puts one at the start of a text by itself, else None."""
    bos = tokenizer.bos_token_id
    if bos is None:
        return None
    ids = tokenizer("a")["input_ids"]
    return bos if ids and ids[0] == bos else None


# ---------------------------------------------------------------------------- storage

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


def _side_tensors(module) -> Iterable:
    """Quantization state kept outside parameters/buffers: bitsandbytes, HQQ."""
    import torch

    weight = getattr(module, "weight", None)
    state = getattr(weight, "quant_state", None)
    while state is not None:  # bnb 4-bit; double quantization nests a second state
        yield from (v for v in vars(state).values() if isinstance(v, torch.Tensor))
        state = getattr(state, "state2", None)
    scb = getattr(weight, "SCB", None)  # bnb 8-bit row scales
    if isinstance(scb, torch.Tensor):
        yield scb
    meta = getattr(module, "meta", None)  # HQQ scales and zeros
    if isinstance(meta, dict):
        yield from (v for v in meta.values() if isinstance(v, torch.Tensor))


def _module_tensors(module, recurse: bool, skip_bias: bool = False) -> Iterable:
    for name, tensor in list(module.named_parameters(recurse=recurse)) + list(module.named_buffers(recurse=recurse)):
        if skip_bias and name == "bias":
            continue
        yield from _leaf_tensors(tensor)
    for sub in module.modules() if recurse else [module]:
        yield from _side_tensors(sub)


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


def weight_bytes(model) -> int:
    """Bytes of the storage tensors the model really holds (not `get_memory_footprint()`,
    which reports fp32 sizes for quanto and torchao)."""
    return _unique_bytes(_module_tensors(model, recurse=True))


def linear_bits_per_weight(model) -> float | None:
    """Mean storage bits per weight over the linear layers of the blocks (lm_head excluded),
    scales and zero points included."""
    bits, weights = 0, 0
    for name, module in model.named_modules():
        rows, cols = getattr(module, "out_features", None), getattr(module, "in_features", None)
        if name.endswith("lm_head") or not (isinstance(rows, int) and isinstance(cols, int)):
            continue
        bits += 8 * _unique_bytes(_module_tensors(module, recurse=False, skip_bias=True))
        weights += rows * cols
    return bits / weights if weights else None


def kernel_name(model) -> str:
    """The class of the first block linear layer: which kernel does the matmuls."""
    for name, module in model.named_modules():
        if isinstance(getattr(module, "in_features", None), int) and "lm_head" not in name:
            return type(module).__name__
    return ""


# ---------------------------------------------------------------------------- memory

class PeakMemory:
    """Peak memory over a block: CUDA max allocated on GPU, sampled process RSS on CPU."""

    def __init__(self, device: str):
        self.device, self.peak_bytes, self.reserved_bytes = device, 0, None
        self.kind = "cuda max allocated" if device == "cuda" else "process peak RSS"

    def __enter__(self):
        if self.device == "cuda":
            import torch

            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        else:
            import psutil

            self._process, self._stop = psutil.Process(), threading.Event()
            self.peak_bytes = self._process.memory_info().rss
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()
        return self

    def _sample(self):
        while not self._stop.wait(0.01):
            self.peak_bytes = max(self.peak_bytes, self._process.memory_info().rss)

    def __exit__(self, *exc):
        if self.device == "cuda":
            import torch

            torch.cuda.synchronize()
            self.peak_bytes = torch.cuda.max_memory_allocated()
            self.reserved_bytes = torch.cuda.max_memory_reserved()
        else:
            self._stop.set()
            self._thread.join()
            self.peak_bytes = max(self.peak_bytes, self._process.memory_info().rss)
        return False


# ---------------------------------------------------------------------------- speed

@dataclass(frozen=True)
class Speed:
    prefill_ms: float
    """Time to the first new token for the prompt (one forward pass + sampling)."""
    decode_tokens_per_s: float
    """New tokens per second after the first, greedy, KV cache on, batch 1."""
    prompt_tokens: int
    new_tokens: int


def decode_speed(model, prompt_ids: list[int], new_tokens: int, pad_token_id: int) -> Speed:
    """Greedy `generate` with the KV cache: prefill latency and decode throughput."""
    import torch

    device = next(model.parameters()).device
    inputs = torch.tensor([prompt_ids], device=device)

    def timed(n: int) -> float:
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        with torch.no_grad():
            model.generate(inputs, attention_mask=torch.ones_like(inputs), max_new_tokens=n, min_new_tokens=n,
                           do_sample=False, use_cache=True, pad_token_id=pad_token_id)
        if device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - start

    timed(2)  # warm-up: first calls build kernels and caches
    first = timed(1)
    full = timed(new_tokens + 1)
    per_token = max(full - first, 1e-9) / new_tokens
    return Speed(first * 1000, 1 / per_token, len(prompt_ids), new_tokens)
