"""workbench.models.load_weights / save_weights: round trips, wrappers, and refusal of unsafe files."""
from __future__ import annotations

import os
import pickle
from pathlib import Path

import pytest
import torch

from workbench import models


def _fresh(seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    return models.create("cnn_small")


def _assert_same(a: torch.nn.Module, b: torch.nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for key in sa:
        assert torch.equal(sa[key], sb[key]), key


@pytest.mark.parametrize("suffix", [".safetensors", ".pt", ".pth", ".bin"])
def test_round_trip(tmp_path, suffix):
    source, target = _fresh(0), _fresh(1)
    path = models.save_weights(source, tmp_path / f"w{suffix}")
    assert not any(p.name.endswith(".tmp") for p in tmp_path.iterdir())
    assert models.load_weights(target, path) is target
    _assert_same(source, target)


@pytest.mark.parametrize("wrapper", ["state_dict", "model"])
def test_wrapped_state_dict(tmp_path, wrapper):
    source, target = _fresh(0), _fresh(1)
    torch.save({wrapper: source.state_dict(), "epoch": 3}, tmp_path / "ckpt.pt")
    models.load_weights(target, tmp_path / "ckpt.pt")
    _assert_same(source, target)


def test_ddp_prefix_is_stripped(tmp_path):
    source, target = _fresh(0), _fresh(1)
    torch.save({f"module.{k}": v for k, v in source.state_dict().items()}, tmp_path / "ddp.pt")
    models.load_weights(target, tmp_path / "ddp.pt")
    _assert_same(source, target)


def test_shared_tensors_save_as_safetensors(tmp_path):
    model = torch.nn.Sequential(torch.nn.Linear(3, 3), torch.nn.Linear(3, 3))
    model[1].weight = model[0].weight  # tied
    models.save_weights(model, tmp_path / "tied.safetensors")
    other = torch.nn.Sequential(torch.nn.Linear(3, 3), torch.nn.Linear(3, 3))
    models.load_weights(other, tmp_path / "tied.safetensors")
    assert torch.equal(other[1].weight, model[0].weight)


def test_missing_and_unexpected_keys_are_listed(tmp_path):
    state = _fresh(0).state_dict()
    state.pop("head.weight")
    state["extra.weight"] = torch.zeros(1)
    torch.save(state, tmp_path / "partial.pt")
    with pytest.raises(ValueError) as error:
        models.load_weights(_fresh(1), tmp_path / "partial.pt")
    message = str(error.value)
    assert "head.weight" in message and "extra.weight" in message and "partial.pt" in message
    # non-strict loads what matches
    target = _fresh(1)
    models.load_weights(target, tmp_path / "partial.pt", strict=False)
    assert torch.equal(target.state_dict()["blocks.0.0.weight"], state["blocks.0.0.weight"])


def test_shape_mismatch_names_key_and_shapes(tmp_path):
    models.save_weights(models.create("cnn"), tmp_path / "big.safetensors")
    with pytest.raises(ValueError, match=r"blocks\.0\.0\.weight.*\(32, 1, 3, 3\)"):
        models.load_weights(models.create("cnn_small"), tmp_path / "big.safetensors", strict=False)


def test_random_bytes_and_json_are_refused(tmp_path):
    (tmp_path / "noise.pt").write_bytes(os.urandom(256))
    (tmp_path / "config.json").write_text('{"hidden_size": 64}')
    (tmp_path / "fake.safetensors").write_bytes(b"\x80" + os.urandom(64))
    for name in ("noise.pt", "config.json", "fake.safetensors"):
        with pytest.raises(ValueError, match="accepted formats") as error:
            models.load_weights(_fresh(0), tmp_path / name)
        assert name in str(error.value)


def test_non_tensor_contents_are_refused(tmp_path):
    torch.save({"weight": [1, 2, 3]}, tmp_path / "lists.pt")
    with pytest.raises(ValueError, match="not a dict of tensors"):
        models.load_weights(_fresh(0), tmp_path / "lists.pt")
    torch.save(torch.ones(3), tmp_path / "tensor.pt")
    with pytest.raises(ValueError, match="not a dict of tensors"):
        models.load_weights(_fresh(0), tmp_path / "tensor.pt")


class _Exploit:
    """Unpickling this would create a marker file: the code must never run."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


@pytest.mark.parametrize("writer", ["pickle", "torch.save"])
def test_malicious_pickle_is_refused_without_running(tmp_path, writer):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pt"
    payload = {"state_dict": {"w": torch.ones(1)}, "hook": _Exploit(marker)}
    if writer == "pickle":
        with open(path, "wb") as file:
            pickle.dump(payload, file, protocol=2)
    else:
        torch.save(payload, path)
    assert not marker.exists()
    with pytest.raises(ValueError, match="evil.pt"):
        models.load_weights(_fresh(0), path)
    assert not marker.exists()


def test_missing_file_and_bad_suffix(tmp_path):
    with pytest.raises(FileNotFoundError):
        models.load_weights(_fresh(0), tmp_path / "nope.safetensors")
    with pytest.raises(ValueError, match="suffix"):
        models.save_weights(_fresh(0), tmp_path / "w.json")


def _linear_with(weight: torch.Tensor) -> dict[str, torch.Tensor]:
    return {"weight": weight, "bias": torch.zeros(2)}


@pytest.mark.parametrize("values", [torch.tensor([[1, 2, 3], [4, 5, 6]]), torch.ones(2, 3, dtype=torch.bool)])
def test_integer_and_bool_into_floating_are_refused_unless_cast(tmp_path, values):
    torch.save(_linear_with(values), tmp_path / "ints.pt")
    model = torch.nn.Linear(3, 2)
    before = model.weight.detach().clone()
    with pytest.raises(ValueError, match=r"weight: file torch\.(int64|bool) vs model torch\.float32.*cast=True"):
        models.load_weights(model, tmp_path / "ints.pt")
    assert torch.equal(model.weight, before), "nothing is loaded when a check fails"
    models.load_weights(model, tmp_path / "ints.pt", cast=True)
    assert torch.equal(model.weight, values.float())  # the exact conversion, element by element


def test_floating_into_an_integer_buffer_is_refused_unless_cast(tmp_path):
    norm = torch.nn.BatchNorm1d(2)
    state = dict(norm.state_dict(), num_batches_tracked=torch.tensor(2.7))
    torch.save(state, tmp_path / "bn.pt")
    with pytest.raises(ValueError, match=r"num_batches_tracked: file torch\.float32 vs model torch\.int64"):
        models.load_weights(torch.nn.BatchNorm1d(2), tmp_path / "bn.pt")


def test_complex_into_real_is_refused_even_with_cast(tmp_path):
    torch.save(_linear_with(torch.ones(2, 3, dtype=torch.complex64) * 1j), tmp_path / "complex.pt")
    for cast in (False, True):
        with pytest.raises(ValueError, match="complex tensors for real ones.*imaginary part"):
            models.load_weights(torch.nn.Linear(3, 2), tmp_path / "complex.pt", cast=cast)


def test_float64_into_float32_still_loads(tmp_path):
    source = torch.nn.Linear(3, 2).double()
    models.save_weights(source, tmp_path / "double.safetensors")
    target = models.load_weights(torch.nn.Linear(3, 2), tmp_path / "double.safetensors")
    assert torch.equal(target.weight, source.weight.float())


def test_a_folder_or_a_device_file_is_a_clear_error(tmp_path):
    with pytest.raises(IsADirectoryError, match="is a folder, not a weight file"):
        models.load_weights(_fresh(0), tmp_path)
    for device in ("/dev/zero", "/dev/null"):
        if os.path.exists(device):
            with pytest.raises(ValueError, match="not a regular file"):
                models.load_weights(_fresh(0), device)
    fifo = tmp_path / "pipe.pt"
    os.mkfifo(fifo)  # opening it for reading would block forever
    with pytest.raises(ValueError, match="not a regular file"):
        models.read_state_dict(fifo)


def test_save_weights_on_a_full_disk_keeps_the_previous_file(tmp_path, monkeypatch):
    import errno

    import safetensors.torch

    from workbench.files import DiskFullError

    path = models.save_weights(_fresh(0), tmp_path / "w.safetensors")
    before = path.read_bytes()

    def full_disk(tensors, filename, *args, **kwargs):
        with open(filename, "wb") as handle:
            handle.write(b"\0" * 10)
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(safetensors.torch, "save_file", full_disk)
    with pytest.raises(DiskFullError, match="No space left on device"):
        models.save_weights(_fresh(1), path)
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["w.safetensors"]
