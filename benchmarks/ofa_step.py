"""Benchmark of one OFA-KD training step against one KD step on the same heterogeneous pair, and the
branches' share of the trainable parameters and of the FLOPs.

Per pair, two ``Distiller`` steps (forward + backward + optimizer step, AdamW) timed in turn (k, o, k, o,
...), so that load changing over time hits both alike:

- **(k) KD**: ``Distiller(teacher, student, {"kd": KD(T=4)})`` — cross-entropy + KD on the final logits;
- **(o) OFA-KD**: ``Distiller(teacher, student, **ofa_terms(teacher, student, batch))`` — cross-entropy
  (label smoothing 0.1) + the OFA loss on the final logits + a branch at every student stage, each
  projecting its stage into the logit space and distilled against the teacher's logits.

Ratio = median(o) / median(k). Beside it, what the branches add: their trainable parameters against the
student's (``workbench.models.count_parameters``) and their forward FLOPs for one sample against the
student's forward (``workbench.models.count_flops`` on each stage's output). The pairs (32×32 inputs, 10
classes, the teacher frozen):

- **cnn-vit** (the headline): the built-in ``cnn`` (32, 64, 128) → a timm ViT sized for 32×32
  (``vit_tiny_patch16_224`` with patch 4, 4 blocks of width 96, 3 heads: 64 tokens + a class token), four
  token branches;
- **cnn-cnn**: the same teacher → ``cnn`` (16, 32, 64), three CNN branches.

``--device auto`` (default) takes CUDA when there is one, with bf16 autocast (fp16 with a GradScaler where
bf16 is missing) as ``fit(amp="auto")`` does; the CPU runs float32. Seeded random inputs.

    python benchmarks/ofa_step.py --markdown reports/results/ofa_benchmark.md
    python benchmarks/ofa_step.py --device cuda --markdown reports/results/ofa_benchmark_cuda.md
    python benchmarks/ofa_step.py --tiny          # smoke size, seconds
"""
from __future__ import annotations

import argparse
import json
import os
import shlex
import statistics
import sys
import time
from collections.abc import Callable
from datetime import date
from typing import Any

import torch

from distill_step import machine

PAIRS = {  # teacher and student: (models.create_sized name, its arguments)
    "cnn-vit": dict(teacher=("cnn", dict(widths=(32, 64, 128))),
                    student=("vit_tiny_patch16_224", dict(patch_size=4, depth=4, embed_dim=96, num_heads=3)),
                    label="`cnn` (32, 64, 128) → timm ViT (patch 4, 4 blocks, width 96)"),
    "cnn-cnn": dict(teacher=("cnn", dict(widths=(32, 64, 128))), student=("cnn", dict(widths=(16, 32, 64))),
                    label="`cnn` (32, 64, 128) → `cnn` (16, 32, 64)"),
}
STEPS = {"kd": "(k) `Distiller`: CE + KD(T=4)",
         "ofa": "(o) `Distiller(**ofa_terms(...))`: CE (smoothing 0.1) + OFA on the logits + a branch per stage"}
FULL = dict(pairs=tuple(PAIRS), batch_size=64, size=32, steps=10, warmup=2)  # the CPU: a few minutes
FULL_CUDA = dict(pairs=tuple(PAIRS), batch_size=256, size=32, steps=50, warmup=10)
TINY = dict(pairs=tuple(PAIRS), batch_size=4, size=16, steps=2, warmup=1)


def _make(side: tuple[str, dict[str, Any]], config: dict[str, Any], device: torch.device) -> torch.nn.Module:
    from workbench import models

    name, kwargs = side
    return models.create_sized(name, config["size"], **kwargs, in_chans=3, num_classes=10).to(device)


def training_step(distiller: Any, batch: Any, amp: str) -> Callable[[], None]:
    """One full step of ``distiller`` on ``batch``: autocast and GradScaler as ``fit(amp=amp)`` chooses them."""
    from workbench.train.precision import autocast_settings

    device = batch[0].device
    dtype, scaler = autocast_settings(amp, device)
    optimizer = torch.optim.AdamW(distiller.trainable_parameters(), lr=1e-3)

    def step() -> None:
        with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
            total, _ = distiller.step(batch)
        optimizer.zero_grad(set_to_none=True)
        if scaler is not None:
            scaler.scale(total).backward()
            scaler.step(optimizer)
            scaler.update()
        else:
            total.backward()
            optimizer.step()

    return step


