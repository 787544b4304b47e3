"""Saving and loading result dataclasses as standard JSON: exact float64 numbers, readable, no pickle.

A file holds ``{"type": <class name>, <field>: <value>, ...}``. Non-finite numbers are written as the
JSON strings ``"NaN"``, ``"Infinity"`` and ``"-Infinity"`` (never the non-standard bare tokens), so any
JSON reader can parse the file; arrays are nested lists. Files are written atomically
(:func:`workbench.files.write_atomic`): a full disk or a crash leaves the previous version intact.

Loading checks everything before a result exists: the file must parse, hold one JSON object of the
right ``type`` with no unknown, missing or repeated fields, and each field must pass the same checks
as the constructor (types, shapes, ranges). Any failure is a ``ValueError`` naming the file and the
field. The ``check_*`` functions below are those checks; the result classes call them in
``__post_init__``.
"""
from __future__ import annotations

import dataclasses
import json
import math
import types
import typing
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import torch

from workbench.data.arrays import checked_tensor
from workbench.files import write_atomic

ResultType = TypeVar("ResultType", bound="JsonResult")

NON_FINITE = {"NaN": math.nan, "Infinity": math.inf, "-Infinity": -math.inf}
_MAX_NESTING = 32  # deeper than any result's arrays (numpy's own limit is 64 dimensions)


def _describe(value: Any) -> str:
    text = repr(value)
    return f"{text[:60]}{'...' if len(text) > 60 else ''} ({type(value).__name__})"


def check_int(value: Any, name: str, minimum: int = 0) -> int:
    """``value`` as an ``int`` ≥ ``minimum`` (a bool or a float is refused).

    Example:
        >>> check_int(np.int64(5), "n_samples")
        5
    """
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)):
        raise TypeError(f"{name} must be a whole number, got {_describe(value)}")
    if value < minimum:
        raise ValueError(f"{name} must be at least {minimum}, got {value}")
    return int(value)


def check_float(
    value: Any, name: str, low: float = -math.inf, high: float = math.inf, *, allow_nan: bool = False
) -> float:
    """``value`` as a ``float`` in ``[low, high]`` (NaN only if ``allow_nan``; a bool is refused).

    Example:
        >>> check_float(1, "temperature", low=0.0)
        1.0
    """
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, float, np.integer, np.floating)):
        raise TypeError(f"{name} must be a number, got {_describe(value)}")
    number = float(value)
    if math.isnan(number):
        if allow_nan:
            return number
        raise ValueError(f"{name} must be a number in [{low}, {high}], got NaN")
    if not low <= number <= high:
        raise ValueError(f"{name} must be in [{low}, {high}], got {number!r}")
    return number


def check_text(value: Any, name: str) -> str:
    """``value`` if it is a ``str``.

    Example:
        >>> check_text("linear", "kernel")
        'linear'
    """
    if not isinstance(value, str):
        raise TypeError(f"{name} must be a string, got {_describe(value)}")
    return value


def check_texts(value: Any, name: str) -> list[str]:
    """``value`` as a list of strings (a list or tuple of ``str``; a single string is refused).

    Example:
        >>> check_texts(("blocks.0", "head"), "teacher_layers")
        ['blocks.0', 'head']
    """
    if not isinstance(value, (list, tuple)):
        raise TypeError(f"{name} must be a list of strings, got {_describe(value)}")
    return [check_text(item, f"{name}[{index}]") for index, item in enumerate(value)]


def check_flag(value: Any, name: str) -> bool:
    """``value`` if it is a bool (``0`` / ``1`` are refused).

    Example:
        >>> check_flag(np.True_, "debiased")
        True
    """
    if not isinstance(value, (bool, np.bool_)):
        raise TypeError(f"{name} must be true or false, got {_describe(value)}")
    return bool(value)


def check_json_dict(value: Any, name: str) -> dict:
    """A copy of ``value``: a dict with string keys holding JSON values (finite numbers, nesting ≤ 32).

    Example:
        >>> check_json_dict({"step": np.int64(3), "notes": ["a", None]}, "extra")
        {'step': 3, 'notes': ['a', None]}
    """
    if not isinstance(value, dict):
        raise TypeError(f"{name} must be a dict, got {_describe(value)}")
    return _json_value(value, name, 0)


