"""What the ``distill`` report calls in its kernel: distillation methods by name, the methods × seeds
grid of training runs, and the results table (mean ± std over seeds) with the command that made it.

A method name maps to :class:`~workbench.train.Distiller` terms and layers (``"student"`` is the student
trained alone on the labels); feature terms are placed on the models' stages (see
:func:`workbench.stage_names`). Everything here composes :func:`workbench.train.fit`,
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

from workbench import losses
from workbench.capture import stage_names
from workbench.data import num_samples
from workbench.files import write_atomic
from workbench.probes.cka_result import CKAResult
from workbench.probes.cka_stream import cka_matrix
from workbench.train.distiller import Distiller
from workbench.train.fit import accuracy, fit

__all__ = [
    "METHODS", "Method", "Comparison", "method_distiller", "run_comparison", "command_line", "seeded_model",
    "training_set", "models_summary", "cka_grid",
]

TermsAndLayers = tuple[dict[str, tuple[nn.Module, float]], dict[str, tuple[str, str]]]


@dataclass(frozen=True)
class Method:
    """A distillation method: ``make(teacher_stages, student_stages, weight) -> (terms, layers)`` for a
    :class:`Distiller` (``make=None``: the student alone), its default term weight and a description."""

    name: str
    description: str
    make: Callable[[list[str], list[str], float], TermsAndLayers] | None = None
    weight: float = 1.0


def _middle(stages: list[str]) -> str:
    return stages[(len(stages) - 1) // 2]


METHODS: dict[str, Method] = {
    method.name: method
    for method in (
        Method("student", "the student alone: cross-entropy on the labels"),
        Method("kd", "CE + KD(T=4) on the logits (Hinton et al. 2015)",
               lambda t, s, w: ({"kd": (losses.KD(T=4.0), w)}, {})),
        Method("dkd", "CE + DKD(α=1, β=8, T=4) on the logits (Zhao et al. 2022)",
               lambda t, s, w: ({"dkd": (losses.DKD(alpha=1.0, beta=8.0, T=4.0), w)}, {})),
        Method("dist", "CE + DIST(β=1, γ=1) on the logits (Huang et al. 2022)",
               lambda t, s, w: ({"dist": (losses.DIST(), w)}, {}), 2.0),
        Method("fitnet", "CE + FitNet hint (1×1-conv projector, MSE) between the middle stages (Romero et al. 2015)",
               lambda t, s, w: ({"fitnet": (losses.FitNet(), w)}, {"fitnet": (_middle(t), _middle(s))})),
        Method("rkd", "CE + RKD distance and angle between the last stages (Park et al. 2019)",
               lambda t, s, w: ({"rkd": (losses.RKD(), w)}, {"rkd": (t[-1], s[-1])})),
        Method("cka", "CE + CKALoss (1 − linear CKA) between the last stages",
               lambda t, s, w: ({"cka": (losses.CKALoss(), w)}, {"cka": (t[-1], s[-1])})),
    )
}


def method_distiller(name: str, teacher: nn.Module, student: nn.Module, weight: float | None = None) -> nn.Module:
    """The thing to train for method ``name``: a :class:`Distiller`, or ``student`` itself for ``"student"``.

    ``weight`` overrides the method's term weight (cross-entropy keeps weight 1).

    Example:
        >>> from workbench import models
        >>> from workbench.reports.compare import method_distiller
        >>> teacher, student = models.create("cnn").eval(), models.create("cnn_small")
        >>> method_distiller("fitnet", teacher, student).layers
        {'fitnet': ('blocks.1', 'blocks.1')}
        >>> method_distiller("student", teacher, student) is student
        True
    """
    if name not in METHODS:
        raise ValueError(f"unknown method {name!r}; the methods are {list(METHODS)}")
    method = METHODS[name]
    if method.make is None:
        return student
    terms, layers = method.make(stage_names(teacher), stage_names(student), method.weight if weight is None else weight)
    return Distiller(teacher, student, terms, layers=layers)


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
    """

    runs: pd.DataFrame
    histories: dict[tuple[str, int], pd.DataFrame] = field(default_factory=dict)
    cka: dict[tuple[str, int], CKAResult] = field(default_factory=dict)
    before: CKAResult | None = None
    teacher_accuracy: float | None = None
    settings: dict[str, Any] = field(default_factory=dict)

    @property
    def methods(self) -> list[str]:
        """The methods in the order they were run."""
        return list(dict.fromkeys(self.runs["method"]))

    def table(self) -> pd.DataFrame:
        """Per method: seeds, test accuracy mean and std (%), Δ vs ``"student"`` (points), ``wins``: on how
        many of the ``paired_seeds`` (seeds the student alone also ran with: same initial weights and batch
        order) the method beat the student alone, and the matched-stage CKA mean."""
        grouped = self.runs.groupby("method", sort=False)
        table = pd.DataFrame({
            "seeds": grouped["seed"].count(),
            "accuracy_mean": 100 * grouped["accuracy"].mean(),
            "accuracy_std": 100 * grouped["accuracy"].std(ddof=1).fillna(0.0),
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

    def to_markdown(self) -> str:
        """The table as Markdown: ``accuracy % (mean ± std)`` per method, the teacher's accuracy last."""
        table = self.table()
        lines = ["| method | test accuracy % (mean ± std) | vs student (points) | beats student (paired seeds) "
                 "| matched-stage CKA | seeds |", "|---|---|---|---|---|---|"]
        for name, row in table.iterrows():
            compared = "vs_student" in table and name != "student"
            delta = f"{row['vs_student']:+.2f}" if compared else "—"
            wins = f"{int(row['wins'])}/{int(row['paired_seeds'])}" if compared else "—"
            cka = "—" if np.isnan(row["matched_cka"]) else f"{row['matched_cka']:.3f}"
            lines.append(f"| {name} | {row['accuracy_mean']:.2f} ± {row['accuracy_std']:.2f} | {delta} | {wins} "
                         f"| {cka} | {int(row['seeds'])} |")
        if self.teacher_accuracy is not None:
            lines.append(f"| *teacher* | {100 * self.teacher_accuracy:.2f} | | | | |")
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

    def save_markdown(self, path: str | Path, command: str = "", *, overwrite: bool = False) -> Path:
        """Write the table, the settings and ``command`` (how to re-run it) to ``path`` (a ``.md`` file)
        atomically; returns the path. An existing file is replaced only with ``overwrite=True``
        (``FileExistsError`` otherwise); another suffix is a ``ValueError``."""
        path = Path(path)
        if path.suffix != ".md":
            raise ValueError(f"the results table must be a Markdown file ending in .md, got {str(path)!r}")
        if path.exists() and not overwrite:
            raise FileExistsError(f"{str(path)!r} exists: pass overwrite=True (report: --force or "
                                  "-p overwrite_results=true) to replace it, or give another file name")
        settings = ", ".join(f"{key}={value!r}" for key, value in self.settings.items())
        text = ["# Distillation methods compared", ""]
        if command:
            text += [f"Made by `{command}` on {time.strftime('%Y-%m-%d')}.", ""]
        text += [f"Settings: {settings}.", "", self.to_markdown(), "",
                 "Test accuracy on the held-out split after the last epoch; mean ± sample std over seeds "
                 "(the seed sets the student's initial weights and the batch order). Matched-stage CKA: "
                 "mean debiased linear CKA of teacher stage i and student stage i on the probe images.", ""]
        text += ["Methods:", ""] + [f"- `{name}`: {METHODS[name].description}" for name in self.methods
                                    if name in METHODS]
        return write_atomic(path, "\n".join(text) + "\n")


def _whole_batches(train: Any, batch_size: int, smallest: int = 4) -> Any:
    """``train`` without its last few samples when they would make a last batch of fewer than ``smallest``
    (batch terms such as CKALoss and RKD need several samples); the same data for every method."""
    from torch.utils.data import Dataset, Subset

    n_samples = num_samples(train)
    if not isinstance(train, Dataset) or n_samples is None or 0 < n_samples % batch_size >= smallest:
        return train
    if n_samples % batch_size == 0 or n_samples < batch_size:
        return train
    return Subset(train, range(n_samples - n_samples % batch_size))


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
    callbacks: Callable[[str, int], list[Any]] | None = None,
    progress: bool = False,
    log: Callable[[str], None] | None = None,
) -> Comparison:
    """Train ``make_student(seed)`` alone and with each method, for every seed; score each on ``test``.

    Every run uses :func:`fit` with AdamW at ``lr``, a cosine schedule, ``batch_size`` and ``seed``, with
    ``test`` as the evaluation data (so histories carry ``eval_accuracy`` per epoch). With ``probe``
    images, each trained student's stages are compared with the teacher's by ``cka_matrix`` (and
    ``before``: the untrained student of the first seed). ``weights`` overrides term weights by method;
    ``callbacks(method, seed)`` gives extra callbacks per run (e.g. a live ``TrainingMonitor``). A
    ``Dataset`` whose last batch would hold fewer than 4 samples loses those samples (for every method
    alike), since batch terms such as CKALoss need several.

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
    """
    unknown = [name for name in methods if name not in METHODS]
    if unknown:
        raise ValueError(f"unknown methods {unknown}; the methods are {list(METHODS)}")
    if not methods or not seeds:
        raise ValueError(f"need at least one method and one seed, got methods={list(methods)}, seeds={list(seeds)}")
    if len(set(seeds)) != len(seeds) or len(set(methods)) != len(methods):
        raise ValueError(f"methods and seeds must not repeat, got methods={list(methods)}, seeds={list(seeds)}")
    weights = dict(weights or {})
    train = _whole_batches(train, batch_size)
    rows, histories, results = [], {}, {}

    def measure(student: nn.Module, label: str) -> CKAResult:
        result = cka_matrix(teacher, student, probe, device=device, batch_size=max(batch_size, 128), progress=False)
        result.teacher_name, result.student_name = "teacher", label
        return result

    before = measure(make_student(seeds[0]), "untrained student") if probe is not None else None
    for method in methods:
        for seed in seeds:
            student = make_student(seed)
            model = method_distiller(method, teacher, student, weights.get(method))
            started = time.perf_counter()
            history = fit(model, train, test, epochs=epochs, lr=lr, batch_size=batch_size, schedule="cosine",
                          seed=seed, device=device, progress=progress,
                          callbacks=callbacks(method, seed) if callbacks else ())
            seconds = time.perf_counter() - started
            score = float(history["eval_accuracy"].dropna().iloc[-1])  # fit scored the last epoch on test
            histories[(method, seed)] = history
            matched = float("nan")
            if probe is not None:
                results[(method, seed)] = measure(student, f"student ({method}, seed {seed})")
                matched = _matched_cka(results[(method, seed)])
            rows.append({"method": method, "seed": seed, "accuracy": score, "matched_cka": matched, "seconds": seconds})
            if log is not None:
                log(f"{method} seed {seed}: test accuracy {score:.2%} in {seconds:.1f} s")
    settings = {"epochs": epochs, "lr": lr, "batch_size": batch_size, "seeds": list(seeds), "weights": weights,
                "train_samples": num_samples(train)}
    return Comparison(pd.DataFrame(rows), histories, results, before, accuracy(teacher, test, device=device), settings)


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
    """One Markdown line: both models' parameter counts and the numbers of training and test samples.

    Example:
        >>> from torch import nn
        >>> models_summary(nn.Linear(4, 2), nn.Linear(2, 2), range(10), range(5))
        '**Teacher** Linear, 10 parameters; **student** Linear, 6 parameters (60% of the teacher). 10 training and 5 test samples.'
    """
    from workbench.data import num_samples

    count = lambda model: sum(p.numel() for p in model.parameters())  # noqa: E731
    share = count(student) / max(count(teacher), 1)
    return (f"**Teacher** {type(teacher).__name__}, {count(teacher):,} parameters; **student** "
            f"{type(student).__name__}, {count(student):,} parameters ({share:.0%} of the teacher). "
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
