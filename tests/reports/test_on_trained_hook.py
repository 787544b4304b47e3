"""run_comparison's on_trained hook: called once per finished run with the model that trained."""
from __future__ import annotations

import torch

from workbench import models
from workbench.reports.compare import run_comparison
from workbench.train import Distiller, accuracy


def _data():
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(48, 1, 16, 16, generator=generator)
    return x, (x.mean(dim=(1, 2, 3)) > 0).long() * 3  # a learnable rule: two classes of ten


def _student(seed):
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return models.create("cnn", widths=(4, 8), img_size=16)


def test_on_trained_sees_each_finished_run_with_its_trained_model():
    data = _data()
    teacher = _student(7).eval()
    seen = []

    def on_trained(method, seed, model):
        student = model.student if isinstance(model, Distiller) else model
        seen.append((method, seed, type(model).__name__, accuracy(student, data, device="cpu")))
        return "ignored"

    result = run_comparison(teacher, _student, data, data, ["student", "kd"], [0, 1], epochs=2, batch_size=16,
                            device="cpu", on_trained=on_trained)
    assert [row[:3] for row in seen] == [("student", 0, "TinyCNN"), ("student", 1, "TinyCNN"),
                                         ("kd", 0, "Distiller"), ("kd", 1, "Distiller")]
    # the hook got the very model that was scored: its accuracy, measured again, is the table's
    assert [row[3] for row in seen] == result.runs["accuracy"].tolist()


def test_on_trained_is_not_called_for_an_interrupted_run():
    data = _data()
    seen, calls = [], []

    class Stop:
        def on_step_end(self, state):
            state.request_stop("stop button")

    def callbacks(method, seed):
        calls.append(method)
        return [Stop()] if method == "kd" else []

    result = run_comparison(_student(7).eval(), _student, data, data, ["student", "kd"], [0], epochs=2,
                            batch_size=16, device="cpu", callbacks=callbacks,
                            on_trained=lambda method, seed, model: seen.append(method))
    assert calls == ["student", "kd"] and seen == ["student"] and result.interrupted["method"] == "kd"