def _json_value(value: Any, name: str, depth: int) -> Any:
    if depth > _MAX_NESTING:
        raise ValueError(f"{name} is nested more than {_MAX_NESTING} levels deep")
    if value is None or isinstance(value, (bool, str)):
        return value
    if isinstance(value, np.bool_):
        return bool(value)
    if isinstance(value, (int, np.integer)):
        return int(value)
    if isinstance(value, (float, np.floating)):
        if not math.isfinite(value):
            raise ValueError(f"{name} is {float(value)!r}: store a non-finite number as a string or None")
        return float(value)
    if isinstance(value, (list, tuple)):
        return [_json_value(item, f"{name}[{index}]", depth + 1) for index, item in enumerate(value)]
    if isinstance(value, dict):
        for key in value:
            if not isinstance(key, str):
                raise TypeError(f"{name} has a key {key!r} ({type(key).__name__}); keys must be strings")
        return {key: _json_value(item, f"{name}[{key!r}]", depth + 1) for key, item in value.items()}
    raise TypeError(f"{name} holds {_describe(value)}; only JSON values (str, number, bool, None, list, dict)")


def _numbers_from_lists(value: list | tuple, name: str) -> np.ndarray:
    """A float64 array from nested lists whose leaves are numbers (bools, strings, None refused)."""
    rectangular = f"{name} must be a rectangular array of numbers (nested lists of equal lengths)"
    try:
        array = np.asarray(value, dtype=object)
    except ValueError:
        raise ValueError(rectangular) from None
    if any(isinstance(item, (list, tuple)) for item in array.flat):
        raise ValueError(rectangular)
    for item in array.flat:
        if isinstance(item, (bool, np.bool_)) or not isinstance(item, (int, float, np.integer, np.floating)):
            raise TypeError(f"{name} must hold numbers only, found {_describe(item)}")
    try:
        return array.astype(np.float64)
    except OverflowError:
        raise ValueError(f"{name} holds a whole number too large for a float64") from None


def check_array(value: Any, name: str, ndim: int) -> np.ndarray:
    """``value`` (array, tensor or nested lists) as a float64 ``ndim``-dimensional numpy array.

    Complex, masked, non-numeric, bool and empty arrays are refused (NaN / ±Inf pass; callers check ranges).

    Example:
        >>> check_array([[1, 2.5]], "values", ndim=2)
        array([[1. , 2.5]])
    """
    if isinstance(value, (list, tuple)):
        array = _numbers_from_lists(value, name)
    elif not isinstance(value, (np.ndarray, torch.Tensor)):
        raise TypeError(f"{name} must be an array (a numpy array, a tensor or nested lists), got {_describe(value)}")
    else:
        tensor = checked_tensor(value, name).detach()
        if tensor.dtype == torch.bool:
            raise TypeError(f"{name} has dtype bool: pass numbers")
        array = tensor.cpu().to(torch.float64).numpy()
    if array.ndim != ndim:
        raise ValueError(f"{name} must be {ndim}-dimensional, got shape {list(array.shape)}")
    if array.size == 0:
        raise ValueError(f"{name} is empty: shape {list(array.shape)}")
    return array


def _to_json(value: Any) -> Any:
    if callable(getattr(value, "to_json", None)):  # a value object that writes itself (a search's Candidate)
        value = value.to_json()
    if isinstance(value, np.ndarray):
        value = value.tolist()
    if isinstance(value, float) and not math.isfinite(value):
        return "NaN" if math.isnan(value) else ("Infinity" if value > 0 else "-Infinity")
    if isinstance(value, list):
        return [_to_json(item) for item in value]
    if isinstance(value, dict):
        return {key: _to_json(item) for key, item in value.items()}
    return value


