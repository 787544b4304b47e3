"""CKA at the edges: any magnitude, integer activations, dead layers, RBF settings and merges.

References are written here: the feature-space form of linear CKA and Song et al.'s unbiased HSIC term by
term, in float64 numpy on the exact values given (integers centred in Python integers, not floats).
"""
from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from torch import nn

from workbench.losses import CKALoss
from workbench.reports import gap_summary
from workbench.similarity import CKAAccumulator, CKAResult, PredictionResult, cka_matrix, linear_cka, rbf_cka


def feature_space_cka(x: np.ndarray, y: np.ndarray) -> float:
    """Biased linear CKA, ‖YᵀX‖²_F / (‖XᵀX‖_F ‖YᵀY‖_F) on centred features (Kornblith et al. 2019)."""
    x, y = x - x.mean(0), y - y.mean(0)
    return np.linalg.norm(y.T @ x) ** 2 / (np.linalg.norm(x.T @ x) * np.linalg.norm(y.T @ y))


def song_hsic(x: np.ndarray, y: np.ndarray) -> float:
    """Song et al. (2012) eq. 5 on linear Grams: zero diagonals, no U-centring."""
    n = len(x)
    k, l = x @ x.T, y @ y.T
    np.fill_diagonal(k, 0)
    np.fill_diagonal(l, 0)
    ones = np.ones(n)
    value = (np.trace(k @ l) + (ones @ k @ ones) * (ones @ l @ ones) / ((n - 1) * (n - 2))
             - 2 / (n - 2) * ones @ k @ l @ ones)
    return value / (n * (n - 3))


def debiased_cka(x: np.ndarray, y: np.ndarray) -> float:
    return song_hsic(x, y) / np.sqrt(song_hsic(x, x) * song_hsic(y, y))


@pytest.fixture
def pair():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(60, 8))
    return x, x @ rng.normal(size=(8, 6)) + rng.normal(size=(60, 6))


def accumulate(teacher: list[torch.Tensor], student: list[torch.Tensor], **kwargs) -> np.ndarray:
    accumulator = CKAAccumulator(len(teacher), len(student), **kwargs)
    accumulator.update(teacher, student)
    return accumulator.values()


# ------------------------------------------------------------------------------------------ magnitude
@pytest.mark.parametrize("scale", [1e80, 1e-82, 1e160, 1e-160, 1e300, 1e-300])
def test_pairwise_cka_is_scale_invariant_at_any_magnitude(pair, scale):
    """Was 0.0 at 1e80, inf at 1e-82, NaN at 1e160."""
    x, y = pair
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert linear_cka(x * scale, y) == pytest.approx(feature_space_cka(x, y), abs=1e-12)
        assert linear_cka(x * scale, y * scale, debiased=True) == pytest.approx(debiased_cka(x, y), abs=1e-12)
        assert rbf_cka(x * scale, y) == pytest.approx(rbf_cka(x, y), abs=1e-12)
        assert rbf_cka(x * scale, y * scale, sigma=3 * scale) == pytest.approx(rbf_cka(x, y, sigma=3), abs=1e-12)


@pytest.mark.parametrize("scale", [1e-22, 1e-23, 1e-30, 1e-40, 1e30, 1e37])
def test_float32_layers_of_any_magnitude_match_the_float64_formula(pair, scale):
    """cka_matrix's Grams are float32 products: 1e-23 underflowed to NaN, 1e-22 was off in the third digit."""
    x, y = (torch.from_numpy(a).float() for a in pair)
    small = x * scale  # float32 values: the reference is the exact formula on these values
    expected = debiased_cka(small.double().numpy(), y.double().numpy())
    np.testing.assert_allclose(accumulate([small], [y]), [[expected]], atol=1e-6)
    biased = feature_space_cka(small.double().numpy(), y.double().numpy())
    np.testing.assert_allclose(accumulate([small], [y], debiased=False), [[biased]], atol=1e-6)


