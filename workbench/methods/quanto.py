"""optimum-quanto (formerly `quanto`): weight-only int8 / int4 / int2 / float8, round to nearest.

No calibration. int4 and int2 compile a C++ extension on first use (40-60 s, needs g++
and ninja). transformers cannot save it; optimum-quanto's QuantizedModelForCausalLM can.
"""

from __future__ import annotations

from .. import models
from . import register
from .base import Method

PIP = "pip install optimum-quanto==0.2.7"


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

        return QuantizedModelForCausalLM.from_pretrained(str(folder))._wrapped.to(request.device)

    limits = ("Merging a LoRA adapter into it silently drops the adapter: do not merge.",)
    if bits < 8:
        limits += ("First use compiles a C++ extension (40-60 s; needs g++ and ninja).",)
    return Method(name=f"quanto-{weights}", family="quanto", bits=bits, summary=summary, quantize=quantize, save=save,
                  reload=reload, backend="optimum.quanto", pip=PIP, trainable=True, kernel="quanto", limits=limits)


register(_quanto("int8", 8, "int8 weights, one scale per output row."))
register(_quanto("int4", 4, "int4 weights in groups of 128 (round to nearest, with zero point)."))
register(_quanto("int2", 2, "int2 weights: shows how far plain rounding can go before the model collapses."))
register(_quanto("float8", 8, "float8 (e4m3) weights."))
