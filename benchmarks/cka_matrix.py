"""Benchmark of ``workbench.similarity.cka_matrix`` on workload W1: time over the bare forward passes, the
FLOP floor of that ratio, peak memory at two dataset sizes, and peer CKA packages on the same workload.

W1: teacher ``bench_cnn`` (width 1), student ``bench_cnn`` (width 0.5), the 8 modules ``blocks.0..5``,
``pool``, ``head`` hooked in each, seeded random 3×32×32 inputs in batches of 200, float32, eval mode.

    python benchmarks/cka_matrix.py --markdown reports/results/cka_benchmark.md   # CPU, full size
    python benchmarks/cka_matrix.py --device cuda --markdown ...                  # GPU
    python benchmarks/cka_matrix.py --quick                                       # smoke size
    python benchmarks/cka_matrix.py --profile                                     # where cka_matrix spends time
    python benchmarks/cka_matrix.py --no-peers --against HEAD --batch-size 1024   # this tree against a commit

Timing is interleaved in one process per subject: each round runs (a) the bare forward passes, (b) ``cka_matrix``,
(b₀) ``cka_matrix`` as committed at ``--against`` (if given), (b16) ``cka_matrix(..., precision="bf16")``, (c) the
Gram products alone and (a′) the hooked forward passes, one after the other (A B A B …), so every ratio is paired
within a round and reported with its spread. Each run's minor page faults (``ru_minflt`` deltas) are recorded:
glibc returns freed activation memory to the kernel (``mmap`` / trim thresholds), so a loop that frees and
re-allocates its activations page-faults them in again; ``GLIBC_TUNABLES=glibc.malloc.mmap_max=0`` (inherited by the workers) keeps that memory.

Every measurement runs in a fresh subprocess (``--worker``), so peak memory is that measurement's own and
the peers' leftover hooks never touch another measurement. Values are checked against a float64
reference of the same minibatch estimator, written here apart from ``workbench.probes.kernels``.
This file is a single script on purpose: the workers re-run it, so it is longer than the usual module.
"""
from __future__ import annotations

import argparse
import copy
import importlib
import json
import os
import platform
import resource
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
import types
import warnings
from contextlib import contextmanager
from datetime import date
from importlib import metadata

import numpy as np
import torch
from torch.utils.data import DataLoader, TensorDataset

from machine import cpu_model, save_outputs, serve_worker

LAYERS = [f"blocks.{index}" for index in range(6)] + ["pool", "head"]
# distribution name -> (what its W1 run calls, the estimator it implements, read from its source)
PEERS = {
    "torch-cka": ("`CKA(...).compare(loader)`",
                  "minibatch unbiased HSIC (Nguyen et al. eq. 3, trace form) on uncentred float32 Grams, "
                  "float32 sums; runs the models with autograd on"),
    "cka-pytorch": ("`CKACalculator(...).calculate_cka_matrix(loader, num_epochs=1)`",
                    "minibatch unbiased HSIC (trace form, `bmm`) on uncentred float32 Grams made in the hook, "
                    "float32 sums, ε=1e-4 added under the square root"),
    "ckatorch": ("`CKA(...)(loader, epochs=1)`",
                 "documented as Nguyen et al.'s minibatch CKA; each batch's value overwrites the last, "
                 "and features must be `[k, n, d]`"),
}
OURS_ESTIMATOR = ("minibatch unbiased HSIC (Nguyen et al. 2021) on column-centred float32 Grams, "
                  "U-centred and summed in float64, normalised once")
FULL = dict(n_samples=2000, big_n_samples=20000, batch_size=200, repeats=5, reference_subset=400)
QUICK = dict(n_samples=400, big_n_samples=1200, batch_size=200, repeats=2, reference_subset=200)


# ----------------------------------------------------------------------------------------------- workload
def build_models(device: str, seed: int = 0) -> tuple[torch.nn.Module, torch.nn.Module]:
    """W1's teacher and student, freshly initialised from ``seed``, in eval mode on ``device``."""
    from workbench.models import create

    torch.manual_seed(seed)
    teacher = create("bench_cnn", width_mult=1.0).eval().to(device)
    student = create("bench_cnn", width_mult=0.5).eval().to(device)
    return teacher, student


def make_loader(n_samples: int, batch_size: int, seed: int = 0) -> DataLoader:
    """Seeded random 3×32×32 inputs with dummy labels: ``(x, y)`` batches, the form every peer accepts."""
    inputs = torch.randn(n_samples, 3, 32, 32, generator=torch.Generator().manual_seed(seed))
    return DataLoader(TensorDataset(inputs, torch.zeros(n_samples, dtype=torch.long)), batch_size=batch_size)


