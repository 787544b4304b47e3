"""What a student architecture search works on and hands back: candidates, generated search spaces, the
two search strategies (exhaustive, aging evolution), the :class:`SearchResult`, and rank agreement with
trained accuracy.

Nothing here knows how a candidate is scored: :func:`workbench.probes.diswot.search` passes a scoring
function. A candidate is a model spec — a :func:`workbench.models.create` name and its keyword arguments —
so a search result is plain JSON and any candidate can be rebuilt from it.
"""
from __future__ import annotations

import itertools
import math
import random
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd
import torch
from scipy import stats
from torch import nn

from workbench.models import create, create_sized
from workbench.probes.result_io import NON_FINITE, JsonResult, check_int, check_json_dict

__all__ = ["Candidate", "SearchSpace", "SearchResult", "parse_candidates", "exhaustive", "aging_evolution",
           "rank_agreement"]

CANDIDATE_KEYS = ("name", "kwargs", "family")
"""The keys of a candidate dict: a model name, its keyword arguments, a family (optional)."""
Score = Callable[["Candidate"], "Mapping[str, float] | None"]
"""Scores one candidate: its row (numbers by name, ``"score"`` among them), or None when it is refused."""


def _frozen(value: Any) -> Any:
    """Lists as tuples, recursively: kwargs compare and hash by value (``[8, 16]`` is ``(8, 16)``)."""
    if isinstance(value, (list, tuple)):
        return tuple(_frozen(item) for item in value)
    if isinstance(value, Mapping):
        raise TypeError(f"a candidate's argument values are numbers, strings or lists of them, got a dict {value!r}")
    return value


def _json_ready(value: Any) -> Any:
    if isinstance(value, tuple):
        return [_json_ready(item) for item in value]
    return value


@dataclass(frozen=True)
class Candidate:
    """One student architecture: a :func:`workbench.models.create` name, its keyword arguments and a family
    (what a plot colours it by; the name by default).

    Example:
        >>> candidate = Candidate("cnn", {"widths": [8, 16]})
        >>> candidate.label, candidate.family
        ('cnn(widths=(8, 16))', 'cnn')
        >>> candidate == Candidate.from_json(candidate.to_json())
        True
        >>> candidate.build(img_size=16).feature_info[-1]["num_chs"]
        16
    """

    name: str
    kwargs: Mapping[str, Any] = field(default_factory=dict)
    family: str = ""

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name:
            raise TypeError(f"a candidate's name must be a model name (a non-empty str), got {self.name!r}")
        if not isinstance(self.kwargs, Mapping) or not all(isinstance(key, str) for key in self.kwargs):
            raise TypeError(f"candidate {self.name!r}: kwargs must be a dict with str keys, got {self.kwargs!r}")
        object.__setattr__(self, "kwargs", {key: _frozen(value) for key, value in sorted(self.kwargs.items())})
        object.__setattr__(self, "family", str(self.family or self.name))

    def __hash__(self) -> int:
        return hash((self.name, tuple(self.kwargs.items()), self.family))

    @property
    def label(self) -> str:
        """``name(key=value, ...)``: unique for distinct specs, readable in a table."""
        arguments = ", ".join(f"{key}={value!r}" for key, value in self.kwargs.items())
        return f"{self.name}({arguments})"

    def build(self, img_size: int | None = None) -> nn.Module:
        """The model, freshly initialised (``img_size`` passed where the model takes one)."""
        if img_size is None:
            return create(self.name, **self.kwargs)
        return create_sized(self.name, img_size, **self.kwargs)

    def to_json(self) -> dict[str, Any]:
        """``{"name", "kwargs", "family"}`` with lists for tuples: what a result file holds."""
        return {"name": self.name, "kwargs": {key: _json_ready(value) for key, value in self.kwargs.items()},
                "family": self.family}

    @classmethod
    def from_json(cls, record: Any) -> "Candidate":
        """A candidate from a name, a ``{"name", "kwargs", "family"}`` dict or a candidate."""
        if isinstance(record, Candidate):
            return record
        if isinstance(record, str):
            return cls(record)
        if isinstance(record, Mapping):
            unknown = [key for key in record if key not in CANDIDATE_KEYS]
            if unknown or "name" not in record:
                found = f"unknown key {unknown[0]!r}" if unknown else "no 'name'"
                raise ValueError(f"{found}; a candidate has the keys {', '.join(map(repr, CANDIDATE_KEYS))} "
                                 "('name' required)")
            kwargs = record.get("kwargs") or {}
            if not isinstance(kwargs, Mapping):
                raise TypeError(f"candidate {record['name']!r}: kwargs must be a dict of model arguments, got "
                                f"{kwargs!r}")
            return cls(record["name"], dict(kwargs), record.get("family") or "")
        raise TypeError(f"a candidate is a model name, a dict {{'name': ..., 'kwargs': {{...}}}} or a Candidate; got "
                        f"{type(record).__name__}")


