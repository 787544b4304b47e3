"""Sanity checks a report runs on its own results before it draws conclusions.

Four flags, each a sentence saying what is wrong and what to do:

* **near chance**: a model's held-out accuracy is within a quarter of the way from chance to 100 %
  (10 classes: below 32.5 %), or not above chance by a one-sided binomial test at p < 0.001;
* **still rising**: a training run whose held-out accuracy after the last epoch is more than
  :data:`RISING_POINTS` (3) points above its best before the last quarter of the epochs (at least the
  last epoch), or that trained a single epoch (nothing to tell convergence by); in the distill report
  the teacher's is a warning (every method learns from the same teacher);
* **too few CKA samples**: fewer samples than the estimator needs (:mod:`workbench.probes.sample_size`);
* **student larger than teacher**: the student has more parameters than its teacher — a warning: the
  measurements stay valid, so it does not withhold the conclusions.

A report shows :meth:`Sanity.to_markdown` at its top (the flags, then a table of the models:
parameters, FLOPs per sample, accuracy, training) and withholds or marks its conclusions while
:attr:`Sanity.blocking` is not empty.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field, replace

__all__ = [
    "Flag", "ModelCard", "Sanity", "RISING_POINTS", "CHANCE_MARGIN", "CHANCE_P_VALUE",
    "near_chance", "still_rising", "too_few_samples", "larger_student", "model_cards_table", "row_marks",
    "gap_sanity", "distill_sanity",
]

RISING_POINTS = 3.0
"""A rise of more than this many accuracy points over the last quarter of the epochs: not converged."""
CHANCE_MARGIN = 0.25
"""Accuracies below ``chance + CHANCE_MARGIN · (1 − chance)`` count as near chance."""
CHANCE_P_VALUE = 1e-3
"""An accuracy must beat chance by a one-sided binomial test at this level."""


@dataclass(frozen=True)
class Flag:
    """One sanity problem: its ``kind`` (``"near_chance"``, ``"still_rising"``, ``"few_samples"``,
    ``"student_larger"``), what it is about (``subject``), what is wrong and what to do; ``withholds``:
    whether the report's conclusions are withheld while it stands (False: a warning)."""

    kind: str
    subject: str
    problem: str
    advice: str
    withholds: bool = True

    def to_markdown(self) -> str:
        """One Markdown list item: the subject in bold (a warning says so), the problem, then what to do."""
        warning = " (warning)" if not self.withholds else ""
        return f"- **{self.subject}**{warning}: {self.problem} {self.advice}"


def near_chance(accuracy: float, n_samples: int, num_classes: int, subject: str, advice: str) -> Flag | None:
    """A ``"near_chance"`` flag when ``accuracy`` (on ``n_samples`` held-out samples, ``num_classes``
    classes) is not clearly above chance (see the module docstring), else None.

    Example:
        >>> near_chance(0.25, 450, 10, "student vit", "Train longer.").problem
        'held-out accuracy 25.0 % is near chance (10.0 % for 10 classes; below 32.5 % counts as near chance).'
        >>> near_chance(0.9, 450, 10, "student", "") is None
        True
    """
    from scipy.stats import binomtest

    if not 0.0 <= accuracy <= 1.0 or n_samples < 1 or num_classes < 2:
        raise ValueError(f"need an accuracy in [0, 1], n_samples >= 1 and num_classes >= 2, got "
                         f"{accuracy!r}, {n_samples!r}, {num_classes!r}")
    chance = 1.0 / num_classes
    margin = chance + CHANCE_MARGIN * (1.0 - chance)
    correct = round(accuracy * n_samples)
    p_value = binomtest(correct, n_samples, chance, alternative="greater").pvalue
    if accuracy >= margin and p_value < CHANCE_P_VALUE:
        return None
    if accuracy < margin:
        why = f"below {100 * margin:.1f} % counts as near chance"
    else:
        why = f"on {n_samples:,} samples it is not above chance by a binomial test, p = {p_value:.2g}"
    problem = (f"held-out accuracy {100 * accuracy:.1f} % is near chance ({100 * chance:.1f} % for "
               f"{num_classes} classes; {why}).")
    return Flag("near_chance", subject, problem, advice)


