"""Decoupled knowledge distillation (DKD): KD split into a target-class and a non-target-class part."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from workbench.losses.base import Term, check_setting, logit_rows
from workbench.losses.logits import kl_rows


class DKD(Term):
    """Decoupled KD: ``α · TCKD + β · NCKD``, each ``T²``-scaled and averaged over the batch.

    With ``p = softmax(logits / T)`` and ``g`` the target class of a sample:

    - TCKD = ``KL(b_t ‖ b_s)`` on the binary distributions ``b = [p_g, 1 − p_g]`` (target vs the rest);
    - NCKD = ``KL(p̂_t ‖ p̂_s)`` on the non-target classes renormalised, ``p̂_i = p_i / (1 − p_g)``, i ≠ g.

    Per sample, classical KD decomposes exactly as ``KL(p_t ‖ p_s) = TCKD + (1 − p_t,g) · NCKD``
    (Zhao et al., Eq. 1), so ``DKD(alpha=1, beta=1)`` is *not* KD: it drops the teacher-confidence
    weight ``1 − p_t,g`` on NCKD, and is ≥ KD. :meth:`parts` returns the per-sample terms.

    Zhao, Cui, Song, Qiu & Liang (2022), "Decoupled Knowledge Distillation",
    https://arxiv.org/abs/2203.08679. Defaults ``alpha=1, beta=8, T=4`` (CIFAR-100, as mdistiller; the
    paper uses ``beta=0.5`` on ImageNet and warms the DKD weight up linearly over the first 20 epochs —
    that warm-up belongs to the loss weight in the training loop, not to this term). The values equal
    mdistiller's ``dkd_loss``; non-target classes are dropped instead of masked by ``-1000``. Classes
    masked by ``-inf`` on both sides take no part (as in :mod:`workbench.losses.logits`).
    Shapes: logits ``[n, C]`` (or ``[n, t, C]``), targets ``[n]`` (or ``[n, t]``, -100 skipped) -> scalar.

    Example:
        >>> import torch
        >>> student = torch.tensor([[1.0, 0.0, 0.0]])
        >>> DKD()(student, student.clone(), torch.tensor([0])).item()
        0.0
    """

    def __init__(self, alpha: float = 1.0, beta: float = 8.0, T: float = 4.0, teacher_detach: bool = True) -> None:
        super().__init__(teacher_detach)
        self.alpha, self.beta = check_setting("DKD", "alpha", alpha), check_setting("DKD", "beta", beta)
        self.T = check_setting("DKD", "T", T, positive=True)

    def parts(
        self, student: torch.Tensor, teacher: torch.Tensor, targets: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-sample ``(T² · TCKD, T² · NCKD)``, each ``[r]``."""
        student, teacher, targets = logit_rows(student, self.teacher_side(teacher), targets, "DKD", needs_targets=True)
        rows, classes = student.shape
        if classes < 2:
            raise ValueError(f"DKD needs at least 2 classes, got {classes}")
        is_target = F.one_hot(targets, classes).bool()
        binary, non_target = [], []
        for logits in (student, teacher):
            scaled = logits / self.T
            log_p = F.log_softmax(scaled, dim=1)
            log_target = log_p[is_target]
            log_rest = torch.logsumexp(log_p.masked_fill(is_target, -torch.inf), dim=1)  # log(1 − p_g)
            binary.append(torch.stack([log_target, log_rest], dim=1))
            non_target.append(F.log_softmax(scaled[~is_target].view(rows, classes - 1), dim=1))
        tckd, nckd = kl_rows(binary[1], binary[0]), kl_rows(non_target[1], non_target[0])
        return self.T**2 * tckd, self.T**2 * nckd

    def forward(
        self, student: torch.Tensor, teacher: torch.Tensor, targets: torch.Tensor | None = None
    ) -> torch.Tensor:
        if targets is None:
            raise ValueError("DKD needs targets: the class index of each sample, shape [n]")
        tckd, nckd = self.parts(student, teacher, targets)
        return self.alpha * tckd.mean() + self.beta * nckd.mean()

    def extra_repr(self) -> str:
        return f"alpha={self.alpha}, beta={self.beta}, T={self.T}"
