"""AWQ's clip search as matrix products: gptqmodel's search, about 12x faster on a CPU.

After scaling, AWQ tries 10 clip ranges for every weight group (the group's largest magnitude
times 1, 0.95, ..., 0.55) and keeps the range whose quantized weights reproduce the linear
layer's output best on up to 512 calibration tokens (mean squared error per group).
gptqmodel 7.6 (`AWQProcessor._compute_best_clip`, llm-awq's recipe) computes each try's outputs
as an elementwise product broadcast to rows x tokens x groups x group size, a bf16 tensor of
several hundred MB, then sums it: 95 % of AWQ's build time on a CPU (py-spy, bundled model,
604 s). Here each group's outputs are one batched matrix product (bf16 weights and inputs,
multiplied and summed in fp32): the same tries and the same objective, computed exactly
instead of with every product rounded to bf16. The chosen range differs only where that
rounding decided between two nearly equal errors (1-2 % of the groups of the bundled model).

`clip_search=gptqmodel` keeps gptqmodel's own code.
"""

from __future__ import annotations

import contextlib
from importlib import metadata

from workbench.core.errors import WorkbenchError

CHOICES = ("matmul", "gptqmodel")
SUPPORTED = "7.6."
"""gptqmodel versions whose clip search this reproduces (same tries, signature and quantizer)."""


def compute_best_clip(processor, w, input_feat, n_grid=20, max_shrink=0.5, n_sample_token=512):
    """`AWQProcessor._compute_best_clip` of gptqmodel 7.6, with matrix products: the best clip
    bound per output row and group, shaped [rows, groups, 1]."""
    import torch

    rows, columns = w.shape
    group = processor.qcfg.group_size if processor.qcfg.group_size > 0 else columns
    with torch.inference_mode():
        x = input_feat.reshape(-1, columns)
        x = x[:: max(1, x.shape[0] // n_sample_token)]  # the tokens gptqmodel samples
        x = x.reshape(len(x), -1, group).transpose(0, 1).to(w.device, torch.float32)  # groups x tokens x group
        w = w.reshape(rows, 1, -1, group)
        batch = 256 if rows % 256 == 0 else 64  # gptqmodel's row batches
        clamped = torch.empty_like(w[:batch])
        quantized = torch.empty_like(clamped)
        best_per_batch = []
        for start in range(0, rows, batch):
            weights = w[start : start + batch]
            original_max = weights.abs().amax(dim=-1, keepdim=True)  # rows x 1 x groups x 1
            best = original_max.clone()
            least_error = torch.full_like(original_max, 1e9, dtype=torch.float32)  # as gptqmodel starts, on w's device
            original_out = torch.bmm(x, _groups_by_rows(weights))
            for shrink in range(int(max_shrink * n_grid)):
                bound = original_max * (1 - shrink / n_grid)
                torch.clamp(weights, -bound, bound, out=clamped)
                processor._pseudo_quantize_tensor_into(clamped, quantized)
                out = torch.bmm(x, _groups_by_rows(quantized))
                error = (out - original_out).pow_(2).mean(dim=1).t().reshape(least_error.shape)
                better = error < least_error
                least_error[better] = error[better]
                best[better] = bound[better]
            best_per_batch.append(best)
        return torch.cat(best_per_batch).squeeze(1)


def _groups_by_rows(weights):
    """rows x 1 x groups x group -> groups x group x rows, in fp32."""
    return weights[:, 0].permute(1, 2, 0).float()


@contextlib.contextmanager
def clip_search(choice: str):
    """gptqmodel's AWQ with the chosen clip search while the block runs."""
    if choice == "gptqmodel":
        yield
        return
    version = metadata.version("gptqmodel")
    if not version.startswith(SUPPORTED):
        raise WorkbenchError(
            f"awq: clip_search=matmul reproduces gptqmodel {SUPPORTED}x's clip search, and gptqmodel {version} "
            "is installed; use awq:clip_search=gptqmodel (its own, slower search), or pip install gptqmodel==7.6.*"
        )
    from gptqmodel.looper.awq_processor import AWQProcessor

    upstream = AWQProcessor._compute_best_clip
    AWQProcessor._compute_best_clip = compute_best_clip
    try:
        yield
    finally:
        AWQProcessor._compute_best_clip = upstream
