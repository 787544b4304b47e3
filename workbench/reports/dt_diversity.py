"""What the ``dt`` report calls in its kernel: diversity distillation (Gandikota & Bau 2025) on the tiny
digits DDPM.

Four ways to draw the same class-conditional samples (same classes, same seeds, same x_T):

- ``base``: the base DDPM (:func:`workbench.train.diffusion.trained_ddpm`) at ``base_steps`` DDIM steps,
  with classifier-free guidance ``base_guidance`` (the run the distilled student learned from);
- ``distilled``: the student progressively distilled from that guided base (guidance baked in) at
  ``student_steps`` steps;
- ``hybrid``: the base model for the first ``switch_after`` steps *of the student's schedule* (so the
  switch lands on a timestep the student knows), at guidance ``hybrid_guidance``, then the student;
- ``unguided student``: the control, distilled the same way from the base run without guidance.

:func:`run_variants` records every run with :func:`workbench.probes.dt.trajectory` / :func:`~workbench.probes.dt.hybrid`;
:func:`workbench.probes.sample_quality.sample_quality` measures them; :func:`paired_test` compares two
variants' per-class diversity (Wilcoxon signed-rank over classes, scipy); :func:`findings` words what the
numbers support and no more; :func:`dt_sanity` withholds it when a model did not learn.
"""
from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from workbench.reports.compare import check_results_path
from workbench.reports.rules import Context, Rule
from workbench.reports.sanity import Flag, Sanity, near_chance

__all__ = ["VARIANTS", "config_rule", "switch_rule", "guidance_rule", "class_labels", "run_variants",
           "training_records", "first_step_table", "measure", "paired_test", "dt_sanity", "findings",
           "results_markdown", "save_results"]

VARIANTS = ("base", "distilled", "hybrid", "unguided student")
NUM_CLASSES = 10


def config_rule(name: str, allowed: str, example: str) -> Rule:
    """The declaration's rule of parameter ``name``: the value :class:`~workbench.train.diffusion.DiffusionConfig`
    accepts for its field of that name (its ``ValueError`` is the message).

    Example:
        >>> config_rule("base_steps", "a power of two", "32").check(12, None)
        'base_steps must be a power of two dividing 1024, got 12'
    """
    def check(value: Any, context: Context) -> str | None:
        from workbench.train.diffusion import DiffusionConfig

        field = tuple(value) if name == "widths" and isinstance(value, list) else value
        partner = {"base_steps": {"student_steps": 1}, "student_steps": {"base_steps": 1024}}.get(name, {})
        try:
            DiffusionConfig(**{name: field, **partner})
        except (ValueError, TypeError) as error:
            return str(error)
        base = (context.values.get("base_steps") if context is not None else None)
        if name == "student_steps" and isinstance(base, int) and value >= base:
            return f"must be fewer than base_steps ({base}): each distillation round halves the steps"
        return None

    return Rule(allowed, check, example=example)


def switch_rule() -> Rule:
    """The rule of ``switch_after``: 0 … ``student_steps`` (0 is the distilled run, all of them the base's
    steps on the student's schedule).

    Example:
        >>> from workbench.reports.rules import Context, Declaration
        >>> switch_rule().check(5, Context("dt", Declaration({}), {"student_steps": 4}))
        'must lie in 0 … student_steps (4)'
    """
    def check(value: Any, context: Context) -> str | None:
        steps = context.values.get("student_steps")
        if isinstance(value, bool) or not isinstance(value, int) or not isinstance(steps, int) or not 0 <= value <= steps:
            return f"must lie in 0 … student_steps ({steps})"
        return None

    return Rule("int in 0 … student_steps", check, example="1")


def guidance_rule() -> Rule:
    """A classifier-free guidance scale: 0 (or 1) for none, or a finite scale > 1.

    Example:
        >>> guidance_rule().check(0.5, None)
        'must be 0 (or 1: no guidance) or a finite scale > 1'
    """
    def check(value: Any, context: Context) -> str | None:
        fine = isinstance(value, (int, float)) and not isinstance(value, bool) and np.isfinite(value) and (
            value in (0, 1) or value > 1)
        return None if fine else "must be 0 (or 1: no guidance) or a finite scale > 1"

    return Rule("0 | 1 | a number > 1", check, example="3.0")


