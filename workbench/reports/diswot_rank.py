"""What the ``diswot`` report calls in its kernel: DisWOT (Dong et al., CVPR 2023) validated by rank
correlation against real distillation.

The report scores every candidate student with :func:`workbench.probes.diswot.search` (DisWOT's score, its
two terms and the zero-cost baselines, without training), then distils every candidate from the same
teacher over seeds (:func:`run_candidates`: the distill report's
:func:`~workbench.reports.compare.run_comparison` of ``"student"`` and ``"kd"`` per candidate) and asks how
well each score ranks the distilled accuracy (:func:`predictors`, :func:`agreement`: Kendall τ and Spearman ρ
with bootstrap intervals, by :func:`workbench.probes.student_search.rank_agreement`). Candidates whose
distilled accuracy is near chance (:func:`~workbench.reports.sanity.near_chance`) did not train: they are
left out of the correlations, and the report says so. :func:`findings` words what the numbers support and
no more; :func:`results_markdown` / :func:`save_results` give the committed table with the command that
re-runs it. :func:`candidates_rule` is the declaration's rule of the ``candidates`` parameter.

No mathematics of DisWOT lives here: the scores come from the engine, the correlations from ``scipy``.
"""
from __future__ import annotations

import math
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import pandas as pd

from workbench.reports.compare import Comparison, check_results_path, run_comparison, seeded_model
from workbench.reports.rules import Context, Declaration, Rule, model_name

__all__ = ["DEFAULT_CANDIDATES", "RESERVED_KWARGS", "parse_candidates", "search_specs", "run_candidates",
           "accuracy_frame", "predictors", "agreement", "findings", "diswot_sanity", "results_markdown",
           "save_results", "teacher_line", "candidates_markdown", "agreement_markdown", "score_figure",
           "agreement_figure", "candidates_rule"]

DEFAULT_CANDIDATES: list[dict[str, Any]] = [
    {"name": "cnn", "kwargs": {"widths": [8, 16]}},
    {"name": "cnn", "kwargs": {"widths": [16, 32]}},
    {"name": "cnn", "kwargs": {"widths": [8, 16, 32]}},
    {"name": "cnn", "kwargs": {"widths": [16, 32, 64]}},
    {"name": "cnn", "kwargs": {"widths": [8, 16, 32, 64]}},
    {"name": "cnn", "kwargs": {"widths": [16, 32, 128]}},
    {"name": "cnn", "kwargs": {"widths": [8, 16, 32, 128]}},
    {"name": "resnet", "kwargs": {"widths": [8, 16, 32]}},
    {"name": "resnet", "kwargs": {"widths": [8, 16], "blocks": 2}},
    {"name": "vit", "kwargs": {"dim": 32, "depth": 2, "heads": 2}},
    {"name": "vit", "kwargs": {"dim": 48, "depth": 2, "heads": 3}},
    {"name": "mixer", "kwargs": {"dim": 32, "depth": 2}},
    {"name": "mixer", "kwargs": {"dim": 48, "depth": 4}},
    {"name": "mlp", "kwargs": {"hidden": [32, 128]}},
]
"""The report's default students: 7 CNNs (2 to 4 stages, 8 to 128 channels), 2 TinyResNets, 2 ViTs, 2
MLP-Mixers and an MLP, from 1,442 to 89,498 parameters — all smaller than the default ``cnn`` teacher
(94,186); three end in 128 features as the teacher does, so the released semantic term is defined for them."""

RESERVED_KWARGS = ("num_classes", "in_chans", "img_size")
"""Model arguments the report sets itself (from the dataset and its 1×32×32 images): not candidate kwargs."""


def parse_candidates(value: Any) -> list[Any]:
    """The report's ``candidates`` parameter as :class:`~workbench.probes.student_search.Candidate`\\ s
    (:func:`~workbench.probes.student_search.parse_candidates`); a ``ValueError`` saying what is wrong: not a
    list, fewer than 3 (a rank correlation needs 3), a candidate that is not a ``{"name", "kwargs"}`` dict, an
    unknown key, a repeat, or a kwarg the report sets itself (:data:`RESERVED_KWARGS`).

    Example:
        >>> [c.label for c in parse_candidates([{"name": "cnn", "kwargs": {"widths": [8]}}, {"name": "mlp"},
        ...                                     {"name": "vit", "kwargs": {"depth": 2}}])]
        ['cnn(widths=(8,))', 'mlp()', 'vit(depth=2)']
        >>> parse_candidates([{"name": "mlp"}, {"name": "mlp"}, {"name": "cnn"}])
        Traceback (most recent call last):
        ...
        ValueError: candidate mlp() is listed twice
    """
    from workbench.probes.student_search import parse_candidates as engine_parse

    if not isinstance(value, list) or len(value) < 3:
        raise ValueError('must be a list of at least 3 candidates (a rank correlation needs 3) such as '
                         '{"name": "cnn", "kwargs": {"widths": [8, 16]}}')
    for number, item in enumerate(value, 1):
        if not isinstance(item, dict):
            raise ValueError(f'candidate {number} is not a dict: write {{"name": "cnn", "kwargs": {{"widths": [8, 16]}}}}')
    try:
        candidates = engine_parse(value)
    except TypeError as error:  # e.g. a name that is not text, a dict among a kwarg's values
        raise ValueError(str(error)) from None
    for number, candidate in enumerate(candidates, 1):
        reserved = [key for key in candidate.kwargs if key in RESERVED_KWARGS]
        if reserved:
            raise ValueError(f"candidate {number} ({candidate.label}): {reserved[0]!r} is set by the report from "
                             "the dataset and its 1×32×32 images; leave it out")
    return candidates


