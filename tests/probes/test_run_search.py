"""Student search: candidates and spaces, the two strategies, the constraint, the result object, and rank
agreement. Every row a search reports is recomputed independently (``diswot.score`` on the candidate built
with the search's seed, the zero-cost proxies, ``count_parameters`` / ``count_flops``); aging evolution is
checked to take the *best* member of each tournament as the parent (with the tournament covering the whole
population the parent is always the population's best, so every child is one mutation away from it)."""
from __future__ import annotations

import math
import random

import numpy as np
import pytest
import torch
from scipy import stats

from workbench import models
from workbench.probes import diswot, zero_cost
from workbench.probes.student_search import (
    Candidate, SearchResult, SearchSpace, aging_evolution, exhaustive, parse_candidates, rank_agreement, seeded,
)

pytestmark = pytest.mark.usefixtures("one_thread")

CANDIDATES = [{"name": "cnn", "kwargs": {"widths": [8]}}, {"name": "cnn", "kwargs": {"widths": [8, 16]}},
              {"name": "mixer", "kwargs": {"patch_size": 4, "dim": 16, "depth": 1}}, "mlp"]


@pytest.fixture(scope="module")
def setup():
    torch.manual_seed(0)
    teacher = models.create("cnn", widths=(16, 16), img_size=16)
    generator = torch.Generator().manual_seed(1)
    data = (torch.randn(20, 1, 16, 16, generator=generator), torch.randint(0, 10, (20,), generator=generator))
    return teacher, data


def test_every_row_is_the_candidate_s_own_numbers(setup):
    teacher, (x, y) = setup
    rows = []
    with pytest.warns(RuntimeWarning, match="MLP.*no spatial map"):
        result = diswot.search(teacher, CANDIDATES, (x, y), batch_size=16, seed=5, device="cpu", progress=False,
                               on_result=lambda row, index: rows.append((index, row)))
    assert [index for index, _ in rows] == [0, 1, 2, 3] and len(result.candidates) == 4
    for index, spec in enumerate(parse_candidates(CANDIDATES)):
        with seeded(5):
            model = spec.build(img_size=16)
        expected = diswot.score(teacher, model, (x[:16], y[:16]), batch_size=16, seed=5, device="cpu")
        assert result.candidates[index] == spec and rows[index][1]["label"] == spec.label
        assert result.params[index] == models.count_parameters(model)
        assert result.flops[index] == models.count_flops(model, x[:1])
        assert result.scores["score"][index] == pytest.approx(expected.score, rel=1e-9, nan_ok=True)
        assert result.scores["relation"][index] == pytest.approx(expected.relation, rel=1e-9)
        assert result.scores["semantic_gradcam"][index] == pytest.approx(expected.semantic_gradcam, rel=1e-9,
                                                                         nan_ok=True)
        for name, proxy in zero_cost.PROXIES.items():
            assert result.scores[name][index] == pytest.approx(proxy(model, x[:16], y[:16]), rel=1e-9)
    released = result.scores["semantic_released"]
    assert all(map(math.isfinite, released[1:3])) and math.isnan(released[0]) and math.isnan(released[3])  # width 16
    gradcam = result.scores["semantic_gradcam"]  # an MLP has no map: NaN, and so is its score, ranked last
    assert math.isnan(gradcam[3]) and math.isnan(result.scores["score"][3]) and all(map(math.isfinite, gradcam[:3]))
    frame = result.to_frame()
    assert frame["score"].iloc[:3].is_monotonic_decreasing and np.isnan(frame["score"].iloc[3])  # NaN last
    assert result.best.label == frame["label"].iloc[0]


def test_a_search_does_not_depend_on_what_ran_before(setup):
    teacher, data = setup
    first = diswot.search(teacher, CANDIDATES[:2], data, batch_size=16, device="cpu", progress=False)
    torch.manual_seed(123)
    torch.randn(1000)
    again = diswot.search(teacher, CANDIDATES[:2], data, batch_size=16, device="cpu", progress=False)
    assert first.scores.keys() == again.scores.keys() and first.params == again.params
    for name, values in first.scores.items():  # bitwise, NaN where NaN
        np.testing.assert_array_equal(values, again.scores[name])


def test_the_constraint_refuses_candidates_and_the_budget_counts_scored_ones(setup):
    teacher, data = setup
    sizes = [models.count_parameters(c.build(16)) for c in parse_candidates(CANDIDATES)]
    cap = sorted(sizes)[1]  # the two smallest fit
    result = diswot.search(teacher, CANDIDATES, data, constraint={"parameters": cap}, batch_size=16, device="cpu",
                           progress=False)
    assert sorted(result.params) == sorted(sizes)[:2] and result.skipped == 2
    budgeted = diswot.search(teacher, CANDIDATES, data, budget=1, constraint={"parameters": cap}, batch_size=16,
                             device="cpu", progress=False)
    assert len(budgeted.candidates) == 1
    with pytest.raises(ValueError, match="no candidate fits the constraint"):
        diswot.search(teacher, CANDIDATES, data, constraint={"parameters": 10}, device="cpu", progress=False)
    with pytest.raises(ValueError, match="unknown constraint"):
        diswot.search(teacher, CANDIDATES, data, constraint={"memory": 10}, device="cpu", progress=False)
    with pytest.raises(ValueError, match="unknown baseline"):
        diswot.search(teacher, CANDIDATES, data, baselines=["zen"], device="cpu", progress=False)


