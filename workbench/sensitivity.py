"""Moved to `workbench.metrics.sensitivity` and `workbench.run.maps`; this name is kept for one release."""

from workbench._moved import moved_to

moved_to(__name__, "workbench.metrics.sensitivity", "workbench.run.maps")
