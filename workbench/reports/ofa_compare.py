"""What the ``ofa`` report calls in its kernel: OFA-KD against KD and FitNet on heterogeneous
teacher/student pairs (a ViT teacher and a CNN student, a CNN teacher and a ViT or MLP-Mixer student).

A *pair* is a dict ``{"teacher": name, "student": name, "teacher_kwargs": {...}, "student_kwargs": {...}}``
(:class:`Pair`). For each pair, :func:`run_pair` trains (or loads) the teacher once, runs the distill
report's comparison loop (:func:`~workbench.reports.compare.run_comparison`: the same optimiser, schedule
and batch order per seed for every method), measures the held-out accuracy of every OFA-KD branch of
each trained distiller (:func:`workbench.probes.branch_accuracy`, through ``run_comparison``'s
``on_trained`` hook) and runs the distill report's sanity checks
(:func:`~workbench.reports.sanity.distill_sanity`). :func:`results_markdown` / :func:`save_results` give
the combined table of all pairs with the command that re-runs it. The parameter rules of the pairs and
of the methods checked against every pair (:func:`pairs_rule`, :func:`pair_methods_rule`) are used by
the report's declaration (:mod:`workbench.reports.declarations`).
"""
from __future__ import annotations

import difflib
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from workbench.reports.compare import Comparison, check_results_path, models_summary, run_comparison, seeded_model
from workbench.reports.rules import Context, Declaration, Rule, method_list, model_name

__all__ = ["Pair", "PairRun", "DEFAULT_PAIRS", "parse_pairs", "run_pair", "branch_frame", "branch_figure",
           "sanity_markdown", "results_markdown", "save_results", "pairs_rule", "pair_methods_rule"]

PAIR_KEYS = ("teacher", "student", "teacher_kwargs", "student_kwargs")
DEFAULT_PAIRS = [
    {"teacher": "vit", "student": "cnn", "student_kwargs": {"widths": [16, 32, 64]}},
    {"teacher": "cnn", "student": "vit", "student_kwargs": {"dim": 32, "heads": 2}},
    {"teacher": "cnn", "student": "mixer", "student_kwargs": {"dim": 48}},
]
"""The report's default pairs: ViT → CNN, CNN → ViT, CNN → MLP-Mixer (each student smaller than its teacher)."""


@dataclass(frozen=True)
class Pair:
    """One teacher/student pair of the report: model names (:func:`workbench.models.create`) and their
    arguments.

    Example:
        >>> Pair("vit", "cnn", student_kwargs={"widths": [16, 32, 64]}).label
        'vit → cnn'
    """

    teacher: str
    student: str
    teacher_kwargs: dict[str, Any] = field(default_factory=dict)
    student_kwargs: dict[str, Any] = field(default_factory=dict)

    @property
    def label(self) -> str:
        """``"teacher → student"``."""
        return f"{self.teacher} → {self.student}"

    def describe(self) -> str:
        """The pair in words, with the arguments given (Markdown)."""
        def model(name: str, kwargs: dict[str, Any]) -> str:
            given = ", ".join(f"{key}={value!r}" for key, value in kwargs.items())
            return f"`{name}`" + (f" ({given})" if given else "")

        return f"teacher {model(self.teacher, self.teacher_kwargs)}, student {model(self.student, self.student_kwargs)}"


