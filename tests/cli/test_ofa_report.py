"""The ofa report: its parameters and their checks (pairs, methods on every pair, the results file), the
combined results table and the branch accuracies, and a tiny end-to-end run through the CLI under
papermill (slow)."""
from __future__ import annotations

import json
import re

import numpy as np
import pandas as pd
import pytest

from fake_runner import executor  # noqa: F401 (a fixture)
from report_cli import run_report_cli

from workbench import cli, reports
from workbench.probes import BranchAccuracy
from workbench.reports import ofa_compare
from workbench.reports.compare import Comparison
from workbench.reports.ofa_compare import Pair, PairRun
from workbench.reports.sanity import Sanity

TINY_PAIRS = [{"teacher": "vit", "teacher_kwargs": {"dim": 16, "depth": 2, "heads": 2}, "student": "cnn",
               "student_kwargs": {"widths": [4, 8]}},
              {"teacher": "cnn_small", "student": "mixer", "student_kwargs": {"dim": 8, "depth": 2}}]
# 2 pairs × 4 methods, 1 seed, 1 epoch of 4 steps on 128 digits, teachers trained 1 epoch in a private cache
TINY = ["-p", f"pairs={json.dumps(TINY_PAIRS)}", "-p", "dataset=digits", "-p", "epochs=1", "-p", "n_train=128",
        "-p", "n_probe=64", "-p", "teacher_epochs=1", "-p", "batch_size=32"]


def defaults() -> dict:
    return {name: spec["default"] for name, spec in reports.report_parameters("ofa").items()}


def test_the_default_pairs_are_the_three_heterogeneous_pairs_and_each_student_is_smaller():
    values = defaults()
    assert values["pairs"] == ofa_compare.DEFAULT_PAIRS
    assert values["methods"] == ["student", "kd", "fitnet@middle", "ofa"] and values["dataset"] == "animals"
    labels = [pair.label for pair in ofa_compare.parse_pairs(values["pairs"])]
    assert labels == ["vit → cnn", "cnn → vit", "cnn → mixer"]
    from workbench.models import count_parameters

    for pair in ofa_compare.parse_pairs(values["pairs"]):
        teacher = reports.seeded_model(pair.teacher, "animals", **pair.teacher_kwargs)
        student = reports.seeded_model(pair.student, "animals", **pair.student_kwargs)
        assert count_parameters(student) < count_parameters(teacher), pair.label


@pytest.mark.parametrize("name, value, needles", [
    ("pairs", [], ["non-empty list of pairs"]),
    ("pairs", ["cnn"], ["pair 1 is not a dict"]),
    ("pairs", [{"teacher": "cnn", "studnet": "vit"}], ["unknown key 'studnet'", "did you mean 'student'"]),
    ("pairs", [{"teacher": "cnn", "student": "vitt"}], ["pair 1 (cnn → vitt): student", "unknown model name 'vitt'"]),
    ("pairs", [{"teacher": "cnn", "student": "vit", "student_kwargs": {"dimm": 8}}],
     ["pair 1 (cnn → vit): student", "cannot be built", "dimm"]),
    ("pairs", [{"teacher": "cnn", "student": "vit"}, {"teacher": "cnn", "student": "vit"}], ["repeated"]),
    ("pairs", [{"teacher": "cnn", "student": "bert_tiny"}], ["cannot take the report's 1×32×32 images"]),
    ("methods", ["student", "ofaa"], ["unknown term 'ofaa'", "did you mean 'ofa'"]),
    ("methods", ["kd", "kd"], ["repeated"]),
    # blocks.3 exists on the ViT teacher of pair 1 but not on its 3-stage CNN student: named by its pair
    ("methods", ["student", "fitnet@blocks.3"], ["pair 1 (vit → cnn)", "student side", "blocks.3"]),
    ("epochs", 0, [">= 1"]),
    ("lr", -1.0, ["> 0"]),
    ("seeds", [0, 0], ["repeated"]),
    ("dataset", "cifar", ["not one of 'digits', 'animals', 'shapes'"]),
    ("n_probe", 2, [">= 4"]),
    ("results", "table.txt", ["must be a Markdown file ending in .md"]),
])
def test_bad_values_are_refused_before_anything_trains(name, value, needles):
    with pytest.raises(ValueError) as error:
        reports.check_values("ofa", {**defaults(), name: value}, models=True)
    for needle in needles:
        assert needle in str(error.value)


