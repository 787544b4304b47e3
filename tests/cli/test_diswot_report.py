"""The diswot report: its parameters and their checks (the candidates, the results file), the results table
and its rank-agreement numbers recomputed independently, the findings' wording, and a tiny end-to-end run
through the CLI under papermill (slow)."""
from __future__ import annotations

import json
import math
import os

import numpy as np
import pandas as pd
import pytest
from scipy import stats

from fake_runner import executor  # noqa: F401 (a fixture)
from report_cli import run_report_cli

from workbench import cli, reports
from workbench.probes.student_search import Candidate, SearchResult
from workbench.reports import diswot_rank
from workbench.reports.compare import Comparison

TINY_CANDIDATES = [{"name": "cnn", "kwargs": {"widths": [16, 32]}}, {"name": "resnet", "kwargs": {"widths": [8, 16]}},
                   {"name": "cnn", "kwargs": {"widths": [8, 16, 32]}}, {"name": "mlp", "kwargs": {"hidden": [32]}}]
# 4 candidates × 2 methods × 2 seeds, 5 epochs of 25 steps on 400 digits; the teacher trained 2 epochs in a
# private cache. Three candidates give a spatial map (a DisWOT score); all four train above chance.
TINY = ["-p", f"candidates={json.dumps(TINY_CANDIDATES)}", "-p", "dataset=digits", "-p", "teacher=cnn_small",
        "-p", "teacher_epochs=2", "-p", "epochs=5", "-p", "n_train=400", "-p", "seeds=[0, 1]", "-p", "batch_size=16",
        "-p", "search_batch_size=32"]


def defaults() -> dict:
    return {name: spec["default"] for name, spec in reports.report_parameters("diswot").items()}


def test_the_default_candidates_are_varied_and_every_one_is_smaller_than_the_teacher():
    from workbench.models import count_flops, count_parameters

    values = defaults()
    assert values["candidates"] == diswot_rank.DEFAULT_CANDIDATES and values["dataset"] == "animals"
    assert values["seeds"] == [0, 1, 2] and values["results"] is None and values["search_batch_size"] == 64
    candidates = diswot_rank.parse_candidates(values["candidates"])
    assert len(candidates) >= 12
    assert {c.family for c in candidates} == {"cnn", "resnet", "vit", "mixer", "mlp"}
    assert len({len(c.kwargs["widths"]) for c in candidates if c.name == "cnn"}) >= 3  # several depths
    teacher = reports.seeded_model(values["teacher"], "animals", **values["teacher_kwargs"])
    import torch

    x = torch.zeros(1, 1, 32, 32)
    for candidate in candidates:
        student = reports.seeded_model(candidate.name, "animals", **candidate.kwargs)
        assert count_parameters(student) < count_parameters(teacher), candidate.label
        assert count_flops(student, x) < count_flops(teacher, x), candidate.label


CODE = "__import__('os').system('touch pwned')"


@pytest.mark.parametrize("value, needles", [
    ([{"name": "cnn"}, {"name": "mlp"}, {"name": "vitt"}], ["candidate 3 (vitt())", "unknown model name 'vitt'"]),
    ([{"name": "cnn"}, {"name": "mlp"}, {"name": "cnn"}], ["candidate cnn() is listed twice"]),
    ([{"name": "cnn", "kwargs": {"widths": [8]}}, {"name": "mlp"}, {"name": "cnn", "kwargs": {"widths": [8]}}],
     ["candidate cnn(widths=(8,)) is listed twice"]),
    ([{"name": CODE}, {"name": "mlp"}, {"name": "vit"}], ["candidate 1", "unknown model name"]),
    ([{"name": "cnn", "kwargs": {"widths": CODE}}, {"name": "mlp"}, {"name": "vit"}], ["candidate 1", "cannot be built"]),
    ([CODE, {"name": "mlp"}, {"name": "vit"}], ["candidate 1 is not a dict"]),
    (CODE, ["must be a list of at least 3 candidates"]),
    ([{"name": "cnn"}, {"name": "mlp"}], ["at least 3", "a rank correlation needs 3"]),
    ([{"name": "cnn", "kwargs": {"widht": [8]}}, {"name": "mlp"}, {"name": "vit"}], ["candidate 1", "widht"]),
    ([{"name": "cnn", "kwargs": {"num_classes": 4}}, {"name": "mlp"}, {"name": "vit"}],
     ["'num_classes' is set by the report"]),
    ([{"name": "cnn", "kwarg": {}}, {"name": "mlp"}, {"name": "vit"}], ["unknown key 'kwarg'"]),
    ([{"name": "bert_tiny"}, {"name": "mlp"}, {"name": "vit"}], ["candidate 1", "cannot take the report's 1×32×32 images"]),
])
def test_bad_candidates_are_refused_before_anything_trains(value, needles):
    with pytest.raises(ValueError) as error:
        reports.check_values("diswot", {**defaults(), "candidates": value}, models=True)
    assert "parameter candidates" in str(error.value)
    for needle in needles:
        assert needle in str(error.value), str(error.value)


