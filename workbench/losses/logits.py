"""Divergences between softened class distributions: KD (forward KL), reverse KL, Jensen–Shannon.

All take logits ``[n, C]`` (or token logits ``[n, t, C]``, averaged over tokens; with ``targets`` of shape
``[n, t]``, tokens whose target is -100 are skipped), divide them by the temperature ``T``, and scale the
divergence by ``T²`` so gradients keep their size across temperatures (Hinton et al. 2015).

Masked logits: a class whose logit is ``-inf`` has probability 0, and ``0 · log 0 = 0``, so a class
masked on both sides (vocabulary padding, masked classes) takes no part: the value and the gradients
are those of the same term on the logits with that column removed. A class masked on one side only
counts as 0 where the masked side is the weighing one, and makes the divergence ``+inf`` where the
other side puts mass on it (KD with the student masked where the teacher is not): that is the exact
value, returned without a device synchronisation; ``fit`` stops on it and names the term.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from workbench.losses.base import Term, check_setting, logit_rows


def kl_rows(log_p: torch.Tensor, log_q: torch.Tensor) -> torch.Tensor:
    """``KL(p ‖ q)`` of each row from log-probabilities ``[r, C]`` -> ``[r]``, with ``0 · log 0 = 0``.

    Classes where ``p`` is 0 (``log_p = -inf``) contribute exactly 0, with zero gradient;
    ``torch.nn.functional.kl_div`` gives NaN there when ``q`` is 0 too.

    Example:
        >>> import math, torch
        >>> log_p = torch.tensor([[math.log(0.5), math.log(0.5), -math.inf]])
        >>> kl_rows(log_p, log_p.clone())
        tensor([0.])
    """
    # p = exp(-inf) is already 0 there; only the log-ratio (-inf - -inf = NaN) needs replacing, before the
    # product, so that no NaN reaches the backward pass either
    log_ratio = (log_p - log_q).masked_fill_(torch.isneginf(log_p), 0.0)
    return (log_p.exp() * log_ratio).sum(dim=1)


def _kl(log_p: torch.Tensor, log_q: torch.Tensor) -> torch.Tensor:
    """``mean over rows of KL(p ‖ q)`` from log-probabilities ``[r, C]``."""
    return kl_rows(log_p, log_q).mean()


class _TemperedDivergence(Term):
    """Shared body: validate logits, soften both sides at ``T``, scale ``divergence(log_s, log_t)`` by T²."""

    def __init__(self, T: float, teacher_detach: bool = True) -> None:
        super().__init__(teacher_detach)
        self.T = check_setting(type(self).__name__, "T", T, positive=True)

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
        # a class masked on both sides is left out; filling it keeps logsumexp's gradient finite there
        both = torch.isneginf(log_s) & torch.isneginf(log_t)
        pair = torch.stack([log_s.masked_fill(both, 0.0), log_t.masked_fill(both, 0.0)])
        log_m = torch.logsumexp(pair, dim=0) - math.log(2.0)
        return 0.5 * (_kl(log_t, log_m) + _kl(log_s, log_m))