@pytest.mark.parametrize("offset", [0, 2**40, -(2**50)])
def test_integer_activations_are_centred_exactly(offset):
    """int64 was centred in float32: off in the fourth digit, NaN at 2**40 offsets."""
    rng = np.random.default_rng(1)
    ints = rng.integers(-1000, 1000, size=(40, 5))
    other = ints @ rng.integers(-3, 4, size=(5, 4)) + rng.integers(-500, 500, size=(40, 4))
    exact = (ints - ints.mean(0)).astype(np.float64)  # offsets cancel exactly; centring in float64 is then exact
    expected = debiased_cka(exact, other.astype(np.float64))
    teacher = torch.from_numpy(ints + offset)
    np.testing.assert_allclose(accumulate([teacher], [torch.from_numpy(other)]), [[expected]], atol=1e-6)
    assert linear_cka(ints + offset, other, debiased=True) == pytest.approx(expected, abs=1e-9)
    masks = torch.from_numpy(ints > 0)  # bool activations
    expected_bool = debiased_cka((ints > 0).astype(np.float64), other.astype(np.float64))
    np.testing.assert_allclose(accumulate([masks], [torch.from_numpy(other)]), [[expected_bool]], atol=1e-6)


def test_float64_layers_beyond_the_sums_range_are_refused():
    x = torch.randn(16, 4, dtype=torch.float64)
    with pytest.raises(ValueError, match=r"teacher layer '#0' has float64 features of magnitude about 2\*\*"):
        accumulate([x * 1e80], [x])
    np.testing.assert_allclose(accumulate([x * 1e50], [x]), [[1.0]], atol=1e-12)  # inside the range: exact


def test_normal_float32_values_are_unchanged_by_the_scaling(pair):
    """Scaling by a power of two changes no digit: the same bits as the plain float32 product."""
    x, y = (torch.from_numpy(a).float() + 3.0 for a in pair)
    values = accumulate([x], [y])
    plain = [(v - v.mean(0)) @ (v - v.mean(0)).T for v in (x, y)]  # the old float32 path, by hand
    grams = [g.double() for g in plain]
    centred = [song_like_u_centre(g) for g in grams]
    expected = (centred[0] * centred[1]).sum() / (centred[0].norm() * centred[1].norm())
    assert values[0, 0] == pytest.approx(expected.item(), abs=1e-12)


def song_like_u_centre(gram: torch.Tensor) -> torch.Tensor:
    """U-centring written out (Song et al.): zero diagonal, subtract row/column sums, add the total."""
    n = gram.shape[0]
    k = gram.clone().fill_diagonal_(0)
    rows = k.sum(1, keepdim=True) / (n - 2)
    total = k.sum() / ((n - 1) * (n - 2))
    return (k - rows - rows.T + total).fill_diagonal_(0)


# ------------------------------------------------------------------------------------------ dead layers
def dead_features(kind: str, n: int = 30, d: int = 5) -> np.ndarray:
    x = np.zeros((n, d))
    if kind == "constant":
        x += 3.7
    elif kind == "one sample":
        x[4] = np.random.default_rng(2).normal(size=d) * 1e3
    return x


@pytest.mark.parametrize("kind, debiased", [("zero", False), ("zero", True), ("constant", False),
                                            ("constant", True), ("one sample", True)])
def test_pairwise_cka_of_a_dead_layer_is_nan_with_a_warning_naming_it(pair, kind, debiased):
    """One non-zero sample (debiased) gave rounding noise (2e-5) with no warning."""
    dead, y = dead_features(kind, n=len(pair[1])), pair[1]
    with pytest.warns(UserWarning, match=r"linear CKA: x has a (U-)?centred Gram of zero"):
        assert np.isnan(linear_cka(dead, y, debiased=debiased))
    with pytest.warns(UserWarning, match=r"rbf CKA: y has a (U-)?centred Gram of zero"):
        assert np.isnan(rbf_cka(y, dead, sigma=1.0, debiased=debiased))


def test_one_non_zero_sample_is_defined_for_the_biased_estimator(pair):
    """The doubly centred Gram of one non-zero sample is not zero: biased CKA exists (a rank-one Gram)."""
    x, y = dead_features("one sample", n=len(pair[1])), pair[1]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert linear_cka(x, y) == pytest.approx(feature_space_cka(x, y), abs=1e-12)


