"""Ctrl-C during ``fit``: the first one ends training after the current step, a second one at once.

While ``fit`` runs in the main thread, :class:`StopOnInterrupt` takes SIGINT over from Python's default
handler (or ipykernel's, for an ``await``-ing cell; Jupyter's interrupt button sends SIGINT) and gives
it back when training ends. Its first Ctrl-C only asks the run to stop
(``state.request_stop("KeyboardInterrupt")``): the step under way finishes, so an optimizer step is
never torn, and ``fit`` returns the history so far, marked by :func:`mark_interrupted`. A second Ctrl-C
raises :class:`SecondInterrupt` (a ``KeyboardInterrupt``) at once, wherever training is: the escape
hatch for a step that hangs; nothing is returned and the weights may be mid-step (resume from the last
checkpoint).

Another SIGINT handler of the caller's, and a ``fit`` in a thread other than the main one, are left
alone. A ``KeyboardInterrupt`` that reaches ``fit`` anyway (such a handler, a term or callback raising
it, an exception sent to the thread) also ends the run cleanly (:func:`stop_for`). Where it landed
decides what the step was: before ``optimizer.step`` the step is discarded (no history row, the
gradients dropped, the parameters as after the previous step; BatchNorm running statistics may have
seen the batch's forward); once the update has begun, the step counts as done (its row is kept).

Under ``torchrun`` every rank stops after the same step (:func:`agree_to_stop`: one small all-reduce
per step), so no rank waits forever for the others.
"""
from __future__ import annotations

import signal
import sys
import threading
from types import FrameType
from typing import Any

import pandas as pd
import torch
from tqdm.auto import tqdm

from workbench.train.callbacks import TrainState

__all__ = ["INTERRUPT_REASON", "SecondInterrupt", "StopOnInterrupt", "agree_to_stop", "mark_interrupted", "stop_for"]

INTERRUPT_REASON = "KeyboardInterrupt"


class SecondInterrupt(KeyboardInterrupt):
    """A second Ctrl-C while ``fit`` was finishing its step: training stopped at once, nothing returned."""


def _replaceable(handler: Any) -> bool:
    """Python's own SIGINT handler, or ipykernel's (a cell that awaits): ones that only raise or cancel."""
    if handler is signal.default_int_handler:
        return True
    return (getattr(handler, "__module__", None) or "").split(".")[0] == "ipykernel"


class StopOnInterrupt:
    """A context manager: inside it, Ctrl-C requests ``state`` to stop; a second one raises at once.

    ``installed`` says whether the handler was put in place (main thread, and SIGINT held by Python's
    default handler or ipykernel's); the previous handler is restored on exit.

    Example:
        >>> import os, signal, torch
        >>> state = TrainState(None, None, None, None, torch.device("cpu"), epochs=1)
        >>> with StopOnInterrupt(state) as guard:
        ...     os.kill(os.getpid(), signal.SIGINT)  # the first Ctrl-C: a request, no exception
        ...     print(guard.installed, state.stop, state.stop_reason)
        True True KeyboardInterrupt
        >>> signal.getsignal(signal.SIGINT) is signal.default_int_handler  # given back
        True
    """

    def __init__(self, state: TrainState) -> None:
        self.state = state
        self.installed = False
        self.presses = 0
        self._previous: Any = None

    def __enter__(self) -> StopOnInterrupt:
        if threading.current_thread() is threading.main_thread():
            current = signal.getsignal(signal.SIGINT)
            if _replaceable(current):
                self._previous = current
                signal.signal(signal.SIGINT, self._handle)
                self.installed = True
        return self

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        self.presses += 1
        if self.presses > 1:
            raise SecondInterrupt(
                "a second Ctrl-C stopped training at once (the first asked fit to stop after the current step); "
                "the step under way was torn: do not resume from these weights, resume from the last checkpoint")
        self.state.request_stop(INTERRUPT_REASON)  # only a flag: nothing printed in a signal handler

    def __exit__(self, *exc: Any) -> None:
        if self.installed and signal.getsignal(signal.SIGINT) == self._handle:
            signal.signal(signal.SIGINT, self._previous)


def mark_interrupted(history: pd.DataFrame, state: TrainState, announce: bool = True) -> pd.DataFrame:
    """Mark ``history`` as cut short when ``state.interrupted``: ``history.attrs["interrupted"]`` is
    ``{"epoch", "step", "reason"}``, and (``announce``) one line on stderr says so.

    Example:
        >>> import pandas as pd, torch
        >>> state = TrainState(None, None, None, None, torch.device("cpu"), epochs=3, step=5, epoch=2)
        >>> state.request_stop("stop button")
        >>> mark_interrupted(pd.DataFrame({"step": range(1, 6)}), state, announce=False).attrs["interrupted"]
        {'epoch': 2, 'step': 5, 'reason': 'stop button'}
    """
    if not state.interrupted:
        return history
    reason = state.stop_reason or "stopped"
    history.attrs["interrupted"] = {"epoch": state.epoch, "step": state.step, "reason": reason}
    if announce:
        why = "" if reason == INTERRUPT_REASON else f" ({reason})"
        tqdm.write(f"training interrupted at epoch {state.epoch}, step {state.step}{why}: returning the history "
                   f"so far ({len(history)} steps)", file=sys.stderr)
    return history


def stop_for(interrupt: KeyboardInterrupt, state: TrainState) -> None:
    """A ``KeyboardInterrupt`` that reached ``fit``'s code: a second Ctrl-C goes on up, any other stops the run.

    Example:
        >>> import torch
        >>> state = TrainState(None, None, None, None, torch.device("cpu"), epochs=1)
        >>> stop_for(KeyboardInterrupt(), state); state.interrupted, state.stop_reason
        (True, 'KeyboardInterrupt')
    """
    if isinstance(interrupt, SecondInterrupt):
        raise interrupt
    state.request_stop(INTERRUPT_REASON)


def agree_to_stop(state: TrainState) -> bool:
    """Whether to stop after this step; under DDP every rank stops when one does (else the others would hang).

    Example:
        >>> import torch
        >>> state = TrainState(None, None, None, None, torch.device("cpu"), epochs=1)
        >>> agree_to_stop(state), (state.request_stop(), agree_to_stop(state))[1]
        (False, True)
    """
    if state.world_size > 1:
        flag = torch.tensor([2.0 if state.interrupted else float(state.stop)], device=state.device)
        torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
        if flag.item() == 2.0 and not state.interrupted:
            state.request_stop("stopped on another rank")
        state.stop = state.stop or flag.item() > 0
    return state.stop