def branch_shares(distiller: Any, inputs: torch.Tensor) -> dict[str, Any]:
    """What the branches add to the student: parameters (trainable) and forward FLOPs of one sample.

    ``per_branch``: term name -> (stage, parameters, FLOPs); the FLOPs of a branch are counted on its
    stage's output for the first sample of ``inputs``."""
    from workbench.capture import capture
    from workbench.models import count_flops, count_parameters

    student = distiller.student
    branches = {name: term for name, term in distiller.terms.items() if hasattr(term, "branch")}
    stages = [distiller.layers[name][1] for name in branches]
    with torch.no_grad(), capture(student, stages) as features:
        student(inputs[:1])
    per_branch = {name: (stage, count_parameters(term, trainable_only=True),
                         count_flops(term.branch, features[stage]))
                  for (name, term), stage in zip(branches.items(), stages)}
    student_parameters = count_parameters(student, trainable_only=True)
    student_flops = count_flops(student, inputs)
    branch_parameters = sum(parameters for _, parameters, _ in per_branch.values())
    branch_flops = sum(flops for _, _, flops in per_branch.values())
    return {
        "per_branch": per_branch,
        "student_parameters": student_parameters, "branch_parameters": branch_parameters,
        "parameter_share": branch_parameters / (student_parameters + branch_parameters),
        "student_flops": student_flops, "branch_flops": branch_flops,
        "flop_share": branch_flops / (student_flops + branch_flops),
        "teacher_flops": count_flops(distiller.teacher, inputs),
    }


def flop_ratio(shares: dict[str, Any]) -> float:
    """The ratio an OFA-KD step would have to a KD step if time were FLOPs: a trained part costs its forward
    three times (forward, and the backward's two products), the frozen teacher its forward once, so
    ``(3 (student + branches) + teacher) / (3 student + teacher)``; the losses themselves are left out.

    Example:
        >>> flop_ratio({"student_flops": 10, "branch_flops": 5, "teacher_flops": 30})
        1.25
    """
    student, branches, teacher = shares["student_flops"], shares["branch_flops"], shares["teacher_flops"]
    return (3 * (student + branches) + teacher) / (3 * student + teacher)


def build(config: dict[str, Any], pair: str, seed: int = 0) -> dict[str, Any]:
    """The pair's two Distillers and their step functions (``kd``, ``ofa``), the branches' shares, the stages."""
    from workbench.losses import KD, ofa_terms
    from workbench.train import Distiller

    spec, device = PAIRS[pair], torch.device(config["device"])
    torch.manual_seed(seed)
    teacher = _make(spec["teacher"], config, device).eval().requires_grad_(False)
    inputs = torch.randn(config["batch_size"], 3, config["size"], config["size"], device=device)
    batch = (inputs, torch.randint(0, 10, (config["batch_size"],), device=device))
    student_kd, student_ofa = _make(spec["student"], config, device), _make(spec["student"], config, device)
    setup = ofa_terms(teacher, student_ofa, batch, seed=seed)
    ofa = Distiller(teacher, student_ofa, **setup).train()
    kd = Distiller(teacher, student_kd, {"kd": (KD(T=4.0), 1.0)}).train()
    return {"steps": {"kd": training_step(kd, batch, config["amp"]), "ofa": training_step(ofa, batch, config["amp"])},
            "distillers": {"kd": kd, "ofa": ofa}, "shares": branch_shares(ofa, inputs), "stages": list(setup.stages),
            "device": device}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def time_in_turn(steps: dict[str, Callable[[], None]], rounds: int, warmup: int,
                 device: torch.device) -> dict[str, list[float]]:
    """Seconds of each step per round, the steps taken in turn every round; the ``warmup`` rounds not kept."""
    seconds: dict[str, list[float]] = {name: [] for name in steps}
    for round_index in range(warmup + rounds):
        for name, step in steps.items():
            _sync(device)
            started = time.perf_counter()
            step()
            _sync(device)
            if round_index >= warmup:
                seconds[name].append(time.perf_counter() - started)
    return seconds


