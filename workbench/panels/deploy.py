"""MergeDeployPanel: merge a trained adapter into the dequantized base, quantize the merged model
again for deployment, and measure every row like any comparison.

It reads only the `TrainedAdapter` value the FineTunePanel publishes, never that panel's widgets,
so changing the model picker after training cannot make a merge use another model.
"""

from __future__ import annotations

import html
import math
from dataclasses import replace
from pathlib import Path

import ipywidgets as widgets

from workbench.core.config import EvalConfig
from workbench.core.errors import WorkbenchError
from workbench.finetune import merge_refusal
from workbench.panels._base import Job, Panel, table_html
from workbench.panels.finetune import FineTunePanel, TrainedAdapter, notes_html, run_here
from workbench.run import executors, results

DEPLOY_METHODS = ("gptq", "awq", "rtn", "bnb-nf4")
"""Methods the merged model can be quantized with for deployment (GPTQ is Hugging Face's recommendation)."""


class MergeDeployPanel(Panel):
    """Merge the adapter onto the dequantized base, then quantize the merged model for deployment."""

    def __init__(
        self,
        finetune: FineTunePanel,
        out_dir: str = "results",
        deploy: str = "gptq",
        eval_cfg: EvalConfig = EvalConfig(max_tokens=2048, decode_tokens=16),
    ):
        self.finetune_panel, self.out_dir, self.eval_cfg = finetune, Path(out_dir), eval_cfg
        self.merge_button = widgets.Button(description="Merge", button_style="primary", icon="code-fork")
        self.merge_job = Job(self.merge_button, self._merge, self._show_merge)
        self.merge_view = widgets.HTML()
        self.method = widgets.Dropdown(
            options=list(DEPLOY_METHODS),
            value=deploy if deploy in DEPLOY_METHODS else "gptq",
            description="Quantize with",
        )
        self.deploy_button = widgets.Button(description="Deploy", button_style="primary", icon="rocket")
        self.deploy_job = Job(self.deploy_button, self._deploy, self._show_deploy)
        self.table = widgets.HTML()
        self.widget = widgets.VBox(
            [
                widgets.HTML("<b>1. Merge</b>: the adapter onto the dequantized base, checked on the held-out set."),
                self.merge_job.widget,
                self.merge_view,
                widgets.HTML(
                    "<b>2. Deploy</b>: quantize the merged model; compare it with the trained base + adapter."
                ),
                self.method,
                self.deploy_job.widget,
                self.table,
            ]
        )
        self.merge_report = None
        self.merged_from: TrainedAdapter | None = None
        self.results: list[results.Result] = []

    def merge(self) -> str:
        """Do what the Merge button does, in this cell."""
        return run_here(self.merge_job)

    def deploy(self, method: str | None = None) -> str:
        """Do what the Deploy button does, in this cell, optionally with another method."""
        if method is not None:
            if method not in DEPLOY_METHODS:
                raise WorkbenchError(f"deploy method {method!r}: choose one of {', '.join(DEPLOY_METHODS)}.")
            self.method.value = method
        return run_here(self.deploy_job)

    def run(self) -> str:
        self.merge()
        return self.deploy()

    def _merge(self, job: Job):
        from workbench import finetune

        tuned = self.finetune_panel.trained
        if tuned is None:
            raise WorkbenchError(
                "merge: no adapter yet. Train one first (press Train in the fine-tune panel, or run its `.run()`)."
            )
        refusal = merge_refusal(tuned.base)
        if refusal:
            raise WorkbenchError(refusal)
        out = self.out_dir / "merged" / tuned.adapter_dir.parent.name
        # tuned.model (when still in memory) saves loading the base again; the value kept here
        # does not hold it, so FineTunePanel.release() really frees it.
        report = finetune.merge_to_dequantized(
            tuned.source, tuned.adapter_dir, out, tuned.device, tuned.model, job.write
        )
        return replace(tuned, model=None), report

    def _show_merge(self, outcome) -> None:
        self.merged_from, self.merge_report = outcome
        report, base = self.merge_report, self.merged_from.base
        rows = [
            {"model": f"{base} base + adapter (what was trained)", "held-out loss": round(report.adapter_loss, 4)},
            {"model": "full-precision base + adapter, unmerged", "held-out loss": round(report.unmerged_loss, 4)},
            {"model": "merged into full precision (saved fp16)", "held-out loss": round(report.merged_loss, 4)},
        ]
        for row in rows:
            row["perplexity"] = round(math.exp(row["held-out loss"]), 2)
        verdict = (
            "<b style='color:#2ca02c'>within tolerance</b>"
            if report.within_tolerance
            else "<b style='color:#d62728'>outside tolerance: compare both before deploying the merge</b>"
        )
        self.merge_view.value = table_html(rows) + (
            f"<p style='font-size:12px'>|merged - trained| = {report.difference:.4f} nats vs tolerance {report.tolerance:.4f} "
            f"(2 × the base's own quantization gap {report.base_gap:.4f} + 0.02): {verdict}. Saved to "
            f"<code>{html.escape(report.merged_dir)}</code>.</p>"
        )

    def _deploy(self, job: Job) -> list[results.Result]:
        from workbench import finetune
        from workbench.run import runner

        if self.merge_report is None:
            raise WorkbenchError(
                "deploy: nothing merged yet. Press Merge first: deployment quantizes the merged model."
            )
        tuned = self.merged_from
        session = runner.Session.open(tuned.spec, self.eval_cfg, job.write)
        rows = finetune.deploy_compare(
            session,
            self.merge_report.merged_dir,
            (self.method.value,),
            tuned.adapter_dir,
            job.write,
            executors.InProcess(),
        )  # as ComparePanel: see panels/work.py
        results.append_history(rows, self.out_dir / "deploy.jsonl")
        return rows

    def _show_deploy(self, rows: list[results.Result]) -> None:
        self.results = rows
        self.table.value = table_html(results.table_rows(rows)) + notes_html(results.footnotes(rows))
        failed = [r for r in rows if r.error]
        if failed:
            raise WorkbenchError(f"{failed[0].label}: {failed[0].error}")
