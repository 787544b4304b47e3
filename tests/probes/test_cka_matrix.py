"""cka_matrix: the streaming minibatch estimator against references written here, and its bad-input errors."""
from __future__ import annotations

import numpy as np
import pytest
from scipy.spatial.distance import cdist
import torch
from torch import nn

import workbench as wb
from workbench.similarity import CKAAccumulator, CKAResult, cka_matrix, linear_cka

LAYERS = ["blocks.0", "blocks.1", "blocks.2", "pool", "head"]


def song_unbiased_hsic(k: np.ndarray, l: np.ndarray) -> float:
    """Song et al. (2012), eq. 5, written out — an independent form of the U-centred inner product."""
    n = k.shape[0]
    k, l = k.copy(), l.copy()
    np.fill_diagonal(k, 0)
    np.fill_diagonal(l, 0)
    ones = np.ones(n)
    trace = np.trace(k @ l)
    middle = (ones @ k @ ones) * (ones @ l @ ones) / ((n - 1) * (n - 2))
    last = 2 / (n - 2) * (ones @ k @ l @ ones)
    return (trace + middle - last) / (n * (n - 3))


def biased_hsic(k: np.ndarray, l: np.ndarray) -> float:
    n = k.shape[0]
    h = np.eye(n) - 1 / n
    return np.trace(k @ h @ l @ h) / (n - 1) ** 2


def features_of(model: nn.Module, x: torch.Tensor, layers: list[str]) -> list[np.ndarray]:
    """Each layer's flattened features from a plain forward, as float64 numpy."""
    outputs = {}
    modules = dict(model.named_modules())
    handles = [modules[name].register_forward_hook(lambda m, i, o, name=name: outputs.__setitem__(name, o))
               for name in layers]
    with torch.no_grad():
        model(x)
    for handle in handles:
        handle.remove()
    return [outputs[name].reshape(len(x), -1).double().numpy() for name in layers]


def minibatch_reference(teacher, student, x, batch_size, hsic=song_unbiased_hsic, kernel=None):
    """Σ_b HSIC(K_b, L_b) / sqrt(Σ_b HSIC(K_b, K_b) Σ_b HSIC(L_b, L_b)), batch by batch, in float64."""
    kernel = kernel or (lambda f: f @ f.T)
    sums = None
    for start in range(0, len(x), batch_size):
        batch = x[start : start + batch_size]
        grams_t = [kernel(f) for f in features_of(teacher, batch, LAYERS)]
        grams_s = [kernel(f) for f in features_of(student, batch, LAYERS)]
        cross = np.array([[hsic(k, l) for l in grams_s] for k in grams_t])
        self_t = np.array([hsic(k, k) for k in grams_t])
        self_s = np.array([hsic(l, l) for l in grams_s])
        update = (cross, self_t, self_s)
        sums = update if sums is None else tuple(a + b for a, b in zip(sums, update))
    cross, self_t, self_s = sums
    return cross / np.sqrt(np.outer(self_t, self_s))


def test_equals_the_minibatch_formula_batch_by_batch_with_a_ragged_last_batch(conv_pair, images):
    teacher, student = (model.double() for model in conv_pair)
    x = images.double()  # 300 samples in batches of 128: 128, 128, 44
    result = cka_matrix(teacher, student, x, LAYERS, LAYERS, batch_size=128, device="cpu", progress=False)
    expected = minibatch_reference(teacher, student, x, 128)
    np.testing.assert_allclose(result.values, expected, rtol=0, atol=1e-10)
    assert result.n_samples == 300


def test_float32_models_match_the_float64_formula_of_their_features(conv_pair, images):
    teacher, student = conv_pair
    result = cka_matrix(teacher, student, images, LAYERS, LAYERS, batch_size=100, device="cpu", progress=False)
    np.testing.assert_allclose(result.values, minibatch_reference(teacher, student, images, 100), atol=1e-6)


