"""workbench.data: digits, shapes, and the loader adapters."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from workbench.data import as_loader, digits, num_samples, shapes


def test_digits_splits_shapes_and_types():
    train, test, everything = digits("train"), digits("test"), digits("all")
    assert len(train) + len(test) == len(everything) == 1797
    assert len(test) == 450
    x, y = train.tensors
    assert x.shape == (len(train), 1, 32, 32) and x.dtype == torch.float32 and y.dtype == torch.int64
    assert abs(float(x.mean())) < 1e-4 and abs(float(x.std()) - 1) < 1e-3
    # test split normalised with the train statistics: close to, not exactly, zero mean
    assert abs(float(test.tensors[0].mean())) < 0.1


def test_digits_split_is_stratified_disjoint_and_seeded():
    train_y, test_y = digits("train").tensors[1], digits("test").tensors[1]
    assert torch.bincount(test_y).min() >= 43 and torch.bincount(test_y).max() <= 47
    train_x, test_x = digits("train").tensors[0], digits("test").tensors[0]
    flat_train = {tuple(row) for row in train_x.flatten(1)[:, ::37].tolist()}
    overlap = sum(tuple(row) in flat_train for row in test_x.flatten(1)[:, ::37].tolist())
    assert overlap <= 5  # only genuinely duplicated digits in the source data could collide
    assert torch.equal(digits("test", seed=0).tensors[0], test_x)
    assert not torch.equal(digits("test", seed=1).tensors[1], test_y)
    assert len(train_y) == 1347


def test_digits_size_channels_and_resize_matches_interpolate():
    from sklearn.datasets import load_digits

    x, _ = digits("all", size=16, channels=3).tensors
    assert x.shape == (1797, 3, 16, 16)
    assert torch.equal(x[:, 0], x[:, 2])
    raw = torch.from_numpy(load_digits().images[:1].astype(np.float32)).unsqueeze(1)
    expected = torch.nn.functional.interpolate(raw, size=(16, 16), mode="bilinear", align_corners=False)
    reference = (expected - expected.mean()) / expected.std()
    # same image up to the (global) affine normalisation: perfectly correlated
    corr = torch.corrcoef(torch.stack([x[0, 0].flatten(), reference.flatten()]))[0, 1]
    assert float(corr) > 0.9999
    with pytest.raises(ValueError, match="split"):
        digits("val")


def test_shapes_deterministic_balanced_and_distinct():
    a, b = shapes(200, seed=3), shapes(200, seed=3)
    assert torch.equal(a.tensors[0], b.tensors[0]) and torch.equal(a.tensors[1], b.tensors[1])
    assert not torch.equal(shapes(200, seed=4).tensors[0], a.tensors[0])
    x, y = a.tensors
    assert x.shape == (200, 3, 32, 32) and x.dtype == torch.float32 and y.dtype == torch.int64
    assert torch.bincount(y).tolist() == [50, 50, 50, 50]
    x6, y6 = shapes(60, size=24, channels=1, n_classes=6).tensors
    assert x6.shape == (60, 1, 24, 24) and sorted(set(y6.tolist())) == list(range(6))
    with pytest.raises(ValueError, match="n_classes"):
        shapes(10, n_classes=9)


def test_shapes_classes_differ_in_mean_image():
    # the shape, not the noise, carries the label: mean foreground area differs between classes
    x, y = shapes(400, channels=1, seed=0).tensors
    area = (x[:, 0] > 0.45).float().mean(dim=(1, 2))
    per_class = torch.stack([area[y == k].mean() for k in range(4)])
    assert float(per_class.max() - per_class.min()) > 0.02


def test_shapes_large_n_is_fast():
    import time

    start = time.perf_counter()
    x, _ = shapes(5000).tensors
    assert x.shape[0] == 5000
    assert time.perf_counter() - start < 10


def test_as_loader_accepts_many_inputs():
    x, y = torch.randn(10, 3), torch.arange(10)
    assert next(iter(as_loader(x, batch_size=4))).shape == (4, 3)
    assert next(iter(as_loader(x.numpy(), batch_size=4))).shape == (4, 3)
    bx, by = next(iter(as_loader((x, y), batch_size=4)))
    assert by.tolist() == [0, 1, 2, 3]
    bx, by = next(iter(as_loader([x.numpy(), y.numpy()], batch_size=4)))
    assert by.tolist() == [0, 1, 2, 3]
    dataset = TensorDataset(x, y)
    assert len(as_loader(dataset, batch_size=3)) == 4
    loader = DataLoader(dataset, batch_size=2)
    assert as_loader(loader) is loader


def test_as_loader_shuffle_is_seeded():
    y = torch.arange(100)
    order = lambda seed: torch.cat([b[1] for b in as_loader((y, y), batch_size=10, shuffle=True, seed=seed)])
    assert torch.equal(order(0), order(0))
    assert not torch.equal(order(0), order(1))
    assert sorted(order(0).tolist()) == list(range(100))


def test_as_loader_errors():
    with pytest.raises(TypeError, match="accepted"):
        as_loader("images.png")
    with pytest.raises(TypeError):
        as_loader([1, 2, 3])
    with pytest.raises(ValueError, match=r"\[10, 9\]"):
        as_loader((torch.zeros(10, 2), torch.zeros(9)))


def test_num_samples():  # what a batch holds (inputs_of, targets_of): tests/batches/test_batches.py
    assert num_samples(torch.zeros(5, 2)) == 5
    assert num_samples((torch.zeros(5, 2), torch.zeros(5))) == 5
    assert num_samples(digits("test")) == 450
    assert num_samples(as_loader(torch.zeros(7, 1), batch_size=2)) == 7
    assert num_samples(iter([1, 2])) is None
