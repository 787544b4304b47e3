"""Relation terms (RKD, SimilarityPreserving, PKT): hand values, invariances, gradients, errors."""
from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch

from workbench.losses import PKT, RKD, SimilarityPreserving


def huber(a: float, b: float) -> float:
    gap = abs(a - b)
    return 0.5 * gap**2 if gap < 1 else gap - 0.5


def rkd_by_hand(student: np.ndarray, teacher: np.ndarray) -> tuple[float, float]:
    """Distance and angle losses with explicit loops (no matrix tricks)."""
    n = len(student)

    def distances(e):
        d = np.array([[np.linalg.norm(e[i] - e[j]) for j in range(n)] for i in range(n)])
        return d / (d.sum() / (n * (n - 1)))

    def angles(e):
        out = np.zeros((n, n, n))
        for i, j, k in itertools.product(range(n), repeat=3):
            u, v = e[j] - e[i], e[k] - e[i]
            if np.linalg.norm(u) > 0 and np.linalg.norm(v) > 0:
                out[i, j, k] = u @ v / (np.linalg.norm(u) * np.linalg.norm(v))
        return out

    ds, dt = distances(student), distances(teacher)
    as_, at = angles(student), angles(teacher)
    distance = np.mean([huber(a, b) for a, b in zip(ds.ravel(), dt.ravel())])
    angle = np.mean([huber(a, b) for a, b in zip(as_.ravel(), at.ravel())])
    return distance, angle


def test_rkd_hand_value_on_three_points():
    student = np.array([[0.0, 0.0], [1.0, 0.0], [0.0, 1.0]])
    teacher = np.array([[0.0, 0.0], [2.0, 0.0], [0.0, 1.0]])
    # distances: student 1, 1, √2 (mean (2 + √2)/3); teacher 2, 1, √5 (mean (3 + √5)/3)
    mean_s, mean_t = (2 + math.sqrt(2)) / 3, (3 + math.sqrt(5)) / 3
    pairs = [(1 / mean_s, 2 / mean_t), (1 / mean_s, 1 / mean_t), (math.sqrt(2) / mean_s, math.sqrt(5) / mean_t)]
    distance = 2 * sum(huber(a, b) for a, b in pairs) / 9  # each pair twice in the 3×3 matrix, diagonal 0
    looped_distance, angle = rkd_by_hand(student, teacher)
    assert distance == pytest.approx(looped_distance, rel=1e-12)
    s, t = torch.tensor(student, dtype=torch.float32), torch.tensor(teacher, dtype=torch.float32)
    assert RKD(1.0, 0.0)(s, t).item() == pytest.approx(distance, rel=1e-5)
    assert RKD(0.0, 1.0)(s, t).item() == pytest.approx(angle, rel=1e-5)
    assert RKD()(s, t).item() == pytest.approx(25 * distance + 50 * angle, rel=1e-5)


def test_rkd_matches_loops_on_random_embeddings():
    rng = np.random.default_rng(0)
    student, teacher = rng.normal(size=(6, 4)), rng.normal(size=(6, 7))
    distance, angle = rkd_by_hand(student, teacher)
    value = RKD()(torch.tensor(student), torch.tensor(teacher)).item()
    assert value == pytest.approx(25 * distance + 50 * angle, rel=1e-10)


def test_rkd_invariant_to_embedding_scale_and_shift():
    generator = torch.Generator().manual_seed(0)
    student, teacher = torch.randn(8, 5, generator=generator), torch.randn(8, 3, generator=generator)
    base = RKD()(student, teacher).item()
    assert base > 0.1
    assert RKD()(3.5 * student + 2.0, teacher).item() == pytest.approx(base, rel=1e-5)
    assert RKD()(student, 0.01 * teacher - 1.0).item() == pytest.approx(base, rel=1e-5)
    assert RKD()(teacher.clone(), teacher).item() == pytest.approx(0.0, abs=1e-6)


def test_similarity_preserving_hand_value_and_scale_invariance():
    # G_s = [[1, 1], [1, 2]] -> rows [1, 1]/√2, [1, 2]/√5; G_t = I
    student, teacher = torch.tensor([[1.0, 0.0], [1.0, 1.0]]), torch.eye(2)
    a, b, c = 1 / math.sqrt(2), 1 / math.sqrt(5), 2 / math.sqrt(5)
    expected = ((a - 1) ** 2 + a**2 + b**2 + (c - 1) ** 2) / 4
    assert SimilarityPreserving()(student, teacher).item() == pytest.approx(expected, rel=1e-6)
    x, y = torch.randn(6, 3, 2, 2), torch.randn(6, 5)
    base = SimilarityPreserving()(x, y).item()
    assert SimilarityPreserving()(10 * x, 0.1 * y).item() == pytest.approx(base, rel=1e-5)
    assert SimilarityPreserving()(y.clone(), y).item() == pytest.approx(0.0, abs=1e-7)


def test_pkt_hand_value_and_invariances():
    # student: cos = I -> K = [[1, 1/2], [1/2, 1]] -> P_s = [[2/3, 1/3], [1/3, 2/3]]; teacher: parallel -> P_t = 1/2
    student, teacher = torch.eye(2, dtype=torch.float64), torch.tensor([[1.0, 0.0], [2.0, 0.0]], dtype=torch.float64)
    eps = 1e-7
    expected = sum(0.5 * math.log((0.5 + eps) / (p + eps)) for p in (2 / 3, 1 / 3, 1 / 3, 2 / 3)) / 4
    assert PKT()(student, teacher).item() == pytest.approx(expected, rel=1e-10)
    x, y = torch.randn(6, 4), torch.randn(6, 9)
    assert PKT()(5 * x, y).item() == pytest.approx(PKT()(x, y).item(), rel=1e-5)
    assert PKT()(x, x.clone()).item() == pytest.approx(0.0, abs=1e-7)


TERMS = [RKD(), SimilarityPreserving(), PKT()]


@pytest.mark.parametrize("term", TERMS, ids=lambda term: type(term).__name__)
def test_finite_student_gradient_and_no_teacher_gradient(term):
    generator = torch.Generator().manual_seed(0)
    student = torch.randn(8, 4, 3, 3, generator=generator)
    student[1] = student[0]  # a duplicate row: zero distance, degenerate angles
    student.requires_grad_(True)
    teacher = torch.randn(8, 6, generator=generator).requires_grad_(True)
    term(student, teacher).backward()
    assert teacher.grad is None
    assert torch.isfinite(student.grad).all() and student.grad.abs().sum() > 0


@pytest.mark.parametrize("term", TERMS, ids=lambda term: type(term).__name__)
def test_clear_error_on_batch_mismatch(term):
    with pytest.raises(ValueError, match=r"student has 5, the teacher has 4"):
        term(torch.randn(5, 3), torch.randn(4, 3))
