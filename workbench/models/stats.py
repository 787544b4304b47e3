"""How big a model is: its parameter count and the FLOPs of one sample's forward pass."""
from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

__all__ = ["count_parameters", "count_flops"]


def count_parameters(model: nn.Module, trainable_only: bool = False) -> int:
    """The number of parameters of ``model`` (a tensor shared by two modules counts once).

    ``trainable_only=True`` counts only those with ``requires_grad``.

    Example:
        >>> from torch import nn
        >>> count_parameters(nn.Linear(4, 3))  # 4·3 weights + 3 biases
        15
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"count_parameters takes a torch.nn.Module, got {type(model).__name__}")
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)


def _first_sample(example: Any) -> Any:
    if isinstance(example, torch.Tensor):
        if example.dim() == 0 or len(example) == 0:
            raise ValueError(f"example must be a batch with at least one sample, got shape {tuple(example.shape)}")
        return example[:1]
    if isinstance(example, Mapping):
        return {key: _first_sample(value) if isinstance(value, torch.Tensor) else value
                for key, value in example.items()}
    raise TypeError(
        f"example must be a model input batch (a tensor [n, ...] or a dict of such tensors), got "
        f"{type(example).__name__}; e.g. count_flops(model, x[:1]) with x from the data set"
    )


def count_flops(model: nn.Module, example: Any) -> int:
    """Forward FLOPs of ``model`` for one sample: the first sample of ``example`` (a tensor batch, or a
    dict of tensors passed as keywords, e.g. ``input_ids`` and ``attention_mask``).

    Counted by :class:`torch.utils.flop_counter.FlopCounterMode`: 2 × the multiply-accumulates of matrix
    products, convolutions and attention (``nn.Linear(i, o)``: 2·i·o; a k×k ``Conv2d``: 2·k²·C_in·C_out
    per output position / groups); bias additions, norms and activations are not counted. The model runs
    in eval mode without gradients on its own device; its mode is restored.

    Example:
        >>> import torch
        >>> from torch import nn
        >>> count_flops(nn.Linear(4, 3), torch.zeros(10, 4))  # one sample: 2·4·3
        24
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"count_flops takes a torch.nn.Module, got {type(model).__name__}")
    sample = _first_sample(example)
    parameter = next(iter(model.parameters()), None)
    if parameter is not None:
        sample = ({k: v.to(parameter.device) if isinstance(v, torch.Tensor) else v for k, v in sample.items()}
                  if isinstance(sample, Mapping) else sample.to(parameter.device))
    was_training = model.training
    counter = FlopCounterMode(display=False)
    try:
        model.eval()
        with torch.no_grad(), counter:
            model(**sample) if isinstance(sample, Mapping) else model(sample)
    finally:
        model.train(was_training)
    return int(counter.get_total_flops())
