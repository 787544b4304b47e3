"""CKAAccumulator.update makes no host round trip per batch: every read of a tensor's value is counted.

On an accelerator a read (``item``, ``tolist``, ``bool``, ``cpu``, ``numpy``, …) waits for the device, so
a stream of batches would stall once per read. The CPU path is instrumented here with the accelerator
policy (faults recorded on the device, raised when the sums are read); the CPU's own policy reads one
flag per batch (a memory load there) so that ``update`` raises at once; with CUDA present, the device
path runs under ``torch.cuda.set_sync_debug_mode("error")``.
"""
from __future__ import annotations

import collections

import numpy as np
import pytest
import torch

from workbench.probes import cka_stream
from workbench.similarity import CKAAccumulator

READS = ("item", "cpu", "tolist", "__bool__", "numpy", "__float__", "__int__", "__index__")


@pytest.fixture
def reads(monkeypatch):
    """A Counter of the host reads of tensor values made while the test runs."""
    counter = collections.Counter()
    for name in READS:
        original = getattr(torch.Tensor, name)

        def counted(self, *args, _original=original, _name=name, **kwargs):
            counter[_name] += 1
            return _original(self, *args, **kwargs)

        monkeypatch.setattr(torch.Tensor, name, counted)
    return counter


@pytest.fixture
def deferred(monkeypatch):
    """The accelerator policy on the CPU: faults recorded on the device, raised when the sums are read."""
    monkeypatch.setattr(cka_stream, "EAGER_DEVICES", frozenset())


def batches(count: int, n: int = 24, dtype: torch.dtype = torch.float32, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    for _ in range(count):
        base = torch.randn(n, 6, generator=generator, dtype=torch.float64)
        teacher = [base @ torch.randn(6, 40, generator=generator, dtype=torch.float64) + 3, base[:, :2] ** 2]
        student = [base[:, :3] + torch.randn(n, 3, generator=generator, dtype=torch.float64),
                   torch.randn(n, 2, 5, generator=generator, dtype=torch.float64)]
        cast = (lambda value: (10 * value).round().to(dtype)) if not dtype.is_floating_point else (
            lambda value: value.to(dtype))
        yield [cast(value) for value in teacher], [cast(value) for value in student]


SETTINGS = [
    dict(kernel="linear", debiased=True),
    dict(kernel="linear", debiased=False),
    dict(kernel="rbf", debiased=True),
    dict(kernel="rbf", debiased=True, sigma=3.0),
    dict(kernel="linear", debiased=True, precision="bf16"),
]
DTYPES = [torch.float32, torch.float64, torch.float16, torch.int64]


def accumulate(count: int, dtype: torch.dtype, settings: dict, reads: collections.Counter) -> tuple[int, int]:
    """(reads during the updates, reads by values()) for ``count`` batches."""
    accumulator = CKAAccumulator(["a", "b"], ["c", "d"], **settings)
    data = list(batches(count, dtype=dtype))
    reads.clear()
    for teacher, student in data:
        accumulator.update(teacher, student)
    during = sum(reads.values())
    reads.clear()
    accumulator.values()
    return during, sum(reads.values())


@pytest.mark.filterwarnings("ignore:.*Gram of zero")  # integers under sigma=3: a kernel of zeros off the diagonal
@pytest.mark.parametrize("settings", SETTINGS, ids=lambda s: "-".join(map(str, s.values())))
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_updates_read_nothing_back_under_the_accelerator_policy(deferred, reads, dtype, settings):
    during_two, end_two = accumulate(2, dtype, settings, reads)
    during_six, end_six = accumulate(6, dtype, settings, reads)
    assert during_two == during_six == 0
    assert end_two == end_six > 0  # a constant number of reads at the end, whatever the batch count


def test_the_cpu_policy_reads_one_flag_per_batch(reads):
    during_two, _ = accumulate(2, torch.float32, SETTINGS[0], reads)
    during_six, _ = accumulate(6, torch.float32, SETTINGS[0], reads)
    assert (during_two, during_six) == (2, 6)  # one bool per batch, not one per layer


def test_deferred_faults_name_the_first_layer_and_batch(deferred):
    accumulator = CKAAccumulator(["a", "b"], ["c", "d"])
    for index, (teacher, student) in enumerate(batches(5)):
        if index == 2:
            student[1][3, 0, 0] = torch.nan
        if index == 3:
            teacher[0][0, 0] = torch.inf
        accumulator.update(teacher, student)  # recorded, not raised: no read
    with pytest.raises(FloatingPointError, match=r"^student layer 'd' produced NaN or Inf in the batch starting at "
                                                 r"sample 48$"):
        accumulator.values()
    with pytest.raises(FloatingPointError, match="sample 48"):
        accumulator.dead_layers()
    with pytest.raises(FloatingPointError, match="sample 48"):
        CKAAccumulator(["a", "b"], ["c", "d"]).merge(accumulator)


def test_deferred_range_and_bandwidth_errors_read_as_before(deferred):
    x = torch.randn(16, 4, dtype=torch.float64)
    x *= 1.5 / x.abs().max()  # 1.5e80 ≈ 2**266.4
    accumulator = CKAAccumulator(["t"], ["s"])
    accumulator.update([x], [x])
    accumulator.update([x * 1e80], [x])
    with pytest.raises(ValueError, match=r"teacher layer 't' has float64 features of magnitude about 2\*\*267 in "
                                         r"the batch starting at sample 16: beyond 2\*\*±200"):
        accumulator.values()
    rbf = CKAAccumulator(["t"], ["s"], kernel="rbf")
    rbf.update([torch.zeros(16, 3)], [x])
    with pytest.raises(ValueError, match="the RBF bandwidth is zero"):
        rbf.values()


@pytest.mark.parametrize("settings", SETTINGS, ids=lambda s: "-".join(map(str, s.values())))
def test_both_policies_give_the_same_values(monkeypatch, settings):
    data = list(batches(4, dtype=torch.float32))
    results = []
    for devices in (frozenset({"cpu"}), frozenset()):
        monkeypatch.setattr(cka_stream, "EAGER_DEVICES", devices)
        accumulator = CKAAccumulator(2, 2, **settings)
        for teacher, student in data:
            accumulator.update(teacher, student)
        results.append(accumulator.values())
    np.testing.assert_array_equal(*results)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("settings", SETTINGS, ids=lambda s: "-".join(map(str, s.values())))
def test_cuda_updates_never_synchronise(settings):
    data = list(batches(4, n=200))
    cpu, cuda = CKAAccumulator(2, 2, **settings), CKAAccumulator(2, 2, **settings)
    for teacher, student in data:
        cpu.update(teacher, student)
    moved = [([value.cuda() for value in teacher], [value.cuda() for value in student]) for teacher, student in data]
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for teacher, student in moved:
            cuda.update(teacher, student)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert cuda.cross.is_cuda
    # bfloat16 Grams: float32 outputs on CUDA, bfloat16 ones on the CPU, each ≈1e-4 from float64
    np.testing.assert_allclose(cuda.values(), cpu.values(), atol=1e-6 if "precision" not in settings else 2e-3)
