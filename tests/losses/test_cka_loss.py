"""CKALoss: equals 1 − the probe's debiased linear CKA, a hand value, invariances, gradients, errors."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from workbench.losses import CKALoss
from workbench.similarity import linear_cka


def song_unbiased_hsic(x: np.ndarray, y: np.ndarray) -> float:
    """Song et al. (2012) Eq. 5, term by term: zero-diagonal Grams, no U-centring."""
    n = len(x)
    k, l = x @ x.T, y @ y.T
    np.fill_diagonal(k, 0)
    np.fill_diagonal(l, 0)
    ones = np.ones(n)
    value = (
        np.trace(k @ l)
        + (ones @ k @ ones) * (ones @ l @ ones) / ((n - 1) * (n - 2))
        - 2 / (n - 2) * ones @ k @ l @ ones
    )
    return value / (n * (n - 3))


@pytest.fixture
def features():
    generator = torch.Generator().manual_seed(0)
    student = torch.randn(32, 12, generator=generator)
    teacher = student @ torch.randn(12, 20, generator=generator) + 0.5 * torch.randn(32, 20, generator=generator)
    return student, torch.relu(teacher) + 3.0  # a large common offset, as after deep ReLU layers


def test_equals_one_minus_probe_linear_cka(features):
    student, teacher = features
    for debiased in (True, False):
        reference = 1 - linear_cka(student, teacher, debiased=debiased)
        assert CKALoss(debiased)(student, teacher).item() == pytest.approx(reference, abs=1e-5)  # float32
        value64 = CKALoss(debiased)(student.double(), teacher.double()).item()
        assert value64 == pytest.approx(reference, abs=1e-10)
    maps = student.reshape(32, 3, 2, 2)  # flattened per sample, like the probe
    assert CKALoss()(maps, teacher).item() == pytest.approx(1 - linear_cka(maps, teacher, debiased=True), abs=1e-5)


def test_hand_values():
    # biased linear CKA of 1-d features is the squared correlation: x = [1, 2, 3], y = [1, 2, 4] -> ρ² = 27/28
    x, y = torch.tensor([[1.0], [2.0], [3.0]]), torch.tensor([[1.0], [2.0], [4.0]])
    assert CKALoss(debiased=False)(x, y).item() == pytest.approx(1 / 28, rel=1e-5)
    # debiased: Song et al.'s unbiased HSIC written term by term on a tiny batch
    a = np.array([[1.0, 0.0], [0.0, 2.0], [1.0, 1.0], [3.0, -1.0], [0.0, 0.5]])
    b = np.array([[2.0], [1.0], [0.0], [4.0], [-1.0]])
    cka = song_unbiased_hsic(a, b) / np.sqrt(song_unbiased_hsic(a, a) * song_unbiased_hsic(b, b))
    assert CKALoss()(torch.tensor(a), torch.tensor(b)).item() == pytest.approx(1 - cka, abs=1e-12)


def test_invariant_to_orthogonal_transforms_and_scale(features):
    student, teacher = (x.double() for x in features)
    rotation = torch.linalg.qr(torch.randn(12, 12, dtype=torch.float64, generator=torch.Generator().manual_seed(3)))[0]
    base = CKALoss()(student, teacher).item()
    assert base > 0.05
    assert CKALoss()(student @ rotation, teacher).item() == pytest.approx(base, abs=1e-10)
    assert CKALoss()(4.0 * student, 0.1 * teacher).item() == pytest.approx(base, abs=1e-10)
    assert CKALoss()(student @ rotation, student).item() == pytest.approx(0.0, abs=1e-10)


def test_finite_gradient_in_float32_and_no_teacher_gradient(features):
    student = features[0].clone().requires_grad_(True)
    teacher = features[1].clone().requires_grad_(True)
    CKALoss()(student, teacher).backward()
    assert teacher.grad is None
    assert torch.isfinite(student.grad).all() and student.grad.abs().sum() > 0


def test_half_precision_inputs_are_computed_in_float32(features):
    student, teacher = (x.to(torch.bfloat16) for x in features)
    value = CKALoss()(student, teacher)
    assert value.dtype == torch.float32
    assert value.item() == pytest.approx(1 - linear_cka(student.float(), teacher.float(), debiased=True), abs=1e-5)


def test_clear_errors():
    with pytest.raises(ValueError, match=r"student has 6, the teacher has 5"):
        CKALoss()(torch.randn(6, 3), torch.randn(5, 3))
    with pytest.raises(ValueError, match=r"at least 4 samples.*got 3"):
        CKALoss()(torch.randn(3, 3), torch.randn(3, 3))
