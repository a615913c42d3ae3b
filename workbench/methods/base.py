"""What a quantization method declares, and the request it is given to run.

A `Method` is data plus functions: `quantize(request) -> model` and, when the method
can be saved, `save`/`reload`; storage per weight for estimates, preparation for
training, merge support and side tensors for weight bytes. Everything a surface needs
(parameter forms, availability, install lines, estimates) is read from these
declarations, so adding a method means adding one module and registering it.
"""

from __future__ import annotations

import importlib.util
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable

from workbench.core.errors import WorkbenchError


@dataclass(frozen=True)
class Param:
    """One tunable setting of a method, with its default and its validation."""

    name: str
    default: Any
    help: str
    choices: tuple = ()
    minimum: float | None = None
    maximum: float | None = None
    exclusive: bool = False
    """The bounds themselves are outside the range (gptqmodel's damp: 0 < damp < 1)."""

    def check(self, method: str, value: Any) -> Any:
        """Coerce `value` (possibly a string from the CLI) to the default's type and validate it
        against the range the backend really accepts, so a bad value is refused before any work."""
        kind, given = type(self.default), value
        try:
            if kind is bool and isinstance(value, str):
                if value.lower() not in ("true", "false", "1", "0", "yes", "no"):
                    raise ValueError
                value = value.lower() in ("true", "1", "yes")
            else:
                value = kind(value)
        except (TypeError, ValueError):
            raise WorkbenchError(
                f"{method}: parameter {self.name}={value!r} is not a {kind.__name__}. {self.help}"
            ) from None
        if isinstance(value, float) and not math.isfinite(value):
            raise WorkbenchError(f"{method}: parameter {self.name}={value!r} must be a finite number. {self.help}")
        if self.choices and value not in self.choices:
            allowed = ", ".join(str(c) for c in self.choices)
            raise WorkbenchError(f"{method}: {self.name}={value!r} is not supported; choose one of {allowed}.")
        low, high = self.minimum, self.maximum
        if self.exclusive and not ((low is None or value > low) and (high is None or value < high)):
            raise WorkbenchError(f"{method}: {self.name}={given!r} must be above {low} and below {high}. {self.help}")
        if low is not None and value < low:
            raise WorkbenchError(f"{method}: {self.name}={given!r} must be at least {low}.")
        if high is not None and value > high:
            raise WorkbenchError(f"{method}: {self.name}={given!r} must be at most {high}.")
        return value


@dataclass
class QuantizeRequest:
    """Everything a method needs to produce a quantized model."""

    source: Any
    """A `models.ModelSource`: where the full-precision weights are."""
    params: dict
    """Validated parameters (defaults filled in)."""
    device: str
    """`cpu` or `cuda`."""
    workdir: Path
    """A folder the method may write to (quantize-save-reload methods save here)."""
    calibration: list[list[int]] | None = None
    """Equal-length token blocks, for methods that need calibration."""
    log: Callable[[str], None] = print


def per_group_bits(group_size: int, overhead_bits: float) -> float:
    """Bits per weight that a group's scale/zero costs; group_size <= 0 means one per row."""
    return overhead_bits / group_size if group_size > 0 else PER_ROW_BITS


PER_ROW_BITS = 0.03
"""One scale per output row costs 16-32 bits over a row of 1k-4k weights: about 0.01-0.03 bits."""


def compute_bits(device: str) -> int:
    """Width of the tensors a quantized method keeps unquantized (embeddings, norms, lm_head):
    the compute dtype, fp32 on CPU and 16-bit on GPU."""
    return 32 if device == "cpu" else 16


def default_storage(method: "Method", params: dict, device: str) -> tuple[float, float]:
    """A 16-bit scale and zero per 64 weights, everything else at the compute dtype."""
    return method.bits_for(params) + per_group_bits(64, 32), compute_bits(device)


def enable_input_grads(model, gradient_checkpointing: bool):
    """Default preparation for LoRA training: inputs need grads only for checkpointing."""
    if gradient_checkpointing:
        model.enable_input_require_grads()
    return model


