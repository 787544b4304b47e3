"""GapExplorer without a browser: drive the controls, press Compute, click a cell, check the figures
against an independent ``cka_matrix`` call and that no hooks are left on either model."""
from __future__ import annotations

import numpy as np
import plotly.graph_objects as go
import pytest
import torch
from plotly.callbacks import Points

import widgets.gap_explorer as gap_explorer_module
from widgets import GapExplorer
from workbench import layer_names, stage_names
from workbench.similarity import cka_matrix

SETTINGS = {"batch_size": 64, "device": "cpu", "progress": False}


def click(explorer: GapExplorer, row: int, column: int) -> None:
    """What the frontend sends when a heatmap cell is clicked: labels and the ``[row, column]`` index."""
    result = explorer.result
    points = Points(
        point_inds=[[row, column]],
        xs=[result.student_layers[column]],
        ys=[result.teacher_layers[row]],
        trace_name=None,
        trace_index=0,
    )
    explorer.select_row(explorer.heatmap.data[0], points, None)


@pytest.fixture
def explorer(conv_pair, images):
    teacher, student = conv_pair
    return GapExplorer(teacher, student, images[:128], **SETTINGS)


def test_controls_default_to_the_stages(explorer, conv_pair):
    teacher, student = conv_pair
    assert explorer.teacher_layers.options == tuple(layer_names(teacher))
    assert explorer.teacher_layers.value == tuple(stage_names(teacher))
    assert explorer.student_layers.value == tuple(stage_names(student))
    assert (explorer.kernel.value, explorer.debiased.value, explorer.n_samples.value) == ("linear", True, 128)
    assert explorer.result is None
    assert isinstance(explorer.heatmap, go.FigureWidget) and isinstance(explorer.row_plot, go.FigureWidget)


def test_compute_button_shows_the_new_matrix_and_a_clicked_row(explorer, conv_pair, images, hook_count, monkeypatch):
    teacher, student = conv_pair
    explorer.teacher_layers.value = ("blocks.1", "blocks.2", "pool")
    explorer.student_layers.value = ("blocks.0", "blocks.2", "head")
    explorer.kernel.value = "rbf"
    explorer.debiased.value = False
    explorer.n_samples.value = 96
    heatmap, trace = explorer.heatmap, explorer.heatmap.data[0]

    explorer.compute_button.click()

    expected = cka_matrix(
        teacher, student, images[:96], ["blocks.1", "blocks.2", "pool"], ["blocks.0", "blocks.2", "head"],
        kernel="rbf", debiased=False, **SETTINGS,
    )
    assert explorer.error is None, explorer.status.value
    np.testing.assert_allclose(explorer.result.values, expected.values, rtol=1e-10)
    assert explorer.heatmap is heatmap and explorer.heatmap.data[0] is trace  # updated in place
    np.testing.assert_allclose(np.asarray(trace.z, dtype=float), expected.values, rtol=1e-10)
    assert list(trace.y) == ["blocks.1", "blocks.2", "pool"] and list(trace.x) == ["blocks.0", "blocks.2", "head"]
    assert heatmap.layout.title.text == expected.title and "rbf CKA (biased)" in heatmap.layout.title.text
    assert "Done" in explorer.status.value and not explorer.compute_button.disabled
    # the first teacher layer's row is shown until a cell is clicked
    np.testing.assert_allclose(explorer.row_plot.data[0].y, expected.values[0])

    calls = []
    monkeypatch.setattr(gap_explorer_module, "cka_matrix", lambda *args, **kwargs: calls.append(args))
    click(explorer, row=2, column=1)
    assert calls == []  # the row comes from result.values, nothing is recomputed
    bars = explorer.row_plot.data[0]
    assert list(bars.x) == ["blocks.0", "blocks.2", "head"]
    np.testing.assert_allclose(np.asarray(bars.y, dtype=float), expected.values[2], rtol=1e-12)
    assert "pool" in explorer.row_plot.layout.title.text
    assert explorer.selected_teacher_layer == "pool"
    assert list(bars.marker.color).count(bars.marker.color[1]) == 1  # the clicked student layer stands out
    (shape,) = explorer.heatmap.layout.shapes
    assert (shape.y0, shape.y1) == (1.5, 2.5)
    assert hook_count(teacher) == 0 and hook_count(student) == 0


def test_recompute_replaces_the_heatmap_and_keeps_the_selected_row(explorer):
    explorer.compute()
    click(explorer, row=1, column=0)
    explorer.kernel.value = "rbf"
    explorer.student_layers.value = ("blocks.2", "head")
    result = explorer.compute()
    assert result.kernel == "rbf" and result.values.shape == (3, 2)
    np.testing.assert_allclose(np.asarray(explorer.heatmap.data[0].z, dtype=float), result.values)
    assert explorer.selected_teacher_layer == "blocks.1"
    np.testing.assert_allclose(np.asarray(explorer.row_plot.data[0].y, dtype=float), result.values[1])


class FailsOnSecondBatch(torch.nn.Module):
    """Wraps a model and raises on its second forward, after the probe's hooks are in place."""

    def __init__(self, model):
        super().__init__()
        self.model, self.calls = model, 0

    def forward(self, x):
        self.calls += 1
        if self.calls == 2:
            raise RuntimeError("simulated failure in the student")
        return self.model(x)


def test_a_failing_computation_is_shown_keeps_the_last_result_and_leaves_no_hooks(conv_pair, images, hook_count):
    teacher, student = conv_pair
    failing = FailsOnSecondBatch(student)
    explorer = GapExplorer(teacher, failing, images[:128], **SETTINGS)
    explorer.student_layers.value = ("model.blocks.0", "model.head")
    explorer.compute_button.click()  # the first batch passes, the second raises
    assert isinstance(explorer.error, RuntimeError)
    assert "Error" in explorer.status.value and "simulated failure in the student" in explorer.status.value
    assert explorer.result is None and not explorer.compute_button.disabled
    assert hook_count(teacher) == 0 and hook_count(failing) == 0
    assert "simulated failure" in explorer.progress.outputs[-1]["text"]  # the traceback, under the status

    explorer.n_samples.value = 64  # one batch only: succeeds, then a failure keeps that result on show
    good = explorer.compute()
    explorer.n_samples.value = 128
    failing.calls = 0
    with pytest.raises(RuntimeError, match="simulated failure"):
        explorer.compute()
    assert explorer.result is good
    np.testing.assert_allclose(np.asarray(explorer.heatmap.data[0].z, dtype=float), good.values)
    assert hook_count(teacher) == 0 and hook_count(failing) == 0


def test_bad_choices_are_reported_before_anything_runs(explorer, conv_pair, images):
    explorer.teacher_layers.value = ()
    explorer.compute_button.click()
    assert "choose at least one teacher layer" in explorer.status.value and explorer.result is None
    teacher, student = conv_pair
    with pytest.raises(TypeError, match="unknown cka_matrix arguments \\['batchsize'\\]"):
        GapExplorer(teacher, student, images, batchsize=32)
    with pytest.raises(ValueError, match="kernel must be one of"):
        GapExplorer(teacher, student, images, kernel="cosine")
    with pytest.raises(KeyError, match="no layer matching 'block.9'"):
        GapExplorer(teacher, student, images, teacher_layers=["block.9"])


def test_a_click_before_computing_does_nothing(explorer):
    explorer.select_row(explorer.heatmap.data[0], Points([[0, 0]], ["a"], ["b"], None, 0), None)
    assert explorer.result is None and explorer.error is None
    with pytest.raises(RuntimeError, match="press Compute"):
        explorer.show_row(0)
