"""TAID: distil towards a moving target that slides from the student's own distribution to the teacher's."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from workbench.losses.base import Term, check_setting, logit_rows
from workbench.losses.logits import kl_rows

SCHEDULES = ("adaptive", "linear")


def _sigmoid(value: float) -> float:
    """A logistic that does not overflow for large |value| (a loss jump can make the momentum huge)."""
    if value >= 0:
        return 1.0 / (1.0 + math.exp(-value))
    return math.exp(value) / (1.0 + math.exp(value))


class TAID(Term):
    """Temporally adaptive interpolated distillation: ``KL(p_α ‖ q_s)``, with α rising over training.

    The target interpolates in logit space between the (detached) student and the teacher,
    ``p_α = softmax((1 − α) · stopgrad(z_s) + α · z_t)``, and the loss is the forward KL from it to the
    student ``q_s = softmax(z_s)``, averaged over rows (no temperature). α = 0 gives 0; α = 1 is KD at T = 1.

    Schedule (Algorithm 1 of the paper, whose α is called ``t`` there): after each training step with loss
    ``J_n``, ``δ_n = (J_{n−1} − J_n) / (J_{n−1} + ε)``, ``m_n = μ · m_{n−1} + (1 − μ) · δ_n`` and
    ``α ← min(α_end, max(α_linear(n), α + η · sigmoid(m_n) · (1 − α)))``, where
    ``α_linear(n) = α_start + (α_end − α_start) · min(n / total_steps, 1)``, a floor that keeps α rising at
    least linearly. The first update only records ``J_1``. ``schedule="linear"`` sets α = α_linear(n).
    ``η`` is ``step_size`` (the paper's α) and ``μ`` is ``momentum`` (the paper's β).

    Differences from the reference code (github.com/SakanaAI/TAID), all documented choices:

    - ``J`` is the KL value this term returns; the reference feeds its cross-entropy ``−Σ p_α log q_s``
      (= KL + H(p_α); same gradient, different value) to the schedule;
    - without ``total_steps`` the adaptive schedule has no linear floor (only ``α_start``);
    - n counts the updates made (1, 2, …), the reference's ``global_step`` starts at 0.

    With ``auto_update=True`` (default, as the reference) every call in training mode with gradients
    enabled updates α after computing the loss; set it to ``False`` and call :meth:`step` (alias
    :meth:`update`) once per optimizer step to drive the schedule yourself.

    Shing, Misaki, Bao, Yokoi & Akiba (2025), "TAID: Temporally Adaptive Interpolated Distillation for
    Efficient Knowledge Transfer in Language Models", https://arxiv.org/abs/2501.16937. Defaults
    ``alpha_start=0.4, alpha_end=1.0, step_size=5e-4, momentum=0.99`` (the paper's).
    Shapes: logits ``[n, C]`` or ``[n, t, V]`` (targets ``[n, t]`` with -100 mask tokens) -> scalar.
    Classes masked by ``-inf`` on both sides take no part (as in :mod:`workbench.losses.logits`).

    Example:
        >>> import torch
        >>> term = TAID(auto_update=False)
        >>> logits = torch.tensor([[1.0, 2.0, 0.5]])
        >>> term(logits, logits.clone()).item(), term.alpha
        (0.0, 0.4)
    """

    def __init__(
        self,
        alpha_start: float = 0.4,
        alpha_end: float = 1.0,
        step_size: float = 5e-4,
        momentum: float = 0.99,
        schedule: str = "adaptive",
        total_steps: int | None = None,
        auto_update: bool = True,
        teacher_detach: bool = True,
    ) -> None:
        super().__init__(teacher_detach)
        if not 0.0 <= alpha_start <= alpha_end <= 1.0:
            raise ValueError(f"TAID: need 0 ≤ alpha_start ≤ alpha_end ≤ 1, got {alpha_start} and {alpha_end}")
        if schedule not in SCHEDULES:
            raise ValueError(f"TAID: schedule must be one of {SCHEDULES}, got {schedule!r}")
        if total_steps is not None and (isinstance(total_steps, bool) or not isinstance(total_steps, int)
                                        or total_steps < 1):
            raise ValueError(f"TAID: total_steps must be a positive integer or None, got {total_steps!r}")
        if schedule == "linear" and not total_steps:
            raise ValueError("TAID: the linear schedule needs total_steps")
        if not 0.0 <= momentum <= 1.0:
            raise ValueError(f"TAID: momentum must be in [0, 1], got {momentum!r}")
        self.alpha_start, self.alpha_end = alpha_start, alpha_end
        self.step_size, self.momentum, self.schedule = check_setting("TAID", "step_size", step_size), momentum, schedule
        self.total_steps, self.auto_update = total_steps, auto_update
        self.register_buffer("alpha_value", torch.tensor(float(alpha_start), dtype=torch.float64))
        self.register_buffer("momentum_value", torch.zeros((), dtype=torch.float64))
        self.register_buffer("previous_loss", torch.tensor(math.inf, dtype=torch.float64))
        self.register_buffer("num_updates", torch.zeros((), dtype=torch.long))
        self.last_loss: torch.Tensor | None = None

    @property
    def alpha(self) -> float:
        """The current interpolation weight of the teacher."""
        return float(self.alpha_value)

    def forward(
        self, student: torch.Tensor, teacher: torch.Tensor, targets: torch.Tensor | None = None
    ) -> torch.Tensor:
        student, teacher, _ = logit_rows(student, self.teacher_side(teacher), targets, "TAID")
        alpha = self.alpha
        # at the end points the other side is left out, not multiplied by 0 (0 · -inf is NaN on masked classes)
        if alpha == 0.0:
            mixed = student.detach()
        elif alpha == 1.0:
            mixed = teacher
        else:
            mixed = (1 - alpha) * student.detach() + alpha * teacher
        loss = kl_rows(F.log_softmax(mixed, dim=1), F.log_softmax(student, dim=1)).mean()
        self.last_loss = loss.detach()
        if self.auto_update and self.training and torch.is_grad_enabled():
            self.update(self.last_loss)
        return loss

    def linear_alpha(self, step: int, total_steps: int | None = None) -> float:
        """``α_start + (α_end − α_start) · min(step / total_steps, 1)``; α_start without total_steps."""
        total = total_steps or self.total_steps
        if not total:
            return self.alpha_start
        return self.alpha_start + (self.alpha_end - self.alpha_start) * min(step / total, 1.0)

    @torch.no_grad()
    def update(
        self, loss: float | torch.Tensor | None = None, step: int | None = None, total_steps: int | None = None
    ) -> float:
        """One schedule step from this step's loss (default: the last value computed); returns the new α."""
        if loss is None:
            if self.last_loss is None:
                raise ValueError("TAID.update needs a loss: call the term first or pass loss=")
            loss = self.last_loss
        loss = float(loss)
        self.num_updates += 1
        step = int(self.num_updates) if step is None else step
        floor = self.linear_alpha(step, total_steps)
        if self.schedule == "linear":
            self.alpha_value.fill_(floor)
            return self.alpha
        previous = float(self.previous_loss)
        self.previous_loss.fill_(loss)
        if math.isinf(previous):
            return self.alpha
        relative_change = (previous - loss) / (previous + 1e-15)
        momentum = self.momentum * float(self.momentum_value) + (1 - self.momentum) * relative_change
        self.momentum_value.fill_(momentum)
        alpha = self.alpha
        increment = self.step_size * _sigmoid(momentum) * (1 - alpha)
        self.alpha_value.fill_(min(self.alpha_end, max(floor, alpha + increment)))
        return self.alpha

    step = update

    def extra_repr(self) -> str:
        schedule = f"schedule={self.schedule!r}, step_size={self.step_size}, momentum={self.momentum}"
        return f"alpha={self.alpha:.4g}, {schedule}"