def parse_candidates(items: Any) -> list[Candidate]:
    """A list of distinct candidates from names, dicts and :class:`Candidate`\\ s; an item that is not one says
    its position (``candidate 2: ...``).

    Example:
        >>> [c.label for c in parse_candidates(["mlp", {"name": "cnn", "kwargs": {"widths": [8]}}])]
        ['mlp()', 'cnn(widths=(8,))']
    """
    if isinstance(items, (str, Mapping, Candidate)) or not isinstance(items, Sequence):
        raise TypeError(f"candidates must be a list (of names, dicts or Candidates) or a SearchSpace, got "
                        f"{type(items).__name__}")
    candidates = []
    for number, item in enumerate(items, 1):
        try:
            candidates.append(Candidate.from_json(item))
        except (TypeError, ValueError) as error:
            raise type(error)(f"candidate {number}: {error}") from None
    if not candidates:
        raise ValueError("no candidates: give at least one model spec, e.g. [{'name': 'cnn', 'kwargs': "
                         "{'widths': [8, 16]}}]")
    seen: set[Candidate] = set()
    for candidate in candidates:
        if candidate in seen:
            raise ValueError(f"candidate {candidate.label} is listed twice")
        seen.add(candidate)
    return candidates


class SearchSpace(Sequence[Candidate]):
    """A generated space: for each family (a model name), a grid of choices per keyword argument. Its
    candidates are every combination, family by family; :meth:`mutate` changes one choice to a neighbouring
    value (the single mutation of aging evolution).

    ``SearchSpace({"cnn": {"widths": [[8], [8, 16], [16, 32]]}, "vit": {"dim": [16, 32], "depth": [1, 2],
    "patch_size": [4]}})`` holds 3 + 4 candidates. A family's key may carry a suffix after ``:`` to grid one
    model twice (``"vit:small"``); the model name is what precedes it.

    Example:
        >>> space = SearchSpace({"cnn": {"widths": [[8], [8, 16]]}, "vit": {"dim": [16, 32], "depth": [1, 2]}})
        >>> len(space), space[0].label, space[-1].label
        (6, 'cnn(widths=(8,))', 'vit(depth=2, dim=32)')
        >>> space.mutate(space[0], random.Random(0)).label
        'cnn(widths=(8, 16))'
    """

    def __init__(self, families: Mapping[str, Mapping[str, Sequence[Any]]]) -> None:
        if not isinstance(families, Mapping) or not families:
            raise ValueError("a SearchSpace needs at least one family: {model name: {argument: [choices]}}")
        self.families: dict[str, dict[str, list[Any]]] = {}
        self._candidates: list[Candidate] = []
        for key, grid in families.items():
            if not isinstance(grid, Mapping):
                raise TypeError(f"family {key!r}: its grid must be a dict {{argument: [choices]}}, got "
                                f"{type(grid).__name__}")
            choices = {}
            for argument, values in grid.items():
                if isinstance(values, (str, bytes)) or not isinstance(values, Sequence) or not values:
                    raise ValueError(f"family {key!r}, argument {argument!r}: give a non-empty list of choices, "
                                     f"got {values!r}")
                choices[str(argument)] = [_frozen(value) for value in values]
            self.families[str(key)] = choices
            name = str(key).split(":")[0]
            for combination in itertools.product(*choices.values()):
                self._candidates.append(Candidate(name, dict(zip(choices, combination)), family=str(key)))
        self._index = {candidate: index for index, candidate in enumerate(self._candidates)}

    def __len__(self) -> int:
        return len(self._candidates)

    def __getitem__(self, index: Any) -> Any:
        return self._candidates[index]

    def __iter__(self) -> Iterator[Candidate]:
        return iter(self._candidates)

    def __contains__(self, candidate: object) -> bool:
        return candidate in self._index

    def sample(self, rng: random.Random) -> Candidate:
        """A uniformly random candidate."""
        return self._candidates[rng.randrange(len(self._candidates))]

    def mutate(self, candidate: Candidate, rng: random.Random) -> Candidate:
        """``candidate`` with one argument (drawn among those with a choice) moved to a neighbouring choice;
        the candidate itself when its family has nothing to choose."""
        if candidate not in self._index:
            raise ValueError(f"{candidate.label} is not in this search space")
        choices = self.families[candidate.family]
        open_arguments = [argument for argument, values in choices.items() if len(values) > 1]
        if not open_arguments:
            return candidate
        argument = open_arguments[rng.randrange(len(open_arguments))]
        values = choices[argument]
        position = values.index(candidate.kwargs[argument])
        neighbours = [index for index in (position - 1, position + 1) if 0 <= index < len(values)]
        kwargs = {**candidate.kwargs, argument: values[neighbours[rng.randrange(len(neighbours))]]}
        return Candidate(candidate.name, kwargs, family=candidate.family)

    def to_json(self) -> dict[str, Any]:
        """The grid as JSON (what the search's settings record)."""
        return {key: {argument: [_json_ready(value) for value in values] for argument, values in grid.items()}
                for key, grid in self.families.items()}