def peak_memory(steps: dict[str, Callable[[], None]], device: torch.device) -> dict[str, int] | None:
    """CUDA only: the peak allocated bytes of one more step of each kind (``None`` elsewhere)."""
    if device.type != "cuda":
        return None
    peaks = {}
    for name, step in steps.items():
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats(device)
        step()
        torch.cuda.synchronize()
        peaks[name] = torch.cuda.max_memory_allocated(device)
    return peaks


def measure_pair(config: dict[str, Any], pair: str) -> dict[str, Any]:
    """Warm up, then time ``steps`` rounds of the KD and OFA-KD steps of ``pair``: seconds, medians, ratio."""
    subjects = build(config, pair)
    seconds = time_in_turn(subjects["steps"], config["steps"], config["warmup"], subjects["device"])
    medians = {name: statistics.median(values) for name, values in seconds.items()}
    return {"seconds": seconds, "median_seconds": medians, "ratio": medians["ofa"] / medians["kd"],
            "flop_ratio": flop_ratio(subjects["shares"]), "shares": subjects["shares"], "stages": subjects["stages"],
            "peak_memory_bytes": peak_memory(subjects["steps"], subjects["device"])}


def measure(config: dict[str, Any]) -> dict[str, Any]:
    """Every pair of ``config["pairs"]`` measured in turn (see :func:`measure_pair`), with the machine and load."""
    from workbench.train.precision import autocast_settings

    torch.set_num_threads(config["threads"])
    load_before = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    pairs = {pair: measure_pair(config, pair) for pair in config["pairs"]}
    dtype, scaler = autocast_settings(config["amp"], torch.device(config["device"]))
    return {
        "config": {key: list(value) if isinstance(value, tuple) else value for key, value in config.items()},
        "precision": "float32" if dtype is None else f"{str(dtype).removeprefix('torch.')} autocast"
                     + (" + GradScaler" if scaler is not None else ""),
        "pairs": pairs,
        "ratio": pairs[config["pairs"][0]]["ratio"],
        "load_average": [load_before, os.getloadavg()[0] if hasattr(os, "getloadavg") else None],
        "machine": machine(config["device"]),
    }


def _count(value: int) -> str:
    return f"{value / 1e6:.2f} M" if value >= 1e5 else f"{value / 1e3:.1f} k"