def still_rising(accuracies: Sequence[float], subject: str, advice: str) -> Flag | None:
    """A ``"still_rising"`` flag when the held-out accuracy per epoch (``accuracies[e]`` after epoch
    e + 1) was still rising at the end of training, or when there is a single epoch; else None.

    Rising: the last value exceeds the best before the last quarter of the epochs (at least one epoch)
    by more than :data:`RISING_POINTS` points.

    Example:
        >>> still_rising([0.2, 0.5, 0.7, 0.8, 0.9, 0.95], "student", "Train longer.").problem
        'held-out accuracy still rose 15.0 points over the last 2 of 6 epochs (80.0 % → 95.0 %): it had not converged.'
        >>> still_rising([0.2, 0.9, 0.95, 0.96, 0.96], "student", "") is None
        True
    """
    values = [float(value) for value in accuracies]
    if not values:
        raise ValueError(f"still_rising needs the held-out accuracy of at least one epoch for {subject}")
    if len(values) == 1:
        return Flag("still_rising", subject, "trained a single epoch: nothing tells whether it converged.", advice)
    last = max(1, round(len(values) / 4))
    before = max(values[:-last])
    rise = 100 * (values[-1] - before)
    if rise <= RISING_POINTS:
        return None
    problem = (f"held-out accuracy still rose {rise:.1f} points over the last {last} of {len(values)} epochs "
               f"({100 * before:.1f} % → {100 * values[-1]:.1f} %): it had not converged.")
    return Flag("still_rising", subject, problem, advice)


def too_few_samples(n_samples: int, kernel: str, debiased: bool, advice: str,
                    batch_size: int | None = None) -> Flag | None:
    """A ``"few_samples"`` flag when CKA on ``n_samples`` (streamed in batches of ``batch_size``) is
    unreliable for this estimator (:func:`workbench.probes.sample_size.sample_size_warning`), else None.

    Example:
        >>> too_few_samples(5, "linear", True, "Use -p n_samples=450.").problem[:30]
        'CKA on 5 samples is unreliable'
    """
    from workbench.probes.sample_size import sample_size_warning

    warning = sample_size_warning(n_samples, kernel, debiased, batch_size=batch_size)
    return None if warning is None else Flag("few_samples", "CKA", warning, advice)


def larger_student(teacher_parameters: int, student_parameters: int, advice: str) -> Flag | None:
    """A ``"student_larger"`` flag when the student has more parameters than its teacher, else None.

    Example:
        >>> flag = larger_student(6_274, 94_186, "Swap them.")
        >>> flag.problem.split(";")[0], flag.withholds
        ('the student has 94,186 parameters, 15.0× its teacher (6,274)', False)
    """
    if student_parameters <= teacher_parameters:
        return None
    ratio = student_parameters / max(teacher_parameters, 1)
    problem = (f"the student has {student_parameters:,} parameters, {ratio:.1f}× its teacher ({teacher_parameters:,}); "
               "the measurements stand, but this is not compression.")
    return Flag("student_larger", "student larger than teacher", problem, advice, withholds=False)


ROW_MARKS = {"still_rising": "not converged", "near_chance": "near chance"}


def row_marks(flags: Sequence[Flag]) -> dict[str, list[str]]:
    """Marks for a results table's rows: ``{"kd": ["not converged"], "teacher": ["near chance"]}`` from
    flags about ``method `kd``` or the ``teacher `...```.

    Example:
        >>> row_marks([Flag("still_rising", "method `kd`", "", ""), Flag("near_chance", "teacher `cnn`", "", "")])
        {'kd': ['not converged'], 'teacher': ['near chance']}
    """
    marks: dict[str, list[str]] = {}
    for flag in flags:
        if flag.kind not in ROW_MARKS:
            continue
        if flag.subject.startswith("method `"):
            row = flag.subject.split("`")[1]
        elif flag.subject.startswith("teacher"):
            row = "teacher"
        else:
            continue
        if ROW_MARKS[flag.kind] not in marks.setdefault(row, []):
            marks[row].append(ROW_MARKS[flag.kind])
    order = list(ROW_MARKS.values())  # "not converged" first, whatever order the flags came in
    return {row: sorted(found, key=order.index) for row, found in marks.items()}


@dataclass(frozen=True)
class ModelCard:
    """One model of a report: its role and name, parameters, forward FLOPs per sample, held-out accuracy
    (None: not measured) and how it was trained, in words."""

    role: str
    name: str
    parameters: int
    flops: int
    accuracy: float | None
    training: str


