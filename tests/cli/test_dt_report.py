"""The dt report: its parameters and their checks, the metrics against numbers computed here, the paired
test against scipy, the findings' wording, and a tiny end-to-end run through the CLI under papermill (slow)."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy import stats
from scipy.spatial.distance import cdist
from torch import nn

from report_cli import run_report_cli

from workbench import reports
from workbench.probes.dt import DTTrajectory
from workbench.probes.sample_quality import COLUMNS, SampleQuality, sample_quality
from workbench.reports import dt_diversity

TINY = ["-p", "widths=[8, 16]", "-p", "epochs=2", "-p", "distill_iterations=2", "-p", "base_steps=8",
        "-p", "seeds_per_class=2", "-p", "threads=1"]


def defaults() -> dict:
    return {name: spec["default"] for name, spec in reports.report_parameters("dt").items()}


@pytest.mark.parametrize("name, value, needle", [
    ("base_steps", 12, "power of two"), ("student_steps", 32, "fewer than base_steps"),
    ("switch_after", 5, "student_steps (4)"), ("guidance", 0.5, "scale > 1"), ("widths", [12], "multiples of 8"),
    ("seeds_per_class", 1, ">= 2"), ("model_source", "__import__('os').system('x')", "not one of"),
])
def test_bad_parameters_are_refused_before_anything_trains(name, value, needle):
    with pytest.raises(ValueError) as error:
        reports.check_values("dt", {**defaults(), name: value})
    assert f"parameter {name}" in str(error.value) and needle in str(error.value), str(error.value)


def test_the_defaults_pass_their_own_checks():
    reports.check_values("dt", defaults())


class Linear(nn.Module):
    """A fixed 'classifier': its embedding ``pool`` is the flattened image, its logits the first 3 pixels."""

    def __init__(self):
        super().__init__()
        self.pool = nn.Flatten()

    def forward(self, x):
        return self.pool(x)[:, :3]


def _run(final, labels):
    x = final[None]
    return DTTrajectory(np.array([0.0]), x, x, final, ["s"], ["m"], labels=labels, network_evaluations=4, seconds=2.0)


def test_sample_quality_against_numbers_computed_here():
    rng = np.random.default_rng(0)
    final, real = rng.normal(size=(8, 1, 2, 3)), rng.normal(size=(40, 1, 2, 3))
    labels = [0, 0, 0, 0, 1, 1, 1, 2]
    labels[-1] = 1  # classes 0 and 1, four samples each
    table = sample_quality({"v": _run(final, labels)}, Linear(), real, layer="pool")
    row = table.rows[0]
    flat = final.reshape(8, -1)
    embedded = flat.astype(np.float32).astype(np.float64)  # the classifier runs in float32

    def mean_pairs(distances):
        return distances[np.triu_indices(len(distances), 1)].mean()

    pixel = np.mean([mean_pairs(cdist(flat[:4], flat[:4])), mean_pairs(cdist(flat[4:], flat[4:]))])
    cosine = [mean_pairs(cdist(embedded[:4], embedded[:4], "cosine")),
              mean_pairs(cdist(embedded[4:], embedded[4:], "cosine"))]
    assert row["pixel_diversity"] == pytest.approx(pixel, abs=1e-12)
    assert table.per_class["v"] == pytest.approx(cosine, abs=1e-12)
    assert row["feature_diversity"] == pytest.approx(np.mean(cosine), abs=1e-12)
    assert row["accuracy"] == np.mean(embedded[:, :3].argmax(1) == np.array(labels))
    assert row["network_evaluations"] == 4 and row["seconds_per_sample"] == 0.25
    assert row["frechet"] > 0


def _quality(per_class, evaluations=(64, 4, 5, 4)):
    rows = [dict(zip(COLUMNS, [name, 20, 1.0, float(np.mean(values)), 1.0 + i, 1.0, n, 0.1]))
            for i, ((name, values), n) in enumerate(zip(per_class.items(), evaluations))]
    return SampleQuality(rows, per_class=per_class)


def test_the_paired_test_is_scipys_one_sided_wilcoxon():
    rng = np.random.default_rng(1)
    a, b = rng.uniform(0.1, 0.2, 10), rng.uniform(0.15, 0.25, 10)
    test = dt_diversity.paired_test(_quality({"x": list(a), "y": list(b), "z": list(b), "w": list(b)}), "x", "y")
    assert test["p_value"] == pytest.approx(stats.wilcoxon(a, b, alternative="less").pvalue)
    assert test["classes_lower"] == int(np.sum(a < b)) and test["relative_change"] == pytest.approx(a.mean() / b.mean() - 1)


def test_the_findings_say_what_the_numbers_support():
    base, low = [0.2 + 0.01 * i for i in range(10)], [0.1 + 0.01 * i for i in range(10)]
    shown = dt_diversity.findings(_quality({"base": base, "distilled": low, "hybrid": base, "unguided student": base}))
    assert "Distillation lowered the diversity" in shown and "The hybrid recovered diversity" in shown
    assert "more than the whole gap back" not in shown and "100 % of the gap back" in shown
    same = dt_diversity.findings(_quality({"base": base, "distilled": base, "hybrid": base, "unguided student": base}))
    assert "No diversity drop shown" in same and "not shown to be more diverse" in same
    assert "not told apart" in same


def test_a_variant_read_near_chance_withholds_the_findings():
    per_class = {name: [0.1] * 10 for name in dt_diversity.VARIANTS}
    quality = _quality(per_class)
    quality.rows[1]["accuracy"] = 0.1
    box = dt_diversity.dt_sanity(quality, {})
    assert [flag.subject for flag in box.blocking] == ["distilled samples"]
    assert "Findings withheld" in dt_diversity.results_markdown(quality, box)


@pytest.mark.slow
def test_the_report_runs_end_to_end_and_writes_its_table(tmp_path):
    table = tmp_path / "dt.md"
    run = run_report_cli("dt", [*TINY, "-p", f"results={table}"], tmp_path, timeout=900)
    assert "image/png" in run.mimes and "application/vnd.plotly.v1+json" in run.mimes
    text = table.read_text()
    for variant in dt_diversity.VARIANTS:
        assert f"| {variant} | 20 |" in text
    assert "kd-workbench report dt" in text
    torch.manual_seed(0)  # nothing global leaked: a plain op still works after the run
