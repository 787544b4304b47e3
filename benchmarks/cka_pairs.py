"""Benchmark of ``workbench.probes.cka_stream.cka_matrix`` on real timm teacher/student pairs (issue 12).

Three pairs, built by ``timm.create_model(name, pretrained=False, num_classes=10)`` from seed 0, eval mode,
float32, seeded random 3×64×64 inputs (256 by default, batches of 64), one torch thread by default:

- **r50-r18**: ``resnet50`` → ``resnet18``, ``layer1``..``layer4`` and ``fc`` on both sides (timm's
  ``feature_info`` stages without the stem ``act1``, plus the classifier);
- **vits-vitt**: ``vit_small_patch16_224`` → ``vit_tiny_patch16_224`` built with ``img_size=64``,
  ``blocks.0``..``blocks.11`` on both sides (12 × 12);
- **cnxt-r18**: ``convnext_tiny`` (``stages.0``..``stages.3``, ``head.fc``) → ``resnet18`` as above.

Per pair, one fresh process times, interleaved round by round (a, a′, b, peers, a, a′, b, peers, …) after a
one-batch warm-up of each: **(a)** both models' bare forward passes on the same batches under ``no_grad``;
**(a′)** the same with ``workbench.capture`` hooks on the layers that (b) reads, holding each batch's
activations; **(b)** ``cka_matrix`` (debiased linear, progress off); **(b16)** the same with the opt-in
``precision="bf16"``; and the peers ``torch-cka`` and
``cka-pytorch`` through their own APIs (fresh copies of the same weights per run, made outside the timed
region), where installed. Each run records its seconds, its minor page faults and the share of the machine's
CPU that other processes used meanwhile (``/proc/stat``); ratios are paired within a round.

A second fresh process per pair computes the references: ``cka_matrix`` on float64 copies of the models
with float64 inputs (the brief's float64 reference of the same minibatch estimator), the independent
trace-form float64 reference of ``benchmarks/cka_matrix.py`` on those same float64 features (a check of the
first), and that reference on the float32 forward's own features (what every implementation is given).
Peak memory (RSS growth, one fresh process per measurement) of ``cka_matrix`` and of (a′) is measured on the
ViT pair against the number of hooked layers per model (4, 12, 24, 36) at a fixed N.

Why one thread by default: on the 2-core machine this was written on, shared with another test suite, two
OpenMP threads ran the resnet50 + resnet18 forward of one batch in 1.3–3.4 s against 0.67–0.84 s for one
thread, interleaved in one process (a thread that is descheduled stalls the other at every barrier), so
2-thread timings there measured the neighbour. ``--threads 2`` is the setting for a quiet machine.

    python benchmarks/cka_pairs.py --markdown reports/results/cka_pairs.md --json /tmp/cka_pairs.json
    python benchmarks/cka_pairs.py --pairs vits-vitt --rounds 5
    python benchmarks/cka_pairs.py --smoke            # 1 round, 16 samples at 32 px: seconds
"""
from __future__ import annotations

import argparse
import copy
import gc
import importlib
import json
import os
import shlex
import subprocess
import sys
import tempfile
import warnings
from collections.abc import Callable
from datetime import date
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import cka_matrix as w1  # the W1 benchmark: its timing, fault, load, memory and reference helpers
from machine import save_outputs, serve_worker

Layers = tuple[list[str], list[str]]  # teacher's and student's module names
PAIRS: dict[str, dict[str, Any]] = {
    "r50-r18": dict(teacher="resnet50", student="resnet18",
                    teacher_layers=["layer1", "layer2", "layer3", "layer4", "fc"],
                    student_layers=["layer1", "layer2", "layer3", "layer4", "fc"]),
    "vits-vitt": dict(teacher="vit_small_patch16_224", student="vit_tiny_patch16_224", vit=True,
                      teacher_layers=["blocks.*"], student_layers=["blocks.*"]),
    "cnxt-r18": dict(teacher="convnext_tiny", student="resnet18",
                     teacher_layers=["stages.0", "stages.1", "stages.2", "stages.3", "head.fc"],
                     student_layers=["layer1", "layer2", "layer3", "layer4", "fc"]),
}
MEMORY_PAIR = "vits-vitt"
# hooked layers per model -> the selectors given to both models of the ViT pair
MEMORY_SELECTIONS: dict[str, list[str]] = {
    "4": ["blocks.0", "blocks.4", "blocks.8", "blocks.11"],
    "12": ["blocks.*"],
    "24": ["blocks.*.attn", "blocks.*.mlp"],
    "36": ["blocks.*", "blocks.*.attn", "blocks.*.mlp"],
}
PEER_NAMES = ("torch-cka", "cka-pytorch")
OWN_SUBJECTS = ("forward", "hooked", "ours", "ours-bf16")
SUBJECT_LABELS = {
    "forward": "(a) forward passes alone (both models, `no_grad`)",
    "hooked": "(a′) forward passes with the capture hooks holding the activations",
    "ours": "(b) `cka_matrix` (debiased linear)",
    "ours-bf16": "(b16) `cka_matrix(..., precision=\"bf16\")` (opt-in bfloat16 Grams)",
    "torch-cka": "torch-cka: `CKA(...).compare(loader, loader)`",
    "cka-pytorch": "cka-pytorch: `CKACalculator(...).calculate_cka_matrix(loader, num_epochs=1)`",
}
FULL = dict(n_samples=256, batch_size=64, rounds=5, image_size=64, memory_n_samples=128,
            memory_selections=list(MEMORY_SELECTIONS), memory_repeats=2)
