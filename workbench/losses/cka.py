"""CKA as a loss: ``1 − CKA(student, teacher)`` on the batch, with the probes' own centring math."""
from __future__ import annotations

import warnings

import torch

from workbench.losses.base import Term, check_same_samples
from workbench.probes.kernels import cka_parts, dead_layer_message, normalised_gram


class CKALoss(Term):
    """``1 − linear CKA`` of the batch: ``1 − ⟨K̃_s, K̃_t⟩ / (‖K̃_s‖ ‖K̃_t‖)``, ``K = X Xᵀ``, columns centred.

    ``debiased=True`` (default) U-centres the Grams (the unbiased HSIC of Song et al. 2012), so a batch of
    unrelated features scores ≈ 0 instead of the biased estimator's positive floor; it needs n ≥ 4.
    The Grams come from :func:`workbench.probes.kernels.normalised_gram` (columns centred *before* the
    product, which keeps float32 exact, and scaled by a power of two, so 1e-23 float32 features neither
    underflow nor overflow) and :func:`~workbench.probes.kernels.cka_parts`, so the value
    equals ``1 − workbench.similarity.linear_cka(s, t, debiased=True)`` on the same batch. Invariant to
    orthogonal transforms and isotropic scaling of either side; widths may differ (no projector).
    Kornblith, Norouzi, Lee & Hinton (2019), "Similarity of Neural Network Representations Revisited",
    https://arxiv.org/abs/1905.00414; as a distillation loss e.g. Saha et al. (2022),
    https://arxiv.org/abs/2206.04524 (not debiased there).
    Undefined when a side's (U-)centred Gram is zero up to rounding (a dead layer, a constant batch, or —
    debiased — all samples but one alike): the loss is then NaN with a warning naming the side, and
    ``workbench.train.fit`` stops at that step naming the term. Deciding it costs one host read of a flag.
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
        grams = [normalised_gram(x.reshape(x.shape[0], -1))[0] for x in (student, self.teacher_side(teacher))]
        value, student_dead, teacher_dead = cka_parts(grams[0], grams[1].to(grams[0].dtype), debiased=self.debiased)
        if bool(student_dead | teacher_dead):
            for side, dead in (("student", student_dead), ("teacher", teacher_dead)):
                if dead:
                    warnings.warn(
                        f"CKALoss on a batch of {student.shape[0]}: "
                        + dead_layer_message(f"the {side} layer given to this term", self.debiased)
                        + " A NaN loss stops training: give this term another layer pair.",
                        stacklevel=2,
                    )
        return 1 - value

    def extra_repr(self) -> str:
        return f"debiased={self.debiased}"
