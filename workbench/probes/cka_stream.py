"""Streaming minibatch CKA between every teacher layer and every student layer, in one pass.

The estimator of Nguyen, Raghu & Kornblith (2021), "Do Wide and Deep Networks Learn the Same Things?"
(https://arxiv.org/abs/2010.15327): for each batch the three HSIC terms — HSIC(K, L), HSIC(K, K),
HSIC(L, L) — are summed separately, each batch scaled by its own 1/(n(n-3)) (unbiased, Song et al.
2012) or 1/(n-1)² (biased), and normalised once at the end:

    CKA = Σ_b HSIC(K_b, L_b) / sqrt(Σ_b HSIC(K_b, K_b) · Σ_b HSIC(L_b, L_b))

The accumulator holds only these sums (float64), so memory does not grow with the dataset, and two
accumulators merge by adding them (across batches, devices, or ranks with ``all_reduce``).
"""
from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Sequence
from contextlib import closing
from typing import NamedTuple

import numpy as np
import torch
from torch import nn

from workbench.capture import LayerSelector
from workbench.probes.cka_result import CKAResult
from workbench.probes.kernels import (
    KERNELS, ZERO_BANDWIDTH, Workspace, _power_of_two, centre_gram, check_precision, check_rbf_settings,
    checked_centred_gram, dead_layer_message, hsic_scale, rbf_kernel, zero_floor,
)
from workbench.probes.stream import paired_batches


def _layer_labels(layers: int | Sequence[str]) -> list[str]:
    return [f"#{index}" for index in range(layers)] if isinstance(layers, int) else list(layers)


def check_kernel(kernel: str) -> None:
    """Raise a ``ValueError`` naming the choices unless ``kernel`` is one of :data:`KERNELS`."""
    if kernel not in KERNELS:
        raise ValueError(f"kernel must be one of {KERNELS}, got {kernel!r}")


def check_estimator(kernel: str, threshold: object, sigma: object, precision: object) -> None:
    """Refuse, before any forward pass, a kernel, RBF setting or precision that cannot be used, and the
    bfloat16 Gram with the RBF kernel (its distances ‖xᵢ‖² + ‖xⱼ‖² − 2⟨xᵢ, xⱼ⟩ cancel the Gram's digits)."""
    check_kernel(kernel)
    check_precision(precision)
    if kernel == "rbf":
        check_rbf_settings(threshold, sigma)
        if precision != "full":
            raise ValueError(
                f"precision={precision!r} is for the linear kernel only: the RBF kernel's distances cancel the "
                "Gram's leading digits, so a bfloat16 Gram would give them no digit to spare; use precision='full'"
            )


MAX_EXPONENT = 200
"""Float64 features whose largest magnitude is beyond 2**±200 (≈ 1e±60) are refused: the HSIC sums
(fourth powers of the features) would leave float64's range. Every float32 / half / integer layer fits."""
SAFE_FLOAT64_GRAM_RANGE = (2.0**-400, 2.0**400)
"""Largest diagonal entry (in the features' units) of a float64 Gram that needs no range check: a float64
layer outside it with an exponent beyond :data:`MAX_EXPONENT` is refused. Float32 Grams are always products
of features scaled by a power of two (exact), so their range is never refused."""
EAGER_DEVICES = frozenset({"cpu"})
"""Devices where reading a value is a memory load, not a device synchronisation. There each batch's faults
(NaN / Inf features, float64 features beyond the sums' range, a zero RBF bandwidth) are read once per batch
and raised by :meth:`CKAAccumulator.update` before the batch is added. On other devices (CUDA, MPS) they are
recorded on the device and raised by the first call that reads the sums (``values``, ``dead_layers``,
``merge``, ``all_reduce``): no host round trip per batch."""
_NO_FAULT = -1


