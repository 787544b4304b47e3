"""Gram matrices, their (U-)centring and HSIC terms: the shared math of every CKA in the workbench.

Everything is plain differentiable torch, so the probes (float64 accumulators) and the CKA loss
(float32 autograd) use the same code. Conventions follow Kornblith et al. (2019), "Similarity of
Neural Network Representations Revisited" (https://arxiv.org/abs/1905.00414), and the unbiased HSIC
of Song et al. (2012) in the U-centring form used by Nguyen, Raghu & Kornblith (2021).
"""
from __future__ import annotations

import numpy as np
import torch

KERNELS = ("linear", "rbf")


def centred_gram(features: torch.Tensor) -> torch.Tensor:
    """Linear Gram ``X Xᵀ`` of ``[n, d]`` features after centring each feature column.

    Centring first is what keeps float32 exact: a large common offset (deep ReLU layers) would
    otherwise swamp the Gram entries. Half precision is computed in float32.

    Example:
        >>> import torch
        >>> x = torch.tensor([[1.0, 0.0], [3.0, 2.0]])
        >>> centred_gram(x)
        tensor([[ 2., -2.],
                [-2.,  2.]])
    """
    if features.dtype in (torch.float16, torch.bfloat16) or not features.is_floating_point():
        features = features.float()
    centred = features - features.mean(dim=0, keepdim=True)
    return centred @ centred.T


def rbf_from_gram(gram: torch.Tensor, threshold: float = 0.5, sigma: float | None = None) -> torch.Tensor:
    """RBF kernel ``exp(-‖xᵢ-xⱼ‖² / (2σ²))`` from a linear Gram.

    σ follows Kornblith et al.: ``threshold × sqrt(median of all n² squared distances)`` (numpy's median,
    which averages the two middle values, the zero diagonal included); an explicit ``sigma`` overrides.

    Example:
        >>> import torch
        >>> rbf_from_gram(torch.tensor([[1.0, 0.0], [0.0, 1.0]]), sigma=1.0)
        tensor([[1.0000, 0.3679],
                [0.3679, 1.0000]])
    """
    diagonal = torch.diagonal(gram)
    squared_distances = (diagonal[:, None] + diagonal[None, :] - 2 * gram).clamp_min(0)
    if sigma is None:
        median = float(np.median(squared_distances.detach().cpu().double().numpy()))
        if median <= 0:
            raise ValueError("the RBF bandwidth is zero: more than half of the pairwise distances are 0")
        variance = threshold**2 * median
    else:
        if not sigma > 0:
            raise ValueError(f"sigma must be a positive number, got {sigma!r}")
        variance = sigma**2
    return torch.exp(-squared_distances / (2 * variance))


def centre_gram(gram: torch.Tensor, unbiased: bool, inplace: bool = False) -> torch.Tensor:
    """Double-centre a Gram (``HKH``) or, with ``unbiased=True``, U-centre it (Song et al. 2012).

    Works on ``[n, n]`` or a stack ``[L, n, n]``. With U-centring, ``⟨U(K), U(L)⟩ / (n(n-3))`` is the
    unbiased HSIC estimator, which needs n ≥ 4. ``inplace=True`` overwrites ``gram`` (no copies, for the
    streaming probes); otherwise it works on a copy and stays differentiable (for the CKA loss).

    Example:
        >>> import torch
        >>> centre_gram(torch.ones(3, 3), unbiased=False).abs().max().item()
        0.0
    """
    n = gram.shape[-1]
    if unbiased and n < 4:
        raise ValueError(f"the unbiased HSIC needs at least 4 samples per batch, got {n}")
    centred = gram if inplace else gram.clone()
    diagonal = centred.diagonal(dim1=-2, dim2=-1)
    if unbiased:
        diagonal.zero_()
        means = centred.sum(dim=-2) / (n - 2)
        means -= means.sum(dim=-1, keepdim=True) / (2 * (n - 1))
    else:
        means = centred.mean(dim=-2)
        means -= means.mean(dim=-1, keepdim=True) / 2
    centred -= means[..., :, None]
    centred -= means[..., None, :]
    if unbiased:
        diagonal.zero_()
    return centred


def hsic_scale(n: int, unbiased: bool) -> float:
    """The factor that turns ``⟨centred K, centred L⟩`` into an HSIC estimate for a batch of n.

    Example:
        >>> hsic_scale(10, unbiased=True)
        0.014285714285714285
    """
    return 1.0 / (n * (n - 3)) if unbiased else 1.0 / (n - 1) ** 2


def cka_from_grams(gram_x: torch.Tensor, gram_y: torch.Tensor, debiased: bool = False) -> torch.Tensor:
    """CKA of two ``[n, n]`` Grams: ``⟨K̃, L̃⟩ / (‖K̃‖ ‖L̃‖)`` with K̃ centred (or U-centred if debiased).

    Example:
        >>> import torch
        >>> x = torch.randn(20, 5, dtype=torch.float64)
        >>> round(cka_from_grams(centred_gram(x), centred_gram(2 * x)).item(), 12)
        1.0
    """
    centred_x = centre_gram(gram_x, unbiased=debiased)
    centred_y = centre_gram(gram_y, unbiased=debiased)
    return (centred_x * centred_y).sum() / (centred_x.norm() * centred_y.norm())
