"""Benchmark of one ``Distiller`` training step against the student's own step plus a teacher forward.

Four CNN pairs, seeded random 3×32×32 inputs in batches of 128, 10 classes, float32, AdamW; the hint
sits between the middle stages (the ``distill`` report's rule). The share a FitNet hint adds depends
on how big its projector (1×1 conv + BatchNorm when widths differ) is next to the student, so the
pairs run from realistic to a stress case:

- **r50-r18** (the headline): timm ``resnet50`` → ``resnet18``, hint ``layer2`` (512 vs 128 channels:
  a 1×1-conv + BatchNorm projector) — a standard distillation pair;
- **r34-r18**: timm ``resnet34`` → ``resnet18``, hint ``layer2`` (equal widths: no projector);
- **vgg6**: ``bench_cnn`` (six conv3x3-BN-ReLU blocks, widths 32–128) → the same at half width, hint
  ``blocks.2``;
- **cnn3** (the stress case): ``cnn`` widths (32, 64, 128) → (16, 32, 64), one conv per stage, hint
  ``blocks.1``: the projector is about half as many multiply-adds as one of the student's three
  convolutions, so it is a large share of the step by construction.

Per pair, four steps (forward + backward + optimizer step) timed in turn (a, k, b, c, a, k, b, c, ...),
so that load changing over time hits all alike:

- **(a) baseline**: the student's cross-entropy step plus a teacher forward under ``no_grad`` — the
  least any distillation step must do;
- **(k) Distiller, KD only**: ``Distiller(teacher, student, {"kd": KD(T=4)})`` — the Distiller's
  machinery with a term that costs next to nothing;
- **(b) Distiller**: ``Distiller(teacher, student, {"kd": KD(T=4), "hint": FitNet()}, layers={"hint":
  (stage, stage)})``, ``total.backward()``, ``optimizer.step()``;
- **(c) hand-written**: the same two terms and projector, features read by forward hooks registered
  once, no Distiller — what (b) would cost without its bookkeeping (capture, checks, parts dict).

Overhead = median(b) / median(a) − 1 (target ≤ 10 %); (b) / (c) − 1 is the Distiller's own share.

    python benchmarks/distill_step.py --markdown reports/results/distill_benchmark.md
    python benchmarks/distill_step.py --device cuda
    python benchmarks/distill_step.py --tiny          # smoke size, seconds
"""
from __future__ import annotations

import argparse
import copy
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

from machine import cpu_model, save_outputs

PAIRS = {  # teacher and student: (models.create name, its arguments); hint: the stage on both sides
    "r50-r18": dict(teacher=("resnet50", {}), student=("resnet18", {}), hint="layer2",
                    label="timm `resnet50` → `resnet18` (512 vs 128 channels)"),
    "r34-r18": dict(teacher=("resnet34", {}), student=("resnet18", {}), hint="layer2",
                    label="timm `resnet34` → `resnet18` (equal widths: no projector)"),
    "vgg6": dict(teacher=("bench_cnn", dict(width_mult=1.0)), student=("bench_cnn", dict(width_mult=0.5)),
                 hint="blocks.2", label="`bench_cnn` ×1.0 → ×0.5 (6 convs each)"),
    "cnn3": dict(teacher=("cnn", dict(widths=(32, 64, 128))), student=("cnn", dict(widths=(16, 32, 64))),
                 hint="blocks.1", label="`cnn` (32, 64, 128) → (16, 32, 64) (3 convs each)"),
}
FULL = dict(pairs=tuple(PAIRS), batch_size=128, size=32, steps=60, warmup=10)
TINY = dict(pairs=tuple(PAIRS), batch_size=8, size=16, steps=3, warmup=1)


