"""Smoke run of ``benchmarks/distill_step.py`` at a tiny size: the three steps train, the results have
their structure and the table renders — never the timings (those live in the benchmark itself)."""
from __future__ import annotations


import pytest
import torch

from benchmark_scripts import load_benchmark


@pytest.fixture(scope="module")
def bench():
    return load_benchmark("distill_step")


def test_tiny_run_has_the_structure_and_renders(bench, tmp_path):
    threads = torch.get_num_threads()
    try:
        results = bench.main(["--tiny", "--threads", "1", "--markdown", str(tmp_path / "t.md"),
                              "--json", str(tmp_path / "t.json")])
    finally:
        torch.set_num_threads(threads)
    assert list(results["pairs"]) == ["r50-r18", "r34-r18", "vgg6", "cnn3"]
    for measured in results["pairs"].values():
        assert set(measured["seconds"]) == {"baseline", "kd_only", "distiller", "by_hand"}
        assert all(len(values) == 3 and min(values) > 0 for values in measured["seconds"].values())
        medians = measured["median_seconds"]
        assert measured["overhead"] == pytest.approx(medians["distiller"] / medians["baseline"] - 1)
        assert measured["distiller_vs_by_hand"] == pytest.approx(medians["distiller"] / medians["by_hand"] - 1)
    assert results["overhead"] == results["pairs"]["r50-r18"]["overhead"]  # the first pair is the headline
    text = (tmp_path / "t.md").read_text()
    assert "overhead of the Distiller step over (a)" in text and "python benchmarks/distill_step.py --tiny" in text
    assert all(text.count(f"| {pair}: ") == 4 for pair in results["pairs"]) and (tmp_path / "t.json").is_file()


@pytest.mark.parametrize("pair", ["r50-r18", "vgg6", "cnn3"])
def test_the_steps_train_their_students_and_the_hooks_go(bench, pair, monkeypatch):
    hooks, kept, build = [], [], bench.build

    def recording_build(*args):
        subjects = build(*args)
        hooks.extend(subjects["hooks"])
        kept.append(dict(subjects))  # the step closures keep the hooked models alive for the check
        return subjects

    monkeypatch.setattr(bench, "build", recording_build)
    results = bench.measure_pair(dict(bench.TINY, steps=1, warmup=0, device="cpu"), pair)
    assert all(len(values) == 1 for values in results["seconds"].values())  # one full step each, no error
    assert len(hooks) == 2 and all(hook.hooks_dict_ref() is not None for hook in hooks)
    assert all(hook.id not in hook.hooks_dict_ref() for hook in hooks)


def test_every_hint_sits_between_the_middle_stages(bench):
    # the distill report's rule, so that the benchmark times the FitNet step the report trains
    from workbench import models
    from workbench.capture import stage_names
    from workbench.reports.compare import method_distiller

    for pair, spec in bench.PAIRS.items():
        teacher, student = (models.create(name, **kwargs) for name, kwargs in (spec["teacher"], spec["student"]))
        assert method_distiller("fitnet", teacher.eval(), student).layers["fitnet"] == (spec["hint"], spec["hint"]), pair
        assert spec["hint"] in stage_names(teacher) and spec["hint"] in stage_names(student)