def search_specs(candidates: Sequence[Any], dataset: str) -> list[dict[str, Any]]:
    """The candidate specs given to :func:`workbench.probes.diswot.search`: each candidate's name and kwargs,
    plus ``num_classes`` only where ``dataset``'s class count differs from the models' default (10).

    Example:
        >>> specs = search_specs(parse_candidates([{"name": "cnn"}, {"name": "mlp"}, {"name": "vit"}]), "shapes")
        >>> specs[0]
        {'name': 'cnn', 'kwargs': {'num_classes': 4}, 'family': 'cnn'}
        >>> search_specs(parse_candidates([{"name": "cnn"}, {"name": "mlp"}, {"name": "vit"}]), "animals")[0]
        {'name': 'cnn', 'kwargs': {}, 'family': 'cnn'}
    """
    from workbench.train.cache import num_classes

    classes = num_classes(dataset)
    specs = []
    for candidate in candidates:
        spec = candidate.to_json()
        if classes != 10:
            spec["kwargs"] = {**spec["kwargs"], "num_classes": classes}
        specs.append(spec)
    return specs


def run_candidates(
    teacher: Any, candidates: Sequence[Any], dataset: str, train: Any, test: Any, seeds: Sequence[int], *,
    epochs: int, lr: float, batch_size: int = 64, device: str = "auto", spread: Sequence[str] = (),
    spread_seeds: Sequence[int] = (), callbacks: Callable[[str, int], list[Any]] | None = None,
    log: Callable[[str], None] | None = None,
) -> list[Comparison]:
    """Train every candidate alone (``"student"``) and with KD (``"kd"``) from ``teacher`` over ``seeds``
    (:func:`~workbench.reports.compare.run_comparison` on ``train``, scored on ``test``; one
    :class:`~workbench.reports.compare.Comparison` per candidate, in order). Candidates whose label is in
    ``spread`` run over ``spread_seeds`` instead (more seeds for a subset, to measure the spread).

    Example:
        >>> import torch
        >>> from workbench import models
        >>> x, y = torch.randn(32, 1, 32, 32), torch.randint(0, 10, (32,))
        >>> teacher = models.create("cnn", widths=(8, 16)).eval()
        >>> found = parse_candidates([{"name": "cnn", "kwargs": {"widths": [4]}}, {"name": "mlp", "kwargs": {"hidden": [8]}},
        ...                           {"name": "cnn", "kwargs": {"widths": [4, 8]}}])
        >>> runs = run_candidates(teacher, found, "digits", (x, y), (x, y), [0], epochs=1, lr=0.01, device="cpu",
        ...                       spread=["mlp(hidden=(8,))"], spread_seeds=[0, 1])
        >>> [len(run.runs) for run in runs], runs[0].methods
        ([2, 4, 2], ['student', 'kd'])
    """
    comparisons = []
    for number, candidate in enumerate(candidates, 1):
        chosen = list(spread_seeds) if candidate.label in spread and spread_seeds else list(seeds)
        if log is not None:
            log(f"candidate {number}/{len(candidates)}: {candidate.label}, seeds {chosen}")
        name, kwargs = candidate.name, dict(candidate.kwargs)
        make_student = lambda seed, name=name, kwargs=kwargs: seeded_model(name, dataset, seed, **kwargs)  # noqa: E731
        per_run = None if callbacks is None else (lambda method, seed, label=candidate.label:
                                                  callbacks(f"{label}: {method}", seed))
        comparisons.append(run_comparison(teacher, make_student, train, test, ["student", "kd"], chosen,
                                          epochs=epochs, lr=lr, batch_size=batch_size, device=device,
                                          callbacks=per_run, progress=False, log=log))
    return comparisons


def accuracy_frame(candidates: Sequence[Any], comparisons: Sequence[Comparison], n_test: int,
                   num_classes: int) -> pd.DataFrame:
    """One row per candidate (index: its label, in order): ``family``, ``seeds``, vanilla (``"student"``) and
    distilled (``"kd"``) test accuracy mean and sample std over seeds (%; std NaN for one seed),
    ``train_seconds`` (both methods, every seed), ``kd_gain`` (points), and ``near_chance``: whether the
    distilled accuracy (the target, mean over seeds, on ``n_test`` samples of ``num_classes`` classes) is
    near chance (:func:`~workbench.reports.sanity.near_chance`) — such a candidate is left out of the
    correlations — and ``vanilla_near_chance``, the same for the vanilla accuracy (marked, not left out).

    Example:
        >>> from workbench.probes.student_search import Candidate
        >>> runs = pd.DataFrame({"method": ["student", "kd", "student", "kd"], "seed": [0, 0, 1, 1],
        ...                      "accuracy": [0.5, 0.6, 0.7, 0.8], "matched_cka": float("nan"), "seconds": 1.0})
        >>> frame = accuracy_frame([Candidate("cnn")], [Comparison(runs)], 1000, 10)
        >>> frame[["vanilla_mean", "distilled_mean", "distilled_std", "train_seconds"]].round(2).values.tolist()
        [[60.0, 70.0, 14.14, 4.0]]
        >>> bool(frame["near_chance"].iloc[0])
        False
    """
    from workbench.reports.sanity import near_chance

    rows = []
    for candidate, comparison in zip(candidates, comparisons, strict=True):
        table = comparison.table()
        vanilla, distilled = table.loc["student"], table.loc["kd"]
        rows.append({
            "label": candidate.label, "family": candidate.family, "seeds": int(distilled["seeds"]),
            "vanilla_mean": float(vanilla["accuracy_mean"]), "vanilla_std": float(vanilla["accuracy_std"]),
            "distilled_mean": float(distilled["accuracy_mean"]), "distilled_std": float(distilled["accuracy_std"]),
            "kd_gain": float(distilled["accuracy_mean"] - vanilla["accuracy_mean"]),
            "train_seconds": float(comparison.runs["seconds"].sum()),
            "near_chance": near_chance(float(distilled["accuracy_mean"]) / 100, n_test, num_classes, "", "") is not None,
            "vanilla_near_chance": near_chance(float(vanilla["accuracy_mean"]) / 100, n_test, num_classes, "",
                                               "") is not None,
        })
    return pd.DataFrame(rows).set_index("label")


