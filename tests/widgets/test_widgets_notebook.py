"""notebooks/examples/widgets.ipynb runs end to end on a kernel of this interpreter (papermill, as reports
run): no cell fails, each widget is displayed (a widget view in its cell's outputs) and the saved widget
state holds what the widgets showed — the explorer's heatmap, the monitor's two runs, both completed, and the
OFA explorer's branch accuracies, the DT viewer's steps."""
from __future__ import annotations

import json
import re

import nbformat
import pytest

from jupyter_harness import REPO_ROOT
from workbench.reports.kernel import execute_notebook

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]

NOTEBOOK = REPO_ROOT / "notebooks" / "examples" / "widgets.ipynb"
VIEW = "application/vnd.jupyter.widget-view+json"


def _views(cell) -> list[str]:
    return [output["data"][VIEW]["model_id"] for output in cell.get("outputs", [])
            if VIEW in output.get("data", {})]


def _only_value(states: dict, dom_class: str) -> str:
    """The ``value`` of the one widget in the saved state that carries ``dom_class``."""
    (value,) = [state["state"]["value"] for state in states.values()
                if dom_class in state["state"].get("_dom_classes", [])]
    return value


def test_widgets_notebook_runs_and_keeps_the_widget_state(tmp_path, monkeypatch):
    monkeypatch.setenv("KD_WORKBENCH_CACHE", str(tmp_path / "cache"))
    output = tmp_path / "widgets.ipynb"
    execute_notebook(NOTEBOOK, output, {"n_samples": 128})  # raises if a cell fails
    nb = nbformat.read(output, as_version=4)
    code = [cell for cell in nb.cells if cell.cell_type == "code"]
    errors = [output for cell in code for output in cell.outputs if output.output_type == "error"]
    assert not errors, errors
    assert all(cell.execution_count is not None for cell in code)

    states = nb.metadata["widgets"]["application/vnd.jupyter.widget-state+json"]["state"]
    explorer_view = next(cell for cell in code if cell.source.startswith("explorer = GapExplorer"))
    monitor_view = next(cell for cell in code if cell.source.startswith("monitor = TrainingMonitor"))
    (explorer_id,), (monitor_id,) = _views(explorer_view), _views(monitor_view)
    assert "kd-gap-explorer" in states[explorer_id]["state"]["_dom_classes"]
    assert "kd-training-monitor" in states[monitor_id]["state"]["_dom_classes"]

    text = json.dumps(states)
    statuses = [state["state"]["value"] for state in states.values()
                if "kd-training-status" in state["state"].get("_dom_classes", [])]
    # the monitor's, and the OFAExplorer's (a TrainingMonitor too; one run, so no run label)
    monitor_status = [status for status in statuses if status.startswith("kd, T=4")]
    assert len(statuses) == 2 and len(monitor_status) == 1, statuses
    assert re.fullmatch(r"kd, T=4 · <b>done</b> · epoch 1/1 · step \d+ · loss [\d.]+ · eval accuracy [\d.]+%",
                        monitor_status[0]), statuses
    (ofa_status,) = [status for status in statuses if status not in monitor_status]
    assert re.fullmatch(r"<b>done</b> · epoch 2/2 · step \d+ · loss [\d.]+ · eval accuracy [\d.]+%", ofa_status)
    # the monitor's figures overlay both runs (legend groups), the explorer's heatmap was computed
    assert '"legendgroup": "student alone"' in text and '"legendgroup": "kd, T=4"' in text
    assert '"type": "heatmap"' in text

    # the OFAExplorer: its view, its branch line with both branches' and the head's held-out accuracy
    ofa_view = next(cell for cell in code if "OFAExplorer(" in cell.source)
    ofa_id = _views(ofa_view)[0]
    assert "kd-ofa-explorer" in states[ofa_id]["state"]["_dom_classes"]
    branch_status = _only_value(states, "kd-ofa-status")
    assert re.fullmatch(r"2 branches at blocks\.0, blocks\.1 · epoch 2, held-out accuracy \(128 samples\): "
                        r"blocks\.0 [\d.]+% · blocks\.1 [\d.]+% · <b>head [\d.]+%</b>", branch_status), branch_status

    # the outcome cell: both runs completed, and each reached an evaluation accuracy
    outcome_cell = next(cell for cell in code if cell.source.startswith("{run.name: run.outcome"))
    outcome = outcome_cell.outputs[0]["data"]["text/plain"]
    assert "'student alone': 'done'" in outcome and "'kd, T=4': 'done'" in outcome

    # the DTViewer: its view, and a status line naming each variant's step
    dt_view = next(cell for cell in code if "DTViewer(runs" in cell.source)
    dt_id = _views(dt_view)[0]
    assert "kd-dt-viewer" in states[dt_id]["state"]["_dom_classes"]
    dt_status = _only_value(states, "kd-dt-status")
    assert re.fullmatch(r"<b>base</b> step 0 of 8 \(t=\d+, model\) · <b>distilled</b> step 0 of 4 \(t=\d+, model\) · "
                        r"<b>hybrid</b> step 0 of 4 \(t=\d+, base\)", dt_status), dt_status
