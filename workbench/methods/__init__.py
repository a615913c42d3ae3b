"""The method registry: every quantization method the workbench knows, by name.

Family modules register their methods when imported; heavy libraries are imported
only inside `quantize`/`reload`, so listing methods is instant and works where a
backend is missing.
"""

from __future__ import annotations

from ..errors import WorkbenchError
from .base import Method, Param, QuantizeRequest

REGISTRY: dict[str, Method] = {}


def register(method: Method) -> Method:
    """Add a method; a second method with the same name is a programming error."""
    if method.name in REGISTRY:
        raise ValueError(f"method {method.name!r} is already registered")
    REGISTRY[method.name] = method
    return method


def get(name: str) -> Method:
    try:
        return REGISTRY[name]
    except KeyError:
        raise WorkbenchError(f"unknown method {name!r}. Known methods: {', '.join(REGISTRY)} (list them with `python -m workbench methods`).") from None


def available(device: str | None = None) -> list[tuple[Method, str | None]]:
    """Every method with the reason it cannot run here (None when it can)."""
    return [(m, m.unavailable_reason(device)) for m in REGISTRY.values()]


def parse_choice(text: str) -> tuple[Method, dict]:
    """`gptq:bits=8:group_size=32` -> (the gptq Method, validated params)."""
    name, *pairs = text.strip().split(":")
    method = get(name)
    overrides = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise WorkbenchError(f"{text!r}: parameters are written name:key=value:key=value, got {pair!r}.")
        overrides[key] = value
    return method, method.resolve_params(overrides)


def label(method: Method, params: dict) -> str:
    """A short display name: the method name plus the parameters that differ from defaults."""
    changed = [f"{p.name}={params[p.name]}" for p in method.params if params.get(p.name, p.default) != p.default]
    return f"{method.name}({', '.join(changed)})" if changed else method.name


# Registration order is the order users see: baselines first, then by family.
from . import baseline, bnb, gptq, awq, quanto, hqq, torchao  # noqa: E402,F401,I001

__all__ = ["Method", "Param", "QuantizeRequest", "REGISTRY", "register", "get", "available", "parse_choice", "label"]