def build(config: dict[str, Any], pair: str, seed: int = 0) -> dict[str, Any]:
    """The models, the data, and the four step functions of ``pair`` (each runs one full training step)."""
    from workbench import models
    from workbench.losses import KD, FitNet
    from workbench.train import Distiller

    spec, device = PAIRS[pair], torch.device(config["device"])
    torch.manual_seed(seed)

    def make(side: tuple[str, dict[str, Any]]) -> torch.nn.Module:
        name, kwargs = side
        return models.create_sized(name, config["size"], **kwargs, in_chans=3, num_classes=10).to(device)

    teacher = make(spec["teacher"]).eval().requires_grad_(False)
    inputs = torch.randn(config["batch_size"], 3, config["size"], config["size"], device=device)
    targets = torch.randint(0, 10, (config["batch_size"],), device=device)
    batch, hint_layers = (inputs, targets), (spec["hint"], spec["hint"])

    # (a) the student's own step and a teacher forward
    student_a = make(spec["student"]).train()
    optimizer_a = torch.optim.AdamW(student_a.parameters(), lr=1e-3)

    def baseline() -> None:
        with torch.no_grad():
            teacher(inputs)
        loss = F.cross_entropy(student_a(inputs), targets)
        optimizer_a.zero_grad(set_to_none=True)
        loss.backward()
        optimizer_a.step()

    def distiller_step(terms: dict[str, Any], layers: dict[str, tuple[str, str]]) -> Any:
        distiller = Distiller(teacher, make(spec["student"]).train(), terms, layers=layers, example=batch).train()
        optimizer = torch.optim.AdamW(distiller.trainable_parameters(), lr=1e-3)

        def step() -> None:
            total, _ = distiller.step(batch)
            optimizer.zero_grad(set_to_none=True)
            total.backward()
            optimizer.step()

        return step

    # (k) and (b): the Distiller
    kd_only = distiller_step({"kd": (KD(T=4.0), 1.0)}, {})
    full = distiller_step({"kd": (KD(T=4.0), 1.0), "hint": (FitNet(), 1.0)}, {"hint": hint_layers})

    # (c) the same terms by hand: hooks registered once, features kept in a dict
    # (own teacher copy, so that its hook does not fire in the other steps)
    teacher_c, student_c = copy.deepcopy(teacher), make(spec["student"]).train()
    kd, hint = KD(T=4.0), FitNet()
    features: dict[str, torch.Tensor] = {}
    hooks = [teacher_c.get_submodule(hint_layers[0]).register_forward_hook(lambda m, i, o: features.__setitem__("teacher", o)),
             student_c.get_submodule(hint_layers[1]).register_forward_hook(lambda m, i, o: features.__setitem__("student", o))]
    with torch.no_grad():
        teacher_c(inputs), student_c(inputs)
    hint.build(features["student"], features["teacher"])
    hint.to(device).train()
    optimizer_c = torch.optim.AdamW([*student_c.parameters(), *hint.parameters()], lr=1e-3)

    def by_hand() -> None:
        with torch.no_grad():
            teacher_logits = teacher_c(inputs)
        student_logits = student_c(inputs)
        total = (F.cross_entropy(student_logits, targets) + kd(student_logits, teacher_logits)
                 + hint(features["student"], features["teacher"]))
        optimizer_c.zero_grad(set_to_none=True)
        total.backward()
        optimizer_c.step()

    return {"baseline": baseline, "kd_only": kd_only, "distiller": full, "by_hand": by_hand,
            "device": device, "hooks": hooks}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def measure_pair(config: dict[str, Any], pair: str) -> dict[str, Any]:
    """Warm up, then time ``steps`` rounds of the four steps of ``pair`` in turn: raw seconds, medians, ratios."""
    subjects = build(config, pair)
    device, hooks = subjects.pop("device"), subjects.pop("hooks")
    seconds: dict[str, list[float]] = {name: [] for name in subjects}
    try:
        for round_index in range(config["warmup"] + config["steps"]):
            for name, step in subjects.items():
                _sync(device)
                started = time.perf_counter()
                step()
                _sync(device)
                if round_index >= config["warmup"]:
                    seconds[name].append(time.perf_counter() - started)
    finally:
        for hook in hooks:
            hook.remove()
    medians = {name: statistics.median(values) for name, values in seconds.items()}
    return {
        "seconds": seconds,
        "median_seconds": medians,
        "overhead": medians["distiller"] / medians["baseline"] - 1,
        "kd_only_overhead": medians["kd_only"] / medians["baseline"] - 1,
        "distiller_vs_by_hand": medians["distiller"] / medians["by_hand"] - 1,
        "by_hand_overhead": medians["by_hand"] / medians["baseline"] - 1,
    }


