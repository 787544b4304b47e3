"""GapExplorer without a browser: drive the controls, press Compute, click a cell, check the figures
against an independent ``cka_matrix`` call and that no hooks are left on either model; layer pickers on
a real ResNet, model names in titles, the sample-size warning, the colour range, and a computation in a
background thread that reports progress and can be cancelled between batches."""
from __future__ import annotations

import threading

import numpy as np
import plotly.graph_objects as go
import pytest
import torch
from plotly.callbacks import Points

import widgets.gap_explorer as gap_explorer_module
from widgets import GapExplorer
from workbench import layer_names, stage_names
from workbench.models import count_parameters
from workbench.probes.sample_size import sample_size_warning
from workbench.similarity import cka_matrix

SETTINGS = {"batch_size": 64, "device": "cpu", "progress": False}
SECONDS = 60  # a safety net for a thread that never ends, not a timing assertion


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


def press_compute(explorer: GapExplorer):
    """Press Compute (a background thread) and wait for it; returns the result (None if cancelled)."""
    explorer.compute_button.click()
    return explorer.wait(SECONDS)


@pytest.fixture
def explorer(conv_pair, images):
    teacher, student = conv_pair
    return GapExplorer(teacher, student, images[:128], **SETTINGS)


def test_controls_default_to_the_stages(explorer, conv_pair):
    teacher, student = conv_pair
    assert explorer.teacher_layers.table["name"].tolist() == layer_names(teacher)
    assert explorer.teacher_layers.value == tuple(stage_names(teacher))
    assert explorer.student_layers.value == tuple(stage_names(student))
    assert explorer.teacher_layers.view.value == "stages"
    assert explorer.teacher_layers.listed == tuple(stage_names(teacher))
    assert (explorer.kernel.value, explorer.debiased.value, explorer.n_samples.value) == ("linear", True, 128)
    assert explorer.colour_range.value == "fixed" and explorer.cancel_button.disabled
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

    assert press_compute(explorer) is explorer.result

    expected = cka_matrix(
        teacher, student, images[:96], ["blocks.1", "blocks.2", "pool"], ["blocks.0", "blocks.2", "head"],
        kernel="rbf", debiased=False, **SETTINGS,
    )
    assert explorer.error is None, explorer.status.value
    np.testing.assert_allclose(explorer.result.values, expected.values, rtol=1e-10)
    assert explorer.heatmap is heatmap and explorer.heatmap.data[0] is trace  # updated in place
    np.testing.assert_allclose(np.asarray(trace.z, dtype=float), expected.values, rtol=1e-10)
    assert list(trace.y) == ["blocks.1", "blocks.2", "pool"] and list(trace.x) == ["blocks.0", "blocks.2", "head"]
    title = heatmap.layout.title.text.replace("<br>", " ")
    assert title == explorer.result.title and "rbf CKA (biased)" in title
    assert "Done" in explorer.status.value and not explorer.compute_button.disabled
    assert explorer.cancel_button.disabled and not explorer.running
    # two batches of 64 for 96 samples: the bar is full
    assert (explorer.progress.value, explorer.progress.max) == (2, 2)
    assert explorer.progress_text.value == "2/2 batches · 96 samples"
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


