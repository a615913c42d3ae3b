"""Benchmark (a): the workbench's perplexity evaluator against a plain reference loop.

Both score the same tokens over the same windows of the offline model; the reference
is the loop most notebooks copy (one `model(input_ids, labels=...)` call per window).
Prints both throughputs, the ratio, and that the two perplexities agree.
Run: .venv/bin/python bench/perplexity_throughput.py [--tokens 4096] [--batch 4]
"""

from __future__ import annotations

import argparse
import math
import time

import torch

from workbench import data, measure, models


def reference_loop(model, ids: list[int], max_length: int) -> tuple[float, int]:
    """Windows of max_length overlapping by one token, batch 1, loss from transformers."""
    nll, count, begin = 0.0, 0, 0
    while begin < len(ids) - 1:
        window = torch.tensor([ids[begin : begin + max_length]])
        labels = window.clone()
        if begin:
            labels[0, 0] = -100
        with torch.no_grad():
            loss = model(input_ids=window, labels=labels).loss.item()
        n = int((labels[0, 1:] != -100).sum())
        nll, count = nll + loss * n, count + n
        begin += max_length - 1
    return math.exp(nll / count), count


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=4096)
    parser.add_argument("--max-length", type=int, default=512)
    parser.add_argument("--batch", type=int, default=4)
    args = parser.parse_args()

    source = models.resolve("bundled")
    tokenizer = models.load_tokenizer(source)
    ids = data.eval_tokens(tokenizer, data.builtin_eval_text(), args.tokens)
    model = models.load_model(source, "cpu")
    measure.perplexity(model, ids[:600], args.max_length, args.max_length)  # warm-up

    start = time.perf_counter()
    ours = measure.perplexity(model, ids, args.max_length, args.max_length, batch_size=args.batch)
    ours_s = time.perf_counter() - start
    start = time.perf_counter()
    ref_ppl, ref_tokens = reference_loop(model, ids, args.max_length)
    ref_s = time.perf_counter() - start

    print(f"tokens scored: workbench {ours.n_tokens}, reference {ref_tokens}")
    print(f"perplexity:    workbench {ours.ppl:.4f}, reference {ref_ppl:.4f} (relative difference {abs(ours.ppl / ref_ppl - 1):.1e})")
    print(f"throughput:    workbench {ours.n_tokens / ours_s:.0f} tok/s ({ours_s:.1f} s, batch {args.batch}), "
          f"reference {ref_tokens / ref_s:.0f} tok/s ({ref_s:.1f} s, batch 1)")
    print(f"ratio workbench / reference: {(ours.n_tokens / ours_s) / (ref_tokens / ref_s):.2f}x")


if __name__ == "__main__":
    main()