# The predictors, in the table's order: (name shown, term in SearchResult.scores or size, sign).
# Distances (relation, semantic) are lower-is-better: negated so that every predictor reads "higher predicts
# better", as rank_agreement assumes.
PREDICTORS = (
    ("DisWOT score", "score", 1.0),
    ("−relation", "relation", -1.0),
    ("−semantic_gradcam", "semantic_gradcam", -1.0),
    ("−semantic_released", "semantic_released", -1.0),
    ("nwot", "nwot", 1.0),
    ("snip", "snip", 1.0),
    ("grad_norm", "grad_norm", 1.0),
    ("params", "params", 1.0),
    ("flops", "flops", 1.0),
)
VANILLA = "vanilla accuracy"


def predictors(result: Any, frame: pd.DataFrame) -> dict[str, list[float]]:
    """Every predictor of the distilled accuracy, one value per row of ``frame`` (matched by label): DisWOT's
    score, its negated distances (``−relation``, ``−semantic_gradcam``, ``−semantic_released``: lower
    distances are better, so negated to read "higher predicts better"), the zero-cost baselines the search
    ran, parameters, FLOPs, and the vanilla accuracy (the student trained alone). A term the search did not
    compute is left out; one that is NaN for every candidate (``semantic_released`` when no candidate ends in
    the teacher's width) too.

    Example:
        >>> from workbench.probes.student_search import SearchResult
        >>> result = SearchResult(["mlp", "cnn"], [100, 50], [200, 400], {"score": [-1.0, -0.5],
        ...                       "relation": [0.5, 0.25]}, [0.1, 0.2])
        >>> frame = pd.DataFrame({"vanilla_mean": [60.0, 70.0]}, index=["cnn()", "mlp()"])
        >>> predictors(result, frame)
        {'DisWOT score': [-0.5, -1.0], '−relation': [-0.25, -0.5], 'params': [50.0, 100.0], 'flops': [400.0, 200.0], 'vanilla accuracy': [60.0, 70.0]}
    """
    where = {candidate.label: index for index, candidate in enumerate(result.candidates)}
    missing = [label for label in frame.index if label not in where]
    if missing:
        raise ValueError(f"the search scored no candidate {missing[0]}: the frame and the search disagree")
    order = [where[label] for label in frame.index]
    found: dict[str, list[float]] = {}
    for shown, term, sign in PREDICTORS:
        if term in ("params", "flops"):
            values = getattr(result, term)
        elif term in result.scores:
            values = result.scores[term]
        else:
            continue
        picked = [sign * float(values[index]) for index in order]
        if all(math.isnan(value) for value in picked):
            continue
        found[shown] = [value + 0.0 for value in picked]  # -0.0 as 0.0
    found[VANILLA] = [float(value) for value in frame["vanilla_mean"]]
    return found


def agreement(result: Any, frame: pd.DataFrame, *, n_resamples: int = 2000, seed: int = 0) -> pd.DataFrame:
    """How well each predictor (:func:`predictors`) ranks the distilled accuracy, over the candidates that
    trained (``frame``'s rows not ``near_chance``): :func:`~workbench.probes.student_search.rank_agreement`
    (Kendall τ-b, Spearman ρ, paired percentile-bootstrap 95 % intervals).

    Example:
        >>> from workbench.probes.student_search import SearchResult
        >>> result = SearchResult(["mlp", "cnn", "vit", "mixer"], [1, 2, 3, 4], [4, 3, 2, 1],
        ...                       {"score": [1.0, 2.0, 3.0, 4.0]}, [0.1] * 4)
        >>> frame = pd.DataFrame({"vanilla_mean": [50.0, 60.0, 70.0, 80.0], "distilled_mean": [51.0, 61.0, 71.0, 15.0],
        ...                       "near_chance": [False, False, False, True]},
        ...                      index=["mlp()", "cnn()", "vit()", "mixer()"])
        >>> table = agreement(result, frame, n_resamples=100)
        >>> int(table.loc["DisWOT score", "n"]), float(table.loc["DisWOT score", "kendall_tau"])
        (3, 1.0)
        >>> float(table.loc["flops", "kendall_tau"])  # FLOPs fall as the accuracy rises
        -1.0
    """
    from workbench.probes.student_search import rank_agreement

    kept = frame[~frame["near_chance"].astype(bool)]
    return rank_agreement(predictors(result, kept), kept["distilled_mean"].to_numpy(dtype=float),
                          n_resamples=n_resamples, seed=seed)


