"""Where a model's weights are (`ModelSource`), and the user cache converted models go to."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path


@dataclass(frozen=True)
class ModelSource:
    """Where a model's full-precision weights are: a local HF folder or a hub id."""

    label: str
    location: str
    note: str = ""
    token: str | None = field(default=None, repr=False, compare=False)
    trust_remote_code: bool = False
    """Let loaders run Python code shipped with the model (its `auto_map`); see `workbench.sources.remote_code`."""
    gguf: str = ""
    """The .gguf file these weights were dequantized from ('' when they were not): what an F32 GGUF
    for llama.cpp is rewritten from (`workbench.sources.gguf_f32`)."""

    @property
    def is_local(self) -> bool:
        return Path(self.location).is_dir()

    def saved_copy(self, folder, label: str | None = None) -> "ModelSource":
        """This model as saved in `folder` (e.g. a quantized checkpoint); the code opt-in goes along."""
        return ModelSource(label or self.label, str(folder), trust_remote_code=self.trust_remote_code)


def cache_dir() -> Path:
    """User cache for converted models (never inside the repository)."""
    root = (
        os.environ.get("WORKBENCH_CACHE")
        or Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "quantization-workbench"
    )
    return Path(root).expanduser().resolve()  # absolute: worker processes run in a scratch folder
