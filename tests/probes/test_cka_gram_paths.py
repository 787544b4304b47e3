"""The Gram products and the device-side pieces of the streaming CKA agree with the plain forms.

The blocked symmetric product (chosen by shape alone) against ``X Xᵀ``; the accumulator on either path
against a float64 reference; the device median against numpy's; the float32 column-sum overflow guard.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

from workbench.probes import kernels
from workbench.probes.kernels import (
    averaged_median, checked_centred_gram, gram_product, rbf_from_gram, rbf_kernel, uses_symmetric_product,
)
from workbench.similarity import CKAAccumulator


def features(n: int, d: int, dtype: torch.dtype = torch.float64, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, d, generator=torch.Generator().manual_seed(seed), dtype=torch.float64).to(dtype)


@pytest.mark.parametrize("shape", [(512, 4096), (513, 4104), (640, 5120)])
def test_symmetric_product_matches_the_full_one(shape):
    x = features(*shape)
    assert uses_symmetric_product(*shape)
    blocked, full = gram_product(x), x @ x.T
    half = (shape[0] + 1) // 2
    assert torch.equal(blocked[half:, :half], blocked[:half, half:].T)  # the corner is computed once
    np.testing.assert_allclose(blocked.numpy(), full.numpy(), rtol=1e-12, atol=1e-12 * full.abs().max().item())
    x32 = x.float()
    np.testing.assert_allclose(gram_product(x32).double().numpy(), full.numpy(), rtol=0,
                               atol=1e-5 * full.abs().max().item())


def test_the_route_depends_on_the_shape_alone():
    table = {(200, 32768): False, (511, 1 << 16): False, (512, 4095): False, (512, 4096): True,
             (1024, 8192): True, (1024, 4096): False, (4096, 768): False}
    for _ in range(2):
        assert {shape: uses_symmetric_product(*shape) for shape in table} == table


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_the_accumulator_agrees_on_both_routes(monkeypatch, dtype):
    base = features(512, 16, seed=1)
    teacher = [(base @ features(16, 4096, seed=2) + 3).to(dtype)]
    student = [(base[:, :8] @ features(8, 4096, seed=3) + features(512, 4096, seed=4)).to(dtype)]
    results = {}
    for symmetric in (True, False):
        monkeypatch.setattr(kernels, "uses_symmetric_product", lambda n, d, symmetric=symmetric: symmetric)
        accumulator = CKAAccumulator(1, 1)
        accumulator.update(teacher, student)
        results[symmetric] = accumulator.values()
    monkeypatch.undo()
    reference = CKAAccumulator(1, 1)
    reference.update([value.double() for value in teacher], [value.double() for value in student])
    tolerance = 1e-12 if dtype == torch.float64 else 1e-6
    np.testing.assert_allclose(results[True], results[False], atol=tolerance)
    np.testing.assert_allclose(results[True], reference.values(), atol=tolerance)


@pytest.mark.parametrize("count", [1, 2, 9, 16, 400])
def test_the_device_median_is_numpys(count):
    values = features(count, 1, seed=count).flatten().round(decimals=1)  # ties included
    assert averaged_median(values).item() == np.median(values.numpy())


def test_the_rbf_kernel_matches_the_numpy_bandwidth():
    gram = (lambda x: x @ x.T)(features(30, 5))
    squared = (gram.diagonal()[:, None] + gram.diagonal()[None, :] - 2 * gram).clamp_min(0)
    expected = torch.exp(-squared / (2 * 0.5**2 * float(np.median(squared.numpy()))))
    kernel, ok = rbf_kernel(gram, 0.5, None)
    assert ok.item() and torch.equal(kernel, expected) and torch.equal(rbf_from_gram(gram), expected)


def test_the_finite_flag_and_the_column_sum_guard():
    x = features(64, 8, dtype=torch.float32) + 10
    _, _, finite = checked_centred_gram(torch.where(torch.arange(8) == 3, torch.nan, x))
    assert not finite.item()
    huge = x * 3e36  # finite, but a float32 column sum of 64 overflows
    assert torch.isfinite(huge).all() and not torch.isfinite(huge.mean(0)).all()
    gram, _, finite = checked_centred_gram(huge)
    assert finite.item() and torch.isfinite(gram).all()
    accumulator = CKAAccumulator(1, 1)
    accumulator.update([huge], [x.double()])
    assert accumulator.values()[0, 0] == pytest.approx(1.0, abs=1e-6)


@pytest.mark.parametrize("precision", ["full", "bf16"])
def test_the_workspace_gives_the_same_grams_in_reused_memory(precision):
    workspace = kernels.Workspace()
    layers = [features(64, 3000, dtype=torch.float32, seed=1) + 5, features(64, 200, dtype=torch.float32, seed=2),
              features(64, 3000, dtype=torch.float64, seed=3)]
    pointers = []
    for x in layers * 2:
        expected = checked_centred_gram(x, precision)
        got = checked_centred_gram(x, precision, workspace)
        assert all(torch.equal(a, b) for a, b in zip(got, expected))  # bit for bit
        pointers.append(workspace._buffer.data_ptr())
    # the float32 buffer of the widest layer serves the narrower one; float64 (full) needs its own
    reused = [True, True, precision == "bf16", precision == "bf16", True, precision == "bf16"]
    assert [pointers[index] == pointers[index - 1] for index in range(1, 6)] == reused[1:]
    assert workspace.take((64, 3000), torch.float32, "cpu").data_ptr() != layers[0].data_ptr()


def test_the_accumulator_centres_every_layer_in_one_buffer(monkeypatch):
    made = []
    original = kernels.Workspace.take

    def take(self, shape, dtype, device):
        view = original(self, shape, dtype, device)
        made.append(view.untyped_storage().data_ptr())
        return view

    monkeypatch.setattr(kernels.Workspace, "take", take)
    accumulator = CKAAccumulator(2, 2)
    for seed in range(3):
        teacher = [features(32, 500, torch.float32, seed), features(32, 40, torch.float32, seed + 10)]
        student = [features(32, 80, torch.float32, seed + 20), features(32, 7, torch.float32, seed + 30)]
        accumulator.update(teacher, student)
    assert len(made) == 12 and len(set(made)) == 1  # 4 layers × 3 batches, one allocation


@pytest.mark.parametrize("precision", ["full", "bf16"])
def test_the_accumulator_reads_activations_that_require_grad(precision):
    """A training step's activations (with their graph) are read as values; the buffer takes no graph."""
    x = features(32, 50, torch.float32, seed=5).requires_grad_()
    accumulator, detached = CKAAccumulator(1, 1, precision=precision), CKAAccumulator(1, 1, precision=precision)
    accumulator.update([x * 2], [torch.tanh(x)])
    detached.update([(x * 2).detach()], [torch.tanh(x).detach()])
    assert np.array_equal(accumulator.values(), detached.values()) and x.grad is None