def test_an_almost_dead_layer_is_not_called_dead(pair):
    """A layer dominated by one sample (1e4 ×) still has a defined debiased CKA, equal to the reference."""
    x, y = pair
    spiky = x.copy()
    spiky[3] *= 1e4
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert linear_cka(spiky, y, debiased=True) == pytest.approx(debiased_cka(spiky, y), abs=1e-9)
        values = accumulate([torch.from_numpy(spiky)], [torch.from_numpy(y)])
    assert values[0, 0] == pytest.approx(debiased_cka(spiky, y), abs=1e-9)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_a_constant_float_layer_with_an_offset_is_dead_in_the_accumulator(dtype, pair):
    """Centring 3.7e3 in float32 leaves rounding, not variance: NaN and a warning, not a plausible number."""
    y = torch.from_numpy(pair[1])
    for debiased in (True, False):
        with pytest.warns(UserWarning, match=r"teacher layer '#0' \(over 60 samples\) has a (U-)?centred Gram"):
            values = accumulate([torch.full((60, 7), 3.7e3, dtype=dtype)], [y], debiased=debiased)
        assert np.isnan(values).all()


class DeadHead(nn.Module):
    """A live linear layer, then a ReLU whose input is always negative: the second layer is dead."""

    def __init__(self):
        super().__init__()
        self.live = nn.Linear(6, 5)
        self.gate = nn.Linear(5, 3)
        nn.init.zeros_(self.gate.weight)
        nn.init.constant_(self.gate.bias, -1.0)
        self.dead = nn.ReLU()

    def forward(self, x):
        return self.dead(self.gate(self.live(x)))


@pytest.mark.parametrize("kernel", ["linear", "rbf"])
def test_cka_matrix_gives_nan_for_a_dead_layer_and_warns_once_naming_it(kernel):
    torch.manual_seed(0)
    teacher, student = DeadHead(), nn.Sequential(nn.Linear(6, 4), nn.Tanh())
    x = torch.randn(64, 6)
    with pytest.warns(UserWarning) as caught:
        result = cka_matrix(teacher, student, x, ["live", "dead"], ["0", "1"], kernel=kernel, sigma=1.0,
                            batch_size=32, device="cpu", progress=False)
    messages = [str(w.message) for w in caught if "Gram of zero" in str(w.message)]
    assert len(messages) == 1 and "teacher layer 'dead' (over 64 samples)" in messages[0]
    assert np.isnan(result.values[1]).all() and np.isfinite(result.values[0]).all()
    assert result.best_matches()["teacher_layer"].tolist() == ["live", "live"]


def test_cka_loss_of_a_dead_side_is_nan_with_a_warning():
    student = torch.randn(16, 4, requires_grad=True)
    with pytest.warns(UserWarning, match=r"CKALoss on a batch of 16: the teacher layer given to this term has a "
                                         r"U-centred Gram of zero.*A NaN loss stops training"):
        assert CKALoss()(student, torch.full((16, 3), 2.0)).isnan()
    one = torch.zeros(16, 3)
    one[5] = 7.0
    with pytest.warns(UserWarning, match=r"the student layer given to this term"):
        assert CKALoss()(one, student.detach()).isnan()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        tiny = CKALoss()(student * 1e-23, student.detach() ** 2)  # float32 tiny but alive: defined
    assert tiny.item() == pytest.approx(CKALoss()(student.double(), student.detach().double() ** 2).item(), abs=1e-5)


# ------------------------------------------------------------------------------------------ consumers
def test_best_matches_and_summary_name_dead_layers():
    values = np.array([[0.9, np.nan, 0.1], [np.nan, np.nan, np.nan], [0.2, np.nan, 0.7]])
    result = CKAResult(values, ["t1", "t2", "t3"], ["s1", "s2", "s3"], n_samples=32)
    best = result.best_matches()
    assert best["teacher_layer"].tolist() == ["t1", None, "t3"]  # s2 was paired with t1 before
    assert np.isnan(best["cka"][1])
    assert result.dead_layers() == (["t2"], ["s2"])
    predictions = PredictionResult(np.array([[3, 1], [0, 4]]), agreement=0.875, kl=0.1, temperature=1.0, n_samples=8)
    text = gap_summary(result, predictions)
    assert "Dead layers" in text and "teacher `t2`" in text and "student `s2`" in text
    assert "`s2` →" not in text and "keep the layer order" in text


