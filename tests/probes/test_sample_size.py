"""The CKA sample-size minimums re-measured at a point of each claim in workbench.probes.sample_size."""
from __future__ import annotations

import numpy as np
import pytest

from workbench.probes.sample_size import minimum_samples, sample_size_warning
from workbench.similarity import linear_cka, rbf_cka


def _unrelated(cka, n: int, width: int, debiased: bool, draws: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return np.array([cka(rng.normal(size=(n, width)), rng.normal(size=(n, width)), debiased=debiased)
                     for _ in range(draws)])


@pytest.mark.parametrize("cka, kernel", [(linear_cka, "linear"), (rbf_cka, "rbf")])
def test_debiased_minimum_keeps_unrelated_layers_within_a_tenth(cka, kernel):
    n = minimum_samples(kernel, debiased=True)
    at_minimum = _unrelated(cka, n, 64, True, draws=20)
    assert 2 * at_minimum.std() < 0.1 and abs(at_minimum.mean()) < 0.05
    # and the minimum is not set needlessly high: a fifth of it is clearly too few
    too_few = _unrelated(cka, n // 5, 64, True, draws=20)
    assert 2 * too_few.std() > 0.2


def test_biased_linear_bias_is_d_over_n_plus_d():
    width = 32
    n = minimum_samples("linear", debiased=False, width=width)
    assert n == 9 * width
    at_minimum = _unrelated(linear_cka, n, width, False, draws=3)
    assert at_minimum.mean() == pytest.approx(width / (n + width), abs=0.01)
    assert at_minimum.max() < 0.11
    assert _unrelated(linear_cka, 5, width, False, draws=3).min() > 0.85  # ≈ 1 at n = 5 (0.89 at d = 32)


def test_biased_rbf_needs_about_ten_times_the_linear_width():
    width = 8
    n = minimum_samples("rbf", debiased=False, width=width)
    assert _unrelated(rbf_cka, n, width, False, draws=3).mean() < 0.1
    # at the linear minimum the RBF estimate is still far above the limit
    assert _unrelated(rbf_cka, minimum_samples("linear", False, width), width, False, draws=3).mean() > 0.3


def test_warning_names_the_numbers_and_what_to_use():
    assert sample_size_warning(450) is None
    assert sample_size_warning(50, "rbf") is None
    message = sample_size_warning(5)
    assert "5 samples" in message and "at least 50" in message
    biased = sample_size_warning(450, "linear", debiased=False, width=512)
    assert "debiased=True" in biased and "4,608" in biased and f"{512 / (450 + 512):.2f}" in biased


@pytest.mark.parametrize("call, match", [
    (lambda: minimum_samples("cosine"), "kernel must be one of"),
    (lambda: minimum_samples(width=0), "width must be a positive int"),
    (lambda: sample_size_warning(0), "n_samples must be a positive int"),
    (lambda: sample_size_warning(5.0), "n_samples must be a positive int"),
])
def test_bad_input_is_refused(call, match):
    with pytest.raises(ValueError, match=match):
        call()


def test_biased_streamed_matrix_is_judged_on_its_batch_size():
    """The streamed matrix sums per-batch biased HSIC terms: unrelated layers read d / (b + d) for batches of
    b, however many samples in all, so a biased run on many samples in small batches is flagged."""
    import torch

    from workbench.similarity import cka_matrix

    torch.manual_seed(0)
    width, n_samples, batch = 64, 2048, 64
    x = torch.randn(n_samples, 8)
    # a model that ignores its input and returns fresh noise: the two layers are independent
    class Noise(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.out = torch.nn.Identity()

        def forward(self, inputs):
            return self.out(torch.randn(len(inputs), width))

    value = cka_matrix(Noise(), Noise(), x, ["out"], ["out"], debiased=False, batch_size=batch, device="cpu",
                       progress=False).values[0, 0]
    assert abs(value - width / (batch + width)) < 0.03  # 0.50, not the 0.03 of one batch of 2,048
    assert sample_size_warning(n_samples, "linear", False, width) is None  # judged on the total: missed
    warning = sample_size_warning(n_samples, "linear", False, width, batch_size=batch)
    assert warning is not None and "batches of 64" in warning and "0.50" in warning
    assert sample_size_warning(n_samples, "linear", True, width, batch_size=batch) is None  # debiased: total n