SMOKE = dict(n_samples=16, batch_size=8, rounds=1, image_size=32, memory_n_samples=16,
             memory_selections=["4", "12"], memory_repeats=1)


# ----------------------------------------------------------------------------------------------- workload
def build_pair(pair: str, image_size: int, seed: int = 0) -> tuple[nn.Module, nn.Module]:
    """The pair's timm teacher and student (``pretrained=False``, 10 classes), initialised from ``seed`` in
    that order, in eval mode, float32; ViTs are built for ``image_size``."""
    import timm

    spec = PAIRS[pair]
    extra = {"img_size": image_size} if spec.get("vit") else {}
    torch.manual_seed(seed)
    teacher = timm.create_model(spec["teacher"], pretrained=False, num_classes=10, **extra).eval()
    student = timm.create_model(spec["student"], pretrained=False, num_classes=10, **extra).eval()
    return teacher, student


def make_inputs(n_samples: int, image_size: int, seed: int = 0) -> torch.Tensor:
    """Seeded random ``[n, 3, image_size, image_size]`` float32 inputs."""
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(n_samples, 3, image_size, image_size, generator=generator)


def make_loader(inputs: torch.Tensor, batch_size: int) -> DataLoader:
    """``(x, y)`` batches with dummy labels: the form both peers read."""
    return DataLoader(TensorDataset(inputs, torch.zeros(len(inputs), dtype=torch.long)), batch_size=batch_size)


def pair_layers(pair: str, teacher: nn.Module, student: nn.Module, selection: list[str] | None = None) -> Layers:
    """The module names (model order) that the pair's selectors, or ``selection`` on both sides, resolve to."""
    from workbench.capture import resolve_layers

    spec = PAIRS[pair]
    return (resolve_layers(teacher, selection or spec["teacher_layers"]),
            resolve_layers(student, selection or spec["student_layers"]))


# ----------------------------------------------------------------------------------------------- subjects
def run_hooked(teacher: nn.Module, student: nn.Module, loader: DataLoader, layers: Layers, device: str) -> None:
    """(a′) the forward passes with the capture hooks (b) uses on ``layers``, holding each batch's outputs."""
    from workbench.capture import capture

    with torch.no_grad(), capture(teacher, layers[0]), capture(student, layers[1]):
        w1.run_forward(teacher, student, loader, device)


def run_ours(teacher: nn.Module, student: nn.Module, loader: DataLoader, layers: Layers, device: str,
             on_batch: Callable[[int, int], None] | None = None, precision: str = "full") -> dict:
    """(b) ``cka_matrix``, debiased linear, progress off; (b16) the same with ``precision="bf16"``."""
    from workbench.probes.cka_stream import cka_matrix

    result = cka_matrix(teacher, student, loader, layers[0], layers[1], kernel="linear", debiased=True,
                        device=device, batch_size=loader.batch_size, progress=False, on_batch=on_batch,
                        precision=precision)
    return {"values": result.values}


def run_torch_cka(teacher: nn.Module, student: nn.Module, loader: DataLoader, layers: Layers, device: str) -> dict:
    """torch-cka 0.21: hooks by exact name, one Gram per (teacher, student) layer pair, autograd on."""
    from torch_cka import CKA

    cka = CKA(teacher, student, "teacher", "student", layers[0], layers[1], device=device)
    try:
        cka.compare(loader, loader)
    except AssertionError as error:  # it asserts "no NaN" after filling the matrix: keep the matrix
        return {"values": cka.hsic_matrix.detach().double().numpy(), "error": f"AssertionError: {error}"}
    return {"values": cka.export()["CKA"].detach().double().numpy()}