class _Side(NamedTuple):
    """One side's batch terms, all on the features' device."""

    grams: torch.Tensor  # [L, n·n] float64 (U-)centred Grams, in units of 4**exponent (linear) or of the kernel
    factors: torch.Tensor  # [L] float64: 4**exponent (linear, exact) or 1 (RBF)
    floors: torch.Tensor  # [L] float64 zero_floor of each Gram's trace, in the features' units
    faults: torch.Tensor  # [3, L] bool: non-finite features, float64 features out of range, zero RBF bandwidth
    exponents: torch.Tensor  # [L] int64 binary exponent of the raw features (named by the range error)


def _self_terms(grams: torch.Tensor) -> torch.Tensor:
    """``[L]`` squared Frobenius norms of ``[L, m]`` rows as batched dot products (no squared copy)."""
    return torch.bmm(grams.unsqueeze(1), grams.unsqueeze(2)).flatten()


def _out_of_float64_range(gram: torch.Tensor, exponent: torch.Tensor) -> torch.Tensor:
    """0-dim bool: the float64 Gram ``gram · 4**exponent`` has its largest diagonal entry outside
    :data:`SAFE_FLOAT64_GRAM_RANGE` (zero included), decided on the device from the binary exponents alone."""
    low, high = SAFE_FLOAT64_GRAM_RANGE
    mantissa, power = torch.frexp(gram.diagonal().amax())
    power = power.to(torch.int64) + 2 * exponent.to(torch.int64)  # largest = mantissa · 2**power
    low_power, high_power = math.frexp(low)[1], math.frexp(high)[1] - 1  # mantissa ∈ [0.5, 1)
    below_high = (power <= high_power) | ((power == high_power + 1) & (mantissa == 0.5))
    return ~((mantissa > 0) & (power >= low_power) & below_high)


