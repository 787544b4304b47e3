"""TrainingMonitor without a browser: run short fits with it and check that its figures hold exactly the
history's and the trajectory's values, that it redraws only every ``every`` steps, that it overlays the
runs it watched, that the status tells a completed run from an interrupted one, that Stop (through
``await monitor.run(...)``) and Ctrl-C end a run after a step, and that its figures have no fixed width."""
from __future__ import annotations

import asyncio
import threading

import ipywidgets
import numpy as np
import plotly.graph_objects as go
import pytest
import torch

from widgets import TrainingMonitor
from workbench.losses import KD, FitNet
from workbench.similarity import CKATrajectory
from widgets.training_runs import EARLIER_OPACITY
from workbench.train import Distiller, fit
from workbench.train.callbacks import Callback

SETTINGS = {"batch_size": 25, "device": "cpu", "progress": False, "lr": 1e-2}


@pytest.fixture
def setup(conv_pair, images):
    teacher, student = conv_pair
    labels = torch.arange(len(images)) % 5
    data = (images[:200], labels[:200])
    held_out = (images[200:], labels[200:])
    distiller = Distiller(teacher, student, {"kd": (KD(T=4), 1.0), "hint": (FitNet(), 0.5)},
                          layers={"hint": ("blocks.1", "blocks.1")})
    return distiller, data, held_out, images[:64]


def _xy(trace):
    return list(trace.x), np.asarray(trace.y, dtype=float)


def test_figures_hold_the_history_and_the_trajectory(setup):
    distiller, data, held_out, probe = setup
    trajectory = CKATrajectory(probe, ["blocks.1", "blocks.2"], ["blocks.1", "blocks.2"], every=3, batch_size=32)
    monitor = TrainingMonitor(trajectory, every=4)
    loss_plot, cka_plot = monitor.loss_plot, monitor.cka_plot
    # the order the spec names: the monitor before the trajectory; it still gets every point
    history = fit(distiller, data, held_out, epochs=2, callbacks=[monitor, trajectory], **SETTINGS)

    assert isinstance(loss_plot, go.FigureWidget) and monitor.loss_plot is loss_plot and monitor.cka_plot is cka_plot
    assert [trace.name for trace in loss_plot.data] == ["loss", "ce", "kd", "hint"]
    for trace in loss_plot.data:
        x, y = _xy(trace)
        assert x == history["step"].tolist()
        np.testing.assert_array_equal(y, history[trace.name].to_numpy())

    evaluated = history.dropna(subset=["eval_accuracy"])
    (accuracy,) = monitor.accuracy_plot.data
    x, y = _xy(accuracy)
    assert x == evaluated["step"].tolist() == [8, 16]
    np.testing.assert_array_equal(y, evaluated["eval_accuracy"].to_numpy())

    assert trajectory.steps == [0, 3, 6, 9, 12, 15, 16]
    names = [f"{t} ↔ {s}" for t, s in trajectory.pairs("auto")]
    assert [trace.name for trace in cka_plot.data] == names and len(names) == 4
    for trace, (teacher_layer, student_layer) in zip(cka_plot.data, trajectory.pairs("auto")):
        x, y = _xy(trace)
        assert x == trajectory.steps
        i, j = trajectory.teacher_names.index(teacher_layer), trajectory.student_names.index(student_layer)
        np.testing.assert_array_equal(y, trajectory.values[:, i, j])
    assert "done" in monitor.status.value and "eval accuracy" in monitor.status.value


def test_redraws_are_throttled(setup):
    distiller, data, _, _ = setup
    monitor = TrainingMonitor(every=5)
    fit(distiller, data, epochs=2, callbacks=[monitor], **SETTINGS)  # 16 steps
    # begin, steps 5, 10, 15, two epoch ends, the end: 7 redraws, not 16
    assert monitor.refreshes == 7
    assert len(monitor.loss_plot.data[0].x) == 16
    assert monitor.accuracy_plot.data == ()  # no evaluation data, no accuracy trace
    assert monitor.trajectory is None and monitor.cka_plot not in monitor.children[2:]


