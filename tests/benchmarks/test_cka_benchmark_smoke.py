"""Smoke run of ``benchmarks/cka_matrix.py`` at a tiny size: its float64 reference, its value matching,
its FLOP count and its table — never its timings (those live in the benchmark itself)."""
from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch

from benchmark_scripts import load_benchmark
from workbench.similarity import CKAAccumulator, linear_cka

TINY = dict(n_samples=48, big_n_samples=96, batch_size=24, repeats=1, reference_subset=24, device="cpu", threads=1)


@pytest.fixture(scope="module")
def bench():
    return load_benchmark("cka_matrix")


@pytest.fixture
def in_process(bench):
    """The benchmark's worker run in this process, giving back the thread count and warning filters."""
    threads = torch.get_num_threads()

    def run(job):
        with warnings.catch_warnings():
            return bench.worker(job)

    yield run
    torch.set_num_threads(threads)


def test_reference_on_one_batch_is_the_unbiased_cka(bench):
    # one batch: the minibatch estimator is the plain unbiased CKA, which linear_cka gets by U-centring
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(40, 6, 3, generator=generator, dtype=torch.float64) + 5  # a large common offset
    y = torch.randn(40, 4, generator=generator, dtype=torch.float64) + x[:, :4, 0]
    reference = bench.ReferenceCKA()
    reference.update([x, y], [y])
    np.testing.assert_allclose(reference.values(), [[linear_cka(x, y, debiased=True)], [1.0]], atol=1e-12)


def test_reference_sums_batches_like_the_accumulator(bench):
    # the trace form here and the U-centring in workbench are two independent derivations of one estimator
    generator = torch.Generator().manual_seed(1)
    reference, accumulator = bench.ReferenceCKA(), CKAAccumulator(2, 1)
    for _ in range(3):
        x = torch.randn(30, 8, generator=generator, dtype=torch.float64)
        teacher, student = [x, x.square()], [x[:, :3] + torch.randn(30, 3, generator=generator, dtype=torch.float64)]
        reference.update(teacher, student)
        accumulator.update(teacher, student)
    np.testing.assert_allclose(reference.values(), accumulator.values(), atol=1e-12)


def test_compare_counts_the_pathologies(bench):
    reference = np.full((2, 3), 0.5)
    values = np.array([[0.5, np.nan, 0.0], [1.0, 1.5, 0.503]])
    assert bench.compare_to_reference(values, reference) == {
        "max_abs_diff": 1.0, "n_off": 4, "n_nan": 1, "n_zero": 1, "n_one": 1, "n_out_of_range": 1, "n_entries": 6,
    }


def test_flop_budget_matches_a_hand_count(bench):
    def conv_macs(width_mult):
        widths = [int(round(w * width_mult)) for w in (32, 32, 64, 64, 128, 128)]
        sides, channels = (32, 32, 16, 16, 8, 8), [3, *widths]
        convs = sum(side * side * cin * cout * 9 for side, cin, cout in zip(sides, channels, widths))
        dims = sum(side * side * width for side, width in zip(sides, widths)) + widths[-1] + 10
        return convs + widths[-1] * 10, dims

    (teacher_macs, teacher_dims), (student_macs, student_dims) = conv_macs(1.0), conv_macs(0.5)
    budget = bench.flop_budget(batch_size=8, n_samples=20)  # batches of 8, 8, 4
    assert budget["forward_macs_per_sample"] == {"teacher": teacher_macs, "student": student_macs}
    assert budget["feature_dims"] == {"teacher": teacher_dims, "student": student_dims}
    gram = (64 + 64 + 16) * (teacher_dims + student_dims)
    assert budget["gram_macs"] == gram
    assert budget["floor_full"] == pytest.approx(1 + gram / (20 * (teacher_macs + student_macs)))
    assert budget["floor_symmetric"] == pytest.approx(1 + gram / 2 / (20 * (teacher_macs + student_macs)))


def test_cka_pytorch_gets_the_same_modules(bench):
    teacher, _ = bench.build_models("cpu")
    names = [bench.last_child_name(teacher, name) for name in bench.LAYERS]
    assert names == [f"blocks.{index}.2" for index in range(6)] + ["pool", "head"]
    inputs = torch.randn(2, 3, 32, 32)
    outputs = {}
    hooks = [teacher.get_submodule(name).register_forward_hook(
        lambda module, args, output, name=name: outputs.__setitem__(name, output)) for name in {*bench.LAYERS, *names}]
    with torch.no_grad():
        teacher(inputs)
    for hook in hooks:
        hook.remove()
    for ours, theirs in zip(bench.LAYERS, names):
        assert torch.equal(outputs[ours], outputs[theirs])


def test_smoke_run_matches_the_reference_and_renders(bench, in_process):
    peers = [name for name in ("torch-cka", "ckatorch") if name in bench.installed_peers()]
    results = bench.measure(dict(TINY), peers, log=lambda text: None, runner=in_process)
    ours = results["time"]["ours"]
    assert len(ours["seconds"]) == len(ours["forward_seconds"]) == len(ours["gram_seconds"]) == 1
    assert len(ours["hooked_seconds"]) == 1
    match = bench.compare_to_reference(ours["values"], results["reference"]["reference"])
    assert match["max_abs_diff"] < 1e-6 and match["n_off"] == 0
    assert len(ours["bf16_seconds"]) == 1  # the opt-in bfloat16 row: within its stated error, not float32's
    low = bench.compare_to_reference(ours["bf16_values"], results["reference"]["reference"])
    assert 1e-7 < low["max_abs_diff"] < 1e-2 and low["n_off"] == 0
    # structure only: at this tiny size, in a process that already holds freed memory, growth can be 0
    assert isinstance(results["memory"]["ours@96"]["rss_growth_bytes"], int)
    assert results["memory"]["ours@96"]["rss_growth_bytes"] >= 0
    text = bench.render_markdown(results)
    assert "**b/a = " in text and "| workbench `cka_matrix` |" in text and "| ours | 96 |" in text
    assert '| workbench `cka_matrix(..., precision="bf16")` |' in text and "| b16 / a′ (opt-in bfloat16 Grams) |" in text
    if "ckatorch" in peers:  # it cannot run W1: a result in the table, not a crash
        assert "error" in results["time"]["ckatorch"] and "ckatorch 1.0.3" in text


def test_worker_runs_in_a_fresh_process(bench):
    out = bench.run_worker({**TINY, "kind": "memory", "subject": "forward", "n_samples": 24})
    assert "error" not in out and out["rss_growth_bytes"] >= 0 and out["seconds"] > 0
