"""OFAExplorer without a browser: run short OFA-KD fits with it and check that its branch-loss traces are the
history's branch columns, that its branch-accuracy traces are each branch's held-out accuracy at every epoch's
end — counted here by hand from the student's stage outputs and the branches' logits, and equal to
``branch_accuracy`` — beside the head's (``fit``'s own eval accuracy on the same data), that any term with a
branch counts, that a model or a Distiller without branches is said to have none, and that Stop works as in
the monitor."""
from __future__ import annotations

import asyncio

import numpy as np
import pytest
import torch
from torch import nn

from test_training_monitor import At, _wait_for
from widgets import OFAExplorer, TrainingMonitor
from workbench import models
from workbench.losses import KD, ofa_terms
from workbench.losses.base import Term
from workbench.probes import branch_accuracy
from workbench.train import Distiller, fit
from workbench.train.callbacks import Callback

SETTINGS = {"batch_size": 25, "device": "cpu", "progress": False, "lr": 3e-3}


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py: one torch thread


@pytest.fixture
def setup(conv_pair, images):
    """A CNN teacher and a ViT student (two blocks: two token branches), labels the teacher can learn."""
    teacher, _ = conv_pair
    torch.manual_seed(0)
    student = models.create("vit", img_size=16, patch_size=4, in_chans=3, dim=32, depth=2, heads=2, num_classes=5)
    with torch.no_grad():
        labels = teacher(images).argmax(1)  # learnable: the branches' accuracies move apart from chance
    data, held_out = (images[:200], labels[:200]), (images[200:], labels[200:])
    return teacher, student, data, held_out


class HandCount(Callback):
    """At each epoch's end, each branch's and the head's top-1 accuracy on ``data``, counted from forward
    hooks on the student's stages and each term's ``logits`` (no workbench probe involved)."""

    def __init__(self, data, batch_size=40):
        self.data, self.batch_size, self.counts = data, batch_size, []

    def on_epoch_end(self, state):
        distiller = state.distiller
        branches = {name: distiller.layers[name][1] for name, term in distiller.terms.items() if hasattr(term, "branch")}
        modes = [(module, module.training) for module in distiller.modules()]
        features, hooks = {}, []
        for layer in set(branches.values()):
            hooks.append(distiller.student.get_submodule(layer).register_forward_hook(
                lambda module, args, output, layer=layer: features.__setitem__(layer, output)))
        hits, head = dict.fromkeys(branches, 0), 0
        x, y = self.data
        try:
            distiller.eval()
            with torch.no_grad():
                for start in range(0, len(x), self.batch_size):
                    inputs, targets = x[start:start + self.batch_size], y[start:start + self.batch_size]
                    head += int((distiller.student(inputs).argmax(1) == targets).sum())
                    for name, layer in branches.items():
                        logits = distiller.terms[name].logits(features[layer])
                        hits[name] += int((logits.argmax(1) == targets).sum())
        finally:
            for hook in hooks:
                hook.remove()
            for module, training in modes:
                module.training = training
        self.counts.append(({name: count / len(x) for name, count in hits.items()}, head / len(x)))


def _ys(figure):
    return {trace.name: np.asarray(trace.y, dtype=float) for trace in figure.data}


