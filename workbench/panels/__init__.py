"""ipywidgets panels: thin surfaces over the core, for Colab (ipywidgets 7.7.1) and JupyterLab (8.x).

model = ModelPicker(); methods = MethodPicker()
display(model.widget, methods.widget)
compare = ComparePanel(model, methods); compare      # a table, charts, export
"""

from workbench.panels._base import table_html
from workbench.panels.claims import ClaimsPanel
from workbench.panels.deploy import MergeDeployPanel
from workbench.panels.finetune import FineTunePanel
from workbench.panels.pickers import MethodPicker, ModelPicker
from workbench.panels.sensitivity import SensitivityPanel
from workbench.panels.work import ComparePanel, GeneratePanel, QuantizePanel

__all__ = [
    "table_html",
    "ModelPicker",
    "MethodPicker",
    "QuantizePanel",
    "ComparePanel",
    "GeneratePanel",
    "FineTunePanel",
    "MergeDeployPanel",
    "ClaimsPanel",
    "SensitivityPanel",
]