def run_cka_pytorch(teacher: nn.Module, student: nn.Module, loader: DataLoader, layers: Layers,
                    device: str) -> dict:
    """cka-pytorch 1.1.3: it never hooks an ``nn.Sequential``, so a stage is read at its last child (the
    same tensor); its matrix is put back in our layer order by name."""
    from cka_pytorch import CKACalculator

    names = [[w1.last_child_name(model, name) for name in side] for model, side in zip((teacher, student), layers)]
    calculator = CKACalculator(teacher, student, names[0], names[1], device=torch.device(device), verbose=False)
    try:
        values = calculator.calculate_cka_matrix(loader, num_epochs=1)
        without_epsilon = calculator._compute_final_cka(0.0)  # private: the same sums without its ε
    finally:
        calculator.hook_manager1.clear_all()
        calculator.hook_manager2.clear_all()
    rows = [calculator.hook_manager1.module_names.index(name) for name in names[0]]
    columns = [calculator.hook_manager2.module_names.index(name) for name in names[1]]
    pick = np.ix_(rows, columns)
    return {"values": values.cpu().double().numpy()[pick],
            "values_epsilon_0": without_epsilon.cpu().double().numpy()[pick]}


PEER_RUNS: dict[str, Callable] = {"torch-cka": run_torch_cka, "cka-pytorch": run_cka_pytorch}


