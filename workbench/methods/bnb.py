"""bitsandbytes: 8-bit (LLM.int8 with outlier decomposition) and 4-bit (NF4 / FP4).

Quantizes at load time, no calibration. On CPU the compute dtype must be fp32 (bf16
matmuls are 10-15x slower there). The 4-bit variants are the base of QLoRA.
"""

from __future__ import annotations

from .. import models
from . import register
from .base import Method, Param

PIP = "pip install bitsandbytes==0.50.2"


def _int8_config(params: dict, device: str):
    from transformers import BitsAndBytesConfig

    skip = [name.strip() for name in params["skip_modules"].split(",") if name.strip()]
    return BitsAndBytesConfig(load_in_8bit=True, llm_int8_threshold=params["threshold"], llm_int8_skip_modules=skip or None)


def _4bit_config(quant_type: str):
    def config(params: dict, device: str):
        import torch
        from transformers import BitsAndBytesConfig

        compute = models.compute_dtype(device) if params["compute_dtype"] == "auto" else getattr(torch, params["compute_dtype"])
        return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=quant_type,
                                  bnb_4bit_use_double_quant=params["double_quant"], bnb_4bit_compute_dtype=compute)

    return config


def _bnb(name: str, bits: int, summary: str, make_config, params: tuple[Param, ...]) -> Method:
    def load(source, request):
        return models.load_model(source, request.device, quantization_config=make_config(request.params, request.device))

    return Method(
        name=name, family="bitsandbytes", bits=bits, summary=summary, params=params, backend="bitsandbytes", pip=PIP,
        trainable=True, kernel="bitsandbytes",
        quantize=lambda request: load(request.source, request),
        save=lambda model, folder: model.save_pretrained(folder),
        reload=lambda folder, request: load(models.ModelSource(name, str(folder)), request),
    )


COMPUTE = Param("compute_dtype", "auto", "dtype of the matmuls: auto = fp32 on CPU, bf16/fp16 on GPU.", ("auto", "float32", "bfloat16", "float16"))
DOUBLE_QUANT = Param("double_quant", True, "Quantize the per-block scales too (saves ~0.4 bits per weight).")

register(_bnb("bnb-int8", 8, "LLM.int8(): int8 weights, outlier features kept in 16-bit.", _int8_config, (
    Param("threshold", 6.0, "Activation magnitude above which a feature is treated as an outlier and kept in 16-bit.", minimum=0.0),
    Param("skip_modules", "lm_head", "Comma-separated module names left unquantized."),
)))
register(_bnb("bnb-nf4", 4, "4-bit NormalFloat blocks of 64: levels placed for normally distributed weights (QLoRA).",
              _4bit_config("nf4"), (DOUBLE_QUANT, COMPUTE)))
register(_bnb("bnb-fp4", 4, "4-bit float blocks of 64: evenly spaced exponents, usually worse than NF4.",
              _4bit_config("fp4"), (DOUBLE_QUANT, COMPUTE)))