def class_labels(seeds_per_class: int, classes: int = NUM_CLASSES) -> list[int]:
    """``seeds_per_class`` samples of each class, class by class: the labels every variant draws.

    Example:
        >>> class_labels(2, classes=3)
        [0, 0, 1, 1, 2, 2]
    """
    if isinstance(seeds_per_class, bool) or not isinstance(seeds_per_class, int) or seeds_per_class < 2:
        raise ValueError(f"seeds_per_class must be an int of at least 2 (diversity is within a class), "
                         f"got {seeds_per_class!r}")
    return [label for label in range(classes) for _ in range(seeds_per_class)]


def run_variants(base: Any, distilled: Any, unguided: Any, *, labels: list[int], base_steps: int, student_steps: int,
                 switch_after: int, base_guidance: float, hybrid_guidance: float, seed: int = 0,
                 device: Any = None, progress: bool = False) -> dict[str, Any]:
    """The four variants' :class:`~workbench.probes.dt.DTTrajectory` on the same labels and x_T (``seed``).

    Example:
        >>> from workbench.train.diffusion import unet, DiffusionConfig
        >>> net = unet(DiffusionConfig(widths=(8, 16)))
        >>> runs = run_variants(net, net, net, labels=[0, 0], base_steps=4, student_steps=2, switch_after=1,
        ...                     base_guidance=3.0, hybrid_guidance=0.0)
        >>> {name: run.network_evaluations for name, run in runs.items()}
        {'base': 8, 'distilled': 2, 'hybrid': 2, 'unguided student': 2}
    """
    from workbench.probes import dt
    from workbench.train.diffusion import NULL_CLASS, scheduler

    if not 0 <= switch_after <= student_steps:
        raise ValueError(f"switch_after={switch_after} must lie in 0 … student_steps={student_steps}")
    common = dict(class_labels=labels, null_class=NULL_CLASS, seed=seed, device=device, progress=progress)
    return {
        "base": dt.trajectory(base, scheduler(), num_inference_steps=base_steps, guidance_scale=base_guidance,
                              name="base", **common),
        "distilled": dt.trajectory(distilled, scheduler(), num_inference_steps=student_steps, name="distilled",
                                   **common),
        "hybrid": dt.hybrid(base, distilled, base_scheduler=scheduler(), distilled_scheduler=scheduler(),
                            switch_after=switch_after, num_base_steps=student_steps,
                            num_distilled_steps=student_steps, base_guidance=hybrid_guidance, **common),
        "unguided student": dt.trajectory(unguided, scheduler(), num_inference_steps=student_steps,
                                          name="unguided student", **common),
    }


def training_records(base: Any, student: Any, unguided: Any) -> dict[str, Any]:
    """Each trained model's :class:`~workbench.train.diffusion.DiffusionRecord`, by the name the report uses.

    Example:
        >>> from workbench.train.diffusion import DiffusionRecord, unet, DiffusionConfig
        >>> net = unet(DiffusionConfig(widths=(8, 16)))
        >>> net.diffusion_record = DiffusionRecord("base", {}, (1.0, 0.5), 1.0)
        >>> list(training_records(net, net, net))
        ['base model', 'guided student', 'unguided student']
    """
    models = {"base model": base, "guided student": student, "unguided student": unguided}
    missing = [name for name, model in models.items() if getattr(model, "diffusion_record", None) is None]
    if missing:
        raise ValueError(f"{missing} carry no training record: pass the models trained_ddpm / distilled_ddpm return")
    return {name: model.diffusion_record for name, model in models.items()}


