"""The claims Hugging Face's quantization overview makes, checked against the learner's own results.

The overview is "Overview of natively supported quantization schemes in Transformers"
(Hugging Face blog, 2023; shared/reference/000_*.txt). Only claims the blog itself makes,
and that one comparison on this workbench can test, are listed: each quotes the blog's
words, names its section, and names the methods it is about by registry name and
parameters (a 2-bit GPTQ claim is checked with `gptq` at bits=2, never with another
method). Each row says "holds", "does not hold" or "not measured"; a row that is not
measured names the exact method string to add, and never one that was measured.

The blog's figures come from GPUs (A100, T4, Titan RTX): a speed claim measured here on a
CPU compares other kernels, so every row says on which device its figures were measured.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from workbench.run.results import MB, Result, baseline_of

SOURCE = "Hugging Face blog (2023): Overview of natively supported quantization schemes in Transformers"

MINIMAL_DEGRADATION_PCT = 5.0
""""Minimal degradation": perplexity at most this many percent above the baseline. The blog's own
4-bit drops were 1.7 to 3.0 % of the Open LLM leaderboard average (its "Performance degradation"
tables); perplexity is another measure, so the bar is stated in every row it is used in."""
SEVERE_FACTOR = 2.0
""""Severe quality degradation": perplexity at least this many times the baseline's."""
MEMORY_SHARE = 0.5
""""Great for reducing memory": 4-bit weights take at most this share of the baseline's."""

HOLDS, FAILS, NOT_MEASURED = "holds", "does not hold", "not measured"
BASELINE_ASK = "fp32"
"""What to add when no full-precision baseline was measured."""


@dataclass(frozen=True)
class Wanted:
    """A method a claim is about: its registry name and the parameters that must match."""

    method: str
    params: tuple[tuple[str, object], ...] = ()
    ask: str = ""
    """The method string to add in the picker (or to `--methods`); the name when empty."""

    @property
    def method_string(self) -> str:
        return self.ask or self.method

    def find(self, results: list[Result]) -> Result | None:
        """The first successful result of this method with these parameters (no adapters), else the
        first failed one (so that its error is shown instead of asking for it again), else None."""
        matches = [
            r
            for r in results
            if r.method == self.method
            and not r.adapter
            and all(r.params.get(key) == value for key, value in self.params)
        ]
        return next((r for r in matches if r.error is None), matches[0] if matches else None)


@dataclass(frozen=True)
class Metric:
    name: str
    unit: str
    value: Callable[[Result], float | None]
    in_percent: bool = False
    """Show the subject against the reference as a percent change (else as a ratio)."""

    def compared(self, a: float, b: float) -> str:
        return f"{100 * (a / b - 1):+.1f} %" if self.in_percent else f"{a / b:.2g} x"


PERPLEXITY = Metric("perplexity", "ppl", lambda r: r.ppl, in_percent=True)
DECODE = Metric("decode speed", "tok/s", lambda r: r.decode_tokens_per_s)
PREPARE = Metric("load + quantize time", "s", lambda r: r.load_s)
WEIGHTS = Metric("weight memory", "MB", lambda r: r.weight_bytes / MB if r.weight_bytes else None)


def _task_average(result: Result) -> float | None:
    """The mean of the row's task scores in percent, as the leaderboard averages its tasks; None without tasks."""
    scores = [score["value"] for score in (result.tasks or {}).values()]
    return 100 * sum(scores) / len(scores) if scores else None


TASK_ACCURACY = Metric("task accuracy (mean over the tasks run)", "%", _task_average, in_percent=True)


@dataclass(frozen=True)
class Claim:
    words: str
    """The blog's words, quoted briefly."""
    section: str
    blog_device: str
    """Where the blog's own figures came from."""
    subject: Wanted
    reference: Wanted | None
    """None: the measured full-precision baseline (`results.baseline_of`)."""
    metric: Metric
    holds: Callable[[float, float], bool]
    """(subject's value, reference's value) -> does the claim hold."""
    bar: str
    """The threshold in words, shown in the table."""


BNB_INT8 = Wanted("bnb-int8")
BNB_NF4 = Wanted("bnb-nf4")
GPTQ_4BIT = Wanted("gptq", (("bits", 4),), "gptq:bits=4")
GPTQ_2BIT = Wanted("gptq", (("bits", 2),), "gptq:bits=2")
WITHIN_MINIMAL = f"perplexity at most {MINIMAL_DEGRADATION_PCT:g} % above the baseline"
ACCURACY_WITHIN_MINIMAL = (
    f"task accuracy at most {MINIMAL_DEGRADATION_PCT:g} % below the baseline's (run tasks: --tasks, or TASKS in "
    "notebook 02; a difference within two standard errors, shown in the table, is noise)"
)


def _within_minimal(value: float, baseline: float) -> bool:
    return value <= baseline * (1 + MINIMAL_DEGRADATION_PCT / 100)


def _accuracy_within_minimal(value: float, baseline: float) -> bool:
    return value >= baseline * (1 - MINIMAL_DEGRADATION_PCT / 100)


