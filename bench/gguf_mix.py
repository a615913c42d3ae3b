"""Benchmark (g): the map-guided GGUF mix against llama.cpp's own mix at equal bytes (goal: lower mean KL).

For each file type: llama.cpp's own file (`gguf`), the same types with an importance matrix
(`gguf-imat`), and the map-guided mix at the bytes llama.cpp's file spends on block tensors
(`gguf-map`), each measured in llama.cpp's runtime on the same windows against fp32, in fresh
workers. Prints each row's bytes and KL, and KL(map mix) / KL(llama.cpp's mix) per type (goal < 1).
Run: .venv/bin/python bench/gguf_mix.py [--model bundled] [--types Q4_K_M,Q3_K_M] [--tokens 2048]
"""

from __future__ import annotations

import argparse

from workbench.core.config import EvalConfig, ModelSpec
from workbench.run import runner
from workbench.run.compare import compare

import record

MB = 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="bundled")
    parser.add_argument("--types", default="Q4_K_M,Q3_K_M")
    parser.add_argument("--tokens", type=int, default=2048)
    args = parser.parse_args()
    types = [t.strip() for t in args.types.split(",") if t.strip()]
    session = runner.Session.open(
        ModelSpec(args.model, device="cpu"), EvalConfig(max_tokens=args.tokens, decode_tokens=0)
    )
    choices = ["fp32"] + [f"{method}:type={t}" for t in types for method in ("gguf", "gguf-imat", "gguf-map")]
    results = dict(zip(choices, compare(session, choices, log=print)))
    failed = {choice: r.error for choice, r in results.items() if r.error}
    if failed:
        raise SystemExit(f"failed: {failed}")
    rows, summary = [], {}
    for choice, r in results.items():
        rows.append(
            {
                "row": choice,
                "weight MB": round(r.weight_bytes / MB, 2),
                "KL mean (nats)": round(r.kl_mean, 5),
                "top-1 same %": round(100 * r.top1_agreement, 1),
                "perplexity": round(r.ppl, 3),
            }
        )
        print(
            f"{choice:28} {r.weight_bytes / MB:8.2f} MB  KL {r.kl_mean:.5f}  top-1 {100 * r.top1_agreement:5.1f}%  ppl {r.ppl:.3f}"
        )
    for t in types:
        own, mixed = results[f"gguf:type={t}"], results[f"gguf-map:type={t}"]
        ratio = mixed.kl_mean / own.kl_mean
        summary[f"KL map mix / llama.cpp {t} (x)"] = record.goal(round(ratio, 3), "< 1")
        summary[f"bytes map mix / llama.cpp {t} (x)"] = round(mixed.weight_bytes / own.weight_bytes, 4)
        print(
            f"{t}: KL(map mix) / KL(llama.cpp's mix) = {ratio:.3f} at {mixed.weight_bytes / own.weight_bytes:.4f}x the bytes"
        )
    notes = [f"{args.tokens} tokens of the offline evaluation text; map on 512 calibration tokens; llama.cpp runtime."]
    record.save("gguf_mix", summary, rows, notes)


if __name__ == "__main__":
    main()
