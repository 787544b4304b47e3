"""The one check every user array or tensor passes on its way in: refuse what would be silently wrong.

Probes (``linear_cka``, ``rbf_cka``, ``mutual_knn``), the batch adapters (``as_loader`` for probes and
``fit``) and the result objects all call :func:`checked_tensor`, so the same inputs are refused with the
same message everywhere:

- complex values (casting to real would drop the imaginary part) — take ``.real`` or ``.abs()`` first;
- numpy masked arrays (the mask would be dropped) — ``.filled(value)`` or ``.compressed()`` first;
- object, string, datetime and other non-numeric dtypes, and ``np.longdouble``;
- arrays with no samples (``[0, d]``) or no values per sample (``[n, 0]``), and scalars;
- meta tensors (they have a shape but no data).

Negative-stride numpy arrays (``x[::-1]``) and non-native byte orders are copied, not refused. The
checks read only dtypes, shapes and strides (no pass over the data) except for those copies.
"""
from __future__ import annotations

import numpy as np
import torch

__all__ = ["checked_tensor"]

_NUMERIC_KINDS = "biuf"  # bool, signed and unsigned integers, floats


def _numpy_as_tensor(value: np.ndarray, what: str) -> torch.Tensor:
    if isinstance(value, np.ma.MaskedArray):
        raise TypeError(
            f"{what} is a numpy masked array: its mask would be dropped silently; fill or drop the masked "
            "entries first (`x.filled(value)` or `x.compressed()`) and pass the plain array"
        )
    kind = value.dtype.kind
    if kind == "c":
        raise TypeError(
            f"{what} is complex ({value.dtype}): complex values are not supported; pass `x.real` or `abs(x)` explicitly"
        )
    if kind not in _NUMERIC_KINDS:
        raise TypeError(
            f"{what} has dtype {value.dtype} ({'object' if kind == 'O' else 'not numeric'}): pass a numeric "
            "array (bool, integer or float), e.g. `np.asarray(x, dtype=np.float32)`"
        )
    if kind == "f" and value.dtype.itemsize > 8:
        raise TypeError(f"{what} has dtype {value.dtype}, which torch cannot hold: cast it to float64 first")
    if not value.dtype.isnative:
        value = value.astype(value.dtype.newbyteorder("="))
    if any(stride < 0 for stride in value.strides):  # x[::-1]: torch.from_numpy refuses negative strides
        value = value.copy()
    return torch.from_numpy(value)


def checked_tensor(value: object, what: str) -> torch.Tensor:
    """``value`` (a numpy array or torch tensor ``[n, ...]``) as a tensor, refusing complex, masked,
    non-numeric, empty and meta inputs with a message that names ``what`` and says what would be right.

    A numpy array shares its memory with the tensor unless it had to be copied (negative strides,
    non-native byte order); a tensor is returned as it is.

    Example:
        >>> import numpy as np
        >>> checked_tensor(np.arange(6.0).reshape(3, 2)[::-1], "x")[0].tolist()
        [4.0, 5.0]
        >>> checked_tensor(np.ones((2, 2)) * 1j, "x")
        Traceback (most recent call last):
        ...
        TypeError: x is complex (complex128): complex values are not supported; pass `x.real` or `abs(x)` explicitly
    """
    if isinstance(value, np.ndarray):
        value = _numpy_as_tensor(value, what)
    elif not isinstance(value, torch.Tensor):
        raise TypeError(f"{what} must be a numpy array or a torch tensor, got {type(value).__name__}")
    if value.is_complex():
        raise TypeError(
            f"{what} is complex ({value.dtype}): complex values are not supported; "
            "pass `x.real` or `x.abs()` explicitly"
        )
    if value.device.type == "meta":
        raise ValueError(
            f"{what} has no data (meta device, shape {list(value.shape)}): materialise it first, e.g. "
            "`module.to_empty(device='cpu')` and load its weights, or pass real data"
        )
    if value.dim() == 0:
        raise ValueError(f"{what} must have a sample dimension [n, ...], got a scalar")
    if value.numel() == 0:
        where = "no samples" if value.shape[0] == 0 else "no values per sample"
        raise ValueError(f"{what} is empty ({where}): shape {list(value.shape)}; pass at least one sample with values")
    return value
