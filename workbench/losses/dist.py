"""DIST: distillation from a stronger teacher by matching relations (Pearson correlations), not values."""
from __future__ import annotations

import torch

from workbench.losses.base import Term, check_setting, logit_rows


def pearson_rows(a: torch.Tensor, b: torch.Tensor, present: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """Pearson correlation of each row of ``a`` with the same row of ``b`` over the ``present`` entries:
    ``[r, k]`` -> ``[r]`` (a row with fewer than two present entries is constant: 0).

    Example:
        >>> import torch
        >>> a, b = torch.tensor([[1.0, 2.0, 3.0, 9.0]]), torch.tensor([[2.0, 4.0, 7.0, 0.0]])
        >>> pearson_rows(a, b, torch.tensor([[True, True, True, False]])).round(decimals=4)
        tensor([0.9934])
    """
    count = present.sum(dim=1, keepdim=True).clamp(min=1)
    a = (a - (a * present).sum(dim=1, keepdim=True) / count) * present
    b = (b - (b * present).sum(dim=1, keepdim=True) / count) * present
    return (a * b).sum(dim=1) / (a.norm(dim=1) * b.norm(dim=1) + eps)


class DIST(Term):
    """DIST: ``T² · [β · inter-class + γ · intra-class]`` relation loss on ``Y = softmax(logits / T)``.

    - inter-class = ``1 − mean over samples i of ρ(Y_s[i, :], Y_t[i, :])`` (Pearson across the classes);
    - intra-class = ``1 − mean over classes j of ρ(Y_s[:, j], Y_t[:, j])`` (Pearson across the batch).

    Pearson's ρ is ``⟨a − ā, b − b̄⟩ / (‖a − ā‖ ‖b − b̄‖ + 1e-8)``, as in the authors' code, so a
    constant row or column counts as uncorrelated. Needs a batch of at least 2 for the intra-class term.
    A class whose logit is ``-inf`` on both sides (vocabulary padding) is left out of its row's
    correlation, and a class left out of every row out of the intra-class mean, so the value is the one
    on the logits without those columns.
    Huang, You, Wang, Qian & Xu (2022), "Knowledge Distillation from A Stronger Teacher",
    https://arxiv.org/abs/2205.10536. Defaults ``beta=1, gamma=1, T=1`` (the paper's ImageNet setting).
    Shapes: logits ``[n, C]`` (or ``[n, t, C]``, each token a row) -> scalar.

    Example:
        >>> import torch
        >>> logits = torch.tensor([[2.0, 0.0, 1.0], [0.0, 3.0, 1.0]])
        >>> round(DIST()(logits, logits.clone()).item(), 4)
        0.0
    """

    def __init__(self, beta: float = 1.0, gamma: float = 1.0, T: float = 1.0, teacher_detach: bool = True) -> None:
        super().__init__(teacher_detach)
        self.beta, self.gamma = check_setting("DIST", "beta", beta), check_setting("DIST", "gamma", gamma)
        self.T = check_setting("DIST", "T", T, positive=True)

    def forward(
        self, student: torch.Tensor, teacher: torch.Tensor, targets: torch.Tensor | None = None
    ) -> torch.Tensor:
        student, teacher, _ = logit_rows(student, self.teacher_side(teacher), targets, "DIST")
        probs_s, probs_t = (torch.softmax(x / self.T, dim=1) for x in (student, teacher))
        present = ~(torch.isneginf(student) & torch.isneginf(teacher))
        inter = 1 - pearson_rows(probs_s, probs_t, present).mean()
        in_some_row = present.any(dim=0)  # a weighted mean, not an index: no device synchronisation
        intra = 1 - (pearson_rows(probs_s.T, probs_t.T, present.T) * in_some_row).sum() / in_some_row.sum()
        return self.T**2 * (self.beta * inter + self.gamma * intra)

    def extra_repr(self) -> str:
        return f"beta={self.beta}, gamma={self.gamma}, T={self.T}"
