"""Benchmark (b): quantize + evaluate through the workbench vs the same steps done directly.

For each method, the direct path calls the libraries by hand (transformers +
bitsandbytes, or hqq) and the reference perplexity loop; the workbench path is
`runner.run_method`, which also measures peak memory and storage. Speed measurement is
switched off on both sides so the same work is timed. Prints both wall times and the ratio.
Run: .venv/bin/python bench/workbench_overhead.py [--tokens 2048]
"""

from __future__ import annotations

import argparse
import time

import torch

from workbench.core.config import EvalConfig, ModelSpec
from workbench.run import runner

import record
from evaluator_speed import plain_loop


def direct_bnb_nf4(folder: str):
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    config = BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=torch.float32,
    )
    return AutoModelForCausalLM.from_pretrained(
        folder, quantization_config=config, dtype=torch.float32, device_map={"": "cpu"}
    )


def direct_hqq(folder: str):
    from hqq.core.quantize import BaseQuantizeConfig
    from hqq.models.hf.base import AutoHQQHFModel
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    AutoHQQHFModel.quantize_model(
        model, quant_config=BaseQuantizeConfig(nbits=4, group_size=64), compute_dtype=torch.float32, device="cpu"
    )
    return model


DIRECT = {"bnb-nf4": direct_bnb_nf4, "hqq": direct_hqq}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=2048)
    args = parser.parse_args()

    session = runner.Session.open(
        ModelSpec("bundled", device="cpu"), EvalConfig(max_tokens=args.tokens, decode_tokens=0), log=lambda m: None
    )
    summary, rows = {}, []
    for name, direct in DIRECT.items():
        start = time.perf_counter()
        ref_ppl, _ = plain_loop(direct(session.source.location), session.eval_ids, 512, session.bos_id)
        direct_s = time.perf_counter() - start

        start = time.perf_counter()
        result = runner.run_method(session, name, log=lambda m: None)
        ours_s = time.perf_counter() - start
        print(
            f"{name:8} direct {direct_s:6.1f} s (ppl {ref_ppl:.3f})   workbench {ours_s:6.1f} s (ppl {result.ppl:.3f})   "
            f"ratio workbench / direct: {ours_s / direct_s:.2f}x"
        )
        summary[f"{name}: ratio workbench / direct wall time (x)"] = round(ours_s / direct_s, 2)
        rows.append(
            {
                "method": name,
                "direct (s)": round(direct_s, 1),
                "direct ppl": round(ref_ppl, 3),
                "workbench (s)": round(ours_s, 1),
                "workbench ppl": round(result.ppl, 3),
            }
        )
    record.save("workbench_overhead", summary, rows, [f"{args.tokens} evaluation tokens"])


if __name__ == "__main__":
    main()