CLAIMS = (
    Claim(
        '"users can benefit from bitsandbytes quantization straight out of the box with minimal performance degradation"',
        "What are the benefits of bitsandbytes? (easy)",
        "no figures given",
        BNB_INT8,
        None,
        PERPLEXITY,
        _within_minimal,
        WITHIN_MINIMAL,
    ),
    Claim(
        '4-bit on Llama-2 7B and 13B: "the degradation is minimal!" (it adds: "less degradation in bigger models")',
        "Performance degradation",
        "Open LLM leaderboard scores",
        BNB_NF4,
        None,
        PERPLEXITY,
        _within_minimal,
        WITHIN_MINIMAL,
    ),
    Claim(
        'the same, for GPTQ 4-bit: "the degradation is minimal!"',
        "Performance degradation",
        "Open LLM leaderboard scores",
        GPTQ_4BIT,
        None,
        PERPLEXITY,
        _within_minimal,
        WITHIN_MINIMAL,
    ),
    *(
        Claim(
            f'4-bit {name} on Llama-2: "the degradation is minimal!", in the blog as the Open LLM leaderboard\'s '
            "average task accuracy",
            "Performance degradation",
            "Open LLM leaderboard scores (4-bit drops of 1.7 to 3.0 %)",
            wanted,
            None,
            TASK_ACCURACY,
            _accuracy_within_minimal,
            ACCURACY_WITHIN_MINIMAL,
        )
        for name, wanted in (("bitsandbytes", BNB_NF4), ("GPTQ", GPTQ_4BIT))
    ),
    Claim(
        '"GPTQ quantized models are fast compared to bitsandbytes quantized models for text generation"',
        "What are the benefits of autoGPTQ? / Generate speed",
        "A100, T4 and Titan RTX GPUs",
        GPTQ_4BIT,
        BNB_NF4,
        DECODE,
        lambda gptq, bnb: gptq > bnb,
        "GPTQ 4-bit decodes more tokens/s than bitsandbytes NF4",
    ),
    Claim(
        'GPTQ needs "a calibration dataset" and "can take several hours to quantize"; bitsandbytes quantizes '
        '"on model load, no need to run any post-processing or preparation step"',
        "Known limitations of autoGPTQ / benefits of bitsandbytes",
        "GPUs (4 GPU hours for a 175B model, GPTQ paper)",
        GPTQ_4BIT,
        BNB_NF4,
        PREPARE,
        lambda gptq, bnb: gptq > bnb,
        "GPTQ takes longer to load and quantize than bitsandbytes NF4",
    ),
    Claim(
        '"The GPTQ algorithm makes it possible to quantize models up to 2 bits! However, this might come with severe '
        'quality degradation."',
        "What are the benefits of autoGPTQ? (n-bit support)",
        "no figures given",
        GPTQ_2BIT,
        None,
        PERPLEXITY,
        lambda value, baseline: value >= SEVERE_FACTOR * baseline,
        f"severe: perplexity at least {SEVERE_FACTOR:g} x the baseline",
    ),
    Claim(
        '"Quantization is great for reducing memory consumption"',
        "Performance degradation",
        "A100 (Llama-2-13b: 29.2 GB fp16, 11.0 GB bitsandbytes 4-bit peak)",
        BNB_NF4,
        None,
        WEIGHTS,
        lambda value, baseline: value <= MEMORY_SHARE * baseline,
        f"4-bit weights at most {MEMORY_SHARE:.0%} of the baseline's weight memory",
    ),
)


def _verdict(claim: Claim, results: list[Result]) -> tuple[str, str]:
    """(verdict, the measured figures and their device, or what to add) of one claim on these results."""
    subject = claim.subject.find(results)
    reference = claim.reference.find(results) if claim.reference else baseline_of(results)
    reference_ask = claim.reference.method_string if claim.reference else BASELINE_ASK
    missing = [
        ask for found, ask in ((subject, claim.subject.method_string), (reference, reference_ask)) if found is None
    ]
    failed = [
        f"{r.label} failed here: {r.error.splitlines()[0][:120]}"
        for r in (subject, reference)
        if r is not None and r.error
    ]
    if missing or failed:
        added = f"add {' and '.join(missing)} in the method picker, then Compare" if missing else ""
        return NOT_MEASURED, "; ".join(failed + ([added] if added else []))
    a, b = claim.metric.value(subject), claim.metric.value(reference)
    if a is None or b is None:
        return (NOT_MEASURED, f"no {claim.metric.name} recorded for {subject.label if a is None else reference.label}")
    devices = " and ".join(sorted({subject.device, reference.device}))
    figures = f"{subject.label} {a:.3g} vs {reference.label} {b:.3g} {claim.metric.unit} ({claim.metric.compared(a, b)}), on {devices}"
    return (HOLDS if claim.holds(a, b) else FAILS), figures


def check(results: list[Result]) -> list[dict]:
    """One row per claim: the blog's words and section, the bar, the verdict, the figures (with their
    device) and what the blog's own figures came from."""
    rows = []
    for claim in CLAIMS:
        verdict, figures = _verdict(claim, results)
        rows.append(
            {
                "the overview says (section)": f"{claim.words} ({claim.section})",
                "checked with": claim.subject.method_string,
                "holds when": claim.bar,
                "verdict": verdict,
                "measured here": figures,
                "the blog measured on": claim.blog_device,
            }
        )
    return rows
