"""workbench.train.fit with a Distiller: history, determinism, resume, NaN, callbacks, CKATrajectory."""
from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import torch
from torch.utils.data import TensorDataset

from spike_terms import Crash, CrashAt, SpikeAt
from workbench import models
from workbench.data import digits
from workbench.losses import KD, FitNet
from workbench.similarity import cka_matrix
from workbench.similarity import CKATrajectory
from workbench.train import Callback, Distiller, fit, latest_checkpoint
from workbench.train.checkpoint import list_checkpoints


@pytest.fixture(scope="module")
def data():
    x, y = digits("train", size=16).tensors
    return TensorDataset(x[:256], y[:256]), TensorDataset(x[256:384], y[256:384])


def _distiller(extra_terms=None, student_seed=None):
    torch.manual_seed(0)
    teacher = models.create("cnn", widths=(8, 16), img_size=16).eval()
    if student_seed is not None:
        torch.manual_seed(student_seed)
    student = models.create("cnn", widths=(4, 8), img_size=16)
    terms = {"kd": (KD(T=4), 1.0), "hint": (FitNet(), 0.5), **(extra_terms or {})}
    return Distiller(teacher, student, terms, layers={"hint": ("blocks.1", "blocks.1")})


def _weights(distiller):
    return {key: value.clone() for key, value in distiller.state_dict().items()}


def test_fit_distiller_history_eval_and_what_trains(data):
    train, test = data
    distiller = _distiller()
    teacher_before = {k: v.clone() for k, v in distiller.teacher.state_dict().items()}
    history = fit(distiller, train, test, epochs=2, batch_size=32, lr=3e-3, device="cpu", progress=False)
    assert list(history.columns) == ["epoch", "step", "loss", "ce", "kd", "hint", "lr", "eval_accuracy"]
    assert history["step"].tolist() == list(range(1, 17)) and history["epoch"].tolist() == [1] * 8 + [2] * 8
    recombined = history["ce"] + history["kd"] + 0.5 * history["hint"]
    np.testing.assert_allclose(history["loss"], recombined, rtol=1e-5)
    assert history["eval_accuracy"].notna().tolist() == [False] * 7 + [True] + [False] * 7 + [True]
    assert history["loss"].iloc[-4:].mean() < history["loss"].iloc[:4].mean()
    assert 0.0 <= history["eval_accuracy"].iloc[-1] <= 1.0
    for key, value in distiller.teacher.state_dict().items():
        assert torch.equal(value, teacher_before[key]), f"the teacher changed: {key}"
    assert not distiller.student.training and not distiller.teacher.training
    assert distiller.terms["hint"].projector is not None  # built by fit before the optimizer


def test_same_seed_same_history_other_seed_differs(data):
    train, _ = data
    runs = []
    for seed in (3, 3, 4):
        distiller = _distiller()
        history = fit(distiller, train, batch_size=64, device="cpu", seed=seed, progress=False)
        runs.append((history, _weights(distiller)))
    pd.testing.assert_frame_equal(runs[0][0], runs[1][0])
    assert all(torch.equal(runs[0][1][key], runs[1][1][key]) for key in runs[0][1])
    assert not runs[0][0]["loss"].equals(runs[2][0]["loss"])


def test_resume_reproduces_the_uninterrupted_run_exactly(data, tmp_path):
    train, test = data
    settings = dict(epochs=2, batch_size=32, lr=3e-3, device="cpu", seed=1, progress=False, schedule="cosine")
    probe = test.tensors[0][:64]
    reference, reference_cka = _distiller(), CKATrajectory(probe, every=4, batch_size=32)
    expected = fit(reference, train, test, callbacks=[reference_cka], **settings)

    interrupted = _distiller()
    with pytest.raises(Crash):
        fit(interrupted, train, test, checkpoint_dir=tmp_path, checkpoint_every=3,
            callbacks=[CKATrajectory(probe, every=4, batch_size=32), CrashAt(at_step=11)], **settings)
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step-000006", "step-000009"]  # the two newest kept
    state = json.loads((tmp_path / "step-000009" / "state.json").read_text())
    assert (state["step"], state["epoch"], state["batch_index"], len(state["history"])) == (9, 2, 1, 9)
    optimizer_state = torch.load(tmp_path / "step-000009" / "optimizer.pt", weights_only=True)
    assert set(optimizer_state) == {"optimizer", "scheduler"}

    resumed = _distiller(student_seed=5)  # another student init: its weights must come from the checkpoint
    trajectory = CKATrajectory(probe, every=4, batch_size=32)  # its points so far come from the checkpoint
    history = fit(resumed, train, test, checkpoint_dir=tmp_path, checkpoint_every=3, resume=True,
                  callbacks=[trajectory, Callback()], **settings)
    pd.testing.assert_frame_equal(history, expected)
    for key, value in _weights(reference).items():
        assert torch.equal(resumed.state_dict()[key], value), key
    assert trajectory.steps == reference_cka.steps == [0, 4, 8, 12, 16]
    np.testing.assert_array_equal(trajectory.values, reference_cka.values)
    assert latest_checkpoint(tmp_path).name == "step-000016"
    # resuming a finished run trains nothing and returns its history
    again = fit(_distiller(student_seed=7), train, test, checkpoint_dir=tmp_path, resume=True, **settings)
    pd.testing.assert_frame_equal(again, expected)


