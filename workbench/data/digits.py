"""scikit-learn's bundled 8x8 handwritten digits, resized, normalised and split — fully offline."""
from __future__ import annotations

from functools import lru_cache

import numpy as np
from torch.utils.data import TensorDataset

from workbench.data.splits import split_images

__all__ = ["digits"]


@lru_cache(maxsize=1)
def _raw_digits() -> tuple[np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits

    bunch = load_digits()
    return bunch.images.astype(np.float32), bunch.target.astype(np.int64)


def digits(
    split: str = "train",
    size: int = 32,
    channels: int = 1,
    test_fraction: float = 0.25,
    seed: int = 0,
    normalise: bool = True,
) -> TensorDataset:
    """The 1,797 scikit-learn digits as ``(x, y)``: x float32 ``[n, channels, size, size]``, y int64.

    Images are resized bilinearly from 8x8, repeated over ``channels`` and normalised with the mean
    and std of the *train* split (``normalise=False``: the raw intensities 0 … 16, resized); the split is stratified and fixed by ``seed`` (``split`` is
    ``"train"``, ``"test"`` or ``"all"``).

    Example:
        >>> from workbench.data import digits
        >>> x, y = digits("test").tensors
        >>> tuple(x.shape), y.dtype
        ((450, 1, 32, 32), torch.int64)
    """
    return split_images(*_raw_digits(), split, size, channels, test_fraction, seed, normalise)
