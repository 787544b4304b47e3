"""What values each report parameter allows: one :class:`Declaration` per report, checked before anything runs.

Types and defaults come from the notebook's ``parameters`` cell (:func:`~workbench.reports.report_parameters`);
a declaration adds what the type cannot say: choices (``kernel``), ranges (``lr > 0``), model names, weight
files, layer selectors and model arguments checked against the *built, untrained* models, and custom
checks. Every rule carries the text ``--list`` shows (``allowed``) and an example that fits *that*
parameter, used in its messages and in the CLI's type errors.

The same declaration is used by the CLI (``validate_parameters``: the value checks), by
:func:`~workbench.reports.run_report` (value and model checks, before the run folder is made) and by the
notebook's own check cell (:func:`check_notebook`), so a person editing the parameters in JupyterLab
gets the same :class:`ParameterError` before anything trains.

Adding a parameter to a report notebook: add its rule to the report's ``rules`` below (a test checks
every notebook parameter has one and every rule names a real parameter). A rule is built from the
helpers of :mod:`workbench.reports.rules` (:func:`choice`, :func:`integer`, :func:`number`, :func:`flag`, :func:`optional`,
:func:`model_name`, :func:`model_kwargs`, :func:`layer_selector`, :func:`weights_file`, ...) or directly:
``Rule(allowed, check=..., check_models=..., example=...)`` where a check returns ``None`` when the value
is fine, else a sentence saying what is wrong (or raises ``ValueError`` with that sentence).

Example:
    >>> from workbench.reports.declarations import check_values
    >>> check_values("gap", {"kernel": "cosine"})
    Traceback (most recent call last):
    ...
    workbench.reports.values.ParameterError: parameter kernel = 'cosine': not one of 'linear', 'rbf' (the kernels of workbench.probes.kernels.KERNELS); for example kernel="linear"
"""
from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from workbench.reports.rules import (  # noqa: F401 (the helpers new rules are written with)
    Check, Context, Declaration, Rule, Unavailable, choice, device, flag, integer, layer_selector, method_list,
    method_weights, model_kwargs, model_name, number, optional, output_file, seed_list, text, weights_file,
)
from workbench.reports.values import ParameterError, _short

__all__ = ["DECLARATIONS", "Declaration", "Rule", "declaration", "check_values", "check_notebook", "allowed",
           "example"]

# ---- the reports ---------------------------------------------------------------------------------------

def _kernels() -> tuple[str, ...]:
    from workbench.probes.kernels import KERNELS

    return KERNELS


def _datasets() -> tuple[str, ...]:
    from workbench.train.cache import DATASETS

    return DATASETS


def _feature_layers() -> Rule:
    """The distill report's placement of feature terms written without ``@`` (workbench.reports.methods)."""
    from workbench.reports.methods import check_feature_layers, layer_pairs

    def check(value: Any, context: Context) -> None:
        check_feature_layers(value)  # its ValueError says what to write instead

    def check_models(value: Any, context: Context) -> None:
        if value != "auto":  # the rule's layers exist on both built models
            layer_pairs(value, context.model("teacher"), context.model("student"))

    return Rule("auto (hints at the middle stage, AT at every stage, relation/CKA/ND terms at the last) | stages | "
                "middle | last | a layer name | teacher_layer:student_layer", check, check_models, '"last"')


def _ofa_rules() -> dict[str, Rule]:
    """The ``ofa`` report's pairs and its methods checked on every pair (workbench.reports.ofa_compare)."""
    from workbench.reports.ofa_compare import pair_methods_rule, pairs_rule

    return {"pairs": pairs_rule(), "methods": pair_methods_rule()}


def _diswot_rules() -> dict[str, Rule]:
    """The ``diswot`` report's candidates (workbench.reports.diswot_rank)."""
    from workbench.reports.diswot_rank import candidates_rule

    return {"candidates": candidates_rule()}


def _dt_rules() -> dict[str, Rule]:
    """The ``dt`` report's diffusion settings, checked as the model family checks them (workbench.reports.dt_diversity)."""
    from workbench.reports.dt_diversity import config_rule, guidance_rule, switch_rule

    return {
        "size": config_rule("size", "int >= 2 (8: the digits' own size)", "8"),
        "widths": config_rule("widths", "list of channel counts, multiples of 8", "[32, 64]"),
        "base_steps": config_rule("base_steps", "a power of two dividing 1024, more than student_steps", "32"),
        "student_steps": config_rule("student_steps", "a power of two dividing 1024", "4"),
        "switch_after": switch_rule(),
        "guidance": guidance_rule(),
        "hybrid_guidance": guidance_rule(),
    }


