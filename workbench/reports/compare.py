"""What the ``distill`` report calls in its kernel: distillation methods by name, the methods × seeds
grid of training runs, and the results table (mean ± std over seeds) with the command that made it.

A method string maps to :class:`~workbench.train.Distiller` terms and layers (``"student"`` is the student
trained alone on the labels; the syntax, the terms and their placement on the models' stages are in
:mod:`workbench.reports.methods`, which holds ``METHODS`` and ``method_distiller``). Everything here
composes :func:`workbench.train.fit`,
:func:`workbench.train.accuracy` and :func:`workbench.similarity.cka_matrix`.
"""
from __future__ import annotations

import shlex
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from torch import nn

from workbench.data import num_samples
from workbench.files import write_atomic
from workbench.probes.cka_result import CKAResult
from workbench.probes.cka_stream import cka_matrix
from workbench.reports import progress as progress_events
from workbench.reports.methods import (  # METHODS, Method, _middle, method_distiller moved there; re-exported
    METHODS, Method, MethodSpec, _middle, check_feature_layers, check_method_layers, describe_method,  # noqa: F401
    method_distiller, parse_method,
)
from workbench.train.fit import accuracy, fit

__all__ = [
    "METHODS", "Method", "Comparison", "method_distiller", "run_comparison", "command_line", "seeded_model",
    "training_set", "models_summary", "cka_grid", "check_results_path",
]

def _parsed(method: str) -> MethodSpec:
    try:
        return parse_method(method)
    except ValueError as error:
        raise ValueError(f"methods: {error}") from None


def _total_steps(train: Any, batch_size: int, epochs: int) -> int | None:
    """The optimizer steps of a run (what TAID's schedule spans), as fit will batch ``train``."""
    from workbench.train.distributed import EpochBatches

    per_epoch = EpochBatches(train, batch_size, 0, 0, 1).per_epoch
    return None if per_epoch is None else epochs * per_epoch


def _matched_cka(result: CKAResult) -> float:
    """Mean CKA of stage i ↔ stage i (equal stage counts), else of each student stage's best teacher stage."""
    values = np.asarray(result.values)
    if values.shape[0] == values.shape[1]:
        return float(np.mean(np.diag(values)))
    return float(result.best_matches()["cka"].mean())


