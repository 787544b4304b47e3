"""The opt-in bfloat16 Gram (``precision="bf16"``): what it computes, how far it is from float64, what it refuses.

References are float64 numpy (Song et al.'s HSIC from ``test_cka_edges``): the bfloat16 rounding of the centred features is done by
torch's own cast (the definition of the mode), everything after it in float64, apart from
``workbench.probes.kernels``. The accuracy bound is the measured error (about 1e-4 at 64 samples a batch)
with room, and the test also checks that the mode is not silently the float32 path (its error is larger).
"""
from __future__ import annotations

import json
import warnings

import numpy as np
import pytest
import torch
from test_cka_edges import song_hsic  # Song et al. (2012) eq. 5, written out in float64 numpy

from workbench.probes import kernels
from workbench.probes.kernels import PRECISIONS, checked_centred_gram
from workbench.similarity import CKAAccumulator, CKAResult, cka_matrix

LAYERS = ["blocks.0", "blocks.1", "blocks.2", "pool", "head"]


def streamed_cka(batches: list[tuple[list[np.ndarray], list[np.ndarray]]]) -> np.ndarray:
    """Σ_b HSIC(K_b, L_b) / sqrt(Σ_b HSIC(K_b, K_b) · Σ_b HSIC(L_b, L_b)) from float64 feature batches."""
    cross = self_t = self_s = 0
    for teacher, student in batches:
        cross = cross + np.array([[song_hsic(x, y) for y in student] for x in teacher])
        self_t = self_t + np.array([song_hsic(x, x) for x in teacher])
        self_s = self_s + np.array([song_hsic(y, y) for y in student])
    return cross / np.sqrt(np.outer(self_t, self_s))


def layered_batches(n_batches: int = 4, n: int = 64, seed: int = 0) -> list[tuple[list[torch.Tensor], ...]]:
    """Teacher and student float32 layers sharing a low-rank signal, with ReLU-like offsets and noise."""
    generator = torch.Generator().manual_seed(seed)
    batches = []
    for _ in range(n_batches):
        signal = torch.randn(n, 6, generator=generator)
        teacher = [torch.relu(signal @ torch.randn(6, d, generator=generator) + 0.3 * torch.randn(n, d, generator=generator))
                   for d in (512, 2048)]
        student = [signal[:, :3] @ torch.randn(3, d, generator=generator) + 1.5 + torch.randn(n, d, generator=generator)
                   for d in (256, 1024, 10)]
        batches.append((teacher, student))
    return batches


def accumulated(batches, **kwargs) -> np.ndarray:
    accumulator = CKAAccumulator(len(batches[0][0]), len(batches[0][1]), **kwargs)
    for teacher, student in batches:
        accumulator.update(teacher, student)
    return accumulator.values()


def as_float64(batches):
    return [([x.double().numpy() for x in teacher], [y.double().numpy() for y in student]) for teacher, student in batches]


def test_the_bf16_gram_is_the_product_of_the_rounded_centred_features():
    x = torch.randn(48, 300, generator=torch.Generator().manual_seed(3)) * 7 + 40  # a large common offset
    gram, exponent, finite = checked_centred_gram(x, "bf16")
    assert gram.dtype == torch.float32 and bool(finite)
    scale = 2.0 ** -exponent.item()
    centred = torch.from_numpy((x.double().numpy() - x.double().numpy().mean(0)) * scale)
    rounded = centred.float().to(torch.bfloat16).double().numpy()  # the mode: bf16 features, a float64 product
    expected = rounded @ rounded.T
    # the CPU's product rounds each entry to bfloat16 (8 bits): relative 2**-8 of the largest entry at most
    np.testing.assert_allclose(gram.double().numpy(), expected, rtol=0, atol=2.0**-8 * np.abs(expected).max())
    exact = centred.numpy() @ centred.numpy().T
    assert np.abs(gram.double().numpy() - exact).max() > 1e-6 * np.abs(exact).max()  # really bfloat16, not float32


def test_bf16_cka_is_within_its_stated_error_of_float64_and_not_the_float32_path():
    batches = layered_batches()
    reference = streamed_cka(as_float64(batches))
    full, low = accumulated(batches), accumulated(batches, precision="bf16")
    assert np.abs(full - reference).max() < 1e-6
    error = np.abs(low - reference).max()
    assert 1e-7 < error < 2e-3, error  # measured ≈ 1e-4 at 64 samples a batch on these features
    assert np.abs(low - full).max() > 1e-7