def test_nan_term_stops_training_and_keeps_the_last_good_checkpoint(data, tmp_path):
    train, _ = data
    distiller = _distiller({"spike": (SpikeAt(at=6, factor=float("nan")), 1.0)})
    with pytest.raises(FloatingPointError) as error:
        fit(distiller, train, epochs=2, batch_size=32, device="cpu", progress=False,
            checkpoint_dir=tmp_path, checkpoint_every=2)
    message = str(error.value)
    assert "epoch 1, step 6" in message and "batch index 5" in message and "['spike']" in message
    assert "kd" not in message.split("terms")[1].split(")")[0]  # only the non-finite term is blamed
    assert "step-000004" in message and "kept" in message
    newest = latest_checkpoint(tmp_path)
    assert newest.name == "step-000004"
    saved = torch.load(newest / "optimizer.pt", weights_only=True)
    assert saved["optimizer"]["state"][0]["step"].item() == 4
    from workbench.models import read_state_dict

    assert all(torch.isfinite(value).all() for value in read_state_dict(newest / "weights.safetensors").values())
    assert all(torch.isfinite(p).all() for p in distiller.parameters()), "no update from the NaN step"


class Recorder(Callback):
    def __init__(self):
        self.events = []

    def on_train_begin(self, state):
        self.events.append(("begin", state.step))

    def on_step_end(self, state):
        assert state.rows[-1]["step"] == state.step and len(state.rows) == state.step
        assert state.distiller.student.training
        self.events.append(("step", state.step))
        state.stop = state.step == 10

    def on_epoch_end(self, state):
        self.events.append(("epoch", state.epoch))

    def on_train_end(self, state):
        self.events.append(("end", len(state.history)))


def test_callbacks_see_the_state_and_can_stop(data):
    train, _ = data
    recorder = Recorder()
    history = fit(_distiller(), train, epochs=3, batch_size=32, device="cpu", callbacks=[recorder], progress=False)
    assert len(history) == 10
    steps = [("step", i) for i in range(1, 11)]
    assert recorder.events == [("begin", 0), *steps[:8], ("epoch", 1), *steps[8:], ("epoch", 2), ("end", 10)]


def test_optimizer_scheduler_and_argument_checks(data):
    train, test = data
    history = fit(_distiller(), train, batch_size=32, device="cpu", progress=False,
                  optimizer=lambda params: torch.optim.SGD(params, lr=0.1),
                  scheduler=lambda opt: torch.optim.lr_scheduler.StepLR(opt, step_size=3, gamma=0.5))
    assert history["lr"].tolist() == pytest.approx([0.1] * 3 + [0.05] * 3 + [0.025] * 2)
    distiller = _distiller()
    with pytest.raises(ValueError, match="term parameters"):  # made before the projector existed
        fit(distiller, train, optimizer=torch.optim.SGD(distiller.student.parameters(), lr=0.1),
            device="cpu", progress=False)
    with pytest.raises(ValueError, match="batch_size"):
        fit(_distiller(), train, batch_size=0, device="cpu", progress=False)
    with pytest.raises(TypeError, match="epochs=N"):
        fit(_distiller(), train, 2, progress=False)
    with pytest.raises(ValueError, match="checkpoint_dir"):
        fit(_distiller(), train, resume=True, progress=False)


def test_plain_model_keeps_its_columns_and_eval_data_alias(data):
    train, test = data
    torch.manual_seed(0)
    model = models.create("cnn", widths=(4, 8), img_size=16)
    history = fit(model, train, eval_data=test, batch_size=64, device="cpu", progress=False)
    assert list(history.columns) == ["epoch", "step", "loss", "lr", "eval_accuracy"]


class TrainModeCheck(Callback):
    def on_step_end(self, state):
        assert state.student.training and all(m.training for m in state.student.modules())


def test_cka_trajectory_records_restores_train_mode_and_plots(data):
    import matplotlib

    matplotlib.use("Agg")
    train, test = data
    probe = test.tensors[0][:64]
    distiller = _distiller()
    trajectory = CKATrajectory(probe, "stages", "stages", every=3, batch_size=32)
    fit(distiller, train, epochs=1, batch_size=32, device="cpu", callbacks=[trajectory, TrainModeCheck()],
        progress=False)
    assert trajectory.steps == [0, 3, 6, 8]
    assert trajectory.values.shape == (4, 2, 2)
    direct = cka_matrix(distiller.teacher, distiller.student, probe, "stages", "stages", batch_size=32,
                        device="cpu", progress=False)
    np.testing.assert_allclose(trajectory.values[-1], direct.values, rtol=1e-10)
    frame = trajectory.to_frame()
    assert list(frame.columns) == ["step", "teacher_layer", "student_layer", "cka"] and len(frame) == 16
    assert frame.query("step == 8 and teacher_layer == 'blocks.1' and student_layer == 'blocks.0'")["cka"].item() \
        == pytest.approx(trajectory.values[-1, 1, 0])
    assert len(trajectory.plot().get_lines()) == 4
    assert len(trajectory.plot(pairs="matched").get_lines()) == 2
    assert len(trajectory.figure().data) == 4
    assert trajectory.result().values.shape == (2, 2)
    with pytest.raises(ValueError, match="teacher"):
        fit(models.create("cnn", widths=(4, 8), img_size=16), train, batch_size=128, device="cpu",
            callbacks=[CKATrajectory(probe, every=1)], progress=False)