@dataclass
class Comparison:
    """The runs of :func:`run_comparison`: one row per (method, seed) in ``runs`` (``accuracy`` on the test
    data, ``matched_cka``: mean CKA of matched stages on the probe, ``seconds``), each run's ``histories``
    and final ``cka`` matrix, ``before`` (teacher vs the untrained student of the first seed) and the
    teacher's test ``teacher_accuracy``. ``table()`` gives mean ± std per method.

    ``interrupted``: ``None`` for a complete comparison; else the run that was stopped (Ctrl-C, a stop
    button): ``{"method", "seed", "epoch", "step", "reason"}``. Its partial history is in ``histories``
    but not in ``runs``; :attr:`missing` lists the ``planned`` runs that did not finish.
    """

    runs: pd.DataFrame
    histories: dict[tuple[str, int], pd.DataFrame] = field(default_factory=dict)
    cka: dict[tuple[str, int], CKAResult] = field(default_factory=dict)
    before: CKAResult | None = None
    teacher_accuracy: float | None = None
    settings: dict[str, Any] = field(default_factory=dict)
    interrupted: dict[str, Any] | None = None
    planned: list[tuple[str, int]] = field(default_factory=list)

    @property
    def methods(self) -> list[str]:
        """The methods in the order they were run."""
        return list(dict.fromkeys(self.runs["method"]))

    @property
    def missing(self) -> list[tuple[str, int]]:
        """The planned ``(method, seed)`` runs with no result (after an interruption)."""
        done = set(zip(self.runs["method"], self.runs["seed"]))
        return [run for run in self.planned if run not in done]

    def missing_text(self) -> str:
        """A Markdown sentence on an interrupted comparison: where it stopped and which runs are missing
        (``""`` when complete).

        Example:
            >>> runs = pd.DataFrame({"method": ["student"], "seed": [0]})
            >>> stop = {"method": "kd", "seed": 0, "epoch": 2, "step": 7, "reason": "KeyboardInterrupt"}
            >>> Comparison(runs, interrupted=stop, planned=[("student", 0), ("kd", 0), ("kd", 1)]).missing_text()
            '**Interrupted** (KeyboardInterrupt) in `kd` seed 0 at epoch 2, step 7: 2 of 3 runs missing (`kd` seed 0, `kd` seed 1); the table holds the finished runs only.'
        """
        missing = self.missing
        if self.interrupted is None and not missing:
            return ""
        stop = self.interrupted or {}
        where = f" in `{stop['method']}` seed {stop['seed']}" if "method" in stop else ""
        at = f" at epoch {stop['epoch']}, step {stop['step']}" if "epoch" in stop and "step" in stop else ""
        runs = ", ".join(f"`{method}` seed {seed}" for method, seed in missing)
        return (f"**Interrupted** ({stop.get('reason', 'stopped')}){where}{at}: {len(missing)} of "
                f"{len(self.planned)} runs missing ({runs}); the table holds the finished runs only.")

    def table(self) -> pd.DataFrame:
        """Per method: seeds, test accuracy mean and sample std (%; NaN for a single seed: one run has no
        spread), Δ vs ``"student"`` (points), ``wins``: on how many of the ``paired_seeds`` (seeds the
        student alone also ran with: same initial weights and batch order) the method beat the student
        alone, and the matched-stage CKA mean."""
        grouped = self.runs.groupby("method", sort=False)
        table = pd.DataFrame({
            "seeds": grouped["seed"].count(),
            "accuracy_mean": 100 * grouped["accuracy"].mean(),
            "accuracy_std": 100 * grouped["accuracy"].std(ddof=1),
            "matched_cka": grouped["matched_cka"].mean(),
            "minutes": grouped["seconds"].sum() / 60,
        })
        if "student" in table.index:
            table.insert(3, "vs_student", table["accuracy_mean"] - table.loc["student", "accuracy_mean"])
            alone = self.runs[self.runs["method"] == "student"].set_index("seed")["accuracy"]
            paired = self.runs[self.runs["seed"].isin(alone.index)]
            better = paired["accuracy"].to_numpy() > alone.loc[paired["seed"]].to_numpy()
            table.insert(4, "wins", pd.Series(better, index=paired.index).groupby(paired["method"]).sum())
            table.insert(5, "paired_seeds", paired.groupby("method")["seed"].count())
        return table

    def to_markdown(self, flags: Sequence[Any] = ()) -> str:
        """The table as Markdown: ``accuracy % (mean ± std)`` per method (``± n/a`` for one seed), the
        teacher's accuracy last.

        ``flags``: the report's sanity flags (:mod:`workbench.reports.sanity`). While any stands, a line
        above the table says the methods must not be ranked by it, and each flagged row is marked
        (*not converged*, *near chance*)."""
        from workbench.reports.sanity import row_marks

        table = self.table()
        marks = row_marks(flags)
        lines = []
        if flags:
            lines += ["**Not conclusive: the sanity checks flag problems** (rows marked *not converged* or *near "
                      "chance*): do not rank the methods by these numbers.", ""]
        lines += ["| method | test accuracy % (mean ± std) | vs student (points) | beats student (paired seeds) "
                  "| matched-stage CKA | seeds |", "|---|---|---|---|---|---|"]
        for name, row in table.iterrows():
            compared = "vs_student" in table and name != "student"
            delta = f"{row['vs_student']:+.2f}" if compared else "—"
            wins = f"{int(row['wins'])}/{int(row['paired_seeds'])}" if compared else "—"
            cka = "—" if np.isnan(row["matched_cka"]) else f"{row['matched_cka']:.3f}"
            spread = "n/a" if np.isnan(row["accuracy_std"]) else f"{row['accuracy_std']:.2f}"
            label = name.replace("*", "\\*")  # a method's weight star is not emphasis
            label += "".join(f" (*{mark}*)" for mark in marks.get(name, []))
            lines.append(f"| {label} | {row['accuracy_mean']:.2f} ± {spread} | {delta} | {wins} "
                         f"| {cka} | {int(row['seeds'])} |")
        if self.teacher_accuracy is not None:
            teacher = "*teacher*" + "".join(f" (*{mark}*)" for mark in marks.get("teacher", []))
            lines.append(f"| {teacher} | {100 * self.teacher_accuracy:.2f} | | | | |")
        if self.missing_text():
            lines += ["", self.missing_text()]
        return "\n".join(lines)

    def curves(self) -> pd.DataFrame:
        """Learning curves, mean over seeds: ``method, epoch, step, loss, ce, eval_accuracy`` per epoch end."""
        frames = []
        for (method, seed), history in self.histories.items():
            ends = history.groupby("epoch", sort=True).tail(1)
            frame = ends[["epoch", "step", "loss"] + [c for c in ("ce", "eval_accuracy") if c in ends]].copy()
            frame.insert(0, "method", method)
            frames.append(frame)
        curves = pd.concat(frames).groupby(["method", "epoch"], sort=False).mean(numeric_only=True).reset_index()
        return curves

    def plot(self, axes: Any = None) -> Any:
        """Matplotlib: test accuracy and training cross-entropy per epoch (mean over seeds); returns the axes."""
        import matplotlib.pyplot as plt

        if axes is None:
            _, axes = plt.subplots(1, 2, figsize=(11, 4))
        curves = self.curves()
        for method in self.methods:
            rows = curves[curves["method"] == method]
            if "eval_accuracy" in rows:
                axes[0].plot(rows["epoch"], 100 * rows["eval_accuracy"], marker="o", label=method)
            axes[1].plot(rows["epoch"], rows["ce"] if "ce" in rows and rows["ce"].notna().all() else rows["loss"],
                         marker="o", label=method)
        axes[0].set(xlabel="epoch", ylabel="test accuracy %", title="test accuracy (mean over seeds)")
        axes[1].set(xlabel="epoch", ylabel="cross-entropy", title="training cross-entropy, last batch of the epoch")
        axes[0].legend(fontsize="small")
        return axes

    def figure(self) -> Any:
        """Plotly version of the accuracy curves in :meth:`plot`, one trace per method."""
        import plotly.graph_objects as go

        curves = self.curves()
        figure = go.Figure()
        for method in self.methods:
            rows = curves[curves["method"] == method]
            if "eval_accuracy" in rows:
                figure.add_trace(go.Scatter(x=rows["epoch"], y=100 * rows["eval_accuracy"], mode="lines+markers",
                                            name=method))
        figure.update_layout(title="test accuracy per epoch (mean over seeds)", xaxis_title="epoch",
                             yaxis_title="test accuracy %", legend_title="method")
        return figure

    def save_markdown(self, path: str | Path, command: str = "", *, overwrite: bool = False,
                      flags: Sequence[Any] = ()) -> Path:
        """Write the table, the settings and ``command`` (how to re-run it) to ``path`` (a ``.md`` file)
        atomically; returns the path. An existing file is replaced only with ``overwrite=True``
        (``FileExistsError`` otherwise); another suffix is a ``ValueError``. ``flags``: the sanity
        flags, marked in the table as by :meth:`to_markdown`."""
        path = check_results_path(path, overwrite)
        settings = ", ".join(f"{key}={value!r}" for key, value in self.settings.items())
        text = ["# Distillation methods compared", ""]
        if command:
            text += [f"Made by `{command}` on {time.strftime('%Y-%m-%d')}.", ""]
        text += [f"Settings: {settings}.", "", self.to_markdown(flags), "",
                 "Test accuracy on the held-out split after the last epoch; mean ± sample std over seeds "
                 "(the seed sets the student's initial weights and the batch order). Matched-stage CKA: "
                 "mean debiased linear CKA of teacher stage i and student stage i on the probe images.", ""]
        feature_layers = self.settings.get("feature_layers", "auto")
        weights = self.settings.get("weights") or {}
        text += ["Methods:", ""] + [f"- `{name}`: {describe_method(name, feature_layers, weights.get(name))}"
                                    for name in self.methods]
        return write_atomic(path, "\n".join(text) + "\n")


