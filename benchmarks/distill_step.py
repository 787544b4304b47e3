"""Benchmark of one ``Distiller`` training step against the student's own step plus a teacher forward.

Workload: teacher ``cnn`` widths (32, 64, 128), student ``cnn`` widths (16, 32, 64), seeded random
3×32×32 inputs in batches of 128, 10 classes, float32, AdamW. Three steps, each forward + backward +
optimizer step, timed in turn (a, b, c, a, b, c, ...) so that load changing over time hits all alike:

- **(a) baseline**: the student's cross-entropy step plus a teacher forward under ``no_grad`` — the
  least any distillation step must do;
- **(b) Distiller**: ``Distiller(teacher, student, {"kd": KD(T=4), "hint": FitNet()}, layers={"hint":
  ("blocks.1", "blocks.1")})``, ``total.backward()``, ``optimizer.step()``;
- **(c) hand-written**: the same two terms and projector, features read by forward hooks registered
  once, no Distiller — what (b) would cost without its bookkeeping (capture, checks, parts dict).

Overhead = median(b) / median(a) − 1 (target ≤ 10 %); (b) / (c) − 1 is the Distiller's own share.

    python benchmarks/distill_step.py --markdown reports/results/distill_benchmark.md
    python benchmarks/distill_step.py --device cuda
    python benchmarks/distill_step.py --tiny          # smoke size, seconds
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import statistics
import sys
import time
from datetime import date
from typing import Any

import torch
import torch.nn.functional as F

from machine import cpu_model

FULL = dict(teacher_widths=(32, 64, 128), student_widths=(16, 32, 64), batch_size=128, size=32, steps=60, warmup=10)
TINY = dict(teacher_widths=(8, 16), student_widths=(4, 8), batch_size=8, size=16, steps=3, warmup=1)
HINT = ("blocks.1", "blocks.1")


def build(config: dict[str, Any], seed: int = 0) -> dict[str, Any]:
    """The models, the data, and the three step functions (each runs one full training step)."""
    from workbench import models
    from workbench.losses import KD, FitNet
    from workbench.train import Distiller

    device = torch.device(config["device"])
    torch.manual_seed(seed)
    make = lambda widths: models.create("cnn", widths=widths, in_chans=3, num_classes=10,  # noqa: E731
                                        img_size=config["size"]).to(device)
    teacher = make(config["teacher_widths"]).eval().requires_grad_(False)
    inputs = torch.randn(config["batch_size"], 3, config["size"], config["size"], device=device)
    targets = torch.randint(0, 10, (config["batch_size"],), device=device)
    batch = (inputs, targets)

    # (a) the student's own step and a teacher forward
    student_a = make(config["student_widths"]).train()
    optimizer_a = torch.optim.AdamW(student_a.parameters(), lr=1e-3)

    def baseline() -> None:
        with torch.no_grad():
            teacher(inputs)
        loss = F.cross_entropy(student_a(inputs), targets)
        optimizer_a.zero_grad(set_to_none=True)
        loss.backward()
        optimizer_a.step()

    # (b) the Distiller
    student_b = make(config["student_widths"]).train()
    distiller = Distiller(teacher, student_b, {"kd": (KD(T=4.0), 1.0), "hint": (FitNet(), 1.0)},
                          layers={"hint": HINT}, example=batch).train()
    optimizer_b = torch.optim.AdamW(distiller.trainable_parameters(), lr=1e-3)

    def distiller_step() -> None:
        total, _ = distiller.step(batch)
        optimizer_b.zero_grad(set_to_none=True)
        total.backward()
        optimizer_b.step()

    # (c) the same terms by hand: hooks registered once, features kept in a dict
    student_c = make(config["student_widths"]).train()
    kd, hint = KD(T=4.0), FitNet()
    features: dict[str, torch.Tensor] = {}
    teacher.get_submodule(HINT[0]).register_forward_hook(lambda m, i, o: features.__setitem__("teacher", o))
    student_c.get_submodule(HINT[1]).register_forward_hook(lambda m, i, o: features.__setitem__("student", o))
    with torch.no_grad():
        teacher(inputs), student_c(inputs)
    hint.build(features["student"], features["teacher"])
    hint.to(device).train()
    optimizer_c = torch.optim.AdamW([*student_c.parameters(), *hint.parameters()], lr=1e-3)

    def by_hand() -> None:
        with torch.no_grad():
            teacher_logits = teacher(inputs)
        student_logits = student_c(inputs)
        total = (F.cross_entropy(student_logits, targets) + kd(student_logits, teacher_logits)
                 + hint(features["student"], features["teacher"]))
        optimizer_c.zero_grad(set_to_none=True)
        total.backward()
        optimizer_c.step()

    return {"baseline": baseline, "distiller": distiller_step, "by_hand": by_hand, "device": device}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def measure(config: dict[str, Any]) -> dict[str, Any]:
    """Warm up, then time ``steps`` rounds of (a), (b), (c) in turn; returns the raw seconds and medians."""
    torch.set_num_threads(config["threads"])
    subjects = build(config)
    device = subjects.pop("device")
    seconds: dict[str, list[float]] = {name: [] for name in subjects}
    load_before = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    for round_index in range(config["warmup"] + config["steps"]):
        for name, step in subjects.items():
            _sync(device)
            started = time.perf_counter()
            step()
            _sync(device)
            if round_index >= config["warmup"]:
                seconds[name].append(time.perf_counter() - started)
    medians = {name: statistics.median(values) for name, values in seconds.items()}
    return {
        "config": {key: list(value) if isinstance(value, tuple) else value for key, value in config.items()},
        "seconds": seconds,
        "median_seconds": medians,
        "overhead": medians["distiller"] / medians["baseline"] - 1,
        "distiller_vs_by_hand": medians["distiller"] / medians["by_hand"] - 1,
        "by_hand_overhead": medians["by_hand"] / medians["baseline"] - 1,
        "load_average": [load_before, os.getloadavg()[0] if hasattr(os, "getloadavg") else None],
        "machine": machine(config["device"]),
    }


def machine(device: str) -> dict[str, str]:
    """What the numbers were measured on."""
    accelerator = torch.cuda.get_device_name() if device.startswith("cuda") else "none (CPU)"
    return {"cpu": cpu_model(), "accelerator": accelerator,
            "software": f"torch {torch.__version__}, Python {platform.python_version()}, {platform.platform()}"}


def render_markdown(results: dict[str, Any], command: str = "") -> str:
    """The committed table: machine, workload, medians, overheads."""
    config, medians = results["config"], results["median_seconds"]
    spread = {name: (min(values), max(values)) for name, values in results["seconds"].items()}
    load = results["load_average"]
    lines = ["# `Distiller` step benchmark", ""]
    if command:
        lines += [f"Made by `{command}` on {date.today().isoformat()}.", ""]
    lines += [
        "| machine | |", "|---|---|",
        f"| CPU | {results['machine']['cpu']}, torch threads {config['threads']} |",
        f"| device | {config['device']} ({results['machine']['accelerator']}) |",
        f"| software | {results['machine']['software']} |",
        f"| load | 1-min load average {load[0]:.2f} before, {load[1]:.2f} after the run |" if None not in load else "| load | unknown |",
        "",
        f"Workload: teacher `cnn` widths {tuple(config['teacher_widths'])}, student `cnn` widths "
        f"{tuple(config['student_widths'])}, batch {config['batch_size']}, 3×{config['size']}×{config['size']} "
        f"random inputs, 10 classes, float32, AdamW. Each step is forward + backward + optimizer step; the three "
        f"are timed in turn, {config['steps']} rounds after {config['warmup']} warm-up rounds; medians.",
        "",
        "| step | median ms | min–max ms | vs (a) |", "|---|---|---|---|",
    ]
    labels = {
        "baseline": "(a) student CE step + teacher forward (`no_grad`)",
        "distiller": "(b) `Distiller`: CE + KD(T=4) + FitNet hint `blocks.1`→`blocks.1`",
        "by_hand": "(c) the same terms by hand (hooks registered once, no Distiller)",
    }
    for name, label in labels.items():
        low, high = spread[name]
        lines.append(f"| {label} | {1000 * medians[name]:.2f} | {1000 * low:.2f}–{1000 * high:.2f} | "
                     f"{medians[name] / medians['baseline']:.3f} |")
    verdict = "within" if results["overhead"] <= 0.10 else "above"
    lines += [
        "",
        f"**Overhead of the Distiller step over (a): {100 * results['overhead']:+.1f} %** (target ≤ 10 %: {verdict}). "
        f"Of that, the two terms and the projector themselves cost {100 * results['by_hand_overhead']:+.1f} % "
        f"(c vs a), and the Distiller's own bookkeeping (capture hooks, checks) "
        f"{100 * results['distiller_vs_by_hand']:+.1f} % (b vs c).",
    ]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Parse the command line, measure, print (and write) the table; returns the results."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--steps", type=int, default=None, help="timed rounds (default 60; --tiny: 3)")
    parser.add_argument("--warmup", type=int, default=None)
    parser.add_argument("--batch-size", type=int, default=None)
    parser.add_argument("--tiny", action="store_true", help="smoke size: small models, batch 8, 16×16")
    parser.add_argument("--markdown", help="write the table here")
    parser.add_argument("--json", help="write the raw measurements here")
    args = parser.parse_args(argv)
    config = dict(TINY if args.tiny else FULL, device=args.device, threads=args.threads)
    for key in ("steps", "warmup", "batch_size"):
        if getattr(args, key) is not None:
            config[key] = getattr(args, key)
    results = measure(config)
    command = " ".join(["python", "benchmarks/distill_step.py", *map(shlex.quote, sys.argv[1:] if argv is None else argv)])
    text = render_markdown(results, command)
    print(text)
    if args.markdown:
        with open(args.markdown, "w", encoding="utf-8") as handle:
            handle.write(text)
    if args.json:
        with open(args.json, "w", encoding="utf-8") as handle:
            json.dump(results, handle, indent=1)
    return results


if __name__ == "__main__":
    main()
