"""Smoke run of ``benchmarks/cka_pairs.py`` at its ``--smoke`` size on the ViT pair, in this process: the values
it reports against ``cka_matrix`` called here and against its float64 references, the peers' values put back
in our layer order, the memory rows and the tables — never its timings (those live in the benchmark)."""
from __future__ import annotations

import numpy as np
import pytest
import timm
import torch

from benchmark_scripts import load_benchmark
from workbench.probes.cka_stream import cka_matrix

PAIR = "vits-vitt"


@pytest.fixture(scope="module")
def bench():
    return load_benchmark("cka_pairs")


@pytest.fixture(scope="module")
def config(bench):
    args = bench.parse_args(["--smoke", "--pairs", PAIR, "--threads", "1"])
    return bench.make_config(args)


@pytest.fixture(scope="module")
def results(bench, config):
    """One smoke-size measurement with the installed peers, every job run in this process."""
    threads = torch.get_num_threads()
    try:
        yield bench.measure(config, bench.installed_peers(), log=lambda text: None, runner=bench.worker)
    finally:
        torch.set_num_threads(threads)


def test_smoke_config_is_tiny(config):
    assert config["rounds"] == 1 and config["n_samples"] == 16 and config["image_size"] == 32
    assert config["pairs"] == [PAIR] and config["memory_selections"] == ["4", "12"]


def test_reported_values_are_cka_matrix_computed_here(bench, config, results):
    timing = results["pairs"][PAIR]["time"]
    assert "error" not in timing, timing
    torch.manual_seed(0)  # the benchmark's recipe: seed 0, teacher first, timm, no weights, ViTs at 32 px
    teacher = timm.create_model("vit_small_patch16_224", pretrained=False, num_classes=10, img_size=32).eval()
    student = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=10, img_size=32).eval()
    inputs = torch.randn(16, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    threads = torch.get_num_threads()
    torch.set_num_threads(config["threads"])
    try:
        direct, direct_bf16 = (
            cka_matrix(teacher, student, inputs, "blocks.*", "blocks.*", kernel="linear", debiased=True,
                       device="cpu", batch_size=8, progress=False, precision=precision)
            for precision in ("full", "bf16"))
    finally:
        torch.set_num_threads(threads)
    assert timing["teacher_layers"] == direct.teacher_layers == [f"blocks.{index}" for index in range(12)]
    assert timing["student_layers"] == direct.student_layers
    ours = np.asarray(timing["subjects"]["ours"]["values"])
    assert ours.shape == (12, 12)
    np.testing.assert_allclose(ours, direct.values, rtol=0, atol=1e-12)
    np.testing.assert_allclose(results["pairs"][PAIR]["reference"]["ours_float32"], direct.values, rtol=0, atol=1e-12)
    bf16 = np.asarray(timing["subjects"]["ours-bf16"]["values"])
    np.testing.assert_allclose(bf16, direct_bf16.values, rtol=0, atol=1e-12)
    assert np.abs(bf16 - direct.values).max() > 1e-7  # the opt-in row is not the float32 path again


def test_ours_is_within_1e_5_of_the_float64_reference(bench, results):
    reference = results["pairs"][PAIR]["reference"]
    assert "error" not in reference, reference
    ours = results["pairs"][PAIR]["time"]["subjects"]["ours"]["values"]
    assert bench.w1.compare_to_reference(ours, reference["ours_float64"])["max_abs_diff"] < 1e-5
    # the float64 reference itself: cka_matrix in float64 against the independent trace form on the same features
    check = bench.w1.compare_to_reference(reference["ours_float64"], reference["trace_reference_float64"])
    assert check["max_abs_diff"] < 1e-10 and check["n_off"] == 0


def test_peers_values_come_back_in_our_layer_order(bench, results):
    pytest.importorskip("torch_cka")
    pytest.importorskip("cka_pytorch")
    subjects = results["pairs"][PAIR]["time"]["subjects"]
    same_features = results["pairs"][PAIR]["reference"]["trace_reference_float32"]
    for name, key in (("torch-cka", "values"), ("cka-pytorch", "values"), ("cka-pytorch", "values_epsilon_0")):
        assert "error" not in subjects[name], subjects[name]
        assert len(subjects[name]["seconds"]) == 1
        # a row or column out of order would be off by far more than float32 sums are
        assert bench.w1.compare_to_reference(subjects[name][key], same_features)["max_abs_diff"] < 1e-4, (name, key)


def test_every_subject_is_timed_in_each_round(results):
    timing = results["pairs"][PAIR]["time"]
    assert len(timing["rounds"]) == 1
    for name, record in timing["subjects"].items():
        assert len(record["seconds"]) == len(record["minflt"]) == len(record["other_cpu_share"]) == 1, name
        assert record["minflt"][0] >= 0 and name in timing["rounds"][0]["seconds"]


def test_memory_rows_count_the_hooked_layers(results):
    rows = {(entry["key"], entry["subject"]): entry for entry in results["memory"]}
    assert set(rows) == {("0", "forward"), ("4", "hooked"), ("4", "ours"), ("12", "hooked"), ("12", "ours")}
    for (key, _), entry in rows.items():
        assert "error" not in entry, entry
        assert entry["n_layers"] == ([0, 0] if key == "0" else [int(key)] * 2)
        # the unit of the report's last memory column: one batch of 8 of the hooked blocks' float32 outputs,
        # 5 tokens (4 patches of 16×16 and the class token) × 384 (ViT-S) and × 192 (ViT-Ti) each
        assert entry["feature_bytes_per_batch"] == 4 * 8 * int(key) * 5 * (384 + 192)
        # structure only: in a process that already holds freed memory, the growth can be 0
        assert isinstance(entry["rss_growth_bytes"], int) and entry["rss_growth_bytes"] >= 0


def test_markdown_has_one_row_per_subject(bench, results):
    results = {**results, "command": "python benchmarks/cka_pairs.py --smoke"}
    text = bench.render_markdown(results)
    lines = text.splitlines()
    subjects = results["pairs"][PAIR]["time"]["subjects"]
    assert set(subjects) == {"forward", "hooked", "ours", "ours-bf16", *bench.installed_peers()}
    for name in subjects:
        label = bench.SUBJECT_LABELS[name].split(":")[0]
        assert sum(line.startswith(f"| {label}") for line in lines) == 1, name
    assert "Made by `python benchmarks/cka_pairs.py --smoke`" in text
    assert "**b/a = " in text and "**b/a′ = " in text and "Opt-in bfloat16 Grams: **b16/a = " in text
    assert sum(line.startswith("| 1 | ") for line in lines) == 1  # the one round, with its foreign CPU share
    assert sum(line.startswith(("| 4 | `blocks.0`", "| 12 | `blocks.*`")) for line in lines) == 2
