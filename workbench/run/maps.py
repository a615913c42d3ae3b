"""Sensitivity maps of a method given by its choice text (`rtn:bits=3`): the method's own
fake-quantizer handed to the map engine (`workbench.metrics.sensitivity`), which knows no
method by name.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

from workbench import methods
from workbench.core.errors import WorkbenchError
from workbench.methods.base import check_group_size
from workbench.metrics import sensitivity
from workbench.sources import models


def supported() -> list[str]:
    """The methods a map can be drawn for: those whose quantization of one weight can be
    reproduced alone (GPTQ's error correction needs the calibration activations of the layers
    around it)."""
    return [name for name, method in methods.REGISTRY.items() if method.fake_quantize is not None]


MIN_TOKENS = 32
"""Fewer calibration tokens than this and a cell's KL is mostly noise (and `mixed` takes 32 at least)."""


def check_tokens(tokens: int) -> None:
    """Refuse a map of too few tokens before any work (the CLI asks before the model resolves)."""
    if not isinstance(tokens, int) or tokens < MIN_TOKENS:
        raise WorkbenchError(
            f"sensitivity map: --tokens {tokens!r}: measure on at least {MIN_TOKENS} tokens (512 is the default)."
        )


def check_map_choice(text: str, source: models.ModelSource, tokens: int = 512) -> methods.Choice:
    """The map's method and token count, refused before any work when unsupported or its group does not fit."""
    check_tokens(tokens)
    choice = methods.parse(text)
    if choice.method.fake_quantize is None:
        raise WorkbenchError(
            f"sensitivity map: method {choice.method.name!r} is not supported; supported: "
            f"{', '.join(supported())} (each layer's quantization must be reproducible alone; "
            "GPTQ corrects errors across layers)."
        )
    reason = choice.method.unavailable_reason("cpu")
    if reason:
        raise WorkbenchError(f"sensitivity map with {choice.method.name}: {reason}")
    if "group_size" in choice.params:
        check_group_size(choice.method.name, choice.params["group_size"], source)
    return choice


def fake_quantizer(choice: methods.Choice) -> sensitivity.FakeQuantize:
    """`weight -> dequantized weight` exactly as `choice`'s backend would store it."""
    return choice.method.fake_quantize(choice.params)


def compute(
    source: models.ModelSource,
    method: str,
    tokens: int = 512,
    unit: str = "layer",
    blocks: list[int] | None = None,
    end_to_end: bool = True,
    log: Callable[[str], None] = print,
) -> sensitivity.SensitivityMap:
    """The map of `method` (a choice text) on `source`, computed now (see `sensitivity.compute`)."""
    choice = check_map_choice(method, source, tokens)
    return sensitivity.compute(source, fake_quantizer(choice), choice.text, tokens, unit, blocks, end_to_end, log)


def load_or_compute(
    source: models.ModelSource,
    method: str,
    tokens: int = 512,
    unit: str = "layer",
    blocks: list[int] | None = None,
    folder: Path | None = None,
    rerun: bool = False,
    end_to_end: bool = True,
    log: Callable[[str], None] = print,
) -> tuple[sensitivity.SensitivityMap, Path]:
    """The cached map of `method` (a choice text) on `source`, or a new one (see
    `sensitivity.load_or_compute`)."""
    choice = check_map_choice(method, source, tokens)
    return sensitivity.load_or_compute(
        source, fake_quantizer(choice), choice.text, tokens, unit, blocks, folder, rerun, end_to_end, log
    )
