"""Measurements: perplexity, weight storage, peak memory, prefill latency, decode speed.

Perplexity is the exponential of the mean negative log-likelihood per scored token.
The sliding-window recipe in the transformers docs counts tokens wrongly (one per window
after the first) and leaves models that expect a BOS token without one; here every
token is scored exactly once, a BOS is put at each window start when the tokenizer adds
one, and the protocol (text, window, step, tokens scored) travels with the number,
because perplexities measured under different protocols are not comparable.
"""

from __future__ import annotations

import math
import statistics
import threading
import time
import weakref
from dataclasses import asdict, dataclass
from typing import Callable, Iterable

from .allocator import LARGE_BLOCK_BYTES
from .errors import WorkbenchError

MIN_DECODE_TOKENS = 8
"""Fewer new tokens than this and the decode time is mostly timer noise (1 token gave 1e9 tok/s)."""
MIN_DECODE_SECONDS = 0.5
MIN_DECODE_REPEATS = 3
MAX_DECODE_REPEATS = 20


LOGITS_CHUNK_ELEMENTS = 2**24
"""Logits computed at once when scoring (64 MB in fp32): the full batch's logits (4 x 512 x 49,152 fp32
= 400 MB, and as much again for their log-softmax) dominated the peak memory of every method. Not
smaller: the output head on 85-row chunks (16 MB) took 2.5 s where one product took 1.5 s, on
341-row chunks 1.7 s (2,048 positions of SmolLM2's head, 2 CPU cores)."""


def nll_sum(logits, labels, divergence=None) -> tuple[float, int]:
    """Summed next-token negative log-likelihood (nats) and the number of tokens scored, from full logits.

    `logits[:, t]` predicts token `t + 1`, so both are shifted; positions labelled -100 are
    not scored; log-probabilities are taken in fp32 whatever the model's dtype. `divergence`
    (a `divergence.Divergence`) also gets each scored position's log-probabilities."""
    targets = labels[:, 1:]
    scored = targets != -100
    return _score_rows(logits[:, :-1][scored], targets[scored], divergence)


def model_nll_sum(model, input_ids, labels, attention_mask=None, divergence=None) -> tuple[float, int]:
    """`nll_sum` of the model's logits on `input_ids`, without holding the whole batch's logits:
    the output head runs on the scored positions only, LOGITS_CHUNK_ELEMENTS logits at a time.
    The one scoring kernel of the workbench: perplexity, its KL against the reference
    (`divergence`, chunk by chunk in the same pass) and fine-tuning's held-out loss use it.

    Models whose logits are not simply the head applied to the decoder's last hidden state
    (logit scaling or soft-capping) are found by `_plain_head` and scored from full logits."""
    parts = _plain_head(model, input_ids, attention_mask)
    if parts is None:
        return nll_sum(model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits, labels, divergence)
    decoder, head = parts
    hidden = decoder(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)[0]
    targets = labels[:, 1:]
    scored = targets != -100
    return _score_rows(hidden[:, :-1][scored], targets[scored], divergence, head)


