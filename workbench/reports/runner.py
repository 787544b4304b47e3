"""Parameterized reports: the registry, parameter checking, the papermill runner and the offline HTML export.

A report is a notebook under ``notebooks/`` whose first code cell is tagged ``parameters``. Running one
checks every parameter against that cell (names and types) *before* anything executes, runs the
notebook with papermill on a kernel of the current interpreter (nothing to register), and writes
``<output_dir>/<name>/<run-id>/report.ipynb`` and ``report.html`` (plotly.js embedded, no CDN).
papermill and nbconvert are imported only inside the functions that need them.

Parameter values are JSON data, checked before anything runs, and injected as JSON text that the cell
decodes (:mod:`workbench.reports.values`): no value is ever written into the notebook as Python source.
Output files a report writes (``results_table``) are checked before the run too: the right suffix, and an
existing file is replaced only when asked (``overwrite=True``). An interrupted run (Ctrl-C, SIGTERM raised
as ``KeyboardInterrupt``) stops the kernel and removes its connection file (it holds the kernel's key).

Example:
    >>> from workbench import reports
    >>> reports.report_parameters("gap")["n_samples"]["default"]
    450
"""
from __future__ import annotations

import ast
import contextlib
import difflib
import hashlib
import json
import os
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from workbench.files import write_atomic
from workbench.reports.declarations import check_values
from workbench.reports.kernel import REPORT_ENV, execute_notebook
from workbench.reports.values import ParameterError, check_parameters

__all__ = [
    "REPORTS", "Report", "ReportRun", "ParameterError", "OutputError", "ReportFailed", "ReportInterrupted",
    "get_report", "report_parameters", "check_names", "check_outputs", "run_report", "execute_notebook",
    "export_html", "REPORT_ENV",
]

NOTEBOOKS_DIR = Path(__file__).resolve().parents[2] / "notebooks"
@dataclass(frozen=True)
class Report:
    """A registered report: a name, its notebook and a one-line description.

    ``output_files``: ``(parameter, suffix)`` pairs naming parameters that are paths of files the notebook
    writes (checked before the run); ``overwrite_parameter``: the notebook's bool parameter that lets it
    replace them (set by ``run_report(..., overwrite=True)``).
    """

    name: str
    notebook: Path
    description: str = ""
    output_files: tuple[tuple[str, str], ...] = ()
    overwrite_parameter: str | None = None


REPORTS: dict[str, Report] = {
    "gap": Report(
        "gap",
        NOTEBOOKS_DIR / "teacher_student_gap.ipynb",
        "teacher vs student: layer-by-layer CKA heatmap, best matches, prediction agreement, KL, accuracy",
    ),
    "distill": Report(
        "distill",
        NOTEBOOKS_DIR / "distill_compare.ipynb",
        "student alone vs KD, DKD, FitNet, RKD, CKA loss over seeds: accuracy table, learning curves, CKA before/after",
        output_files=(("results_table", ".md"),),
        overwrite_parameter="overwrite_results",
    ),
    "ofa": Report(
        "ofa",
        NOTEBOOKS_DIR / "ofa_kd.ipynb",
        "OFA-KD vs KD and FitNet on heterogeneous pairs (ViT -> CNN, CNN -> ViT, CNN -> MLP-Mixer): accuracy "
        "table, branch accuracy per stage, CKA before/after, learning curves",
        output_files=(("results", ".md"),),
        overwrite_parameter="overwrite_results",
    ),
    "diswot": Report(
        "diswot",
        NOTEBOOKS_DIR / "diswot_search.ipynb",
        "DisWOT validated: training-free scores (DisWOT, its terms, NWOT, SNIP, GradNorm, size) ranked against the "
        "distilled accuracy of every candidate student (Kendall tau with bootstrap CIs)",
        output_files=(("results", ".md"),),
        overwrite_parameter="overwrite_results",
    ),
    "dt": Report(
        "dt",
        NOTEBOOKS_DIR / "dt_visualization.ipynb",
        "Diffusion Target visualization on a tiny digits DDPM: x̂0 at every step, base vs progressively distilled "
        "vs hybrid (diversity distillation) vs an unguided-student control: DT strip, commitment curves, "
        "diversity, Fréchet distance, accuracy, cost",
        output_files=(("results", ".md"),),
        overwrite_parameter="overwrite_results",
    ),
}


