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

import numpy as np
import torch
from torch import nn

from workbench.capture import LayerSelector
from workbench.probes.cka_result import CKAResult
from workbench.probes.kernels import (
    KERNELS, centre_gram, centred_gram, check_rbf_settings, dead_layer_message, hsic_scale, rbf_from_gram,
    scaled_centred_gram, zero_floor,
)
from workbench.probes.stream import paired_batches


def _layer_labels(layers: int | Sequence[str]) -> list[str]:
    return [f"#{index}" for index in range(layers)] if isinstance(layers, int) else list(layers)


def check_kernel(kernel: str) -> None:
    """Raise a ``ValueError`` naming the choices unless ``kernel`` is one of :data:`KERNELS`."""
    if kernel not in KERNELS:
        raise ValueError(f"kernel must be one of {KERNELS}, got {kernel!r}")


MAX_EXPONENT = 200
"""Float64 features whose largest magnitude is beyond 2**±200 (≈ 1e±60) are refused: the HSIC sums
(fourth powers of the features) would leave float64's range. Every float32 / half / integer layer fits."""
SAFE_GRAM_RANGE = {torch.float32: (2.0**-60, math.inf), torch.float64: (2.0**-400, 2.0**400)}
"""Largest diagonal entry of a Gram for which the plain product is trusted. Below 2**-60 a float32 layer's
features are below about 2**-30 (1e-9), well above where float32 products lose digits to the subnormal
range (below 2**-103), so the rescaled path takes over in time; float64: the HSIC sums' range."""


