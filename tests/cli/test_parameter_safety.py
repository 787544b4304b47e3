"""Report parameters are data, never code: injection through every parameter type, nested values and dict
keys, through the CLI and the Python API, on a tiny notebook that writes what it received to a JSON file.

Each payload would create a marker file if it ran; every test asserts that no marker exists and that the
safe values arrive exactly (``repr`` in the kernel equals ``repr`` here: no tuple/list or int/float drift).
"""
from __future__ import annotations

import json
import math

import nbformat
import pytest

from workbench import cli, reports

PARAMETERS_CELL = """\
from typing import Optional
text: str = "plain"  # a str
count: int = 1  # an int
ratio: float = 0.5  # a float
flag: bool = False  # a bool
maybe: Optional[str] = None  # an optional str
items: list = []  # a list
table: dict = {}  # a dict
received: str = "received.json"  # where the kernel writes what it got
"""

RECORD_CELL = """\
import json as _json
_names = ["text", "count", "ratio", "flag", "maybe", "items", "table"]
with open(received, "w", encoding="utf-8") as _file:
    _json.dump({_name: repr(globals()[_name]) for _name in _names}, _file)
"""


@pytest.fixture
def probe(tmp_path):
    """A notebook with one parameter of each type; returns (notebook path, marker path, received path)."""
    notebook = tmp_path / "probe.ipynb"
    cells = [nbformat.v4.new_code_cell(PARAMETERS_CELL, metadata={"tags": ["parameters"]}),
             nbformat.v4.new_code_cell(RECORD_CELL)]
    kernelspec = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nbformat.write(nbformat.v4.new_notebook(cells=cells, metadata={"kernelspec": kernelspec}), str(notebook))
    return notebook, tmp_path / "PWNED", tmp_path / "received.json"


def payloads(marker) -> list[str]:
    """Strings that run ``touch marker`` if they ever reach Python source unescaped."""
    touch = f"__import__('pathlib').Path({str(marker)!r}).touch()"
    return [
        f'"; {touch} #',
        f'\\"; {touch} #',  # a backslash before the quote: papermill's escaping only adds one
        f"'; {touch} #",
        f'"""; {touch} #',
        f"\n{touch}\n",
        f"\r{touch}\r",
        f"\u2028{touch}",
        f"\\\n{touch}",
        "{pm.run_uuid}{0}{text.__class__}",  # str.format fields (papermill formats paths with parameters)
        f"\x00\x1b[31m\U0001F600 ünïcödé {touch}",
    ]


def read_received(path) -> dict[str, str]:
    return json.loads(path.read_text(encoding="utf-8"))


def expected(values: dict) -> dict[str, str]:
    defaults = {"text": "plain", "count": 1, "ratio": 0.5, "flag": False, "maybe": None, "items": [], "table": {}}
    return {name: repr(value) for name, value in {**defaults, **values}.items()}


def test_hostile_strings_in_every_parameter_arrive_as_data_through_the_api(probe, tmp_path):
    notebook, marker, received = probe
    strings = payloads(marker)
    values = {
        "text": strings[0], "maybe": strings[1], "count": -2**70, "ratio": -0.0, "flag": True,
        "items": strings + [1, 2.5, True, None, [strings[3], {"k": strings[4]}]],
        "table": {key: {"nested": [value, {value: key}]} for key, value in zip(strings, reversed(strings))},
    }
    reports.run_report(str(notebook), {**values, "received": str(received)}, tmp_path / "out")
    assert not marker.exists(), "a parameter value ran as code"
    assert read_received(received) == expected(values)


