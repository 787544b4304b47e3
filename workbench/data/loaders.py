"""Turn whatever the user holds (tensors, arrays, datasets, loaders) into batches, and read batches back."""
from __future__ import annotations

from collections.abc import Mapping, Sized
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, IterableDataset, TensorDataset

from workbench.data.arrays import checked_tensor

__all__ = ["as_loader", "inputs_of", "targets_of", "num_samples"]

INPUT_KEYS = ("pixel_values", "input_ids", "x")
TARGET_KEYS = ("labels", "label", "y", "targets")
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


def inputs_of(batch: Any) -> Any:
    """The model input of a batch: the tensor itself, ``x`` of ``(x, y)``, or a dict's input entry.

    For a dict (or Hugging Face ``BatchEncoding``) the first of ``pixel_values``, ``input_ids``, ``x``.

    Example:
        >>> import torch
        >>> from workbench.data import inputs_of
        >>> inputs_of((torch.ones(2, 3), torch.zeros(2))).shape
        torch.Size([2, 3])
        >>> inputs_of({"input_ids": torch.ones(2, 5)}).shape
        torch.Size([2, 5])
    """
    if isinstance(batch, torch.Tensor):
        return batch
    if isinstance(batch, (tuple, list)) and batch:
        return batch[0]
    if isinstance(batch, Mapping):
        for key in INPUT_KEYS:
            if key in batch:
                return batch[key]
        raise TypeError(f"batch dict has no input entry: expected one of {INPUT_KEYS}, got keys {list(batch)}")
    raise TypeError(
        f"cannot find the model input in a batch of type {type(batch).__name__}: "
        f"expected a Tensor, an (x, y) tuple/list or a dict with one of {INPUT_KEYS}"
    )


def targets_of(batch: Any) -> torch.Tensor | None:
    """The labels of a batch: ``y`` of ``(x, y)``, a dict's ``labels``/``label``/``y``/``targets``, else None.

    Example:
        >>> import torch
        >>> from workbench.data import targets_of
        >>> targets_of((torch.ones(2, 3), torch.tensor([1, 0]))).tolist()
        [1, 0]
        >>> targets_of(torch.ones(2, 3)) is None
        True
    """
    if isinstance(batch, (tuple, list)) and len(batch) >= 2:
        return batch[1]
    if isinstance(batch, Mapping):
        for key in TARGET_KEYS:
            if key in batch:
                return batch[key]
    return None


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
