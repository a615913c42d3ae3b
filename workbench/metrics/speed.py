"""Speed: the warm-up forward pass before measuring, and greedy decode speed (batch 1, KV cache on)."""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass

from workbench.core.errors import WorkbenchError

MIN_DECODE_TOKENS = 8
"""Fewer new tokens than this and the decode time is mostly timer noise (1 token gave 1e9 tok/s)."""
MIN_DECODE_SECONDS = 0.5
MIN_DECODE_REPEATS = 3
MAX_DECODE_REPEATS = 20


def warm_up(model, prompt_ids: list[int]) -> float:
    """One forward pass on `prompt_ids` before anything is measured; returns its seconds.

    Backends prepare their kernels in the first forward pass: gptqmodel repacks its int4
    weights for the CPU kernel there, bitsandbytes its 4-bit weights on CPUs with AVX512-BF16.
    Done inside the perplexity pass, with what it freed left in the heap, that work made the
    peak memory of one method vary from one fresh worker to the next; after the warm-up, with
    the freed memory handed back before scoring (`runner.measure`), it stays nearly the same.
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

    def result_fields(self) -> dict:
        """The `Result` fields this metric fills."""
        return {
            "prefill_ms": self.prefill_ms,
            "decode_tokens_per_s": self.decode_tokens_per_s,
            "decode_spread": self.decode_spread,
            "decode_repeats": self.repeats,
        }


def decode_speed(model, prompt_ids: list[int], new_tokens: int, pad_token_id: int) -> Speed:
    """Greedy `generate` with the KV cache, repeated until at least MIN_DECODE_SECONDS of
    decoding and MIN_DECODE_REPEATS runs are measured; each token's arrival is timed
    inside the one `generate` call, so prefill and decode come from the same run."""
    import torch
    from transformers import StoppingCriteria, StoppingCriteriaList

    if new_tokens < MIN_DECODE_TOKENS:
        raise WorkbenchError(
            f"decode tokens: {new_tokens} is too few to time; use at least {MIN_DECODE_TOKENS} (or 0 to skip the speed measurement)."
        )
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
            model.generate(
                inputs,
                attention_mask=torch.ones_like(inputs),
                max_new_tokens=n,
                min_new_tokens=n,
                do_sample=False,
                use_cache=True,
                pad_token_id=pad_token_id,
                stopping_criteria=StoppingCriteriaList([arrivals]),
            )
        first, last = arrivals.times[0], arrivals.times[-1]
        return first - start, last - first

    if hasattr(model, "timed_greedy"):  # a runtime outside torch (llama.cpp) times its own decoding
        run = lambda n: model.timed_greedy(prompt_ids, n)  # noqa: E731
    run(2)  # warm-up: first calls build kernels and caches
    prefill, decode = [], []
    while len(decode) < MAX_DECODE_REPEATS and (len(decode) < MIN_DECODE_REPEATS or sum(decode) < MIN_DECODE_SECONDS):
        first, rest = run(new_tokens + 1)
        prefill.append(first)
        decode.append(rest)
    rates = [new_tokens / max(seconds, 1e-9) for seconds in decode]
    return Speed(
        statistics.median(prefill) * 1000,
        statistics.median(rates),
        max(rates) / min(rates),
        len(rates),
        len(prompt_ids),
        new_tokens,
    )
