"""Safe weight files: safetensors, or ``torch.load(weights_only=True)`` — never arbitrary unpickling.

The format is recognised from the file's first bytes (not trusted from its suffix): a zip archive or
a pickle stream goes to ``torch.load(weights_only=True)``, a safetensors header to safetensors.
"""
from __future__ import annotations

import os
import struct
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

__all__ = ["load_weights", "save_weights", "read_state_dict"]

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
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temp_name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(handle)
    try:
        if suffix == ".safetensors":
            from safetensors.torch import save_file

            save_file(tensors, temp_name)
        else:
            torch.save(tensors, temp_name)
        os.replace(temp_name, path)
    finally:
        if os.path.exists(temp_name):
            os.remove(temp_name)
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
    if not path.is_file():
        raise FileNotFoundError(f"weight file {str(path)!r} does not exist")
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


def load_weights(model: nn.Module, path: str | os.PathLike, strict: bool = True) -> nn.Module:
    """Load a weight file into ``model`` and return it; see :func:`read_state_dict` for formats.

    Keys saved from a DDP-wrapped model (``module.`` prefix) are matched automatically. With
    ``strict=True`` missing or unexpected keys raise ``ValueError``; a shape mismatch always does.

    Example:
        >>> import tempfile, os
        >>> from workbench.models import create, save_weights, load_weights
        >>> path = os.path.join(tempfile.mkdtemp(), "mlp.pt")
        >>> _ = save_weights(create("mlp", hidden=(8,)), path)
        >>> model = load_weights(create("mlp", hidden=(8,)), path)
    """
    state = read_state_dict(path)
    expected = model.state_dict()
    prefix = "module."
    if state and all(k.startswith(prefix) for k in state) and not any(k.startswith(prefix) for k in expected):
        state = {key[len(prefix):]: value for key, value in state.items()}
    missing = [key for key in expected if key not in state]
    unexpected = [key for key in state if key not in expected]
    mismatched = [
        f"{key}: file {tuple(state[key].shape)} vs model {tuple(expected[key].shape)}"
        for key in expected
        if key in state and state[key].shape != expected[key].shape
    ]
    problems = []
    if mismatched:
        problems.append(f"{len(mismatched)} shape mismatches ({_few(mismatched)})")
    if strict and missing:
        problems.append(f"{len(missing)} keys missing from the file ({_few(missing)})")
    if strict and unexpected:
        problems.append(f"{len(unexpected)} unexpected keys in the file ({_few(unexpected)})")
    if problems:
        hint = " Pass strict=False to load only the matching keys." if not mismatched else ""
        raise ValueError(
            f"weights in {str(path)!r} do not fit {type(model).__name__}: {'; '.join(problems)}.{hint}"
        )
    model.load_state_dict({k: v for k, v in state.items() if k in expected}, strict=False)
    return model


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