def check_results_path(path: str | Path, overwrite: bool = False) -> Path:
    """``path`` as a :class:`~pathlib.Path` if a results table may be written there: a ``ValueError`` unless it
    ends in ``.md``, a ``FileExistsError`` if it exists and ``overwrite`` is false.

    Example:
        >>> check_results_path("reports/results/new_table.md").name
        'new_table.md'
        >>> check_results_path("table.txt")
        Traceback (most recent call last):
        ...
        ValueError: the results table must be a Markdown file ending in .md, got 'table.txt'
    """
    path = Path(path)
    if path.suffix != ".md":
        raise ValueError(f"the results table must be a Markdown file ending in .md, got {str(path)!r}")
    if path.exists() and not overwrite:
        raise FileExistsError(f"{str(path)!r} exists: pass overwrite=True (report: --force or "
                              "-p overwrite_results=true) to replace it, or give another file name")
    return path


def run_comparison(
    teacher: nn.Module,
    make_student: Callable[[int], nn.Module],
    train: Any,
    test: Any,
    methods: Sequence[str] = ("student", "kd"),
    seeds: Sequence[int] = (0,),
    *,
    epochs: int = 1,
    lr: float = 5e-3,
    batch_size: int = 64,
    device: str = "auto",
    probe: Any = None,
    weights: dict[str, float] | None = None,
    feature_layers: str = "auto",
    callbacks: Callable[[str, int], list[Any]] | None = None,
    on_trained: Callable[[str, int, nn.Module], None] | None = None,
    progress: bool = False,
    log: Callable[[str], None] | None = None,
) -> Comparison:
    """Train ``make_student(seed)`` alone and with each method, for every seed; score each on ``test``.

    Every run uses :func:`fit` with AdamW at ``lr``, a cosine schedule, ``batch_size`` and ``seed``, with
    ``test`` as the evaluation data (so histories carry ``eval_accuracy`` per epoch). With ``probe``
    images, each trained student's stages are compared with the teacher's by ``cka_matrix`` (and
    ``before``: the untrained student of the first seed). ``methods`` are method strings
    (:mod:`workbench.reports.methods`: ``"kd"``, ``"kd+fitnet@blocks.1"``, ``"at@stages"``, ...), parsed and
    their layers checked on ``make_student(seeds[0])`` before anything trains; ``feature_layers`` places
    feature terms written without ``@``; ``weights`` maps a method to the weight of its terms written
    without ``*weight``. A run that comes back interrupted (Ctrl-C, a stop request) ends the comparison:
    the finished runs are returned, with ``interrupted`` and ``missing`` set. ``callbacks(method, seed)``
    gives extra callbacks per run (e.g. a live ``TrainingMonitor``). ``on_trained(method, seed, model)`` is
    called after each finished run (not an interrupted one) with what was trained: the student itself for
    ``"student"``, else its :class:`~workbench.train.Distiller` (``.student``, its terms, an OFA-KD
    distiller's branches), e.g. to measure more than the table does before the model is dropped; what it
    returns is ignored. A short last batch is merged into
    the one before it by ``fit`` (``last_batch="merge"``), so batch terms such as CKALoss get enough samples.

    Example:
        >>> import torch
        >>> from workbench import models
        >>> from workbench.reports.compare import run_comparison
        >>> _ = torch.manual_seed(0); x, y = torch.randn(64, 1, 16, 16), torch.randint(0, 10, (64,))
        >>> teacher = models.create("cnn", widths=(8, 16), img_size=16).eval()
        >>> make = lambda seed: models.create("cnn", widths=(4, 8), img_size=16)
        >>> result = run_comparison(teacher, make, (x, y), (x, y), ["student", "kd"], [0, 1], batch_size=32,
        ...                         device="cpu", probe=x[:32])
        >>> result.table()["seeds"].tolist(), len(result.runs)
        ([2, 2], 4)
        >>> seen = []
        >>> _ = run_comparison(teacher, make, (x, y), (x, y), ["student", "kd"], [0], batch_size=32, device="cpu",
        ...                    on_trained=lambda method, seed, model: seen.append((method, type(model).__name__)))
        >>> seen
        [('student', 'TinyCNN'), ('kd', 'Distiller')]
    """
    specs = [_parsed(method) for method in methods]
    if not methods or not seeds:
        raise ValueError(f"need at least one method and one seed, got methods={list(methods)}, seeds={list(seeds)}")
    if len(set(seeds)) != len(seeds) or len(set(map(str, specs))) != len(methods):
        raise ValueError(f"methods and seeds must not repeat, got methods={list(methods)}, seeds={list(seeds)}")
    feature_layers = check_feature_layers(feature_layers)
    untrained = make_student(seeds[0])
    for spec in specs:  # a layer that does not exist fails here, before anything trains
        check_method_layers(spec, teacher, untrained, feature_layers)
    weights = dict(weights or {})
    rows, histories, results = [], {}, {}

    def measure(student: nn.Module, label: str) -> CKAResult:
        result = cka_matrix(teacher, student, probe, device=device, batch_size=max(batch_size, 128), progress=False)
        result.teacher_name, result.student_name = "teacher", label
        return result

    before = measure(untrained, "untrained student") if probe is not None else None
    uses_taid = any(term.name == "taid" for spec in specs for term in spec.terms)
    total_steps = _total_steps(train, batch_size, epochs) if uses_taid else None
    interrupted = None
    progress_events.emit("plan", runs=len(methods) * len(seeds), epochs=epochs)  # for the CLI's time left
    for method in methods:
        for seed in seeds:
            student = make_student(seed)
            model = method_distiller(method, teacher, student, weights.get(method), feature_layers, data=train,
                                     total_steps=total_steps, seed=seed)
            started = time.perf_counter()
            history = fit(model, train, test, epochs=epochs, lr=lr, batch_size=batch_size, schedule="cosine",
                          seed=seed, device=device, progress=progress,
                          callbacks=[*(callbacks(method, seed) if callbacks else ()),
                                     *progress_events.fit_callbacks(method=method, seed=seed)])
            seconds = time.perf_counter() - started
            if history.attrs.get("interrupted"):  # Ctrl-C or a stop request: keep what ran, start nothing new
                histories[(method, seed)] = history
                interrupted = {"method": method, "seed": seed, **dict(history.attrs["interrupted"])}
                break
            score = float(history["eval_accuracy"].dropna().iloc[-1])  # fit scored the last epoch on test
            histories[(method, seed)] = history
            matched = float("nan")
            if probe is not None:
                results[(method, seed)] = measure(student, f"student ({method}, seed {seed})")
                matched = _matched_cka(results[(method, seed)])
            rows.append({"method": method, "seed": seed, "accuracy": score, "matched_cka": matched, "seconds": seconds})
            if on_trained is not None:
                on_trained(method, seed, model)
            if log is not None:
                log(f"{method} seed {seed}: test accuracy {score:.2%} in {seconds:.1f} s")
        if interrupted is not None:
            break
    progress_events.emit("plan_end")
    settings = {"epochs": epochs, "lr": lr, "batch_size": batch_size, "seeds": list(seeds), "weights": weights,
                "feature_layers": feature_layers, "train_samples": num_samples(train)}
    runs = pd.DataFrame(rows, columns=["method", "seed", "accuracy", "matched_cka", "seconds"])
    return Comparison(runs, histories, results, before, accuracy(teacher, test, device=device), settings,
                      interrupted=interrupted, planned=[(method, seed) for method in methods for seed in seeds])