def parse_pairs(value: Any) -> list[Pair]:
    """The report's ``pairs`` parameter as :class:`Pair` objects; a ``ValueError`` saying what is wrong
    (not a list of dicts, an unknown key, a name that is not text, kwargs that are not a dict, a repeat).

    Example:
        >>> [pair.label for pair in parse_pairs([{"teacher": "cnn", "student": "vit"}])]
        ['cnn → vit']
        >>> parse_pairs([{"teacher": "cnn", "studnet": "vit"}])
        Traceback (most recent call last):
        ...
        ValueError: pair 1: unknown key 'studnet' (did you mean 'student'?); a pair has the keys teacher, student, teacher_kwargs, student_kwargs
    """
    if not isinstance(value, list) or not value:
        raise ValueError('must be a non-empty list of pairs such as {"teacher": "cnn", "student": "vit"}')
    pairs = []
    for number, item in enumerate(value, 1):
        if not isinstance(item, dict):
            raise ValueError(f'pair {number} is not a dict: write {{"teacher": "cnn", "student": "vit"}}')
        for key in item:
            if key not in PAIR_KEYS:
                close = difflib.get_close_matches(str(key), PAIR_KEYS, n=1)
                hint = f" (did you mean {close[0]!r}?)" if close else ""
                raise ValueError(f"pair {number}: unknown key {key!r}{hint}; a pair has the keys {', '.join(PAIR_KEYS)}")
        for role in ("teacher", "student"):
            if not isinstance(item.get(role), str):
                raise ValueError(f"pair {number}: {role!r} must be a model name (text), got {item.get(role)!r}")
            if not isinstance(item.get(f"{role}_kwargs", {}), dict):
                raise ValueError(f"pair {number}: '{role}_kwargs' must be a dict of model arguments")
        pairs.append(Pair(item["teacher"], item["student"], dict(item.get("teacher_kwargs", {})),
                          dict(item.get("student_kwargs", {}))))
    if len(set(map(repr, pairs))) != len(pairs):
        raise ValueError("a pair is repeated: each pair runs once")
    return pairs


@dataclass
class PairRun:
    """One pair's results: the trained ``teacher_model``, the ``comparison`` of the methods over seeds,
    ``branches``: the :class:`~workbench.probes.BranchAccuracy` of each trained OFA-KD distiller by
    ``(method, seed)``, the ``sanity`` checks and the ``summary`` line of the two models."""

    pair: Pair
    teacher_model: Any
    comparison: Comparison
    branches: dict[tuple[str, int], Any]
    sanity: Any
    summary: str


def run_pair(
    pair: Pair, dataset: str, train: Any, test: Any, methods: Sequence[str], seeds: Sequence[int], *,
    epochs: int, lr: float, batch_size: int = 64, probe: Any = None, teacher_epochs: int | None = None,
    teacher_lr: float | None = None, device: str = "auto", progress: bool = False,
    callbacks: Callable[[str, int], list[Any]] | None = None, log: Callable[[str], None] | None = None,
) -> PairRun:
    """Train (or load from the cache) ``pair``'s teacher on ``dataset`` by its recipe (or ``teacher_epochs`` /
    ``teacher_lr``), then compare ``methods`` over ``seeds`` on fresh students
    (:func:`~workbench.reports.compare.run_comparison` on ``train``, scored on ``test``, CKA on ``probe``),
    measure each OFA-KD distiller's branch accuracy on ``test`` right after it trained, and check the results
    (:func:`~workbench.reports.sanity.distill_sanity`).

    Example:
        >>> import torch
        >>> x, y = torch.randn(32, 1, 32, 32), torch.randint(0, 10, (32,))
        >>> run = run_pair(Pair("cnn_small", "mixer", student_kwargs={"dim": 8, "depth": 2}), "digits", (x, y),
        ...                (x, y), ["student", "ofa"], [0], epochs=1, lr=0.01, teacher_epochs=1, device="cpu")
        >>> run.branches[("ofa", 0)].layers, run.comparison.methods
        (['blocks.0', 'blocks.1'], ['student', 'ofa'])
    """
    from workbench.probes import branch_accuracy
    from workbench.probes.branches import branch_terms
    from workbench.reports.notebook import report_model
    from workbench.reports.sanity import distill_sanity

    teacher_model = report_model(pair.teacher, dataset, epochs=teacher_epochs, lr=teacher_lr, progress=progress,
                                 **pair.teacher_kwargs)
    make_student = lambda seed: seeded_model(pair.student, dataset, seed, **pair.student_kwargs)  # noqa: E731
    branches: dict[tuple[str, int], Any] = {}

    def on_trained(method: str, seed: int, model: Any) -> None:
        if hasattr(model, "terms") and branch_terms(model):
            branches[(method, seed)] = branch_accuracy(model, test, device=device)

    comparison = run_comparison(teacher_model, make_student, train, test, methods, seeds, epochs=epochs, lr=lr,
                                batch_size=batch_size, device=device, probe=probe, callbacks=callbacks,
                                on_trained=on_trained, progress=False, log=log)
    student = make_student(seeds[0])
    sanity = distill_sanity(comparison, pair.teacher, pair.student, teacher_model, student, test, dataset,
                            smaller_student="Choose a smaller student for this pair (its student_kwargs in -p pairs=...).")
    return PairRun(pair, teacher_model, comparison, branches, sanity,
                   models_summary(teacher_model, student, train, test))


