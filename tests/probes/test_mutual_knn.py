"""mutual_knn at its edges: tiny and huge rows, all-zero and constant layers, tied neighbours.

The reference is Huh et al. (2024)'s definition computed by set enumeration in the test: each sample's
k nearest neighbours by cosine similarity (itself excluded), score = mean over samples of
|N_x(i) ∩ N_y(i)| / k; where the k-th neighbour is tied, every admissible neighbour set is equally likely.
"""
from __future__ import annotations

from itertools import combinations, product

import numpy as np
import pytest

from workbench.similarity import mutual_knn


def _admissible_neighbour_sets(z: np.ndarray, i: int, k: int) -> list[frozenset[int]]:
    """Every k-set of neighbours of sample i that a nearest-neighbour search may return (ties are exact here)."""
    unit = z / np.linalg.norm(z, axis=1, keepdims=True)
    similarity = {j: round(float(unit[i] @ unit[j]), 9) for j in range(len(z)) if j != i}
    kth = sorted(similarity.values(), reverse=True)[k - 1]
    above = frozenset(j for j, s in similarity.items() if s > kth)
    tied = [j for j, s in similarity.items() if s == kth]
    return [above | frozenset(choice) for choice in combinations(tied, k - len(above))]


def reference_mutual_knn(x: np.ndarray, y: np.ndarray, k: int) -> float:
    """Expected mutual-kNN score when ties are broken uniformly at random, independently in x and y."""
    scores = []
    for i in range(len(x)):
        sets_x, sets_y = _admissible_neighbour_sets(x, i, k), _admissible_neighbour_sets(y, i, k)
        scores.append(np.mean([len(a & b) / k for a, b in product(sets_x, sets_y)]))
    return float(np.mean(scores))


def test_each_row_may_have_any_scale():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(40, 6))
    row_scales = 10.0 ** rng.uniform(-300, 300, size=(40, 1))
    row_scales[:10] = 1e-13  # below F.normalize's epsilon: gave 0.7 for an exact copy
    assert mutual_knn(x, x * row_scales, k=5) == 1.0
    assert mutual_knn(x * 1e-12, x, k=5) == 1.0
    assert mutual_knn(x * 1e-310, x * 1e300, k=5) == 1.0  # subnormal and near-overflow values


def test_all_zero_rows_give_nan_with_a_warning():
    rng = np.random.default_rng(1)
    x = rng.normal(size=(20, 4))
    with pytest.warns(UserWarning, match=r"y has 2 all-zero samples \(rows \[3, 7\]\)"):
        with_dead_rows = x.copy()
        with_dead_rows[[3, 7]] = 0
        assert np.isnan(mutual_knn(x, with_dead_rows, k=3))
    with pytest.warns(UserWarning, match="x has 20 all-zero samples"):
        assert np.isnan(mutual_knn(np.zeros((20, 4)), np.zeros((20, 4)), k=3))


def test_constant_layers_give_nan_with_a_warning():
    rng = np.random.default_rng(2)
    constant = np.ones((20, 4)) * rng.uniform(0.5, 2.0, size=(20, 1))  # one direction, any scale
    with pytest.warns(UserWarning, match="x points every sample the same way"):
        assert np.isnan(mutual_knn(constant, constant, k=3))
    with pytest.warns(UserWarning, match="y points every sample the same way"):
        assert np.isnan(mutual_knn(rng.normal(size=(20, 4)), constant, k=3))


def test_ties_count_as_equally_likely_neighbour_sets():
    rng = np.random.default_rng(3)
    # duplicated samples and a coarse grid make many exactly tied k-th neighbours
    base = rng.integers(-2, 3, size=(6, 3)).astype(float)
    x = np.concatenate([base, base[:3], base[:2]])
    y = np.concatenate([base[:, ::-1], base[:3, ::-1], rng.integers(-2, 3, size=(2, 3)).astype(float)])
    x[np.linalg.norm(x, axis=1) == 0] = 1.0
    y[np.linalg.norm(y, axis=1) == 0] = 1.0
    for k in (1, 2, 3):
        expected = reference_mutual_knn(x, y, k)
        assert mutual_knn(x, y, k=k) == pytest.approx(expected, abs=1e-12)
        order = rng.permutation(len(x))
        assert mutual_knn(x[order], y[order], k=k) == pytest.approx(expected, abs=1e-12)


def test_reference_agrees_without_ties():
    rng = np.random.default_rng(4)
    x = rng.normal(size=(15, 5))
    y = x + 0.8 * rng.normal(size=(15, 5))
    assert mutual_knn(x, y, k=4) == pytest.approx(reference_mutual_knn(x, y, 4), abs=1e-12)
