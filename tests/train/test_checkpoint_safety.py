"""Nothing lost: one run per checkpoint folder, finite weights only, atomic writes, safe resume."""
from __future__ import annotations

import errno
import json
import shutil

import pandas as pd
import pytest
import torch
from torch.utils.data import TensorDataset

from spike_terms import Crash, CrashAt, NaNGradFrom
from workbench import models
from workbench.data import digits
from workbench.files import DiskFullError
from workbench.losses import KD
from workbench.models import read_state_dict
from workbench.train import Callback, Distiller, fit, latest_checkpoint, load_checkpoint, save_checkpoint
from workbench.train.checkpoint import list_checkpoints

SETTINGS = dict(epochs=2, batch_size=32, lr=3e-3, device="cpu", seed=1, progress=False)


@pytest.fixture(scope="module")
def train():
    x, y = digits("train", size=8).tensors
    return TensorDataset(x[:192], y[:192])  # 6 batches of 32 per epoch


def _distiller(extra_terms=None, student_seed=None):
    torch.manual_seed(0)
    teacher = models.create("mlp", hidden=(32,), img_size=8).eval()
    if student_seed is not None:
        torch.manual_seed(student_seed)
    student = models.create("mlp", hidden=(16,), img_size=8)
    return Distiller(teacher, student, {"kd": (KD(T=4), 1.0), **(extra_terms or {})})


def _all_finite(folder) -> bool:
    return all(bool(torch.isfinite(value).all()) for value in read_state_dict(folder / "weights.safetensors").values())


class Steps(Callback):
    def __init__(self):
        self.steps = []

    def on_step_end(self, state):
        self.steps.append(state.step)


# -- one run per folder -----------------------------------------------------------------------------
def test_a_new_run_refuses_a_folder_holding_another_runs_checkpoints(train, tmp_path):
    fit(_distiller(), train, checkpoint_dir=tmp_path, checkpoint_every=4, **SETTINGS)  # an older, longer run
    old = [p.name for p in list_checkpoints(tmp_path)]
    assert old == ["step-000008", "step-000012"]
    steps = Steps()
    with pytest.raises(FileExistsError, match="already holds checkpoints.*resume=True.*overwrite=True"):
        fit(_distiller(), train, checkpoint_dir=tmp_path, checkpoint_every=2, callbacks=[steps],
            **{**SETTINGS, "epochs": 1})
    assert steps.steps == [] and [p.name for p in list_checkpoints(tmp_path)] == old


def test_overwrite_replaces_the_old_run_only_after_the_new_runs_first_checkpoint(train, tmp_path):
    fit(_distiller(), train, checkpoint_dir=tmp_path, checkpoint_every=4, **SETTINGS)
    seen = []

    class Look(Callback):
        def on_step_end(self, state):
            seen.append((state.step, [p.name for p in list_checkpoints(tmp_path)]))

    fit(_distiller(), train, checkpoint_dir=tmp_path, checkpoint_every=2, overwrite=True, callbacks=[Look()],
        **{**SETTINGS, "epochs": 1})
    assert seen[0] == (1, ["step-000008", "step-000012"])  # untouched until the new run has a checkpoint
    assert seen[2] == (3, ["step-000002"])  # step 2 written, then the old run removed
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step-000004", "step-000006"]  # the new run's work
    with pytest.raises(ValueError, match="not both"):
        fit(_distiller(), train, checkpoint_dir=tmp_path, resume=True, overwrite=True, **SETTINGS)


def test_pruning_removes_only_older_checkpoints_of_the_same_run(tmp_path):
    model = torch.nn.Linear(2, 2)
    for step in (10, 12):
        save_checkpoint(tmp_path, model, step=step, run="old")
    for step in (2, 4, 6):
        save_checkpoint(tmp_path, model, step=step, run="new")
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step-000004", "step-000006", "step-000010", "step-000012"]
    assert json.loads((tmp_path / "step-000006" / "state.json").read_text())["run"] == "new"


# -- finite weights only -----------------------------------------------------------------------------
def test_a_nan_gradient_under_a_finite_loss_names_step_term_and_parameter(train, tmp_path):
    distiller = _distiller({"nangrad": (NaNGradFrom(at=6), 1.0)})
    with pytest.raises(FloatingPointError) as error:
        fit(distiller, train, checkpoint_dir=tmp_path, checkpoint_every=2, **SETTINGS)
    message = str(error.value)
    assert "non-finite gradient at epoch 1, step 6" in message and "loss is finite" in message
    assert "term 'nangrad' gives student.layers.0.0.weight a non-finite gradient" in message
    assert "step-000004" in message and "kept" in message
    newest = latest_checkpoint(tmp_path)
    assert newest.name == "step-000004" and _all_finite(newest), "the last good checkpoint holds finite weights"
    assert all(bool(torch.isfinite(p).all()) for p in distiller.parameters()), "no step from NaN gradients"
    loaded = load_checkpoint(newest, _distiller())
    assert loaded.step == 4