# ---------------------------------------------------------------------- layer pickers on a real model
def test_pickers_on_resnet18_filter_show_type_and_shape_and_keep_the_selection():
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    teacher = timm.create_model("resnet18", pretrained=False, num_classes=10)
    student = timm.create_model("resnet10t", pretrained=False, num_classes=10)
    explorer = GapExplorer(teacher, student, torch.randn(8, 3, 32, 32), batch_size=4, device="cpu")
    picker = explorer.teacher_layers
    assert picker.value == tuple(stage_names(teacher)) == ("act1", "layer1", "layer2", "layer3", "layer4")
    assert picker.listed == picker.value  # the "stages" view
    labels = dict((value, label) for label, value in picker.select.options)
    assert labels["layer2"] == "layer2 · Sequential · 128×4×4"  # 32 px: stem /4, then /2 per stage
    assert labels["act1"] == "act1 · ReLU · 64×16×16"

    picker.view.value = "all"
    assert len(picker.listed) == 93 == len(list(teacher.named_modules())) - 1
    picker.view.value = "leaf"
    leaves = [name for name, module in teacher.named_modules() if name and not list(module.children())]
    assert picker.listed == tuple(leaves)
    picker.view.value = "all"
    picker.filter.value = "layer*"  # a selector glob: '*' stays within one dotted level
    assert picker.listed == ("layer1", "layer2", "layer3", "layer4")
    picker.filter.value = "layer3.**.conv?"
    assert picker.listed == ("layer3.0.conv1", "layer3.0.conv2", "layer3.1.conv1", "layer3.1.conv2")
    picker.filter.value = "batchnorm"  # plain text: a substring of the name or the type
    assert len(picker.listed) == sum(type(m).__name__ == "BatchNorm2d" for m in teacher.modules())

    # choosing in a filtered list adds to the selection; what the filter hides stays selected
    picker.filter.value = "layer3.0.conv"
    picker.select.value = ("layer3.0.conv1",)  # what a click in the list does
    assert picker.value == ("act1", "layer1", "layer2", "layer3", "layer3.0.conv1", "layer4")
    assert "<b>6</b> of 93 selected" in picker.count.value and "5 selected not listed" in picker.count.value
    picker.select.value = ()  # deselecting the listed one leaves the hidden five
    assert picker.value == ("act1", "layer1", "layer2", "layer3", "layer4")
    picker.filter.value = ""
    assert picker.select.value == picker.value
    with pytest.raises(KeyError, match="no layer 'layer5'.*closest names"):
        picker.value = ("layer5",)


