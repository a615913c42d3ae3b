"""The old flat module names (`workbench.runner`, `workbench.sensitivity`, ...) kept for one release.

Each old module is a two-line file calling `moved_to`: with one new home the old name *is* that
module (so patching it patches the real one); with several it is a namespace with all of their
names. Importing an old name warns once (DeprecationWarning) with the new path.
"""

from __future__ import annotations

import importlib
import sys
import warnings


def moved_to(name: str, *homes: str) -> None:
    warnings.warn(
        f"{name} moved to {' and '.join(homes)}; the old name goes away in the next release.",
        DeprecationWarning,
        stacklevel=3,
    )
    modules = [importlib.import_module(home) for home in homes]
    if len(modules) == 1:
        sys.modules[name] = modules[0]
        return
    old = sys.modules[name]
    for module in modules:
        for key, value in vars(module).items():
            if not key.startswith("__"):
                setattr(old, key, value)