def test_the_cli_refuses_bad_values_and_an_existing_results_file(executor, tmp_path, capsys):  # noqa: F811
    table = tmp_path / "ofa.md"
    table.write_text("kept\n")
    status = cli.main(["report", "ofa", "-o", str(tmp_path / "out"), "-p", f"results={table}"])
    assert status == 2 and "exists and is not replaced unless asked" in capsys.readouterr().err
    status = cli.main(["report", "ofa", "-o", str(tmp_path / "out"), "-p", 'methods=["kd", "fitnet@blocks.7"]'])
    assert status == 2 and "parameter methods" in capsys.readouterr().err
    assert executor == [] and table.read_text() == "kept\n" and not (tmp_path / "out").exists()
    assert cli.main(["report", "ofa", "-o", str(tmp_path / "out"), "-p", f"results={table}", "--force"]) == 0
    assert executor[0]["overwrite_results"] is True and executor[0]["results"] == str(table)


def _run(label: str, accuracies: dict[str, list[float]], branches: dict[int, list[float]]) -> PairRun:
    """A PairRun made by hand: ``accuracies`` per method over seeds 0, 1, ...; ``branches``: OFA's per seed."""
    rows = [{"method": method, "seed": seed, "accuracy": value, "matched_cka": 0.5, "seconds": 1.0}
            for method, values in accuracies.items() for seed, value in enumerate(values)]
    comparison = Comparison(pd.DataFrame(rows), teacher_accuracy=0.9, settings={"epochs": 2})
    teacher, student = label.split(" → ")
    found = {("ofa", seed): BranchAccuracy(["ofa@blocks_0", "ofa@blocks_1"], ["blocks.0", "blocks.1"], values[:2],
                                           values[2], 100) for seed, values in branches.items()}
    return PairRun(Pair(teacher, student), None, comparison, found, Sanity(), "summary line.")


def test_branch_frame_is_mean_and_sample_std_over_seeds_with_the_head_last():
    run = _run("cnn → vit", {"student": [0.5, 0.6], "ofa": [0.7, 0.8]}, {0: [0.2, 0.4, 0.7], 1: [0.3, 0.6, 0.8]})
    frame = ofa_compare.branch_frame([run])
    assert frame["layer"].tolist() == ["blocks.0", "blocks.1", "head"] and frame["depth"].tolist() == ["1", "2", "head"]
    np.testing.assert_allclose(frame["accuracy_mean"], [25.0, 50.0, 75.0])
    np.testing.assert_allclose(frame["accuracy_std"], [np.std([20, 30], ddof=1), np.std([40, 60], ddof=1),
                                                       np.std([70, 80], ddof=1)])
    assert frame["seeds"].tolist() == [2, 2, 2]
    assert ofa_compare.branch_frame([]).empty


