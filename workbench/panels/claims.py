"""ClaimsPanel: the overview's claims (`workbench.report.claims`) checked against a ComparePanel's results.

It registers with `ComparePanel.on_results`, so the table is redrawn after every Compare.
Rows of earlier Compares of the same model and protocol are kept (a 2-bit GPTQ run and a
4-bit one need two Compares, since the picker holds one setting per method); a newer run
of the same configuration replaces the older one, and another model or protocol starts afresh.
"""

from __future__ import annotations

import html
import json

import ipywidgets as widgets

from workbench.panels._base import Panel, table_html
from workbench.panels.work import ComparePanel
from workbench.report import claims
from workbench.run.results import IDENTITY_PROTOCOL, Result

WAITING = "<i>No results yet: press Compare above; this table fills in after every Compare.</i>"


def _setting(result: Result) -> tuple:
    """What makes two results comparable: the same model content and perplexity protocol."""
    return result.model_fingerprint, json.dumps([result.protocol.get(k) for k in IDENTITY_PROTOCOL], sort_keys=True)


class ClaimsPanel(Panel):
    """An HTML table of the overview's claims, redrawn whenever `compare` finishes."""

    def __init__(self, compare: ComparePanel):
        self.widget = widgets.HTML(WAITING)
        self.results: list[Result] = []
        self.rows: list[dict] = []
        compare.on_results(self.update)

    def update(self, measured: list[Result]) -> None:
        """Keep these results (and earlier ones of the same setting) and redraw the table."""
        settings = {_setting(r) for r in measured}
        kept = {r.key(): r for r in self.results if _setting(r) in settings}
        kept.update({r.key(): r for r in measured})
        self.results = list(kept.values())
        self.rows = claims.check(self.results)
        devices = sorted({r.device for r in self.results})
        note = (
            f"Checked on {len(self.results)} result(s) measured on {', '.join(devices) or 'nothing yet'}. "
            f"Source: {claims.SOURCE}. The blog's speed figures are GPU measurements."
        )
        self.widget.value = table_html(self.rows) + f"<p style='font-size:11px'>{html.escape(note)}</p>"