_MODELS = {"teacher": ("teacher", "teacher_kwargs"), "student": ("student", "student_kwargs")}
_SHARED = {
    "teacher": model_name("teacher"),
    "student": model_name("student"),
    "teacher_kwargs": model_kwargs("teacher"),
    "student_kwargs": model_kwargs("student"),
    "teacher_weights": weights_file("teacher"),
    "dataset": choice(_datasets(), "workbench.train.cache.DATASETS"),
    "batch_size": integer(1, example=64, what="samples per batch"),
    "device": device(),
}

DECLARATIONS: dict[str, Declaration] = {
    "gap": Declaration({
        **_SHARED,
        "n_samples": integer(4, example=450, what="CKA needs at least 4 samples"),
        "teacher_epochs": optional(integer(1, example=30, what="None: the model family's recipe")),
        "student_epochs": optional(integer(1, example=30, what="None: the model family's recipe")),
        "teacher_lr": optional(number(above=0, example=0.001, what="None: the model family's recipe")),
        "student_lr": optional(number(above=0, example=0.001, what="None: the model family's recipe")),
        "teacher_layers": layer_selector("teacher"),
        "student_layers": layer_selector("student"),
        "kernel": choice(_kernels(), "the kernels of workbench.probes.kernels.KERNELS"),
        "debiased": flag(),
        "temperature": number(above=0, example=1.0, what="a softmax temperature"),
        "seed": integer(0, example=0),
        "student_weights": weights_file("student"),
    }, _MODELS),
    "distill": Declaration({
        **_SHARED,
        "feature_layers": _feature_layers(),  # before methods: a bad rule is blamed on itself, not on the methods
        "methods": method_list(),
        "seeds": seed_list(),
        "epochs": integer(1, example=40, what="student training epochs"),
        "lr": number(above=0, example=0.01, what="a learning rate"),
        "weights": method_weights(),
        "n_train": integer(0, example=300, what="0: all training images"),
        "n_probe": integer(4, example=450, what="CKA needs at least 4 samples"),
        "teacher_epochs": optional(integer(1, example=6, what="None: the model family's recipe")),
        "teacher_lr": optional(number(above=0, example=0.005, what="None: the model family's recipe")),
        "threads": integer(0, example=1, what="0: torch's default"),
        "results_table": output_file("distill"),
        "overwrite_results": flag(),
    }, _MODELS),
    "ofa": Declaration({  # each pair builds its own models: the pairs and methods rules check them
        "dataset": _SHARED["dataset"],
        **_ofa_rules(),
        "seeds": seed_list(),
        "epochs": integer(1, example=10, what="student training epochs"),
        "lr": number(above=0, example=0.005, what="a learning rate"),
        "batch_size": _SHARED["batch_size"],
        "n_train": integer(0, example=1000, what="0: all training images"),
        "n_probe": integer(4, example=450, what="CKA needs at least 4 samples"),
        "teacher_epochs": optional(integer(1, example=6, what="None: each teacher family's recipe")),
        "teacher_lr": optional(number(above=0, example=0.005, what="None: each teacher family's recipe")),
        "device": _SHARED["device"],
        "threads": integer(0, example=1, what="0: torch's default"),
        "results": output_file("ofa"),
        "overwrite_results": flag(),
    }),
    "diswot": Declaration({  # the teacher is built as the other reports build it; each candidate by its rule
        "dataset": _SHARED["dataset"],
        "teacher": _SHARED["teacher"],
        "teacher_kwargs": _SHARED["teacher_kwargs"],
        "teacher_epochs": optional(integer(1, example=6, what="None: the teacher family's recipe")),
        "teacher_lr": optional(number(above=0, example=0.005, what="None: the teacher family's recipe")),
        **_diswot_rules(),
        "seeds": seed_list(),
        "epochs": integer(1, example=10, what="student training epochs"),
        "lr": number(above=0, example=0.005, what="a learning rate"),
        "batch_size": _SHARED["batch_size"],
        "n_train": integer(0, example=1000, what="0: all training images"),
        "search_batch_size": integer(2, example=64, what="images DisWOT's batch similarity matrices need, at least 2"),
        "device": _SHARED["device"],
        "threads": integer(0, example=1, what="0: torch's default"),
        "results": output_file("diswot"),
        "overwrite_results": flag(),
    }, {"teacher": ("teacher", "teacher_kwargs")}),
    "dt": Declaration({
        "model_source": choice(("digits",), "the tiny offline digits DDPM family, workbench.train.diffusion"),
        **_dt_rules(),
        "epochs": integer(1, example=150, what="the base DDPM's training epochs"),
        "distill_iterations": integer(1, example=400, what="steps of each progressive-distillation round"),
        "seeds_per_class": integer(2, example=20, what="diversity is within a class: at least 2"),
        "seed": integer(0, example=0),
        "device": _SHARED["device"],
        "threads": integer(0, example=1, what="0: torch's default"),
        "results": output_file("dt"),
        "overwrite_results": flag(),
    }),
}