def test_a_plain_model_with_a_nan_gradient_names_the_parameter(train):
    class SqrtAtZero(torch.nn.Module):  # output unchanged (adds 0), gradient of sqrt at 0: infinite
        def __init__(self):
            super().__init__()
            self.linear, self.scale = torch.nn.Linear(64, 10), torch.nn.Parameter(torch.ones(()))

        def forward(self, x):
            return self.linear(x.flatten(1)) + (self.scale - self.scale.detach()).sqrt()

    model = SqrtAtZero()
    before = model.linear.weight.detach().clone()
    with pytest.raises(FloatingPointError, match=r"step 1 .*1 parameters have NaN / Inf gradients \(scale\).*"
                                                 r"cross-entropy"):
        fit(model, train, **SETTINGS)
    assert torch.equal(model.linear.weight, before)


class ZeroGradient(torch.nn.Module):
    """A linear classifier plus ``0 * extra``: ``extra``'s gradient is exactly 0, so Adam with eps=0 divides 0 by 0."""

    def __init__(self):
        super().__init__()
        self.linear, self.extra = torch.nn.Linear(64, 10), torch.nn.Parameter(torch.ones(3))

    def forward(self, x):
        return self.linear(x.flatten(1)) + 0 * self.extra.sum()


def test_an_optimizer_step_that_makes_weights_non_finite_is_caught_before_any_checkpoint(train, tmp_path):
    zero_eps = dict(SETTINGS, optimizer=lambda params: torch.optim.Adam(params, lr=1e-3, eps=0.0))
    with pytest.raises(FloatingPointError, match=r"optimizer step of epoch 1, step 1 made 1 parameters non-finite "
                                                 r"\(extra\) from a finite loss and finite gradients.*'eps': 0.0"):
        fit(ZeroGradient(), train, checkpoint_dir=tmp_path, checkpoint_every=1, **zero_eps)
    assert list_checkpoints(tmp_path) == []
    with pytest.raises(FloatingPointError, match="optimizer step of epoch 1, step 1"):
        fit(ZeroGradient(), train, **zero_eps)  # without checkpoints or callbacks: caught at the next step
    model = torch.nn.Linear(2, 2)
    with torch.no_grad():
        model.weight[0, 0] = float("inf")
    with pytest.raises(ValueError, match="non-finite weights.*weight"):
        save_checkpoint(tmp_path / "direct", model, step=1)
    assert not (tmp_path / "direct" / "step-000001").exists()


# -- atomic writes --------------------------------------------------------------------------------------
@pytest.mark.parametrize("failing", ["weights", "optimizer", "fsync"])
def test_a_full_disk_names_itself_and_keeps_the_previous_checkpoint(train, tmp_path, monkeypatch, failing):
    import os

    import safetensors.torch

    import workbench.files

    class FullDiskAt(Callback):
        def on_step_end(self, state):
            if state.step != 3:  # after step 2's checkpoint, before step 4's
                return

            def full(*args, **kwargs):
                raise OSError(errno.ENOSPC, "No space left on device")

            target = {"weights": (safetensors.torch, "save_file"), "optimizer": (torch, "save"),
                      "fsync": (workbench.files.os, "fsync")}[failing]
            monkeypatch.setattr(*target, full)

    with pytest.raises(DiskFullError, match="No space left on device"):
        fit(_distiller(), train, checkpoint_dir=tmp_path, checkpoint_every=2, callbacks=[FullDiskAt()],
            **{**SETTINGS, "epochs": 1})
    monkeypatch.undo()
    assert sorted(os.listdir(tmp_path)) == ["step-000002"], "no temporary files or half checkpoints are left"
    assert load_checkpoint(tmp_path, _distiller()).step == 2


# -- resume -----------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def interrupted(train, tmp_path_factory):
    """An uninterrupted reference history, and the folder of the same run interrupted at step 10."""
    folder = tmp_path_factory.mktemp("interrupted")
    expected = fit(_distiller(), train, schedule="cosine", **SETTINGS)
    with pytest.raises(Crash):
        fit(_distiller(), train, schedule="cosine", checkpoint_dir=folder, checkpoint_every=3,
            callbacks=[CrashAt(at_step=10)], **SETTINGS)
    assert [p.name for p in list_checkpoints(folder)] == ["step-000006", "step-000009"]
    return expected, folder


def _copy(folder, tmp_path):
    return shutil.copytree(folder, tmp_path / "run")


def _truncate(path):
    path.write_bytes(path.read_bytes()[:-100])  # the header is whole, the tensors are cut short


DAMAGE = {
    "truncated weights": (lambda step: _truncate(step / "weights.safetensors"), "could not read .* safetensors"),
    "garbage state.json": (lambda step: (step / "state.json").write_bytes(b"\x00{garbage"), "not valid JSON"),
    "missing optimizer.pt": (lambda step: (step / "optimizer.pt").unlink(), "optimizer"),
    "missing weights": (lambda step: (step / "weights.safetensors").unlink(), "does not exist"),
    "missing state.json": (lambda step: (step / "state.json").unlink(), "missing"),
}


