"""One recipe for the bundled image sets: a fixed stratified split, resized, normalised with the train split."""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import TensorDataset

__all__ = ["SPLITS", "split_images"]

SPLITS = ("train", "test", "all")


def split_images(
    images: np.ndarray,
    labels: np.ndarray,
    split: str = "train",
    size: int = 32,
    channels: int = 1,
    test_fraction: float = 0.25,
    seed: int = 0,
    normalise: bool = True,
) -> TensorDataset:
    """``images`` ``[n, h, w]`` and ``labels`` ``[n]`` as ``(x, y)``: x float32 ``[m, channels, size, size]``.

    The split is stratified by label and fixed by ``seed`` (scikit-learn's ``train_test_split``);
    images are resized bilinearly when ``size`` differs, normalised with the mean and std of the
    *train* split (unless ``normalise=False``: the resized values as they are), and repeated over
    ``channels``. ``split`` is ``"train"``, ``"test"`` or ``"all"``.

    Example:
        >>> import numpy as np
        >>> images, labels = np.arange(40 * 4, dtype=np.float32).reshape(40, 2, 2), np.arange(40) % 2
        >>> x, y = split_images(images, labels, "test", size=4, channels=3).tensors
        >>> tuple(x.shape), y.tolist().count(0)
        ((10, 3, 4, 4), 5)
    """
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"test_fraction must be between 0 and 1 (exclusive), got {test_fraction}")
    if size < 1 or channels < 1:
        raise ValueError(f"size and channels must be positive, got size={size}, channels={channels}")
    from sklearn.model_selection import train_test_split

    train_index, test_index = train_test_split(
        np.arange(len(labels)), test_size=test_fraction, stratify=labels, random_state=seed
    )
    x = torch.from_numpy(np.array(images, dtype=np.float32)).unsqueeze(1)  # a copy: the source may be read-only
    if size != x.shape[-1]:
        x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)
    train_x = x[torch.from_numpy(train_index)]
    if normalise:
        x = (x - train_x.mean()) / train_x.std()
    index = {"train": train_index, "test": test_index, "all": np.arange(len(labels))}[split]
    index_tensor = torch.from_numpy(np.asarray(index))
    x = x[index_tensor].expand(-1, channels, -1, -1).contiguous()
    y = torch.from_numpy(np.array(labels, dtype=np.int64))[index_tensor]
    return TensorDataset(x, y)
