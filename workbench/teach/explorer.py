"""An interactive explorer for the basics notebook: sliders for bits and group size that redraw
the error histogram of one weight matrix."""

from __future__ import annotations

from workbench import teach
from workbench.report.display import FigureArea
from workbench.teach.charts import error_histogram


class ErrorExplorer:
    """Sliders for bits and group size that redraw the absmax error histogram of `weight`.

    Displayed, it draws once at once (headless runs stop there) and again on every change;
    figures go through the panels' FigureArea (an Output's state in JupyterLab, a display
    handle in Colab). Works with ipywidgets 7.7.1 and 8."""

    def __init__(self, weight, groups=(16, 32, 64, 128, "row")):
        import ipywidgets as widgets

        self.weight = weight.detach().float()
        self.bits = widgets.IntSlider(value=4, min=2, max=8, description="bits")
        self.group = widgets.Dropdown(
            options=[(f"{g}" if g != "row" else "per row", g) for g in groups], value=64, description="group size"
        )
        self.area = FigureArea()
        for control in (self.bits, self.group):
            control.observe(lambda change: self.draw(), names="value")
        self.widget = widgets.VBox([widgets.HBox([self.bits, self.group]), self.area.widget])
        self.figure = None

    def draw(self) -> None:
        trip = teach.error_histogram_data(self.weight, self.bits.value, self.group.value)
        self.figure = error_histogram(self.weight, [trip])
        self.figure.update_layout(
            title=f"{trip.name}: mean |error| {trip.mean_abs_error(self.weight):.2e}<br>"
            f"<sup>all {self.weight.numel():,} weights of the layer</sup>",
            showlegend=False,
        )
        self.area.show([self.figure])

    def _ipython_display_(self):
        from IPython.display import display

        display(self.widget)
        self.area.reserve(1)
        self.draw()
