"""Moved to `workbench.report.sensitivity`; this name is kept for one release."""

from workbench._moved import moved_to

moved_to(__name__, "workbench.report.sensitivity")
