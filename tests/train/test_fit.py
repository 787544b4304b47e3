"""workbench.train: fit (seeded, deterministic), accuracy, and the trained-model cache."""
from __future__ import annotations

import math

import pytest
import torch
from torch.utils.data import TensorDataset

from workbench import models
from workbench.data import digits
from workbench.train import accuracy, fit, trained
from workbench.train import cache as cache_module


@pytest.fixture(scope="module")
def small_digits():
    x, y = digits("train").tensors
    return TensorDataset(x[:256], y[:256])


def _small_cnn(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return models.create("cnn", widths=(8, 16))


def test_fit_is_deterministic_with_a_seed(small_digits):
    first, second = _small_cnn(), _small_cnn()
    fit(first, small_digits, epochs=1, batch_size=32, device="cpu", seed=5, progress=False)
    fit(second, small_digits, epochs=1, batch_size=32, device="cpu", seed=5, progress=False)
    for (key, a), b in zip(first.state_dict().items(), second.state_dict().values()):
        assert torch.equal(a, b), key
    third = _small_cnn()
    fit(third, small_digits, epochs=1, batch_size=32, device="cpu", seed=6, progress=False)
    assert not torch.equal(first.head.weight, third.head.weight)


def test_fit_history_eval_mode_and_rng_untouched(small_digits):
    model = _small_cnn()
    torch.manual_seed(123)
    expected_next = torch.rand(3)
    torch.manual_seed(123)
    history = fit(
        model, small_digits, epochs=2, batch_size=64, device="cpu", eval_data=small_digits, progress=False
    )
    assert torch.equal(torch.rand(3), expected_next), "fit must not consume the caller's RNG stream"
    assert list(history.columns) == ["epoch", "step", "loss", "lr", "eval_accuracy"]
    assert history["step"].tolist() == list(range(1, 9))
    assert history["epoch"].tolist() == [1] * 4 + [2] * 4
    assert history["eval_accuracy"].notna().sum() == 2
    assert not model.training
    assert history["loss"].iloc[-1] < history["loss"].iloc[0]


def test_fit_cosine_schedule_and_custom_optimizer(small_digits):
    history = fit(_small_cnn(), small_digits, epochs=1, batch_size=64, lr=0.01, schedule="cosine", device="cpu", progress=False)
    assert history["lr"].iloc[0] == pytest.approx(0.01) and history["lr"].is_monotonic_decreasing
    model = _small_cnn()
    history = fit(model, small_digits, optimizer=lambda params: torch.optim.SGD(params, lr=0.05), device="cpu", progress=False)
    assert (history["lr"] == 0.05).all()
    with pytest.raises(ValueError, match="schedule"):
        fit(model, small_digits, schedule="linear", progress=False)


def test_fit_nan_loss_names_epoch_and_step(small_digits):
    model = _small_cnn()
    with torch.no_grad():
        model.head.bias.fill_(float("nan"))
    with pytest.raises(FloatingPointError, match="epoch 1, step 1"):
        fit(model, small_digits, device="cpu", progress=False)


def test_fit_needs_labels():
    with pytest.raises(TypeError, match="labelled"):
        fit(torch.nn.Linear(3, 2), torch.randn(8, 3), device="cpu", progress=False)


def test_accuracy_matches_manual_count():
    model = torch.nn.Linear(4, 3)
    x, y = torch.randn(50, 4), torch.randint(0, 3, (50,))
    with torch.no_grad():
        expected = (model(x).argmax(1) == y).float().mean().item()
    model.train()
    assert accuracy(model, (x, y), batch_size=7, device="cpu") == pytest.approx(expected)
    assert model.training, "accuracy restores the train/eval mode"


@pytest.fixture(scope="module")
def cache_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("kd-cache")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("KD_WORKBENCH_CACHE", str(folder))
        yield folder


@pytest.fixture(scope="module")
def teacher_and_student(cache_folder):
    return trained("cnn", progress=False), trained("cnn_small", progress=False)


def test_trained_models_reach_accuracy_on_held_out_digits(teacher_and_student):
    teacher, student = teacher_and_student
    test = digits("test")
    teacher_accuracy = accuracy(teacher, test, device="cpu")
    student_accuracy = accuracy(student, test, device="cpu")
    assert teacher_accuracy >= 0.95
    assert student_accuracy >= 0.85
    assert not teacher.training and not student.training
    assert next(teacher.parameters()).device.type == "cpu"


def test_trained_second_call_loads_from_cache(teacher_and_student, cache_folder, monkeypatch):
    teacher, _ = teacher_and_student
    files = sorted(p.name for p in cache_folder.iterdir())
    assert len(files) == 4 and sum(name.endswith(".safetensors") for name in files) == 2  # + 2 training records

    def no_training(*args, **kwargs):
        raise AssertionError("a cache hit must not train")

    monkeypatch.setattr(cache_module, "fit", no_training)
    again = trained("cnn", progress=False)
    for (key, a), b in zip(teacher.state_dict().items(), again.state_dict().values()):
        assert torch.equal(a, b), key
    assert not again.training
    assert sorted(p.name for p in cache_folder.iterdir()) == files
    # any changed setting is a different cache entry, so it would train
    with pytest.raises(AssertionError, match="cache hit"):
        trained("cnn", seed=1, progress=False)
    with pytest.raises(AssertionError, match="cache hit"):
        trained("cnn", widths=(8, 8), progress=False)


def test_trained_cache_path_depends_on_every_setting(cache_folder):
    base = {"name": "cnn", "dataset": "digits", "epochs": 8, "lr": 0.005, "model_kwargs": {}}
    paths = {cache_module.cache_path("cnn", base)}
    for key, value in [("epochs", 9), ("lr", 0.01), ("model_kwargs", {"widths": [8]}), ("dataset", "shapes")]:
        paths.add(cache_module.cache_path("cnn", {**base, key: value}))
    assert len(paths) == 5
    assert all(path.parent == cache_folder for path in paths)


def test_trained_on_shapes_and_rejects_text_models(cache_folder):
    model = trained("mlp", "shapes", epochs=1, size=8, channels=3, hidden=(16,), progress=False)
    assert model(torch.zeros(2, 3, 8, 8)).shape == (2, 4)
    with pytest.raises(ValueError, match="transformers"):
        trained("bert_tiny", progress=False)
    with pytest.raises(ValueError, match="dataset"):
        trained("cnn", "mnist", progress=False)
    assert math.isfinite(float(model.head.weight.detach().sum()))


def test_empty_training_data_is_an_error_not_an_empty_history():
    from torch.utils.data import DataLoader, IterableDataset

    empty = TensorDataset(torch.zeros(0, 4), torch.zeros(0, dtype=torch.long))

    class NoBatches(IterableDataset):
        def __iter__(self):
            return iter(())

    for data in (empty, DataLoader(empty, batch_size=4), NoBatches()):
        with pytest.raises(ValueError, match="no (samples|batches)"):
            fit(torch.nn.Linear(4, 2), data, device="cpu", progress=False)


def test_trained_on_a_full_disk_says_so_and_leaves_no_cache_file(cache_folder, monkeypatch):
    import errno

    import safetensors.torch

    from workbench.files import DiskFullError

    def full_disk(tensors, filename, *args, **kwargs):
        with open(filename, "wb") as handle:
            handle.write(b"\0" * 10)  # a partial write, as a full disk leaves it
        raise OSError(errno.ENOSPC, "No space left on device")

    before = sorted(p.name for p in cache_folder.iterdir())
    monkeypatch.setattr(safetensors.torch, "save_file", full_disk)
    with pytest.raises(DiskFullError, match="No space left on device"):
        trained("mlp", "shapes", epochs=1, size=8, channels=1, hidden=(4,), progress=False)
    assert sorted(p.name for p in cache_folder.iterdir()) == before, "no partial cache entry is left behind"
