"""Divergences between softened class distributions: KD (forward KL), reverse KL, Jensen–Shannon.

All take logits ``[n, C]`` (or token logits ``[n, t, C]``, averaged over tokens; with ``targets`` of shape
``[n, t]``, tokens whose target is -100 are skipped), divide them by the temperature ``T``, and scale the
divergence by ``T²`` so gradients keep their size across temperatures (Hinton et al. 2015).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from workbench.losses.base import Term, logit_rows


def _kl(log_p: torch.Tensor, log_q: torch.Tensor) -> torch.Tensor:
    """``mean over rows of KL(p ‖ q)`` from log-probabilities ``[r, C]``."""
    return F.kl_div(log_q, log_p, reduction="batchmean", log_target=True)


class _TemperedDivergence(Term):
    """Shared body: validate logits, soften both sides at ``T``, scale ``divergence(log_s, log_t)`` by T²."""

    def __init__(self, T: float, teacher_detach: bool = True) -> None:
        super().__init__(teacher_detach)
        self.T = T

    def divergence(self, log_s: torch.Tensor, log_t: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def forward(
        self, student: torch.Tensor, teacher: torch.Tensor, targets: torch.Tensor | None = None
    ) -> torch.Tensor:
        student, teacher, _ = logit_rows(student, self.teacher_side(teacher), targets, type(self).__name__)
        log_s, log_t = (F.log_softmax(x / self.T, dim=1) for x in (student, teacher))
        return self.T**2 * self.divergence(log_s, log_t)

    def extra_repr(self) -> str:
        return f"T={self.T}"


class KD(_TemperedDivergence):
    """Classical knowledge distillation: ``T² · KL(p_t^T ‖ p_s^T)``, averaged over the batch.

    ``p^T = softmax(logits / T)``. Hinton, Vinyals & Dean (2015), "Distilling the Knowledge in a Neural
    Network", https://arxiv.org/abs/1503.02531. Default ``T = 4`` (the CIFAR-100 setting of CRD /
    mdistiller). Shapes: student and teacher logits ``[n, C]`` or ``[n, t, C]`` -> scalar.

    Example:
        >>> import torch
        >>> student, teacher = torch.tensor([[0.0, 0.0]]), torch.tensor([[0.0, 4.0 * torch.log(torch.tensor(3.0))]])
        >>> round(KD(T=4.0)(student, teacher).item(), 4)  # 16 · KL([1/4, 3/4] ‖ [1/2, 1/2])
        2.093
    """

    def __init__(self, T: float = 4.0, teacher_detach: bool = True) -> None:
        super().__init__(T, teacher_detach)

    def divergence(self, log_s: torch.Tensor, log_t: torch.Tensor) -> torch.Tensor:
        return _kl(log_t, log_s)


class ReverseKL(_TemperedDivergence):
    """Reverse KL: ``T² · KL(p_s^T ‖ p_t^T)`` — mode-seeking, the student's own mass is what is weighed.

    Used for language models by MiniLLM (Gu et al. 2024, "MiniLLM: Knowledge Distillation of Large
    Language Models", https://arxiv.org/abs/2306.08543). Default ``T = 1`` (as in LLM distillation).
    Shapes: logits ``[n, C]`` or ``[n, t, C]`` -> scalar.

    Example:
        >>> import torch
        >>> student, teacher = torch.tensor([[0.0, 4.0 * torch.log(torch.tensor(3.0))]]), torch.tensor([[0.0, 0.0]])
        >>> round(ReverseKL(T=4.0)(student, teacher).item(), 4)  # the KD example with the roles swapped
        2.093
    """

    def __init__(self, T: float = 1.0, teacher_detach: bool = True) -> None:
        super().__init__(T, teacher_detach)

    def divergence(self, log_s: torch.Tensor, log_t: torch.Tensor) -> torch.Tensor:
        return _kl(log_s, log_t)


class JensenShannon(_TemperedDivergence):
    """Jensen–Shannon divergence: ``T² · [½ KL(p_t ‖ m) + ½ KL(p_s ‖ m)]``, ``m = ½ (p_t + p_s)``.

    Symmetric and bounded by ``T² ln 2``. Lin (1991), "Divergence measures based on the Shannon
    entropy"; as a distillation loss, the β = ½ case of the generalised JSD in GKD (Agarwal et al. 2024,
    https://arxiv.org/abs/2306.13649). Default ``T = 1``. Shapes: logits ``[n, C]`` or ``[n, t, C]`` -> scalar.

    Example:
        >>> import torch
        >>> big = 100.0
        >>> round(JensenShannon()(torch.tensor([[big, 0.0]]), torch.tensor([[0.0, big]])).item(), 4)  # ln 2
        0.6931
    """

    def __init__(self, T: float = 1.0, teacher_detach: bool = True) -> None:
        super().__init__(T, teacher_detach)

    def divergence(self, log_s: torch.Tensor, log_t: torch.Tensor) -> torch.Tensor:
        log_m = torch.logsumexp(torch.stack([log_s, log_t]), dim=0) - math.log(2.0)
        return 0.5 * (_kl(log_t, log_m) + _kl(log_s, log_m))
