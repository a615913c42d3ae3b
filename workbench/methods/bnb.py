"""bitsandbytes: 8-bit (LLM.int8 with outlier decomposition) and 4-bit (NF4 / FP4).

Quantizes at load time, no calibration. On CPU the compute dtype must be fp32 (bf16
matmuls are 10-15x slower there). The 4-bit variants are the base of QLoRA; training
on them goes through `bnb_training.prepare_for_training`, which keeps bitsandbytes'
CPU repacking off (after it, no gradient flows through the 4-bit layers).
"""

from __future__ import annotations

from workbench.methods.base import Method, Param, compute_bits
from workbench.methods.bnb_training import prepare_for_training
from workbench.sources import models

PIP = "pip install bitsandbytes==0.50.2"


def _int8_config(params: dict, device: str):
    from transformers import BitsAndBytesConfig

    skip = [name.strip() for name in params["skip_modules"].split(",") if name.strip()]
    return BitsAndBytesConfig(
        load_in_8bit=True, llm_int8_threshold=params["threshold"], llm_int8_skip_modules=skip or None
    )


def _4bit_config(quant_type: str):
    def config(params: dict, device: str):
        import torch
        from transformers import BitsAndBytesConfig

        compute = (
            models.compute_dtype(device)
            if params["compute_dtype"] == "auto"
            else getattr(torch, params["compute_dtype"])
        )
        return BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type=quant_type,
            bnb_4bit_use_double_quant=params["double_quant"],
            bnb_4bit_compute_dtype=compute,
        )

    return config


def side_tensors(module):
    """The 4-bit quant state (absmax, code; a second nested state with double quantization)
    and the 8-bit row scales live on the weight, outside parameters and buffers."""
    import torch

    weight = getattr(module, "weight", None)
    state = getattr(weight, "quant_state", None)
    while state is not None:
        yield from (v for v in vars(state).values() if isinstance(v, torch.Tensor))
        state = getattr(state, "state2", None)
    scb = getattr(weight, "SCB", None)
    if isinstance(scb, torch.Tensor):
        yield scb


def _int8_storage(method, params, device):
    """int8 weights plus one fp32 scale per output row (32 bits over a row of ~1k weights)."""
    return 8 + 32 / 576, compute_bits(device)


def _4bit_storage(method, params, device):
    """Blocks of 64 with an fp32 absmax (+0.5 bits), or with double quantization an 8-bit
    absmax re-scaled by an fp32 per 256 blocks (+0.127 bits)."""
    extra = 8 / 64 + 32 / (64 * 256) if params["double_quant"] else 32 / 64
    return 4 + extra, compute_bits(device)


def bnb_4bit_dequantized(weight, quant_type: str, double_quant: bool):
    """bitsandbytes' quantize_4bit / dequantize_4bit with the settings transformers loads
    `bnb-nf4`/`bnb-fp4` with (blocks of 64, fp32 absmax or double-quantized absmax)."""
    import bitsandbytes.functional as F

    packed, state = F.quantize_4bit(
        weight.detach().float().contiguous(), blocksize=64, quant_type=quant_type, compress_statistics=double_quant
    )
    return F.dequantize_4bit(packed, state).reshape(weight.shape).to(weight.dtype)


def _4bit_fake_quantize(quant_type: str):
    return lambda params: lambda w: bnb_4bit_dequantized(w, quant_type, params["double_quant"])


def _bnb(
    name: str, bits: int, summary: str, make_config, params: tuple[Param, ...], storage, fake_quantize=None
) -> Method:
    def load(source, request):
        return models.load_model(
            source, request.device, quantization_config=make_config(request.params, request.device)
        )

    return Method(
        name=name,
        family="bitsandbytes",
        bits=bits,
        summary=summary,
        params=params,
        backend="bitsandbytes",
        pip=PIP,
        trainable=True,
        kernel="bitsandbytes",
        storage=storage,
        side_tensors=side_tensors,
        prepare_for_training=prepare_for_training,
        fake_quantize=fake_quantize,
        quantize=lambda request: load(request.source, request),
        save=lambda model, folder: model.save_pretrained(folder),
        reload=lambda folder, request: load(request.source.saved_copy(folder, name), request),
    )


COMPUTE = Param(
    "compute_dtype",
    "auto",
    "dtype of the matmuls: auto = fp32 on CPU, bf16/fp16 on GPU.",
    ("auto", "float32", "bfloat16", "float16"),
)
DOUBLE_QUANT = Param("double_quant", True, "Quantize the per-block scales too (saves ~0.37 bits per weight).")

METHODS = (
    _bnb(
        "bnb-int8",
        8,
        "LLM.int8(): int8 weights, outlier features kept in 16-bit.",
        _int8_config,
        (
            Param(
                "threshold",
                6.0,
                "Activation magnitude above which a feature is treated as an outlier and kept in 16-bit.",
                minimum=0.0,
            ),
            Param("skip_modules", "lm_head", "Comma-separated module names left unquantized."),
        ),
        _int8_storage,
    ),
    _bnb(
        "bnb-nf4",
        4,
        "4-bit NormalFloat blocks of 64: levels placed for normally distributed weights (QLoRA).",
        _4bit_config("nf4"),
        (DOUBLE_QUANT, COMPUTE),
        _4bit_storage,
        _4bit_fake_quantize("nf4"),
    ),
    _bnb(
        "bnb-fp4",
        4,
        "4-bit float blocks of 64: evenly spaced exponents, usually worse than NF4.",
        _4bit_config("fp4"),
        (DOUBLE_QUANT, COMPUTE),
        _4bit_storage,
        _4bit_fake_quantize("fp4"),
    ),
)