def test_biased_and_rbf_variants_match_their_references(conv_pair, images):
    teacher, student = (model.double() for model in conv_pair)
    x = images[:200].double()
    biased = cka_matrix(teacher, student, x, LAYERS, LAYERS, debiased=False, batch_size=100, device="cpu",
                        progress=False)
    np.testing.assert_allclose(biased.values, minibatch_reference(teacher, student, x, 100, biased_hsic), atol=1e-10)

    def rbf(features, threshold=0.8):
        """Kornblith's RBF with σ² = threshold² × median squared distance, taken per batch."""
        sq = cdist(features, features, "sqeuclidean")
        return np.exp(-sq / (2 * threshold**2 * np.median(sq)))

    result = cka_matrix(teacher, student, x, LAYERS, LAYERS, kernel="rbf", threshold=0.8, batch_size=100,
                        device="cpu", progress=False)
    np.testing.assert_allclose(result.values, minibatch_reference(teacher, student, x, 100, kernel=rbf), atol=1e-10)


def test_close_to_the_full_data_estimate(conv_pair):
    """The minibatch estimator and the full-data unbiased CKA estimate the same quantity."""
    teacher, student = (model.double() for model in conv_pair)
    x = torch.randn(1024, 3, 8, 8, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    result = cka_matrix(teacher, student, x, LAYERS, LAYERS, batch_size=256, device="cpu", progress=False)
    features_t, features_s = features_of(teacher, x, LAYERS), features_of(student, x, LAYERS)
    full = np.array([[linear_cka(a, b, debiased=True) for b in features_s] for a in features_t])
    # both are consistent estimators; with batches of 256 they differ by a few hundredths at most
    assert np.abs(result.values - full).max() < 0.03
    # ... but it is its own estimator, not the full-data number
    assert not np.allclose(result.values, full, atol=1e-6)


def test_accumulators_merge_to_the_single_pass_result(conv_pair, images):
    teacher, student = conv_pair
    halves = []
    for part in (images[:128], images[128:256]):
        accumulator = CKAAccumulator(len(LAYERS), len(LAYERS))
        accumulator.update(features_of_tensors(teacher, part), features_of_tensors(student, part))
        halves.append(accumulator)
    merged = halves[0].merge(halves[1])
    single = cka_matrix(teacher, student, images[:256], LAYERS, LAYERS, batch_size=128, device="cpu",
                        progress=False)
    np.testing.assert_allclose(merged.values(), single.values, atol=1e-12)
    assert merged.n_samples == 256


def features_of_tensors(model, x):
    return [torch.from_numpy(f).float() for f in features_of(model, x, LAYERS)]


def test_self_comparison_has_a_unit_diagonal(conv_pair, images):
    teacher, _ = conv_pair
    result = cka_matrix(teacher, teacher, images, "stages", "stages", batch_size=100, device="cpu", progress=False)
    np.testing.assert_allclose(np.diag(result.values), 1.0, atol=1e-6)
    assert result.teacher_layers == ["blocks.0", "blocks.1", "blocks.2"]  # the longest container's children


def test_models_keep_their_mode_and_running_statistics(conv_pair, images):
    teacher, student = conv_pair
    student.train()
    running_mean = student.blocks[0][1].running_mean.clone()
    cka_matrix(teacher, student, images[:64], device="cpu", batch_size=32, progress=False)
    assert student.training and student.blocks[0][1].training and not teacher.training
    assert torch.equal(student.blocks[0][1].running_mean, running_mean)


def test_n_samples_and_labelled_data(conv_pair, images):
    teacher, student = conv_pair
    labels = torch.zeros(len(images), dtype=torch.long)
    dataset = torch.utils.data.TensorDataset(images, labels)
    truncated = cka_matrix(teacher, student, dataset, n_samples=150, batch_size=64, device="cpu", progress=False)
    direct = cka_matrix(teacher, student, images[:150], batch_size=64, device="cpu", progress=False)
    assert truncated.n_samples == 150
    np.testing.assert_allclose(truncated.values, direct.values, atol=1e-12)


def test_result_round_trips_and_renders(conv_pair, images, tmp_path):
    teacher, student = conv_pair
    result = cka_matrix(teacher, student, images[:100], LAYERS, LAYERS, batch_size=50, device="cpu", progress=False)
    loaded = CKAResult.load(result.save(tmp_path / "cka.json"))
    np.testing.assert_array_equal(loaded.values, result.values)
    assert loaded.teacher_layers == LAYERS and loaded.n_samples == 100
    frame = result.to_frame()
    assert frame.loc["blocks.1", "pool"] == result.values[1, 3]
    best = result.best_matches()
    assert list(best["teacher_layer"]) == [LAYERS[i] for i in result.values.argmax(0)]
    assert result.plot().get_title() == result.title
    figure = result.figure()
    np.testing.assert_array_equal(figure.data[0].z, result.values)
    assert "teacher layer" in figure.data[0].hovertemplate
    other = tmp_path / "other.json"
    other.write_text('{"type": "PredictionResult"}')
    with pytest.raises(ValueError, match="does not hold a CKAResult"):
        CKAResult.load(other)


class NaNAtSecondBlock(nn.Module):
    def __init__(self):
        super().__init__()
        self.first, self.second = nn.Linear(4, 4), nn.Linear(4, 4)

    def forward(self, x):
        return self.second(self.first(x) * torch.where(x[:, :1] > 100, torch.inf, 1.0))


def test_bad_input_errors_leave_no_hooks(conv_pair, images, hook_count):
    teacher, student = conv_pair
    cases = [
        (dict(teacher_layers=["blocks.9"]), KeyError, r"no layer matching 'blocks.9'.*closest names"),
        (dict(student_data=images[:299]), ValueError, r"teacher's has 300, the student's has 299"),
        (dict(batch_size=149), ValueError, r"last batch of 2; this probe needs at least 4"),
        (dict(kernel="cosine"), ValueError, r"kernel must be one of \('linear', 'rbf'\)"),
    ]
    for kwargs, error, message in cases:
        with pytest.raises(error, match=message):
            cka_matrix(teacher, student, images, device="cpu", progress=False, **kwargs)
        assert hook_count(teacher) == 0 and hook_count(student) == 0
    nan_model = NaNAtSecondBlock()
    x = torch.randn(40, 4)
    x[30, 0] = 1000.0
    with pytest.raises(FloatingPointError, match=r"student layer 'second' produced NaN or Inf .* sample 20"):
        cka_matrix(nn.Sequential(nn.Linear(4, 3)), nan_model, x, "*", ["first", "second"], batch_size=20, device="cpu",
                   progress=False)
    assert hook_count(nan_model) == 0


def test_small_batches_are_rejected_before_any_forward(conv_pair, images):
    teacher, student = conv_pair
    calls = []
    teacher.register_forward_pre_hook(lambda *args: calls.append(1))
    with pytest.raises(ValueError, match="needs at least 4"):
        cka_matrix(teacher, student, images[:3], device="cpu", progress=False)
    assert calls == []


def test_capture_sees_every_layer_that_ran(conv_pair, images):
    teacher, student = conv_pair
    with wb.capture(teacher, LAYERS) as acts:
        teacher(images[:2])
    assert list(acts) == LAYERS


def test_features_too_large_for_a_float32_gram_fall_back_to_float64():
    x = torch.randn(32, 50, generator=torch.Generator().manual_seed(2))
    accumulator = CKAAccumulator(["huge"], ["plain"])
    accumulator.update([x * 1e20], [x.double()])  # (1e20)² overflows float32, the features themselves do not
    assert accumulator.values()[0, 0] == pytest.approx(1.0, abs=1e-6)
    with pytest.raises(FloatingPointError, match=r"teacher layer 'huge' produced NaN or Inf .* sample 32"):
        accumulator.update([x * torch.inf], [x])
