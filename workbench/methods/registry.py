"""The method registry: every quantization method the workbench knows, by name.

Explicit, like transformers' `AUTO_QUANTIZER_MAPPING`: `FAMILIES` lists the family
modules, each exporting `METHODS`, and the registry is filled once from them, in that
order (the order users see). A family module never registers itself, so nothing is
half-registered while a module imports. Heavy libraries are imported only when a method
runs, so listing methods is instant and works where a backend is missing.

`register()` is public: a new method is one module that builds a `Method` and registers
it; it then appears in every surface (CLI `methods`, `estimate`, `compare`, the panels).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ..errors import WorkbenchError
from . import awq, baseline, bnb, gptq, hqq, mixed, quanto, torchao
from .base import Method

FAMILIES = (baseline, bnb, gptq, awq, quanto, hqq, torchao, mixed)

REGISTRY: dict[str, Method] = {}


def register(method: Method) -> Method:
    """Add a method; a second method with the same name is a programming error."""
    if method.name in REGISTRY:
        raise ValueError(f"method {method.name!r} is already registered")
    REGISTRY[method.name] = method
    return method


def unregister(name: str) -> None:
    """Remove a method (tests that register one of their own clean up with this)."""
    REGISTRY.pop(name, None)


for _family in FAMILIES:
    for _method in _family.METHODS:
        register(_method)


def get(name: str) -> Method:
    try:
        return REGISTRY[name]
    except KeyError:
        raise WorkbenchError(f"unknown method {name!r}. Known methods: {', '.join(REGISTRY)} (list them with `python -m workbench methods`).") from None


def available(device: str | None = None) -> list[tuple[Method, str | None]]:
    """Every method with the reason it cannot run here (None when it can)."""
    return [(m, m.unavailable_reason(device)) for m in REGISTRY.values()]


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
        return [f"{p.name}={self.params[p.name]}" for p in self.method.params if self.params.get(p.name, p.default) != p.default]

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


def parse(text: str, adapter: str | None = None) -> Choice:
    """`gptq:bits=8:group_size=32` -> Choice(the gptq Method, validated params)."""
    name, *pairs = text.strip().split(":")
    method = get(name)
    overrides = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise WorkbenchError(f"{text!r}: parameters are written name:key=value:key=value, got {pair!r}.")
        overrides[key] = value
    # An absolute folder: a worker process runs elsewhere (its own scratch working directory).
    return Choice(method, method.resolve_params(overrides), str(Path(adapter).expanduser().resolve()) if adapter else None)


def parse_choice(text: str) -> tuple[Method, dict]:
    """(method, validated params) of a choice string."""
    choice = parse(text)
    return choice.method, choice.params