def declaration(report: Any) -> Declaration | None:
    """The declaration of a report (a name or a :class:`~workbench.reports.Report`); None for a notebook
    given by path.

    Example:
        >>> sorted(declaration("gap").models)
        ['student', 'teacher']
    """
    if isinstance(report, str):
        return DECLARATIONS.get(report)
    from workbench.reports.runner import REPORTS

    registered = REPORTS.get(report.name)  # a notebook given by path may share a report's name, not its rules
    same = registered is not None and registered.notebook == report.notebook
    return DECLARATIONS.get(report.name) if same else None


def allowed(report: Any, name: str) -> str:
    """What parameter ``name`` of ``report`` allows, as ``--list`` shows it ("" when undeclared).

    Example:
        >>> allowed("gap", "kernel")
        'linear | rbf'
    """
    found = declaration(report)
    rule = found.rules.get(name) if found else None
    return rule.allowed if rule else ""


def example(report: Any, name: str) -> str | None:
    """A good value of parameter ``name`` of ``report`` as JSON text, or None when undeclared.

    Example:
        >>> example("distill", "methods")
        '["student", "kd", "kd+fitnet@blocks.1"]'
    """
    found = declaration(report)
    rule = found.rules.get(name) if found else None
    return rule.example if rule else None


def _error(name: str, value: Any, reason: str, rule: Rule) -> ParameterError:
    reason = reason.rstrip(". ")
    hint = f"; for example {name}={rule.example}" if rule.example and rule.example not in reason else ""
    return ParameterError(f"parameter {name} = {_short(value)}: {reason}{hint}")


def _run(name: str, value: Any, rule: Rule, check: Check, context: Context) -> None:
    from workbench.reports.runner import OutputError

    try:
        reason = check(value, context)
    except (ParameterError, OutputError):
        raise
    except ValueError as error:
        reason = str(error)
    if reason:
        raise _error(name, value, reason, rule)


def check_values(report: Any, values: Mapping[str, Any], *, models: bool = False) -> None:
    """Raise :class:`ParameterError` naming the parameter and what is allowed unless every value in
    ``values`` fits its rule; ``models=True`` also runs the model checks (layers, model kwargs, weight
    files, method layers) on the built untrained models. Rules read other parameters from ``values``
    (give the defaults too). A report without a declaration (a notebook path) is not checked.

    Example:
        >>> check_values("distill", {"lr": 0.0})
        Traceback (most recent call last):
        ...
        workbench.reports.values.ParameterError: parameter lr = 0.0: must be a number > 0 (a learning rate); for example lr=0.01
        >>> check_values("gap", {"teacher": "cnn", "teacher_kwargs": {}, "teacher_layers": "stages"}, models=True)
    """
    found = declaration(report)
    if found is None:
        return
    context = Context(getattr(report, "name", report), found, values)
    for stage in ("check", "check_models") if models else ("check",):
        for name, rule in found.rules.items():
            check = getattr(rule, stage)
            if check is not None and name in values:
                try:
                    _run(name, values[name], rule, check, context)
                except Unavailable:  # a model check whose model's name was not given
                    continue


def check_notebook(report: str, namespace: Mapping[str, Any]) -> None:
    """The check cell of a report notebook: check its parameters as set in ``namespace`` (``globals()``),
    values and models, before anything trains; raises :class:`ParameterError`.

    Example:
        >>> from workbench import reports
        >>> defaults = {name: spec["default"] for name, spec in reports.report_parameters("gap").items()}
        >>> reports.check_notebook("gap", {**defaults, "temperature": -1.0})
        Traceback (most recent call last):
        ...
        workbench.reports.values.ParameterError: parameter temperature = -1.0: must be a number > 0 (a softmax temperature); for example temperature=1.0
    """
    found = declaration(report)
    if found is None:
        raise ParameterError(f"no declaration for report {report!r}; declared: {', '.join(DECLARATIONS)}")
    missing = [name for name in found.rules if name not in namespace]
    if missing:
        raise ParameterError(f"the parameters cell of {report!r} does not set {', '.join(missing)}")
    check_values(report, {name: namespace[name] for name in found.rules}, models=True)