class CKAAccumulator:
    """Sufficient statistics of the minibatch CKA between teacher and student layers (names, or counts).

    Each batch's Gram is formed in the features' dtype (float32 stays float32, the fast path) from the
    centred features scaled by a power of two (exact: no digit changes), so float32 activations of any
    magnitude give the exact value; it is summed in float64, the power of two folded back in after the
    products. Integer and bool activations are centred exactly (int64 / float64) before a float32 product.
    ``precision="bf16"`` (linear kernel only) opts into bfloat16 products instead, about 1e-4 from the exact
    value at 64 samples a batch, more for smaller batches (:data:`workbench.probes.kernels.PRECISIONS`).
    Each layer's centred features are written into one reused buffer (the widest layer's size).
    The sums stay on the features' device; nothing is read back per batch except on the CPU (see
    :data:`EAGER_DEVICES`), and the host gets them once, when :meth:`values` is asked.

    A layer whose accumulated (U-)centred Gram is zero up to rounding (see
    :data:`workbench.probes.kernels.DEAD_TOLERANCE`) is dead: :meth:`values` gives NaN for its row or
    column and warns once per dead layer, naming it.

    Example:
        >>> import torch
        >>> acc = CKAAccumulator(1, 2)
        >>> x = torch.randn(16, 5)
        >>> acc.update([x], [2 * x, torch.randn(16, 3)])
        >>> acc.values().shape, round(float(acc.values()[0, 0]), 10)
        ((1, 2), 1.0)
    """

    def __init__(
        self,
        teacher_layers: int | Sequence[str],
        student_layers: int | Sequence[str],
        *,
        kernel: str = "linear",
        debiased: bool = True,
        threshold: float = 0.5,
        sigma: float | None = None,
        precision: str = "full",
    ):
        check_estimator(kernel, threshold, sigma, precision)
        self.kernel, self.debiased, self.threshold, self.sigma = kernel, debiased, threshold, sigma
        self.precision = precision
        self._workspace = Workspace()  # the centred features of one layer at a time, reused
        self.teacher_layers = _layer_labels(teacher_layers)
        self.student_layers = _layer_labels(student_layers)
        self._allocate(torch.device("cpu"))
        self.n_samples = 0
        self.n_batches = 0

    def _allocate(self, device: torch.device) -> None:
        """Zero sums and no faults on ``device``."""
        teacher, student = len(self.teacher_layers), len(self.student_layers)
        self._bind(torch.zeros(teacher * student + 2 * (teacher + student), dtype=torch.float64, device=device),
                   torch.full((4, teacher + student), _NO_FAULT, dtype=torch.int64, device=device))

    def _bind(self, sums: torch.Tensor, faults: torch.Tensor) -> None:
        """Adopt the flat float64 sums (views ``cross``, ``teacher_self``, ``student_self``, and the dead-layer
        floors: Σ_b scale · zero_floor(trace K_b)) and the ``[4, L]`` fault record: per layer (teacher, then
        student) the first sample of the batch with each fault, and the exponent the range fault names."""
        teacher, student = len(self.teacher_layers), len(self.student_layers)
        self._sums, self._faults = sums, faults
        cross, self.teacher_self, self.student_self, self.teacher_floor, self.student_floor = sums.split(
            [teacher * student, teacher, student, teacher, student])
        self.cross = cross.view(teacher, student)

    def _place(self, device: torch.device) -> None:
        """Keep the sums on the features' device: fresh zeros there before the first batch, else moved once."""
        if self._sums.device == device:
            return
        if self.n_batches == 0:
            self._allocate(device)
        else:
            self._bind(self._sums.to(device), self._faults.to(device))

    def settings(self) -> dict[str, object]:
        """What must agree for two accumulators to merge: layers, kernel, estimator, precision, RBF bandwidth."""
        rbf = {"threshold": self.threshold, "sigma": self.sigma} if self.kernel == "rbf" else {}
        return {"teacher_layers": self.teacher_layers, "student_layers": self.student_layers,
                "kernel": self.kernel, "debiased": self.debiased, "precision": self.precision, **rbf}

    def _side(self, features: Sequence[torch.Tensor]) -> _Side:
        """One side's (U-)centred Grams and per-layer terms, computed on the device with no host read."""
        n = features[0].shape[0]
        device = features[0].device
        grams = torch.empty(len(features), n, n, dtype=torch.float64, device=device)
        exponents, faults, dtypes = [], [], []
        no = torch.zeros((), dtype=torch.bool, device=device)
        for index, value in enumerate(features):
            # statistics only: a training step's activations are read without their graph
            gram, exponent, finite = checked_centred_gram(value.detach().reshape(n, -1), self.precision,
                                                          self._workspace)
            out_of_range = no
            if value.dtype == torch.float64:  # also on the bfloat16 route: 4**exponent must fit the sums
                out_of_range = (exponent.abs() > MAX_EXPONENT) & _out_of_float64_range(gram, exponent)
            grams[index].copy_(gram)  # the float64 cast, in place: no temporary
            bandwidth_ok, dtype = ~no, gram.dtype
            if self.kernel == "rbf":
                grams[index].mul_(_power_of_two(2 * self._usable(exponent), torch.float64))  # the features' units
                kernel, bandwidth_ok = rbf_kernel(grams[index], self.threshold, self.sigma)
                grams[index].copy_(kernel)
                dtype = torch.float64  # the kernel's entries are computed in float64
            exponents.append(exponent.to(torch.int64))
            faults.append(torch.stack([~finite, out_of_range, ~bandwidth_ok]))
            dtypes.append(dtype)
        exponents = torch.stack(exponents)
        factors = (_power_of_two(2 * self._usable(exponents), torch.float64) if self.kernel == "linear"
                   else torch.ones(len(features), dtype=torch.float64, device=device))
        traces = grams.diagonal(dim1=1, dim2=2).sum(dim=1) * factors
        floors = torch.stack([zero_floor(trace, dtype) for trace, dtype in zip(traces, dtypes)])
        centred = centre_gram(grams, unbiased=self.debiased, inplace=True).flatten(1)
        return _Side(centred, factors, floors, torch.stack(faults, dim=1), exponents)

    @staticmethod
    def _usable(exponent: torch.Tensor) -> torch.Tensor:
        """The exponent where 4**exponent is a float64 the sums can hold, else 0 (a refused layer's terms are
        never read)."""
        return torch.where(exponent.abs() <= MAX_EXPONENT, exponent, 0)

    def update(self, teacher_features: Sequence[torch.Tensor], student_features: Sequence[torch.Tensor]) -> None:
        """Add one batch: a ``[n, ...]`` tensor per teacher layer and per student layer, same n.

        No host round trip on an accelerator: the terms are added on the features' device, and a fault
        (NaN / Inf features, …) is recorded there and raised when the sums are read (on the CPU: here).
        """
        counts = {value.shape[0] for value in (*teacher_features, *student_features)}
        if len(counts) != 1:
            raise ValueError(f"all layers of a batch must hold the same samples, got counts {sorted(counts)}")
        if len(teacher_features) != self.cross.shape[0] or len(student_features) != self.cross.shape[1]:
            raise ValueError(
                f"expected {self.cross.shape[0]} teacher and {self.cross.shape[1]} student layers, "
                f"got {len(teacher_features)} and {len(student_features)}"
            )
        (n,) = counts
        if n < 4 and self.debiased:
            raise ValueError(f"a batch of {n} samples is too small: the unbiased HSIC needs at least 4")
        self._place(teacher_features[0].device)
        teacher, student = self._side(teacher_features), self._side(student_features)
        faults = torch.cat([teacher.faults, student.faults], dim=1)
        exponents = torch.cat([teacher.exponents, student.exponents])
        if self._sums.device.type in EAGER_DEVICES:
            if bool(faults.any()):  # a memory read on the CPU, not a device sync
                self._raise(self._recorded(torch.full_like(self._faults, _NO_FAULT), faults, exponents))
        else:
            self._faults = self._recorded(self._faults, faults, exponents)
        self._add(teacher, student, hsic_scale(n, unbiased=self.debiased))
        self.n_samples += n
        self.n_batches += 1

    def _recorded(self, record: torch.Tensor, faults: torch.Tensor, exponents: torch.Tensor) -> torch.Tensor:
        """``record`` with this batch's faults added where a layer had none of that kind yet (on the device)."""
        first = torch.where((record[:3] == _NO_FAULT) & faults, self.n_samples, record[:3])
        exponent = torch.where((record[1] == _NO_FAULT) & faults[1], exponents, record[3])
        return torch.cat([first, exponent[None]])

    def _add(self, teacher: _Side, student: _Side, scale: float) -> None:
        """Add the batch's terms, each power of two and the HSIC scale folded in after the products."""
        # all L_teacher × L_student cross terms in one matrix product of the unscaled Grams
        cross = teacher.grams @ student.grams.T
        self.cross += cross.mul_(torch.outer(teacher.factors, student.factors)).mul_(scale)
        for side, sums, floors in ((teacher, self.teacher_self, self.teacher_floor),
                                   (student, self.student_self, self.student_floor)):
            sums += _self_terms(side.grams).mul_(side.factors.square()).mul_(scale)
            floors += side.floors * scale

    def _raise(self, record: torch.Tensor) -> None:
        """Raise the earliest recorded fault (batch, then layer, teacher first, then kind), if any: one read."""
        rows = record.tolist()
        layers = [*(("teacher", name) for name in self.teacher_layers),
                  *(("student", name) for name in self.student_layers)]
        found = [(rows[kind][layer], layer, kind) for kind in range(3) for layer in range(len(layers))
                 if rows[kind][layer] != _NO_FAULT]
        if not found:
            return
        sample, layer, kind = min(found)
        role, name = layers[layer]
        if kind == 0:
            raise FloatingPointError(
                f"{role} layer {name!r} produced NaN or Inf in the batch starting at sample {sample}")
        if kind == 1:
            raise ValueError(
                f"{role} layer {name!r} has float64 features of magnitude about 2**{rows[3][layer]} in the batch "
                f"starting at sample {sample}: beyond 2**±{MAX_EXPONENT}, the HSIC sums leave float64's "
                "range. CKA is scale-invariant: divide the layer's features by a constant (e.g. their max)"
            )
        raise ValueError(ZERO_BANDWIDTH)

    def merge(self, other: CKAAccumulator) -> CKAAccumulator:
        """Add another accumulator's sums into this one; returns self.

        Both must have the same teacher and student layer names (in order), kernel, debiasing and — for
        the RBF kernel — threshold and sigma; otherwise a ``ValueError`` names what differs. A fault either
        recorded (NaN / Inf features, …) is raised first.
        """
        mine, theirs = self.settings(), other.settings()
        differ = [key for key in mine if mine[key] != theirs.get(key)]
        if differ:
            details = "; ".join(f"{key}: {mine[key]!r} here, {theirs.get(key)!r} in the other" for key in differ)
            raise ValueError(f"can only merge accumulators over the same layers and kernel settings: {details}")
        self._raise(self._faults)
        other._raise(other._faults)
        self._sums += other._sums.to(self._sums.device)
        self.n_samples += other.n_samples
        self.n_batches += other.n_batches
        return self

    def all_reduce(self, group: object = None) -> None:
        """Sum the statistics over all ranks of an initialised ``torch.distributed`` process group."""
        import torch.distributed as dist

        self._raise(self._faults)
        counts = torch.tensor([self.n_samples, self.n_batches], dtype=torch.float64)
        flat = torch.cat([self._sums.cpu(), counts])
        if dist.get_backend(group) == "nccl":
            flat = flat.cuda()
        dist.all_reduce(flat, group=group)
        flat = flat.cpu()
        self._sums.copy_(flat[:-2])
        self.n_samples, self.n_batches = (int(value) for value in flat[-2:].tolist())

    def _host_sums(self) -> tuple[torch.Tensor, ...]:
        """``(cross, teacher_self, student_self, teacher_floor, student_floor)`` on the host, in one transfer,
        after raising any recorded fault."""
        self._raise(self._faults)
        teacher, student = len(self.teacher_layers), len(self.student_layers)
        cross, *rest = self._sums.cpu().split([teacher * student, teacher, student, teacher, student])
        return (cross.view(teacher, student), *rest)

    @staticmethod
    def _dead(sums: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, torch.Tensor]:
        _, teacher_self, student_self, teacher_floor, student_floor = sums
        return teacher_self <= teacher_floor, student_self <= student_floor

    def _dead_names(self, sums: tuple[torch.Tensor, ...]) -> tuple[list[str], list[str]]:
        return tuple(
            [name for name, dead in zip(names, flags.tolist()) if dead]
            for names, flags in zip((self.teacher_layers, self.student_layers), self._dead(sums))
        )

    def dead_layers(self) -> tuple[list[str], list[str]]:
        """``(teacher, student)`` names of the layers whose (U-)centred Gram is zero up to rounding so far."""
        return self._dead_names(self._host_sums())

    def values(self) -> np.ndarray:
        """The ``[n_teacher, n_student]`` CKA matrix from the sums so far; NaN rows / columns for dead
        layers, with one warning per dead layer naming it. A recorded fault is raised here."""
        if self.n_batches == 0:
            raise ValueError("no batch has been added yet")
        sums = self._host_sums()
        cross, teacher_self, student_self = sums[:3]
        norm = torch.sqrt(torch.outer(teacher_self, student_self))
        values = (cross / norm).numpy()
        dead_teacher, dead_student = self._dead(sums)
        values[dead_teacher.numpy(), :] = np.nan
        values[:, dead_student.numpy()] = np.nan
        for role, names in zip(("teacher", "student"), self._dead_names(sums)):
            for name in names:
                warnings.warn(
                    dead_layer_message(f"{role} layer {name!r} (over {self.n_samples:,} samples)", self.debiased),
                    stacklevel=2,
                )
        return values


