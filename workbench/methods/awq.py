"""AWQ (activation-aware weight quantization) through gptqmodel, saved and reloaded via transformers.

autoawq is deprecated (adopted by llm-compressor) and transformers cannot quantize AWQ
itself: it only loads AWQ checkpoints. Calibration uses equal-length token blocks:
gptqmodel 7.6 keeps only the last batch when texts differ in length, which ruins AWQ.
"""

from __future__ import annotations

from workbench.methods import awq_clip
from workbench.methods.base import Method, Param
from workbench.methods.gptq import (
    BLOCK_TOKENS,
    GROUP,
    NO_MERGE,
    PIP,
    SAMPLES,
    packed_storage,
    quantize_with_gptqmodel,
    reload_quantized,
    save_checkpoint,
)


def _quantize(request):
    from gptqmodel import QuantizeConfig
    from gptqmodel.quantization import FORMAT, METHOD

    config = QuantizeConfig(
        bits=4,
        group_size=request.params["group_size"],
        sym=not request.params["zero_point"],
        quant_method=METHOD.AWQ,
        format=FORMAT.GEMM,
    )
    with awq_clip.clip_search(request.params["clip_search"]):
        return quantize_with_gptqmodel(request, "awq", config, backend="awq_torch" if request.device == "cpu" else None)


METHODS = (
    Method(
        name="awq",
        family="awq",
        bits=4,
        needs_calibration=True,
        backend="gptqmodel",
        pip=PIP,
        trainable=True,
        summary="AWQ: scales the weight channels that meet large activations before rounding, from calibration data.",
        params=(
            GROUP,
            Param("zero_point", False, "Asymmetric groups with a zero point."),
            SAMPLES,
            BLOCK_TOKENS,
            Param(
                "clip_search",
                "matmul",
                "How the clip range of each group is searched: matmul (exact, about 12x faster on a CPU) or "
                "gptqmodel (its own code, products rounded to bf16); see workbench/methods/awq_clip.py.",
                awq_clip.CHOICES,
            ),
        ),
        quantize=_quantize,
        save=save_checkpoint,
        reload=reload_quantized,
        kernel="gptqmodel",
        storage=packed_storage,
        merge_refusal=NO_MERGE,
        limits=(
            "LoRA adapters train on it but cannot be merged into it.",
            "Slow on CPU: about 2.5 minutes for a 135M model on 2 cores of a CPU with AVX512-BF16, longer without it.",
        ),
    ),
)
