"""Quantization Workbench: quantize a causal LM, measure it, compare methods, fine-tune.

The public API is small: configs, the method registry, the runner's two verbs
(`runner.build`, `runner.measure`) and `runner.compare`, and the result records.
Heavy libraries are imported lazily, so `import workbench` is instant.
"""

from workbench.core.config import EvalConfig, ModelSpec
from workbench.core.errors import WorkbenchError

__all__ = ["EvalConfig", "ModelSpec", "WorkbenchError"]