def branch_frame(runs: Sequence[PairRun]) -> pd.DataFrame:
    """Branch accuracy of every OFA-KD run, mean and sample std over seeds: ``pair, method, depth, layer,
    accuracy_mean, accuracy_std, seeds`` (accuracies in %; the student's own head is the last depth,
    ``"head"``).

    Example:
        >>> from workbench.probes import BranchAccuracy
        >>> run = PairRun(Pair("cnn", "vit"), None, None, {("ofa", 0): BranchAccuracy(["ofa@a"], ["a"], [0.5], 0.8, 10),
        ...               ("ofa", 1): BranchAccuracy(["ofa@a"], ["a"], [0.7], 0.9, 10)}, None, "")
        >>> branch_frame([run])[["layer", "accuracy_mean", "seeds"]].round(1).values.tolist()
        [['a', 60.0, 2], ['head', 85.0, 2]]
    """
    frames = []
    for run in runs:
        for (method, seed), result in run.branches.items():
            frame = result.to_frame()
            frame.insert(0, "seed", seed)
            frame.insert(0, "method", method)
            frame.insert(0, "pair", run.pair.label)
            frames.append(frame)
    if not frames:
        return pd.DataFrame(columns=["pair", "method", "depth", "layer", "accuracy_mean", "accuracy_std", "seeds"])
    rows = pd.concat(frames, ignore_index=True)
    rows["accuracy"] = 100 * rows["accuracy"]
    rows["depth"] = rows["depth"].astype(str)
    grouped = rows.groupby(["pair", "method", "depth", "layer"], sort=False)["accuracy"]
    return pd.DataFrame({"accuracy_mean": grouped.mean(), "accuracy_std": grouped.std(ddof=1),
                         "seeds": grouped.count()}).reset_index()


def branch_figure(runs: Sequence[PairRun]) -> Any:
    """Matplotlib: one panel per pair, the held-out accuracy of each student stage's branch (mean over
    seeds) for every OFA-KD method, the student's head last (a method with fewer branches, such as
    ``ofa@last``, at its own stages); returns the figure (None without OFA runs).

    Example:
        >>> from workbench.probes import BranchAccuracy
        >>> run = PairRun(Pair("cnn", "vit"), None, None, {("ofa", 0): BranchAccuracy(["ofa@a", "ofa@b"], ["a", "b"],
        ...               [0.5, 0.6], 0.8, 10), ("ofa@last", 0): BranchAccuracy(["ofa@b"], ["b"], [0.7], 0.75, 10)},
        ...               None, "")
        >>> ax = branch_figure([run]).axes[0]
        >>> [tick.get_text() for tick in ax.get_xticklabels()], [line.get_xdata().tolist() for line in ax.lines]
        (['a', 'b', 'student head'], [[0, 1, 2], [1, 2]])
    """
    import matplotlib.pyplot as plt

    frame = branch_frame(runs)
    shown = [run for run in runs if run.branches]
    if not shown:
        return None
    figure, axes = plt.subplots(1, len(shown), figsize=(4.6 * len(shown), 3.6), squeeze=False)
    for ax, run in zip(axes[0], shown):
        rows = frame[frame["pair"] == run.pair.label]
        layers = [layer for layer in dict.fromkeys(rows["layer"]) if layer != "head"] + ["head"]
        for method, found in rows.groupby("method", sort=False):
            seeds = int(found["seeds"].iloc[0])
            ax.plot(np.array([layers.index(layer) for layer in found["layer"]]), found["accuracy_mean"], marker="o",
                    label=f"{method} ({seeds} seed{'s' if seeds > 1 else ''})")
        ax.set_xticks(range(len(layers)), [layer if layer != "head" else "student head" for layer in layers],
                      rotation=30, ha="right")
        ax.set(xlabel="student stage (its branch)", ylabel="held-out accuracy % (mean over seeds)", ylim=(0, 100))
        ax.set_title(f"{run.pair.label}: branch accuracy", fontsize="small")
        ax.grid(alpha=0.3)
        ax.legend(fontsize="small")
    figure.tight_layout()
    return figure


