"""Procedural shape images of any size and count, generated in vectorised torch, deterministic by seed."""
from __future__ import annotations

from typing import Callable

import torch
from torch.utils.data import TensorDataset

__all__ = ["shapes", "SHAPE_CLASSES"]

Mask = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def _circle(dx: torch.Tensor, dy: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
    return dx**2 + dy**2 <= r**2


def _square(dx: torch.Tensor, dy: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
    return torch.maximum(dx.abs(), dy.abs()) <= 0.8 * r


def _triangle(dx: torch.Tensor, dy: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
    # Apex up (image rows grow downwards): the half-width grows linearly from the apex to the base.
    return (dy >= -r) & (dy <= r) & (dx.abs() <= 0.5 * (dy + r))


def _stripes(dx: torch.Tensor, dy: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
    inside = torch.maximum(dx.abs(), dy.abs()) <= r
    return inside & (torch.floor((dy + r) / (0.4 * r)).remainder(2) == 0)


def _ring(dx: torch.Tensor, dy: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
    distance_sq = dx**2 + dy**2
    return (distance_sq <= r**2) & (distance_sq >= (0.55 * r) ** 2)


def _cross(dx: torch.Tensor, dy: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
    ax, ay, arm = dx.abs(), dy.abs(), 0.3 * r
    return ((ax <= arm) & (ay <= r)) | ((ay <= arm) & (ax <= r))


SHAPE_CLASSES: dict[str, Mask] = {
    "circle": _circle,
    "square": _square,
    "triangle": _triangle,
    "stripes": _stripes,
    "ring": _ring,
    "cross": _cross,
}


def shapes(n: int, size: int = 32, channels: int = 3, n_classes: int = 4, seed: int = 0) -> TensorDataset:
    """``n`` images of random shapes as ``(x, y)``: x float32 ``[n, channels, size, size]``, y int64.

    Class ``k`` is the k-th of circle, square, triangle, stripes, ring, cross (``2 <= n_classes <= 6``),
    drawn at a random position, size and colour on a dark random background, plus Gaussian noise
    (pixel values roughly in [0, 1]). Classes are balanced; the same ``seed`` gives the same images.

    Example:
        >>> from workbench.data import shapes
        >>> x, y = shapes(8, size=16).tensors
        >>> tuple(x.shape), sorted(set(y.tolist()))
        ((8, 3, 16, 16), [0, 1, 2, 3])
    """
    if not 2 <= n_classes <= len(SHAPE_CLASSES):
        raise ValueError(f"n_classes must be between 2 and {len(SHAPE_CLASSES)}, got {n_classes}")
    if n < 1 or size < 4 or channels < 1:
        raise ValueError(f"need n >= 1, size >= 4 and channels >= 1, got n={n}, size={size}, channels={channels}")
    generator = torch.Generator().manual_seed(seed)

    def uniform(*shape: int, low: float = 0.0, high: float = 1.0) -> torch.Tensor:
        return low + (high - low) * torch.rand(*shape, generator=generator)

    labels = (torch.arange(n) % n_classes)[torch.randperm(n, generator=generator)]
    radius = uniform(n, low=0.18, high=0.32) * size
    centre_x = uniform(n, low=0.0, high=1.0) * (size - 2 * radius) + radius
    centre_y = uniform(n, low=0.0, high=1.0) * (size - 2 * radius) + radius
    foreground = uniform(n, channels, low=0.5, high=1.0)
    background = uniform(n, channels, low=0.0, high=0.3)
    noise = 0.08 * torch.randn(n, channels, size, size, generator=generator)

    grid = torch.arange(size, dtype=torch.float32) + 0.5
    mask = torch.zeros(n, size, size, dtype=torch.bool)
    for label, draw in enumerate(list(SHAPE_CLASSES.values())[:n_classes]):
        chosen = (labels == label).nonzero().squeeze(1)
        if chosen.numel() == 0:
            continue
        dx = grid.view(1, 1, size) - centre_x[chosen].view(-1, 1, 1)
        dy = grid.view(1, size, 1) - centre_y[chosen].view(-1, 1, 1)
        mask[chosen] = draw(dx, dy, radius[chosen].view(-1, 1, 1))

    x = torch.where(mask.unsqueeze(1), foreground[:, :, None, None], background[:, :, None, None])
    x = x + noise
    return TensorDataset(x.float(), labels.long())