def test_branch_plots_hold_the_history_and_the_held_out_accuracy(setup):
    teacher, student, data, held_out = setup
    setup_keywords = ofa_terms(teacher, student, data, seed=0)
    distiller = Distiller(teacher, student, **setup_keywords)
    explorer = OFAExplorer(held_out, every=4, batch_size=40)
    assert isinstance(explorer, TrainingMonitor)
    hand = HandCount(held_out)
    history = fit(distiller, data, held_out, epochs=3, callbacks=[explorer, hand], **SETTINGS)  # 8 steps an epoch

    stages = setup_keywords.stages
    assert stages == ["blocks.0", "blocks.1"]
    assert explorer.branches == {term: layer for layer, term in setup_keywords.columns.items()}
    # branch losses: each branch's history column (its unweighted term value per step), then the head's OFA term
    loss = explorer.branch_loss_plot.data
    assert [trace.name for trace in loss] == [*stages, "head: ofa"]
    for trace, column in zip(loss, [*setup_keywords.columns.values(), setup_keywords.final]):
        assert list(trace.x) == history["step"].tolist()
        np.testing.assert_array_equal(np.asarray(trace.y, dtype=float), history[column].to_numpy())
    assert loss[-1].line.dash == "dash" and loss[0].line.color != loss[1].line.color

    # branch accuracy: one point per epoch end, each branch's hand count, and the head's = fit's eval accuracy
    accuracy = explorer.branch_accuracy_plot.data
    assert [trace.name for trace in accuracy] == [*stages, "head"]
    evaluated = history.dropna(subset=["eval_accuracy"])
    assert all(list(trace.x) == evaluated["step"].tolist() == [8, 16, 24] for trace in accuracy)
    ys = _ys(explorer.branch_accuracy_plot)
    for stage, column in setup_keywords.columns.items():
        np.testing.assert_array_equal(ys[stage], [branches[column] for branches, _ in hand.counts])
    np.testing.assert_array_equal(ys["head"], [head for _, head in hand.counts])
    np.testing.assert_array_equal(ys["head"], evaluated["eval_accuracy"].to_numpy())
    assert len({round(value, 6) for values in ys.values() for value in values}) > 2  # not all the same number

    # the last point is what branch_accuracy gives on the trained distiller
    final = branch_accuracy(distiller, held_out, batch_size=64, device="cpu")
    assert [ys[stage][-1] for stage in stages] == final.accuracy and ys["head"][-1] == final.final_accuracy
    frame = explorer.accuracy_frame()
    assert frame.shape == (3 * 3, 6) and frame["epoch"].tolist() == [1, 1, 1, 2, 2, 2, 3, 3, 3]
    assert frame[frame.epoch == 3]["accuracy"].tolist() == [*final.accuracy, final.final_accuracy]
    status = explorer.branch_status.value
    assert status.startswith("2 branches at blocks.0, blocks.1 · epoch 3, held-out accuracy (100 samples)")
    assert f"<b>head {final.final_accuracy:.1%}</b>" in status and f"blocks.1 {final.accuracy[1]:.1%}" in status
    assert "done" in explorer.status.value  # the monitor's own status line


class PooledBranch(Term):
    """Not an OFA term: a linear probe on a stage's pooled map, trained by cross-entropy on the teacher's
    top class — any term with a ``branch`` and ``logits`` counts as a branch."""

    def __init__(self, channels, classes):
        super().__init__()
        self.branch = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(channels, classes))

    def logits(self, features):
        return self.branch(features)

    def forward(self, student, teacher, targets=None):
        return nn.functional.cross_entropy(self.logits(student), teacher.argmax(1))


def test_any_term_with_a_branch_counts_and_the_rest_do_not(conv_pair, images):
    teacher, student = conv_pair
    with torch.no_grad():
        labels = teacher(images).argmax(1)
    data, held_out = (images[:200], labels[:200]), (images[200:], labels[200:])
    distiller = Distiller(teacher, student.train(), {"kd": KD(T=4), "probe@1": PooledBranch(16, 5),
                                                     "probe@0": PooledBranch(8, 5)},
                          layers={"probe@1": ("logits", "blocks.1"), "probe@0": ("logits", "blocks.0")})
    explorer = OFAExplorer(held_out, every=100)
    hand = HandCount(held_out)
    history = fit(distiller, data, held_out, epochs=2, callbacks=[explorer, hand], **SETTINGS)
    # in the student's layer order, whatever the order of the terms; KD (on the logits) is the head's term
    assert explorer.branches == {"probe@0": "blocks.0", "probe@1": "blocks.1"}
    assert [trace.name for trace in explorer.branch_loss_plot.data] == ["blocks.0", "blocks.1", "head: kd"]
    np.testing.assert_array_equal(_ys(explorer.branch_loss_plot)["blocks.1"], history["probe@1"].to_numpy())
    ys = _ys(explorer.branch_accuracy_plot)
    np.testing.assert_array_equal(ys["blocks.0"], [branches["probe@0"] for branches, _ in hand.counts])
    np.testing.assert_array_equal(ys["head"], history["eval_accuracy"].dropna().to_numpy())