class OutputError(ValueError):
    """An output path that cannot be used: a file where a folder is wanted, an existing file not to be
    replaced, a wrong suffix, an unwritable place. Raised before anything runs."""


@dataclass
class ReportFailed(RuntimeError):
    """A run failed; the partial notebook and its HTML are kept at ``notebook`` / ``html`` (None if not written)."""

    notebook: Path | None
    html: Path | None
    message: str

    def __str__(self) -> str:
        return self.message


class ReportInterrupted(KeyboardInterrupt):
    """A run stopped by Ctrl-C or a signal: the kernel was shut down; ``notebook`` is the partial notebook
    (None if none was written) and ``signal_number`` the signal (``signal.SIGINT`` for Ctrl-C)."""

    def __init__(self, message: str, notebook: Path | None, signal_number: int) -> None:
        super().__init__(message)
        self.notebook, self.signal_number = notebook, signal_number


@dataclass
class ReportRun:
    """Where a finished run wrote its files, and the parameters it ran with."""

    run_dir: Path
    notebook: Path
    html: Path | None
    parameters: dict[str, Any] = field(default_factory=dict)
    seconds: float = 0.0


def get_report(name: str) -> Report:
    """A registered report by name, or any notebook by path (``.ipynb``).

    Example:
        >>> from workbench.reports import get_report
        >>> get_report("gap").notebook.name
        'teacher_student_gap.ipynb'
    """
    if name in REPORTS:
        return REPORTS[name]
    _check_text("the report name", name, ParameterError)
    if name.endswith(".ipynb") and Path(name).is_file():
        return Report(Path(name).stem, Path(name).resolve())
    close = difflib.get_close_matches(name, list(REPORTS), n=1)
    hint = f" Did you mean {close[0]!r}?" if close else ""
    raise ParameterError(f"unknown report {name!r}.{hint} Reports: {', '.join(REPORTS)} (or a path to an .ipynb)")


def report_parameters(report: Report | str) -> dict[str, dict[str, Any]]:
    """The report's parameters cell: ``{name: {"type", "default", "help"}}``, defaults as Python values.

    Example:
        >>> from workbench.reports import report_parameters
        >>> report_parameters("gap")["n_samples"]["type"]
        'int'
    """
    import papermill

    report = get_report(report) if isinstance(report, str) else report
    found = papermill.inspect_notebook(str(report.notebook))
    return {
        name: {"type": spec["inferred_type_name"], "default": _literal(spec["default"]), "help": spec["help"]}
        for name, spec in found.items()
    }


def _literal(source: str) -> Any:
    try:
        return ast.literal_eval(source)
    except (ValueError, SyntaxError):
        return source  # an expression papermill cannot evaluate either; shown as written


def check_names(report: Report | str, names: Any) -> dict[str, dict[str, Any]]:
    """Raise :class:`ParameterError` (naming the closest) unless every name is a report parameter.

    Returns the report's parameter specs (see :func:`report_parameters`).

    Example:
        >>> from workbench.reports import check_names
        >>> "n_samples" in check_names("gap", ["n_samples"])
        True
    """
    specs = report_parameters(report)
    for name in names:
        if name not in specs:
            close = difflib.get_close_matches(name, list(specs), n=1, cutoff=0.5)
            hint = f" Did you mean {close[0]!r}?" if close else ""
            raise ParameterError(f"unknown parameter {name!r}.{hint} Parameters: {', '.join(specs)}")
    return specs


def _check_text(what: str, text: Any, error: type[Exception]) -> None:
    try:
        str(text).encode("utf-8")
    except UnicodeEncodeError:
        raise error(f"{what} {str(text)!r} is not valid UTF-8 (bytes {os.fsencode(str(text))!r}); "
                    "give it as UTF-8 text") from None