def measure(config: dict[str, Any]) -> dict[str, Any]:
    """Every pair of ``config["pairs"]`` measured in turn (see :func:`measure_pair`), with the machine and load."""
    torch.set_num_threads(config["threads"])
    load_before = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    pairs = {pair: measure_pair(config, pair) for pair in config["pairs"]}
    return {
        "config": {key: list(value) if isinstance(value, tuple) else value for key, value in config.items()},
        "pairs": pairs,
        "overhead": pairs[config["pairs"][0]]["overhead"],
        "load_average": [load_before, os.getloadavg()[0] if hasattr(os, "getloadavg") else None],
        "machine": machine(config["device"]),
    }


def machine(device: str) -> dict[str, str]:
    """What the numbers were measured on."""
    accelerator = torch.cuda.get_device_name() if device.startswith("cuda") else "none (CPU)"
    return {"cpu": cpu_model(), "accelerator": accelerator,
            "software": f"torch {torch.__version__}, Python {platform.python_version()}, {platform.platform()}"}


def render_markdown(results: dict[str, Any], command: str = "") -> str:
    """The committed table: machine, workload, medians and overheads per pair; the first pair is the headline."""
    config, load = results["config"], results["load_average"]
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
        f"Workload: batch {config['batch_size']}, 3×{config['size']}×{config['size']} random inputs, 10 classes, "
        f"float32, AdamW. Each step is forward + backward + optimizer step; the four steps of a pair are timed "
        f"in turn, {config['steps']} rounds after {config['warmup']} warm-up rounds; medians.",
        "",
        "| pair | step | median ms | min–max ms | vs (a) |", "|---|---|---|---|---|",
    ]
    for pair, measured in results["pairs"].items():
        spec, medians = PAIRS[pair], measured["median_seconds"]
        labels = {
            "baseline": "(a) student CE step + teacher forward (`no_grad`)",
            "kd_only": "(k) `Distiller`: CE + KD(T=4)",
            "distiller": f"(b) `Distiller`: CE + KD(T=4) + FitNet hint `{spec['hint']}`→`{spec['hint']}`",
            "by_hand": "(c) the same terms as (b) by hand (hooks registered once, no Distiller)",
        }
        for name, label in labels.items():
            values = measured["seconds"][name]
            lines.append(f"| {pair}: {spec['label']} | {label} | {1000 * medians[name]:.2f} | "
                         f"{1000 * min(values):.2f}–{1000 * max(values):.2f} | {medians[name] / medians['baseline']:.3f} |")
    lines.append("")
    for index, (pair, measured) in enumerate(results["pairs"].items()):
        verdict = "within" if measured["overhead"] <= 0.10 else "above"
        lead = "**" if index == 0 else ""
        lines.append(
            f"- {lead}{pair}: overhead of the Distiller step over (a) {100 * measured['overhead']:+.1f} %{lead} "
            f"(target ≤ 10 %: {verdict}). KD alone through the Distiller (k): {100 * measured['kd_only_overhead']:+.1f} %; "
            f"the same terms by hand (c): {100 * measured['by_hand_overhead']:+.1f} %; the Distiller's own "
            f"bookkeeping, (b) vs (c): {100 * measured['distiller_vs_by_hand']:+.1f} %."
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Parse the command line, measure, print (and write) the table; returns the results."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--steps", type=int, default=None, help="timed rounds (default 60; --tiny: 3)")
    parser.add_argument("--warmup", type=int, default=None)
    parser.add_argument("--batch-size", type=int, default=None)
    parser.add_argument("--pairs", nargs="+", choices=list(PAIRS), help="model pairs (default: all; the first is the headline)")
    parser.add_argument("--tiny", action="store_true", help="smoke size: batch 8, 16×16, 3 rounds")
    parser.add_argument("--markdown", help="write the table here")
    parser.add_argument("--json", help="write the raw measurements here")
    args = parser.parse_args(argv)
    config = dict(TINY if args.tiny else FULL, device=args.device, threads=args.threads)
    for key in ("steps", "warmup", "batch_size", "pairs"):
        if getattr(args, key) is not None:
            config[key] = getattr(args, key)
    results = measure(config)
    command = " ".join(["python", "benchmarks/distill_step.py", *map(shlex.quote, sys.argv[1:] if argv is None else argv)])
    print(save_outputs(results, lambda numbers: render_markdown(numbers, command), json_path=args.json,
                       markdown_path=args.markdown))
    return results


if __name__ == "__main__":
    main()
