"""Parameterized reports: :mod:`~workbench.reports.runner` checks parameters and runs notebooks with
papermill into offline HTML (parameter values are JSON data, never code: :mod:`~workbench.reports.values`);
:mod:`~workbench.reports.notebook` holds what the notebooks call in their kernel.

Example:
    >>> from workbench import reports
    >>> reports.report_parameters("gap")["n_samples"]["default"]
    450
"""
from workbench.reports.compare import (
    METHODS, Comparison, Method, cka_grid, command_line, method_distiller, models_summary, run_comparison,
    seeded_model, training_set,
)
from workbench.reports.declarations import DECLARATIONS, check_notebook, check_values
from workbench.reports.notebook import evaluation_data, gap_summary, report_model, setup_notebook
from workbench.reports.sanity import Sanity, distill_sanity, gap_sanity
from workbench.reports.runner import (
    REPORTS,
    OutputError,
    ParameterError,
    Report,
    ReportFailed,
    ReportInterrupted,
    ReportRun,
    check_names,
    check_outputs,
    execute_notebook,
    export_html,
    get_report,
    report_parameters,
    run_report,
)
from workbench.reports.values import check_parameters

__all__ = [
    "REPORTS", "Report", "ReportRun", "ParameterError", "OutputError", "ReportFailed", "ReportInterrupted",
    "get_report", "report_parameters", "check_names", "check_outputs", "check_parameters", "run_report",
    "execute_notebook", "export_html", "DECLARATIONS", "check_values", "check_notebook",
    "setup_notebook", "report_model", "evaluation_data", "gap_summary",
    "Sanity", "gap_sanity", "distill_sanity",
    "METHODS", "Method", "Comparison", "method_distiller", "run_comparison", "command_line", "seeded_model",
    "training_set", "models_summary", "cka_grid",
]
