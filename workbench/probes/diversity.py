"""How varied a set of samples is, and how far it lies from real data: mean pairwise pixel and cosine
distances, and the Fréchet distance of two feature sets (the FID formula) — what the DT probe's diversity
comparison (:mod:`workbench.probes.dt`) reports for base, distilled and hybrid samples."""
from __future__ import annotations

import warnings
from typing import Any

import numpy as np
import torch

from workbench.probes.result_io import check_array

__all__ = ["pairwise_distance", "pairwise_cosine_distance", "frechet_distance"]


def _rows(values: Any, name: str) -> np.ndarray:
    """``values`` as a float64 ``[n, features]`` array (each sample flattened), at least two finite rows."""
    array = check_array(values if isinstance(values, (np.ndarray, torch.Tensor)) else np.asarray(values, float),
                        name, ndim=np.ndim(values))
    if array.ndim < 2 or array.shape[0] < 2:
        raise ValueError(f"{name} must hold at least two samples along its first axis, got shape {list(array.shape)}")
    if not np.isfinite(array).all():
        raise ValueError(f"{name} holds NaN or Inf")
    return array.reshape(array.shape[0], -1)


def pairwise_distance(samples: Any) -> float:
    """Mean L2 distance between all pairs of samples (each flattened): (2 / n(n−1)) Σ_{i<j} ‖x_i − x_j‖₂.

    Example:
        >>> pairwise_distance(np.array([[0.0, 0.0], [3.0, 4.0], [0.0, 0.0]]))
        3.3333333333333335
    """
    from scipy.spatial.distance import pdist

    return float(pdist(_rows(samples, "samples"), "euclidean").mean())


def pairwise_cosine_distance(features: Any) -> float:
    """Mean cosine distance 1 − ⟨a, b⟩ / (‖a‖‖b‖) between all pairs of feature vectors.

    Example:
        >>> pairwise_cosine_distance(np.array([[1.0, 0.0], [0.0, 2.0]]))
        1.0
    """
    from scipy.spatial.distance import pdist

    rows = _rows(features, "features")
    if (np.linalg.norm(rows, axis=1) == 0).any():
        raise ValueError("features holds an all-zero vector: its cosine distance is undefined")
    return float(pdist(rows, "cosine").mean())


def frechet_distance(features_a: Any, features_b: Any) -> float:
    """The Fréchet distance between Gaussians fitted to two feature sets (the FID formula).

    ‖μ_a − μ_b‖² + Tr(Σ_a + Σ_b − 2 (Σ_a Σ_b)^½), covariances with n − 1. As in the standard
    implementation: a non-finite matrix square root is retried with 1e-6 added to both diagonals
    (with a warning); an imaginary part above 1e-3 on its diagonal is an error, a smaller one dropped.
    With no more samples than features a covariance is singular: the number is still returned, with a
    warning that it is biased.

    Example:
        >>> a = np.random.default_rng(0).normal(size=(500, 2))
        >>> round(frechet_distance(a, a + [3.0, 4.0]), 6)
        25.0
    """
    from scipy import linalg

    a, b = _rows(features_a, "features_a"), _rows(features_b, "features_b")
    if a.shape[1] != b.shape[1]:
        raise ValueError(f"features_a has {a.shape[1]} features, features_b {b.shape[1]}: they must match")
    for name, rows in (("features_a", a), ("features_b", b)):
        if rows.shape[0] <= rows.shape[1]:
            warnings.warn(f"{name} has {rows.shape[0]} samples for {rows.shape[1]} features: its covariance is "
                          "singular and the Fréchet distance biased; use more samples than features", stacklevel=2)
    mean_a, mean_b = a.mean(axis=0), b.mean(axis=0)
    cov_a, cov_b = np.atleast_2d(np.cov(a, rowvar=False)), np.atleast_2d(np.cov(b, rowvar=False))
    root = linalg.sqrtm(cov_a @ cov_b)
    if not np.isfinite(root).all():
        warnings.warn("the covariance product's square root is not finite: adding 1e-6 to the diagonals",
                      stacklevel=2)
        offset = np.eye(a.shape[1]) * 1e-6
        root = linalg.sqrtm((cov_a + offset) @ (cov_b + offset))
    if np.iscomplexobj(root):
        imaginary = np.abs(np.diagonal(root).imag).max()
        if imaginary > 1e-3:
            raise ValueError(f"the covariance product's square root has an imaginary part of {imaginary:.3g}")
        root = root.real
    difference = mean_a - mean_b
    return float(difference @ difference + np.trace(cov_a) + np.trace(cov_b) - 2 * np.trace(root))
