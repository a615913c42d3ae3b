"""Moved to `workbench.cli.sensitivity` and `workbench.report.sensitivity`; this name is kept for one release."""

from workbench._moved import moved_to

moved_to(__name__, "workbench.cli.sensitivity", "workbench.report.sensitivity")