def exhaustive(candidates: Sequence[Candidate], evaluate: Score, budget: int | None = None) -> Iterator[
        tuple[Candidate, Mapping[str, float] | None]]:
    """Every candidate in order (the first ``budget`` that ``evaluate`` accepts): ``(candidate, row)`` pairs,
    ``row`` None for one it refused.

    Example:
        >>> pairs = list(exhaustive(parse_candidates(["a", "b", "c"]), lambda c: {"score": len(c.name)}, budget=2))
        >>> [(c.name, row["score"]) for c, row in pairs]
        [('a', 1), ('b', 1)]
    """
    scored = 0
    for candidate in candidates:
        if budget is not None and scored >= budget:
            return
        row = evaluate(candidate)
        scored += row is not None
        yield candidate, row


def aging_evolution(space: SearchSpace, evaluate: Score, budget: int, *, population: int = 10,
                    sample_size: int = 3, seed: int = 0) -> Iterator[tuple[Candidate, Mapping[str, float] | None]]:
    """Aging (regularized) evolution (Real et al. 2019) over ``space``: ``population`` random candidates,
    then, until ``budget`` distinct candidates are scored, a tournament of ``sample_size`` members drawn from
    the population, the one with the *highest* score as the parent, one mutation of it as the child, which
    joins the population while the oldest member leaves. A candidate is scored once (its row is remembered);
    a refused one (``row`` None) never joins. Stops early when ``20 × budget`` proposals bring nothing new
    (a small space is exhausted). Yields ``(candidate, row)`` for each newly evaluated candidate.

    Example:
        >>> space = SearchSpace({"mlp": {"hidden": [[4], [8], [16], [32], [64]]}})
        >>> best_first = lambda c: {"score": float(c.kwargs["hidden"][0])}
        >>> found = [c.kwargs["hidden"][0] for c, _ in aging_evolution(space, best_first, 4, population=2, seed=1)]
        >>> len(found), max(found) >= 32  # the tournament climbs towards the best
        (4, True)
    """
    budget = check_int(budget, "budget", minimum=1)
    population = check_int(population, "population", minimum=1)
    sample_size = check_int(sample_size, "sample_size", minimum=1)
    rng = random.Random(seed)
    rows: dict[Candidate, Mapping[str, float] | None] = {}
    members: list[tuple[Candidate, float]] = []
    scored, idle = 0, 0

    def propose(candidate: Candidate) -> Iterator[tuple[Candidate, Mapping[str, float] | None]]:
        nonlocal scored, idle
        if candidate in rows:
            idle += 1
        else:
            idle = 0
            rows[candidate] = evaluate(candidate)
            scored += rows[candidate] is not None
            yield candidate, rows[candidate]
        row = rows[candidate]
        if row is not None:
            members.append((candidate, _ranked(row["score"])))
            if len(members) > population:
                members.pop(0)

    while scored < budget and idle < 20 * budget:
        if len(members) < population and scored < population:
            yield from propose(space.sample(rng))
            continue
        if not members:  # every proposal so far was refused
            yield from propose(space.sample(rng))
            continue
        tournament = rng.sample(members, min(sample_size, len(members)))
        parent = max(tournament, key=lambda member: member[1])[0]
        yield from propose(space.mutate(parent, rng))


def _ranked(value: float) -> float:
    """A score as a tournament compares it: NaN loses to everything."""
    return -math.inf if value is None or math.isnan(value) else float(value)