# ------------------------------------------------------------------------------------------------ workers
def _log(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def _error(error: BaseException) -> str:
    text = str(error).strip()
    return f"{type(error).__name__}: {text.splitlines()[0] if text else ''}"


def feature_dims(teacher: nn.Module, student: nn.Module, inputs: torch.Tensor, layers: Layers) -> list[list[int]]:
    """Flattened feature size per sample of every hooked layer, teacher then student."""
    from workbench.capture import capture

    dims = []
    with torch.no_grad():
        for model, names in zip((teacher, student), layers):
            with capture(model, names) as activations:
                model(inputs[:2])
                dims.append([int(value.shape[1]) for value in activations.flat().values()])
    return dims


def time_job(job: dict) -> dict:
    """One pair, all subjects in this process: a one-batch warm-up of each, then ``rounds`` rounds of
    (a), (a′), (b), (b16) and each peer in turn; seconds, minor page faults and other processes' CPU share per run."""
    device = job["device"]
    teacher, student = build_pair(job["pair"], job["image_size"])
    inputs = make_inputs(job["n_samples"], job["image_size"])
    loader, warm = make_loader(inputs, job["batch_size"]), make_loader(inputs[: job["batch_size"]], job["batch_size"])
    layers = pair_layers(job["pair"], teacher, student)
    runs: dict[str, Callable] = {
        "forward": lambda t, s, data: w1.run_forward(t, s, data, device),
        "hooked": lambda t, s, data: run_hooked(t, s, data, layers, device),
        "ours": lambda t, s, data: run_ours(t, s, data, layers, device),
        "ours-bf16": lambda t, s, data: run_ours(t, s, data, layers, device, precision="bf16"),
    }
    for name in job["peers"]:
        runs[name] = lambda t, s, data, run=PEER_RUNS[name]: run(t, s, data, layers, device)

    def models_for(name):  # peers leave hooks behind: each of their runs gets fresh copies of the same weights
        return (teacher, student) if name in OWN_SUBJECTS else (
            copy.deepcopy(teacher), copy.deepcopy(student))

    out: dict = {"pair": job["pair"], "teacher_layers": layers[0], "student_layers": layers[1],
                 "feature_dims": feature_dims(teacher, student, inputs, layers), "subjects": {}, "rounds": []}
    for name, run in list(runs.items()):
        record = out["subjects"][name] = {"seconds": [], "minflt": [], "other_cpu_share": []}
        try:
            run(*models_for(name), warm)
        except Exception as error:  # a peer that cannot run the pair is a result, not a crash
            record["error"] = _error(error)
            runs.pop(name)
            if name in OWN_SUBJECTS:
                raise
    for index in range(job["rounds"]):
        round_start, seconds = w1.cpu_snapshot(), {}
        for name, run in list(runs.items()):
            record, models = out["subjects"][name], models_for(name)
            gc.collect()
            before = w1.cpu_snapshot()
            try:
                elapsed, faults, output = w1.faulted(run, *models, loader)
            except Exception as error:
                record["error"] = _error(error)
                runs.pop(name)
                continue
            record["other_cpu_share"].append(w1.other_cpu_share(before, w1.cpu_snapshot()))
            record["seconds"].append(elapsed)
            record["minflt"].append(faults)
            seconds[name] = elapsed
            for key, value in (output or {}).items():
                record[key] = np.asarray(value).tolist() if key.startswith("values") else value
            del models, output
        share = w1.other_cpu_share(round_start, w1.cpu_snapshot())
        out["rounds"].append({"other_cpu_share": share, "seconds": seconds})
        _log(f"  {job['pair']} round {index + 1}/{job['rounds']}: "
             + ", ".join(f"{name} {value:.2f} s" for name, value in seconds.items())
             + f"; other processes {w1._share(share)} of the CPU")
    return out


def reference_job(job: dict) -> dict:
    """Float64 references for one pair: ``cka_matrix`` on float64 copies of the models (float64 inputs), the
    independent trace-form reference on those same float64 features, and that reference on the float32
    forward's features; plus ``cka_matrix``'s float32 values from the same float32 pass."""
    from workbench.capture import capture

    device = job["device"]
    teacher, student = build_pair(job["pair"], job["image_size"])
    inputs = make_inputs(job["n_samples"], job["image_size"])
    layers = pair_layers(job["pair"], teacher, student)
    out = {}
    for tag, dtype in (("32", torch.float32), ("64", torch.float64)):
        models = (teacher, student) if dtype == torch.float32 else (
            copy.deepcopy(teacher).double(), copy.deepcopy(student).double())
        reference = w1.ReferenceCKA()
        with capture(models[0], layers[0]) as first, capture(models[1], layers[1]) as second:
            def add(*_):  # called by cka_matrix after each batch, while these hooks hold that batch's outputs
                reference.update(list(first.flat().values()), list(second.flat().values()))

            ours = run_ours(*models, make_loader(inputs.to(dtype), job["batch_size"]), layers, device, on_batch=add)
        out[f"ours_float{tag}"] = np.asarray(ours["values"]).tolist()
        out[f"trace_reference_float{tag}"] = np.asarray(reference.values()).tolist()
        _log(f"  {job['pair']}: float{tag} pass done")
    return out


def memory_job(job: dict) -> dict:
    """One run of ``subject`` (``forward``, ``hooked`` or ``ours``) on the memory pair with ``selection``
    hooked on both models: peak RSS growth over the RSS just before it (models and inputs already built)."""
    importlib.import_module("workbench.probes.cka_stream")  # its imports are not the run's memory
    device = job["device"]
    teacher, student = build_pair(job["pair"], job["image_size"])
    loader = make_loader(make_inputs(job["n_samples"], job["image_size"]), job["batch_size"])
    layers = pair_layers(job["pair"], teacher, student, job.get("selection")) if job.get("selection") else ([], [])
    run = {"forward": lambda: w1.run_forward(teacher, student, loader, device),
           "hooked": lambda: run_hooked(teacher, student, loader, layers, device),
           "ours": lambda: run_ours(teacher, student, loader, layers, device)}[job["subject"]]
    gc.collect()
    base, reset = w1.rss_bytes(peak=False), w1.peak_rss_reset()
    seconds, faults, _ = w1.faulted(run)
    peak = w1.rss_bytes(peak=True)
    dims = feature_dims(teacher, student, loader.dataset.tensors[0], layers)  # after the peak was read
    return {"subject": job["subject"], "selection": job.get("selection"), "n_layers": [len(side) for side in layers],
            "rss_growth_bytes": peak - base, "rss_peak_bytes": peak, "peak_reset": reset, "seconds": seconds,
            "minflt": faults, "feature_bytes_per_batch": 4 * job["batch_size"] * sum(map(sum, dims))}


def worker(job: dict) -> dict:
    """Run one job (``time``, ``reference`` or ``memory``) in this process, with the job's thread count."""
    torch.set_num_threads(job["threads"])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            return {"time": time_job, "reference": reference_job, "memory": memory_job}[job["kind"]](job)
        except Exception as error:
            return {"error": _error(error)}


def run_fresh(job: dict) -> dict:
    """``worker(job)`` in a fresh interpreter (its progress goes to this stderr); its JSON, or why none came."""
    before = w1.cpu_snapshot()
    with tempfile.TemporaryDirectory() as folder:
        path = os.path.join(folder, "job.json")
        command = [sys.executable, os.path.abspath(__file__), "--worker", json.dumps(job), "--worker-out", path]
        process = subprocess.run(command, stdout=subprocess.DEVNULL, env={**os.environ, "TQDM_DISABLE": "1"})
        if process.returncode != 0 or not os.path.exists(path):
            return {"error": f"worker exited with code {process.returncode}"}
        with open(path) as handle:
            out = json.load(handle)
    out["process_other_cpu_share"] = w1.other_cpu_share(before, w1.cpu_snapshot())
    return out


# --------------------------------------------------------------------------------------------- orchestration
def measure(config: dict, peers: list[str], log: Callable[[str], None] = _log,
            runner: Callable[[dict], dict] | None = None) -> dict:
    """Every measurement of the benchmark as a JSON-able dict that :func:`render_markdown` reads.

    ``config`` holds ``pairs``, ``n_samples``, ``batch_size``, ``rounds``, ``image_size``, ``memory_n_samples``,
    ``memory_selections`` (keys of :data:`MEMORY_SELECTIONS`), ``device`` and ``threads``; ``peers`` the peer
    distributions to time. Each job goes to ``runner`` (default :func:`run_fresh`: a fresh process per job).
    """
    runner = runner or run_fresh
    base = {key: config[key] for key in ("device", "threads", "image_size", "batch_size")}
    results: dict = {"config": config, "peers": list(peers), "pairs": {}, "memory": []}
    start = w1.cpu_snapshot()
    for pair in config["pairs"]:
        spec = PAIRS[pair]
        log(f"{pair}: {spec['teacher']} → {spec['student']}, N={config['n_samples']}, {config['rounds']} rounds "
            f"of (a), (a′), (b), (b16){''.join(', ' + name for name in peers)} in one fresh process")
        timing = runner({**base, "kind": "time", "pair": pair, "n_samples": config["n_samples"],
                         "rounds": config["rounds"], "peers": list(peers)})
        log(f"{pair}: float64 references (float64 copies of the models) in a fresh process")
        reference = runner({**base, "kind": "reference", "pair": pair, "n_samples": config["n_samples"]})
        results["pairs"][pair] = {"time": timing, "reference": reference}
    memory_base = {**base, "kind": "memory", "pair": MEMORY_PAIR, "n_samples": config["memory_n_samples"]}
    plan = [("forward", None)] + [(subject, key) for key in config["memory_selections"] for subject in ("hooked", "ours")]
    for repeat in range(config["memory_repeats"]):  # repeats as whole sweeps: drift hits every row alike
        for subject, key in plan:
            log(f"peak memory {repeat + 1}/{config['memory_repeats']}: {subject} on {MEMORY_PAIR}, {key or 0} layers "
                f"per model, N={config['memory_n_samples']}, fresh process")
            out = runner({**memory_base, "subject": subject, "selection": MEMORY_SELECTIONS[key] if key else None})
            results["memory"].append({"key": key or "0", "repeat": repeat, **out})
    results["other_cpu_share"] = w1.other_cpu_share(start, w1.cpu_snapshot())
    results["machine"] = machine_facts(config["device"], config["threads"])
    return results


def machine_facts(device: str, threads: int) -> dict:
    """``benchmarks/cka_matrix.py``'s machine facts plus the timm version."""
    import timm

    return {**w1.machine_info(device, threads), "timm": timm.__version__}


def installed_peers() -> list[str]:
    """The peer distributions of :data:`PEER_NAMES` that are installed."""
    return [name for name in PEER_NAMES if w1._version(name)]


# ------------------------------------------------------------------------------------------------ report
def _paired(top: list[float], bottom: list[float]) -> str:
    ratios = [a / b for a, b in zip(top, bottom)]
    if not ratios:
        return "—"
    return f"{w1._median(ratios):.2f} ({min(ratios):.2f}–{max(ratios):.2f})"


def _max_diff(values, reference) -> str:
    if values is None or reference is None:
        return "—"
    compared = w1.compare_to_reference(values, reference)
    note = f", {compared['n_nan']} NaN/Inf" if compared["n_nan"] else ""
    return f"{compared['max_abs_diff']:.1e}{note}"


def _shares(values: list) -> str:
    values = [value for value in values if value is not None]
    if not values:
        return "—"
    low, high = w1._share(min(values)), w1._share(max(values))
    return low if low == high else f"{low}–{high}"


def subject_rows(pair_results: dict) -> list[tuple[str, str]]:
    """``(subject, table row)`` for each subject of one pair's table, in the table's order."""
    timing, reference = pair_results["time"], pair_results["reference"]
    subjects = timing["subjects"]
    ref64 = reference.get("ours_float64")
    same = reference.get("trace_reference_float32")
    a, hooked, ours = (subjects[name]["seconds"] for name in ("forward", "hooked", "ours"))
    rows = []
    for name, record in subjects.items():
        label = SUBJECT_LABELS[name]
        if name in PEER_NAMES:
            label = label.replace(name, f"{name} {w1._version(name)}", 1)
        seconds = record["seconds"]
        if not seconds:
            rows.append((name, f"| {label} | — | failed: `{record.get('error', 'no runs')}` | | | | | | | |"))
            continue
        values = record.get("values")
        diff64 = _max_diff(values, ref64) if values is not None else "—"
        diff_same = _max_diff(values, same) if values is not None else "—"
        if name == "cka-pytorch" and record.get("values_epsilon_0") is not None:
            diff64 += f" (ε = 0: {_max_diff(record['values_epsilon_0'], ref64)})"
        vs_ours = _paired(ours, seconds) if name in PEER_NAMES else "—"
        if name in PEER_NAMES and subjects.get("ours-bf16", {}).get("seconds"):
            vs_ours += f"; (b16): {_paired(subjects['ours-bf16']['seconds'], seconds)}"
        note = f" (`{record['error']}`)" if record.get("error") else ""
        rows.append((name, f"| {label}{note} | {w1._median(seconds):.2f} | {w1._span(seconds)} | "
                           f"{_paired(seconds, a)} | {_paired(seconds, hooked)} | {w1._median(record['minflt']):,.0f} | "
                           f"{_shares(record['other_cpu_share'])} | {diff64} | {diff_same} | {vs_ours} |"))
    return rows


def pair_section(pair: str, pair_results: dict, config: dict) -> list[str]:
    """One pair's Markdown: layers, the subject table, the rounds and what the load means for them."""
    spec, timing, reference = PAIRS[pair], pair_results["time"], pair_results["reference"]
    title = f"## {pair}: `{spec['teacher']}` → `{spec['student']}`, {config['image_size']} px"
    if "error" in timing:
        return [title, "", f"The timing process failed: `{timing['error']}`.", ""]
    dims = timing["feature_dims"]
    lines = [
        title, "",
        f"Hooked: teacher {len(timing['teacher_layers'])} layers ({_names(timing['teacher_layers'])}), "
        f"Σd = {sum(dims[0]):,} features per sample; student {len(timing['student_layers'])} layers "
        f"({_names(timing['student_layers'])}), Σd = {sum(dims[1]):,}.", "",
        "| subject | median s | runs s | × (a) | × (a′) | minor faults / run | other CPU | max abs Δ vs float64 "
        "| max abs Δ vs float64, same features | ours / subject |",
        "|---|---|---|---|---|---|---|---|---|---|",
        *(row for _, row in subject_rows(pair_results)), "",
    ]
    subjects = timing["subjects"]
    ours, a, hooked = (subjects[name]["seconds"] for name in ("ours", "forward", "hooked"))
    lines.append(f"**b/a = {_paired(ours, a)}**, **b/a′ = {_paired(ours, hooked)}** (paired per round: median "
                 "(min–max)).")
    bf16 = subjects.get("ours-bf16", {}).get("seconds")
    if bf16:
        lines.append(f"Opt-in bfloat16 Grams: **b16/a = {_paired(bf16, a)}**, **b16/a′ = {_paired(bf16, hooked)}**, "
                     f"b16/b = {_paired(bf16, ours)}.")
    if "error" not in reference:
        lines += peer_value_notes(subjects, reference)
    if "error" in reference:
        lines += ["", f"The reference process failed: `{reference['error']}`."]
    else:
        check = w1.compare_to_reference(reference["ours_float64"], reference["trace_reference_float64"])["max_abs_diff"]
        forward_noise = w1.compare_to_reference(reference["trace_reference_float32"],
                                                reference["trace_reference_float64"])["max_abs_diff"]
        lines += ["", f"Reference self-check: `cka_matrix` in float64 vs the independent trace-form float64 reference "
                      f"on the same float64 features, max |Δ| = {check:.1e}. The float32 forward alone moves the values "
                      f"by {forward_noise:.1e} (trace-form reference on float32 vs float64 features)."]
    names = [name for name in subjects if subjects[name]["seconds"]]
    lines += ["", "| round | other CPU | " + " | ".join(f"{name} s" for name in names) + " |",
              "|---|---|" + "---|" * len(names)]
    for index, entry in enumerate(timing["rounds"], 1):
        lines.append(f"| {index} | {w1._share(entry['other_cpu_share'])} | "
                     + " | ".join(f"{entry['seconds'][name]:.2f}" if name in entry["seconds"] else "—" for name in names)
                     + " |")
    shares = [entry["other_cpu_share"] for entry in timing["rounds"] if entry["other_cpu_share"] is not None]
    lines += ["", load_sentence(shares), ""]
    return lines


def peer_value_notes(subjects: dict, reference: dict) -> list[str]:
    """A sentence per peer whose values are far further from the float64 reference than ours, on the very
    features it was given: its own arithmetic, not the forward's rounding."""
    same = reference["trace_reference_float32"]
    ours = w1.compare_to_reference(subjects["ours"]["values"], same)["max_abs_diff"]
    notes = []
    for name in PEER_NAMES:
        values = subjects.get(name, {}).get("values")
        if values is None:
            continue
        theirs = w1.compare_to_reference(values, same)["max_abs_diff"]
        if theirs > max(100 * ours, 1e-6):
            notes.append(f"{name} is {theirs:.1e} off the float64 reference on the very float32 features it was given "
                         f"(ours: {ours:.1e}), so that error is its own arithmetic, not the forward's rounding.")
    return ["", " ".join(notes)] if notes else []


def load_sentence(shares: list[float]) -> str:
    """What the foreign CPU load per round says about the timings."""
    if not shares:
        return "Other processes' CPU use was not measured (no `/proc/stat`)."
    if max(shares) <= 0.05:
        return f"The machine was quiet: other processes used at most {w1._share(max(shares))} of its CPU in any round."
    return (f"**The machine was shared**: other processes used {_shares(shares)} of its CPU per round, so the "
            "absolute times are inflated and noisy; the ratios pair runs of the same round, which cancels load that "
            "changes slowly, not load that changes within a round (see the min–max).")


def memory_section(results: dict) -> list[str]:
    """Peak RSS growth of (a) / (a′) / (b) against the number of hooked layers per model on the memory pair."""
    config = results["config"]
    lines = [
        f"## Peak memory against the number of hooked layers ({MEMORY_PAIR}, N = {config['memory_n_samples']:,}, "
        f"batch {config['batch_size']})", "",
        "Peak RSS growth = peak RSS during one run minus the RSS just before it (Linux `clear_refs` + `VmHWM`), "
        "in a fresh process per measurement with the models and the inputs already built; the same selectors on "
        "both models; " + (f"median of {config['memory_repeats']} sweeps (min–max)" if config["memory_repeats"] > 1
                           else "one sweep") + ". `features / batch` is one batch's "
        "float32 outputs of all hooked layers of both models, the unit of the last column.", "",
        "| layers per model | selectors | features / batch | (a′) hooked forward | (b) `cka_matrix` | (b) − (a′) "
        "| (b) − (a′) in features / batch | (b) run s | other CPU |", "|---|---|---|---|---|---|---|---|---|",
    ]
    runs: dict[tuple[str, str], list[dict]] = {}
    for entry in results["memory"]:
        runs.setdefault((entry["key"], entry.get("subject", "?")), []).append(entry)
    forward = runs.get(("0", "forward"), [])
    if forward:
        lines.append(f"| 0 | (a) bare forward | — | {_growth(forward)} | | | | {_seconds(forward)} | "
                     f"{_shares([entry.get('process_other_cpu_share') for entry in forward])} |")
    points = {"hooked": [], "ours": [], "extra": []}
    for key in config["memory_selections"]:
        hooked, ours = runs.get((key, "hooked"), []), runs.get((key, "ours"), [])
        selectors = ", ".join(f"`{name}`" for name in MEMORY_SELECTIONS[key])
        features = next((entry["feature_bytes_per_batch"] for entry in ours if "feature_bytes_per_batch" in entry), None)
        extra, copies = "—", "—"
        hooked_ok = [entry["rss_growth_bytes"] for entry in hooked if "rss_growth_bytes" in entry]
        ours_ok = [entry["rss_growth_bytes"] for entry in ours if "rss_growth_bytes" in entry]
        if hooked_ok and ours_ok:
            difference = w1._median(ours_ok) - w1._median(hooked_ok)
            extra = w1._mib(difference)
            copies = f"{difference / features:.2f}" if features else "—"
            points["extra"].append((int(key), difference))
        for name, values in (("hooked", hooked_ok), ("ours", ours_ok)):
            if values:
                points[name].append((int(key), w1._median(values)))
        lines.append(f"| {key} | {selectors} | {w1._mib(features)} | {_growth(hooked)} | {_growth(ours)} | {extra} | "
                     f"{copies} | {_seconds(ours)} | {_shares([entry.get('process_other_cpu_share') for entry in ours])} |")
    if len(points["ours"]) >= 2:
        slopes = {name: np.polyfit(*zip(*values), 1)[0] / 2**20 for name, values in points.items() if len(values) >= 2}
        lines += ["", "Least-squares slopes, MiB per added layer per model (one hook on each model): "
                  + ", ".join(f"{label} {slopes[name]:+.2f}" for name, label in
                              (("hooked", "(a′)"), ("ours", "(b)"), ("extra", "(b) − (a′)")) if name in slopes) + "."]
    return lines + [""]


def _growth(entries: list[dict]) -> str:
    values = [entry["rss_growth_bytes"] for entry in entries if "rss_growth_bytes" in entry]
    errors = [entry["error"] for entry in entries if "error" in entry]
    if not values:
        return f"failed: `{errors[0]}`" if errors else "—"
    text = w1._mib(w1._median(values))
    if len(values) > 1:
        text += f" ({w1._mib(min(values))}–{w1._mib(max(values))})"
    return text + (f", {len(errors)} failed" if errors else "")


def _seconds(entries: list[dict]) -> str:
    values = [entry["seconds"] for entry in entries if "seconds" in entry]
    return f"{w1._median(values):.2f}" if values else "—"


def _names(names: list[str]) -> str:
    if len(names) > 6:
        return f"`{names[0]}` … `{names[-1]}`"
    return ", ".join(f"`{name}`" for name in names)


def render_markdown(results: dict) -> str:
    """The committed report: command, machine, one table per pair, peak memory against the layer count."""
    config, machine = results["config"], results["machine"]
    share = results.get("other_cpu_share")
    peers = ", ".join(f"{name} {w1._version(name)}" for name in results["peers"]) or "none installed"
    lines = [
        "# `cka_matrix` on real timm pairs (issue 12)", "",
        f"Made by `{results.get('command', 'python benchmarks/cka_pairs.py')}` on {date.today().isoformat()}.", "",
        "| machine | |", "|---|---|",
        f"| CPU | {machine['cpu']} |",
        f"| software | torch {machine['torch']}, timm {machine['timm']}, Python {machine['python']}, {machine['os']} |",
        f"| peers timed | {peers} |",
        f"| other work | {w1._share_verdict(share)}; load average at the end "
        f"{', '.join(f'{value:.2f}' for value in machine.get('load_average') or ())} |", "",
        f"Workload: timm models, `pretrained=False`, `num_classes=10`, seed 0, eval mode, float32 on "
        f"{config['device']}; {config['n_samples']:,} seeded random 3×{config['image_size']}×{config['image_size']} "
        f"inputs in batches of {config['batch_size']}, the same `DataLoader` of `(x, y)` batches for every subject. "
        f"Per pair, one fresh process runs every subject once on one batch (warm-up), then {config['rounds']} rounds "
        "of the subjects in turn. Times are medians over rounds; `× (a)`, `× (a′)` and `ours / subject` are "
        "per-round ratios, median (min–max). `minor faults / run` is the median `ru_minflt` delta of a run; "
        "`other CPU` the share of the machine's CPU other processes used during that subject's runs "
        "(`/proc/stat` minus this process, min–max over rounds).", "",
        *(["One torch thread (`torch.set_num_threads(1)`, the default): on 2 cores shared with other work, two "
           "OpenMP threads stall each other at every barrier whenever one is descheduled, so their times measure the "
           "neighbour more than the code (see the script's docstring).", ""] if config["threads"] == 1 else []),
        "Values: `max abs Δ vs float64` compares with `cka_matrix` run on float64 copies of the models with "
        "float64 inputs (the same minibatch estimator: unbiased HSIC per batch, the three HSIC sums over batches, "
        "normalised once), so it includes the float32 forward's own rounding; `same features` compares with the "
        "trace-form float64 reference of `benchmarks/cka_matrix.py` computed on the float32 forward's features, "
        "i.e. the exact value of what each implementation was given. Peers' estimators: "
        + "; ".join(f"{name}: {w1.PEERS[name][1]}" for name in PEER_NAMES) + ".", "",
    ]
    for pair, pair_results in results["pairs"].items():
        lines += pair_section(pair, pair_results, config)
    lines += memory_section(results)
    skipped = [name for name in PEER_NAMES if name not in results["peers"]]
    if skipped:
        lines += [f"Not run (not installed or `--no-peers`): {', '.join(skipped)}.", ""]
    return "\n".join(lines)


# -------------------------------------------------------------------------------------------------- main
def parse_args(argv: list[str]) -> argparse.Namespace:
    """The command line: sizes, pairs, outputs (``--worker`` is the script re-running itself for one job)."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--markdown", metavar="PATH", help="write the report here")
    parser.add_argument("--json", metavar="PATH", help="write the raw measurements here")
    parser.add_argument("--rounds", type=int, help="timed rounds per pair (default 5; smoke 1)")
    parser.add_argument("--n-samples", type=int, help="inputs per pass (default 256; smoke 16)")
    parser.add_argument("--batch-size", type=int, help="batch (default 64; smoke 8)")
    parser.add_argument("--image-size", type=int, help="input side in pixels (default 64; smoke 32; 224 on a GPU)")
    parser.add_argument("--memory-n-samples", type=int, help="inputs of each peak-memory run (default 128)")
    parser.add_argument("--pairs", nargs="+", choices=list(PAIRS), help="pairs to time (default: all)")
    parser.add_argument("--smoke", action="store_true", help="tiny: 1 round, 16 samples of 32×32, 2 memory sizes")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch.set_num_threads (default 1: see the module docstring; 2 on a quiet machine)")
    parser.add_argument("--device", default="cpu", help="cpu (default) or cuda")
    parser.add_argument("--no-peers", action="store_true", help="skip the peer packages")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--worker-out", help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def make_config(args: argparse.Namespace) -> dict:
    """The run's configuration from the command line: the full or smoke defaults, then the overrides."""
    config = {**(SMOKE if args.smoke else FULL), "pairs": args.pairs or list(PAIRS),
              "device": args.device, "threads": args.threads}
    for key in ("rounds", "n_samples", "batch_size", "image_size", "memory_n_samples"):
        if getattr(args, key) is not None:
            config[key] = getattr(args, key)
    return config


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark (or, with ``--worker``, one of its jobs) and print / write the report."""
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    if serve_worker(args.worker, args.worker_out, worker):
        return 0
    config = make_config(args)
    peers = [] if args.no_peers else installed_peers()
    results = measure(config, peers)
    results["command"] = shlex.join(["python", "benchmarks/cka_pairs.py", *argv])
    print(save_outputs(results, render_markdown, json_path=args.json, markdown_path=args.markdown))
    return 0


if __name__ == "__main__":
    sys.exit(main())
