"""The importance matrix: for every block linear weight, the mean squared activation of each input
column on calibration text, as llama.cpp's `llama-imatrix` collects it.

Quantizing a row with these weights minimises sum_j imatrix_j (w_j - q_j)^2, the error the layer's
output sees on such text, instead of the plain squared error. The workbench collects it from the
transformers model on the same calibration blocks GPTQ and AWQ use (never the evaluation text),
by GGUF tensor name, and saves it in llama.cpp's imatrix GGUF format (`<name>.in_sum2` sums of
squares, `<name>.counts` tokens), which `llama-quantize --imatrix` reads. Like `llama-imatrix`
by default, the output head is left out.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from workbench.core.errors import WorkbenchError


@dataclass
class Importance:
    sums: dict
    """GGUF tensor name -> sum over calibration tokens of each input column's squared activation."""
    tokens: int
    """Calibration tokens the sums are over."""
    chunk_size: int
    dataset: str
    names: dict
    """Module name of every block linear -> its GGUF tensor name."""

    def mean(self, name: str):
        """The per-column weights ggml's quantizer takes (None: no entry for this tensor)."""
        sums = self.sums.get(name)
        return None if sums is None else (sums / self.tokens).astype("float32")


def gguf_names(model) -> dict[str, str]:
    """Module name of every block linear -> the GGUF name of its weight (the `gguf` package's table)."""
    import gguf
    import torch

    arch = {"llama": gguf.MODEL_ARCH.LLAMA}.get(model.config.model_type)
    if arch is None:
        raise WorkbenchError(f"gguf: no importance-matrix names for architecture {model.config.model_type!r}.")
    table = gguf.get_tensor_name_map(arch, model.config.num_hidden_layers)
    names = {}
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear) and ".layers." in name:
            gguf_name = table.get_name(name + ".weight", try_suffixes=(".weight",))
            if gguf_name is None:
                raise WorkbenchError(f"gguf: layer {name} has no GGUF tensor name.")
            names[name] = gguf_name
    return names


def collect(model, blocks: list[list[int]], dataset: str, log=print) -> Importance:
    """Run the calibration blocks through `model`, summing each block linear's squared inputs."""
    import torch

    names = gguf_names(model)
    sums: dict = {}
    modules = dict(model.named_modules())

    def hook(name):
        def record(_module, inputs):
            x = inputs[0].detach().reshape(-1, inputs[0].shape[-1]).double()
            sums[names[name]] = sums.get(names[name], 0) + (x * x).sum(0)

        return record

    handles = [modules[name].register_forward_pre_hook(hook(name)) for name in names]
    try:
        with torch.inference_mode():
            for i, ids in enumerate(blocks):
                model(input_ids=torch.tensor([ids]), use_cache=False)
                if (i + 1) % max(len(blocks) // 4, 1) == 0 or i + 1 == len(blocks):  # four lines, not one a block
                    log(f"[gguf] importance matrix: block {i + 1}/{len(blocks)}")
    finally:
        for handle in handles:
            handle.remove()
    tokens = sum(len(ids) for ids in blocks)
    return Importance({k: v.numpy() for k, v in sums.items()}, tokens, len(blocks[0]), dataset, names)


def save(importance: Importance, path: Path) -> None:
    """llama.cpp's imatrix GGUF (`general.type` imatrix), readable by `llama-quantize --imatrix`."""
    import numpy as np
    from gguf import GGUFWriter

    writer = GGUFWriter(path, arch=None)
    writer.add_type("imatrix")
    writer.add_array("imatrix.datasets", [importance.dataset])
    writer.add_uint32("imatrix.chunk_count", importance.tokens // importance.chunk_size)
    writer.add_uint32("imatrix.chunk_size", importance.chunk_size)
    for name, sums in sorted(importance.sums.items()):
        writer.add_tensor(f"{name}.in_sum2", sums.astype(np.float32).reshape(1, -1))
        writer.add_tensor(f"{name}.counts", np.array([[importance.tokens]], dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