def test_own_trajectory_and_reuse(setup):
    distiller, data, _, probe = setup
    monitor = TrainingMonitor(probe_data=probe, teacher_layers=["blocks.2"], student_layers=["blocks.2"],
                              every=2, cka_every=4, batch_size=32)
    fit(distiller, data, callbacks=[monitor], **SETTINGS)  # 8 steps; the monitor runs its trajectory
    assert monitor.trajectory.steps == [0, 4, 8]
    np.testing.assert_array_equal(monitor.cka_plot.data[0].y, monitor.trajectory.values[:, 0, 0])

    plain = TrainingMonitor(every=3)  # a plain model: only the total loss
    history = fit(torch.nn.Linear(3 * 16 * 16, 5), (data[0].flatten(1), data[1]), callbacks=[plain], **SETTINGS)
    assert [trace.name for trace in plain.loss_plot.data] == ["loss"]
    np.testing.assert_array_equal(plain.loss_plot.data[0].y, history["loss"].to_numpy())
    fit(distiller, data, callbacks=[monitor], **SETTINGS)  # reused: a second run, its trajectory from scratch
    assert monitor.trajectory.steps == [0, 4, 8] and [run.name for run in monitor.runs] == ["run 1", "run 2"]
    assert [len(trace.x) for trace in monitor.loss_plot.data] == [8] * 8  # both runs' loss, ce, kd, hint


def test_bad_arguments_say_what_is_right(setup):
    _, _, _, probe = setup
    with pytest.raises(ValueError, match="every must be a positive"):
        TrainingMonitor(every=0)
    with pytest.raises(ValueError, match="not both"):
        TrainingMonitor(CKATrajectory(probe), probe_data=probe)
    with pytest.raises(TypeError, match="only apply with probe_data"):
        TrainingMonitor(cka_every=3)


class At(Callback):
    """Calls ``action(state)`` at the end of step ``step``."""

    def __init__(self, step, action):
        self.step, self.action = step, action

    def on_step_end(self, state):
        if state.step == self.step:
            self.action(state)


def test_runs_are_overlaid_and_labelled(setup):
    distiller, data, held_out, _ = setup
    monitor = TrainingMonitor(every=3)
    histories = {}
    for name, epochs in (("kd, seed 0", 2), ("kd, seed 1", 1)):
        monitor.start_run(name)
        histories[name] = fit(distiller, data, held_out, epochs=epochs, callbacks=[monitor], **SETTINGS)

    loss = monitor.loss_plot.data
    assert [(trace.legendgroup, trace.name) for trace in loss] == [
        (name, column) for name in histories for column in ("loss", "ce", "kd", "hint")]
    for trace in loss:  # every run keeps its own curves, exactly its history
        history = histories[trace.legendgroup]
        assert list(trace.x) == history["step"].tolist()
        np.testing.assert_array_equal(np.asarray(trace.y, dtype=float), history[trace.name].to_numpy())
        assert trace.legendgrouptitle.text == trace.legendgroup
        assert trace.opacity == (1.0 if trace.legendgroup == "kd, seed 1" else EARLIER_OPACITY)  # current stands out
    # a column keeps its colour across runs
    assert loss[0].line.color == loss[4].line.color != loss[1].line.color

    accuracy = monitor.accuracy_plot.data
    assert [trace.name for trace in accuracy] == list(histories)
    for trace in accuracy:
        evaluated = histories[trace.name].dropna(subset=["eval_accuracy"])
        assert list(trace.x) == evaluated["step"].tolist()
        np.testing.assert_array_equal(np.asarray(trace.y, dtype=float), evaluated["eval_accuracy"].to_numpy())
    assert len(accuracy[0].x) == 2 and len(accuracy[1].x) == 1
    assert monitor.status.value.startswith("kd, seed 1 · <b>done</b>")

    monitor.clear_runs()
    assert [trace.name for trace in monitor.loss_plot.data] == []
    with pytest.raises(ValueError, match="non-empty string"):
        monitor.start_run("  ")


def test_status_says_interrupted_at_epoch_and_step_or_done(setup):
    distiller, data, _, _ = setup
    monitor = TrainingMonitor(every=100)
    history = fit(distiller, data, epochs=3, callbacks=[monitor, At(11, lambda state: state.request_stop("budget"))],
                  **SETTINGS)
    assert len(history) == 11  # 8 steps an epoch: epoch 2, step 11
    assert "<b>interrupted at epoch 2, step 11 (budget)</b>" in monitor.status.value
    assert "done" not in monitor.status.value and "epoch 2/3" not in monitor.status.value
    assert monitor.runs[0].outcome == "interrupted at epoch 2, step 11 (budget)"

    fit(distiller, data, callbacks=[monitor], **SETTINGS)  # a completed run
    assert monitor.runs[1].outcome == "done" and "<b>done</b> · epoch 1/1 · step 8" in monitor.status.value