@pytest.mark.parametrize("name, value, needle", [
    ("epochs", 0, ">= 1"), ("lr", -1.0, "> 0"), ("seeds", [0, 0], "repeated"), ("search_batch_size", 1, ">= 2"),
    ("dataset", "cifar", "not one of 'digits', 'animals', 'shapes'"), ("results", "table.txt", "ending in .md"),
    ("teacher", "cnnn", "unknown model name"), ("n_train", -1, ">= 0"),
])
def test_other_bad_values_are_refused(name, value, needle):
    with pytest.raises(ValueError, match=name) as error:  # an OutputError names the parameter without "parameter"
        reports.check_values("diswot", {**defaults(), name: value}, models=True)
    assert needle in str(error.value)


def test_the_cli_refuses_a_bad_candidate_and_an_existing_results_file(executor, tmp_path, capsys):  # noqa: F811
    table = tmp_path / "diswot.md"
    table.write_text("kept\n")
    status = cli.main(["report", "diswot", "-o", str(tmp_path / "out"), "-p", f"results={table}"])
    assert status == 2 and "exists and is not replaced unless asked" in capsys.readouterr().err
    bad = json.dumps([{"name": CODE}, {"name": "mlp"}, {"name": "vit"}])
    status = cli.main(["report", "diswot", "-o", str(tmp_path / "out"), "-p", f"candidates={bad}"])
    err = capsys.readouterr().err
    assert status == 2 and "parameter candidates" in err and "Traceback" not in err
    assert executor == [] and table.read_text() == "kept\n" and not (tmp_path / "out").exists()
    assert not (tmp_path / "pwned").exists() and not os.path.exists("pwned")
    assert cli.main(["report", "diswot", "-o", str(tmp_path / "out"), "-p", f"results={table}", "--force"]) == 0
    assert executor[0]["overwrite_results"] is True and executor[0]["results"] == str(table)


def test_search_specs_add_the_class_count_only_where_it_differs():
    found = diswot_rank.parse_candidates(TINY_CANDIDATES)
    assert all("num_classes" not in spec["kwargs"] for spec in diswot_rank.search_specs(found, "animals"))
    assert all(spec["kwargs"]["num_classes"] == 4 for spec in diswot_rank.search_specs(found, "shapes"))


# ---- the numbers, made by hand -----------------------------------------------------------------------

CANDIDATES = [Candidate("cnn", {"widths": [8]}), Candidate("cnn", {"widths": [16]}), Candidate("mlp"), Candidate("vit"),
              Candidate("mixer"), Candidate("resnet")]


def _comparison(vanilla: list[float], distilled: list[float]) -> Comparison:
    rows = [{"method": method, "seed": seed, "accuracy": value, "matched_cka": math.nan, "seconds": 2.0}
            for method, values in (("student", vanilla), ("kd", distilled)) for seed, value in enumerate(values)]
    return Comparison(pd.DataFrame(rows), teacher_accuracy=0.9)


def _hand_made(distilled_means: list[float], vanilla_means: list[float]):
    """Six candidates with two seeds each (± 0.01 around the given means) and a search result by hand (its
    candidates in the reverse order, as a search may score them)."""
    candidates = CANDIDATES
    comparisons = [_comparison([v - 0.01, v + 0.01], [d - 0.01, d + 0.01])
                   for v, d in zip(vanilla_means, distilled_means)]
    frame = diswot_rank.accuracy_frame(candidates, comparisons, 1000, 10)
    rng = np.random.default_rng(3)
    relation = rng.uniform(0.1, 1.0, len(CANDIDATES))
    semantic = rng.uniform(0.1, 1.0, len(CANDIDATES))
    released = [0.3, math.nan, 0.5, math.nan, 0.2, 0.9]
    result = SearchResult(candidates[::-1], list(range(100, 700, 100)), list(range(1000, 7000, 1000)),
                          {"score": list(-(relation + semantic))[::-1], "relation": list(relation)[::-1],
                           "semantic_gradcam": list(semantic)[::-1], "semantic_released": released[::-1],
                           "nwot": list(rng.normal(size=6)), "snip": list(rng.normal(size=6)),
                           "grad_norm": list(rng.normal(size=6))}, [0.5] * 6)
    return candidates, frame, result