def first_step_table(runs: Mapping[str, Any]) -> Any:
    """Per variant: the within-run pixel diversity of x̂0 at its first step and of its final samples
    (:func:`~workbench.probes.dt.first_step_diversity`), and which model ran the first step.

    Example:
        >>> from workbench.probes.dt import DTTrajectory
        >>> x0 = np.array([[[[[0.0, 0.0]]], [[[3.0, 4.0]]]]])
        >>> [float(v) for v in first_step_table({"a": DTTrajectory(np.array([1.0]), x0, x0, x0[0], ["s"], ["m"])}).loc["a"].tolist()[1:]]
        [5.0, 5.0]
    """
    import pandas as pd

    from workbench.probes.diversity import pairwise_distance
    from workbench.probes.dt import first_step_diversity

    return pd.DataFrame(
        [{"variant": name, "first step run by": run.models[0], "first-step x̂0 diversity": first_step_diversity(run),
          "final diversity": pairwise_distance(run.final)} for name, run in runs.items()]
    ).set_index("variant")


def measure(runs: Mapping[str, Any], classifier: Any, size: int = 8) -> Any:
    """:func:`~workbench.probes.sample_quality.sample_quality` of ``runs`` in the classifier's ``pool``
    embedding, against the digits' held-out test split (450 real images).

    Example:
        >>> from workbench.models import create
        >>> from workbench.train.diffusion import unet, DiffusionConfig
        >>> net = unet(DiffusionConfig(widths=(8, 16)))
        >>> runs = run_variants(net, net, net, labels=[0, 0], base_steps=2, student_steps=2, switch_after=1,
        ...                     base_guidance=0.0, hybrid_guidance=0.0)
        >>> list(measure(runs, create("cnn_small", img_size=8)).to_frame().index)
        ['base', 'distilled', 'hybrid', 'unguided student']
    """
    from workbench.probes.sample_quality import sample_quality
    from workbench.train.diffusion import classifier_input, digit_images

    real, _ = digit_images("test", size)
    return sample_quality(runs, classifier, real, layer="pool", preprocess=classifier_input(size))


def paired_test(quality: Any, lower: str, higher: str) -> dict[str, float]:
    """Is ``lower``'s per-class feature diversity below ``higher``'s? The classes where it is, the mean
    relative change (lower / higher − 1), and the one-sided Wilcoxon signed-rank p-value over classes.

    Example:
        >>> from workbench.probes.sample_quality import SampleQuality, COLUMNS
        >>> rows = [dict(zip(COLUMNS, [name, 2, 1.0, 0.1, 1.0, 1.0, 1, 0.1])) for name in ("a", "b")]
        >>> test = paired_test(SampleQuality(rows, per_class={"a": [0.1] * 6, "b": [0.2] * 6}), "a", "b")
        >>> test["classes_lower"], test["classes"], round(test["relative_change"], 3), round(test["p_value"], 4)
        (6, 6, -0.5, 0.0156)
    """
    from scipy.stats import wilcoxon

    a, b = np.asarray(quality.per_class[lower], float), np.asarray(quality.per_class[higher], float)
    if a.shape != b.shape:
        raise ValueError(f"{lower!r} has {a.size} classes, {higher!r} {b.size}: they must match")
    difference = a - b
    p_value = float("nan") if np.all(difference == 0) else float(wilcoxon(a, b, alternative="less").pvalue)
    return {"classes_lower": int(np.sum(difference < 0)), "classes": int(a.size),
            "relative_change": float(a.mean() / b.mean() - 1.0), "p_value": p_value}


