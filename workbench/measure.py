"""Moved to `workbench.metrics.perplexity` and `workbench.metrics.memory` and `workbench.metrics.speed`; this name is kept for one release."""

from workbench._moved import moved_to

moved_to(__name__, "workbench.metrics.perplexity", "workbench.metrics.memory", "workbench.metrics.speed")
