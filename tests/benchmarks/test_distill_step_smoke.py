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
    assert set(results["seconds"]) == {"baseline", "distiller", "by_hand"}
    assert all(len(values) == 3 and min(values) > 0 for values in results["seconds"].values())
    assert results["overhead"] == pytest.approx(
        results["median_seconds"]["distiller"] / results["median_seconds"]["baseline"] - 1)
    text = (tmp_path / "t.md").read_text()
    assert "**Overhead of the Distiller step over (a):" in text and "python benchmarks/distill_step.py --tiny" in text
    assert text.count("| (") == 3 and (tmp_path / "t.json").is_file()


def test_the_steps_train_their_students(bench):
    subjects = bench.build(dict(bench.TINY, device="cpu", threads=1))
    for name in ("baseline", "distiller", "by_hand"):
        subjects[name]()  # one full step each, no error
