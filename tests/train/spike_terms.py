"""A test loss term that misbehaves on one chosen training step (the fit tests' NaN and overflow cases)."""
from __future__ import annotations

import torch

from workbench.losses import Term
from workbench.train import Callback


class SpikeAt(Term):
    """``factor × sum(student)`` on its ``at``-th training call, 0 (with zero gradient) on the others.

    ``factor=nan`` makes a non-finite loss; a large finite factor makes a finite loss whose fp16 gradient
    overflows once a GradScaler has scaled it.
    """

    def __init__(self, at: int, factor: float):
        super().__init__()
        self.at, self.factor, self.calls = at, factor, 0

    def forward(self, student, teacher, targets=None):
        if not torch.is_grad_enabled():
            return student.float().sum() * 0  # Distiller.build's forward does not count
        self.calls += 1
        return student.float().sum() * (self.factor if self.calls == self.at else 0.0)


class NaNGradFrom(Term):
    """0 (a finite value) with an infinite gradient, ``sum(sqrt(s - s))``, from its ``at``-th training call on.

    It stays broken once it starts, as a real fault would, so re-running the step reproduces it.
    """

    def __init__(self, at: int):
        super().__init__()
        self.at, self.calls = at, 0

    def forward(self, student, teacher, targets=None):
        if not torch.is_grad_enabled():
            return student.float().sum() * 0
        self.calls += 1
        if self.calls < self.at:
            return student.float().sum() * 0
        return (student.float() - student.float().detach()).sqrt().sum()


class Crash(RuntimeError):
    """What :class:`CrashAt` raises."""


class CrashAt(Callback):
    """Raises :class:`Crash` at the end of step ``at_step``: a run killed mid-way (a Ctrl-C no longer is one:
    fit ends cleanly on it, see test_interrupt.py)."""

    def __init__(self, at_step):
        self.at_step = at_step

    def on_step_end(self, state):
        if state.step == self.at_step:
            raise Crash(f"simulated crash at step {state.step}")
