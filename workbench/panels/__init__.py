"""ipywidgets panels: thin surfaces over the core, for Colab (ipywidgets 7.7.1) and JupyterLab (8.x).

    model = ModelPicker(); methods = MethodPicker()
    display(model.widget, methods.widget)
    compare = ComparePanel(model, methods); compare      # a table, charts, export
"""

from ._base import table_html
from .claims import ClaimsPanel
from .finetune import FineTunePanel, MergeDeployPanel
from .pickers import MethodPicker, ModelPicker
from .sensitivity import SensitivityPanel
from .work import ComparePanel, GeneratePanel, QuantizePanel

__all__ = ["table_html", "ModelPicker", "MethodPicker", "QuantizePanel", "ComparePanel", "GeneratePanel", "FineTunePanel", "MergeDeployPanel", "ClaimsPanel",
           "SensitivityPanel"]