def _flops(flops: int) -> str:
    for unit, size in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if flops >= size:
            return f"{flops / size:.2f} {unit}"
    return f"{flops:,}"


def model_cards_table(cards: Sequence[ModelCard]) -> str:
    """The models as a Markdown table: role, model, parameters, FLOPs per sample, accuracy, training.

    Example:
        >>> print(model_cards_table([ModelCard("teacher", "cnn", 94_186, 19_466_752, 0.9867, "6 epochs")]))
        | role | model | parameters | FLOPs / sample | held-out accuracy | training |
        |---|---|---|---|---|---|
        | teacher | `cnn` | 94,186 | 19.47 M | 98.7 % | 6 epochs |
    """
    lines = ["| role | model | parameters | FLOPs / sample | held-out accuracy | training |", "|---|---|---|---|---|---|"]
    for card in cards:
        accuracy = "—" if card.accuracy is None else f"{100 * card.accuracy:.1f} %"
        lines.append(f"| {card.role} | `{card.name}` | {card.parameters:,} | {_flops(card.flops)} | {accuracy} "
                     f"| {card.training} |")
    return "\n".join(lines)


@dataclass
class Sanity:
    """A report's sanity checks: the ``flags`` raised, the ``cards`` of its models, and ``passed``: the
    checks that found nothing (in words, shown when there is no flag)."""

    flags: list[Flag] = field(default_factory=list)
    cards: list[ModelCard] = field(default_factory=list)
    passed: list[str] = field(default_factory=list)

    def add(self, flag: Flag | None, passed: str | None = None) -> None:
        """Keep ``flag``, or note ``passed`` (what was checked, if given) when it is None."""
        if flag is not None:
            self.flags.append(flag)
        elif passed:
            self.passed.append(passed)

    @property
    def ok(self) -> bool:
        """True when no check raised a flag."""
        return not self.flags

    @property
    def blocking(self) -> list[Flag]:
        """The flags that withhold the report's conclusions (every flag but warnings)."""
        return [flag for flag in self.flags if flag.withholds]

    def flagged(self, kind: str) -> list[str]:
        """The subjects flagged with ``kind``."""
        return [flag.subject for flag in self.flags if flag.kind == kind]

    def to_markdown(self) -> str:
        """The sanity box: a verdict, each flag with what to do (or the checks that passed), the models.

        Example:
            >>> box = Sanity([still_rising([0.1], "student", "Train longer.")]).to_markdown()
            >>> box.splitlines()[0]
            '**Sanity checks: 1 problem — the conclusions below are withheld until it is fixed.**'
        """
        blocking, warnings = len(self.blocking), len(self.flags) - len(self.blocking)
        if blocking:
            count = f"{blocking} problem{'s' if blocking > 1 else ''}"
            lines = [f"**Sanity checks: {count} — the conclusions below are withheld until "
                     f"{'they are' if blocking > 1 else 'it is'} fixed.**"]
        else:
            lines = ["**Sanity checks: passed" + (f", with {warnings} warning{'s' if warnings > 1 else ''}" if warnings
                                                 else "") + ".**" + (" " + "; ".join(self.passed) + "." if self.passed
                                                                     else "")]
        if self.flags:
            lines += [""] + [flag.to_markdown() for flag in self.flags]
        if self.cards:
            lines += ["", model_cards_table(self.cards)]
        return "\n".join(lines)


def _training_text(record: object, weights: object) -> str:
    if record is None:
        return f"loaded from `{weights}`" if weights else "not trained here (no training record)"
    recipe = f"the {record.recipe} recipe" if record.recipe != "custom" else "set by hand"
    epochs = f"{record.epochs} epoch{'s' if record.epochs != 1 else ''}"
    return f"{epochs} at lr {record.lr:g} ({recipe}) on {record.dataset}"


