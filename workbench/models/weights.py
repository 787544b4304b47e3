"""Safe weight files: safetensors, or ``torch.load(weights_only=True)`` — never arbitrary unpickling.

The format is recognised from the file's first bytes (not trusted from its suffix): a zip archive or
a pickle stream goes to ``torch.load(weights_only=True)``, a safetensors header to safetensors.
"""
from __future__ import annotations

import os
import stat
import struct
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from workbench.files import atomic_path

__all__ = ["load_weights", "save_weights", "read_state_dict", "apply_state_dict"]

ACCEPTED = (
    "accepted formats: .safetensors (safetensors), or .pt/.pth/.bin written by torch.save holding a "
    "dict of tensors (optionally under 'state_dict' or 'model'), readable with torch.load(weights_only=True)"
)
_TORCH_SUFFIXES = (".pt", ".pth", ".bin")
_SHOW = 5  # how many keys an error message lists


def save_weights(model: nn.Module, path: str | os.PathLike) -> Path:
    """Write ``model.state_dict()`` to ``path`` (``.safetensors``, or ``.pt/.pth/.bin``), atomically.

    Example:
        >>> import tempfile, os
        >>> from workbench.models import create, save_weights, load_weights
        >>> path = os.path.join(tempfile.mkdtemp(), "cnn.safetensors")
        >>> _ = save_weights(create("cnn_small"), path)
        >>> _ = load_weights(create("cnn_small"), path)
    """
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix != ".safetensors" and suffix not in _TORCH_SUFFIXES:
        raise ValueError(f"cannot save weights to {str(path)!r}: use a .safetensors, .pt, .pth or .bin suffix")
    # Clone so tied / shared tensors become separate, contiguous CPU tensors (safetensors needs that).
    tensors = {key: value.detach().cpu().clone().contiguous() for key, value in model.state_dict().items()}
    with atomic_path(path) as temporary:
        if suffix == ".safetensors":
            from safetensors.torch import save_file

            save_file(tensors, str(temporary))
        else:
            torch.save(tensors, temporary)
    return path


