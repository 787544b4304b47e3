"""Callbacks for :func:`workbench.train.fit` (``workbench.similarity.CKATrajectory`` is one).

A callback is any object with some of ``on_train_begin(state)``, ``on_step_end(state)``,
``on_epoch_end(state)`` and ``on_train_end(state)`` (subclass :class:`Callback` for no-op defaults).
``state`` is the :class:`TrainState` of the run. A callback that also has ``state_dict()`` (JSON-able)
and ``load_state_dict(d)`` is saved with every checkpoint and restored on resume.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import pandas as pd
import torch
from torch import nn

__all__ = ["Callback", "TrainState"]


@dataclass
class TrainState:
    """The run as callbacks see it; set ``stop = True`` to end training after the current step.

    ``request_stop(reason)`` ends it the same way and marks the run as interrupted (a stop button, a
    budget): ``interrupted`` is then true and ``stop_reason`` says why; ``fit`` sets both itself on
    Ctrl-C. ``on_train_end`` is called for an interrupted run too, so a callback can tell the two apart.

    ``model`` is what was passed to ``fit`` (a model or a Distiller, never the DDP wrapper);
    ``distiller`` is that Distiller or ``None``; ``student`` the model being trained; ``rows`` the
    history rows so far (dicts, one per step; ``history`` gives them as a DataFrame).
    """

    model: nn.Module
    distiller: Any
    student: nn.Module
    optimizer: torch.optim.Optimizer
    device: torch.device
    epochs: int
    step: int = 0
    epoch: int = 1
    batch_index: int = 0
    rows: list[dict[str, Any]] = field(default_factory=list)
    rank: int = 0
    world_size: int = 1
    stop: bool = False
    interrupted: bool = False
    stop_reason: str | None = None

    def request_stop(self, reason: str = "stopped") -> None:
        """End training after the current step, marked as interrupted for ``reason``.

        Example:
            >>> state = TrainState(None, None, None, None, torch.device("cpu"), epochs=3)
            >>> state.request_stop("stop button"); state.stop, state.interrupted, state.stop_reason
            (True, True, 'stop button')
        """
        self.stop, self.interrupted, self.stop_reason = True, True, reason

    @property
    def history(self) -> pd.DataFrame:
        """The rows so far as a DataFrame."""
        return pd.DataFrame(self.rows)


class Callback:
    """No-op base: override the hooks you need.

    Example:
        >>> import torch
        >>> from workbench.train import fit
        >>> class StopAt(Callback):
        ...     def on_step_end(self, state):
        ...         state.stop = state.step == 2
        >>> x, y = torch.randn(64, 4), torch.randint(0, 2, (64,))
        >>> len(fit(torch.nn.Linear(4, 2), (x, y), batch_size=8, callbacks=[StopAt()], device="cpu", progress=False))
        2
    """

    def on_train_begin(self, state: TrainState) -> None:
        """Once, after the optimizer exists and a checkpoint (if resuming) is loaded."""

    def on_step_end(self, state: TrainState) -> None:
        """After every optimizer step; ``state.rows[-1]`` is that step's row."""

    def on_epoch_end(self, state: TrainState) -> None:
        """After each epoch's evaluation."""

    def on_train_end(self, state: TrainState) -> None:
        """Once, when training finishes or is stopped, interrupted included (``state.interrupted``; not on
        an exception)."""