def _model_flags(sanity: Sanity, role: str, name: str, model: object, accuracy: float | None, n_samples: int,
                 num_classes: int, epochs_parameter: str, lr_parameter: str | None, weights: object = None,
                 rising_withholds: bool = True) -> None:
    """Near-chance and still-rising checks of one model; the advice names the report's parameters.
    ``rising_withholds=False``: a still-rising run is a warning only."""
    from workbench.train.cache import training_record
    from workbench.train.recipes import default_recipe

    record = training_record(model)
    subject = f"{role} `{name}`"
    longer = f"-p {epochs_parameter}=<more epochs>"
    if record is not None:
        recipe = default_recipe(name)
        more = max(2 * record.epochs, record.epochs + 10)
        longer = (f"leave out -p {epochs_parameter} for the {recipe.family} recipe's {recipe.epochs} epochs, or "
                  f"-p {epochs_parameter}={more}" if record.recipe == "custom" and record.epochs < recipe.epochs
                  else f"-p {epochs_parameter}={more}")
    if accuracy is not None:
        if record is None and weights:
            advice = f"Check the weights file `{weights}` (trained on this data set, for this model?)."
        else:
            lower = f" or at a lower learning rate (-p {lr_parameter}={record.lr / 3:.2g})" if (
                lr_parameter and record is not None) else ""
            advice = f"Train longer ({longer}){lower}."
        sanity.add(near_chance(accuracy, n_samples, num_classes, subject, advice),
                   f"{role} above chance")
    if record is not None:
        rising = still_rising(record.eval_accuracy, subject, f"Train longer: {longer}.")
        sanity.add(rising if rising is None or rising_withholds else replace(rising, withholds=False),
                   f"{role} converged")


def gap_sanity(
    teacher: str, student: str, teacher_model: object, student_model: object, data: object, predictions: object,
    cka: object, kernel: str, debiased: bool, dataset: str, teacher_weights: object = None,
    student_weights: object = None, batch_size: int | None = None,
) -> Sanity:
    """The gap report's checks: both models above chance (on the report's held-out samples) and trained
    to convergence (their training records), CKA on enough samples, the student no larger than the
    teacher; with a card per model (parameters, FLOPs per sample, accuracy, training).

    Example:
        >>> import numpy as np
        >>> from workbench import models, reports
        >>> from workbench.similarity import CKAResult, PredictionResult
        >>> teacher, student = models.create("cnn", widths=(8, 16)), models.create("cnn", widths=(4, 8))
        >>> predictions = PredictionResult(np.array([[40, 5], [5, 50]]), agreement=0.9, kl=0.1, temperature=1.0,
        ...                                n_samples=100, teacher_accuracy=0.95, student_accuracy=0.9)
        >>> cka = CKAResult(np.eye(2), ["blocks.0", "blocks.1"], ["blocks.0", "blocks.1"], n_samples=5)
        >>> sanity = gap_sanity("cnn", "cnn", teacher, student, reports.evaluation_data("digits"), predictions, cka,
        ...                     "linear", True, "digits")
        >>> [flag.kind for flag in sanity.flags], sanity.cards[1].parameters
        (['few_samples'], 438)
    """
    from workbench.layer_table import first_sample
    from workbench.models.stats import count_flops, count_parameters
    from workbench.train.cache import num_classes, training_record

    sanity, classes, example = Sanity(), num_classes(dataset), first_sample(data)
    roles = (("teacher", teacher, teacher_model, predictions.teacher_accuracy, teacher_weights),
             ("student", student, student_model, predictions.student_accuracy, student_weights))
    for role, name, model, accuracy, weights in roles:
        sanity.cards.append(ModelCard(role, name, count_parameters(model), count_flops(model, example), accuracy,
                                      _training_text(training_record(model), weights)))
        _model_flags(sanity, role, name, model, accuracy, predictions.n_samples, classes,
                     f"{role}_epochs", f"{role}_lr", weights)
    needed = _needed(kernel, debiased)
    sanity.add(too_few_samples(cka.n_samples, kernel, debiased,
                               f"Measure on more samples (-p n_samples={needed})"
                               + ("." if debiased else " in larger batches (-p batch_size) or use the debiased "
                                                       "estimator (-p debiased=true)."), batch_size),
               f"CKA on {cka.n_samples:,} samples")
    sanity.add(larger_student(sanity.cards[0].parameters, sanity.cards[1].parameters,
                              f"Swap them (-p teacher={student} -p student={teacher}) or choose a smaller student."),
               "student smaller than teacher")
    return sanity


def _needed(kernel: str, debiased: bool) -> int:
    from workbench.probes.sample_size import minimum_samples

    return minimum_samples(kernel, debiased)


