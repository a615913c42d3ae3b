"""What the attached accelerator can do, in words a learner can act on."""

from __future__ import annotations


def gpu_banner() -> str:
    """GPU name, memory and bf16 support (compute capability 8.0+), or how to get a GPU."""
    import torch

    if not torch.cuda.is_available():
        return (
            "No CUDA GPU: everything runs on the CPU (fp32 compute), slower but complete. "
            "In Colab: Runtime -> Change runtime type -> T4 GPU, then run the notebook again."
        )
    props = torch.cuda.get_device_properties(0)
    major, minor = torch.cuda.get_device_capability(0)
    bf16 = "bf16 supported" if major >= 8 else "no fast bf16 (compute capability < 8.0): fp16 compute is used"
    return f"GPU: {props.name}, {props.total_memory / 2**30:.1f} GiB, compute capability {major}.{minor}, {bf16}."