def _floats(values: Any, name: str) -> list[float]:
    if isinstance(values, (str, bytes)) or not isinstance(values, Sequence):
        raise TypeError(f"{name} must be a list of numbers, got {type(values).__name__}")
    out = []
    for value in values:
        value = NON_FINITE.get(value, value) if isinstance(value, str) else value
        if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
            raise TypeError(f"{name} must hold numbers, found {value!r}")
        out.append(float(value))
    return out


@dataclass
class SearchResult(JsonResult):
    """The candidates a search scored (in evaluation order), their size and every score.

    ``scores`` maps a term to one value per candidate: ``"score"`` (what the search ranks by, higher is
    better) and the search's other terms and baselines; NaN where a term cannot be computed for a candidate.
    ``skipped`` counts candidates refused by the constraint; ``settings`` records how the search ran.

    Example:
        >>> result = SearchResult(candidates=["mlp", "cnn"], params=[100, 50], flops=[200, 400],
        ...                       scores={"score": [-1.0, -0.5]}, seconds=[0.1, 0.2])
        >>> result.best.label, result.to_frame()["label"].tolist()
        ('cnn()', ['cnn()', 'mlp()'])
    """

    candidates: list
    params: list
    flops: list
    scores: dict
    seconds: list
    skipped: int = 0
    settings: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.candidates = [Candidate.from_json(item) for item in self.candidates]
        count = len(self.candidates)
        if count == 0:
            raise ValueError("a SearchResult holds at least one scored candidate")
        self.params = [check_int(value, "params") for value in self.params]
        self.flops = [check_int(value, "flops") for value in self.flops]
        self.seconds = _floats(self.seconds, "seconds")
        if not isinstance(self.scores, Mapping) or "score" not in self.scores:
            raise ValueError("scores must be a dict of term -> values with a 'score' entry")
        self.scores = {str(name): _floats(values, f"scores[{name!r}]") for name, values in self.scores.items()}
        for name, values in (("params", self.params), ("flops", self.flops), ("seconds", self.seconds),
                             *((f"scores[{key!r}]", value) for key, value in self.scores.items())):
            if len(values) != count:
                raise ValueError(f"{name} has {len(values)} values for {count} candidates")
        self.skipped = check_int(self.skipped, "skipped")
        self.settings = check_json_dict(self.settings, "settings")

    @property
    def best(self) -> Candidate:
        """The candidate with the highest ``score`` (the first one of a tie)."""
        return self.candidates[int(np.argmax([_ranked(value) for value in self.scores["score"]]))]

    def to_frame(self) -> pd.DataFrame:
        """One row per candidate — ``label``, ``family``, ``params``, ``flops``, every score, ``seconds`` —
        best ``score`` first (NaN last, ties in evaluation order); the index is the evaluation order."""
        frame = pd.DataFrame({"label": [c.label for c in self.candidates],
                              "family": [c.family for c in self.candidates],
                              "params": self.params, "flops": self.flops,
                              **{name: values for name, values in self.scores.items()},
                              "seconds": self.seconds})
        return frame.sort_values("score", ascending=False, na_position="last", kind="stable")

    def figure(self, score: str = "score") -> Any:
        """Plotly: ``score`` against parameters (log axis), one trace per family, the best marked.

        Example:
            >>> result = SearchResult(["mlp", "cnn"], [100, 50], [200, 400], {"score": [-1.0, -0.5]}, [0.1, 0.2])
            >>> [trace.name for trace in result.figure().data]
            ['cnn', 'mlp']
        """
        import plotly.graph_objects as go

        values = self._term(score)
        figure = go.Figure()
        for family in sorted({c.family for c in self.candidates}):
            rows = [i for i, c in enumerate(self.candidates) if c.family == family]
            figure.add_trace(go.Scatter(
                x=[self.params[i] for i in rows], y=[values[i] for i in rows], mode="markers", name=family,
                text=[self.candidates[i].label for i in rows], marker={"size": 10},
                hovertemplate="%{text}<br>parameters %{x:,}<br>" + score + " %{y:.4g}<extra></extra>"))
        best = self.best
        figure.update_layout(
            title=f"{score} vs parameters ({len(self.candidates)} candidates; best by score: {best.label})",
            xaxis={"title": {"text": "parameters"}, "type": "log"}, yaxis={"title": {"text": score}},
            legend={"title": {"text": "family"}})
        return figure

    def plot(self, score: str = "score", ax: Any = None) -> Any:
        """Matplotlib: ``score`` against parameters (log x), coloured by family, each point labelled."""
        import matplotlib.pyplot as plt

        values = self._term(score)
        if ax is None:
            _, ax = plt.subplots(figsize=(7, 4.5))
        for family in sorted({c.family for c in self.candidates}):
            rows = [i for i, c in enumerate(self.candidates) if c.family == family]
            ax.scatter([self.params[i] for i in rows], [values[i] for i in rows], label=family, s=40)
        ax.set_xscale("log")
        ax.set_xlabel("parameters")
        ax.set_ylabel(score)
        ax.set_title(f"{score} vs parameters ({len(self.candidates)} candidates)")
        ax.legend(title="family", fontsize=8)
        ax.grid(alpha=0.3)
        return ax.figure

    def _term(self, score: str) -> list[float]:
        if score in ("params", "flops"):
            return [float(value) for value in getattr(self, score)]
        if score not in self.scores:
            raise KeyError(f"no term {score!r} in this result; it has {sorted(self.scores)}")
        return self.scores[score]

    def __repr__(self) -> str:
        return (f"SearchResult({len(self.candidates)} candidates, best {self.best.label}, terms "
                f"{sorted(self.scores)}, skipped {self.skipped})")