def test_results_markdown_holds_every_pair_its_table_branches_and_the_ofa_description(tmp_path):
    runs = [_run("vit → cnn", {"student": [0.5, 0.7], "kd": [0.6, 0.8], "ofa": [0.7, 0.6]},
                 {0: [0.2, 0.4, 0.7], 1: [0.3, 0.5, 0.6]}),
            _run("cnn → mixer", {"student": [0.4], "ofa": [0.5]}, {0: [0.1, 0.2, 0.5]})]
    path = ofa_compare.save_results(tmp_path / "ofa.md", runs, "kd-workbench report ofa -p epochs=2", {"epochs": 2})
    text = path.read_text()
    assert text.startswith("# OFA-KD between architectures") and "Made by `kd-workbench report ofa -p epochs=2`" in text
    assert text.index("## vit → cnn") < text.index("## cnn → mixer")
    # vs student by hand: kd 70 - 60 = +10 points, on 2 of 2 paired seeds; ofa 65 - 60, wins seed 0 only
    assert "| kd | 70.00 ± 14.14 | +10.00 | 2/2 |" in text and "| ofa | 65.00 ± 7.07 | +5.00 | 1/2 |" in text
    assert "| ofa | 25.00 ± 7.07 | 45.00 ± 7.07 | 65.00 ± 7.07 |" in text  # branches: mean ± std over 2 seeds
    assert "| ofa | 10.00 ± n/a | 20.00 ± n/a | 50.00 ± n/a |" in text  # one seed: no spread
    assert "label smoothing 0.1" in text and "(p_t,c + y_c)^γ" in text and "T = 1" in text
    assert "- `ofa`: CE + OFA-KD (γ=1, T=1)" in text
    with pytest.raises(FileExistsError):
        ofa_compare.save_results(path, runs)
    with pytest.raises(ValueError, match="ending in .md"):
        ofa_compare.save_results(tmp_path / "ofa.txt", runs)
    assert ofa_compare.save_results(path, runs[:1], overwrite=True).read_text().count("## ") == 1


def test_a_method_with_fewer_branches_gets_a_dash_where_it_has_none(tmp_path):
    run = _run("cnn → vit", {"student": [0.5], "ofa": [0.7], "ofa@last": [0.6]}, {0: [0.2, 0.4, 0.7]})
    run.branches[("ofa@last", 0)] = BranchAccuracy(["ofa@blocks_1"], ["blocks.1"], [0.45], 0.6, 100)
    text = ofa_compare.results_markdown([run])
    assert "| ofa | 20.00 ± n/a | 40.00 ± n/a | 70.00 ± n/a |" in text
    assert "| ofa@last | — | 45.00 ± n/a | 60.00 ± n/a |" in text


def _row(text: str, label: str) -> list[str]:
    """The cells of the first Markdown table row whose first cell starts with ``label``."""
    line = next(line for line in text.splitlines() if line.startswith(f"| {label}"))
    return [cell.strip() for cell in line.strip("|").split("|")]


@pytest.mark.slow
def test_ofa_report_runs_end_to_end(tmp_path):
    table = tmp_path / "ofa.md"
    run = run_report_cli("ofa", [*TINY, "-p", f"results={table}"], tmp_path, timeout=300)
    run_dir, box, mimes = run.run_dir, run.box, run.mimes
    assert box.startswith("**vit → cnn** — **Sanity checks: ") and "**cnn_small → mixer** — " in box
    assert "- **method `ofa`**: trained a single epoch" in box
    assert "image/png" in mimes
    assert "<td>ofa (<em>not converged</em>)" in (run_dir / "report.html").read_text(encoding="utf-8")
    written = table.read_text()
    assert "kd-workbench report ofa" in written and "-p dataset=digits" in written
    sections = written.split("## ")[1:]
    assert [section.splitlines()[0] for section in sections] == ["vit → cnn", "cnn_small → mixer"]
    for section, stages in zip(sections, (["blocks.0", "blocks.1"], ["blocks.0", "blocks.1"])):
        header = _row(section, "branch accuracy")
        assert header[1:] == [f"`{stage}`" for stage in stages] + ["student head"]
        # two code paths, one number: fit's last held-out accuracy of the OFA run (the results table) and
        # branch_accuracy's score of the same student's head on the same held-out split
        assert _row(section, "ofa (")[1] == _row(section, "ofa |")[-1]
        assert re.search(r"\| fitnet@middle \(\*not converged\*\)", section)