def check_outputs(report: Report | str, values: dict[str, Any], *, overwrite: bool = False) -> None:
    """Raise :class:`OutputError` if a file the report will write (``report.output_files``) has the wrong
    suffix, sits where no folder can be, or exists and may not be replaced.

    A file may be replaced when ``overwrite`` is true or the report's ``overwrite_parameter`` is true in
    ``values``. Relative paths are relative to the current folder, as in the report's kernel.

    Example:
        >>> from workbench.reports import check_outputs
        >>> check_outputs("distill", {"results_table": "table.txt"})
        Traceback (most recent call last):
        ...
        workbench.reports.runner.OutputError: results_table must be a Markdown file ending in .md, got 'table.txt'
    """
    report = get_report(report) if isinstance(report, str) else report
    replace = overwrite or bool(report.overwrite_parameter and values.get(report.overwrite_parameter))
    for name, suffix in report.output_files:
        path = values.get(name)
        if not path:
            continue
        _check_text(name, path, OutputError)
        path = Path(path)
        if path.suffix != suffix:
            raise OutputError(f"{name} must be a {'Markdown ' if suffix == '.md' else ''}file ending in {suffix}, "
                              f"got {str(path)!r}")
        if path.is_dir():
            raise OutputError(f"{name} {str(path)!r} is a folder; give a file name ending in {suffix}")
        blocking = next((parent for parent in path.parents if parent.exists()), None)
        if blocking is not None and not blocking.is_dir():
            raise OutputError(f"{name} {str(path)!r}: {str(blocking)!r} is a file, not a folder")
        if path.exists() and not replace:
            how = f"-p {report.overwrite_parameter}=true or " if report.overwrite_parameter else ""
            raise OutputError(f"{name} {str(path)!r} exists and is not replaced unless asked: pass {how}--force "
                              "(Python: run_report(..., overwrite=True)), or give another file name")


def _run_id(parameters: dict[str, Any]) -> str:
    digest = hashlib.sha256(json.dumps(parameters, sort_keys=True).encode()).hexdigest()[:8]
    return f"{time.strftime('%Y%m%d-%H%M%S')}-{digest}"


def _make_run_dir(output_dir: str | os.PathLike, report: Report, values: dict[str, Any]) -> Path:
    """A new, empty ``<output_dir>/<name>/<run-id>`` with ``parameters.json``; :class:`OutputError` if it
    cannot be made (a file in the way, no permission, a full disk)."""
    _check_text("output_dir", output_dir, OutputError)
    output = Path(output_dir)
    blocking = next((folder for folder in (output, *output.parents) if folder.exists()), None)
    if blocking is not None and not blocking.is_dir():
        where = "" if blocking == output else f": {str(blocking)!r}"
        raise OutputError(f"output_dir {str(output)!r}{where} is a file, not a folder; give a folder (it is "
                          "created if missing), e.g. -o reports")
    run_dir = output / report.name / _run_id(values)
    suffix = 1
    while run_dir.exists():  # two runs with the same parameters in the same second
        run_dir, suffix = run_dir.with_name(f"{run_dir.name.split('.')[0]}.{suffix}"), suffix + 1
    try:
        run_dir.mkdir(parents=True)
        write_atomic(run_dir / "parameters.json", json.dumps(values, indent=2) + "\n")
    except OSError as error:
        with contextlib.suppress(OSError):
            run_dir.rmdir()
        raise OutputError(f"cannot write the run folder {str(run_dir)!r}: {error.strerror or error}") from error
    return run_dir


def _partial(notebook: Path) -> Path | None:
    """``notebook`` if it holds a readable notebook; an empty or truncated one is removed (None)."""
    import nbformat

    if not notebook.is_file():
        return None
    try:
        if notebook.stat().st_size > 0:
            nbformat.read(str(notebook), as_version=4)
            return notebook
    except Exception:  # a notebook cut off mid-write: no use to anyone
        pass
    with contextlib.suppress(OSError):
        notebook.unlink()
    return None