def distill_sanity(
    comparison: object, teacher: str, student: str, teacher_model: object, student_model: object,
    test: object, dataset: str, teacher_weights: object = None,
    smaller_student: str = "Choose a smaller student (-p student=... -p student_kwargs=...).",
) -> Sanity:
    """The distill report's checks: the teacher above chance and converged, each method's student above
    chance and converged (its held-out accuracy per epoch, mean over seeds), CKA on enough probe images
    (the debiased linear CKA of :func:`~workbench.reports.run_comparison`), the student no larger than
    the teacher; with cards for the teacher and the student. ``smaller_student``: the advice when the
    student is the larger model (the parameters that choose it differ between reports).

    Example:
        >>> import pandas as pd
        >>> from workbench import models, reports
        >>> from workbench.reports.compare import Comparison
        >>> runs = pd.DataFrame({"method": ["student"], "seed": [0], "accuracy": [0.9], "matched_cka": [0.5],
        ...                      "seconds": [1.0]})
        >>> curve = pd.DataFrame({"epoch": [1, 2], "step": [1, 2], "loss": [1.0, 0.5], "eval_accuracy": [0.5, 0.9]})
        >>> comparison = Comparison(runs, {("student", 0): curve}, teacher_accuracy=0.98,
        ...                         settings={"epochs": 2, "lr": 0.01, "train_samples": 300})
        >>> teacher, student = models.create("cnn", widths=(8, 16)), models.create("cnn", widths=(4, 8))
        >>> sanity = distill_sanity(comparison, "cnn", "cnn", teacher, student, reports.evaluation_data("digits"),
        ...                         "digits")
        >>> [flag.subject for flag in sanity.blocking]  # 50 % → 90 % in its last epoch
        ['method `student`']
    """
    from workbench.data import num_samples
    from workbench.layer_table import first_sample
    from workbench.models.stats import count_flops, count_parameters
    from workbench.train.cache import num_classes, training_record

    sanity, classes, example, n_test = Sanity(), num_classes(dataset), first_sample(test), num_samples(test)
    settings = comparison.settings
    table = comparison.table()
    alone = float(table.loc["student", "accuracy_mean"]) / 100 if "student" in table.index else None
    sanity.cards = [
        ModelCard("teacher", teacher, count_parameters(teacher_model), count_flops(teacher_model, example),
                  comparison.teacher_accuracy, _training_text(training_record(teacher_model), teacher_weights)),
        ModelCard("student (alone)" if alone is not None else "student", student, count_parameters(student_model),
                  count_flops(student_model, example), alone,
                  f"{settings.get('epochs')} epochs at lr {settings.get('lr'):g} on {settings.get('train_samples'):,} "
                  f"images, per method and seed"),
    ]
    # every method learns from the same teacher, so a teacher still improving is a warning, not a reason to
    # withhold the comparison of the methods (a teacher near chance is)
    _model_flags(sanity, "teacher", teacher, teacher_model, comparison.teacher_accuracy, n_test, classes,
                 "teacher_epochs", "teacher_lr", teacher_weights, rising_withholds=False)
    curves = comparison.curves()
    longer = f"-p epochs={2 * settings.get('epochs', 1)}"
    for method in comparison.methods:
        subject = f"method `{method}`"
        mean = float(table.loc[method, "accuracy_mean"]) / 100
        sanity.add(near_chance(mean, n_test, classes, subject, f"Train longer ({longer}) or at another -p lr."))
        if "eval_accuracy" in curves:
            rows = curves[curves["method"] == method].sort_values("epoch")
            sanity.add(still_rising(rows["eval_accuracy"].tolist(), subject, f"Train longer: {longer}."))
    if not any(flag.subject.startswith("method") for flag in sanity.flags):
        sanity.passed.append("every method above chance and converged")
    n_probe = next(iter(comparison.cka.values())).n_samples if comparison.cka else None
    if n_probe is not None:
        sanity.add(too_few_samples(n_probe, "linear", True, f"Probe on more images (-p n_probe={_needed('linear', True)})."),
                   f"CKA on {n_probe:,} probe images")
    sanity.add(larger_student(sanity.cards[0].parameters, sanity.cards[1].parameters,
                              smaller_student),
               "student smaller than teacher")
    return sanity