def _interval(row: pd.Series, key: str) -> str:
    if math.isnan(row[key]):
        return "n/a"
    if math.isnan(row[f"{key}_low"]) or math.isnan(row[f"{key}_high"]):
        return f"{row[key]:+.2f} [no CI]"
    return f"{row[key]:+.2f} [{row[f'{key}_low']:+.2f}, {row[f'{key}_high']:+.2f}]"


def _evidence(row: pd.Series) -> str:
    """What a τ with its interval supports, in words."""
    if math.isnan(row["kendall_tau"]):
        return "undefined"
    if math.isnan(row["kendall_tau_low"]) or math.isnan(row["kendall_tau_high"]):
        return "no interval (too few candidates to resample): no evidence"
    if row["kendall_tau_low"] > 0:
        return "ranks better above worse (CI above 0)"
    if row["kendall_tau_high"] < 0:
        return "ranks in reverse (CI below 0)"
    return "no evidence either way (CI crosses 0)"


def _has_interval(row: pd.Series) -> bool:
    return not any(math.isnan(row[key]) for key in ("kendall_tau", "kendall_tau_low", "kendall_tau_high"))


def findings(table: pd.DataFrame, frame: pd.DataFrame, search_seconds: float, withheld: bool = False) -> list[str]:
    """The report's sentences, each backed by ``table`` (:func:`agreement`) and ``frame``
    (:func:`accuracy_frame`): which candidates were left out, how often KD beat the student alone (when
    ``frame`` has ``kd_gain``), whether the vanilla accuracy ranks the distilled accuracy perfectly (τ = 1) and
    whether the best candidate alone is the best distilled, what the DisWOT score's τ supports, the best
    training-free predictor, which semantic variant ranks better (only where both intervals exist and do not
    overlap), and the search time against the training time it replaces. ``withheld``: the sanity checks
    failed (a teacher near chance): the numbers are given, the conclusions are not.

    Example:
        >>> table = pd.DataFrame({"n": [5, 5], "kendall_tau": [0.6, 1.0], "kendall_tau_low": [0.2, 1.0],
        ...                       "kendall_tau_high": [1.0, 1.0]}, index=["DisWOT score", "vanilla accuracy"])
        >>> frame = pd.DataFrame({"near_chance": [False] * 5, "train_seconds": [60.0] * 5})
        >>> for line in findings(table, frame, 3.0):
        ...     print(line)
        All 5 candidates trained above chance; each correlation is over those of them its predictor is defined on (the candidates column).
        The vanilla accuracy ranks the distilled accuracy perfectly here (τ = +1.00): training each candidate alone would have found the same order.
        The DisWOT score ranks the distilled accuracy with τ = +0.60 (95 % CI +0.20 to +1.00, 5 candidates): evidence that a higher score goes with a higher distilled accuracy.
        The training-free predictor with the highest τ is `DisWOT score` (+0.60 [+0.20, +1.00]; ranks better above worse (CI above 0)); the vanilla accuracy's τ is +1.00, but their intervals overlap.
        The search scored 5 candidates in 3.0 s; training them (vanilla and distilled, every seed) took 300 s, 100× as long.
    """
    lines = []
    left_out = frame.index[frame["near_chance"].astype(bool)].tolist()
    kept = frame[~frame["near_chance"].astype(bool)]
    if left_out:
        lines.append(f"{len(left_out)} of {len(frame)} candidates did not train (distilled accuracy near chance): "
                     f"{', '.join(f'`{label}`' for label in left_out)}. They are left out of every correlation, "
                     f"which is over the other {len(kept)} (those its predictor is defined on).")
    else:
        lines.append(f"All {len(frame)} candidates trained above chance; each correlation is over those of them its "
                     "predictor is defined on (the candidates column).")
    if "kd_gain" in kept and len(kept):
        wins = int((kept["kd_gain"] > 0).sum())
        lines.append(f"KD beat the student alone (mean over seeds) for {wins} of {len(kept)} candidates (gain from "
                     f"{kept['kd_gain'].min():+.2f} to {kept['kd_gain'].max():+.2f} points): the target ranked "
                     "here is the distilled accuracy itself, whether or not distillation helped.")
    if withheld:
        lines.append("**Conclusions withheld**: the sanity checks above flag a problem; the numbers are shown, "
                     "but no ranking conclusion is drawn from them.")
    else:
        lines += _ranking_sentences(table, kept)
    training = float(frame["train_seconds"].sum())
    ratio = training / search_seconds if search_seconds > 0 else math.inf
    lines.append(f"The search scored {len(frame)} candidates in {search_seconds:.1f} s; training them (vanilla and "
                 f"distilled, every seed) took {training:,.0f} s, {ratio:,.0f}× as long.")
    return lines