@pytest.mark.parametrize("damage", list(DAMAGE))
def test_a_damaged_newest_checkpoint_falls_back_to_the_newest_intact_one(interrupted, train, tmp_path, damage):
    expected, folder = interrupted
    run = _copy(folder, tmp_path)
    spoil, reason = DAMAGE[damage]
    spoil(run / "step-000009")
    with pytest.warns(UserWarning, match=rf"resuming from .*step-000006.*step-000009: .*{reason}"):
        history = fit(_distiller(student_seed=5), train, schedule="cosine", checkpoint_dir=run, checkpoint_every=3,
                      resume=True, **SETTINGS)
    pd.testing.assert_frame_equal(history, expected)  # still bit-identical to the uninterrupted run


def test_no_intact_checkpoint_is_an_error_not_a_fresh_start(interrupted, train, tmp_path):
    _, folder = interrupted
    run = _copy(folder, tmp_path)
    for step in ("step-000006", "step-000009"):
        (run / step / "state.json").write_text("{")
    with pytest.raises(ValueError, match="no intact checkpoint.*step-000009.*step-000006"):
        fit(_distiller(), train, schedule="cosine", checkpoint_dir=run, resume=True, **SETTINGS)


@pytest.mark.parametrize("content, field", [
    (b"\xff\xfe not json", "not valid JSON"),
    (b"[1, 2]", "not a JSON object"),
    (b'{"format": 1, "step": -3, "epoch": 1, "batch_index": 0, "history": [], "metadata": {}}', "step=-3"),
    (b'{"format": 1, "step": 3, "epoch": 0, "batch_index": 0, "history": [], "metadata": {}}', "epoch=0"),
    (b'{"format": 1, "step": 3, "epoch": 1, "batch_index": -1, "history": [], "metadata": {}}', "batch_index=-1"),
    (b'{"format": 1, "step": "3", "epoch": 1, "batch_index": 0, "history": [], "metadata": {}}', "'step' must be"),
    (b'{"format": 1, "step": 3, "epoch": 1, "batch_index": 0, "history": "rows", "metadata": {}}', "'history'"),
])
def test_a_damaged_state_json_given_explicitly_is_a_value_error_naming_the_file(tmp_path, content, field):
    model = torch.nn.Linear(2, 2)
    folder = save_checkpoint(tmp_path, model, step=3)
    (folder / "state.json").write_bytes(content)
    with pytest.raises(ValueError, match=field) as error:
        load_checkpoint(folder, torch.nn.Linear(2, 2))
    assert str(folder / "state.json") in str(error.value)


def test_a_batch_index_outside_the_epoch_is_refused(interrupted, train, tmp_path):
    _, folder = interrupted
    run = _copy(folder, tmp_path)
    state_file = run / "step-000009" / "state.json"
    state = json.loads(state_file.read_text())
    state_file.write_text(json.dumps({**state, "batch_index": 40}))
    with pytest.raises(ValueError, match="batch_index 40 is outside this run's epoch of 6 batches"):
        fit(_distiller(), train, schedule="cosine", checkpoint_dir=run, resume=True, **SETTINGS)


@pytest.mark.parametrize("change, difference", [
    (dict(optimizer=lambda params: torch.optim.SGD(params, lr=3e-3)), "optimizer.class"),
    (dict(lr=1e-2), r"optimizer.groups\[0\].lr: 0.003 \(checkpoint\) vs 0.01 \(now\)"),
    (dict(epochs=3), r"scheduler.T_max: 12 \(checkpoint\) vs 18 \(now\)"),
    (dict(schedule="constant"), r"scheduler: \{'class': 'torch.optim.lr_scheduler.CosineAnnealingLR'"),
])
def test_another_optimizer_or_schedule_than_the_checkpoints_is_refused(interrupted, train, tmp_path, change,
                                                                       difference):
    _, folder = interrupted
    run = _copy(folder, tmp_path)
    settings = {**SETTINGS, "schedule": "cosine", **change}
    with pytest.raises(ValueError, match=rf"cannot resume .*{difference}.*overwrite=True"):
        fit(_distiller(), train, checkpoint_dir=run, resume=True, **settings)


def test_a_checkpoint_folder_that_cannot_be_written_fails_before_the_first_epoch(train, tmp_path, monkeypatch):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    for folder in (blocker, blocker / "checkpoints"):
        steps = Steps()
        with pytest.raises(NotADirectoryError, match="is a file, not a folder"):
            fit(_distiller(), train, checkpoint_dir=folder, callbacks=[steps], **SETTINGS)
        assert steps.steps == []

    import workbench.train.checkpointer as checkpointer

    def read_only(path, data, **kwargs):
        raise PermissionError(errno.EACCES, "Permission denied", str(path))

    monkeypatch.setattr(checkpointer, "write_atomic", read_only)
    steps = Steps()
    with pytest.raises(PermissionError, match="cannot be written.*Permission denied.*writable folder"):
        fit(_distiller(), train, checkpoint_dir=tmp_path / "read-only", callbacks=[steps], **SETTINGS)
    assert steps.steps == []
