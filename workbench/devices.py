"""Device selection shared by every probe, loss and training loop."""
from __future__ import annotations

import torch
from torch import nn


def resolve_device(device: str | torch.device | None = "auto") -> torch.device:
    """Turn ``"auto"`` (or ``None``) into cuda, then mps, then cpu; pass anything else to ``torch.device``.

    Example:
        >>> from workbench.devices import resolve_device
        >>> resolve_device("cpu")
        device(type='cpu')
    """
    if device is None or device == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        mps = getattr(torch.backends, "mps", None)
        if mps is not None and mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    return torch.device(device)


def model_device(model: nn.Module) -> torch.device:
    """Where ``model`` lives: the device of its first parameter (else its first buffer), the CPU for a model
    that holds neither.

    Example:
        >>> from torch import nn
        >>> model_device(nn.Linear(2, 3)), model_device(nn.ReLU())
        (device(type='cpu'), device(type='cpu'))
    """
    tensor = next(iter(model.parameters()), None)
    if tensor is None:
        tensor = next(iter(model.buffers()), None)
    return tensor.device if tensor is not None else torch.device("cpu")