def test_accuracy_frame_is_mean_and_sample_std_over_seeds_and_flags_near_chance():
    candidates, frame, _ = _hand_made([0.9, 0.8, 0.7, 0.15, 0.6, 0.5], [0.85, 0.8, 0.75, 0.4, 0.5, 0.55])
    assert frame.index.tolist() == [c.label for c in candidates]
    np.testing.assert_allclose(frame["distilled_mean"], [90, 80, 70, 15, 60, 50])
    np.testing.assert_allclose(frame["distilled_std"], np.std([-1, 1], ddof=1))
    np.testing.assert_allclose(frame["kd_gain"], [5, 0, -5, -25, 10, -5])
    assert frame["train_seconds"].tolist() == [8.0] * 6  # 2 methods × 2 seeds × 2 s
    assert frame["near_chance"].tolist() == [False, False, False, True, False, False]  # 15 % < 32.5 %
    assert frame["vanilla_near_chance"].tolist() == [False] * 6


def test_rank_agreement_equals_scipy_on_the_candidates_that_trained_with_distances_negated():
    distilled, vanilla = [0.9, 0.8, 0.7, 0.15, 0.6, 0.5], [0.85, 0.8, 0.75, 0.4, 0.5, 0.55]
    candidates, frame, result = _hand_made(distilled, vanilla)
    table = diswot_rank.agreement(result, frame, n_resamples=200)
    kept = [i for i in range(6) if i != 3]  # the vit (15 % distilled) is near chance: left out
    target = [100 * distilled[i] for i in kept]
    by_label = {c.label: i for i, c in enumerate(result.candidates)}
    order = [by_label[candidates[i].label] for i in kept]
    for name, term, sign in [("DisWOT score", "score", 1), ("−relation", "relation", -1),
                             ("−semantic_gradcam", "semantic_gradcam", -1), ("nwot", "nwot", 1)]:
        values = [sign * result.scores[term][j] for j in order]
        assert table.loc[name, "kendall_tau"] == pytest.approx(stats.kendalltau(values, target).statistic)
        assert table.loc[name, "spearman_rho"] == pytest.approx(stats.spearmanr(values, target).statistic)
        assert table.loc[name, "n"] == 5
        assert table.loc[name, "kendall_tau_low"] <= table.loc[name, "kendall_tau"] <= table.loc[name, "kendall_tau_high"]
    released = [-result.scores["semantic_released"][j] for j in order]
    finite = [i for i, value in enumerate(released) if not math.isnan(value)]
    assert table.loc["−semantic_released", "n"] == len(finite) == 4  # 2 NaN, 1 left out
    assert table.loc["−semantic_released", "kendall_tau"] == pytest.approx(
        stats.kendalltau([released[i] for i in finite], [target[i] for i in finite]).statistic)
    assert table.loc["params", "kendall_tau"] == pytest.approx(
        stats.kendalltau([result.params[j] for j in order], target).statistic)
    assert table.loc["vanilla accuracy", "kendall_tau"] == pytest.approx(
        stats.kendalltau([100 * vanilla[i] for i in kept], target).statistic)


def test_findings_say_whether_vanilla_ranks_perfectly_and_no_evidence_when_the_interval_crosses_zero():
    candidates, frame, result = _hand_made([0.9, 0.8, 0.7, 0.15, 0.6, 0.5], [0.85, 0.8, 0.75, 0.4, 0.5, 0.55])
    table = diswot_rank.agreement(result, frame, n_resamples=200)
    lines = diswot_rank.findings(table, frame, 2.0)
    assert lines[0].startswith("1 of 6 candidates did not train") and "`vit()`" in lines[0] and "other 5" in lines[0]
    assert any("does not rank the distilled accuracy perfectly" in line for line in lines)  # τ < 1 here
    assert lines[-1] == ("The search scored 6 candidates in 2.0 s; training them (vanilla and distilled, every seed) "
                         "took 48 s, 24× as long.")
    perfect = table.copy()
    perfect.loc["vanilla accuracy", ["kendall_tau", "kendall_tau_low", "kendall_tau_high"]] = 1.0
    perfect.loc["DisWOT score", ["kendall_tau", "kendall_tau_low", "kendall_tau_high"]] = [0.2, -0.4, 0.7]
    lines = diswot_rank.findings(perfect, frame, 2.0)
    assert any("ranks the distilled accuracy perfectly here (τ = +1.00)" in line for line in lines)
    assert any("τ = +0.20 (95 % CI -0.40 to +0.70, 5 candidates): no evidence" in line for line in lines)
    assert any(line.startswith("KD beat the student alone (mean over seeds) for 2 of 5 candidates") for line in lines)
    withheld = diswot_rank.findings(table, frame, 2.0, withheld=True)
    assert any("Conclusions withheld" in line for line in withheld)
    assert not any("DisWOT score ranks" in line or "vanilla accuracy" in line for line in withheld)