def test_stop_button_ends_a_run_trained_through_run(setup):
    distiller, data, _, _ = setup
    monitor = TrainingMonitor(every=2)
    seen = {}

    def click_stop(state):  # from the training thread: the click happens in the event loop's thread
        seen["enabled"], seen["thread"] = not monitor.stop_button.disabled, threading.current_thread()
        seen["loop"].call_soon_threadsafe(monitor.stop_button.click)
        _wait_for(lambda: monitor._stop_request is not None)  # the click is handled before the next step

    async def train():
        seen["loop"] = asyncio.get_running_loop()
        return await monitor.run(fit, distiller, data, epochs=4, callbacks=[monitor, At(5, click_stop)], **SETTINGS)

    history = asyncio.run(train())
    assert seen["enabled"] and seen["thread"] is not threading.main_thread()
    assert len(history) == 6  # the click came during step 5's callbacks: step 6 is the first to see it
    assert "interrupted at epoch 1, step 6 (stop button)" in monitor.status.value
    mark = history.attrs.get("interrupted")
    assert mark in (None, {"epoch": 1, "step": 6, "reason": "stop button"})  # None: fit without the mark yet
    assert monitor.stop_button.disabled and monitor.stop() is False  # no run under way: nothing to stop

    # a click left over (it arrived after its run ended) does not stop the next run
    monitor._stop_request = "stop button"
    assert len(fit(distiller, data, callbacks=[monitor], **SETTINGS)) == 8


def test_ctrl_c_while_awaiting_run_stops_after_the_step(setup):
    distiller, data, _, _ = setup
    monitor = TrainingMonitor(every=2)

    async def train():
        loop = asyncio.get_running_loop()
        task = asyncio.current_task()
        cancel = At(3, lambda state: loop.call_soon_threadsafe(task.cancel))  # what ipykernel does on SIGINT
        wait = At(4, lambda state: _wait_for(lambda: monitor._stop_request is not None))
        return await monitor.run(fit, distiller, data, epochs=4, callbacks=[monitor, cancel, wait], **SETTINGS)

    history = asyncio.run(train())  # the cell gets the history, not a CancelledError
    assert 4 <= len(history) < 32 and monitor.runs[0].outcome.endswith("(KeyboardInterrupt)")


def _wait_for(condition):
    for _ in range(500):
        if condition():
            return
        threading.Event().wait(0.01)


def test_plain_fit_keeps_the_stop_button_disabled_and_late_views_see_the_figure(setup):
    distiller, data, held_out, _ = setup
    monitor = TrainingMonitor(every=4)
    states = []
    history = fit(distiller, data, held_out, callbacks=[monitor, At(2, lambda s: states.append(
        monitor.stop_button.disabled))], **SETTINGS)
    assert states == [True]  # a blocking fit gets no clicks: the button says so instead of doing nothing
    assert "await monitor.run" in monitor.stop_button.tooltip
    # the state a view rendered now starts from (plotly's widget only updates views that exist)
    synced = monitor.loss_plot._widget_data
    assert [trace["name"] for trace in synced] == ["loss", "ce", "kd", "hint"]
    np.testing.assert_array_equal(np.asarray(synced[0]["y"], dtype=float), history["loss"].to_numpy())
    assert monitor.loss_plot._widget_layout["title"]["text"].startswith("loss terms")


def test_figures_have_no_fixed_width_and_the_row_wraps(setup):
    _, _, _, probe = setup
    monitor = TrainingMonitor(CKATrajectory(probe))
    assert monitor.plots == [monitor.loss_plot, monitor.accuracy_plot, monitor.cka_plot]
    for figure in monitor.plots:
        assert figure.layout.width is None and figure.layout.autosize is True
    row = next(child for child in monitor.children
               if isinstance(child, ipywidgets.HBox) and monitor.loss_plot in getattr(child.children[0], "children", ()))
    assert row.layout.flex_flow == "row wrap" and row.layout.width == "100%"
    for box in row.children:  # each plot's box shares the row and never grows past it
        assert box.layout.min_width == "0" and box.layout.max_width == "100%" and "px" not in str(box.layout.width)


def test_ctrl_c_in_a_blocking_fit_shows_interrupted_not_the_last_epoch(setup):
    pytest.importorskip("workbench.train.interrupt", reason="fit's Ctrl-C handling (issue 8, H1) is not in yet")
    import os
    import signal

    distiller, data, _, _ = setup
    monitor = TrainingMonitor(every=100)
    press = At(10, lambda state: os.kill(os.getpid(), signal.SIGINT))  # Ctrl-C during step 10's callbacks
    history = fit(distiller, data, epochs=25, callbacks=[monitor, press], **SETTINGS)
    assert len(history) < 25 * 8 and history.attrs["interrupted"]["reason"] == "KeyboardInterrupt"
    step, epoch = history.attrs["interrupted"]["step"], history.attrs["interrupted"]["epoch"]
    assert f"<b>interrupted at epoch {epoch}, step {step} (KeyboardInterrupt)</b>" in monitor.status.value
    assert "epoch 2/25" not in monitor.status.value
