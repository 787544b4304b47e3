"""fit's mixed precision, run on the CPU through the same autocast / GradScaler code that CUDA takes:
bf16 autocast really computes in bf16 and tracks the float32 run; fp16's GradScaler skips a step whose
gradients overflow, halves its scale, and its state goes into the checkpoint."""
from __future__ import annotations

import pytest
import torch
from torch.utils.data import TensorDataset

from spike_terms import SpikeAt
from workbench import models
from workbench.data import digits
from workbench.losses import KD
from workbench.train import Callback, Distiller, fit, latest_checkpoint
from workbench.train.checkpoint import load_checkpoint
from workbench.train.precision import autocast_settings

SETTINGS = dict(epochs=1, batch_size=32, lr=3e-3, device="cpu", seed=0, progress=False)


@pytest.fixture(scope="module")
def train():
    x, y = digits("train", size=16).tensors
    return TensorDataset(x[:192], y[:192])


def _distiller(extra_terms=None):
    torch.manual_seed(0)
    teacher = models.create("cnn", widths=(8, 16), img_size=16).eval()
    student = models.create("cnn", widths=(4, 8), img_size=16)
    return Distiller(teacher, student, {"kd": (KD(T=4), 1.0), **(extra_terms or {})})


class HeadWeights(Callback):
    """The student's head weight after every step, and the dtype of the head's output in training."""

    def __init__(self, distiller):
        self.head, self.after, self.dtypes = distiller.student.head, [], set()
        self.hook = self.head.register_forward_hook(
            lambda module, inputs, output: self.dtypes.add(output.dtype) if module.training else None)

    def on_step_end(self, state):
        self.after.append(self.head.weight.detach().clone())

    def on_train_end(self, state):
        self.hook.remove()


def test_bf16_autocast_computes_in_bf16_and_tracks_the_float32_run(train):
    runs = {}
    for amp in ("off", "bf16"):
        distiller = _distiller()
        recorder = HeadWeights(distiller)
        history = fit(distiller, train, amp=amp, callbacks=[recorder], **SETTINGS)
        runs[amp] = (history, recorder, distiller)
    (plain, plain_rec, _), (half, half_rec, half_distiller) = runs["off"], runs["bf16"]
    assert plain_rec.dtypes == {torch.float32} and half_rec.dtypes == {torch.bfloat16}
    assert all(p.dtype == torch.float32 for p in half_distiller.student.parameters())  # weights stay fp32
    assert half["loss"].notna().all() and len(half) == len(plain) == 6
    # same data, same init: the losses agree to bf16's ~3 significant digits (not exactly: it is bf16)
    assert half["loss"].iloc[0] == pytest.approx(plain["loss"].iloc[0], rel=2e-2)
    assert half["loss"].iloc[0] != plain["loss"].iloc[0]
    assert (half["loss"] - plain["loss"]).abs().max() < 0.05 * plain["loss"].abs().max()


def test_fp16_scaler_skips_the_overflowing_step_halves_its_scale_and_is_checkpointed(train, tmp_path):
    # step 4's loss is finite (1e3 × a sum of logits) but its gradient, 1e3 × the scale 65536, is past fp16's 65504
    distiller = _distiller({"spike": (SpikeAt(at=4, factor=1e3), 1.0)})
    recorder = HeadWeights(distiller)
    history = fit(distiller, train, amp="fp16", callbacks=[recorder], checkpoint_dir=tmp_path, **SETTINGS)
    assert recorder.dtypes == {torch.float16} and history["loss"].notna().all()
    moved = [not torch.equal(before, after) for before, after in zip(recorder.after, recorder.after[1:])]
    # step 4 (index 3) overflowed: the scaler skipped the optimizer step; every other step moved the head
    assert moved == [True, True, False, True, True]
    bundle = torch.load(latest_checkpoint(tmp_path) / "optimizer.pt", weights_only=True)
    assert bundle["scaler"]["scale"] == 65536.0 / 2
    restored = torch.amp.GradScaler("cpu")
    load_checkpoint(tmp_path, _distiller({"spike": (SpikeAt(at=4, factor=1e3), 1.0)}), scaler=restored)
    assert restored.get_scale() == 32768.0


def test_amp_modes_and_devices(train):
    distiller = _distiller()
    recorder = HeadWeights(distiller)
    assert fit(distiller, train, amp="auto", callbacks=[recorder], **SETTINGS)["loss"].notna().all()
    assert recorder.dtypes == {torch.float32}  # "auto" is off on the CPU
    with pytest.raises(ValueError, match="amp must be one of"):
        fit(_distiller(), train, amp="fp8", **SETTINGS)


def test_forced_amp_on_another_device_is_refused_by_name():
    with pytest.raises(ValueError, match="amp='fp16' runs on CUDA or the CPU, got mps"):
        autocast_settings("fp16", torch.device("mps"))
    assert autocast_settings("auto", torch.device("mps")) == (None, None)
    assert autocast_settings("bf16", torch.device("cpu")) == (torch.bfloat16, None)
