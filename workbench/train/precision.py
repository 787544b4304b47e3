"""Mixed precision for ``fit``: which autocast dtype, and whether a GradScaler guards fp16 gradients."""
from __future__ import annotations

from typing import Any

import torch

__all__ = ["AMP_MODES", "autocast_settings"]

AMP_MODES = ("auto", "bf16", "fp16", "off")


def autocast_settings(amp: str | bool | None, device: torch.device) -> tuple[torch.dtype | None, Any]:
    """``(autocast dtype or None, GradScaler or None)``: bf16 where supported, else fp16 with a scaler.

    ``"auto"`` (or True) turns autocast on for CUDA only; an explicit ``"bf16"`` / ``"fp16"`` also runs on
    the CPU (CPU autocast; fp16 with a CPU GradScaler), through the same code as on CUDA.

    Example:
        >>> import torch
        >>> from workbench.train.precision import autocast_settings
        >>> autocast_settings("auto", torch.device("cpu")), autocast_settings("bf16", torch.device("cpu"))
        ((None, None), (torch.bfloat16, None))
        >>> dtype, scaler = autocast_settings("fp16", torch.device("cpu"))
        >>> dtype, type(scaler).__name__
        (torch.float16, 'GradScaler')
    """
    if amp in (False, None, "off"):
        return None, None
    if amp is not True and amp not in AMP_MODES:
        raise ValueError(f"amp must be one of {AMP_MODES}, True or False; got {amp!r}")
    if amp in ("auto", True):
        if device.type != "cuda":
            return None, None
        amp = "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    if device.type not in ("cuda", "cpu"):
        raise ValueError(f"amp={amp!r} runs on CUDA or the CPU, got {device}; use amp='auto' or 'off' here")
    if amp == "bf16":
        return torch.bfloat16, None
    return torch.float16, torch.amp.GradScaler(device.type)
