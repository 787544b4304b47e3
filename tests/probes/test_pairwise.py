"""linear / RBF / debiased CKA and mutual kNN against published values, invariances and references."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy.stats import ortho_group
from sklearn.neighbors import NearestNeighbors

from workbench.similarity import linear_cka, mutual_knn, rbf_cka


@pytest.fixture
def kornblith_demo():
    """The demo data of Kornblith et al.'s CKA notebook."""
    np.random.seed(1337)
    x = np.random.randn(100, 10)
    y = np.random.randn(100, 10) + x
    return x, y


def test_published_values(kornblith_demo):
    x, y = kornblith_demo
    assert round(linear_cka(x, y), 5) == 0.55761
    assert round(rbf_cka(x, y, threshold=0.5), 5) == 0.65483
    assert round(linear_cka(x, y, debiased=True), 5) == 0.51346


def reference_linear_cka(x: np.ndarray, y: np.ndarray) -> float:
    """The feature-space form ‖YᵀX‖²_F / (‖XᵀX‖_F ‖YᵀY‖_F) — not the Gram form the library uses."""
    x, y = x - x.mean(0), y - y.mean(0)
    return np.linalg.norm(y.T @ x) ** 2 / (np.linalg.norm(x.T @ x) * np.linalg.norm(y.T @ y))


def test_linear_cka_matches_feature_space_form(kornblith_demo):
    x, y = kornblith_demo
    assert linear_cka(x, y) == pytest.approx(reference_linear_cka(x, y), abs=1e-12)


def test_explicit_sigma_overrides_median_rule(kornblith_demo):
    x, y = kornblith_demo
    d2 = ((x[:, None] - x[None]) ** 2).sum(-1)
    sigma_x = 0.5 * np.sqrt(np.median(d2))
    d2y = ((y[:, None] - y[None]) ** 2).sum(-1)
    kx, ky = np.exp(-d2 / (2 * sigma_x**2)), np.exp(-d2y / (2 * sigma_x**2))
    h = np.eye(100) - 1 / 100
    kx, ky = h @ kx @ h, h @ ky @ h
    expected = (kx * ky).sum() / (np.linalg.norm(kx) * np.linalg.norm(ky))
    assert rbf_cka(x, y, sigma=sigma_x) == pytest.approx(expected, abs=1e-12)
    assert rbf_cka(x, y, sigma=sigma_x) != pytest.approx(rbf_cka(x, y), abs=1e-6)


MEASURES = [
    pytest.param(lambda a, b: linear_cka(a, b), id="linear"),
    pytest.param(lambda a, b: linear_cka(a, b, debiased=True), id="linear-debiased"),
    pytest.param(lambda a, b: rbf_cka(a, b), id="rbf"),
    pytest.param(lambda a, b: rbf_cka(a, b, debiased=True), id="rbf-debiased"),
]

seeds = st.integers(0, 2**31 - 1)


def _pair(seed: int, n: int = 40, d: int = 6) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, d))
    return x, x @ rng.normal(size=(d, d)) + rng.normal(size=(n, d))


@pytest.mark.parametrize("measure", MEASURES)
@settings(max_examples=25, deadline=None)
@given(seed=seeds)
def test_invariant_to_orthogonal_transform(measure, seed):
    x, y = _pair(seed)
    q = ortho_group.rvs(x.shape[1], random_state=seed)
    assert measure(x @ q, y) == pytest.approx(measure(x, y), abs=1e-9)


@pytest.mark.parametrize("measure", MEASURES)
@settings(max_examples=25, deadline=None)
@given(seed=seeds, scale=st.floats(1e-4, 1e4))
def test_invariant_to_isotropic_scaling(measure, seed, scale):
    x, y = _pair(seed)
    assert measure(scale * x, y) == pytest.approx(measure(x, y), abs=1e-9)


@pytest.mark.parametrize("measure", MEASURES)
@settings(max_examples=25, deadline=None)
@given(seed=seeds, shift=st.floats(-1e3, 1e3))
def test_invariant_to_translation(measure, seed, shift):
    x, y = _pair(seed)
    offset = np.random.default_rng(seed).normal(size=x.shape[1]) * shift
    assert measure(x + offset, y) == pytest.approx(measure(x, y), abs=1e-8)


@pytest.mark.parametrize("measure", MEASURES)
@settings(max_examples=25, deadline=None)
@given(seed=seeds)
def test_self_similarity_is_one(measure, seed):
    x, _ = _pair(seed)
    assert measure(x, x) == pytest.approx(1.0, abs=1e-12)


@settings(max_examples=25, deadline=None)
@given(seed=seeds, stretch=st.floats(3.0, 100.0))
def test_not_invariant_to_general_invertible_map(seed, stretch):
    x, _ = _pair(seed, n=60)
    stretched = x @ np.diag([stretch] + [1.0] * (x.shape[1] - 1))
    assert linear_cka(x, stretched) < 1 - 1e-3
    assert linear_cka(x, stretched, debiased=True) < 1 - 1e-3


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("debiased", [False, True])
def test_low_precision_inputs_give_float64_cka_of_their_values(dtype, debiased):
    generator = torch.Generator().manual_seed(3)
    deep = torch.relu(torch.randn(256, 2048, generator=generator)) * 0.1 + 100.0  # large common offset
    other = deep[:, :1024] * 1.5 + 0.05 * torch.randn(256, 1024, generator=generator) + 30.0
    x, y = deep.to(dtype), other.to(dtype)
    expected = reference_linear_cka(x.double().numpy(), y.double().numpy()) if not debiased else None
    value = linear_cka(x, y, debiased=debiased)
    if expected is not None:
        assert value == pytest.approx(expected, abs=1e-6)
    assert value == pytest.approx(linear_cka(x.double().numpy(), y.double().numpy(), debiased=debiased), abs=1e-6)


def test_mutual_knn_matches_sklearn_neighbours():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(80, 12))
    y = x + 0.7 * rng.normal(size=(80, 12))
    k = 7
    neighbours = []
    for z in (x, y):
        unit = z / np.linalg.norm(z, axis=1, keepdims=True)
        index = NearestNeighbors(n_neighbors=k + 1, metric="cosine").fit(unit).kneighbors(unit)[1]
        neighbours.append([set(row) - {i} for i, row in enumerate(index)])
    expected = np.mean([len(a & b) / k for a, b in zip(*neighbours)])
    assert mutual_knn(x, y, k=k) == pytest.approx(expected, abs=1e-12)
    assert mutual_knn(x, 3 * x, k=k) == 1.0
    assert mutual_knn(x, rng.normal(size=(80, 12)), k=k) < 0.3


def test_bad_inputs_give_clear_errors():
    x = np.random.default_rng(0).normal(size=(10, 3))
    with pytest.raises(ValueError, match="x has 10 samples, y has 9"):
        linear_cka(x, x[:9])
    with pytest.raises(ValueError, match="NaN or Inf"):
        linear_cka(np.where(np.eye(10, 3) > 0, np.nan, x), x)
    with pytest.raises(ValueError, match="at least 4"):
        linear_cka(x[:3], x[:3], debiased=True)
    with pytest.raises(ValueError, match="k must be"):
        mutual_knn(x, x, k=10)
    with pytest.raises(TypeError, match="numpy array or a torch tensor"):
        linear_cka([[1.0, 2.0]] * 5, x[:5])
