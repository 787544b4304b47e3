"""Similarity of two representations of the same n samples: linear / RBF CKA and mutual kNN.

Inputs are numpy arrays or torch tensors ``[n, ...]`` of any float dtype; each sample is flattened.
The values are computed in float64 from the values given.
"""
from __future__ import annotations

import warnings

import numpy as np
import torch
import torch.nn.functional as F

from workbench.capture import flatten_per_sample
from workbench.data.arrays import checked_tensor
from workbench.probes.kernels import centred_gram, cka_from_grams, rbf_from_gram

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


def _cka(gram_x: torch.Tensor, gram_y: torch.Tensor, debiased: bool) -> float:
    value = cka_from_grams(gram_x, gram_y, debiased=debiased).item()
    if not np.isfinite(value):
        warnings.warn("CKA is undefined (NaN) because one representation has no variance", stacklevel=3)
    return value


def linear_cka(x: ArrayLike, y: ArrayLike, debiased: bool = False) -> float:
    """Linear CKA (Kornblith et al. 2019): ``‖YᵀX‖²_F / (‖XᵀX‖_F ‖YᵀY‖_F)`` on centred features.

    ``debiased=True`` uses the unbiased HSIC (Song et al. 2012) in place of the biased one.

    Example:
        >>> rng = np.random.default_rng(0)
        >>> x = rng.normal(size=(50, 8))
        >>> round(linear_cka(x, 3 * x + 1), 10)
        1.0
    """
    x64, y64 = as_float64_pair(x, y, min_samples=4 if debiased else 2)
    return _cka(centred_gram(x64), centred_gram(y64), debiased)


def rbf_cka(
    x: ArrayLike, y: ArrayLike, threshold: float = 0.5, sigma: float | None = None, debiased: bool = False
) -> float:
    """RBF-kernel CKA; σ = ``threshold`` × sqrt(median squared distance) per representation, or ``sigma``.

    Example:
        >>> rng = np.random.default_rng(0)
        >>> x = rng.normal(size=(50, 8))
        >>> round(rbf_cka(x, x), 10)
        1.0
    """
    x64, y64 = as_float64_pair(x, y, min_samples=4 if debiased else 2)
    gram_x = rbf_from_gram(centred_gram(x64), threshold=threshold, sigma=sigma)
    gram_y = rbf_from_gram(centred_gram(y64), threshold=threshold, sigma=sigma)
    return _cka(gram_x, gram_y, debiased)


def mutual_knn(x: ArrayLike, y: ArrayLike, k: int = 10) -> float:
    """Mutual k-nearest-neighbour alignment (Huh et al. 2024, "The Platonic Representation Hypothesis").

    Rows are L2-normalised; each sample's k cosine neighbours (itself excluded) are found in both
    representations, and the mean fraction of shared neighbours is returned (1 = same neighbourhoods).

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
    masks = []
    for features in (x64, y64):
        unit = F.normalize(features, dim=1)
        similarity = (unit @ unit.T).fill_diagonal_(-torch.inf)
        neighbours = similarity.topk(k, dim=1).indices
        masks.append(torch.zeros(n, n, dtype=torch.bool, device=unit.device).scatter_(1, neighbours, True))
    return ((masks[0] & masks[1]).sum(dim=1).double() / k).mean().item()