class CKAAccumulator:
    """Sufficient statistics of the minibatch CKA between teacher and student layers (names, or counts).

    Each batch's Gram is formed in the features' dtype (float32 stays float32, the fast path) and summed
    in float64 in the features' own units. Where the plain float32 product would under- or overflow
    (activations around 1e-23, or near 1e38) the centred features are first scaled by a power of two
    (exact: no digit changes), so float32 activations of any magnitude give the exact value. Integer and
    bool activations are centred exactly (int64 / float64) before a float32 product.

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
    ):
        check_kernel(kernel)
        if kernel == "rbf":
            check_rbf_settings(threshold, sigma)
        self.kernel, self.debiased, self.threshold, self.sigma = kernel, debiased, threshold, sigma
        self.teacher_layers = _layer_labels(teacher_layers)
        self.student_layers = _layer_labels(student_layers)
        self.cross = torch.zeros(len(self.teacher_layers), len(self.student_layers), dtype=torch.float64)
        self.teacher_self = torch.zeros(len(self.teacher_layers), dtype=torch.float64)
        self.student_self = torch.zeros(len(self.student_layers), dtype=torch.float64)
        # Σ_b scale · zero_floor(trace K_b): the self terms at or below these are rounding (a dead layer)
        self.teacher_floor = torch.zeros(len(self.teacher_layers), dtype=torch.float64)
        self.student_floor = torch.zeros(len(self.student_layers), dtype=torch.float64)
        self.n_samples = 0
        self.n_batches = 0

    def settings(self) -> dict[str, object]:
        """What must agree for two accumulators to merge: layers, kernel, estimator and RBF bandwidth."""
        rbf = {"threshold": self.threshold, "sigma": self.sigma} if self.kernel == "rbf" else {}
        return {"teacher_layers": self.teacher_layers, "student_layers": self.student_layers,
                "kernel": self.kernel, "debiased": self.debiased, **rbf}

    def _layer_gram(self, value: torch.Tensor, role: str, layer: str) -> tuple[torch.Tensor, torch.dtype]:
        """One layer's linear Gram in float64 (the features' units) and the dtype its product ran in.

        Fast path: the plain product of the centred features in their dtype (integers: centred exactly,
        multiplied in float32). One host read per layer, as before, checks that it is finite and that its
        largest diagonal entry is inside :data:`SAFE_GRAM_RANGE`; otherwise (NaN/Inf features, a float32
        mean that overflows, features so small that float32 products lose digits, a dead layer) the
        careful path decides.
        """
        if value.is_floating_point():
            gram, exponent = centred_gram(value), None
        else:
            gram, exponent = scaled_centred_gram(value)
        low, high = SAFE_GRAM_RANGE.get(gram.dtype, SAFE_GRAM_RANGE[torch.float32])
        largest = gram.diagonal().amax()
        if not bool(torch.isfinite(gram).all() & (largest >= low) & (largest <= high)):
            gram, exponent = self._rescaled_gram(value, role, layer)
        gram64 = gram.to(torch.float64)
        if exponent is not None:
            gram64 = gram64 * ((exponent.to(torch.int64) * 2 + 1023) << 52).view(torch.float64)  # 4**e, exact
        return gram64, gram.dtype

    def _rescaled_gram(self, value: torch.Tensor, role: str, layer: str) -> tuple[torch.Tensor, torch.Tensor]:
        """The careful path: NaN/Inf refused, else the Gram of features scaled by a power of two (exact)."""
        if not torch.isfinite(value).all():
            raise FloatingPointError(
                f"{role} layer {layer!r} produced NaN or Inf in the batch starting at sample {self.n_samples}"
            )
        gram, exponent = scaled_centred_gram(value)
        if not torch.isfinite(gram).all():  # a float32 column mean that overflows
            gram, exponent = scaled_centred_gram(value.to(torch.float64))
        if gram.dtype == torch.float64 and abs(int(exponent)) > MAX_EXPONENT:
            raise ValueError(
                f"{role} layer {layer!r} has float64 features of magnitude about 2**{int(exponent)} in the batch "
                f"starting at sample {self.n_samples}: beyond 2**±{MAX_EXPONENT}, the HSIC sums leave float64's "
                "range. CKA is scale-invariant: divide the layer's features by a constant (e.g. their max)"
            )
        return gram, exponent

    def _centred_grams(
        self, features: Sequence[torch.Tensor], role: str, layers: list[str]
    ) -> tuple[torch.Tensor, torch.Tensor, list[torch.dtype]]:
        """``[L, n·n]`` float64 (U-)centred Grams, flattened; ``[L]`` traces before centring; product dtypes."""
        n = features[0].shape[0]
        grams = torch.empty(len(features), n, n, dtype=torch.float64, device=features[0].device)
        dtypes = []
        for index, value in enumerate(features):
            gram, dtype = self._layer_gram(value.reshape(n, -1), role, layers[index])
            grams[index] = gram
            if self.kernel == "rbf":
                grams[index] = rbf_from_gram(grams[index], threshold=self.threshold, sigma=self.sigma)
                dtype = torch.float64  # the kernel's entries are computed in float64
            dtypes.append(dtype)
        traces = grams.diagonal(dim1=1, dim2=2).sum(dim=1)
        return centre_gram(grams, unbiased=self.debiased, inplace=True).flatten(1), traces, dtypes

    def update(self, teacher_features: Sequence[torch.Tensor], student_features: Sequence[torch.Tensor]) -> None:
        """Add one batch: a ``[n, ...]`` tensor per teacher layer and per student layer, same n."""
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
        teacher_grams, teacher_traces, teacher_dtypes = self._centred_grams(teacher_features, "teacher",
                                                                            self.teacher_layers)
        student_grams, student_traces, student_dtypes = self._centred_grams(student_features, "student",
                                                                            self.student_layers)
        scale = hsic_scale(n, unbiased=self.debiased)
        # all L_teacher × L_student cross terms in one matrix product
        self.cross += (scale * teacher_grams @ student_grams.T).cpu()
        for grams, traces, dtypes, sums, floors in (
            (teacher_grams, teacher_traces, teacher_dtypes, self.teacher_self, self.teacher_floor),
            (student_grams, student_traces, student_dtypes, self.student_self, self.student_floor),
        ):
            self_terms, traces = torch.stack([scale * grams.square().sum(dim=1), traces]).cpu()  # one transfer
            sums += self_terms
            floors += scale * torch.stack([zero_floor(t, d) for t, d in zip(traces, dtypes)])
        self.n_samples += n
        self.n_batches += 1

    def merge(self, other: CKAAccumulator) -> CKAAccumulator:
        """Add another accumulator's sums into this one; returns self.

        Both must have the same teacher and student layer names (in order), kernel, debiasing and — for
        the RBF kernel — threshold and sigma; otherwise a ``ValueError`` names what differs.
        """
        mine, theirs = self.settings(), other.settings()
        differ = [key for key in mine if mine[key] != theirs.get(key)]
        if differ:
            details = "; ".join(f"{key}: {mine[key]!r} here, {theirs.get(key)!r} in the other" for key in differ)
            raise ValueError(f"can only merge accumulators over the same layers and kernel settings: {details}")
        self.cross += other.cross
        self.teacher_self += other.teacher_self
        self.student_self += other.student_self
        self.teacher_floor += other.teacher_floor
        self.student_floor += other.student_floor
        self.n_samples += other.n_samples
        self.n_batches += other.n_batches
        return self

    def all_reduce(self, group: object = None) -> None:
        """Sum the statistics over all ranks of an initialised ``torch.distributed`` process group."""
        import torch.distributed as dist

        parts = [self.cross, self.teacher_self, self.student_self, self.teacher_floor, self.student_floor]
        counts = torch.tensor([self.n_samples, self.n_batches], dtype=torch.float64)
        flat = torch.cat([*(part.flatten() for part in parts), counts])
        if dist.get_backend(group) == "nccl":
            flat = flat.cuda()
        dist.all_reduce(flat, group=group)
        flat = flat.cpu()
        start = 0
        for part in parts:
            part.copy_(flat[start : start + part.numel()].reshape(part.shape))
            start += part.numel()
        self.n_samples, self.n_batches = (int(value) for value in flat[-2:].tolist())

    def _dead(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.teacher_self <= self.teacher_floor, self.student_self <= self.student_floor

    def dead_layers(self) -> tuple[list[str], list[str]]:
        """``(teacher, student)`` names of the layers whose (U-)centred Gram is zero up to rounding so far."""
        return tuple(
            [name for name, dead in zip(names, flags.tolist()) if dead]
            for names, flags in zip((self.teacher_layers, self.student_layers), self._dead())
        )

    def values(self) -> np.ndarray:
        """The ``[n_teacher, n_student]`` CKA matrix from the sums so far; NaN rows / columns for dead
        layers, with one warning per dead layer naming it."""
        if self.n_batches == 0:
            raise ValueError("no batch has been added yet")
        norm = torch.sqrt(torch.outer(self.teacher_self, self.student_self))
        values = (self.cross / norm).numpy()
        dead_teacher, dead_student = self._dead()
        values[dead_teacher.numpy(), :] = np.nan
        values[:, dead_student.numpy()] = np.nan
        for role, names in zip(("teacher", "student"), self.dead_layers()):
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
    check_kernel(kernel)
    if kernel == "rbf":
        check_rbf_settings(threshold, sigma)  # before any forward pass
    accumulator: CKAAccumulator | None = None
    batches = paired_batches(
        teacher, student, data, teacher_layers=teacher_layers, student_layers=student_layers,
        student_data=student_data, batch_size=batch_size, n_samples=n_samples,
        min_batch=4 if debiased else 2, device=device, progress=progress, description="CKA",
        check_finite=False,  # the accumulator checks each n×n Gram instead of every n×d feature
        tokens=tokens,
    )
    with closing(batches):
        for batch in batches:
            if accumulator is None:
                accumulator = CKAAccumulator(
                    list(batch.teacher_features), list(batch.student_features),
                    kernel=kernel, debiased=debiased, threshold=threshold, sigma=sigma,
                )
            accumulator.update(list(batch.teacher_features.values()), list(batch.student_features.values()))
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
    )
