"""Quantization methods: the `Method` contract (base.py), one module per family, and the registry."""

from workbench.methods.base import Method, Param, QuantizeRequest
from workbench.methods.registry import REGISTRY, Choice, available, get, parse, parse_choice, register, unregister

__all__ = [
    "Method",
    "Param",
    "QuantizeRequest",
    "REGISTRY",
    "Choice",
    "register",
    "unregister",
    "get",
    "available",
    "parse",
    "parse_choice",
]