def render_markdown(results: dict[str, Any], command: str = "") -> str:
    """The committed tables: machine, workload, step medians and ratio per pair, then the branches' shares."""
    config, load = results["config"], results["load_average"]
    lines = ["# OFA-KD step benchmark", ""]
    if command:
        lines += [f"Made by `{command}` on {date.today().isoformat()}.", ""]
    lines += [
        "| machine | |", "|---|---|",
        f"| CPU | {results['machine']['cpu']}, torch threads {config['threads']} |",
        f"| device | {config['device']} ({results['machine']['accelerator']}) |",
        f"| software | {results['machine']['software']} |",
        f"| load | 1-min load average {load[0]:.2f} before, {load[1]:.2f} after the run |" if None not in load
        else "| load | unknown |",
        "",
        f"Workload: batch {config['batch_size']}, 3×{config['size']}×{config['size']} random inputs, 10 classes, "
        f"{results['precision']}, AdamW, the teacher frozen. Each step is forward + backward + optimizer step; "
        f"the two steps of a pair are timed in turn, {config['steps']} rounds after {config['warmup']} warm-up "
        "rounds; medians.",
        "",
        "| pair | step | median ms | min–max ms | vs (k) |", "|---|---|---|---|---|",
    ]
    memory = any(measured["peak_memory_bytes"] for measured in results["pairs"].values())
    for pair, measured in results["pairs"].items():
        medians = measured["median_seconds"]
        for name, label in STEPS.items():
            values = measured["seconds"][name]
            lines.append(f"| {pair}: {PAIRS[pair]['label']} | {label} | {1000 * medians[name]:.2f} | "
                         f"{1000 * min(values):.2f}–{1000 * max(values):.2f} | {medians[name] / medians['kd']:.3f} |")
    lines += ["", "What the branches add (parameters: trainable; FLOPs: one sample's forward, "
              "`workbench.models.count_flops`):", "",
              "| pair | branches at | student params | branch params | share of params | student FLOPs | "
              "branch FLOPs | share of FLOPs | teacher FLOPs |",
              "|---|---|---|---|---|---|---|---|---|"]
    for pair, measured in results["pairs"].items():
        shares = measured["shares"]
        lines.append(
            f"| {pair} | {', '.join(f'`{stage}`' for stage in measured['stages'])} | "
            f"{_count(shares['student_parameters'])} | {_count(shares['branch_parameters'])} | "
            f"{100 * shares['parameter_share']:.1f} % | {shares['student_flops'] / 1e6:.2f} M | "
            f"{shares['branch_flops'] / 1e6:.2f} M | {100 * shares['flop_share']:.1f} % | "
            f"{shares['teacher_flops'] / 1e6:.2f} M |")
    lines += ["", "Per branch (stage: parameters, FLOPs):", ""]
    for pair, measured in results["pairs"].items():
        branches = "; ".join(f"`{stage}`: {_count(parameters)}, {flops / 1e6:.2f} M"
                             for stage, parameters, flops in measured["shares"]["per_branch"].values())
        lines.append(f"- {pair}: {branches}")
    if memory:
        lines += ["", "| pair | peak memory (k) MiB | peak memory (o) MiB |", "|---|---|---|"]
        for pair, measured in results["pairs"].items():
            peaks = measured["peak_memory_bytes"]
            lines.append(f"| {pair} | {peaks['kd'] / 2**20:.0f} | {peaks['ofa'] / 2**20:.0f} |")
    lines.append("")
    for index, (pair, measured) in enumerate(results["pairs"].items()):
        lead = "**" if index == 0 else ""
        shares = measured["shares"]
        lines.append(
            f"- {lead}{pair}: an OFA-KD step takes {measured['ratio']:.2f}× a KD step{lead}; its "
            f"{len(measured['stages'])} branches are {100 * shares['parameter_share']:.1f} % of the trainable "
            f"parameters and {100 * shares['flop_share']:.1f} % of the student-side forward FLOPs; from the FLOPs "
            f"alone (3× forward for what trains, 1× for the teacher) the ratio would be {measured['flop_ratio']:.2f}."
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Parse the command line, measure, print (and write) the tables; returns the results."""
    from workbench.devices import resolve_device
    from workbench.files import write_atomic

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="auto", help="auto (CUDA when there is one), cpu, cuda, ...")
    parser.add_argument("--amp", default="auto", help="as fit(amp=...): auto (bf16 on CUDA only), bf16, fp16, off")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--steps", type=int, default=None, help="timed rounds (default 10 on the CPU, 50 on CUDA)")
    parser.add_argument("--warmup", type=int, default=None)
    parser.add_argument("--batch-size", type=int, default=None, help="default 64 on the CPU, 256 on CUDA")
    parser.add_argument("--pairs", nargs="+", choices=list(PAIRS), help="model pairs (default: all; the first is "
                                                                         "the headline)")
    parser.add_argument("--tiny", action="store_true", help="smoke size: batch 4, 16×16, 2 rounds")
    parser.add_argument("--markdown", help="write the tables here")
    parser.add_argument("--json", help="write the raw measurements here")
    args = parser.parse_args(argv)
    device = resolve_device(args.device)
    defaults = TINY if args.tiny else FULL_CUDA if device.type == "cuda" else FULL
    config = dict(defaults, device=str(device), amp=args.amp, threads=args.threads)
    for key in ("steps", "warmup", "batch_size", "pairs"):
        if getattr(args, key) is not None:
            config[key] = getattr(args, key)
    if config["steps"] < 1 or config["warmup"] < 0 or config["batch_size"] < 1:
        parser.error("--steps and --batch-size must be positive, --warmup not negative")
    results = measure(config)
    command = " ".join(["python", "benchmarks/ofa_step.py",
                        *map(shlex.quote, sys.argv[1:] if argv is None else argv)])
    text = render_markdown(results, command)
    print(text)
    if args.markdown:
        write_atomic(args.markdown, text)
    if args.json:
        write_atomic(args.json, json.dumps(results, indent=1))
    return results


if __name__ == "__main__":
    main()