def run_report(
    name: str,
    parameters: dict[str, Any] | None = None,
    output_dir: str | os.PathLike = "reports",
    *,
    overwrite: bool = False,
    progress: bool = False,
    log: Callable[[str], None] | None = None,
    on_event: Callable[[dict[str, Any]], None] | None = None,
) -> ReportRun:
    """Check ``parameters`` (JSON data), run the report with papermill, write ``report.ipynb`` + ``.html``.

    Before anything runs: every value must be JSON data (str, int, finite float, bool, None, lists and
    string-keyed dicts of them: :func:`~workbench.reports.values.check_value`), every name a parameter of
    the notebook, every value allowed by the report's declaration (:mod:`~workbench.reports.declarations`:
    choices, ranges, model names, layers and model arguments checked on the built untrained models), and
    the output files usable (:func:`check_outputs`; ``overwrite=True`` lets the report replace existing ones). Raises :class:`ParameterError` / :class:`OutputError` then, with nothing
    written; :class:`ReportFailed` (partial notebook kept) when a cell fails; :class:`ReportInterrupted`
    (kernel stopped) on ``KeyboardInterrupt``. ``log`` (e.g. ``print``) hears where the run goes;
    ``on_event`` gets each progress event from another thread (cells, training runs, epochs: see
    :mod:`workbench.reports.progress`; the CLI draws them with :class:`~workbench.reports.progress_line.ProgressPrinter`).

    Example:
        >>> from workbench.reports import run_report
        >>> run = run_report("gap", {"n_samples": 64, "student": "vit"}, "reports")  # doctest: +SKIP
        >>> run.html.name  # doctest: +SKIP
        'report.html'
    """
    report = get_report(name)
    values = check_parameters(parameters or {})
    specs = check_names(report, values)
    if overwrite and report.overwrite_parameter in specs:
        values[report.overwrite_parameter] = True
    check_outputs(report, values, overwrite=overwrite)
    check_values(report, {**{key: spec["default"] for key, spec in specs.items()}, **values}, models=True)
    run_dir = _make_run_dir(output_dir, report, values)
    notebook, html = run_dir / "report.ipynb", run_dir / "report.html"
    if log is not None:
        log(f"running report {report.name!r} into {run_dir}")
    start = time.perf_counter()
    try:
        execute_notebook(report.notebook, notebook, values, progress=progress, on_event=on_event)
    except KeyboardInterrupt as interrupt:
        number = getattr(interrupt, "signal_number", signal.SIGINT)
        raise ReportInterrupted(f"report {report.name!r} interrupted by {signal.Signals(number).name}; its kernel "
                                "was shut down", _partial(notebook), number) from interrupt
    except Exception as error:
        partial, html_path = _partial(notebook), None
        if partial is not None:
            with contextlib.suppress(Exception):  # the partial notebook matters; its HTML is a convenience
                html_path = export_html(notebook, html)
        if getattr(error, "ename", None):  # papermill's PapermillExecutionError
            detail = f"cell [{error.exec_count}] raised {error.ename}: {error.evalue}"
        else:
            detail = f"{type(error).__name__}: {error}"
        raise ReportFailed(partial, html_path, f"report {report.name!r} failed: {detail}") from error
    export_html(notebook, html)
    return ReportRun(run_dir, notebook, html, values, time.perf_counter() - start)


# The lab template without the CDN scripts (require.js, MathJax, mermaid): the report opens offline.
_OFFLINE_TEMPLATE = """{%- extends 'index.html.j2' -%}
{%- block html_head_js_requirejs -%}{%- endblock -%}
{%- block html_head_js_mathjax -%}{%- endblock -%}
{%- block html_head_js_mermaidjs -%}{%- endblock -%}
"""


def export_html(notebook: Path, html: Path) -> Path:
    """Render an executed notebook to a standalone HTML file that needs no network."""
    import jinja2
    import nbformat
    from nbconvert import HTMLExporter

    exporter = HTMLExporter(
        template_name="lab",
        extra_loaders=[jinja2.DictLoader({"kd_offline.html.j2": _OFFLINE_TEMPLATE})],
        template_file="kd_offline.html.j2",
    )
    body, _ = exporter.from_notebook_node(nbformat.read(str(notebook), as_version=4))
    return write_atomic(html, body)