def test_an_all_nan_matrix_does_not_crash_the_consumers():
    result = CKAResult(np.full((2, 3), np.nan), ["t1", "t2"], ["s1", "s2", "s3"], n_samples=32)
    best = result.best_matches()
    assert best["teacher_layer"].tolist() == [None, None, None] and best["cka"].isna().all()
    predictions = PredictionResult(np.array([[3, 1], [0, 4]]), agreement=0.875, kl=0.1, temperature=1.0, n_samples=8)
    text = gap_summary(result, predictions)
    assert "No layer could be compared" in text and "87.5%" in text


# ------------------------------------------------------------------------------------------ settings
BAD_NUMBERS = [0, 0.0, -1.0, float("nan"), float("inf"), -float("inf"), True, "0.5"]


@pytest.mark.parametrize("bad", BAD_NUMBERS)
def test_rbf_threshold_and_sigma_must_be_finite_and_positive(pair, bad, conv_pair, images, hook_count):
    """threshold 0 / NaN / Inf gave NaN, a negative one a plausible value; sigma=inf gave NaN."""
    x, y = pair
    with pytest.raises(ValueError, match=r"threshold must be a finite positive number"):
        rbf_cka(x, y, threshold=bad)
    with pytest.raises(ValueError, match=r"sigma must be a finite positive number or None"):
        rbf_cka(x, y, sigma=bad)
    with pytest.raises(ValueError, match=r"threshold must be a finite positive number"):
        CKAAccumulator(1, 1, kernel="rbf", threshold=bad)
    teacher, student = conv_pair
    calls = []
    teacher.register_forward_pre_hook(lambda *args: calls.append(1))
    with pytest.raises(ValueError, match=r"sigma must be a finite positive number"):
        cka_matrix(teacher, student, images[:16], kernel="rbf", sigma=bad, device="cpu", progress=False)
    assert calls == [] and hook_count(student) == 0


def test_merge_refuses_other_layers_or_kernel_settings():
    x = torch.randn(8, 3)
    base = dict(kernel="rbf", debiased=True, threshold=0.5, sigma=None)
    others = {
        "teacher_layers": (["a2"], ["b"], base),
        "student_layers": (["a"], ["c"], base),
        "kernel": (["a"], ["b"], {**base, "kernel": "linear"}),
        "debiased": (["a"], ["b"], {**base, "debiased": False}),
        "threshold": (["a"], ["b"], {**base, "threshold": 0.8}),
        "sigma": (["a"], ["b"], {**base, "sigma": 2.0}),
    }
    for field, (teacher, student, settings) in others.items():
        mine = CKAAccumulator(["a"], ["b"], **base)
        mine.update([x], [x])
        other = CKAAccumulator(teacher, student, **settings)
        other.update([x], [x])
        with pytest.raises(ValueError, match=rf"same layers and kernel settings: {field}: "):
            mine.merge(other)
    linear = CKAAccumulator(["a"], ["b"], threshold=0.5)
    linear.merge(CKAAccumulator(["a"], ["b"], threshold=0.9))  # the RBF bandwidth does not matter for linear


def test_merged_accumulators_keep_the_dead_layer_verdict():
    live, dead = torch.randn(8, 3), torch.zeros(8, 3)
    halves = []
    for _ in range(2):
        accumulator = CKAAccumulator(["t"], ["live", "dead"])
        accumulator.update([live], [live, dead])
        halves.append(accumulator)
    merged = halves[0].merge(halves[1])
    with pytest.warns(UserWarning, match=r"student layer 'dead' \(over 16 samples\)"):
        values = merged.values()
    assert values[0, 0] == pytest.approx(1.0) and np.isnan(values[0, 1])