def _ranking_sentences(table: pd.DataFrame, kept: pd.DataFrame) -> list[str]:
    lines = []
    if VANILLA in table.index:
        row = table.loc[VANILLA]
        if math.isnan(row["kendall_tau"]):
            lines.append("The vanilla accuracy's τ is undefined (too few candidates or constant values).")
        elif row["kendall_tau"] >= 1 - 1e-12:
            lines.append(f"The vanilla accuracy ranks the distilled accuracy perfectly here (τ = "
                         f"{row['kendall_tau']:+.2f}): training each candidate alone would have found the same order.")
        else:
            text = (f"The vanilla accuracy does not rank the distilled accuracy perfectly: τ = "
                    f"{_interval(row, 'kendall_tau')}, not 1, so some candidates swap places between the two orders")
            if {"vanilla_mean", "distilled_mean"} <= set(kept):
                alone, distilled = kept["vanilla_mean"].idxmax(), kept["distilled_mean"].idxmax()
                text += (f"; the best candidate alone (`{alone}`) is {'also' if alone == distilled else 'not'} the "
                         f"best distilled" + ("" if alone == distilled else f" (`{distilled}`)"))
            lines.append(text + ".")
    if "DisWOT score" in table.index:
        row = table.loc["DisWOT score"]
        verdict = {"ranks better above worse (CI above 0)": "evidence that a higher score goes with a higher "
                   "distilled accuracy",
                   "ranks in reverse (CI below 0)": "evidence that it ranks them in reverse",
                   "no evidence either way (CI crosses 0)": "no evidence that it ranks them (the interval "
                   "crosses 0)"}.get(_evidence(row), "no evidence either way (no interval)")
        if math.isnan(row["kendall_tau"]):
            lines.append("The DisWOT score's τ is undefined.")
        elif not _has_interval(row):
            lines.append(f"The DisWOT score ranks the distilled accuracy with τ = {row['kendall_tau']:+.2f} over "
                         f"{int(row['n'])} candidates, without an interval: {verdict}.")
        else:
            lines.append(f"The DisWOT score ranks the distilled accuracy with τ = {row['kendall_tau']:+.2f} (95 % CI "
                         f"{row['kendall_tau_low']:+.2f} to {row['kendall_tau_high']:+.2f}, {int(row['n'])} "
                         f"candidates): {verdict}.")
    free = table.drop(index=[VANILLA], errors="ignore")
    free = free[[_has_interval(row) for _, row in free.iterrows()]] if len(free) else free
    if len(free) and VANILLA in table.index and _has_interval(table.loc[VANILLA]):
        best = free["kendall_tau"].idxmax()
        row, vanilla = free.loc[best], table.loc[VANILLA]
        above = row["kendall_tau_high"] < vanilla["kendall_tau_low"]
        lines.append(f"The training-free predictor with the highest τ is `{best}` ({_interval(row, 'kendall_tau')}; "
                     f"{_evidence(row)}); the vanilla accuracy's τ is {vanilla['kendall_tau']:+.2f}"
                     + (", and their intervals do not overlap: here, training each candidate alone ranks the distilled "
                        "accuracy better than any training-free score." if above else
                        ", but their intervals overlap."))
    semantic = [name for name in ("−semantic_gradcam", "−semantic_released") if name in table.index]
    if len(semantic) == 2:
        grad, released = (table.loc[name] for name in semantic)
        described = (f"Semantic variants: Grad-CAM τ = {_interval(grad, 'kendall_tau')} over {int(grad['n'])} "
                     f"candidates, released (classifier weights) τ = {_interval(released, 'kendall_tau')} over "
                     f"{int(released['n'])} (defined only where the student's classifier width equals the "
                     "teacher's)")
        if not (_has_interval(grad) and _has_interval(released)):
            lines.append(described + ": a variant has no interval, so there is no evidence that one ranks better "
                         "than the other.")
        else:
            better = semantic[0] if grad["kendall_tau"] > released["kendall_tau"] else semantic[1]
            apart = grad["kendall_tau_low"] > released["kendall_tau_high"] or \
                released["kendall_tau_low"] > grad["kendall_tau_high"]
            lines.append(described + f". `{better}` has the higher τ" + (
                ", and the intervals do not overlap." if apart else
                ", but the intervals overlap: no evidence that one ranks better than the other."))
    elif semantic:
        lines.append(f"Only `{semantic[0]}` could be computed: the semantic variants cannot be compared.")
    return lines