def dt_sanity(quality: Any, records: Mapping[str, Any]) -> Sanity:
    """Flags for a variant whose samples the classifier reads near chance (a model that did not learn to
    draw digits, see :func:`~workbench.reports.sanity.near_chance`) and for a trained model whose loss did
    not fall (``records``: model name → its :class:`~workbench.train.diffusion.DiffusionRecord`).

    Example:
        >>> from workbench.probes.sample_quality import SampleQuality, COLUMNS
        >>> rows = [dict(zip(COLUMNS, ["base", 100, 1.0, 0.1, 1.0, 0.12, 1, 0.1]))]
        >>> [flag.kind for flag in dt_sanity(SampleQuality(rows), {}).flags]
        ['near_chance']
    """
    box = Sanity()
    for row in quality.rows:
        box.add(near_chance(row["accuracy"], row["samples"], NUM_CLASSES, f"{row['variant']} samples",
                            "The model did not learn to draw the digits it is asked for: train longer "
                            "(-p epochs=…, -p distill_iterations=…)."))
    for name, record in records.items():
        if not record.learned:
            box.add(Flag("not_learned", name, f"its training loss did not fall (first tenth {record.losses[0]:.4f}, "
                         f"last {record.losses[-1]:.4f}).", "Train longer or with another learning rate."))
    if not box.flags:
        box.passed.append("every variant's samples are read as their class well above chance, every model's "
                          "loss fell")
    return box


def _p(value: float) -> str:
    return "n/a" if not np.isfinite(value) else (f"{value:.2g}" if value >= 1e-3 else "< 0.001")


def findings(quality: Any, alpha: float = 0.05) -> str:
    """What the table supports, in words: whether distillation lowered the within-class diversity, whether
    the hybrid recovered it, what the unguided control shows, and what each cost.

    Example:
        >>> from workbench.probes.sample_quality import SampleQuality, COLUMNS
        >>> rows = [dict(zip(COLUMNS, [name, 20, 1.0, d, 1.0, 1.0, n, 0.1])) for name, d, n in
        ...         [("base", 0.2, 64), ("distilled", 0.1, 4), ("hybrid", 0.18, 5), ("unguided student", 0.2, 4)]]
        >>> per_class = {"base": [0.2] * 10, "distilled": [0.1] * 10, "hybrid": [0.18] * 10,
        ...              "unguided student": [0.2] * 10}
        >>> findings(SampleQuality(rows, per_class=per_class)).splitlines()[0][:41]
        '- **Distillation lowered the diversity**:'
    """
    frame = quality.to_frame()
    missing = [name for name in VARIANTS if name not in quality.per_class]
    if missing:
        return f"- No findings: the table lacks {missing} (the report's four variants are {list(VARIANTS)})."
    drop = paired_test(quality, "distilled", "base")
    lines = []
    if drop["p_value"] < alpha:
        lines.append(f"- **Distillation lowered the diversity**: the distilled student's within-class feature "
                     f"diversity is {-100 * drop['relative_change']:.0f} % below the base's, lower in "
                     f"{drop['classes_lower']} of {drop['classes']} classes (Wilcoxon p {_p(drop['p_value'])}).")
    else:
        lines.append(f"- **No diversity drop shown**: the distilled student's diversity differs from the base's by "
                     f"{100 * drop['relative_change']:+.0f} % (lower in {drop['classes_lower']} of {drop['classes']} "
                     f"classes, Wilcoxon p {_p(drop['p_value'])}).")
    recovery = paired_test(quality, "distilled", "hybrid")
    if not drop["p_value"] < alpha:  # NaN (no difference at all) included
        verdict = "is more diverse" if recovery["p_value"] < alpha else "is not shown to be more diverse"
        lines.append(f"- **The hybrid {verdict} than the distilled student**: feature diversity "
                     f"{frame.loc['hybrid', 'feature_diversity']:.3f} against {frame.loc['distilled', 'feature_diversity']:.3f} "
                     f"(above it in {recovery['classes_lower']} of {recovery['classes']} classes, Wilcoxon p "
                     f"{_p(recovery['p_value'])}), Fréchet distance {frame.loc['distilled', 'frechet']:.1f} → "
                     f"{frame.loc['hybrid', 'frechet']:.1f}, at {frame.loc['hybrid', 'network_evaluations']} network "
                     f"evaluations against the distilled {frame.loc['distilled', 'network_evaluations']}.")
    else:
        gap = frame.loc["base", "feature_diversity"] - frame.loc["distilled", "feature_diversity"]
        regained = (frame.loc["hybrid", "feature_diversity"] - frame.loc["distilled", "feature_diversity"]) / gap
        verdict = "recovered" if recovery["p_value"] < alpha else "did not significantly recover"
        back = "more than the whole gap back" if regained > 1 else f"{100 * regained:.0f} % of the gap back"
        lines.append(f"- **The hybrid {verdict} diversity**: {back} (hybrid above "
                     f"distilled in {recovery['classes_lower']} of {recovery['classes']} classes, Wilcoxon p "
                     f"{_p(recovery['p_value'])}), Fréchet distance {frame.loc['distilled', 'frechet']:.1f} → "
                     f"{frame.loc['hybrid', 'frechet']:.1f}, at {frame.loc['hybrid', 'network_evaluations']} network "
                     f"evaluations against the distilled {frame.loc['distilled', 'network_evaluations']} and the base "
                     f"{frame.loc['base', 'network_evaluations']}.")
    control = paired_test(quality, "distilled", "unguided student")
    lines.append(f"- **The unguided control**: a student distilled from the base run *without* guidance has "
                 f"diversity {frame.loc['unguided student', 'feature_diversity']:.3f} against the guided student's "
                 f"{frame.loc['distilled', 'feature_diversity']:.3f} (guided lower in {control['classes_lower']} of "
                 f"{control['classes']} classes, Wilcoxon p {_p(control['p_value'])}): "
                 + ("the low diversity comes mostly with the guidance the student baked in, not with fewer steps."
                    if control["p_value"] < alpha else "the two students are not told apart here."))
    return "\n".join(lines)


