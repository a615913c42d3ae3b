"""Getting a bitsandbytes base ready for LoRA training (QLoRA), so that it learns on every CPU.

Why this is more than PEFT's `prepare_model_for_kbit_training`: bitsandbytes 0.50.2
`Linear4bit.forward` repacks its weights into a CPU inference layout the first time it runs
in eval mode on inputs without grad on a CPU with AVX512-BF16 (`support_avx512bf16_for_cpu`),
and marks `quant_state.packing_format_for_cpu`. It never undoes that, and from then on every
call, in training mode too, goes through `gemv_4bit`, which has no autograd: no gradient
reaches the layers below, and QLoRA barely learns. Evaluating before training (as
`finetune` does) is exactly that first eval pass. So every `Linear4bit` is unpacked (the
inverse conversion `_save_to_state_dict` applies) and its repacking is switched off for good.
Packing keeps the block scales in bf16, so unpacking restores them only to bf16 precision:
guard a model right after loading, before anything evaluates it (as `prepare_base` does).
"""

from __future__ import annotations


def _linear4bit_layers(model) -> list:
    from bitsandbytes.nn import Linear4bit

    return [module for module in model.modules() if isinstance(module, Linear4bit)]


def _is_packed(layer) -> bool:
    return bool(getattr(getattr(layer.weight, "quant_state", None), "packing_format_for_cpu", False))


def guard_cpu_repacking(model) -> None:
    """Undo the CPU inference packing where it was applied and keep `forward` from applying it again."""
    from bitsandbytes.nn.modules import _convert_weight_packed_for_cpu_inverse

    for layer in _linear4bit_layers(model):
        layer.support_avx512bf16_for_cpu = False  # the only switch `Linear4bit.forward` reads before repacking
        if _is_packed(layer):
            layer.weight.data, layer.weight.quant_state = _convert_weight_packed_for_cpu_inverse(
                layer.weight.data, layer.weight.quant_state
            )


def cpu_repacking_guarded(model) -> bool:
    """True when no `Linear4bit` of the model is packed for CPU inference or can be packed later."""
    return all(not layer.support_avx512bf16_for_cpu and not _is_packed(layer) for layer in _linear4bit_layers(model))


def prepare_for_training(model, gradient_checkpointing: bool):
    """PEFT's k-bit preparation (norms/embeddings to fp32, inputs that require grad for
    checkpointing) with the CPU repacking guard on every 4-bit layer."""
    from peft import prepare_model_for_kbit_training

    guard_cpu_repacking(model)
    return prepare_model_for_kbit_training(
        model, use_gradient_checkpointing=gradient_checkpointing, gradient_checkpointing_kwargs={"use_reentrant": False}
    )
