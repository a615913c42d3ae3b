"""Showing plotly figures in JupyterLab and in Colab: one helper for cells, one for panels.

Plain `go.Figure`s as display data, never a `FigureWidget` (unreliable in Colab).
"""

from __future__ import annotations


def mimebundle(fig) -> dict:
    """Both representations of a figure; each frontend renders the richest it knows:
    JupyterLab the plotly mimetype (its bundled extension, works offline), Colab the HTML
    (plotly.js from the CDN, which Colab can reach)."""
    import json

    return {
        "application/vnd.plotly.v1+json": json.loads(fig.to_json()),
        "text/html": fig.to_html(full_html=False, include_plotlyjs="cdn"),
    }


def show(fig) -> None:
    """Display a figure in the cell's output (returns nothing: no stray repr under the chart).

    Not a FigureWidget (unreliable in Colab) and not `display` inside an Output widget
    after a click (Colab's "Plotly is not defined"): plain display data owned by the cell."""
    from IPython.display import display

    display(mimebundle(fig), raw=True)


class FigureArea:
    """Where a panel's plotly figures appear after a button click, in JupyterLab and in Colab.

    JupyterLab does not apply display updates sent from a widget callback, but it renders
    an Output widget's outputs (set as widget state, so it works from a worker thread).
    Colab fails on plotly inside an Output after a click ("Plotly is not defined"), so
    there the figures go to display handles reserved when the panel is displayed."""

    def __init__(self):
        import ipywidgets as widgets

        self.widget = widgets.Output()
        self._handles: list = []

    def reserve(self, count: int) -> None:
        """Called when the panel is displayed: in Colab, one empty display handle per figure."""
        import sys

        if "google.colab" in sys.modules:
            from IPython.display import display

            self._handles = [display({"text/plain": ""}, raw=True, display_id=True) for _ in range(count)]

    def show(self, figures: list) -> None:
        if self._handles:
            for fig, handle in zip(figures, self._handles):
                handle.update(mimebundle(fig), raw=True)
            return
        self.widget.outputs = tuple(
            {"output_type": "display_data", "data": mimebundle(fig), "metadata": {}} for fig in figures
        )
