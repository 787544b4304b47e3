"""Report parameter values are data, never code: the JSON-typed check and the injected parameters cell.

A value is JSON data: ``str`` (valid UTF-8 text), ``int``, finite ``float``, ``bool``, ``None``, and
``list`` / ``dict`` (string keys) of those, nested at most :data:`MAX_DEPTH` deep. Exact types only: a
tuple, set, bytes, NaN / Inf, a subclass (``numpy.float64``, an ``int`` with its own ``__format__``) or any
other object is refused with a :class:`ParameterError` naming the parameter and the place inside it.

The parameters cell papermill injects is built here, not by papermill's translator (which writes a value's
text into Python source): a str, list or dict is encoded as JSON (ASCII only) and that text is written as
one Python string literal decoded by ``json.loads`` in the cell. The literal holds only printable ASCII
whose quotes and backslashes are all escaped, so no value can end it early. An int, float, bool or None
(exact types, finite) is written as its ``repr`` — digits, ``True``, ``None``: nothing else can appear.
The cell is safe by construction.
"""
from __future__ import annotations

import json
import keyword
import math
from collections.abc import Mapping
from typing import Any

__all__ = ["ParameterError", "MAX_DEPTH", "check_value", "check_parameters", "parameters_source"]

MAX_DEPTH = 64  # nesting of lists / dicts inside one value
_DECODER = "_kd_workbench_json"  # the module alias the injected cell uses (and deletes again)
_SCALARS = (str, int, float, bool, type(None))
_MAX_INT_BITS = 13_000  # about 3,900 digits: Python refuses to turn ints of over 4,300 digits into text


class ParameterError(ValueError):
    """A report parameter with an unknown name or a value that does not fit its type (or is not JSON data)."""


def _type_name(value: Any) -> str:
    kind = type(value)
    return kind.__qualname__ if kind.__module__ == "builtins" else f"{kind.__module__}.{kind.__qualname__}"


def _short(value: Any) -> str:
    try:
        text = repr(value)
    except Exception:  # a hostile __repr__ must not hide the real error
        text = f"<{_type_name(value)} object>"
    return text if len(text) <= 80 else text[:77] + "..."


def _utf8(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _refuse(where: str, value: Any, why: str) -> ParameterError:
    return ParameterError(
        f"parameter {where} = {_short(value)} {why}; report parameters are JSON data: str, int, float "
        "(finite), bool, None, and lists or dicts with string keys of those"
    )


def check_value(name: str, value: Any, _path: str = "", _depth: int = 0) -> None:
    """Raise :class:`ParameterError` unless ``value`` is JSON data; the message names ``name[path]``.

    Example:
        >>> from workbench.reports.values import check_value
        >>> check_value("layers", ["blocks.0", {"width": 8, "scale": 0.5, "bias": None}])
        >>> check_value("layers", ["blocks.0", ("blocks.1",)])
        Traceback (most recent call last):
        ...
        workbench.reports.values.ParameterError: parameter layers[1] = ('blocks.1',) is a tuple: write a list instead; report parameters are JSON data: str, int, float (finite), bool, None, and lists or dicts with string keys of those
    """
    where = f"{name}{_path}"
    kind = type(value)
    if kind in _SCALARS:
        if kind is int and value.bit_length() > _MAX_INT_BITS:
            raise _refuse(where, f"<int of {value.bit_length()} bits>", "too large to write as text (over 4000 digits)")
        if kind is float and not math.isfinite(value):
            raise _refuse(where, value, "is not a finite number (JSON has no NaN or Infinity; use None for 'no value')")
        if kind is str and not _utf8(value):
            raise _refuse(where, value, "is not valid UTF-8 text (it holds undecodable bytes, e.g. from a non-UTF-8 "
                                        "command line or file name)")
        return
    if kind not in (list, dict):
        plain = next((base.__name__ for base in (*_SCALARS, list, dict) if isinstance(value, base)), None)
        hint = f", not a plain {plain}: pass {plain}(value)" if plain and plain != "NoneType" else ""
        if kind in (tuple, set, frozenset):
            hint = ": write a list instead"
        raise _refuse(where, value, f"is a {_type_name(value)}{hint}")
    if _depth >= MAX_DEPTH:
        raise _refuse(where, value, f"is nested deeper than {MAX_DEPTH} lists / dicts")
    if kind is list:
        for index, item in enumerate(value):
            check_value(name, item, f"{_path}[{index}]", _depth + 1)
        return
    for key, item in value.items():
        if type(key) is not str:
            raise _refuse(where, value, f"has the key {_short(key)} of type {_type_name(key)}: dict keys must be "
                                        f"strings (JSON objects have string keys), e.g. {str(key)!r}")
        if not _utf8(key):
            raise _refuse(where, value, f"has the key {_short(key)}, which is not valid UTF-8 text")
        check_value(name, item, f"{_path}[{key!r}]", _depth + 1)


def check_parameters(values: Mapping[str, Any]) -> dict[str, Any]:
    """Check every name (a Python identifier) and value (:func:`check_value`); return a deep copy.

    The copy is made through JSON, so the values papermill gets are plain and cannot change after the check.

    Example:
        >>> from workbench.reports.values import check_parameters
        >>> check_parameters({"n_samples": 64, "teacher_layers": ["blocks.0"], "weights": {"kd": 2.0}})
        {'n_samples': 64, 'teacher_layers': ['blocks.0'], 'weights': {'kd': 2.0}}
    """
    if not isinstance(values, Mapping):
        raise ParameterError(f"parameters must be a dict of name -> value, got {_type_name(values)}")
    for name, value in values.items():
        if type(name) is not str or not name.isidentifier() or keyword.iskeyword(name) or name == _DECODER:
            raise ParameterError(f"{_short(name)} is not a parameter name (a Python identifier such as 'n_samples')")
        check_value(name, value)
    return json.loads(_encode(dict(values)))


def _encode(value: Any) -> str:
    return json.dumps(value, ensure_ascii=True, allow_nan=False)


def parameters_source(values: Mapping[str, Any], comment: str = "Parameters") -> str:
    """The source of the injected parameters cell: ``name = <number, bool or None>`` or
    ``name = json.loads("<JSON>")`` (str, list, dict), one line per value.

    Example:
        >>> from workbench.reports.values import parameters_source
        >>> print(parameters_source({"student": 'vit"; import os', "n_samples": 64, "lr": 0.5, "weights": None}))
        # Parameters (text, lists and dicts as JSON decoded by json.loads: values are data, never code)
        import json as _kd_workbench_json
        student = _kd_workbench_json.loads("\\"vit\\\\\\"; import os\\"")
        n_samples = 64
        lr = 0.5
        weights = None
        del _kd_workbench_json
        <BLANKLINE>
    """
    values = check_parameters(values)
    lines = [f"# {comment} (text, lists and dicts as JSON decoded by json.loads: values are data, never code)",
             f"import json as {_DECODER}"]
    for name, value in values.items():
        if type(value) in (int, float, bool, type(None)):  # exact types, finite: repr is a plain literal
            lines.append(f"{name} = {value!r}")
            continue
        literal = json.dumps(_encode(value))  # the JSON text as a string literal: only \" and \\ escapes
        if not (literal.isascii() and literal.isprintable()):  # cannot happen: _encode is ASCII, no controls
            raise ParameterError(f"parameter {name!r} could not be encoded safely")
        lines.append(f"{name} = {_DECODER}.loads({literal})")
    lines.append(f"del {_DECODER}")
    return "\n".join(lines) + "\n"
