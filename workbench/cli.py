"""The ``kd-workbench`` command: run parameterized report notebooks headless and list them.

Example:
    $ kd-workbench report --list
    $ kd-workbench report gap -p n_samples=1000 -p student vit --output-dir reports
"""
from __future__ import annotations

import argparse
import ast
import contextlib
import json
import math
import os
import re
import shlex
import signal
import sys
from collections.abc import Iterator, Sequence
from typing import Any

from workbench import __version__, reports
from workbench.reports import declarations
from workbench.reports.progress_line import ProgressPrinter

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2
_TRUE, _FALSE, _NONE = {"true", "yes", "on", "1"}, {"false", "no", "off", "0"}, {"none", "null"}
_JSON_EXAMPLES = {list: '\'["blocks.0", "blocks.2"]\'', dict: '\'{"widths": [8, 16]}\''}

_REPORT_EPILOG = """\
parameters:
  -p key=value or -p key value, repeatable. Values are cast to the type in the notebook's parameters
  cell: 1000 -> int, 2.5 -> float (finite: no nan/inf), true/false -> bool, none -> None (optional
  parameters), text -> str, JSON for lists and dicts (-p teacher_layers '["blocks.0", "blocks.2"]',
  -p weights '{"kd": 2.0}'). Values are data, never code: only JSON types are accepted (str, int,
  float, bool, None, lists, dicts with string keys, nested); Python literals such as ['a'] are read
  only when they mean the same JSON (no tuples, sets, bytes or non-string keys). Arguments must be
  UTF-8 text. Unknown names and values of the wrong type stop the run before anything executes.
  `kd-workbench report NAME --help` lists NAME's parameters.

output:
  <output-dir>/<name>/<run-id>/report.ipynb and report.html (run-id: time stamp + parameter hash).
  The HTML opens offline (plotly.js embedded). A file a report writes outside its run folder
  (distill: -p results_table=FILE.md) must end in .md and is never replaced unless you pass --force
  (or -p overwrite_results=true); this is checked before the run starts.
  While it runs, stderr shows the cell running (i/N and its heading), the training run (method, seed,
  epoch e/E) and an estimate of the time left: one updating line on a terminal, one line per cell,
  run and epoch otherwise (a log); -q/--quiet turns it off.
  Exit status: 0 done, 1 a cell failed (the partial notebook is kept and its path printed),
  2 bad arguments (nothing ran), 128+N stopped by signal N (130 Ctrl-C, 143 SIGTERM; the kernel is
  shut down, the partial notebook's path printed).

examples:
  kd-workbench report --list
  kd-workbench report gap
  kd-workbench report gap -p n_samples=1000 -p student=vit
  kd-workbench report gap -p debiased false -p teacher_weights runs/teacher.safetensors
"""


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of ``kd-workbench`` (sub-command ``report``).

    Example:
        >>> from workbench.cli import build_parser
        >>> build_parser().parse_args(["report", "gap", "-p", "n_samples=64"]).parameters
        [['n_samples=64']]
    """
    parser = argparse.ArgumentParser(
        prog="kd-workbench",
        description="KD Workbench: see, close and report the gap between a teacher and a student network.",
        epilog="Run `kd-workbench report --help` for the reports.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    report = commands.add_parser(
        "report",
        add_help=False,  # our --help also lists the named report's parameters
        help="run a parameterized report notebook with papermill and render it to HTML",
        description="Run a report notebook headless (papermill, this interpreter's kernel) and render it to HTML.",
        epilog=_REPORT_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    report.add_argument(
        "name", nargs="?", metavar="NAME", help=f"a report ({', '.join(reports.REPORTS)}) or an .ipynb path"
    )
    report.add_argument("-h", "--help", action="store_true", help="show this help (and NAME's parameters) and exit")
    report.add_argument("-l", "--list", action="store_true", help="list the reports with their parameters and exit")
    report.add_argument(
        "-p", "--parameter", dest="parameters", action="append", nargs="+", default=[], metavar="KEY[=VALUE] [VALUE]",
        help="set a notebook parameter: -p key=value or -p key value (repeatable)",
    )
    report.add_argument("-o", "--output-dir", default="reports", help="where runs are written (default: ./reports)")
    report.add_argument("-f", "--force", action="store_true",
                        help="let the report replace existing output files it is given (results_table)")
    report.add_argument("--progress", action="store_true",
                        help="show papermill's per-cell progress bar instead of the workbench's progress line")
    report.add_argument("-q", "--quiet", action="store_true",
                        help="no progress (by default stderr shows the cell, the training run and the time left)")
    report.set_defaults(report_parser=report)
    return parser


def parse_parameters(items: Sequence[Sequence[str]]) -> dict[str, str]:
    """Turn ``-p`` groups (``["k=v"]`` or ``["k", "v"]``) into ``{key: text}``; raises ``ParameterError``.

    Example:
        >>> from workbench.cli import parse_parameters
        >>> parse_parameters([["n_samples=1000"], ["student", "vit"]])
        {'n_samples': '1000', 'student': 'vit'}
    """
    parsed: dict[str, str] = {}
    for item in items:
        if len(item) == 1 and "=" in item[0]:
            key, value = item[0].split("=", 1)
        elif len(item) == 2 and "=" not in item[0]:
            key, value = item
        else:
            raise reports.ParameterError(
                f"-p {' '.join(item)}: write -p key=value or -p key value (one parameter per -p; "
                "quote values with spaces)"
            )
        key = key.strip()
        if not key.isidentifier():
            raise reports.ParameterError(f"-p {' '.join(item)}: {key!r} is not a parameter name")
        if key in parsed:
            raise reports.ParameterError(f"parameter {key!r} is given twice ({parsed[key]!r} and {value!r})")
        parsed[key] = value
    return parsed


def _split_type(type_name: str) -> tuple[list[str], bool]:
    """``"Optional[int]"`` -> (["int"], True); ``"Union[str, list]"`` -> (["str", "list"], False)."""
    text = type_name.replace(" ", "")
    outer = re.fullmatch(r"(Optional|Union)\[(.*)\]", text)
    if not outer:
        return [re.sub(r"\[.*\]$", "", text).lower()], False
    parts = [re.sub(r"\[.*\]$", "", part) for part in re.split(r",(?![^\[]*\])", outer[2])]
    nullable = outer[1] == "Optional" or "None" in parts
    return [p.lower() for p in parts if p != "None"], nullable


def _cast_one(raw: str, base: str, example: str | None = None) -> Any:
    if base == "bool":
        if raw.lower() in _TRUE | _FALSE:
            return raw.lower() in _TRUE
        raise ValueError("use true or false")
    if base == "int":
        if not re.fullmatch(r"[+-]?\d+", raw.strip()):
            raise ValueError("not a whole number")
        return int(raw)
    if base == "float":
        value = float(raw)
        if not math.isfinite(value):
            raise ValueError("not a finite number (no nan or inf)")
        return value
    if base in ("list", "tuple", "dict"):
        wanted = dict if base == "dict" else list
        value = _json_or_literal(raw)
        if not isinstance(value, wanted):
            shown = shlex.quote(example) if example and example[:1] in "[{" else _JSON_EXAMPLES[wanted]
            raise ValueError(f"write it as JSON, e.g. {shown} (strings in double quotes)")
        return value
    return raw  # str, and types we do not know: the text as given


def _json_or_literal(raw: str) -> Any:
    """JSON, else a Python literal (['a', 'b']) that is the same JSON data; None when neither parses."""
    try:
        return json.loads(raw)  # NaN / Infinity parse here and are refused by the JSON-data check
    except (json.JSONDecodeError, RecursionError):
        pass
    try:
        return ast.literal_eval(raw)
    except (ValueError, TypeError, SyntaxError, MemoryError, RecursionError):
        return None


def cast_parameter(name: str, raw: str, type_name: str, default: Any, example: str | None = None) -> Any:
    """Cast the command-line text ``raw`` to the parameter's type (annotation first, else the default's).

    ``"true"/"false"`` become bools, whole numbers ints, ``"none"`` None for optional parameters, and
    lists/dicts are read as JSON. A value that does not fit raises :class:`ParameterError`, suggesting
    ``example`` (JSON text of a good value of this parameter, from its declaration) for a list or dict.

    Example:
        >>> from workbench.cli import cast_parameter
        >>> cast_parameter("debiased", "false", "bool", True), cast_parameter("w", "none", "Optional[str]", None)
        (False, None)
    """
    bases, nullable = _split_type(type_name)
    if bases in (["none"], [""]):  # no annotation: the default's type decides
        bases, nullable = ([type(default).__name__], False) if default is not None else (["json"], True)
    if nullable and raw.strip().lower() in _NONE:
        return None
    if bases == ["json"]:
        try:
            value = json.loads(raw)
        except (json.JSONDecodeError, RecursionError):
            return raw
        reports.check_parameters({name: value})
        return value
    reasons = []
    for base in sorted(bases, key=lambda b: b == "str"):  # str accepts anything: try it last
        try:
            value = _cast_one(raw, base, example)
        except ValueError as error:
            reasons.append(str(error))
            continue
        reports.check_parameters({name: value})  # a list holding a tuple is refused, not read as text
        return value
    expected = type_name if type_name not in ("None", "") else type(default).__name__
    raise reports.ParameterError(
        f"parameter {name!r} expects {expected} (default {default!r}), got {raw!r}: {'; '.join(reasons)}"
    )


def validate_parameters(report: str, raw: dict[str, str]) -> dict[str, Any]:
    """Check the names in ``raw`` (text from the command line), cast each value to its parameter's type and
    check it against the report's declaration (choices, ranges, ...; the model checks follow in ``run_report``).

    Example:
        >>> from workbench.cli import validate_parameters
        >>> validate_parameters("gap", {"n_samples": "64", "debiased": "false"})
        {'n_samples': 64, 'debiased': False}
    """
    specs = reports.check_names(report, raw)
    values = {name: cast_parameter(name, text, specs[name]["type"], specs[name]["default"],
                                   declarations.example(report, name))
              for name, text in raw.items()}
    values = reports.check_parameters(values)
    declarations.check_values(report, {**{key: spec["default"] for key, spec in specs.items()}, **values})
    return values


def format_parameters(name: str) -> str:
    """One line per parameter of report ``name``: name, type, default, allowed values and help.

    Example:
        >>> from workbench.cli import format_parameters
        >>> "n_samples" in format_parameters("gap")
        True
    """
    specs = reports.report_parameters(name)
    rows = [(key, spec["type"], repr(spec["default"]), declarations.allowed(name, key), spec["help"])
            for key, spec in specs.items()]
    headers = ("name", "type", "default", "allowed")
    widths = [max([len(header)] + [len(row[i]) for row in rows]) for i, header in enumerate(headers)]
    return "\n".join(
        "    " + "  ".join(f"{cell:<{width}}" for cell, width in zip(row, widths)) + f"  {row[-1]}".rstrip()
        for row in [(*headers, "help"), *rows]
    )


def format_report_list() -> str:
    """Every registered report: name, description, notebook path, and its parameters table."""
    blocks = []
    for report in reports.REPORTS.values():
        blocks.append(f"{report.name}: {report.description}\n  notebook: {report.notebook}\n"
                      f"  parameters:\n{format_parameters(report.name)}")
    return "\n\n".join(blocks)


def _log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def _report(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    if args.help:
        print(parser.format_help())
        if args.name:
            print(f"parameters of {args.name!r}:\n{format_parameters(args.name)}")
        return EXIT_OK
    if args.list:
        print(format_report_list())
        return EXIT_OK
    if not args.name:
        parser.print_usage(sys.stderr)
        print("kd-workbench report: error: name a report first: kd-workbench report NAME -p key=value ... "
              "(kd-workbench report --list shows them)", file=sys.stderr)
        return EXIT_USAGE
    values = validate_parameters(args.name, parse_parameters(args.parameters))
    printer = None if args.quiet or args.progress else ProgressPrinter(sys.stderr)
    try:
        with _signals_as_interrupts(), _closing(printer):
            run = reports.run_report(args.name, values, args.output_dir, overwrite=args.force,
                                     progress=args.progress, log=_log, on_event=printer)
    except reports.ReportInterrupted as interrupted:
        print(f"error: {interrupted}", file=sys.stderr)
        if interrupted.notebook is not None:
            print(f"partial notebook: {interrupted.notebook}", file=sys.stderr)
        return 128 + interrupted.signal_number
    except _Signalled as signalled:  # after the notebook ran (while its HTML was written)
        print(f"error: report {args.name!r} stopped by {signalled}", file=sys.stderr)
        return 128 + signalled.signal_number
    except reports.ReportFailed as failure:
        print(f"error: {failure}", file=sys.stderr)
        if failure.notebook is not None:
            print(f"partial notebook: {failure.notebook}", file=sys.stderr)
        if failure.html is not None:
            print(f"partial HTML: {failure.html}", file=sys.stderr)
        return EXIT_FAILED
    print(f"report {args.name!r} done in {run.seconds:.0f} s")
    print(f"notebook: {run.notebook}")
    print(f"html:     {run.html}")
    return EXIT_OK


@contextlib.contextmanager
def _closing(printer: ProgressPrinter | None) -> Iterator[None]:
    """End the progress line however the run ends, so messages after it start on their own line."""
    try:
        yield
    finally:
        if printer is not None:
            printer.close()


class _Signalled(KeyboardInterrupt):
    """SIGTERM / SIGHUP / SIGINT turned into an exception, so the kernel is shut down on the way out."""

    def __init__(self, signal_number: int) -> None:
        super().__init__(signal.Signals(signal_number).name)
        self.signal_number = signal_number


@contextlib.contextmanager
def _signals_as_interrupts() -> Iterator[None]:
    """While a report runs, SIGINT, SIGTERM and SIGHUP raise :class:`_Signalled` once; a repeat is ignored
    while the kernel shuts down. Signals set to be ignored (``nohup``) stay ignored; off the main thread
    nothing changes."""
    def interrupt(number: int, frame: Any) -> None:
        for name in names:
            signal.signal(name, signal.SIG_IGN)
        _log(f"kd-workbench: {signal.Signals(number).name} received: stopping the report and its kernel")
        raise _Signalled(number)

    names, previous = [], {}
    with contextlib.suppress(ValueError):  # not the main thread
        for name in (signal.SIGINT, signal.SIGTERM, getattr(signal, "SIGHUP", None)):
            if name is not None and signal.getsignal(name) not in (signal.SIG_IGN, None):
                previous[name] = signal.signal(name, interrupt)
                names.append(name)
    try:
        yield
    finally:
        for name, handler in previous.items():
            signal.signal(name, handler)


def _undecodable(argv: Sequence[str]) -> str | None:
    """A message for the first argument that is not UTF-8 (Python keeps its bytes as surrogates), or None."""
    for position, argument in enumerate(argv, 1):
        try:
            argument.encode("utf-8")
        except UnicodeEncodeError:
            return (f"argument {position} ({argument!r}, bytes {os.fsencode(argument)!r}) is not valid UTF-8 text; "
                    "give parameter values, names and paths in UTF-8")
    return None


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``kd-workbench``; returns the exit status (0 done, 1 report failed, 2 bad arguments).

    Example:
        >>> from workbench.cli import main
        >>> main(["report", "gap", "-p", "n_sample=10"])  # doctest: +SKIP
        2
    """
    argv = sys.argv[1:] if argv is None else list(argv)
    problem = _undecodable(argv)
    if problem is not None:
        print(f"kd-workbench: error: {problem}", file=sys.stderr)
        return EXIT_USAGE
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command != "report":
        parser.print_help(sys.stderr)
        return EXIT_USAGE
    try:
        return _report(args, args.report_parser)
    except (reports.ParameterError, reports.OutputError) as error:
        print(f"kd-workbench report: error: {error}", file=sys.stderr)
        return EXIT_USAGE


if __name__ == "__main__":
    sys.exit(main())