def test_a_timm_vit_pair_lists_token_shapes_and_computes_what_cka_matrix_computes(hook_count):
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    vit = dict(pretrained=False, img_size=32, patch_size=8, num_classes=10)
    teacher = timm.create_model("vit_tiny_patch16_224", **vit).eval()
    student = timm.create_model("vit_tiny_patch16_224", depth=4, embed_dim=96, num_heads=3, **vit).eval()
    images = torch.randn(64, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    explorer = GapExplorer(teacher, student, images, batch_size=32, device="cpu", progress=False)
    assert explorer.teacher_layers.value == tuple(f"blocks.{index}" for index in range(12))
    assert explorer.student_layers.value == tuple(f"blocks.{index}" for index in range(4))
    tokens = (32 // 8) ** 2 + 1  # 16 patches and the class token
    labels = dict((value, label) for label, value in explorer.student_layers.select.options)
    assert labels["blocks.3"] == f"blocks.3 · Block · {tokens}×96"
    explorer.teacher_layers.value = ("blocks.0", "blocks.5", "blocks.11")
    result = explorer.compute()
    expected = cka_matrix(teacher, student, images, ["blocks.0", "blocks.5", "blocks.11"], "stages",
                          batch_size=32, device="cpu", progress=False)
    np.testing.assert_allclose(result.values, expected.values, rtol=1e-10)
    assert result.teacher_name == explorer.teacher_name and "teacher VisionTransformer" in result.teacher_name
    assert hook_count(teacher) == 0 and hook_count(student) == 0


# ---------------------------------------------------------------------- titles
def test_model_names_reach_the_title_and_the_result(conv_pair, images):
    teacher, student = conv_pair  # two ConvNets: the old title read "ConvNet vs ConvNet"
    explorer = GapExplorer(teacher, student, images[:128], **SETTINGS)
    assert explorer.teacher_name == f"teacher ConvNet ({count_parameters(teacher) / 1e3:.1f}k parameters)"
    assert explorer.student_name == f"student ConvNet ({count_parameters(student) / 1e3:.1f}k parameters)"
    assert explorer.teacher_name != explorer.student_name
    result = explorer.compute()
    assert (result.teacher_name, result.student_name) == (explorer.teacher_name, explorer.student_name)
    assert "teacher ConvNet" in explorer.heatmap.layout.title.text

    named = GapExplorer(teacher, student, images[:128], teacher_name="ResNet-ish", student_name="pruned", **SETTINGS)
    result = named.compute()
    assert (result.teacher_name, result.student_name) == ("ResNet-ish", "pruned")
    assert "ResNet-ish vs pruned" in named.heatmap.layout.title.text.replace("<br>", " ")


# ---------------------------------------------------------------------- sample-size warning
def test_too_few_samples_are_flagged_before_and_after_computing(explorer, conv_pair, images):
    assert "⚠" not in explorer.status.value  # 128 samples, debiased: enough
    explorer.n_samples.value = 5
    warning = sample_size_warning(5, "linear", True)
    assert warning is not None and "unreliable" in warning
    assert warning in explorer.status.value  # before computing
    explorer.teacher_layers.value = ("blocks.2",)
    explorer.student_layers.value = ("blocks.2",)
    result = explorer.compute()
    assert result.n_samples == 5
    assert "Done" in explorer.status.value and warning in explorer.status.value  # after computing
    explorer.n_samples.value = 128  # the next computation is fine, but the matrix shown is not
    assert f"The matrix shown: {warning}" in explorer.status.value
    explorer.compute()
    assert "⚠" not in explorer.status.value

    # the data's own size counts when n_samples is 0 (all)
    teacher, student = conv_pair
    small = GapExplorer(teacher, student, images[:20], n_samples=0, **SETTINGS)
    assert small.chosen_n_samples() == 20 and sample_size_warning(20) in small.status.value
    # the biased estimator's minimum grows with the widest chosen layer (features per sample)
    small.debiased.value = False
    width = 64 * 4 * 4  # the teacher's blocks.2: 64 channels at 4×4
    small.teacher_layers.value, small.student_layers.value = ("blocks.2",), ("head",)
    assert sample_size_warning(20, "linear", False, width) in small.status.value


# ---------------------------------------------------------------------- colour scale
def test_the_colour_range_toggle_changes_zmin_and_zmax_only(explorer, monkeypatch):
    result = explorer.compute()
    trace = explorer.heatmap.data[0]
    assert (trace.zmin, trace.zmax) == (0.0, 1.0)
    before = trace.to_plotly_json()
    calls = []
    monkeypatch.setattr(gap_explorer_module, "cka_matrix", lambda *args, **kwargs: calls.append(args))

    explorer.colour_range.value = "data"
    after = trace.to_plotly_json()
    assert (after["zmin"], after["zmax"]) == (float(np.nanmin(result.values)), float(np.nanmax(result.values)))
    assert (after["zmin"], after["zmax"]) != (0.0, 1.0)
    assert {key: value for key, value in after.items() if key not in ("zmin", "zmax")}.keys() == \
        {key for key in before if key not in ("zmin", "zmax")}
    for key in before:
        if key not in ("zmin", "zmax"):
            np.testing.assert_equal(after[key], before[key])
    assert calls == [] and explorer.result is result

    explorer.colour_range.value = "fixed"
    assert (trace.zmin, trace.zmax) == (0.0, 1.0)


# ---------------------------------------------------------------------- background computation
class Gate(torch.nn.Module):
    """Wraps a model; its ``block_at``-th forward waits until the test opens the gate."""

    def __init__(self, model, block_at=2):
        super().__init__()
        self.model, self.block_at, self.calls = model, block_at, 0
        self.reached, self.release = threading.Event(), threading.Event()

    def forward(self, x):
        self.calls += 1
        if self.calls == self.block_at:
            self.reached.set()
            assert self.release.wait(SECONDS), "the test never opened the gate"
        return self.model(x)


def test_compute_runs_in_a_thread_shows_progress_and_cancel_removes_the_hooks(conv_pair, images, hook_count):
    teacher, student = conv_pair
    gate = Gate(teacher)
    explorer = GapExplorer(gate, student, images[:192], **SETTINGS)  # three batches of 64
    gate.calls = 0  # the pickers' shape forward is not part of the computation
    explorer.compute_button.click()
    assert gate.reached.wait(SECONDS)
    # the computation is inside its second batch and this thread is free: the kernel would be too
    assert explorer.running and explorer.compute_button.disabled and not explorer.cancel_button.disabled
    assert (explorer.progress.value, explorer.progress.max) == (1, 3)
    assert explorer.progress_text.value == "1/3 batches · 64 samples"
    assert "Computing linear CKA" in explorer.status.value
    assert hook_count(gate) > 0  # capture's hooks are in place while it runs
    with pytest.raises(RuntimeError, match="already running"):
        explorer.compute()

    explorer.cancel_button.click()
    assert "Cancelling" in explorer.status.value
    gate.release.set()
    assert explorer.wait(SECONDS) is None
    assert "Cancelled after 2 of 3 batches" in explorer.status.value
    assert explorer.result is None and explorer.error is None and not explorer.running
    assert all(not module._forward_hooks for module in gate.modules())
    assert hook_count(student) == 0 and gate.calls == 2  # stopped between batches: the third never ran
    assert not explorer.compute_button.disabled and explorer.cancel_button.disabled

    # the next press computes in full, and the result matches the synchronous one
    result = press_compute(explorer)
    np.testing.assert_allclose(result.values, explorer.compute().values, rtol=1e-12)


def test_cka_matrix_reports_each_batch_and_a_raise_stops_it(conv_pair, images, hook_count):
    teacher, student = conv_pair
    seen = []
    with_hook = cka_matrix(teacher, student, images[:150], **SETTINGS, on_batch=lambda *done: seen.append(done))
    assert seen == [(1, 64), (2, 128), (3, 150)]
    np.testing.assert_array_equal(with_hook.values, cka_matrix(teacher, student, images[:150], **SETTINGS).values)

    def stop_after_first(batches, samples):
        raise KeyError("stop")

    with pytest.raises(KeyError, match="stop"):
        cka_matrix(teacher, student, images[:150], **SETTINGS, on_batch=stop_after_first)
    assert hook_count(teacher) == 0 and hook_count(student) == 0


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
    failing.calls = 0
    explorer.compute_button.click()  # in a thread: the first batch passes, the second raises
    with pytest.raises(RuntimeError, match="simulated failure"):
        explorer.wait(SECONDS)
    assert isinstance(explorer.error, RuntimeError)
    assert "Error" in explorer.status.value and "simulated failure in the student" in explorer.status.value
    assert explorer.result is None and not explorer.compute_button.disabled
    assert hook_count(teacher) == 0 and hook_count(failing) == 0
    assert "simulated failure" in explorer.details.outputs[-1]["text"]  # the traceback, under the status
    assert explorer.progress.bar_style == "danger"

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
    assert explorer.compute_async() is None
    assert "choose at least one teacher layer" in explorer.status.value and explorer.result is None
    assert isinstance(explorer.error, ValueError) and not explorer.running
    teacher, student = conv_pair
    with pytest.raises(TypeError, match="unknown cka_matrix arguments \\['batchsize'\\]"):
        GapExplorer(teacher, student, images, batchsize=32)
    with pytest.raises(TypeError, match="unknown cka_matrix arguments \\['on_batch'\\]"):
        GapExplorer(teacher, student, images, on_batch=print)
    with pytest.raises(ValueError, match="kernel must be one of"):
        GapExplorer(teacher, student, images, kernel="cosine")
    with pytest.raises(KeyError, match="no layer matching 'block.9'"):
        GapExplorer(teacher, student, images, teacher_layers=["block.9"])


def test_a_click_before_computing_does_nothing(explorer):
    explorer.select_row(explorer.heatmap.data[0], Points([[0, 0]], ["a"], ["b"], None, 0), None)
    assert explorer.result is None and explorer.error is None
    with pytest.raises(RuntimeError, match="press Compute"):
        explorer.show_row(0)