def results_markdown(quality: Any, box: Sanity, *, command: str = "", settings: Mapping[str, Any] | None = None) -> str:
    """The committed results page: the settings, the sanity verdict, the table and the findings (withheld
    when a sanity flag blocks them), and the command that re-runs it.

    Example:
        >>> from workbench.probes.sample_quality import SampleQuality, COLUMNS
        >>> rows = [dict(zip(COLUMNS, ["base", 100, 1.0, 0.1, 1.0, 0.12, 1, 0.1]))]
        >>> page = results_markdown(SampleQuality(rows), Sanity([Flag("k", "base", "bad.", "Fix.")]))
        >>> "withheld" in page
        True
    """
    lines = ["# Diversity distillation on the digits DDPM (DT report)", ""]
    if command:
        lines += [f"Re-run: `{command}`", ""]
    if settings:
        lines += ["Settings: " + ", ".join(f"{key} = {value}" for key, value in settings.items()) + ".", ""]
    lines += [box.to_markdown(), "", quality.to_markdown(), ""]
    if box.blocking:
        lines += ["*Findings withheld: see the sanity checks above.*"]
    else:
        lines += ["## Findings", "", findings(quality)]
    lines += ["", "Diversity: mean pairwise distance between samples of one class (pixels: L2 in [-1, 1]; features: "
              "cosine distance of the digits classifier's pooled embedding), averaged over the classes. Fréchet "
              "distance: all samples' embeddings against the 450 held-out real test digits. Accuracy: the "
              "classifier names the class the sample was drawn for. A guided step counts two network evaluations."]
    return "\n".join(lines) + "\n"


def save_results(path: str | Path, quality: Any, box: Sanity, *, command: str = "",
                 settings: Mapping[str, Any] | None = None, overwrite: bool = False) -> Path:
    """Write :func:`results_markdown` to ``path`` (``.md``) atomically; an existing file is replaced only
    with ``overwrite=True``.

    Example:
        >>> import tempfile
        >>> from workbench.probes.sample_quality import SampleQuality, COLUMNS
        >>> rows = [dict(zip(COLUMNS, ["base", 100, 1.0, 0.1, 1.0, 0.12, 1, 0.1]))]
        >>> path = save_results(Path(tempfile.mkdtemp()) / "dt.md", SampleQuality(rows), Sanity())
        >>> path.read_text().startswith("# Diversity distillation")
        True
    """
    from workbench.files import write_atomic

    path = check_results_path(path, overwrite)
    return write_atomic(path, results_markdown(quality, box, command=command, settings=settings))