def test_hostile_strings_in_every_parameter_arrive_as_data_through_the_cli(probe, tmp_path):
    notebook, marker, received = probe
    strings = payloads(marker)[:8]
    items = [strings[2], [strings[3]], {strings[4]: strings[5]}]
    table = {strings[6]: [strings[7], 3, None], "plain": {"deeper": [strings[0]]}}
    argv = ["report", str(notebook), "-o", str(tmp_path / "out"), "-p", "received", str(received),
            "-p", "text", strings[0], "-p", "maybe", strings[1], "-p", "count", "7", "-p", "ratio", "1e-300",
            "-p", "flag", "yes", "-p", "items", json.dumps(items), "-p", "table", json.dumps(table)]
    assert cli.main(argv) == cli.EXIT_OK
    assert not marker.exists(), "a parameter value ran as code"
    assert read_received(received) == expected(
        {"text": strings[0], "maybe": strings[1], "count": 7, "ratio": 1e-300, "flag": True, "items": items,
         "table": table})


def _touch(marker) -> str:
    return f'__import__("pathlib").Path("{marker}").touch()'  # double quotes only: survives repr() intact


@pytest.mark.parametrize("literal", [
    "[('\"]; {touch}; _=[\"',)]",  # the tuple of the issue: accepted by the old literal fallback, injected raw
    "[{{'a': ('\"]; {touch}; _=[\"',)}}]",
    "[{{'\"]; {touch}; _=[\"'}}]",
    "{{1: '\"]; {touch}; _=[\"'}}",
])
def test_python_literals_holding_tuples_sets_or_int_keys_are_refused_by_the_cli(probe, tmp_path, capsys, literal):
    notebook, marker, received = probe
    name = "table" if literal.startswith("{") else "items"
    argv = ["report", str(notebook), "-o", str(tmp_path / "out"), "-p", "received", str(received),
            "-p", name, literal.format(touch=_touch(marker))]
    assert cli.main(argv) == cli.EXIT_USAGE
    err = capsys.readouterr().err
    assert name in err and "Traceback" not in err
    assert not marker.exists() and not received.exists() and not (tmp_path / "out").exists()


class _Sneaky(int):
    """An int whose text is code: papermill's translator writes ``f'{value}'`` into the cell."""

    marker = ""

    def __format__(self, spec: str) -> str:
        return f"1; {_touch(self.marker)}"

    __str__ = __repr__ = lambda self: format(self)  # noqa: E731


class _Object:
    """An object whose text closes the string papermill puts it in."""

    def __init__(self, text: str) -> None:
        self.text = text

    def __str__(self) -> str:
        return self.text

    __repr__ = __str__


# ``escape`` closes the brackets and quotes papermill wraps the value in: '"]; <touch>; _=["'
@pytest.mark.parametrize("name, make_value, where", [
    ("items", lambda escape: [(escape,)], "items[0]"),
    ("items", lambda escape: [1, [2, {"a": {escape}}]], "items[1][1]['a']"),
    ("table", lambda escape: {1: escape}, "table"),
    ("table", lambda escape: {"k": [escape.encode()]}, "table['k'][0]"),
    ("text", lambda escape: _Object(escape.replace("]", "")), "text"),
    ("count", lambda escape: _Sneaky(1), "count"),
    ("ratio", lambda escape: math.nan, "ratio"),
    ("ratio", lambda escape: [math.inf], "ratio[0]"),
    ("table", lambda escape: {"x": {"y": -math.inf}}, "table['x']['y']"),
    ("text", lambda escape: "\udcff" + escape, "text"),
    ("table", lambda escape: {"\udcff": 1}, "table"),
])
def test_the_api_refuses_values_that_are_not_json_data_before_anything_runs(probe, tmp_path, name, make_value,
                                                                          where):
    notebook, marker, received = probe
    _Sneaky.marker = str(marker)
    value = make_value(f'"]; {_touch(marker)}; _=["')
    with pytest.raises(reports.ParameterError) as info:
        reports.run_report(str(notebook), {name: value, "received": str(received)}, tmp_path / "out")
    assert where in str(info.value)
    assert not marker.exists() and not received.exists() and not (tmp_path / "out").exists()
