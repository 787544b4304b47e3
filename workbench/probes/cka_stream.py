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

from collections.abc import Sequence
from contextlib import closing

import numpy as np
import torch
from torch import nn

from workbench.capture import LayerSelector
from workbench.probes.cka_result import CKAResult
from workbench.probes.kernels import KERNELS, centre_gram, centred_gram, hsic_scale, rbf_from_gram
from workbench.probes.stream import paired_batches


def _layer_labels(layers: int | Sequence[str]) -> list[str]:
    return [f"#{index}" for index in range(layers)] if isinstance(layers, int) else list(layers)


def check_kernel(kernel: str) -> None:
    """Raise a ``ValueError`` naming the choices unless ``kernel`` is one of :data:`KERNELS`."""
    if kernel not in KERNELS:
        raise ValueError(f"kernel must be one of {KERNELS}, got {kernel!r}")


class CKAAccumulator:
    """Sufficient statistics of the minibatch CKA between teacher and student layers (names, or counts).

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
        self.kernel, self.debiased, self.threshold, self.sigma = kernel, debiased, threshold, sigma
        self.teacher_layers = _layer_labels(teacher_layers)
        self.student_layers = _layer_labels(student_layers)
        self.cross = torch.zeros(len(self.teacher_layers), len(self.student_layers), dtype=torch.float64)
        self.teacher_self = torch.zeros(len(self.teacher_layers), dtype=torch.float64)
        self.student_self = torch.zeros(len(self.student_layers), dtype=torch.float64)
        self.n_samples = 0
        self.n_batches = 0

    def _centred_grams(self, features: Sequence[torch.Tensor], role: str, layers: list[str]) -> torch.Tensor:
        """``[L, n·n]`` float64: each layer's Gram, (U-)centred and flattened.

        The NaN/Inf check reads the n×n Gram, not the n×d features: a non-finite feature always makes
        its Gram non-finite, and a finite one that overflows float32 is recomputed in float64.
        """
        n = features[0].shape[0]
        grams = torch.empty(len(features), n, n, dtype=torch.float64, device=features[0].device)
        for index, value in enumerate(features):
            value = value.reshape(n, -1)
            gram = centred_gram(value)
            if not torch.isfinite(gram).all():
                if not torch.isfinite(value).all():
                    raise FloatingPointError(
                        f"{role} layer {layers[index]!r} produced NaN or Inf in the batch starting at "
                        f"sample {self.n_samples}"
                    )
                gram = centred_gram(value.to(torch.float64))
            grams[index] = gram
            if self.kernel == "rbf":
                grams[index] = rbf_from_gram(grams[index], threshold=self.threshold, sigma=self.sigma)
        return centre_gram(grams, unbiased=self.debiased, inplace=True).flatten(1)

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
        teacher_grams = self._centred_grams(teacher_features, "teacher", self.teacher_layers)
        student_grams = self._centred_grams(student_features, "student", self.student_layers)
        scale = hsic_scale(n, unbiased=self.debiased)
        # all L_teacher × L_student cross terms in one matrix product
        self.cross += (scale * teacher_grams @ student_grams.T).cpu()
        self.teacher_self += (scale * teacher_grams.square().sum(dim=1)).cpu()
        self.student_self += (scale * student_grams.square().sum(dim=1)).cpu()
        self.n_samples += n
        self.n_batches += 1

    def merge(self, other: CKAAccumulator) -> CKAAccumulator:
        """Add another accumulator's sums into this one (same layers and settings); returns self."""
        if other.cross.shape != self.cross.shape or (other.kernel, other.debiased) != (self.kernel, self.debiased):
            raise ValueError("can only merge accumulators over the same layers, kernel and debiasing")
        self.cross += other.cross
        self.teacher_self += other.teacher_self
        self.student_self += other.student_self
        self.n_samples += other.n_samples
        self.n_batches += other.n_batches
        return self

    def all_reduce(self, group: object = None) -> None:
        """Sum the statistics over all ranks of an initialised ``torch.distributed`` process group."""
        import torch.distributed as dist

        counts = torch.tensor([self.n_samples, self.n_batches], dtype=torch.float64)
        flat = torch.cat([self.cross.flatten(), self.teacher_self, self.student_self, counts])
        if dist.get_backend(group) == "nccl":
            flat = flat.cuda()
        dist.all_reduce(flat, group=group)
        flat = flat.cpu()
        n_cross, n_teacher = self.cross.numel(), self.teacher_self.numel()
        self.cross = flat[:n_cross].reshape(self.cross.shape).clone()
        self.teacher_self = flat[n_cross : n_cross + n_teacher].clone()
        self.student_self = flat[n_cross + n_teacher : -2].clone()
        self.n_samples, self.n_batches = (int(value) for value in flat[-2:].tolist())

    def values(self) -> np.ndarray:
        """The ``[n_teacher, n_student]`` CKA matrix from the sums so far."""
        if self.n_batches == 0:
            raise ValueError("no batch has been added yet")
        norm = torch.sqrt(torch.outer(self.teacher_self, self.student_self))
        return (self.cross / norm).numpy()


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
) -> CKAResult:
    """CKA between every selected teacher layer and every selected student layer, in one data pass.

    ``data`` is a tensor, an ``(inputs, labels)`` pair, a ``Dataset`` or a ``DataLoader``; layers are
    names, globs or ``"stages"`` (see :func:`workbench.capture`). The RBF bandwidth is set per batch
    from that batch's median distance unless ``sigma`` is given. Under ``torch.distributed`` each rank
    passes its own shard and the sums are all-reduced, so every rank returns the global matrix.

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
    accumulator: CKAAccumulator | None = None
    batches = paired_batches(
        teacher, student, data, teacher_layers=teacher_layers, student_layers=student_layers,
        student_data=student_data, batch_size=batch_size, n_samples=n_samples,
        min_batch=4 if debiased else 2, device=device, progress=progress, description="CKA",
        check_finite=False,  # the accumulator checks each n×n Gram instead of every n×d feature
    )
    with closing(batches):
        for batch in batches:
            if accumulator is None:
                accumulator = CKAAccumulator(
                    list(batch.teacher_features), list(batch.student_features),
                    kernel=kernel, debiased=debiased, threshold=threshold, sigma=sigma,
                )
            accumulator.update(list(batch.teacher_features.values()), list(batch.student_features.values()))
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
