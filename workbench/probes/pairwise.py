"""Similarity of two representations of the same n samples: linear / RBF CKA and mutual kNN.

Inputs are numpy arrays or torch tensors ``[n, ...]`` of any float dtype; each sample is flattened.
The values are computed in float64 from the values given.
"""
from __future__ import annotations

import math
import warnings

import numpy as np
import torch

from workbench.capture import flatten_per_sample
from workbench.data.arrays import checked_tensor
from workbench.probes.kernels import (
    check_rbf_settings, cka_parts, dead_layer_message, normalised_gram, rbf_from_gram,
)

ArrayLike = np.ndarray | torch.Tensor


def as_float64_pair(x: ArrayLike, y: ArrayLike, min_samples: int = 2) -> tuple[torch.Tensor, torch.Tensor]:
    """Two ``[n, features]`` float64 tensors on x's device, after checking counts and finiteness.

    Complex, masked, non-numeric, empty and meta inputs are refused (see :mod:`workbench.data.arrays`).

    Example:
        >>> a, b = as_float64_pair(np.ones((3, 2, 2)), torch.zeros(3, 5))
        >>> a.shape, b.dtype
        (torch.Size([3, 4]), torch.float64)
    """
    pair = []
    for label, value in (("x", x), ("y", y)):
        value = flatten_per_sample(checked_tensor(value, label).detach()).to(torch.float64)
        if not torch.isfinite(value).all():
            raise ValueError(f"{label} contains NaN or Inf values")
        pair.append(value)
    x64, y64 = pair
    if x64.shape[0] != y64.shape[0]:
        raise ValueError(
            f"x and y must hold the same samples: x has {x64.shape[0]} samples, y has {y64.shape[0]}"
        )
    if x64.shape[0] < min_samples:
        raise ValueError(f"need at least {min_samples} samples, got {x64.shape[0]}")
    return x64, y64.to(x64.device)


def _cka(gram_x: torch.Tensor, gram_y: torch.Tensor, debiased: bool, kernel: str) -> float:
    """The CKA of two Grams as a float; NaN with a warning naming x and/or y when a side is dead."""
    value, x_dead, y_dead = cka_parts(gram_x, gram_y, debiased=debiased)
    for label, dead in (("x", x_dead), ("y", y_dead)):
        if dead:
            warnings.warn(f"{kernel} CKA: " + dead_layer_message(label, debiased), stacklevel=3)
    return value.item()


def linear_cka(x: ArrayLike, y: ArrayLike, debiased: bool = False) -> float:
    """Linear CKA (Kornblith et al. 2019): ``‖YᵀX‖²_F / (‖XᵀX‖_F ‖YᵀY‖_F)`` on centred features.

    ``debiased=True`` uses the unbiased HSIC (Song et al. 2012) in place of the biased one. Any finite
    magnitude works (1e-160 or 1e160: the features are scaled by a power of two first, which changes no
    digit). A dead side (centred Gram zero up to rounding) gives NaN with a warning naming x or y.

    Example:
        >>> rng = np.random.default_rng(0)
        >>> x = rng.normal(size=(50, 8))
        >>> round(linear_cka(x, 3 * x + 1), 10)
        1.0
    """
    x64, y64 = as_float64_pair(x, y, min_samples=4 if debiased else 2)
    return _cka(normalised_gram(x64)[0], normalised_gram(y64)[0], debiased, "linear")


def rbf_cka(
    x: ArrayLike, y: ArrayLike, threshold: float = 0.5, sigma: float | None = None, debiased: bool = False
) -> float:
    """RBF-kernel CKA; σ = ``threshold`` × sqrt(median squared distance) per representation, or ``sigma``.

    ``threshold`` and ``sigma`` must be finite positive numbers (0, NaN, ±Inf and negatives are refused).
    Any finite magnitude of the features works; a dead side gives NaN with a warning, as in :func:`linear_cka`.

    Example:
        >>> rng = np.random.default_rng(0)
        >>> x = rng.normal(size=(50, 8))
        >>> round(rbf_cka(x, x), 10)
        1.0
    """
    check_rbf_settings(threshold, sigma)
    x64, y64 = as_float64_pair(x, y, min_samples=4 if debiased else 2)
    grams = []
    for label, features in (("x", x64), ("y", y64)):
        gram, exponent = normalised_gram(features)  # X̃X̃ᵀ = gram · 4**exponent, so σ scales by 2**-exponent
        grams.append(rbf_from_gram(gram, threshold=threshold, sigma=_scaled_sigma(sigma, int(exponent), label)))
    return _cka(grams[0], grams[1], debiased, "rbf")


