"""TrainingMonitor without a browser: run short fits with it and check that its figures hold exactly the
history's and the trajectory's values, that it redraws only every ``every`` steps, and that it is reusable."""
from __future__ import annotations

import numpy as np
import plotly.graph_objects as go
import pytest
import torch

from widgets import TrainingMonitor
from workbench.losses import KD, FitNet
from workbench.similarity import CKATrajectory
from workbench.train import Distiller, fit

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
    fit(distiller, data, callbacks=[monitor], **SETTINGS)  # reused: starts again from the new run's rows
    assert monitor.trajectory.steps == [0, 4, 8] and len(monitor.loss_plot.data[0].x) == 8


def test_bad_arguments_say_what_is_right(setup):
    _, _, _, probe = setup
    with pytest.raises(ValueError, match="every must be a positive"):
        TrainingMonitor(every=0)
    with pytest.raises(ValueError, match="not both"):
        TrainingMonitor(CKATrajectory(probe), probe_data=probe)
    with pytest.raises(TypeError, match="only apply with probe_data"):
        TrainingMonitor(cka_every=3)