@dataclass(frozen=True)
class Method:
    """Everything the workbench knows about one quantization method: its whole contract.

    No code outside `workbench/methods/` asks which family a method is: what differs
    between methods (storage for estimates, training preparation, merge support,
    tensors kept outside parameters, save and reload) is declared here."""

    name: str
    family: str
    bits: int
    summary: str
    quantize: Callable[[QuantizeRequest], Any]
    params: tuple[Param, ...] = ()
    needs_calibration: bool = False
    devices: tuple[str, ...] = ("cpu", "cuda")
    backend: str | None = None
    """Import name of the package that does the work (None: transformers/torch only)."""
    pip: str | None = None
    """The install line that makes the backend available."""
    trainable: bool = False
    """Whether PEFT can train LoRA adapters on top of it."""
    reload: Callable[[Path, QuantizeRequest], Any] | None = None
    """Loads a copy saved by `save`; None when the method cannot be saved."""
    save: Callable[[Any, Path], None] | None = None
    kernel: str = ""
    """The compute path used on CPU/GPU, shown in the results table."""
    limits: tuple[str, ...] = field(default=())
    """Known limitations a user should read before picking it."""
    storage: Callable[["Method", dict, str], tuple[float, float]] = default_storage
    """(bits per block-linear weight, scales and zeros included; bits per other parameter) as
    stored on a device: what "will it fit?" estimates before anything is loaded."""
    storage_note: str = ""
    """Why a measured size may differ from the estimate, shown beside it."""
    side_tensors: Callable[[Any], Iterable] | None = None
    """Tensors a layer keeps outside its parameters and buffers (bitsandbytes quant state,
    HQQ meta), so that weight bytes count them."""
    prepare_for_training: Callable[[Any, bool], Any] = enable_input_grads
    """`(model, gradient_checkpointing) -> model` before LoRA adapters are attached."""
    merge_refusal: str | None = None
    """Why a LoRA adapter trained on this method cannot be merged (None: it can)."""
    fake_quantize: Callable[[dict], Callable] | None = None
    """`params -> (weight -> dequantized weight)`, by the backend's own arithmetic, for methods
    whose quantization of one weight can be reproduced alone: what a sensitivity map quantizes
    each cell with (None: no map; GPTQ's error correction needs the layers around it)."""
    details: Callable[[Path, dict], dict] | None = None
    """`(workdir, params) -> dict`: what the method chose while building, read from its working
    folder (`mixed`: the bits of each layer; `gguf`: the types llama.cpp wrote); kept with the
    result, shown by `compare --details` and in the report."""
    file_storage: Callable[[Path, dict], Any] | None = None
    """`(workdir, params) -> memory.Storage` read from the file the method wrote, for methods whose
    model in memory is not what they store (`gguf`: llama.cpp's runtime, or dequantized weights)."""
    exports: Callable[[Path, dict], list[Path]] | None = None
    """`(workdir, params) -> files`: what makes the built model usable outside the workbench, for
    `python -m workbench export` (`gguf`: the .gguf file); None: cannot be exported."""
    bits_of: Callable[[dict], int] | None = None
    """Nominal bits from the parameters when they have no `bits` (`gguf`: from the file type)."""

    @property
    def serializable(self) -> bool:
        return self.save is not None and self.reload is not None

    @property
    def package(self) -> str | None:
        """The distribution name in the pip line (`pip install gptqmodel==7.6.*` -> gptqmodel)."""
        if not self.pip:
            return None
        return self.pip.split()[2].split("=")[0].split("[")[0]

    def resolve_params(self, overrides: dict | None = None) -> dict:
        """Defaults updated with `overrides`, each validated. Unknown names are an error."""
        overrides = dict(overrides or {})
        known = {p.name: p for p in self.params}
        unknown = sorted(set(overrides) - set(known))
        if unknown:
            have = ", ".join(known) or "none"
            raise WorkbenchError(f"{self.name}: unknown parameter(s) {', '.join(unknown)}; this method takes: {have}.")
        return {name: p.check(self.name, overrides.get(name, p.default)) for name, p in known.items()}

    def bits_for(self, params: dict) -> int:
        if self.bits_of is not None:
            return int(self.bits_of(params))
        return int(params.get("bits", self.bits))

    def storage_bits(self, params: dict, device: str) -> tuple[float, float]:
        return self.storage(self, params, device)

    def unavailable_reason(self, device: str | None = None) -> str | None:
        """Why this method cannot run here (None when it can)."""
        if self.backend and importlib.util.find_spec(self.backend) is None:
            return f"needs the '{self.backend}' package: {self.pip}"
        if device is None:
            import torch

            device = "cuda" if torch.cuda.is_available() else "cpu"
        if device not in self.devices:
            where = " or ".join(self.devices)
            return f"runs on {where} only; this machine has {device}. In Colab: Runtime -> Change runtime type -> GPU."
        return None

    def describe(self) -> dict:
        reason = self.unavailable_reason()
        return {
            "name": self.name,
            "family": self.family,
            "bits": self.bits,
            "summary": self.summary,
            "available": reason is None,
            "reason": reason,
            "needs_calibration": self.needs_calibration,
            "devices": list(self.devices),
            "backend": self.backend,
            "pip": self.pip,
            "trainable": self.trainable,
            "mergeable": self.trainable and self.merge_refusal is None,
            "serializable": self.serializable,
            "params": [
                {"name": p.name, "default": p.default, "choices": list(p.choices), "help": p.help} for p in self.params
            ],
            "limits": list(self.limits),
        }


def check_group_size(method: str, group_size: int, source) -> None:
    """A group must divide every linear layer's input width; say which layer it does not fit."""
    from workbench.sources.models import linear_input_widths

    if group_size <= 0:  # -1 / 0: one group per row
        return
    widths = linear_input_widths(source)
    bad = {name: width for name, width in widths.items() if width % group_size}
    if bad:
        name, width = next(iter(bad.items()))
        fits = [g for g in (32, 64, 128) if all(w % g == 0 for w in widths.values())]
        raise WorkbenchError(
            f"{method}: group_size={group_size} does not divide the input width {width} of layer {name} "
            f"({len(bad)} layers affected); group sizes that fit this model: {', '.join(map(str, fits)) or 'none of 32/64/128'}."
        )


@dataclass(frozen=True)
class Choice:
    """A method with validated parameters: what one row of a comparison measures.

    `adapter` is a saved LoRA adapter folder to attach after quantizing (a fine-tuned
    model measured like any method)."""

    method: Method
    params: dict
    adapter: str | None = None

    def _changed(self) -> list[str]:
        """`key=value` for each parameter that differs from its default."""
        return [
            f"{p.name}={self.params[p.name]}"
            for p in self.method.params
            if self.params.get(p.name, p.default) != p.default
        ]

    @property
    def label(self) -> str:
        """A short display name: the method name plus the parameters that differ from defaults."""
        changed = self._changed()
        name = f"{self.method.name}({', '.join(changed)})" if changed else self.method.name
        return name + ("+lora" if self.adapter else "")

    @property
    def text(self) -> str:
        """The choice written back as `name:key=value` (non-default parameters only): `parse(text)` gives it again."""
        return ":".join([self.method.name, *self._changed()])