def command_line(report: str, values: dict[str, Any], defaults: dict[str, Any]) -> str:
    """The ``kd-workbench report`` command that re-runs ``report`` with ``values`` (only non-defaults).

    Example:
        >>> command_line("distill", {"epochs": 3, "seeds": [0, 1], "lr": 0.005}, {"epochs": 1, "seeds": [0], "lr": 0.005})
        "kd-workbench report distill -p epochs=3 -p 'seeds=[0, 1]'"
    """
    import json

    parts = ["kd-workbench", "report", report]
    for name, value in values.items():
        if name in defaults and value == defaults[name]:
            continue
        text = value if isinstance(value, str) else json.dumps(value)
        parts += ["-p", shlex.quote(f"{name}={text}")]
    return " ".join(parts)


def seeded_model(name: str, dataset: str = "digits", seed: int = 0, **model_kwargs: Any) -> nn.Module:
    """A fresh, untrained ``models.create(name)`` for ``dataset``'s images, its initial weights set by ``seed``.

    The caller's random stream is left as it was.

    Example:
        >>> from workbench.reports.compare import seeded_model
        >>> a, b = seeded_model("cnn_small", seed=1), seeded_model("cnn_small", seed=1)
        >>> bool((a.head.weight == b.head.weight).all())
        True
    """
    import torch

    from workbench import models
    from workbench.reports.notebook import CHANNELS, IMAGE_SIZE
    from workbench.train.cache import num_classes

    kwargs = {"num_classes": num_classes(dataset), "in_chans": CHANNELS, **model_kwargs}
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return models.create_sized(name, IMAGE_SIZE, **kwargs)