def _scaled_sigma(sigma: float | None, exponent: int, label: str) -> float | None:
    """``sigma · 2**-exponent``: σ in the units of the normalised Gram; refused where float64 cannot hold it."""
    if sigma is None:
        return None
    try:
        scaled = math.ldexp(float(sigma), -exponent)
    except OverflowError:
        scaled = 0.0
    if not 0 < scaled < math.inf:
        raise ValueError(
            f"sigma = {sigma!r} is out of all proportion to {label}'s scale (largest centred value about "
            f"2**{exponent}): the ratio does not fit in float64; choose a sigma near the pairwise distances"
        )
    return scaled


TIE_TOLERANCE = 1e-10  # cosine similarities closer than this count as tied (float64 rounding of a dot)


def _unit_rows(features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows scaled to unit length at any magnitude (1e-300 or 1e300), and the mask of all-zero rows.

    Dividing by the row's largest |value| first keeps the norm from under- or overflowing; a fixed
    epsilon (``F.normalize``) would leave rows below it shorter than 1, so they would never be chosen
    as anyone's neighbour.
    """
    largest = features.abs().amax(dim=1, keepdim=True)
    zero = largest[:, 0] == 0
    scaled = features / largest.masked_fill(largest == 0, 1.0)
    return scaled / scaled.norm(dim=1, keepdim=True).masked_fill(zero[:, None], 1.0), zero


def _neighbour_weights(unit: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``[n, n]`` probability that j is among i's k nearest neighbours, and which rows are fully tied.

    Neighbours strictly nearer than the k-th have probability 1; the samples tied with the k-th share
    the remaining places equally (every admissible neighbour set equally likely), so the score does not
    depend on the order of the samples. Each row's weights sum to k.
    """
    n = unit.shape[0]
    similarity = (unit @ unit.T).fill_diagonal_(-torch.inf)
    kth = similarity.topk(k, dim=1).values[:, -1:]
    above = similarity > kth + TIE_TOLERANCE
    tied = (similarity - kth).abs() <= TIE_TOLERANCE
    n_above, n_tied = above.sum(dim=1, keepdim=True), tied.sum(dim=1, keepdim=True)
    weights = above.double() + tied.double() * (k - n_above) / n_tied
    return weights, ((n_above == 0) & (n_tied == n - 1))[:, 0]


def mutual_knn(x: ArrayLike, y: ArrayLike, k: int = 10) -> float:
    """Mutual k-nearest-neighbour alignment (Huh et al. 2024, "The Platonic Representation Hypothesis").

    Rows are L2-normalised (at any scale); each sample's k cosine neighbours (itself excluded) are found
    in both representations, and the mean over samples of ``|N_x(i) ∩ N_y(i)| / k`` is returned
    (1 = same neighbourhoods, about ``k / (n - 1)`` for unrelated ones).

    Ties: when samples are tied with the k-th neighbour (duplicates, discrete features; similarities
    within ``TIE_TOLERANCE``), every admissible neighbour set counts as equally likely, independently in
    x and y, and the expected overlap is returned — the score does not depend on the order of the samples.

    Undefined cases give NaN with a warning naming x or y: an all-zero sample has no direction, and a
    representation that points every sample the same way (a constant layer) ranks no neighbour nearer.

    Example:
        >>> rng = np.random.default_rng(0)
        >>> x = rng.normal(size=(40, 6))
        >>> mutual_knn(x, 5 * x, k=5)
        1.0
    """
    x64, y64 = as_float64_pair(x, y)
    n = x64.shape[0]
    if not 1 <= k < n:
        raise ValueError(f"k must be between 1 and n - 1 = {n - 1}, got {k}")
    weights = []
    for label, features in (("x", x64), ("y", y64)):
        unit, zero = _unit_rows(features)
        if zero.any():
            rows = zero.nonzero()[:, 0].tolist()
            shown = f"{rows[:10]}{' ...' if len(rows) > 10 else ''}"
            warnings.warn(
                f"mutual kNN is undefined (NaN): {label} has {len(rows)} all-zero samples (rows {shown}), "
                "which have no direction and so no cosine neighbours", stacklevel=2,
            )
            return float("nan")
        row_weights, fully_tied = _neighbour_weights(unit, k)
        if fully_tied.all():
            warnings.warn(
                f"mutual kNN is undefined (NaN): {label} points every sample the same way (a constant layer), "
                "so no neighbour is nearer than another", stacklevel=2,
            )
            return float("nan")
        weights.append(row_weights)
    return ((weights[0] * weights[1]).sum(dim=1) / k).mean().item()
