"""CKA as a loss: ``1 − CKA(student, teacher)`` on the batch, with the probes' own centring math."""
from __future__ import annotations

import torch

from workbench.losses.base import Term, check_same_samples
from workbench.probes.kernels import centred_gram, cka_from_grams


class CKALoss(Term):
    """``1 − linear CKA`` of the batch: ``1 − ⟨K̃_s, K̃_t⟩ / (‖K̃_s‖ ‖K̃_t‖)``, ``K = X Xᵀ``, columns centred.

    ``debiased=True`` (default) U-centres the Grams (the unbiased HSIC of Song et al. 2012), so a batch of
    unrelated features scores ≈ 0 instead of the biased estimator's positive floor; it needs n ≥ 4.
    The Grams come from :func:`workbench.probes.kernels.centred_gram` (columns centred *before* the
    product, which keeps float32 exact) and :func:`~workbench.probes.kernels.cka_from_grams`, so the value
    equals ``1 − workbench.similarity.linear_cka(s, t, debiased=True)`` on the same batch. Invariant to
    orthogonal transforms and isotropic scaling of either side; widths may differ (no projector).
    Kornblith, Norouzi, Lee & Hinton (2019), "Similarity of Neural Network Representations Revisited",
    https://arxiv.org/abs/1905.00414; as a distillation loss e.g. Saha et al. (2022),
    https://arxiv.org/abs/2206.04524 (not debiased there). Undefined (NaN) when a side has no variance.
    Shapes: ``[n, ...]`` on each side, flattened per sample -> scalar in [0, 2] (≈ [0, 1] in practice).

    Example:
        >>> import torch
        >>> x = torch.randn(16, 8, dtype=torch.float64)
        >>> rotation = torch.linalg.qr(torch.randn(8, 8, dtype=torch.float64))[0]
        >>> abs(CKALoss()(x @ rotation, x).item()) < 1e-10
        True
    """

    def __init__(self, debiased: bool = True, teacher_detach: bool = True) -> None:
        super().__init__(teacher_detach)
        self.debiased = debiased

    def forward(
        self, student: torch.Tensor, teacher: torch.Tensor, targets: torch.Tensor | None = None
    ) -> torch.Tensor:
        check_same_samples(student, teacher, "CKALoss")
        if self.debiased and student.shape[0] < 4:
            raise ValueError(f"CKALoss(debiased=True) needs at least 4 samples per batch, got {student.shape[0]}")
        grams = [centred_gram(x.reshape(x.shape[0], -1)) for x in (student, self.teacher_side(teacher))]
        return 1 - cka_from_grams(grams[0], grams[1].to(grams[0].dtype), debiased=self.debiased)

    def extra_repr(self) -> str:
        return f"debiased={self.debiased}"