def read_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Read a weight file into a dict of CPU tensors, refusing anything that is not plain tensors.

    Example:
        >>> import tempfile, os, torch
        >>> from workbench.models import read_state_dict
        >>> path = os.path.join(tempfile.mkdtemp(), "w.pt")
        >>> torch.save({"state_dict": {"w": torch.ones(2)}}, path)
        >>> read_state_dict(path)
        {'w': tensor([1., 1.])}
    """
    path = Path(path)
    _check_regular_file(path)
    kind = _sniff(path)
    if kind is None:
        raise ValueError(f"{str(path)!r} is not a tensor file; {ACCEPTED}")
    try:
        if kind == "safetensors":
            from safetensors.torch import load_file

            loaded: Any = load_file(str(path), device="cpu")
        else:
            loaded = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # the loaders raise many types; all mean "not a safe tensor file"
        raise ValueError(
            f"could not read {str(path)!r} as a {kind} tensor file ({type(error).__name__}: "
            f"{str(error).splitlines()[0] if str(error) else ''}); {ACCEPTED}"
        ) from None
    return _tensors_only(loaded, path)


def load_weights(model: nn.Module, path: str | os.PathLike, strict: bool = True, cast: bool = False) -> nn.Module:
    """Load a weight file into ``model`` and return it; see :func:`read_state_dict` for formats.

    Keys saved from a DDP-wrapped model (``module.`` prefix) are matched automatically. With
    ``strict=True`` missing or unexpected keys raise ``ValueError``; a shape mismatch always does, and
    so does a value of another kind than the model's tensor (integer or bool values into floating
    parameters, floating values into integer buffers) unless ``cast=True``; complex values into a
    real tensor are always refused (the imaginary part would be dropped). See :func:`apply_state_dict`.

    Example:
        >>> import tempfile, os
        >>> from workbench.models import create, save_weights, load_weights
        >>> path = os.path.join(tempfile.mkdtemp(), "mlp.pt")
        >>> _ = save_weights(create("mlp", hidden=(8,)), path)
        >>> model = load_weights(create("mlp", hidden=(8,)), path)
    """
    return apply_state_dict(model, read_state_dict(path), str(path), strict=strict, cast=cast)


def apply_state_dict(
    model: nn.Module, state: Mapping[str, torch.Tensor], source: str, strict: bool = True, cast: bool = False
) -> nn.Module:
    """Load the tensors ``state`` (read from ``source``, named in errors) into ``model``, checked first.

    Nothing is loaded unless every check passes: keys (``strict``), shapes, and kinds of dtype — bool,
    integer, floating and complex values only go into tensors of their own kind, unless ``cast=True``
    (real values converted into the model's dtype); complex into real is always refused.
    Floating values of another precision (float64 into float32) are converted, as ``load_state_dict`` does.

    Example:
        >>> import torch
        >>> from workbench.models.weights import apply_state_dict
        >>> model = torch.nn.Linear(2, 1, bias=False)
        >>> _ = apply_state_dict(model, {"weight": torch.tensor([[1, 2]])}, "ints", cast=True)
        >>> model.weight.tolist()
        [[1.0, 2.0]]
        >>> apply_state_dict(model, {"weight": torch.tensor([[1, 2]])}, "ints")
        Traceback (most recent call last):
        ...
        ValueError: weights in 'ints' do not fit Linear: 1 dtype mismatches (weight: file torch.int64 vs model torch.float32). Integer / bool values are not converted into floating tensors (or back) unless you pass cast=True.
    """
    expected = model.state_dict()
    prefix = "module."
    if state and all(k.startswith(prefix) for k in state) and not any(k.startswith(prefix) for k in expected):
        state = {key[len(prefix):]: value for key, value in state.items()}
    missing = [key for key in expected if key not in state]
    unexpected = [key for key in state if key not in expected]
    shared = [key for key in expected if key in state]
    mismatched = [
        f"{key}: file {tuple(state[key].shape)} vs model {tuple(expected[key].shape)}"
        for key in shared
        if state[key].shape != expected[key].shape
    ]
    complex_into_real = [
        f"{key}: file {state[key].dtype} vs model {expected[key].dtype}"
        for key in shared
        if state[key].is_complex() and not expected[key].is_complex()
    ]
    other_kind = [
        f"{key}: file {state[key].dtype} vs model {expected[key].dtype}"
        for key in shared
        if not cast and not state[key].is_complex() and _kind(state[key]) != _kind(expected[key])
    ]
    problems = []
    if mismatched:
        problems.append(f"{len(mismatched)} shape mismatches ({_few(mismatched)})")
    if complex_into_real:
        problems.append(f"{len(complex_into_real)} complex tensors for real ones ({_few(complex_into_real)}); "
                        "the imaginary part would be lost, so they are never loaded")
    if other_kind:
        problems.append(f"{len(other_kind)} dtype mismatches ({_few(other_kind)})")
    if strict and missing:
        problems.append(f"{len(missing)} keys missing from the file ({_few(missing)})")
    if strict and unexpected:
        problems.append(f"{len(unexpected)} unexpected keys in the file ({_few(unexpected)})")
    if problems:
        hint = " Pass strict=False to load only the matching keys." if (missing or unexpected) and strict else ""
        if other_kind:
            hint += (" Integer / bool values are not converted into floating tensors (or back) unless you "
                     "pass cast=True.")
        raise ValueError(f"weights in {source!r} do not fit {type(model).__name__}: {'; '.join(problems)}.{hint}")
    model.load_state_dict({key: state[key] for key in shared}, strict=False)
    return model


def _kind(tensor: torch.Tensor) -> str:
    if tensor.dtype == torch.bool:
        return "bool"
    if tensor.is_complex():
        return "complex"
    return "floating" if tensor.is_floating_point() else "integer"


def _check_regular_file(path: Path) -> None:
    """A weight file must be a regular file: a folder or a device (``/dev/zero``) would hang or mislead."""
    try:
        mode = path.stat().st_mode
    except FileNotFoundError:
        raise FileNotFoundError(f"weight file {str(path)!r} does not exist") from None
    if stat.S_ISDIR(mode):
        raise IsADirectoryError(
            f"{str(path)!r} is a folder, not a weight file; give the file inside it "
            "(e.g. weights.safetensors, pytorch_model.bin)"
        )
    if not stat.S_ISREG(mode):
        raise ValueError(f"{str(path)!r} is not a regular file (a device, pipe or socket); {ACCEPTED}")


def _few(keys: list[str]) -> str:
    shown = ", ".join(keys[:_SHOW])
    return shown + (", ..." if len(keys) > _SHOW else "")


def _sniff(path: Path) -> str | None:
    """``"torch"`` for a zip archive or pickle stream, ``"safetensors"`` for a safetensors header."""
    with open(path, "rb") as file:
        head = file.read(9)
    if head[:2] == b"PK" or head[:1] == b"\x80":
        return "torch"
    if len(head) == 9 and head[8:9] == b"{":
        (header_bytes,) = struct.unpack("<Q", head[:8])
        if header_bytes + 8 <= path.stat().st_size:
            return "safetensors"
    return None


def _tensors_only(loaded: Any, path: Path) -> dict[str, torch.Tensor]:
    if isinstance(loaded, Mapping):
        for wrapper in ("state_dict", "model"):
            if isinstance(loaded.get(wrapper), Mapping):
                loaded = loaded[wrapper]
                break
    if not isinstance(loaded, Mapping):
        raise ValueError(f"{str(path)!r} holds a {type(loaded).__name__}, not a dict of tensors; {ACCEPTED}")
    not_tensors = [str(key) for key, value in loaded.items() if not isinstance(value, torch.Tensor)]
    if not_tensors:
        raise ValueError(
            f"{str(path)!r} is not a dict of tensors: {len(not_tensors)} entries are not tensors "
            f"({_few(not_tensors)}); {ACCEPTED}"
        )
    return {str(key): value for key, value in loaded.items()}