def diswot_sanity(teacher_name: str, teacher: Any, result: Any, frame: pd.DataFrame, test: Any, dataset: str,
                  epochs: int) -> Any:
    """The report's sanity box (:class:`~workbench.reports.sanity.Sanity`): the teacher above chance (a
    teacher near chance withholds the conclusions), each candidate's distilled accuracy above chance (a
    *warning*: the candidate is left out of the correlations, which stand on the others), each candidate
    smaller than the teacher (a warning: ``result.params``), and a single epoch (a warning: the ranking is of
    accuracy after one epoch); the teacher's model card.

    Example:
        >>> import torch
        >>> from workbench import models
        >>> from workbench.probes.student_search import SearchResult
        >>> teacher = models.create("cnn", widths=(8, 16)).eval()
        >>> result = SearchResult(["mlp"], [10**6], [200], {"score": [-0.5]}, [0.1])
        >>> frame = pd.DataFrame({"distilled_mean": [12.0], "near_chance": [True]}, index=["mlp()"])
        >>> test = (torch.randn(20, 1, 32, 32), torch.randint(0, 10, (20,)))
        >>> box = diswot_sanity("cnn", teacher, result, frame, test, "digits", 1)
        >>> [flag.kind for flag in box.flags], len(box.blocking)
        (['near_chance', 'near_chance', 'still_rising', 'student_larger'], 1)
    """
    from workbench.data import num_samples
    from workbench.models import count_flops, count_parameters
    from workbench.reports.sanity import Flag, ModelCard, Sanity, near_chance
    from workbench.train.cache import num_classes, training_record
    from workbench.train.fit import accuracy

    box = Sanity()
    n_test, classes = num_samples(test), num_classes(dataset)
    score = accuracy(teacher, test, device="cpu")
    box.add(near_chance(score, n_test, classes, f"teacher `{teacher_name}`",
                        "Train it longer: -p teacher_epochs=..."), "teacher above chance")
    for label in frame.index[frame["near_chance"].astype(bool)]:
        box.flags.append(Flag("near_chance", f"candidate `{label}`",
                              f"distilled accuracy {frame.loc[label, 'distilled_mean']:.1f} % is near chance.",
                              "It is left out of every correlation; train longer (-p epochs=...) to keep it.",
                              withholds=False))
    if epochs == 1:
        box.flags.append(Flag("still_rising", "every candidate", "trained a single epoch: the ranking is of accuracy "
                              "after one epoch.", "Train longer: -p epochs=10.", withholds=False))
    parameters = count_parameters(teacher)
    larger = [candidate.label for candidate, size in zip(result.candidates, result.params) if size > parameters]
    if larger:
        box.flags.append(Flag("student_larger", "candidates larger than the teacher",
                              f"{', '.join(f'`{label}`' for label in larger)} have more parameters than the "
                              f"teacher ({parameters:,}); the measurements stand, but this is not compression.",
                              "Choose smaller candidates.", withholds=False))
    x = test[0][:1] if isinstance(test, tuple) else test[0][0][None]
    record = training_record(teacher)
    training = f"{record.epochs} epochs at lr {record.lr:g}, recipe {record.recipe}" if record is not None else "given"
    box.cards.append(ModelCard("teacher", teacher_name, parameters, count_flops(teacher, x), score, training))
    return box


def teacher_line(name: str, kwargs: Mapping[str, Any], card: Any, n_train: int, n_test: int) -> str:
    """One Markdown line on the teacher (its :class:`~workbench.reports.sanity.ModelCard`) and the data.

    Example:
        >>> from workbench.reports.sanity import ModelCard
        >>> teacher_line("cnn", {}, ModelCard("teacher", "cnn", 94_186, 19_466_752, 0.966, "6 epochs"), 1000, 1944)
        'Teacher `cnn`: 94,186 parameters, 19.47 M FLOPs / sample, 96.60 % held-out accuracy (6 epochs); students trained on 1,000 images, scored on 1,944.'
    """
    import json

    from workbench.reports.sanity import _flops

    given = f" ({json.dumps(dict(kwargs))})" if kwargs else ""
    return (f"Teacher `{name}`{given}: {card.parameters:,} parameters, {_flops(card.flops)} FLOPs / sample, "
            f"{100 * card.accuracy:.2f} % held-out accuracy ({card.training}); students trained on {n_train:,} "
            f"images, scored on {n_test:,}.")


def _mean_std(mean: float, std: float) -> str:
    return f"{mean:.2f} ± {'n/a' if math.isnan(std) else f'{std:.2f}'}"


def _number(value: float) -> str:
    if math.isnan(value):
        return "—"
    return f"{value:.4g}"


