"""How many samples a CKA estimate needs before two unrelated layers read as unrelated.

Measured with ``workbench.similarity.linear_cka`` / ``rbf_cka`` on independent standard-normal
features ``x [n, dx]``, ``y [n, dy]``, every pair of widths dx, dy in {8, 64, 512} (the range of the
built-in models' stage widths), 20 draws per point, numpy seed 0:

* **debiased** (U-centred HSIC): the mean stays near 0 at every n, but the spread is large at small n.
  Largest standard deviation over the width pairs, linear / RBF (threshold 0.5):
  n = 5: 0.51 / 0.49; 10: 0.18 / 0.18; 20: 0.087 / 0.103; 30: 0.057 / 0.058; 50: 0.040 / 0.033;
  100: 0.020 / 0.018; 500: 0.003 / 0.003. With n ≥ 50 unrelated layers fall within ±0.1 (two
  standard deviations) for both kernels: :data:`DEBIASED_MINIMUM` = 50.
* **biased** (centred HSIC, the textbook estimator): unrelated layers read close to 1 at small n
  (0.99 at n = 5 for dx = dy = 512) and the upward bias shrinks only with n / width. For linear CKA
  the mean follows ``d / (n + d)`` for equal widths d to three digits (d = 512: 0.837 at n = 100,
  0.506 at n = 500, 0.093 at n = 5,000), so it stays below 0.1 only for n ≥ 9 d. RBF CKA (median
  heuristic, threshold 0.5) behaves like linear CKA of about 10× the width (d = 512: 0.981 at n = 100,
  0.838 at n = 1,000, 0.508 at n = 5,000; d = 8: 0.094 at n = 500): n ≥ 90 d.

The streamed matrix (``cka_matrix``) sums each batch's HSIC terms, so the biased estimator's bias is
that of **one batch**: unrelated width-64 layers read 0.50 in batches of 64 and 0.20 in batches of 256
whatever the total n (``d / (b + d)`` with b the batch size). Give ``batch_size`` and the biased check
uses ``min(n_samples, batch_size)``; the debiased estimator's per-batch terms are unbiased, so its spread
follows the total n.

``tests/probes/test_sample_size.py`` re-measures a point of each claim.
"""
from __future__ import annotations

import math

__all__ = ["DEBIASED_MINIMUM", "BIAS_LIMIT", "minimum_samples", "sample_size_warning"]

KERNELS = ("linear", "rbf")
DEBIASED_MINIMUM = 50
"""Samples the debiased estimator needs: unrelated layers within ±0.1 (2σ), linear and RBF, widths 8–512."""
BIAS_LIMIT = 0.1
"""The largest CKA two unrelated layers may show before an estimate counts as unreliable."""
DEFAULT_WIDTH = 512
"""The widest layer measured: the default assumption when the features' width is not given."""
RBF_WIDTH_FACTOR = 10
"""Biased RBF CKA of width-d features is about biased linear CKA of width ``10 d`` (measured, d = 8–512)."""


def _checked(kernel: str, width: int) -> None:
    if kernel not in KERNELS:
        raise ValueError(f"kernel must be one of {KERNELS}, got {kernel!r}")
    if isinstance(width, bool) or not isinstance(width, int) or width < 1:
        raise ValueError(f"width must be a positive int (features per sample of the wider layer), got {width!r}")


def minimum_samples(kernel: str = "linear", debiased: bool = True, width: int = DEFAULT_WIDTH) -> int:
    """The fewest samples for which CKA of two unrelated layers stays within :data:`BIAS_LIMIT` (0.1).

    ``debiased=True``: :data:`DEBIASED_MINIMUM` (50) for both kernels (the spread of the estimate,
    measured at widths 8–512; see the module docstring). ``debiased=False``: the biased estimator's
    upward bias ``d / (n + d)`` must fall below 0.1, so n ≥ 9 d for ``"linear"`` and n ≥ 90 d for
    ``"rbf"``, with ``width`` = d the features per sample of the wider layer (default 512, the widest
    measured).

    Example:
        >>> from workbench.probes.sample_size import minimum_samples
        >>> minimum_samples(), minimum_samples("rbf")
        (50, 50)
        >>> minimum_samples("linear", debiased=False, width=64)
        576
    """
    _checked(kernel, width)
    if debiased:
        return DEBIASED_MINIMUM
    effective_width = width * (RBF_WIDTH_FACTOR if kernel == "rbf" else 1)
    # d / (n + d) <= limit  <=>  n >= d (1 - limit) / limit
    return math.ceil(effective_width * (1 - BIAS_LIMIT) / BIAS_LIMIT - 1e-9)


def sample_size_warning(
    n_samples: int, kernel: str = "linear", debiased: bool = True, width: int = DEFAULT_WIDTH,
    batch_size: int | None = None,
) -> str | None:
    """None when ``n_samples`` is enough for the estimator (:func:`minimum_samples`); else one sentence
    saying why a CKA on that few samples is unreliable and what to use instead.

    ``batch_size``: the batches a streamed ``cka_matrix`` used; the biased estimator's bias is that of
    one batch, so it is judged on ``min(n_samples, batch_size)`` samples.

    Example:
        >>> from workbench.probes.sample_size import sample_size_warning
        >>> sample_size_warning(450) is None
        True
        >>> print(sample_size_warning(5))
        CKA on 5 samples is unreliable: with the debiased estimator two unrelated layers can read anywhere within about ±1.0 at this n; use at least 50 samples.
        >>> print(sample_size_warning(4_608, debiased=False, width=64, batch_size=64))
        CKA in batches of 64 is unreliable: the biased linear estimator gives two unrelated layers of width 64 about 0.50 per batch; use the debiased estimator (debiased=True, 50 samples or more) or batches of at least 576 samples.
    """
    if isinstance(n_samples, bool) or not isinstance(n_samples, int) or n_samples < 1:
        raise ValueError(f"n_samples must be a positive int, got {n_samples!r}")
    if batch_size is not None and (isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1):
        raise ValueError(f"batch_size must be a positive int or None, got {batch_size!r}")
    needed = minimum_samples(kernel, debiased, width)
    batched = not debiased and batch_size is not None and batch_size < n_samples
    if (min(n_samples, batch_size) if batched else n_samples) >= needed:
        return None
    if debiased:
        # the spread shrinks like 1/n: 2σ ≈ 0.1 at n = 50 (measured), so ≈ 5 / n
        spread = min(1.0, BIAS_LIMIT * DEBIASED_MINIMUM / n_samples)
        return (f"CKA on {n_samples:,} samples is unreliable: with the debiased estimator two unrelated layers "
                f"can read anywhere within about ±{spread:.1f} at this n; use at least {needed:,} samples.")
    effective_width = width * (RBF_WIDTH_FACTOR if kernel == "rbf" else 1)
    if batched:
        bias = effective_width / (batch_size + effective_width)
        return (f"CKA in batches of {batch_size:,} is unreliable: the biased {kernel} estimator gives two unrelated "
                f"layers of width {width:,} about {bias:.2f} per batch; use the debiased estimator "
                f"(debiased=True, {DEBIASED_MINIMUM} samples or more) or batches of at least {needed:,} samples.")
    bias = effective_width / (n_samples + effective_width)
    return (f"CKA on {n_samples:,} samples is unreliable: the biased {kernel} estimator gives two unrelated "
            f"layers of width {width:,} about {bias:.2f} at this n; use the debiased estimator "
            f"(debiased=True, {DEBIASED_MINIMUM} samples or more) or at least {needed:,} samples.")