def test_cka_matrix_takes_the_precision_and_records_it(conv_pair, images, tmp_path):
    teacher, student = conv_pair
    full = cka_matrix(teacher, student, images, LAYERS, LAYERS, batch_size=100, device="cpu", progress=False)
    low = cka_matrix(teacher, student, images, LAYERS, LAYERS, batch_size=100, device="cpu", progress=False,
                     precision="bf16")
    assert full.precision == "full" and low.precision == "bf16"
    assert "bf16 Grams" in low.title and "bf16" not in full.title
    assert 1e-7 < np.abs(low.values - full.values).max() < 2e-3
    loaded = CKAResult.load(low.save(tmp_path / "low.json"))
    assert loaded.precision == "bf16" and np.array_equal(loaded.values, low.values)


def test_a_result_file_without_a_precision_reads_as_full(tmp_path):
    path = CKAResult(np.array([[0.5]]), ["t"], ["s"], n_samples=8).save(tmp_path / "r.json")
    record = json.loads(path.read_text())
    assert record.pop("precision") == "full"
    path.write_text(json.dumps(record))  # a file written before the field existed
    assert CKAResult.load(path).precision == "full"
    with pytest.raises(ValueError, match=r"precision must be one of \('full', 'bf16'\), got 'fp8'"):
        CKAResult(np.array([[0.5]]), ["t"], ["s"], n_samples=8, precision="fp8")


@pytest.mark.parametrize("kind", ["zero", "constant", "one sample"])
def test_dead_layers_stay_nan_with_bf16_grams(kind):
    rng = np.random.default_rng(2)
    dead = np.zeros((60, 7))
    if kind == "constant":
        dead += 3.7e3
    elif kind == "one sample":
        dead[4] = rng.normal(size=7) * 1e3
    live = torch.from_numpy(rng.normal(size=(60, 5))).float()
    with pytest.warns(UserWarning, match=r"teacher layer '#0' \(over 60 samples\) has a U-centred Gram of zero"):
        values = accumulated([([torch.from_numpy(dead).float()], [live])], precision="bf16")
    assert np.isnan(values).all()


def test_faults_are_still_raised_with_bf16_grams():
    x = torch.randn(16, 5)
    with pytest.raises(FloatingPointError, match="teacher layer '#0' produced NaN or Inf in the batch starting at sample 0"):
        accumulated([([torch.where(x > 1.5, torch.inf, x)], [x])], precision="bf16")
    with pytest.raises(ValueError, match=r"float64 features of magnitude about 2\*\*"):
        accumulated([([x.double() * 2.0**300], [x])], precision="bf16")


def test_integer_layers_enter_the_bf16_route_after_their_exact_centring():
    generator = torch.Generator().manual_seed(4)
    x = torch.randint(0, 9, (64, 40), generator=generator) + 2**40
    y = (x - 2**40).float() @ torch.randn(40, 12, generator=generator) + torch.randn(64, 12, generator=generator)
    reference = streamed_cka([([(x - 2**40).double().numpy()], [y.double().numpy()])])
    values = accumulated([([x], [y])], precision="bf16")
    assert np.abs(values - reference).max() < 2e-3


def test_unknown_precisions_and_bf16_rbf_are_refused_before_any_forward(conv_pair, images, hook_count):
    teacher, student = conv_pair
    assert PRECISIONS == ("full", "bf16")
    with pytest.raises(ValueError, match=r"precision must be one of \('full', 'bf16'\), got 'tf32'"):
        cka_matrix(teacher, student, images, LAYERS, LAYERS, device="cpu", progress=False, precision="tf32")
    with pytest.raises(ValueError, match="precision='bf16' is for the linear kernel only"):
        cka_matrix(teacher, student, images, LAYERS, LAYERS, kernel="rbf", device="cpu", progress=False,
                   precision="bf16")
    with pytest.raises(ValueError, match="precision must be one of"):
        CKAAccumulator(1, 1, precision=None)
    assert hook_count(teacher) == hook_count(student) == 0


def test_accumulators_of_different_precisions_do_not_merge():
    batches = layered_batches(n_batches=1)
    full, low = CKAAccumulator(2, 3), CKAAccumulator(2, 3, precision="bf16")
    full.update(*batches[0])
    low.update(*batches[0])
    with pytest.raises(ValueError, match=r"precision: 'full' here, 'bf16' in the other"):
        full.merge(low)


def test_the_bf16_route_multiplies_bfloat16_features(monkeypatch):
    """The product really receives bfloat16 features (not float32 ones that were merely rounded)."""
    seen = []
    product = kernels.gram_product
    monkeypatch.setattr(kernels, "gram_product", lambda features: seen.append(features.dtype) or product(features))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        accumulated(layered_batches(n_batches=1), precision="bf16")
        accumulated(layered_batches(n_batches=1))
    assert seen == [torch.bfloat16] * 5 + [torch.float32] * 5