def training_set(dataset: str = "digits", n_train: int = 0) -> Any:
    """The training images the teachers were trained on (see ``workbench.train.cache.training_data``),
    the first ``n_train`` of them when ``n_train > 0``.

    Example:
        >>> from workbench.reports.compare import training_set
        >>> len(training_set("digits")), len(training_set("digits", 100)), len(training_set("animals"))
        (1347, 100, 7772)
    """
    from torch.utils.data import Subset

    from workbench.reports.notebook import CHANNELS, IMAGE_SIZE
    from workbench.train.cache import training_data

    data = training_data(dataset, IMAGE_SIZE, CHANNELS)
    return Subset(data, range(min(n_train, len(data)))) if n_train > 0 else data


def models_summary(teacher: nn.Module, student: nn.Module, train: Any, test: Any) -> str:
    """One Markdown line: both models' parameter counts and forward FLOPs per sample (of ``test``'s first
    sample, :func:`workbench.models.count_flops`) and the numbers of training and test samples.

    Example:
        >>> import torch
        >>> from torch import nn
        >>> test = (torch.zeros(5, 4), torch.zeros(5, dtype=torch.long))
        >>> models_summary(nn.Linear(4, 2), nn.Linear(4, 1), range(10), test)
        '**Teacher** Linear, 10 parameters, 16 FLOPs per sample; **student** Linear, 5 parameters (50% of the teacher), 8 FLOPs per sample (50%). 10 training and 5 test samples.'
    """
    from workbench.data import num_samples
    from workbench.layer_table import first_sample
    from workbench.models.stats import count_flops, count_parameters

    example = first_sample(test)
    (teacher_parameters, student_parameters) = (count_parameters(teacher), count_parameters(student))
    teacher_flops, student_flops = count_flops(teacher, example), count_flops(student, example)
    share = student_parameters / max(teacher_parameters, 1)
    return (f"**Teacher** {type(teacher).__name__}, {teacher_parameters:,} parameters, {teacher_flops:,} FLOPs per "
            f"sample; **student** {type(student).__name__}, {student_parameters:,} parameters ({share:.0%} of the "
            f"teacher), {student_flops:,} FLOPs per sample ({student_flops / max(teacher_flops, 1):.0%}). "
            f"{num_samples(train):,} training and {num_samples(test):,} test samples.")


def cka_grid(comparison: Comparison, seed: int | None = None) -> Any:
    """Matplotlib: the CKA heatmap of the untrained student, then one per method (``seed``: default the
    first); returns the figure."""
    import matplotlib.pyplot as plt

    seed = comparison.runs["seed"].iloc[0] if seed is None else seed
    results = ([comparison.before] if comparison.before is not None else []) + [
        comparison.cka[(method, seed)] for method in comparison.methods if (method, seed) in comparison.cka
    ]
    if not results:
        raise ValueError("no CKA results: run run_comparison with probe= images")
    columns = min(4, len(results))
    rows = -(-len(results) // columns)
    figure, axes = plt.subplots(rows, columns, figsize=(3.6 * columns, 3.2 * rows), squeeze=False)
    for ax, result in zip(axes.flat, results):
        result.plot(ax=ax)
        ax.set_title(result.student_name, fontsize="small")
    for ax in list(axes.flat)[len(results):]:
        ax.axis("off")
    return figure
