"""OFA-KD's loss: cross-entropy on the teacher's probabilities with the target class enhanced by a power γ."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from workbench.losses.base import Term, check_setting, logit_rows

ENHANCE_MODES = ("released", "target")


class OFALoss(Term):
    """OFA loss: ``−mean_i Σ_c w_i,c · log p_s,c``, the teacher's probabilities re-weighted towards the target.

    With ``p_t = softmax(z_t / T)``, ``log p_s = log_softmax(z_s / T)`` and ``y`` the one-hot target:

    - ``enhance="released"`` (default, the authors' released ``ofa_loss``): ``w_c = (p_t,c + y_c)^γ − y_c``,
      so the non-target probabilities are raised to γ too;
    - ``enhance="target"`` (the paper's text): ``w_y = (p_t,y + 1)^γ − 1`` at the target, ``w_c = p_t,c``
      elsewhere.

    For ``γ = 1`` both are ``w = p_t``: cross-entropy on the teacher's probabilities (KD's KL plus the
    teacher's entropy, a constant). γ > 1 puts more weight on the target class when the teacher is
    unsure of it (the paper uses γ in 1.0–1.5). As in the released code the value is *not* scaled by
    ``T²``. It uses ``log_softmax`` (the released ``log(softmax)`` gives NaN once a probability
    underflows). A class with weight 0 (``-inf`` in the teacher and not the target) takes no part, as in
    :mod:`workbench.losses.logits`; a student ``-inf`` where the weight is positive gives ``+inf``.

    Hao, Guo, Chen, Wang, Yang & Xu (2023), "One-for-All: Bridge the Gap Between Heterogeneous
    Architectures in Knowledge Distillation", NeurIPS, https://arxiv.org/abs/2310.19444.
    Shapes: logits ``[n, C]`` (or ``[n, t, C]``), targets ``[n]`` (or ``[n, t]``, -100 skipped) -> scalar.

    Example:
        >>> import math, torch
        >>> student, teacher = torch.zeros(1, 2), torch.tensor([[0.0, math.log(3.0)]])  # p_t = [1/4, 3/4]
        >>> round(OFALoss(gamma=2.0)(student, teacher, torch.tensor([1])).item(), 4)  # (1/16 + 49/16 − 1)·ln 2
        1.4729
        >>> round(OFALoss(gamma=2.0, enhance="target")(student, teacher, torch.tensor([1])).item(), 4)  # (1/4 + 33/16)·ln 2
        1.6029
    """

    def __init__(
        self, gamma: float = 1.0, T: float = 1.0, enhance: str = "released", teacher_detach: bool = True
    ) -> None:
        super().__init__(teacher_detach)
        self.gamma = check_setting("OFALoss", "gamma", gamma, positive=True)
        self.T = check_setting("OFALoss", "T", T, positive=True)
        if enhance not in ENHANCE_MODES:
            raise ValueError(f"OFALoss: enhance must be one of {ENHANCE_MODES}, got {enhance!r}")
        self.enhance = enhance

    def weights(self, teacher_rows: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """The weights ``w`` ``[r, C]`` of each class's ``−log p_s`` from teacher logit rows and targets ``[r]``."""
        p_t = F.softmax(teacher_rows / self.T, dim=1)
        y = F.one_hot(targets, p_t.shape[1]).to(p_t.dtype)
        if self.enhance == "released":
            return (p_t + y).pow(self.gamma) - y
        return torch.where(y.bool(), (p_t + 1.0).pow(self.gamma) - 1.0, p_t)

    def forward(
        self, student: torch.Tensor, teacher: torch.Tensor, targets: torch.Tensor | None = None
    ) -> torch.Tensor:
        if targets is None:
            raise ValueError("OFALoss needs targets: the class index of each sample, shape [n] (or [n, t])")
        student, teacher, targets = logit_rows(student, self.teacher_side(teacher), targets, "OFALoss",
                                               needs_targets=True)
        w = self.weights(teacher, targets)
        # weight 0 (teacher -inf, not the target): 0 · log p_s is 0 even where log p_s is -inf, with 0 gradient
        log_s = F.log_softmax(student / self.T, dim=1).masked_fill(w == 0, 0.0)
        return -(w * log_s).sum(dim=1).mean()

    def extra_repr(self) -> str:
        return f"gamma={self.gamma}, T={self.T}, enhance={self.enhance!r}"
