"""Hugging Face's quantization overview (shared/reference, 2023) says things a learner can now
check against their own measurements. Each claim is tested on the results at hand and
reported as holding, not holding, or not measured (with what to add)."""

from __future__ import annotations

from .results import Result

SOURCE = "Hugging Face blog: Overview of natively supported quantization schemes in Transformers"


def _get(results: list[Result], name: str) -> Result | None:
    return next((r for r in results if r.label == name and r.error is None), None)


def _claim(text: str, left: str, right: str, results: list[Result], value, holds) -> dict:
    a, b = _get(results, left), _get(results, right)
    if a is None or b is None or value(a) is None or value(b) is None:
        return {"claim": text, "measured": f"not measured: add {left} and {right}", "holds here": "?"}
    return {"claim": text, "measured": f"{left} {value(a):.3g} vs {right} {value(b):.3g}",
            "holds here": "yes" if holds(value(a), value(b)) else "no"}


def check(results: list[Result]) -> list[dict]:
    """The overview's claims against these results. Its speed numbers were GPU measurements:
    on a CPU the kernels differ and a claim may not hold here."""
    speed, ppl, load = (lambda r: r.decode_tokens_per_s), (lambda r: r.ppl), (lambda r: r.load_s)
    return [
        _claim("GPTQ generates faster than bitsandbytes 4-bit", "gptq", "bnb-nf4", results, speed, lambda a, b: a > b),
        _claim("GPTQ needs calibration and takes longer to prepare", "gptq", "bnb-nf4", results, load, lambda a, b: a > b),
        _claim("8-bit is close to full precision (within 2% perplexity)", "bnb-int8", "fp32", results, ppl, lambda a, b: a <= 1.02 * b),
        _claim("4-bit is a good trade-off: calibrated GPTQ beats plain rounding", "gptq", "rtn", results, ppl, lambda a, b: a < b),
        _claim("2 bits come with severe quality degradation", "quanto-int2", "fp32", results, ppl, lambda a, b: a > 3 * b),
    ]
