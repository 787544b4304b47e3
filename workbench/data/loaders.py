"""Turn whatever the user holds (tensors, arrays, datasets, loaders) into batches (read by workbench.batches)."""
from __future__ import annotations

from collections.abc import Sized
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, IterableDataset, TensorDataset

from workbench.data.arrays import checked_tensor

__all__ = ["as_loader", "num_samples"]

_ACCEPTED = "a Tensor, a numpy array, a tuple/list (x, y) of tensors or arrays, a Dataset or a DataLoader"


class _InputsDataset(Dataset):
    """Inputs without labels: each item (and so each batch) is a plain tensor."""

    def __init__(self, inputs: torch.Tensor) -> None:
        self.inputs = inputs

    def __len__(self) -> int:
        return len(self.inputs)

    def __getitem__(self, index: int) -> torch.Tensor:
        return self.inputs[index]


def _as_tensor(value: Any, what: str) -> torch.Tensor:
    if not isinstance(value, (torch.Tensor, np.ndarray)):
        raise TypeError(f"{what} must be a Tensor or numpy array, got {type(value).__name__}; accepted: {_ACCEPTED}")
    return checked_tensor(value, what)


def _as_dataset(data: Any) -> Dataset:
    if isinstance(data, Dataset):
        return data
    if isinstance(data, (torch.Tensor, np.ndarray)):
        return _InputsDataset(_as_tensor(data, "data"))
    if isinstance(data, (tuple, list)):
        if not data:
            raise TypeError(f"got an empty {type(data).__name__}; accepted: {_ACCEPTED}")
        tensors = [_as_tensor(item, f"element {i} of the {type(data).__name__}") for i, item in enumerate(data)]
        counts = [len(t) for t in tensors]
        if len(set(counts)) > 1:
            raise ValueError(f"the tensors in the {type(data).__name__} hold different sample counts: {counts}")
        return TensorDataset(*tensors)
    raise TypeError(f"cannot make batches from a {type(data).__name__}; accepted: {_ACCEPTED}")


def as_loader(data: Any, batch_size: int = 128, shuffle: bool = False, seed: int = 0) -> DataLoader:
    """A ``DataLoader`` over ``data``; a ``DataLoader`` is returned as is.

    A Tensor / numpy array yields batches of inputs (plain tensors); a tuple/list ``(x, y)`` yields
    ``[x, y]`` batches; a Dataset is batched as it is. Shuffling is seeded by ``seed``.

    Example:
        >>> import torch
        >>> from workbench.data import as_loader
        >>> next(iter(as_loader(torch.zeros(10, 3), batch_size=4))).shape
        torch.Size([4, 3])
        >>> x, y = next(iter(as_loader((torch.zeros(10, 3), torch.arange(10)), batch_size=4)))
        >>> y.tolist()
        [0, 1, 2, 3]
    """
    if isinstance(data, DataLoader):
        return data
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    dataset = _as_dataset(data)
    if isinstance(dataset, IterableDataset):
        return DataLoader(dataset, batch_size=batch_size)
    generator = torch.Generator().manual_seed(seed) if shuffle else None
    return DataLoader(dataset, batch_size=batch_size, shuffle=shuffle, generator=generator)


def num_samples(data: Any) -> int | None:
    """How many samples ``data`` holds when that is knowable, else None.

    Example:
        >>> import torch
        >>> from workbench.data import num_samples
        >>> num_samples((torch.zeros(7, 2), torch.zeros(7))), num_samples(iter([1]))
        (7, None)
    """
    if isinstance(data, (torch.Tensor, np.ndarray)):
        return len(data)
    if isinstance(data, (tuple, list)):
        return len(data[0]) if data and isinstance(data[0], (torch.Tensor, np.ndarray)) else None
    if isinstance(data, DataLoader):
        data = data.dataset
    if isinstance(data, IterableDataset) or not isinstance(data, Sized):
        return None
    try:
        return len(data)
    except TypeError:
        return None