def _score_rows(rows, targets, divergence=None, head=None) -> tuple[float, int]:
    """Summed NLL of `targets` over `rows` (logits, or hidden states when `head` is given),
    LOGITS_CHUNK_ELEMENTS logits at a time, into one buffer reused from chunk to chunk: on CPU a
    fresh 64 MB block costs its page faults every time (head and loss on 2,048 positions of
    SmolLM2, 2 cores: 1.03 s in fresh blocks, 0.86 s reusing them; the head alone as one
    product 0.82 s). A plain head writes its logits into the buffer and the log-softmax
    overwrites them there (eight windows of 512: 2.4% faster than into a second buffer, and
    64 MB less). With gradients on, fresh blocks. The log-softmax is shared with the KL
    (`divergence`)."""
    import torch

    vocab = head.out_features if head is not None else rows.shape[-1]
    step = max(1, min(LOGITS_CHUNK_ELEMENTS // vocab, len(targets)))
    reuse = not torch.is_grad_enabled()  # every caller scores under no_grad; autograd would keep the blocks
    buffer = torch.empty(step, vocab, dtype=torch.float32, device=rows.device) if reuse else None
    head_into_buffer = reuse and _plain_linear_on_cpu(head, rows)
    total = 0.0
    for start in range(0, len(targets), step):
        chunk, chunk_targets = rows[start:start + step], targets[start:start + step]
        n = len(chunk_targets)
        if head_into_buffer:
            logits = torch.matmul(chunk, head.weight.t(), out=buffer[:n])
        else:
            logits = (head(chunk) if head is not None else chunk).float()
        chunk_logp = torch.log_softmax(logits, dim=-1, out=buffer[:n]) if reuse else torch.log_softmax(logits, dim=-1)
        total -= chunk_logp.gather(1, chunk_targets[:, None]).sum().item()
        if divergence is not None:
            divergence.add(chunk_logp, chunk_targets)
    return total, len(targets)


def _plain_linear_on_cpu(head, rows) -> bool:
    """Whether `head(rows)` is exactly `rows @ head.weight.T` in fp32 on the CPU (a plain
    `nn.Linear`, no bias, no hooks), so that it can be written into a reused buffer."""
    import torch

    return (type(head) is torch.nn.Linear and head.bias is None and rows.device.type == "cpu"
            and head.weight.dtype == rows.dtype == torch.float32 and head.weight.device.type == "cpu"
            and not (head._forward_hooks or head._forward_pre_hooks or hasattr(head, "_hf_hook")))


_HEAD_CHECKED: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def _plain_head(model, input_ids, attention_mask):
    """(decoder, head) when the model's logits are `head(decoder(...)[0])`, checked once per model
    on the first 16 tokens of the first row; None otherwise."""
    if model not in _HEAD_CHECKED:
        _HEAD_CHECKED[model] = _check_plain_head(model, input_ids[:1, :16],
                                                 None if attention_mask is None else attention_mask[:1, :16])
    return _HEAD_CHECKED[model]


def _check_plain_head(model, ids, mask):
    import torch

    get_decoder, get_head = getattr(model, "get_decoder", None), getattr(model, "get_output_embeddings", None)
    if get_decoder is None or get_head is None:
        return None
    decoder, head = get_decoder(), get_head()
    if decoder is None or not hasattr(head, "out_features"):
        return None
    full = model(input_ids=ids, attention_mask=mask).logits.float()
    split = head(decoder(input_ids=ids, attention_mask=mask)[0]).float()
    if split.shape != full.shape:
        return None
    tolerance = 1e-2 * full.abs().max().item() + 1e-4  # same arithmetic; only a different matmul shape
    return (decoder, head) if torch.isfinite(split).all() and (split - full).abs().max().item() <= tolerance else None


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
               bos_token_id: int | None = None, progress: Callable[[int, int], None] | None = None,
               divergence=None) -> Perplexity:
    """Sliding-window perplexity of `model` on `token_ids`, batched over equal-length windows.
    `divergence` (a `divergence.Divergence`) collects KL against the reference in the same pass;
    the windows fix the order of the scored tokens, so two runs with one protocol line up.

    A non-finite result (a model that overflows or collapsed to NaN) is an error, never a number."""
    import torch

    bos = bos_token_id is not None
    spans, step = windows(len(token_ids), max_length, stride, bos)
    device = next(model.parameters()).device
    total, n_scored, done = 0.0, 0, 0
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
        with torch.no_grad():  # not inference_mode: quanto's kernels fail under it
            nll, count = model_nll_sum(model, inputs, torch.tensor(labels, device=device), divergence=divergence)
        total, n_scored, done = total + nll, n_scored + count, done + len(batch)
        if progress:
            progress(done, len(spans))
    ppl = math.exp(total / n_scored) if math.isfinite(total) and total / n_scored < 700 else math.inf
    if not math.isfinite(ppl):
        raise WorkbenchError(f"perplexity is not finite (mean NLL {total / n_scored:.4g} nats over {n_scored} tokens): "
                             "the quantized model's outputs overflowed or collapsed, so there is no number to report.")
    return Perplexity(ppl, total, n_scored, len(spans), max_length, step, bos)


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

@dataclass(frozen=True)
class Storage:
    """What a model stores, counted right after quantizing or loading, before any forward
    pass (bitsandbytes repacks 4-bit weights for CPU inference on the first one)."""

    weight_bytes: int
    bits_per_weight: float | None
    """Mean stored bits per block-linear weight (scales, zeros and adapters included)."""
    kernel: str


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
    from .models import block_linears

    layers = block_linears(model)
    bits = sum(8 * _unique_bytes(_module_tensors(m, side_tensors, skip_bias=True)) for _, m in layers)
    weights = sum(m.out_features * m.in_features for _, m in layers)
    kernel = type(layers[0][1]).__name__ if layers else ""
    return Storage(_unique_bytes(_module_tensors(model, side_tensors)), bits / weights if weights else None, kernel)


# ---------------------------------------------------------------------------- memory

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
    10 ms (plus, in a fresh worker process, the kernel's peak since the process started)."""

    def __init__(self, device: str, whole_process: bool = False, large_blocks_apart: bool = False):
        self.device, self.whole_process = device, whole_process
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


# ---------------------------------------------------------------------------- warm-up

def warm_up(model, prompt_ids: list[int]) -> float:
    """One forward pass on `prompt_ids` before anything is measured; returns its seconds.

    Backends prepare their kernels in the first forward pass: gptqmodel repacks its int4
    weights for the CPU kernel there (about 100 MB moved on the bundled model), bitsandbytes
    its 4-bit weights on CPUs with AVX512-BF16. With that done inside the perplexity pass and
    what it freed left in the heap, rtn's peak memory moved by up to 11% from one fresh worker
    to the next (427-476 MB above the baseline, four workers); with the warm-up, and the freed
    memory handed back before scoring (`runner.measure`), by 1.6% (436-443 MB, five workers).
    The perplexity time no longer includes the repacking either."""
    import torch

    device = next(model.parameters()).device
    inputs = torch.tensor([prompt_ids], device=device)
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    with torch.no_grad():
        model(input_ids=inputs, attention_mask=torch.ones_like(inputs), use_cache=False)
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start


# ---------------------------------------------------------------------------- speed

@dataclass(frozen=True)
class Speed:
    prefill_ms: float
    """Time to the first new token for the prompt (one forward pass + sampling), median."""
    decode_tokens_per_s: float
    """New tokens per second after the first, greedy, KV cache on, batch 1: the median repetition."""
    decode_spread: float
    """max / min decode rate over the repetitions (1.0 = perfectly steady)."""
    repeats: int
    prompt_tokens: int
    new_tokens: int


def decode_speed(model, prompt_ids: list[int], new_tokens: int, pad_token_id: int) -> Speed:
    """Greedy `generate` with the KV cache, repeated until at least MIN_DECODE_SECONDS of
    decoding and MIN_DECODE_REPEATS runs are measured; each token's arrival is timed
    inside the one `generate` call, so prefill and decode come from the same run."""
    import torch
    from transformers import StoppingCriteria, StoppingCriteriaList

    if new_tokens < MIN_DECODE_TOKENS:
        raise WorkbenchError(f"decode tokens: {new_tokens} is too few to time; use at least {MIN_DECODE_TOKENS} (or 0 to skip the speed measurement).")
    device = next(model.parameters()).device
    inputs = torch.tensor([prompt_ids], device=device)

    class Arrivals(StoppingCriteria):
        """Called once per generated token: records when each one is ready."""

        def __init__(self):
            self.times = []

        def __call__(self, input_ids, scores, **kwargs):
            if device.type == "cuda":
                torch.cuda.synchronize()
            self.times.append(time.perf_counter())
            return torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)

    def run(n: int) -> tuple[float, float]:
        arrivals = Arrivals()
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        with torch.no_grad():
            model.generate(inputs, attention_mask=torch.ones_like(inputs), max_new_tokens=n, min_new_tokens=n,
                           do_sample=False, use_cache=True, pad_token_id=pad_token_id,
                           stopping_criteria=StoppingCriteriaList([arrivals]))
        first, last = arrivals.times[0], arrivals.times[-1]
        return first - start, last - first

    run(2)  # warm-up: first calls build kernels and caches
    prefill, decode = [], []
    while len(decode) < MAX_DECODE_REPEATS and (len(decode) < MIN_DECODE_REPEATS or sum(decode) < MIN_DECODE_SECONDS):
        first, rest = run(new_tokens + 1)
        prefill.append(first)
        decode.append(rest)
    rates = [new_tokens / max(seconds, 1e-9) for seconds in decode]
    return Speed(statistics.median(prefill) * 1000, statistics.median(rates), max(rates) / min(rates), len(rates),
                 len(prompt_ids), new_tokens)
