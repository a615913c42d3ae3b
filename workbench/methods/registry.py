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

from pathlib import Path

from workbench.core.errors import WorkbenchError
from workbench.methods import awq, baseline, bnb, gguf, gptq, hqq, mixed, quanto, torchao
from workbench.methods.base import Choice, Method

FAMILIES = (baseline, bnb, gptq, awq, quanto, hqq, torchao, mixed, gguf)

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

PRESETS: dict[str, str] = {name: text for family in FAMILIES for name, text in getattr(family, "PRESETS", {}).items()}
"""Short names that stand for a method with parameters (`gguf-q4_k_m` = `gguf:type=Q4_K_M`)."""


def get(name: str) -> Method:
    try:
        return REGISTRY[name]
    except KeyError:
        raise WorkbenchError(
            f"unknown method {name!r}. Known methods: {', '.join(REGISTRY)} (list them with `python -m workbench methods`)."
        ) from None


def available(device: str | None = None) -> list[tuple[Method, str | None]]:
    """Every method with the reason it cannot run here (None when it can)."""
    return [(m, m.unavailable_reason(device)) for m in REGISTRY.values()]


def parse(text: str, adapter: str | None = None) -> Choice:
    """`gptq:bits=8:group_size=32` -> Choice(the gptq Method, validated params)."""
    name, *pairs = text.strip().split(":")
    if name in PRESETS:  # its own parameters first: one given again is "set twice"
        name, *preset = PRESETS[name].split(":")
        pairs = preset + pairs
    method = get(name)
    overrides = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise WorkbenchError(f"{text!r}: parameters are written name:key=value:key=value, got {pair!r}.")
        if key in overrides:
            raise WorkbenchError(f"{text!r}: {key} is set twice; set it once.")
        overrides[key] = value
    # An absolute folder: a worker process runs elsewhere (its own scratch working directory).
    return Choice(
        method, method.resolve_params(overrides), str(Path(adapter).expanduser().resolve()) if adapter else None
    )


def parse_choice(text: str) -> tuple[Method, dict]:
    """(method, validated params) of a choice string."""
    choice = parse(text)
    return choice.method, choice.params
