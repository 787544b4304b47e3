"""Parameterized reports: the registry, parameter checking, the papermill runner and the offline HTML export.

A report is a notebook under ``notebooks/`` whose first code cell is tagged ``parameters``. Running one
checks every parameter against that cell (names and types) *before* anything executes, runs the
notebook with papermill on a kernel of the current interpreter (nothing to register), and writes
``<output_dir>/<name>/<run-id>/report.ipynb`` and ``report.html`` (plotly.js embedded, no CDN).
papermill and nbconvert are imported only inside the functions that need them.

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
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

__all__ = [
    "REPORTS", "Report", "ReportRun", "ParameterError", "ReportFailed", "get_report", "report_parameters",
    "check_names", "run_report", "execute_notebook", "export_html", "REPORT_ENV",
]

NOTEBOOKS_DIR = Path(__file__).resolve().parents[2] / "notebooks"
REPORT_ENV = "KD_WORKBENCH_REPORT"  # set in the report kernel: notebooks turn progress bars off
_KERNEL_ENV = {
    REPORT_ENV: "1",
    "TQDM_DISABLE": "1",
    # an inherited MPLBACKEND=Agg would make every notebook plot vanish
    "MPLBACKEND": "module://matplotlib_inline.backend_inline",
    "PYDEVD_DISABLE_FILE_VALIDATION": "1",
}


@dataclass(frozen=True)
class Report:
    """A registered report: a name, its notebook and a one-line description."""

    name: str
    notebook: Path
    description: str = ""


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
    ),
}


class ParameterError(ValueError):
    """A report parameter with an unknown name or a value that does not fit its type."""


@dataclass
class ReportFailed(RuntimeError):
    """A run failed; the partial notebook and its HTML are kept at ``notebook`` / ``html`` (None if not written)."""

    notebook: Path | None
    html: Path | None
    message: str

    def __str__(self) -> str:
        return self.message


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


def _run_id(parameters: dict[str, Any]) -> str:
    digest = hashlib.sha256(json.dumps(parameters, sort_keys=True, default=repr).encode()).hexdigest()[:8]
    return f"{time.strftime('%Y%m%d-%H%M%S')}-{digest}"


def run_report(
    name: str,
    parameters: dict[str, Any] | None = None,
    output_dir: str | os.PathLike = "reports",
    *,
    progress: bool = False,
    log: Callable[[str], None] | None = None,
) -> ReportRun:
    """Check ``parameters`` (Python values), run the report with papermill, write ``report.ipynb`` + ``.html``.

    Raises :class:`ParameterError` for an unknown name before anything runs, or :class:`ReportFailed`
    (partial notebook kept) when a cell fails. ``log`` (e.g. ``print``) hears where the run goes.

    Example:
        >>> from workbench.reports import run_report
        >>> run = run_report("gap", {"n_samples": 64, "student": "vit"}, "reports")  # doctest: +SKIP
        >>> run.html.name  # doctest: +SKIP
        'report.html'
    """
    report = get_report(name)
    values = dict(parameters or {})
    check_names(report, values)
    run_dir = Path(output_dir) / report.name / _run_id(values)
    suffix = 1
    while run_dir.exists():  # two runs with the same parameters in the same second
        run_dir, suffix = run_dir.with_name(f"{run_dir.name.split('.')[0]}.{suffix}"), suffix + 1
    run_dir.mkdir(parents=True)
    (run_dir / "parameters.json").write_text(json.dumps(values, indent=2, default=repr) + "\n")
    notebook, html = run_dir / "report.ipynb", run_dir / "report.html"
    if log is not None:
        log(f"running report {report.name!r} into {run_dir}")
    start = time.perf_counter()
    try:
        execute_notebook(report.notebook, notebook, values, progress=progress)
    except Exception as error:
        partial, html_path = (notebook if notebook.is_file() else None), None
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


def _kernel_manager_class() -> type:
    """An ``AsyncKernelManager`` whose kernel is ``sys.executable -m ipykernel_launcher``: no kernelspec."""
    import zmq
    from jupyter_client.kernelspec import KernelSpec
    from jupyter_client.manager import AsyncKernelManager

    class CurrentInterpreterKernelManager(AsyncKernelManager):
        def __init__(self, **kwargs: Any) -> None:
            super().__init__(**kwargs)
            if zmq.has("curve"):  # encrypt the local sockets (and silence ipykernel's warning)
                self.transport_encryption = "auto"

        @property
        def kernel_spec(self) -> KernelSpec:
            return KernelSpec(
                argv=[sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
                name="python3", display_name="Python 3 (ipykernel)", language="python", env=dict(_KERNEL_ENV),
                metadata={"supported_encryption": ["curve"]},
            )

    return CurrentInterpreterKernelManager


def execute_notebook(notebook: Path, output: Path, parameters: dict[str, Any], *, progress: bool = False) -> None:
    """Run ``notebook`` with papermill on the current interpreter, writing ``output`` (also on failure)."""
    import papermill

    papermill.execute_notebook(
        str(notebook), str(output), parameters=parameters, kernel_name="python3", language="python",
        progress_bar=progress, kernel_manager_class=_kernel_manager_class(),
    )


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
    Path(html).write_text(body, encoding="utf-8")
    return Path(html)


# ---- helpers the report notebooks call (thin notebooks: the logic lives here) ----