def synchronize(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def last_child_name(model: torch.nn.Module, name: str) -> str:
    """cka-pytorch never hooks an ``nn.Sequential``; its last child emits the same tensor."""
    module = model.get_submodule(name)
    while isinstance(module, (torch.nn.Sequential, torch.nn.ModuleList)) and len(module):
        name, module = f"{name}.{len(module) - 1}", module[len(module) - 1]
    return name


# ----------------------------------------------------------------------------------------------- subjects
def run_forward(teacher, student, loader, device):
    """(a) the forward passes alone: both models, the same batches, no autograd."""
    with torch.no_grad():
        for inputs, _ in loader:
            inputs = inputs.to(device)
            teacher(inputs)
            student(inputs)
    synchronize(device)


def run_ours(teacher, student, loader, device, precision="full"):
    """(b) ``cka_matrix``, debiased linear, progress off; (b16) the same with ``precision="bf16"``."""
    from workbench.similarity import cka_matrix

    result = cka_matrix(teacher, student, loader, LAYERS, LAYERS, kernel="linear", debiased=True,
                        device=device, batch_size=loader.batch_size, progress=False, precision=precision)
    return {"values": result.values}


def run_torch_cka(teacher, student, loader, device):
    from torch_cka import CKA

    cka = CKA(teacher, student, "teacher", "student", LAYERS, LAYERS, device=device)
    try:
        cka.compare(loader, loader)
    except AssertionError as error:  # it asserts "no NaN" after filling the matrix: keep the matrix
        return {"values": cka.hsic_matrix.detach().double().numpy(), "error": f"AssertionError: {error}"}
    return {"values": cka.export()["CKA"].detach().double().numpy()}


def run_cka_pytorch(teacher, student, loader, device):
    from cka_pytorch import CKACalculator

    calculator = CKACalculator(
        teacher, student, [last_child_name(teacher, name) for name in LAYERS],
        [last_child_name(student, name) for name in LAYERS], device=torch.device(device), verbose=False,
    )
    values = calculator.calculate_cka_matrix(loader, num_epochs=1)
    # the same sums without its ε (a private method, called only to separate ε from the estimator)
    without_epsilon = calculator._compute_final_cka(0.0)
    calculator.hook_manager1.clear_all()
    calculator.hook_manager2.clear_all()
    return {"values": values.cpu().double().numpy(), "values_epsilon_0": without_epsilon.cpu().double().numpy()}


def run_ckatorch(teacher, student, loader, device):
    from ckatorch import CKA

    cka = CKA(teacher, student, LAYERS, LAYERS, "teacher", "student", device=device)
    values = cka(loader, epochs=1, f_extract=lambda batch: {"x": batch[0]}, f_args={})
    return {"values": values.cpu().double().numpy()}


SUBJECTS = {"forward": run_forward, "ours": run_ours, "torch-cka": run_torch_cka,
            "cka-pytorch": run_cka_pytorch, "ckatorch": run_ckatorch}


def cka_matrix_at(ref: str):
    """``cka_matrix`` as committed at git ``ref``: its ``cka_stream.py`` and ``kernels.py`` from that commit,
    loaded under their own module names; everything else (capture, batching) from this tree."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    modules = {}
    for name in ("kernels", "cka_stream"):
        text = subprocess.run(["git", "-C", root, "show", f"{ref}:workbench/probes/{name}.py"], check=True,
                              capture_output=True, text=True).stdout
        text = text.replace("from workbench.probes.kernels import", "from _at_ref_kernels import")
        module = types.ModuleType(f"_at_ref_{name}")
        sys.modules[module.__name__] = module  # before exec: its own annotations and imports resolve
        exec(compile(text, f"{ref}:workbench/probes/{name}.py", "exec"), module.__dict__)
        modules[name] = module
    return modules["cka_stream"].cka_matrix


def baseline_subject(ref: str):
    """(b₀) ``cka_matrix`` at ``ref``, called exactly as (b)."""
    cka_matrix = cka_matrix_at(ref)

    def run_baseline(teacher, student, loader, device):
        result = cka_matrix(teacher, student, loader, LAYERS, LAYERS, kernel="linear", debiased=True,
                            device=device, batch_size=loader.batch_size, progress=False)
        return {"values": result.values}

    return run_baseline


def captured_features(teacher, student, inputs):
    """The flattened ``[n, d]`` activations of the 8 layers of each model for one batch."""
    from workbench.capture import capture

    features = []
    with torch.no_grad():
        for model in (teacher, student):
            with capture(model, LAYERS) as activations:
                model(inputs)
                features.append(list(activations.flat().values()))
    return features


def run_forward_hooked(teacher, student, loader, device):
    """(a′) the forward passes with the 16 capture hooks that (b) uses, holding each batch's activations."""
    from workbench.capture import capture

    with torch.no_grad(), capture(teacher, LAYERS), capture(student, LAYERS):
        run_forward(teacher, student, loader, device)


def run_grams(features, n_batches, device):
    """The Gram products alone: one float32 ``X Xᵀ`` per hooked layer per batch (features of one batch)."""
    for _ in range(n_batches):
        for value in (*features[0], *features[1]):
            value @ value.T
    synchronize(device)


# ---------------------------------------------------------------------------------------------- reference
def zero_diagonal_grams(features: list[torch.Tensor]) -> torch.Tensor:
    """``[L, n, n]`` float64 linear Grams of column-centred features, diagonal zeroed."""
    grams = []
    for value in features:
        value = value.reshape(value.shape[0], -1).double()
        value = value - value.mean(dim=0, keepdim=True)
        grams.append((value @ value.T).fill_diagonal_(0))
    return torch.stack(grams)


class ReferenceCKA:
    """Float64 minibatch CKA: Song et al.'s unbiased HSIC in its trace form, summed over batches,
    normalised once (Nguyen et al. 2021). Independent of ``workbench.probes.kernels``, which U-centres;
    column centring is exact for this estimator and only keeps float64 well conditioned."""

    def __init__(self):
        self.cross = self.teacher_self = self.student_self = 0.0

    @staticmethod
    def hsic(trace, total_x, total_y, rows_dot, n):
        return (trace + total_x * total_y / ((n - 1) * (n - 2)) - 2 * rows_dot / (n - 2)) / (n * (n - 3))

    def update(self, teacher_features, student_features):
        grams_x, grams_y = zero_diagonal_grams(teacher_features), zero_diagonal_grams(student_features)
        n = grams_x.shape[-1]
        rows_x, rows_y = grams_x.sum(-1), grams_y.sum(-1)
        totals_x, totals_y = rows_x.sum(-1), rows_y.sum(-1)
        self.cross = self.cross + self.hsic(torch.einsum("aij,bij->ab", grams_x, grams_y), totals_x[:, None],
                                            totals_y[None, :], rows_x @ rows_y.T, n)
        self.teacher_self = self.teacher_self + self.hsic(grams_x.square().sum((1, 2)), totals_x, totals_x,
                                                          rows_x.square().sum(-1), n)
        self.student_self = self.student_self + self.hsic(grams_y.square().sum((1, 2)), totals_y, totals_y,
                                                          rows_y.square().sum(-1), n)

    def values(self) -> np.ndarray:
        return (self.cross / torch.sqrt(torch.outer(self.teacher_self, self.student_self))).cpu().numpy()


def reference_values(teacher, student, loader, device, n_samples=None) -> np.ndarray:
    """The float64 reference over ``loader`` (first ``n_samples`` only if given); models of any dtype."""
    reference, seen, dtype = ReferenceCKA(), 0, next(teacher.parameters()).dtype
    for inputs, _ in loader:
        if n_samples is not None:
            if seen >= n_samples:
                break
            inputs = inputs[: n_samples - seen]
        teacher_features, student_features = captured_features(teacher, student, inputs.to(device, dtype))
        reference.update(teacher_features, student_features)
        seen += len(inputs)
    return reference.values()


def compare_to_reference(values, reference, tolerance: float = 0.01) -> dict:
    """Max |difference| over finite entries and counts of the pathologies CKA libraries show."""
    values, reference = np.asarray(values, dtype=np.float64), np.asarray(reference, dtype=np.float64)
    finite = np.isfinite(values)
    difference = np.abs(np.where(finite, values, 0.0) - reference)
    return {
        "max_abs_diff": float(difference[finite].max()) if finite.any() else float("nan"),
        "n_off": int((~finite | (difference > tolerance)).sum()),
        "n_nan": int((~finite).sum()),
        "n_zero": int((finite & (np.abs(values) < 1e-6) & (np.abs(reference) >= tolerance)).sum()),
        "n_one": int((finite & (np.abs(values - 1) < 1e-6) & (np.abs(reference - 1) >= tolerance)).sum()),
        "n_out_of_range": int((finite & (np.abs(values) > 1 + 1e-6)).sum()),
        "n_entries": int(values.size),
    }


# ------------------------------------------------------------------------------------------------- FLOPs
def flop_budget(batch_size: int, n_samples: int) -> dict:
    """Forward MACs (FlopCounterMode, convs and linears) and Gram MACs n²·d per layer per batch, W1."""
    from torch.utils.flop_counter import FlopCounterMode

    teacher, student = build_models("cpu")
    inputs = torch.zeros(batch_size, 3, 32, 32)
    forward, dims = {}, {}
    for role, model in (("teacher", teacher), ("student", student)):
        with FlopCounterMode(display=False) as counter, torch.no_grad():
            model(inputs)
        forward[role] = counter.get_total_flops() // 2 // batch_size  # per sample
    for role, features in zip(("teacher", "student"), captured_features(teacher, student, inputs[:2])):
        dims[role] = sum(value.shape[1] for value in features)
    sizes = [batch_size] * (n_samples // batch_size) + ([n_samples % batch_size] if n_samples % batch_size else [])
    forward_total = (forward["teacher"] + forward["student"]) * n_samples
    gram_total = sum(n * n for n in sizes) * (dims["teacher"] + dims["student"])
    return {"forward_macs_per_sample": forward, "feature_dims": dims, "forward_macs": forward_total,
            "gram_macs": gram_total, "floor_full": 1 + gram_total / forward_total,
            "floor_symmetric": 1 + gram_total / 2 / forward_total}


# ------------------------------------------------------------------------------------------------ workers
def peak_rss_reset() -> bool:
    """Reset the kernel's peak-RSS mark (Linux ``clear_refs``); False where that is not possible."""
    try:
        with open("/proc/self/clear_refs", "w") as handle:
            handle.write("5")
        return True
    except OSError:
        return False


def rss_bytes(peak: bool) -> int:
    """Current or peak resident set size: Linux ``/proc/self/status``, else psutil / ``ru_maxrss``."""
    try:
        with open("/proc/self/status") as handle:
            fields = dict(line.split(":", 1) for line in handle if ":" in line)
        return int(fields["VmHWM" if peak else "VmRSS"].split()[0]) * 1024
    except OSError:
        if not peak:
            import psutil

            return psutil.Process().memory_info().rss
        import resource

        maxrss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return maxrss if sys.platform == "darwin" else maxrss * 1024


def timed(function, *args):
    start = time.perf_counter()
    output = function(*args)
    return time.perf_counter() - start, output


def faulted(function, *args) -> tuple[float, int, object]:
    """(seconds, minor page faults of this process, output) of one call."""
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    seconds, output = timed(function, *args)
    return seconds, resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before, output


def worker(job: dict) -> dict:
    """One measurement in this (fresh) process: ``time`` (warm-up + repeats, forward interleaved),
    ``memory`` (one run, peak growth) or ``reference`` (float64 values)."""
    torch.set_num_threads(job["threads"])
    warnings.simplefilter("ignore")
    device, subject = job["device"], job.get("subject")
    teacher, student = build_models(device)
    loader = make_loader(job["n_samples"], job["batch_size"])
    if job["kind"] == "reference":
        return reference_job(teacher, student, loader, job)
    function = baseline_subject(job["against"]) if subject == "baseline" else SUBJECTS[subject]
    # peers leave hooks behind: each of their runs gets fresh copies of the same weights
    fresh = (lambda: (teacher, student)) if subject in ("forward", "ours") else (
        lambda: (copy.deepcopy(teacher), copy.deepcopy(student)))
    out: dict = {"subject": subject, "n_samples": job["n_samples"]}
    try:
        if job["kind"] == "memory":
            if subject in PEERS:  # its imports are not the run's memory
                importlib.import_module(subject.replace("-", "_"))
            models = fresh()
            base_rss, out["peak_reset"] = rss_bytes(peak=False), peak_rss_reset()
            if device.startswith("cuda"):
                torch.cuda.reset_peak_memory_stats()
                base_cuda = torch.cuda.memory_allocated()
            out["seconds"], _ = timed(function, *models, loader, device)
            out["rss_peak_bytes"] = rss_bytes(peak=True)
            out["rss_growth_bytes"] = out["rss_peak_bytes"] - base_rss
            if device.startswith("cuda"):
                out["cuda_growth_bytes"] = torch.cuda.max_memory_allocated() - base_cuda
            return out
        out.update(interleaved_rounds(function, fresh, teacher, student, loader, job))
    except Exception as error:  # a peer that cannot run W1 is a result, not a crash of the benchmark
        out["error"] = f"{type(error).__name__}: {str(error).strip().splitlines()[0] if str(error).strip() else ''}"
    return out


def interleaved_rounds(function, fresh, teacher, student, loader, job) -> dict:
    """One warm-up of every subject, then ``repeats`` rounds of (a) forward, the subject, and for ``ours``
    also (b₀) the ``--against`` baseline, (b16) bfloat16 Grams, (c) the Gram products and (a′) the hooked
    forward: seconds and minor page faults per run, so every ratio pairs runs of the same round."""
    device = job["device"]
    ours = job["subject"] == "ours"
    subjects = {"forward": lambda: run_forward(teacher, student, loader, device),
                "": lambda: function(*fresh(), loader, device)}
    if ours and job.get("against"):
        baseline = baseline_subject(job["against"])
        subjects["baseline_"] = lambda: baseline(teacher, student, loader, device)
    if ours:
        subjects["bf16_"] = lambda: run_ours(teacher, student, loader, device, precision="bf16")
        features = captured_features(teacher, student, next(iter(loader))[0].to(device))
        subjects["gram_"] = lambda: run_grams(features, len(loader), device)
        subjects["hooked_"] = lambda: run_forward_hooked(teacher, student, loader, device)
    outputs = {name: run() for name, run in subjects.items()}  # warm-up
    out: dict = {}
    for _ in range(job["repeats"]):
        for name, run in subjects.items():
            seconds, faults, outputs[name] = faulted(run)
            key = "forward_" if name == "forward" else name
            out.setdefault(f"{key}seconds", []).append(seconds)
            out.setdefault(f"{key}minflt", []).append(faults)
    out.setdefault("gram_seconds", [])
    out.setdefault("hooked_seconds", [])
    for name, prefix in (("", ""), ("baseline_", "baseline_"), ("bf16_", "bf16_")):
        out.update({prefix + key: np.asarray(value).tolist() if key.startswith("values") else value
                    for key, value in (outputs.get(name) or {}).items()})
    return out


def reference_job(teacher, student, loader, job) -> dict:
    """Float64 reference on the float32 features of all samples; plus, on the first ``subset`` samples,
    a float64 forward (models in float64) against the float32 one and against ``cka_matrix``."""
    device, subset = job["device"], job["reference_subset"]
    with torch.no_grad():
        full = reference_values(teacher, student, loader, device)
        subset32 = reference_values(teacher, student, loader, device, n_samples=subset)
        teacher64, student64 = copy.deepcopy(teacher).double(), copy.deepcopy(student).double()
        subset64 = reference_values(teacher64, student64, loader, device, n_samples=subset)
    subset_loader = DataLoader(TensorDataset(*loader.dataset[:subset]), batch_size=loader.batch_size)
    ours_subset = run_ours(teacher, student, subset_loader, device)["values"]
    return {key: np.asarray(value).tolist() for key, value in
            dict(reference=full, subset32=subset32, subset64=subset64, ours_subset=ours_subset).items()}


def cpu_snapshot() -> tuple[float, float, float] | None:
    """(CPU-seconds the whole machine has been busy, CPU-seconds of this process and its waited-for
    children, a wall clock); None where ``/proc/stat`` does not exist."""
    try:
        with open("/proc/stat") as handle:
            ticks = [int(value) for value in handle.readline().split()[1:9]]
    except OSError:
        return None
    busy = sum(ticks) - ticks[3] - ticks[4]  # all but idle and iowait; steal counts as busy
    own = os.times()
    return (busy / os.sysconf("SC_CLK_TCK"), own.user + own.system + own.children_user + own.children_system,
            time.monotonic())


def other_cpu_share(before, after) -> float | None:
    """The share of the machine's CPU time that other processes used between two snapshots."""
    if before is None or after is None or after[2] <= before[2]:
        return None
    other = (after[0] - before[0]) - (after[1] - before[1])
    return max(other, 0.0) / ((after[2] - before[2]) * os.cpu_count())


def run_worker(job: dict) -> dict:
    """Run ``worker(job)`` in a fresh interpreter and return its JSON (or the reason it gave none)."""
    before = cpu_snapshot()
    with tempfile.TemporaryDirectory() as folder:
        path = os.path.join(folder, "out.json")
        command = [sys.executable, os.path.abspath(__file__), "--worker", json.dumps(job), "--worker-out", path]
        process = subprocess.run(command, capture_output=True, text=True, env={**os.environ, "TQDM_DISABLE": "1"})
        if process.returncode != 0 or not os.path.exists(path):
            tail = (process.stderr or process.stdout).strip().splitlines()[-1:] or ["no output"]
            return {"subject": job.get("subject"), "error": f"worker exited with code {process.returncode}: {tail[0]}"}
        with open(path) as handle:
            out = json.load(handle)
    out["other_cpu_share"] = other_cpu_share(before, cpu_snapshot())
    return out


# --------------------------------------------------------------------------------------------- orchestration
def measure(config: dict, peers: list[str], log=print, runner=None) -> dict:
    """Every measurement of the benchmark, as a JSON-able dict that :func:`render_markdown` reads.
    Each job goes to ``runner`` (default: :func:`run_worker`, a fresh process per job)."""
    runner = runner or run_worker
    base = {key: config[key] for key in ("device", "threads", "batch_size")}
    against = config.get("against")
    n, big = config["n_samples"], config["big_n_samples"]
    results: dict = {"config": config, "time": {}, "memory": {}}
    start = cpu_snapshot()
    for subject in ("ours", *peers):
        log(f"timing {subject}: N={n}, {config['repeats']} repeats, forward passes interleaved")
        results["time"][subject] = runner({**base, "kind": "time", "subject": subject, "n_samples": n,
                                           "repeats": config["repeats"], "against": against})
    log(f"float64 reference: N={n}, float64 forward on the first {config['reference_subset']}")
    results["reference"] = runner({**base, "kind": "reference", "n_samples": n,
                                   "reference_subset": config["reference_subset"]})
    baseline = ("baseline",) if against else ()
    for size, subjects in ((n, ("forward", "ours", *baseline, *peers)), (big, ("forward", "ours", *baseline))):
        for subject in subjects:
            if subject not in ("forward", "baseline") and not results["time"].get(subject, {}).get("seconds"):
                continue  # it could not run W1 at all
            log(f"peak memory of {subject}: N={size}, fresh process")
            results["memory"][f"{subject}@{size}"] = runner({**base, "kind": "memory", "subject": subject,
                                                             "n_samples": size, "against": against})
    results["other_cpu_share"] = other_cpu_share(start, cpu_snapshot())
    results["flops"] = flop_budget(config["batch_size"], n)
    results["machine"] = machine_info(config["device"], config["threads"])
    results["skipped_peers"] = [name for name in PEERS if name not in peers]
    return results


def machine_info(device: str, threads: int) -> dict:
    info = {"cpu": f"{cpu_model()}, torch threads {threads}", "torch": torch.__version__,
            "python": platform.python_version(), "os": platform.platform(terse=True),
            "glibc_tunables": os.environ.get("GLIBC_TUNABLES"),
            "load_average": os.getloadavg() if hasattr(os, "getloadavg") else None}
    if device.startswith("cuda"):
        info["gpu"] = torch.cuda.get_device_name()
    info["peers"] = ", ".join(f"{name} {_version(name)}" for name in PEERS if _version(name))
    return info


def _version(distribution: str) -> str | None:
    try:
        return metadata.version(distribution)
    except metadata.PackageNotFoundError:
        return None


def installed_peers() -> list[str]:
    return [name for name in PEERS if _version(name)]


@contextmanager
def labelled_phases(teacher, student):
    """Wrap cka_matrix's phases in ``record_function`` labels (monkeypatched for the profile only)."""
    from torch.profiler import record_function

    from workbench.probes import cka_stream, stream

    def label(function, name):
        def wrapped(*args, **kwargs):
            with record_function(name):
                return function(*args, **kwargs)
        return wrapped

    patches = [(cka_stream, "checked_centred_gram", "column centring + Gram matmul (float32)"),
               (cka_stream, "centre_gram", "U-centring (float64)"),
               (stream, "_check_finite", "NaN/Inf check of the features"),
               (cka_stream.CKAAccumulator, "update", "accumulator: float64 cast, HSIC sums")]
    patches = [patch for patch in patches if hasattr(patch[0], patch[1])]  # names may move as the code does
    saved = [(owner, name, getattr(owner, name)) for owner, name, _ in patches]
    try:
        for owner, name, text in patches:
            setattr(owner, name, label(getattr(owner, name), text))
        for model in (teacher, student):
            model.forward = label(model.forward, "forward passes (with hooks)")
        yield [text for *_, text in patches] + ["forward passes (with hooks)"]
    finally:
        for owner, name, function in saved:
            setattr(owner, name, function)
        for model in (teacher, student):
            del model.forward


def profile(config: dict) -> str:
    """Where one ``cka_matrix`` run spends its time: op self-times attributed to the innermost phase."""
    from torch.profiler import ProfilerActivity, profile as torch_profile

    torch.set_num_threads(config["threads"])
    device = config["device"]
    teacher, student = build_models(device)
    loader = make_loader(config["n_samples"], config["batch_size"])
    run_ours(teacher, student, loader, device)  # warm-up
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.startswith("cuda") else [])
    with labelled_phases(teacher, student) as labels, torch_profile(activities=activities) as prof:
        seconds, _ = timed(run_ours, teacher, student, loader, device)
    on_gpu = device.startswith("cuda")
    phases: dict[str, dict[str, float]] = {}
    for event in prof.events():
        parent = event if event.name in labels else event.cpu_parent
        while parent is not None and parent.name not in labels:
            parent = parent.cpu_parent
        phase = parent.name if parent is not None else "other (data loading, hooks, flatten, bookkeeping)"
        ops = phases.setdefault(phase, {})
        spent = event.self_device_time_total if on_gpu else event.self_cpu_time_total
        ops[event.name] = ops.get(event.name, 0.0) + spent / 1e6
    lines = [f"cka_matrix, N={config['n_samples']}, batch {config['batch_size']}, {device}: {seconds:.2f} s wall "
             f"(under the profiler); self {'GPU' if on_gpu else 'CPU'} time by phase:"]
    for phase, ops in sorted(phases.items(), key=lambda item: -sum(item[1].values())):
        top = ", ".join(f"{name} {value:.2f}" for name, value in sorted(ops.items(), key=lambda i: -i[1])[:4])
        lines.append(f"  {sum(ops.values()):7.2f} s  {phase}   [{top}]")
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------------ report
def _median(values):
    return statistics.median(values) if values else float("nan")


def _mib(value):
    return f"{value / 2**20:,.0f} MiB" if value is not None else "—"


def _span(values):
    return f"{min(values):.2f}–{max(values):.2f}" if values else "—"


def _share(value) -> str:
    return "—" if value is None else f"{100 * value:.0f}%"


def _share_verdict(share) -> str:
    if share is None:
        return "not measured (no `/proc/stat`)"
    text = (f"other processes used {_share(share)} of the machine's CPU time during the run "
            "(`/proc/stat` minus this benchmark's own CPU time)")
    return text + (": **the machine was shared, so the timings are noisy**" if share > 0.05 else "")


def render_markdown(results: dict) -> str:
    """The committed table: machine, command, times, floors, memory, values against the reference."""
    config, machine, flops = results["config"], results["machine"], results["flops"]
    ours = results["time"]["ours"]
    if "error" in ours:
        raise RuntimeError(f"cka_matrix itself failed on W1: {ours['error']}")
    a, b, grams = _median(ours["forward_seconds"]), _median(ours["seconds"]), _median(ours["gram_seconds"])
    hooked = _median(ours.get("hooked_seconds", []))
    share = results.get("other_cpu_share")
    n = config["n_samples"]
    lines = [
        "# `cka_matrix` benchmark, workload W1", "",
        f"Made by `{results.get('command', 'python benchmarks/cka_matrix.py')}` on {date.today().isoformat()}.", "",
        "| machine | |", "|---|---|",
        f"| CPU | {machine['cpu']} |", f"| device | {config['device']}{' (' + machine['gpu'] + ')' if 'gpu' in machine else ''} |",
        f"| software | torch {machine['torch']}, Python {machine['python']}, {machine['os']} |",
        f"| peers | {machine['peers'] or 'none installed'} |",
        f"| other work | {_share_verdict(share)}; load average at the end "
        f"{', '.join(f'{value:.2f}' for value in machine.get('load_average') or ())} |",
        f"| allocator | `GLIBC_TUNABLES={machine.get('glibc_tunables') or ''}` |", "",
        f"W1: teacher `bench_cnn` width 1, student `bench_cnn` width 0.5, 8 hooked modules each "
        f"({', '.join(f'`{name}`' for name in LAYERS)}), {n:,} seeded random 3×32×32 inputs, batch "
        f"{config['batch_size']}, float32, eval mode, the same `DataLoader` of `(x, y)` batches for every row. "
        f"Times are medians of {config['repeats']} rounds after one warm-up of each subject, each subject in its "
        "own process, its runs interleaved with (a) (and, for ours, (b₀), (c), (a′)) round by round (the `× (a)` "
        "column uses that process's own (a)). "
        "`other CPU` is the share of the machine other processes used while that process ran.", "",
        "## Time", "", "| what | median s | runs s | × (a) | other CPU |", "|---|---|---|---|---|",
        f"| (a) forward passes alone (both models, same batches, `no_grad`) | {a:.2f} | "
        f"{_span(ours['forward_seconds'])} | 1 | {_share(ours.get('other_cpu_share'))} |",
        f"| (b) `cka_matrix` (debiased linear, progress off) | {b:.2f} | {_span(ours['seconds'])} | **{b / a:.2f}** "
        f"| {_share(ours.get('other_cpu_share'))} |",
        f"| (c) the Gram products alone (16 float32 `X Xᵀ` per batch) | {grams:.2f} | "
        f"{_span(ours['gram_seconds'])} | {grams / a:.2f} | {_share(ours.get('other_cpu_share'))} |",
        f"| (a′) forward passes with the 16 capture hooks holding the activations, as inside (b) | {hooked:.2f} | "
        f"{_span(ours.get('hooked_seconds', []))} | {hooked / a:.2f} | {_share(ours.get('other_cpu_share'))} |",
    ]
    if ours.get("bf16_seconds"):
        low = _median(ours["bf16_seconds"])
        lines.append(f"| (b16) `cka_matrix(..., precision=\"bf16\")`: opt-in bfloat16 Grams | {low:.2f} | "
                     f"{_span(ours['bf16_seconds'])} | {low / a:.2f} | {_share(ours.get('other_cpu_share'))} |")
    if ours.get("baseline_seconds"):
        before = _median(ours["baseline_seconds"])
        lines.append(f"| (b₀) `cka_matrix` as committed at `{config['against']}`, same process, same rounds | "
                     f"{before:.2f} | {_span(ours['baseline_seconds'])} | {before / a:.2f} | "
                     f"{_share(ours.get('other_cpu_share'))} |")
    for name in PEERS:
        peer = results["time"].get(name)
        if peer is None:
            continue
        label = f"{name} {_version(name)}: {PEERS[name][0]}"
        if "error" in peer and not peer.get("seconds"):
            lines.append(f"| {label} | — | failed: `{peer['error']}` | — | |")
        else:
            seconds, own_a = _median(peer["seconds"]), _median(peer["forward_seconds"])
            lines.append(f"| {label} | {seconds:.2f} | {_span(peer['seconds'])} | {seconds / own_a:.2f} | "
                         f"{_share(peer.get('other_cpu_share'))} |")
    lines += [
        "", f"**b/a = {b / a:.2f}** (medians; target ≤ 1.3); paired per-run b/a "
        f"{_span([y / x for x, y in zip(ours['forward_seconds'], ours['seconds'])])}.", "",
        *paired_section(ours, config.get("against")),
        "## The floor that the Gram products' FLOPs imply", "",
        "| | MACs |", "|---|---|",
        f"| forward, per sample (FlopCounterMode: convs + head) | teacher {flops['forward_macs_per_sample']['teacher']:,}, "
        f"student {flops['forward_macs_per_sample']['student']:,} |",
        f"| forward, both models, all {n:,} samples | {flops['forward_macs']:,} |",
        f"| Gram, full n²·d per layer per batch (Σd teacher {flops['feature_dims']['teacher']:,}, "
        f"student {flops['feature_dims']['student']:,}) | {flops['gram_macs']:,} |",
        f"| Gram, symmetric n²·d/2 | {flops['gram_macs'] // 2:,} |", "",
        f"Floor = 1 + Gram MACs / forward MACs: **{flops['floor_full']:.2f}** with full products, "
        f"**{flops['floor_symmetric']:.2f}** with symmetric ones (`syrk`-style, half the MACs). The floor "
        "assumes the Gram matmuls and the convolutions run at the same MAC rate; everything else (U-centring "
        "O(n²) per layer, the 8×8 cross products, casts, checks) is counted as free. Measured rates here: "
        f"forward {flops['forward_macs'] / a / 1e9:.1f} GMAC/s, Gram products "
        f"{flops['gram_macs'] / grams / 1e9:.1f} GMAC/s (full-product count), so the floor at the measured "
        f"rates is 1 + c/a = **{1 + grams / a:.2f}**. What (b) spends beyond its own hooked forward passes "
        f"(a′) and the Gram products (c) — centring, U-centring, casts, checks, sums: b − a′ − c = "
        f"{b - hooked - grams:.2f} s ({(b - hooked - grams) / a:.2f} × (a)). (a′) ran faster than (a) in quiet runs; a "
        "likely cause (not verified): the bare loop frees each activation at once and page-faults fresh memory "
        "for the next (its system time is several times (a′)'s).", "",
    ]
    lines += memory_section(results)
    lines += values_section(results)
    low = _median(ours["bf16_seconds"]) if ours.get("bf16_seconds") else None
    lines += ["", "## Ours against the peers", "", "| peer | peer s | ours s | ours / peer | (b16) / peer |",
              "|---|---|---|---|---|"]
    for name in PEERS:
        peer = results["time"].get(name, {})
        if peer.get("seconds"):
            theirs = _median(peer["seconds"])
            lines.append(f"| {name} | {theirs:.2f} | {b:.2f} | {b / theirs:.2f} | "
                         f"{f'{low / theirs:.2f}' if low else '—'} |")
        elif name in results["time"]:
            lines.append(f"| {name} | failed | {b:.2f} | — | — |")
    if results.get("skipped_peers"):
        lines += ["", f"Not run (not installed or `--no-peers`): {', '.join(results['skipped_peers'])}."]
    return "\n".join(lines) + "\n"


def _paired(numerators, denominators) -> str:
    ratios = [top / bottom for top, bottom in zip(numerators, denominators)]
    return f"{_median(ratios):.3f} ({_span(ratios)})" if ratios else "—"


def own_times(ours: dict, keys: tuple[str, ...]) -> list[list[float]]:
    """Each subject's runs minus the same round's hooked forward (a′): the time the CKA itself adds."""
    return [[run - hooked for run, hooked in zip(ours[key], ours["hooked_seconds"])] for key in keys]


def paired_section(ours: dict, against: str | None) -> list[str]:
    """Per-round ratios (median, min–max) and the median minor page faults of each subject's runs."""
    runs = {"(a) forward": "forward_", "(b) cka_matrix": "", "(b₀) at " + str(against): "baseline_",
            "(b16) bfloat16 Grams": "bf16_", "(c) Gram products": "gram_", "(a′) hooked forward": "hooked_"}
    runs = {label: key for label, key in runs.items() if ours.get(f"{key}seconds")}
    lines = ["Paired within each round (median, min–max over rounds):", "",
             "| ratio | value |", "|---|---|",
             f"| b / a | {_paired(ours['seconds'], ours['forward_seconds'])} |"]
    if ours.get("hooked_seconds"):
        lines.append(f"| b / a′ | {_paired(ours['seconds'], ours['hooked_seconds'])} |")
        lines.append(f"| a′ / a | {_paired(ours['hooked_seconds'], ours['forward_seconds'])} |")
        if ours.get("bf16_seconds"):
            lines.append("| b16 / a′ (opt-in bfloat16 Grams) | "
                         f"{_paired(ours['bf16_seconds'], ours['hooked_seconds'])} |")
    if ours.get("baseline_seconds"):
        lines.append(f"| b / b₀ (this tree over `{against}`) | {_paired(ours['seconds'], ours['baseline_seconds'])} |")
        lines.append(f"| (b − a′) / (b₀ − a′) (the CKA's own time) | "
                     f"{_paired(*own_times(ours, ('seconds', 'baseline_seconds')))} |")
    if ours.get("minflt"):
        lines += ["", "| subject | minor page faults per run (median) |", "|---|---|"]
        lines += [f"| {label} | {_median(ours[f'{key}minflt']):,.0f} |" for label, key in runs.items()]
    return lines + [""]


def memory_section(results: dict) -> list[str]:
    config = results["config"]
    n, big, cuda = config["n_samples"], config["big_n_samples"], config["device"].startswith("cuda")
    lines = [
        "## Peak memory", "",
        "Peak RSS growth = peak RSS during one run minus the RSS just before it, in a fresh process with the "
        "models and the input tensor already built (the inputs alone are "
        f"{n * 3 * 32 * 32 * 4 / 2**20:.0f} MiB at N={n:,} and {big * 3 * 32 * 32 * 4 / 2**20:.0f} MiB at "
        f"N={big:,}); it includes the first run's one-time allocations. Linux `/proc/self/clear_refs` + `VmHWM`"
        + (", and CUDA `max_memory_allocated` growth." if cuda else "."), "",
        "| subject | N | peak RSS growth | peak RSS | " + ("CUDA peak growth | " if cuda else "")
        + "that run s | other CPU |", "|---|---|---|---|" + ("---|" if cuda else "") + "---|---|",
    ]
    for key, memory in results["memory"].items():
        subject, size = key.rsplit("@", 1)
        gpu = f" {_mib(memory.get('cuda_growth_bytes'))} |" if cuda else ""
        if "error" in memory:
            lines.append(f"| {subject} | {int(size):,} | failed: `{memory['error']}` | |{gpu} | |")
        else:
            lines.append(f"| {subject} | {int(size):,} | {_mib(memory['rss_growth_bytes'])} | "
                         f"{_mib(memory.get('rss_peak_bytes'))} |{gpu} {memory['seconds']:.2f} | "
                         f"{_share(memory.get('other_cpu_share'))} |")
    return lines


def values_section(results: dict) -> list[str]:
    reference = results["reference"]
    if "error" in reference:
        return ["", "## Values", "", f"The float64 reference failed: `{reference['error']}`."]
    subset = results["config"]["reference_subset"]
    lines = [
        "", "## Values against a float64 reference", "",
        "Reference: the same minibatch estimator (Nguyen et al. 2021: Song et al.'s unbiased HSIC per batch, "
        "the three HSIC terms summed over batches, normalised once) in float64, in the trace form "
        "`[tr(KL) + 1ᵀK1·1ᵀL1/((n-1)(n-2)) − 2·1ᵀKL1/(n-2)] / (n(n-3))` on zero-diagonal Grams, written in this "
        "benchmark apart from `workbench.probes.kernels`, from the float32 forward's features cast to float64: "
        "the exact value of what every implementation is given. Off = |Δ| > 0.01 or not finite; collapsed to "
        "0 / 1 = |v| < 1e-6 or |v − 1| < 1e-6 where the reference is ≥ 0.01 away.", "",
        "| implementation | estimator | max abs Δ | off | NaN/Inf | collapsed to 0 | collapsed to 1 | abs v > 1 |",
        "|---|---|---|---|---|---|---|---|",
    ]
    rows = [("workbench `cka_matrix`", OURS_ESTIMATOR, results["time"]["ours"].get("values"), None)]
    if results["time"]["ours"].get("bf16_values") is not None:
        rows.append(("workbench `cka_matrix(..., precision=\"bf16\")`", "as above, the Grams from bfloat16 features",
                     results["time"]["ours"]["bf16_values"], None))
    for name in PEERS:
        peer = results["time"].get(name)
        if peer is not None:
            rows.append((f"{name} {_version(name)}", PEERS[name][1], peer.get("values"), peer.get("error")))
            if peer.get("values_epsilon_0") is not None:
                rows.append((f"{name}, same sums without its ε", "as above, ε = 0",
                             peer["values_epsilon_0"], None))
    for label, estimator, values, error in rows:
        if values is None:
            lines.append(f"| {label} | {estimator} | failed: `{error}` | | | | | |")
            continue
        c = compare_to_reference(values, reference["reference"])
        note = f" (`{error}`)" if error else ""
        lines.append(f"| {label}{note} | {estimator} | {c['max_abs_diff']:.2e} | {c['n_off']}/{c['n_entries']} | "
                     f"{c['n_nan']} | {c['n_zero']} | {c['n_one']} | {c['n_out_of_range']} |")
    forward_noise = compare_to_reference(reference["subset32"], reference["subset64"])["max_abs_diff"]
    ours_end_to_end = compare_to_reference(reference["ours_subset"], reference["subset64"])["max_abs_diff"]
    ours_same_input = compare_to_reference(reference["ours_subset"], reference["subset32"])["max_abs_diff"]
    lines += [
        "", f"End to end on the first {subset} samples, with the models themselves run in float64: `cka_matrix` "
        f"(float32 forward) vs the float64-forward reference max |Δ| = {ours_end_to_end:.2e}; of that, the float32 "
        f"forward alone accounts for {forward_noise:.2e} (reference on float32 vs float64 features), and "
        f"`cka_matrix` vs the reference on the same float32 features is {ours_same_input:.2e}.", "",
        "Reference matrix (rows teacher, columns student, layers in the order above):", "", "```",
        np.array2string(np.asarray(reference["reference"]), precision=4, suppress_small=True, max_line_width=120),
        "```",
    ]
    return lines


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu", help="cpu (default) or cuda")
    parser.add_argument("--quick", action="store_true", help="smoke size: N=400 / 1,200, 2 repeats")
    parser.add_argument("--markdown", metavar="PATH", help="write the results table here")
    parser.add_argument("--json", metavar="PATH", help="write the raw measurements here")
    parser.add_argument("--repeats", type=int, help="timed runs per measurement (default 5; quick 2)")
    parser.add_argument("--threads", type=int, default=2, help="torch.set_num_threads (default 2)")
    parser.add_argument("--no-peers", action="store_true", help="skip the peer packages")
    parser.add_argument("--batch-size", type=int, help="W1's batch (default 200; e.g. 64, 1024)")
    parser.add_argument("--against", metavar="REF", help="also time cka_matrix as committed at this git ref")
    parser.add_argument("--profile", action="store_true", help="only profile one cka_matrix run and print it")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--worker-out", help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    if serve_worker(args.worker, args.worker_out, worker):
        return 0
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit(f"--device {args.device}: torch {torch.__version__} sees no CUDA device here")
    config = {**(QUICK if args.quick else FULL), "device": args.device, "threads": args.threads}
    if args.repeats:
        config["repeats"] = args.repeats
    if args.batch_size:
        config["batch_size"] = args.batch_size
    config["against"] = args.against
    if args.profile:
        print(profile(config))
        return 0
    peers = [] if args.no_peers else installed_peers()
    results = measure(config, peers, log=lambda text: print(text, file=sys.stderr, flush=True))
    results["command"] = shlex.join(["python", "benchmarks/cka_matrix.py", *argv])
    print(save_outputs(results, render_markdown, json_path=args.json, markdown_path=args.markdown))
    return 0


if __name__ == "__main__":
    sys.exit(main())
