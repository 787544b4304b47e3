"""Smoke run of ``benchmarks/ofa_step.py`` at a tiny size: both steps train (float32, and the autocast path a
GPU takes, here on the CPU), the branches' shares match counts made here another way, the results have their
structure and the table renders — never the timings (those live in the benchmark itself)."""
from __future__ import annotations

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from benchmark_scripts import load_benchmark


@pytest.fixture(scope="module")
def bench():
    return load_benchmark("ofa_step")



def test_tiny_run_has_the_structure_and_renders(bench, tmp_path, one_thread):
    results = bench.main(["--tiny", "--device", "cpu", "--threads", "1", "--pairs", "cnn-cnn",
                          "--markdown", str(tmp_path / "t.md"), "--json", str(tmp_path / "t.json")])
    (measured,) = results["pairs"].values()
    assert set(measured["seconds"]) == {"kd", "ofa"} and results["precision"] == "float32"
    assert all(len(values) == 2 and min(values) > 0 for values in measured["seconds"].values())
    medians = measured["median_seconds"]
    assert measured["ratio"] == pytest.approx(medians["ofa"] / medians["kd"]) == results["ratio"]
    assert measured["stages"] == ["blocks.0", "blocks.1", "blocks.2"] and measured["peak_memory_bytes"] is None
    shares = measured["shares"]
    assert measured["flop_ratio"] > 1 and measured["flop_ratio"] == pytest.approx(
        (3 * (shares["student_flops"] + shares["branch_flops"]) + shares["teacher_flops"])
        / (3 * shares["student_flops"] + shares["teacher_flops"]))
    assert shares["parameter_share"] == pytest.approx(
        shares["branch_parameters"] / (shares["branch_parameters"] + shares["student_parameters"]))
    text = (tmp_path / "t.md").read_text()
    assert "python benchmarks/ofa_step.py --tiny" in text and text.count("| cnn-cnn: ") == 2
    assert f"an OFA-KD step takes {measured['ratio']:.2f}× a KD step" in text
    assert f"| {100 * shares['parameter_share']:.1f} % |" in text and (tmp_path / "t.json").is_file()


@pytest.mark.parametrize("pair", ["cnn-vit", "cnn-cnn"])
def test_shares_match_an_independent_count(bench, pair, one_thread):
    config = dict(bench.TINY, device="cpu", amp="off")
    subjects = bench.build(config, pair)
    distiller, shares = subjects["distillers"]["ofa"], subjects["shares"]
    student = distiller.student

    branches = {name: term for name, term in distiller.terms.items() if name.startswith("ofa@")}
    assert list(branches) == [f"ofa@{stage.replace('.', '_')}" for stage in subjects["stages"]]
    assert shares["student_parameters"] == sum(p.numel() for p in student.parameters())
    assert shares["branch_parameters"] == sum(p.numel() for p in distiller.terms.parameters()) > 0
    # FLOPs: counted here on the whole batch by FlopCounterMode directly, per sample (every op is per sample)
    inputs = torch.randn(3, 3, config["size"], config["size"])
    features = {}
    hooks = [student.get_submodule(stage).register_forward_hook(
        lambda module, args, output, stage=stage: features.__setitem__(stage, output)) for stage in subjects["stages"]]
    student.eval()
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        student(inputs)
    for hook in hooks:
        hook.remove()
    assert shares["student_flops"] == counter.get_total_flops() / 3
    branch_flops = 0
    for name, term in branches.items():
        term.eval()
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            term.branch(features[distiller.layers[name][1]])
        branch_flops += counter.get_total_flops() / 3
        assert shares["per_branch"][name][2] == counter.get_total_flops() / 3
    assert shares["branch_flops"] == branch_flops > 0
    assert shares["flop_share"] == pytest.approx(branch_flops / (branch_flops + shares["student_flops"]))


@pytest.mark.parametrize("amp", ["off", "bf16", "fp16"])  # bf16 / fp16 (GradScaler): the CUDA path, on the CPU
def test_steps_train_the_student_and_the_branches_never_the_teacher(bench, amp, one_thread):
    config = dict(bench.TINY, device="cpu", amp=amp)
    subjects = bench.build(config, "cnn-cnn")
    distiller = subjects["distillers"]["ofa"]
    teacher = [value.clone() for value in distiller.teacher.state_dict().values()]
    before = {name: value.clone() for name, value in distiller.state_dict().items()}
    subjects["steps"]["ofa"]()
    after = distiller.state_dict()
    changed = {name for name in before if not torch.equal(before[name], after[name])}
    assert all(torch.equal(old, new) for old, new in zip(teacher, distiller.teacher.state_dict().values()))
    assert any(name.startswith("student.") for name in changed)
    assert any(name.startswith("terms.ofa@blocks_0.branch") for name in changed)
    assert all(torch.isfinite(value).all() for value in after.values() if value.is_floating_point())