def rank_agreement(scores: Mapping[str, Sequence[float]], target: Sequence[float], *, n_resamples: int = 2000,
                   confidence: float = 0.95, seed: int = 0) -> pd.DataFrame:
    """How well each score ranks ``target`` (e.g. distilled accuracy): Kendall τ-b and Spearman ρ (scipy), each
    with a paired percentile-bootstrap interval (``scipy.stats.bootstrap``, ``n_resamples``, ``confidence``);
    one row per score, NaN where a score has fewer than three finite values or is constant.

    Example:
        >>> frame = rank_agreement({"good": [1, 2, 3, 4, 5], "bad": [5, 4, 3, 2, 1]}, [0.1, 0.2, 0.3, 0.4, 0.5],
        ...                        n_resamples=200)
        >>> float(round(frame.loc["good", "kendall_tau"], 9)), float(round(frame.loc["bad", "spearman_rho"], 9))
        (1.0, -1.0)
    """
    target = np.asarray(target, dtype=float)
    rows = {}
    for name, values in scores.items():
        values = np.asarray(values, dtype=float)
        if values.shape != target.shape:
            raise ValueError(f"score {name!r} has {values.size} values for {target.size} targets")
        keep = np.isfinite(values) & np.isfinite(target)
        x, y = values[keep], target[keep]
        row = {"n": int(keep.sum())}
        for key, function in (("kendall_tau", _kendall), ("spearman_rho", _spearman)):
            row[key], row[f"{key}_low"], row[f"{key}_high"] = _with_interval(function, x, y, n_resamples,
                                                                             confidence, seed)
        rows[name] = row
    return pd.DataFrame.from_dict(rows, orient="index")


def _kendall(x: np.ndarray, y: np.ndarray) -> float:
    return float(stats.kendalltau(x, y).statistic)


def _spearman(x: np.ndarray, y: np.ndarray) -> float:
    return float(stats.spearmanr(x, y).statistic)


def _with_interval(function: Callable[[np.ndarray, np.ndarray], float], x: np.ndarray, y: np.ndarray,
                   n_resamples: int, confidence: float, seed: int) -> tuple[float, float, float]:
    if len(x) < 3 or np.ptp(x) == 0 or np.ptp(y) == 0:
        return math.nan, math.nan, math.nan
    with warnings.catch_warnings():  # a resample with a constant column gives NaN: the interval ignores it
        warnings.simplefilter("ignore")
        interval = stats.bootstrap((x, y), function, paired=True, vectorized=False, n_resamples=n_resamples,
                                   confidence_level=confidence, method="percentile",
                                   rng=np.random.default_rng(seed)).confidence_interval
    return function(x, y), float(interval.low), float(interval.high)


def describe_space(candidates: Sequence[Candidate] | SearchSpace) -> Any:
    """What the search's settings record about its candidates: a space's grid, or the candidate specs."""
    if isinstance(candidates, SearchSpace):
        return {"space": candidates.to_json()}
    return {"candidates": [candidate.to_json() for candidate in candidates]}


@contextmanager
def seeded(seed: int) -> Iterator[None]:
    """Torch's CPU generator seeded with ``seed`` inside the block and restored after it (a candidate is built
    the same way whatever ran before)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield
