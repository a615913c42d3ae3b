"""optimum-quanto (formerly `quanto`): weight-only int8 / int4 / int2 / float8, round to nearest.

No calibration. int4 and int2 compile a C++ extension on first use (40-60 s, needs g++
and ninja). transformers cannot save it; optimum-quanto's QuantizedModelForCausalLM can.
"""

from __future__ import annotations

from workbench.methods.base import Method, compute_bits, per_group_bits
from workbench.sources import models

PIP = "pip install optimum-quanto==0.2.7"
DROPS_ADAPTER = (
    "PEFT's merge into an optimum-quanto model silently drops the adapter (the held-out loss returns "
    "to the base's, measured); serve the base with the adapter attached, or train on a bitsandbytes base "
    "(bnb-nf4) to merge"
)


def _quanto(weights: str, bits: int, summary: str) -> Method:
    def quantize(request):
        from optimum import quanto

        model = models.load_model(request.source, request.device)
        quanto.quantize(model, weights=getattr(quanto, f"q{weights}"), exclude="lm_head")
        quanto.freeze(model)
        return model

    def save(model, folder):
        from optimum.quanto import QuantizedModelForCausalLM

        QuantizedModelForCausalLM(model).save_pretrained(folder)

    def reload(folder, request):
        from optimum.quanto import QuantizedModelForCausalLM

        return QuantizedModelForCausalLM.from_pretrained(
            str(folder), trust_remote_code=request.source.trust_remote_code
        )._wrapped.to(request.device)

    def storage(method, params, device):
        """int8/float8: one scale per row; int4/int2: per group of 64 a scale in the compute dtype and an
        8-bit zero point (int2 with fp32 compute: 2 + 40/64 = 2.625 bits per weight)."""
        overhead = per_group_bits(64, compute_bits(device) + 8) if bits < 8 else per_group_bits(-1, 32)
        return bits + overhead, compute_bits(device)

    limits = ("Merging a LoRA adapter into it silently drops the adapter: do not merge.",)
    if bits < 8:
        limits += ("First use compiles a C++ extension (40-60 s; needs g++ and ninja).",)
    return Method(
        name=f"quanto-{weights}",
        family="quanto",
        bits=bits,
        summary=summary,
        quantize=quantize,
        save=save,
        reload=reload,
        backend="optimum.quanto",
        pip=PIP,
        trainable=True,
        kernel="quanto",
        limits=limits,
        storage=storage,
        merge_refusal=DROPS_ADAPTER,
    )


METHODS = (
    _quanto("int8", 8, "int8 weights, one scale per output row."),
    _quanto("int4", 4, "int4 weights in groups of 128 (round to nearest, with zero point)."),
    _quanto("int2", 2, "int2 weights: shows how far plain rounding can go before the model collapses."),
    _quanto("float8", 8, "float8 (e4m3) weights."),
)