def test_a_run_without_branches_says_so_and_the_next_run_starts_afresh(setup):
    teacher, student, data, held_out = setup
    explorer = OFAExplorer(held_out, every=4)
    assert explorer.branch_status.value.startswith("branches: waiting for fit")

    explorer.start_run("kd")
    history = fit(Distiller(teacher, student, {"kd": KD(T=4)}), data, held_out, callbacks=[explorer], **SETTINGS)
    status = explorer.branch_status.value
    assert status.startswith("<b>no branches</b>: none of this Distiller's terms (kd) has a <code>.branch</code>")
    assert "ofa_terms" in status and explorer.results == [] and explorer.accuracy_frame().empty
    assert explorer.branch_loss_plot.data == () and explorer.branch_accuracy_plot.data == ()
    np.testing.assert_array_equal(explorer.loss_plot.data[0].y, history["loss"].to_numpy())  # the monitor works

    explorer.start_run("plain")
    fit(nn.Sequential(nn.Flatten(), nn.Linear(3 * 16 * 16, 5)), data, held_out, callbacks=[explorer], **SETTINGS)
    assert explorer.branch_status.value.startswith("<b>no branches</b>: the model trained is not a Distiller")

    explorer.start_run("ofa")
    distiller = Distiller(teacher, student, **ofa_terms(teacher, student, data, stages=["blocks.1"]))
    fit(distiller, data, held_out, callbacks=[explorer], **SETTINGS)
    assert [trace.name for trace in explorer.branch_loss_plot.data] == ["blocks.1", "head: ofa"]
    assert len(explorer.results) == 1 and explorer.branch_status.value.startswith("1 branch at blocks.1 · epoch 1")
    # the monitor's plots still overlay all three runs
    assert [trace.name for trace in explorer.accuracy_plot.data] == ["kd", "plain", "ofa"]


def test_without_held_out_data_only_the_losses(setup):
    teacher, student, data, _ = setup
    explorer = OFAExplorer(every=4)
    history = fit(Distiller(teacher, student, **ofa_terms(teacher, student, data)), data, callbacks=[explorer],
                  **SETTINGS)
    assert "no held-out data" in explorer.branch_accuracy_plot.layout.title.text
    assert explorer.branch_accuracy_plot.data == () and explorer.results == []
    assert "pass OFAExplorer(data=...)" in explorer.branch_status.value
    np.testing.assert_array_equal(explorer.branch_loss_plot.data[0].y, history["ofa@blocks_0"].to_numpy())


def test_bad_arguments_say_what_is_right():
    with pytest.raises(ValueError, match="batch_size must be a positive integer"):
        OFAExplorer(batch_size=0)
    with pytest.raises(ValueError, match="every must be a positive"):  # the monitor's own checks
        OFAExplorer(every=0)


def test_stop_ends_the_run_and_the_cut_epoch_is_not_measured(setup):
    teacher, student, data, held_out = setup
    distiller = Distiller(teacher, student, **ofa_terms(teacher, student, data, gamma=1.2))
    explorer = OFAExplorer(held_out, every=2)
    seen = {}

    def click_stop(state):  # a click on Stop, from the kernel's event loop while the worker trains
        seen["enabled"] = not explorer.stop_button.disabled
        seen["loop"].call_soon_threadsafe(explorer.stop_button.click)
        _wait_for(lambda: explorer._stop_request is not None)  # the click is handled before the next step

    async def train():
        seen["loop"] = asyncio.get_running_loop()
        return await explorer.run(fit, distiller, data, held_out, epochs=3, callbacks=[explorer, At(11, click_stop)],
                                  **SETTINGS)

    history = asyncio.run(train())
    assert seen["enabled"] and len(history) == 12  # epoch 2 cut at step 12
    assert "interrupted at epoch 2, step 12 (stop button)" in explorer.status.value
    assert [(epoch, step) for epoch, step, _ in explorer.results] == [(1, 8)]  # epoch 2 was not measured
    assert all(len(trace.x) == 12 for trace in explorer.branch_loss_plot.data)
    assert explorer.stop_button.disabled


def test_layout_the_branch_row_comes_first_and_nothing_has_a_fixed_width(setup):
    _, _, _, held_out = setup
    explorer = OFAExplorer(held_out)
    assert explorer.plots[:2] == [explorer.branch_loss_plot, explorer.branch_accuracy_plot]
    assert explorer.children[2].children == (explorer.branch_status,)
    row = explorer.children[3]
    assert [box.children[0] for box in row.children] == explorer.plots[:2] and row.layout.flex_flow == "row wrap"
    for figure in explorer.plots:
        assert figure.layout.width is None and figure.layout.autosize is True
    assert {"kd-ofa-explorer", "kd-training-monitor"} <= set(explorer._dom_classes)