def _from_json(value: Any, name: str, depth: int = 0) -> Any:
    """Numbers back from their JSON form: the strings ``"NaN"``, ``"Infinity"``, ``"-Infinity"`` as floats."""
    if isinstance(value, str):
        return NON_FINITE.get(value, value)
    if isinstance(value, list):
        if depth > _MAX_NESTING:
            raise ValueError(f"{name} is nested more than {_MAX_NESTING} levels deep")
        return [_from_json(item, name, depth + 1) for item in value]
    return value


def _holds_numbers(hint: Any) -> bool:
    if isinstance(hint, types.UnionType):
        return float in hint.__args__
    return hint in (float, np.ndarray)


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict:
    record = {}
    for key, value in pairs:
        if key in record:
            raise ValueError(f"the field {key!r} appears more than once")
        record[key] = value
    return record


def _read_record(path: Path) -> dict:
    try:
        text = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as error:
        raise ValueError(f"{path} is not a UTF-8 JSON file (byte {error.start} cannot be decoded)") from None
    try:
        record = json.loads(text, object_pairs_hook=_unique_keys)
    except json.JSONDecodeError as error:
        raise ValueError(f"{path} is not valid JSON (truncated or damaged?): {error}") from None
    except RecursionError:
        raise ValueError(f"{path} nests its JSON too deeply to be a result file") from None
    except ValueError as error:  # a repeated field, or an integer with too many digits
        raise ValueError(f"{path} is not a valid result file: {error}") from None
    if not isinstance(record, dict):
        raise ValueError(f"{path} does not hold a result (a JSON object), it holds a {type(record).__name__}")
    return record


class JsonResult:
    """Mixin for result dataclasses: ``.save(path)`` and ``Class.load(path)`` (see the module docstring)."""

    def save(self, path: str | Path) -> Path:
        """Write the result as standard JSON, atomically; returns the path.

        Example:
            >>> import tempfile, pathlib
            >>> from workbench.similarity import CKAResult
            >>> result = CKAResult(np.array([[np.nan, 0.5]]), ["t"], ["s1", "s2"], n_samples=10)
            >>> path = result.save(pathlib.Path(tempfile.mkdtemp()) / "cka.json")
            >>> json.loads(path.read_text())["values"]
            [['NaN', 0.5]]
        """
        record = {item.name: _to_json(getattr(self, item.name)) for item in dataclasses.fields(self)}
        text = json.dumps({"type": type(self).__name__, **record}, indent=1, allow_nan=False)
        return write_atomic(Path(path), text + "\n")

    @classmethod
    def load(cls: type[ResultType], path: str | Path) -> ResultType:
        """Read a result that :meth:`save` wrote; anything else is a ``ValueError`` naming the file and field.

        Example:
            >>> import tempfile, pathlib
            >>> from workbench.similarity import CKAResult
            >>> path = pathlib.Path(tempfile.mkdtemp()) / "cka.json"
            >>> CKAResult.load(CKAResult(np.array([[0.5]]), ["t"], ["s"], n_samples=10).save(path)).values
            array([[0.5]])
        """
        path = Path(path)
        record = _read_record(path)
        found = record.pop("type", None)
        if found != cls.__name__:
            raise ValueError(f"{path} does not hold a {cls.__name__} (its type field is {found!r})")
        fields = {item.name: item for item in dataclasses.fields(cls)}
        unknown = sorted(set(record) - set(fields))
        if unknown:
            raise ValueError(f"{path}: unknown field(s) {unknown} for a {cls.__name__}; expected {sorted(fields)}")
        missing = sorted(
            name for name, item in fields.items()
            if name not in record
            and item.default is dataclasses.MISSING and item.default_factory is dataclasses.MISSING
        )
        if missing:
            raise ValueError(f"{path}: missing field(s) {missing} for a {cls.__name__}")
        hints = typing.get_type_hints(cls)
        try:
            values = {
                name: _from_json(value, name) if _holds_numbers(hints[name]) else value
                for name, value in record.items()
            }
            return cls(**values)
        except (TypeError, ValueError) as error:
            raise ValueError(f"{path} is not a valid {cls.__name__} file: {error}") from None