def cka_matrix(
    teacher: nn.Module,
    student: nn.Module,
    data: object,
    teacher_layers: LayerSelector = "stages",
    student_layers: LayerSelector = "stages",
    kernel: str = "linear",
    debiased: bool = True,
    device: str | torch.device = "auto",
    *,
    batch_size: int = 128,
    n_samples: int | None = None,
    threshold: float = 0.5,
    sigma: float | None = None,
    student_data: object = None,
    progress: bool = True,
    tokens: str = "mean",
    on_batch: Callable[[int, int], None] | None = None,
    precision: str = "full",
) -> CKAResult:
    """CKA between every selected teacher layer and every selected student layer, in one data pass.

    ``data`` is a tensor, an ``(inputs, labels)`` pair, a ``Dataset`` or a ``DataLoader``; layers are
    names, globs or ``"stages"`` (see :func:`workbench.capture`). The RBF bandwidth is set per batch
    from that batch's median distance unless ``sigma`` is given. Under ``torch.distributed`` each rank
    passes its own shard and the sums are all-reduced, so every rank returns the global matrix.

    Language models: a dict batch (``input_ids``, ``attention_mask``, …) reaches the models whole, and
    padding is never a sample. Token features ``[n, t, d]`` enter by ``tokens``: ``"mean"`` (default)
    takes each sequence's mean over its unpadded tokens (one sample per sequence; works across
    tokenisers via ``student_data``); ``"tokens"`` makes every unpadded token a sample (``n_samples``
    then counts tokens; both sides must hold the same token positions). See :mod:`workbench.probes.stream`.

    ``on_batch(batches_done, samples_done)`` is called after each batch is added (e.g. to drive a
    progress bar); an exception it raises ends the pass there (the hooks are removed), which is how a
    caller cancels between batches.

    ``precision="bf16"`` (linear kernel only, opt-in) forms the Grams from bfloat16 features on the
    bfloat16 units (CPU AMX, GPU tensor cores): several times faster products, about 1e-4 from the exact
    value at batches of 64 and 3e-3 at batches of 8 (measured in docs/similarity.md); the default ``"full"``
    stays within 1e-6 of float64.

    Example:
        >>> import torch
        >>> from torch import nn
        >>> teacher = nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 4))
        >>> student = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 4))
        >>> result = cka_matrix(teacher, student, torch.randn(64, 6), "*", "*", batch_size=32,
        ...                     device="cpu", progress=False)
        >>> result.values.shape, result.n_samples
        ((3, 3), 64)
    """
    check_estimator(kernel, threshold, sigma, precision)  # before any forward pass
    accumulator: CKAAccumulator | None = None
    batches = paired_batches(
        teacher, student, data, teacher_layers=teacher_layers, student_layers=student_layers,
        student_data=student_data, batch_size=batch_size, n_samples=n_samples,
        min_batch=4 if debiased else 2, device=device, progress=progress, description="CKA",
        check_finite=False,  # the accumulator folds the check into its one pass over each layer
        tokens=tokens,
    )
    with closing(batches):
        for batch in batches:
            if accumulator is None:
                accumulator = CKAAccumulator(
                    list(batch.teacher_features), list(batch.student_features),
                    kernel=kernel, debiased=debiased, threshold=threshold, sigma=sigma, precision=precision,
                )
            accumulator.update(list(batch.teacher_features.values()), list(batch.student_features.values()))
            del batch  # its activations go before the next forward (the loop variable would keep them)
            if on_batch is not None:
                on_batch(accumulator.n_batches, accumulator.n_samples)
    if accumulator is None:
        raise ValueError("the data held no samples")
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        accumulator.all_reduce()
    return CKAResult(
        values=accumulator.values(),
        teacher_layers=accumulator.teacher_layers,
        student_layers=accumulator.student_layers,
        n_samples=accumulator.n_samples,
        kernel=kernel,
        debiased=debiased,
        teacher_name=type(teacher).__name__,
        student_name=type(student).__name__,
        precision=precision,
    )