def test_candidates_and_spaces():
    assert Candidate("cnn", {"widths": [8]}) == Candidate("cnn", {"widths": (8,)})
    with pytest.raises(ValueError, match="listed twice"):
        parse_candidates(["mlp", {"name": "mlp"}])
    with pytest.raises(ValueError, match="no candidates"):
        parse_candidates([])
    with pytest.raises(ValueError, match="'name'"):
        parse_candidates([{"model": "mlp"}])
    with pytest.raises(TypeError, match="a list"):
        parse_candidates("mlp")
    space = SearchSpace({"cnn": {"widths": [[8], [8, 16], [16, 32]]}, "vit:wide": {"dim": [16, 32], "depth": [1, 2]}})
    assert len(space) == 7 and [c.family for c in space].count("vit:wide") == 4 and space[3].name == "vit"
    rng = random.Random(0)
    for candidate in space:
        for _ in range(5):
            child = space.mutate(candidate, rng)
            changed = [k for k in candidate.kwargs if child.kwargs[k] != candidate.kwargs[k]]
            assert child.family == candidate.family and len(changed) == 1  # one argument, one step away
            values = space.families[candidate.family][changed[0]]
            assert abs(values.index(child.kwargs[changed[0]]) - values.index(candidate.kwargs[changed[0]])) == 1


def test_aging_evolution_takes_the_best_of_each_tournament():
    space = SearchSpace({"mlp": {"hidden": [[width] for width in range(1, 41)]}})
    value = lambda candidate: -abs(candidate.kwargs["hidden"][0] - 30)  # noqa: E731  (the best is 30)
    population, proposals, parents = 4, [], []
    sample, mutate = space.sample, space.mutate

    def record(candidate):
        proposals.append(candidate)
        return candidate

    space.sample = lambda rng: record(sample(rng))
    space.mutate = lambda parent, rng: (parents.append((parent, proposals[-population:])), record(mutate(parent,
                                                                                                         rng)))[1]
    scored = list(aging_evolution(space, lambda c: {"score": value(c)}, budget=25, population=population,
                                  sample_size=population, seed=2))
    # always the best parent: once at the optimum every child is already known, so it stops before the budget
    assert population < len(scored) < 25 and len(parents) >= len(scored) - population
    for parent, members in parents:  # the population is the last four proposals (the oldest leaves)
        assert value(parent) == max(map(value, members))
    assert max(value(c) for c, _ in scored) == 0  # it climbed to the optimum
    # a re-proposed candidate is not scored twice; evolution stops when the space is exhausted
    small = SearchSpace({"mlp": {"hidden": [[4], [8]]}})
    assert len(list(aging_evolution(small, lambda c: {"score": 0.0}, budget=5, population=2))) == 2


def test_search_over_a_space_uses_evolution_under_a_budget(setup):
    teacher, data = setup
    space = SearchSpace({"cnn": {"widths": [[4], [8], [8, 16], [16, 16], [16, 32]]}})
    result = diswot.search(teacher, space, data, budget=3, population=2, sample_size=2, batch_size=16,
                           device="cpu", progress=False)
    assert len(result.candidates) == 3 and result.settings["strategy"] == "aging evolution"
    full = diswot.search(teacher, space, data, batch_size=16, device="cpu", progress=False)
    assert full.settings["strategy"] == "exhaustive" and full.best.label == "cnn(widths=(16, 16))"  # the teacher


def test_exhaustive_keeps_the_order_and_skips_refused():
    specs = parse_candidates(["a", "bb", "c", "dd"])
    pairs = list(exhaustive(specs, lambda c: None if len(c.name) == 2 else {"score": 1.0}))
    assert [c.name for c, _ in pairs] == ["a", "bb", "c", "dd"] and [row is None for _, row in pairs] == [
        False, True, False, True]


def test_a_result_saves_loads_and_draws(tmp_path, setup):
    teacher, data = setup
    result = diswot.search(teacher, CANDIDATES, data, batch_size=16, device="cpu", progress=False)
    loaded = SearchResult.load(result.save(tmp_path / "search.json"))
    assert loaded.candidates == result.candidates and loaded.params == result.params
    np.testing.assert_array_equal(loaded.scores["semantic_released"], result.scores["semantic_released"])  # NaN too
    assert loaded.settings == result.settings
    figure = result.figure("nwot")
    assert sorted(trace.name for trace in figure.data) == ["cnn", "mixer", "mlp"]
    drawn = sorted((x, y) for trace in figure.data for x, y in zip(trace.x, trace.y))
    assert drawn == sorted(zip(result.params, result.scores["nwot"]))
    import matplotlib

    matplotlib.use("Agg")
    assert result.plot().axes[0].get_xscale() == "log"
    (tmp_path / "bad.json").write_text('{"type": "SearchResult", "candidates": []}')
    with pytest.raises(ValueError, match="missing field"):
        SearchResult.load(tmp_path / "bad.json")


def test_rank_agreement_is_scipy_s_with_an_interval_around_it():
    rng = np.random.default_rng(0)
    target = rng.normal(size=15)
    score = target + rng.normal(scale=0.5, size=15)
    frame = rank_agreement({"score": score, "constant": np.ones(15), "gappy": np.r_[score[:13], np.nan, np.nan]},
                           target, n_resamples=300)
    assert frame.loc["score", "kendall_tau"] == pytest.approx(stats.kendalltau(score, target).statistic)
    assert frame.loc["score", "spearman_rho"] == pytest.approx(stats.spearmanr(score, target).statistic)
    assert frame.loc["score", "kendall_tau_low"] <= frame.loc["score", "kendall_tau"] <= frame.loc[
        "score", "kendall_tau_high"]
    assert np.isnan(frame.loc["constant", "kendall_tau"])
    assert frame.loc["gappy", "n"] == 13
    assert frame.loc["gappy", "kendall_tau"] == pytest.approx(stats.kendalltau(score[:13], target[:13]).statistic)