def test_save_results_is_atomic_and_refuses_to_replace(tmp_path, monkeypatch):
    _, frame, result = _hand_made([0.9, 0.8, 0.7, 0.15, 0.6, 0.5], [0.85, 0.8, 0.75, 0.4, 0.5, 0.55])
    table = diswot_rank.agreement(result, frame, n_resamples=100)
    path = diswot_rank.save_results(tmp_path / "d.md", result, frame, table, search_seconds=1.0,
                                    command="kd-workbench report diswot -p epochs=3")
    text = path.read_text()
    assert "Made by `kd-workbench report diswot -p epochs=3`" in text
    assert "`vit()` (*near chance: left out*)" in text and "| −semantic_released | 4 |" in text
    with pytest.raises(FileExistsError):
        diswot_rank.save_results(path, result, frame, table, search_seconds=1.0)
    with pytest.raises(ValueError, match="ending in .md"):
        diswot_rank.save_results(tmp_path / "d.txt", result, frame, table, search_seconds=1.0)
    import workbench.files

    def broken(handle_path, *args, **kwargs):  # the rename fails: the old file must stay whole
        raise OSError("disk full")

    monkeypatch.setattr(workbench.files.os, "replace", broken)
    with pytest.raises(OSError, match="disk full"):
        diswot_rank.save_results(path, result, frame, table, search_seconds=9.0, overwrite=True)
    assert path.read_text() == text and [p.name for p in tmp_path.iterdir()] == ["d.md"]


# ---- end to end ------------------------------------------------------------------------------------------

def _table(text: str, header: str) -> pd.DataFrame:
    """The Markdown table whose header row starts with ``| header``, as text cells."""
    lines = text.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(f"| {header}"))
    rows = []
    for line in lines[start:]:
        if not line.startswith("|"):
            break
        rows.append([cell.strip() for cell in line.strip().strip("|").split("|")])
    return pd.DataFrame(rows[2:], columns=rows[0])


def _mean(cell: str) -> float:
    """The number of a table cell (the mean of ``mean ± std``); NaN for ``—`` (undefined)."""
    return math.nan if cell == "—" else float(cell.split(" ± ")[0])


@pytest.mark.slow
def test_diswot_report_runs_end_to_end_and_its_numbers_recompute(tmp_path):
    table = tmp_path / "diswot.md"
    run = run_report_cli("diswot", [*TINY, "-p", f"results={table}"], tmp_path, timeout=240)
    assert run.box.startswith("**Sanity checks")
    assert "application/vnd.plotly.v1+json" in run.mimes
    written = table.read_text()
    assert "kd-workbench report diswot" in written and "-p dataset=digits" in written
    assert not list(tmp_path.glob("*.tmp*")) and [p.name for p in tmp_path.glob("diswot*")] == ["diswot.md"]

    candidates = _table(written, "candidate")
    assert len(candidates) == 4
    kept = candidates[~candidates["candidate"].str.contains("left out")]
    assert len(kept) >= 3, written  # the tiny run must train at least 3 candidates above chance
    assert int(_table(written, "predictor").set_index("predictor (higher predicts better)").loc["DisWOT score",
                                                                                           "candidates"]) >= 3
    target = kept["distilled acc % (mean ± std)"].map(_mean).to_numpy()
    agreement = _table(written, "predictor").set_index("predictor (higher predicts better)")
    for shown, column, sign in [("DisWOT score", "DisWOT score", 1), ("−relation", "relation", -1),
                                ("params", "parameters", 1), ("vanilla accuracy", "vanilla acc % (mean ± std)", 1)]:
        values = kept[column].map(lambda cell: _mean(cell.replace(",", "").split(" (")[0]))
        values = sign * values.to_numpy(dtype=float)
        finite = np.isfinite(values)
        tau = stats.kendalltau(values[finite], target[finite]).statistic
        cell = agreement.loc[shown, "Kendall τ [95 % CI]"]
        assert int(agreement.loc[shown, "candidates"]) == int(finite.sum())
        if math.isnan(tau):
            assert cell == "n/a"
        else:
            assert float(cell.split(" [")[0]) == pytest.approx(tau, abs=0.006), (shown, cell, tau)
