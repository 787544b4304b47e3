"""scikit-learn's bundled 8x8 handwritten digits, resized, normalised and split — fully offline."""
from __future__ import annotations

from functools import lru_cache

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import TensorDataset

__all__ = ["digits"]

_SPLITS = ("train", "test", "all")


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
) -> TensorDataset:
    """The 1,797 scikit-learn digits as ``(x, y)``: x float32 ``[n, channels, size, size]``, y int64.

    Images are resized bilinearly from 8x8, repeated over ``channels`` and normalised with the mean
    and std of the *train* split; the split is stratified and fixed by ``seed`` (``split`` is
    ``"train"``, ``"test"`` or ``"all"``).

    Example:
        >>> from workbench.data import digits
        >>> x, y = digits("test").tensors
        >>> tuple(x.shape), y.dtype
        ((450, 1, 32, 32), torch.int64)
    """
    if split not in _SPLITS:
        raise ValueError(f"split must be one of {_SPLITS}, got {split!r}")
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"test_fraction must be between 0 and 1 (exclusive), got {test_fraction}")
    if size < 1 or channels < 1:
        raise ValueError(f"size and channels must be positive, got size={size}, channels={channels}")
    from sklearn.model_selection import train_test_split

    images, labels = _raw_digits()
    train_index, test_index = train_test_split(
        np.arange(len(labels)), test_size=test_fraction, stratify=labels, random_state=seed
    )
    x = torch.from_numpy(images).unsqueeze(1)
    if size != x.shape[-1]:
        x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)
    train_x = x[torch.from_numpy(train_index)]
    mean, std = train_x.mean(), train_x.std()
    x = (x - mean) / std
    index = {"train": train_index, "test": test_index, "all": np.arange(len(labels))}[split]
    index_tensor = torch.from_numpy(np.asarray(index))
    x = x[index_tensor].expand(-1, channels, -1, -1).contiguous()
    y = torch.from_numpy(labels)[index_tensor].clone()
    return TensorDataset(x, y)