def candidates_markdown(result: Any, frame: pd.DataFrame) -> str:
    """The per-candidate table: candidate, family, parameters, FLOPs, DisWOT score, each term and baseline
    (as the search computed them: distances, lower is better), vanilla and distilled accuracy (mean ± std
    over seeds), seeds, training seconds; a candidate left out of the correlations is marked.

    Example:
        >>> from workbench.probes.student_search import SearchResult
        >>> result = SearchResult(["mlp"], [100], [200], {"score": [-0.5]}, [0.1])
        >>> frame = pd.DataFrame({"family": ["mlp"], "seeds": [1], "vanilla_mean": [60.0], "vanilla_std": [float("nan")],
        ...                       "distilled_mean": [61.0], "distilled_std": [float("nan")], "train_seconds": [2.0],
        ...                       "near_chance": [False], "vanilla_near_chance": [False]}, index=["mlp()"])
        >>> print(candidates_markdown(result, frame).splitlines()[2])
        | `mlp()` | mlp | 100 | 200 | -0.5 | 60.00 ± n/a | 61.00 ± n/a | 1 | 2 |
    """
    where = {candidate.label: index for index, candidate in enumerate(result.candidates)}
    terms = [term for term in result.scores]
    head = ["candidate", "family", "parameters", "FLOPs", *(("DisWOT score" if t == "score" else t) for t in terms),
            "vanilla acc % (mean ± std)", "distilled acc % (mean ± std)", "seeds", "training s"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for label, row in frame.iterrows():
        index = where[label]
        shown = f"`{label}`" + (" (*near chance: left out*)" if row["near_chance"] else "")
        vanilla = _mean_std(row["vanilla_mean"], row["vanilla_std"]) + (" (*near chance*)" if row["vanilla_near_chance"]
                                                                         else "")
        cells = [shown, str(row["family"]), f"{result.params[index]:,}", f"{result.flops[index]:,}",
                 *(_number(result.scores[term][index]) for term in terms), vanilla,
                 _mean_std(row["distilled_mean"], row["distilled_std"]), str(int(row["seeds"])),
                 f"{row['train_seconds']:.0f}"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def agreement_markdown(table: pd.DataFrame) -> str:
    """The rank-agreement table: per predictor, the candidates it is defined on, Kendall τ and Spearman ρ with
    their 95 % bootstrap intervals, and what τ's interval supports.

    Example:
        >>> table = pd.DataFrame({"n": [5], "kendall_tau": [0.6], "kendall_tau_low": [-0.2], "kendall_tau_high": [1.0],
        ...                       "spearman_rho": [0.7], "spearman_rho_low": [0.0], "spearman_rho_high": [1.0]},
        ...                      index=["DisWOT score"])
        >>> print(agreement_markdown(table).splitlines()[2])
        | DisWOT score | 5 | +0.60 [-0.20, +1.00] | +0.70 [+0.00, +1.00] | no evidence either way (CI crosses 0) |
    """
    lines = ["| predictor (higher predicts better) | candidates | Kendall τ [95 % CI] | Spearman ρ [95 % CI] | τ says |",
             "|---|---|---|---|---|"]
    for name, row in table.iterrows():
        lines.append(f"| {name} | {int(row['n'])} | {_interval(row, 'kendall_tau')} | {_interval(row, 'spearman_rho')} "
                     f"| {_evidence(row)} |")
    return "\n".join(lines)


def results_markdown(result: Any, frame: pd.DataFrame, table: pd.DataFrame, *, search_seconds: float,
                     command: str = "", settings: Mapping[str, Any] | None = None, teacher: str = "",
                     withheld: bool = False) -> str:
    """The report's results as Markdown: the candidates' table (:func:`candidates_markdown`), the rank
    agreement of every predictor with the distilled accuracy (:func:`agreement_markdown`), the findings
    (:func:`findings`), how to read them and the command that re-runs it (``command``; ``settings`` shown as
    ``key=value``; ``teacher``: one line on the teacher).

    Example:
        >>> from workbench.probes.student_search import SearchResult
        >>> result = SearchResult(["mlp"], [100], [200], {"score": [-0.5]}, [0.1])
        >>> frame = pd.DataFrame({"family": ["mlp"], "seeds": [1], "vanilla_mean": [60.0], "vanilla_std": [float("nan")],
        ...                       "distilled_mean": [61.0], "distilled_std": [float("nan")], "train_seconds": [2.0],
        ...                       "near_chance": [False], "vanilla_near_chance": [False]}, index=["mlp()"])
        >>> text = results_markdown(result, frame, pd.DataFrame(), search_seconds=1.0, command="kd-workbench report diswot")
        >>> text.splitlines()[0], "Made by `kd-workbench report diswot`" in text
        ('# DisWOT validated: does a training-free score rank distilled accuracy?', True)
    """
    text = ["# DisWOT validated: does a training-free score rank distilled accuracy?", ""]
    if command:
        text += [f"Made by `{command}` on {time.strftime('%Y-%m-%d')}.", ""]
    if settings:
        text += ["Settings: " + ", ".join(f"{key}={value!r}" for key, value in settings.items()) + ".", ""]
    if teacher:
        text += [teacher, ""]
    text += ["## Candidates", "", candidates_markdown(result, frame), "",
             "DisWOT score: higher is better (−(relation + semantic), the search's `semantic` variant). `relation`, "
             "`semantic_gradcam`, `semantic_released`: DisWOT's distances between the untrained student's and the "
             "teacher's batch similarity matrices (lower is better; `semantic_released` is defined only where the "
             "student's classifier width equals the teacher's: — elsewhere). `nwot`, `snip`, `grad_norm`: zero-cost "
             "proxies (higher is better). Accuracy: top-1 on the held-out split after the last epoch, mean ± sample "
             "std over seeds (vanilla: the student alone on the labels; distilled: + KD from the teacher).", "",
             "## Rank agreement with the distilled accuracy", ""]
    if len(table):
        text += [agreement_markdown(table), "",
                 "Distances are negated (−relation, …) so that every row reads *higher predicts better*, as "
                 "Kendall τ-b and Spearman ρ (scipy) are computed; 95 % intervals: paired percentile bootstrap "
                 "over candidates. A candidate near chance is left out. An interval crossing 0 is no evidence of "
                 "a ranking.", ""]
    text += ["## Findings", ""] + [f"- {line}" for line in findings(table, frame, search_seconds, withheld)] \
        if len(table) else ["## Findings", "", "- No rank agreement was computed."]
    return "\n".join(text) + "\n"


def save_results(path: str | Path, result: Any, frame: pd.DataFrame, table: pd.DataFrame, *,
                 search_seconds: float, command: str = "", settings: Mapping[str, Any] | None = None,
                 teacher: str = "", withheld: bool = False, overwrite: bool = False) -> Path:
    """Write :func:`results_markdown` to ``path`` (a ``.md`` file) atomically; an existing file is replaced only
    with ``overwrite=True`` (``FileExistsError``), another suffix is a ``ValueError``.

    Example:
        >>> import tempfile
        >>> from workbench.probes.student_search import SearchResult
        >>> result = SearchResult(["mlp"], [100], [200], {"score": [-0.5]}, [0.1])
        >>> frame = pd.DataFrame({"family": ["mlp"], "seeds": [1], "vanilla_mean": [60.0], "vanilla_std": [float("nan")],
        ...                       "distilled_mean": [61.0], "distilled_std": [float("nan")], "train_seconds": [2.0],
        ...                       "near_chance": [False], "vanilla_near_chance": [False]}, index=["mlp()"])
        >>> path = save_results(Path(tempfile.mkdtemp()) / "diswot.md", result, frame, pd.DataFrame(), search_seconds=1.0)
        >>> path.read_text().startswith("# DisWOT validated")
        True
    """
    from workbench.files import write_atomic

    path = check_results_path(path, overwrite)
    return write_atomic(path, results_markdown(result, frame, table, search_seconds=search_seconds, command=command,
                                               settings=settings, teacher=teacher, withheld=withheld))


# ---- figures ------------------------------------------------------------------------------------------

def score_figure(result: Any, frame: pd.DataFrame, score: str = "score") -> Any:
    """Plotly: the search's ``score`` against the distilled accuracy (mean over seeds, error bar: the std),
    one trace per family; candidates left out (near chance) drawn hollow.

    Example:
        >>> from workbench.probes.student_search import SearchResult
        >>> result = SearchResult(["mlp", "cnn"], [100, 50], [200, 400], {"score": [-1.0, -0.5]}, [0.1, 0.2])
        >>> frame = pd.DataFrame({"family": ["mlp", "cnn"], "distilled_mean": [50.0, 60.0], "distilled_std": [1.0, 2.0],
        ...                       "near_chance": [False, False]}, index=["mlp()", "cnn()"])
        >>> [trace.name for trace in score_figure(result, frame).data]
        ['cnn', 'mlp']
    """
    import plotly.graph_objects as go

    where = {candidate.label: index for index, candidate in enumerate(result.candidates)}
    values = result.scores[score]
    figure = go.Figure()
    for family in sorted(set(frame["family"])):
        rows = frame[frame["family"] == family]
        figure.add_trace(go.Scatter(
            x=[values[where[label]] for label in rows.index], y=rows["distilled_mean"],
            error_y={"type": "data", "array": rows["distilled_std"].fillna(0).tolist()}, mode="markers", name=family,
            text=list(rows.index), marker={"size": 11, "symbol": ["circle-open" if out else "circle"
                                                                  for out in rows["near_chance"]]},
            hovertemplate="%{text}<br>" + score + " %{x:.4g}<br>distilled %{y:.2f} %<extra></extra>"))
    figure.update_layout(title=f"{score} vs distilled accuracy (hollow: near chance, left out)",
                         xaxis={"title": {"text": f"{score} (untrained students)"}},
                         yaxis={"title": {"text": "distilled test accuracy % (mean over seeds)"}},
                         legend={"title": {"text": "family"}})
    return figure


def agreement_figure(table: pd.DataFrame) -> Any:
    """Plotly: Kendall τ per predictor as bars with their 95 % bootstrap intervals (undefined ones left out).

    Example:
        >>> table = pd.DataFrame({"kendall_tau": [0.5, float("nan")], "kendall_tau_low": [0.1, float("nan")],
        ...                       "kendall_tau_high": [0.8, float("nan")]}, index=["DisWOT score", "snip"])
        >>> list(agreement_figure(table).data[0].x)
        ['DisWOT score']
    """
    import plotly.graph_objects as go

    shown = table[table["kendall_tau"].notna()]
    figure = go.Figure(go.Bar(
        x=list(shown.index), y=shown["kendall_tau"],
        error_y={"type": "data", "symmetric": False,
                 "array": (shown["kendall_tau_high"] - shown["kendall_tau"]).fillna(0).tolist(),
                 "arrayminus": (shown["kendall_tau"] - shown["kendall_tau_low"]).fillna(0).tolist()}))
    figure.update_layout(title="Kendall τ with the distilled accuracy (95 % bootstrap CI)",
                         yaxis={"title": {"text": "Kendall τ"}, "range": [-1.05, 1.05]},
                         xaxis={"title": {"text": "predictor (higher predicts better)"}})
    return figure


# ---- the report's parameter rules ---------------------------------------------------------------------

def candidates_rule() -> Rule:
    """The ``candidates`` parameter: at least 3 distinct ``{"name", "kwargs"}`` specs (:func:`parse_candidates`),
    each model name known and each candidate built untrained for the report's images and classes (its kwargs
    checked by building it).

    Example:
        >>> candidates_rule().check([{"name": "cnn"}, {"name": "mlp"}, {"name": "vitt"}], None)[:56]
        "candidate 3 (vitt()): unknown model name 'vitt'. Close n"
    """
    names = model_name("student")

    def check(value: Any, context: Context) -> str | None:
        for number, candidate in enumerate(parse_candidates(value), 1):
            reason = names.check(candidate.name, context)
            if reason:
                return f"candidate {number} ({candidate.label}): {reason}"
        return None

    def check_models(value: Any, context: Context) -> str | None:
        dataset = context.values.get(context.declaration.dataset, "animals")
        for number, candidate in enumerate(parse_candidates(value), 1):
            values = {"student": candidate.name, "student_kwargs": dict(candidate.kwargs), "dataset": dataset}
            built = Context(context.report, Declaration({}, {"student": ("student", "student_kwargs")}), values)
            try:
                built.model("student")
            except ValueError as error:
                return f"candidate {number} ({candidate.label}): {error}"
        return None

    return Rule('a list of at least 3 {"name": model name, "kwargs": {...}}', check, check_models,
                '[{"name": "cnn", "kwargs": {"widths": [8, 16]}}, {"name": "mlp", "kwargs": {"hidden": [32]}}, '
                '{"name": "vit", "kwargs": {"dim": 32, "depth": 2, "heads": 2}}]')