def _branch_markdown(frame: pd.DataFrame) -> str:
    """One pair's branch accuracies as a Markdown table: a row per OFA-KD method, a column per stage
    (``—`` where a method has no branch)."""
    layers = list(dict.fromkeys(frame["layer"]))
    lines = ["| branch accuracy % (mean ± std) | " + " | ".join(f"`{layer}`" if layer != "head" else "student head"
                                                              for layer in layers) + " |",
             "|---|" + "---|" * len(layers)]
    for method, rows in frame.groupby("method", sort=False):
        cells = []
        for layer in layers:
            found = rows[rows["layer"] == layer]
            if found.empty:  # no branch there (ofa@last next to ofa)
                cells.append("—")
                continue
            row = found.iloc[0]
            spread = "n/a" if np.isnan(row["accuracy_std"]) else f"{row['accuracy_std']:.2f}"
            cells.append(f"{row['accuracy_mean']:.2f} ± {spread}")
        lines.append(f"| {method.replace('*', chr(92) + '*')} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def sanity_markdown(runs: Sequence[PairRun]) -> str:
    """The sanity box of every pair, one after another under the pair's name (Markdown)."""
    return "\n\n".join(f"**{run.pair.label}** — {run.sanity.to_markdown()}" for run in runs)


def results_markdown(runs: Sequence[PairRun], command: str = "", settings: dict[str, Any] | None = None) -> str:
    """The combined results of every pair as Markdown: per pair the models, the accuracy table (with its
    sanity flags marked, as the distill report's) and the branch accuracies; then how to read them and the
    methods in words. ``command``: how to re-run it; ``settings``: shown as ``key=value``.

    Example:
        >>> print(results_markdown([], "kd-workbench report ofa", {"epochs": 10}).splitlines()[0])
        # OFA-KD between architectures: student alone, KD, FitNet, OFA-KD
    """
    from workbench.reports.methods import describe_method

    text = ["# OFA-KD between architectures: student alone, KD, FitNet, OFA-KD", ""]
    if command:
        text += [f"Made by `{command}` on {time.strftime('%Y-%m-%d')}.", ""]
    if settings:
        text += ["Settings: " + ", ".join(f"{key}={value!r}" for key, value in settings.items()) + ".", ""]
    branches = branch_frame(runs)
    methods: list[str] = []
    for run in runs:
        text += [f"## {run.pair.label}", "", f"{run.pair.describe()}. {run.summary}", "",
                 run.comparison.to_markdown(run.sanity.blocking), ""]
        rows = branches[branches["pair"] == run.pair.label]
        if len(rows):
            text += [_branch_markdown(rows), ""]
        methods += [method for method in run.comparison.methods if method not in methods]
    text += ["Test accuracy on the held-out split after the last epoch; mean ± sample std over seeds (the seed "
             "sets the student's initial weights, the OFA-KD branches' and the batch order; every method of a "
             "pair sees the same). Matched-stage CKA: mean debiased linear CKA of each student stage with its "
             "teacher stage on the probe images (the stage i ↔ i, or the best-matching teacher stage when the "
             "stage counts differ). Branch accuracy: top-1 held-out accuracy of each OFA-KD branch (the small "
             "network that maps a student stage to class logits), the student's own head last.", "",
             "Methods:", ""]
    text += [f"- `{method}`: {describe_method(method)}" for method in methods]
    if any(term.name == "ofa" for method in methods for term in _terms(method)):
        text += ["", "OFA-KD (Hao et al. 2023): total = CE(labels, label smoothing 0.1) + L(final student logits) "
                 "+ Σ_stages L(branch logits), each L = −mean Σ_c [(p_t,c + y_c)^γ − y_c] · log p_s,c with "
                 "p_t = softmax(teacher logits / T) and p_s = softmax(student or branch logits / T) (the "
                 "authors' released enhancement: every class's teacher probability raised to γ; γ = 1 is "
                 "cross-entropy on the teacher's probabilities). Only the teacher's final logits are used; the "
                 "branches train with the student and are not part of it. Defaults γ = 1, T = 1 (the "
                 "authors' CIFAR-100 command; their ImageNet one uses γ = 1.5); `ofa(gamma=1.5)`, `ofa(T=2)`, "
                 "`ofa*0.5` change them."]
    return "\n".join(text) + "\n"


def _terms(method: str) -> list[Any]:
    from workbench.reports.methods import parse_method

    return list(parse_method(method).terms)


def save_results(path: str | Path, runs: Sequence[PairRun], command: str = "", settings: dict[str, Any] | None = None,
                 *, overwrite: bool = False) -> Path:
    """Write :func:`results_markdown` to ``path`` (a ``.md`` file) atomically; an existing file is replaced
    only with ``overwrite=True`` (``FileExistsError``), another suffix is a ``ValueError``.

    Example:
        >>> import tempfile
        >>> path = save_results(Path(tempfile.mkdtemp()) / "ofa.md", [], "kd-workbench report ofa")
        >>> path.read_text().startswith("# OFA-KD between architectures")
        True
    """
    from workbench.files import write_atomic

    path = check_results_path(path, overwrite)
    return write_atomic(path, results_markdown(runs, command, settings))


# ---- the report's parameter rules ---------------------------------------------------------------------

_PAIR_MODELS = {"teacher": ("teacher", "teacher_kwargs"), "student": ("student", "student_kwargs")}


def _pair_contexts(context: Context, value: Any) -> list[tuple[Pair, Context]]:
    """A :class:`Context` per pair that builds its two untrained models as the report does (kept on the
    report's context, so the pairs and the methods rules build each model once)."""
    cache = context.__dict__.setdefault("_ofa_pairs", {})
    found = []
    for pair in parse_pairs(value):
        key = repr(pair)
        if key not in cache:
            values = {"teacher": pair.teacher, "student": pair.student, "teacher_kwargs": pair.teacher_kwargs,
                      "student_kwargs": pair.student_kwargs,
                      context.declaration.dataset: context.values.get(context.declaration.dataset, "digits")}
            cache[key] = Context(context.report, Declaration({}, _PAIR_MODELS, context.declaration.dataset), values)
        found.append((pair, cache[key]))
    return found


def pairs_rule() -> Rule:
    """The ``pairs`` parameter: a non-empty list of distinct pairs (:func:`parse_pairs`), each model name
    known and each model built untrained for the report's images (its arguments checked by building it)."""
    names = {role: model_name(role) for role in ("teacher", "student")}

    def check(value: Any, context: Context) -> str | None:
        for number, pair in enumerate(parse_pairs(value), 1):
            for role in ("teacher", "student"):
                reason = names[role].check(getattr(pair, role), context)
                if reason:
                    return f"pair {number} ({pair.label}): {role}: {reason}"
        return None

    def check_models(value: Any, context: Context) -> str | None:
        for number, (pair, pair_context) in enumerate(_pair_contexts(context, value), 1):
            for role in ("teacher", "student"):
                try:
                    pair_context.model(role)
                except ValueError as error:
                    return f"pair {number} ({pair.label}): {role}: {error}"
        return None

    return Rule('a list of {"teacher": name, "student": name, "teacher_kwargs": {...}, "student_kwargs": {...}}',
                check, check_models, '[{"teacher": "cnn", "student": "vit", "student_kwargs": {"dim": 32}}]')


def pair_methods_rule(pairs_parameter: str = "pairs") -> Rule:
    """The ``methods`` parameter of the ``ofa`` report: method strings as the distill report's
    (:func:`~workbench.reports.rules.method_list`), their layers checked on the models of every pair."""
    from workbench.reports.methods import check_method_layers

    methods = method_list()

    def check_models(value: Any, context: Context) -> str | None:
        pairs = context.values.get(pairs_parameter)
        if pairs is None:
            return None
        for number, (pair, pair_context) in enumerate(_pair_contexts(context, pairs), 1):
            for method in value:
                try:
                    check_method_layers(method, pair_context.model("teacher"), pair_context.model("student"), "auto")
                except ValueError as error:
                    return f"pair {number} ({pair.label}): {error}"
        return None

    return Rule(methods.allowed + ", checked on every pair", methods.check, check_models,
                '["student", "kd", "fitnet@middle", "ofa"]')
