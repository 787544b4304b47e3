"""Progress events of a running report: written in its kernel as JSON lines, read by the process that runs it.

The runner names an event file in the kernel's environment (:data:`PROGRESS_ENV`); :func:`emit` appends one
JSON object per event to it (``{"event": ..., "time": ..., **fields}``) and does nothing when the variable is
unset (a notebook run by hand, a script). :class:`FitProgress` is a :func:`workbench.train.fit` callback
that emits a training run's start, its progress (at most every ``every_seconds``), each epoch's end and the
run's end, with the steps done; :func:`fit_callbacks` gives it only when someone listens. :class:`EventTail`
follows the file from another thread and hands each event to a function (the CLI draws them:
:mod:`workbench.reports.progress_line`).

Events: ``cell`` (``index``, ``cells``, ``heading``, ``first_line``: written by the runner as each code cell
starts), ``plan`` (``runs``, ``epochs``: a grid of training runs begins), ``run_start`` (``epochs``, labels
such as ``method``, ``seed``, ``run``), ``step`` / ``epoch`` (``epoch``, ``epochs``, ``steps``,
``steps_per_epoch`` once known, ``eval_accuracy`` at an epoch's end), ``run_end`` (``steps``,
``interrupted``), ``plan_end``.

Example:
    >>> import json, os, tempfile
    >>> from workbench.reports import progress
    >>> path = os.path.join(tempfile.mkdtemp(), "events.jsonl")
    >>> progress.emit_to(path, "plan", runs=4, epochs=2)
    >>> [(event["event"], event["runs"]) for event in progress.read_events(path)]
    [('plan', 4)]
"""
from __future__ import annotations

import contextlib
import json
import os
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

__all__ = ["PROGRESS_ENV", "emit", "emit_to", "enabled", "FitProgress", "fit_callbacks", "read_events", "EventTail"]

PROGRESS_ENV = "KD_WORKBENCH_PROGRESS"


def emit_to(path: str | os.PathLike, event: str, **fields: Any) -> None:
    """Append the event ``{"event": event, "time": <unix seconds>, **fields}`` as one JSON line to ``path``.

    A file that cannot be written is ignored: progress must never stop a report.
    """
    line = json.dumps({"event": event, "time": time.time(), **fields}, default=str) + "\n"
    with contextlib.suppress(OSError):
        with open(path, "a", encoding="utf-8") as stream:  # one write of one line: lines never interleave
            stream.write(line)


def enabled() -> bool:
    """Whether a runner listens (:data:`PROGRESS_ENV` names an event file).

    Example:
        >>> import os
        >>> enabled() == bool(os.environ.get(PROGRESS_ENV))
        True
    """
    return bool(os.environ.get(PROGRESS_ENV))


def emit(event: str, **fields: Any) -> None:
    """Emit a progress event to the runner's event file; nothing when no runner listens.

    Example:
        >>> emit("plan", runs=6, epochs=40)  # a no-op outside a report run by the CLI
    """
    path = os.environ.get(PROGRESS_ENV)
    if path:
        emit_to(path, event, **fields)


class FitProgress:
    """A :func:`workbench.train.fit` callback emitting ``run_start``, ``step`` (at most every
    ``every_seconds``), ``epoch`` and ``run_end``; ``labels`` (``method="kd", seed=0``) go with each event.

    The steps per epoch are learnt at the first epoch's end (fit's last-batch policy decides them).

    Example:
        >>> import torch
        >>> from workbench.train import fit
        >>> x, y = torch.randn(32, 4), torch.randint(0, 2, (32,))
        >>> _ = fit(torch.nn.Linear(4, 2), (x, y), epochs=2, batch_size=8, device="cpu", progress=False,
        ...         callbacks=[FitProgress(model="linear")])  # silent: no runner listens here
    """

    def __init__(self, every_seconds: float = 0.5, **labels: Any) -> None:
        self.every_seconds, self.labels = every_seconds, labels
        self.first_step, self.first_epoch, self.steps_per_epoch, self.last_emit = 0, 1, None, 0.0

    def _emit(self, event: str, state: Any, **fields: Any) -> None:
        emit(event, **self.labels, epoch=state.epoch, epochs=state.epochs, steps=state.step,
             steps_per_epoch=self.steps_per_epoch, **fields)

    def on_train_begin(self, state: Any) -> None:
        self.first_step, self.first_epoch, self.last_emit = state.step, state.epoch, time.monotonic()
        self._emit("run_start", state)

    def on_step_end(self, state: Any) -> None:
        now = time.monotonic()
        if now - self.last_emit >= self.every_seconds:
            self.last_emit = now
            self._emit("step", state)

    def on_epoch_end(self, state: Any) -> None:
        epochs_done = state.epoch - self.first_epoch + 1
        if self.steps_per_epoch is None and epochs_done >= 1 and not state.stop:
            self.steps_per_epoch = round((state.step - self.first_step) / epochs_done)
        accuracy = state.rows[-1].get("eval_accuracy") if state.rows else None
        self.last_emit = time.monotonic()
        self._emit("epoch", state, eval_accuracy=accuracy)

    def on_train_end(self, state: Any) -> None:
        self._emit("run_end", state, interrupted=bool(getattr(state, "interrupted", False)))


def fit_callbacks(**labels: Any) -> list[FitProgress]:
    """``[FitProgress(**labels)]`` when a runner listens, else ``[]``: add it to ``fit``'s callbacks.

    Example:
        >>> fit_callbacks(method="kd", seed=0) == [] or isinstance(fit_callbacks()[0], FitProgress)
        True
    """
    return [FitProgress(**labels)] if enabled() else []


def read_events(path: str | os.PathLike) -> list[dict[str, Any]]:
    """Every complete event in the file ``path`` (a line cut off mid-write is left out); [] when absent."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        return []
    return [json.loads(line) for line in text.splitlines(keepends=True) if line.endswith("\n")]


class EventTail:
    """Follow the event file ``path`` in a thread, calling ``handle(event)`` for each new event in order, and
    ``handle({"event": "tick", "time": now})`` after ``tick_seconds`` without one (so elapsed times move).

    ``stop()`` reads what is left and joins the thread. An exception in ``handle`` is dropped: drawing
    progress must never stop a report.

    Example:
        >>> import os, tempfile
        >>> path = os.path.join(tempfile.mkdtemp(), "events.jsonl")
        >>> seen = []
        >>> tail = EventTail(path, seen.append, tick_seconds=60).start()
        >>> emit_to(path, "cell", index=1, cells=3)
        >>> tail.stop(); [event["event"] for event in seen]
        ['cell']
    """

    def __init__(self, path: str | os.PathLike, handle: Callable[[dict[str, Any]], None], *,
                 poll_seconds: float = 0.1, tick_seconds: float = 1.0) -> None:
        self.path, self.handle = Path(path), handle
        self.poll_seconds, self.tick_seconds = poll_seconds, tick_seconds
        self._offset, self._pending, self._done = 0, b"", threading.Event()
        self._thread = threading.Thread(target=self._follow, name="kd-workbench-progress", daemon=True)

    def start(self) -> EventTail:
        """Start following; returns self."""
        self._thread.start()
        return self

    def stop(self) -> None:
        """Read the events still in the file, hand them on, and end the thread."""
        self._done.set()
        self._thread.join()

    def _follow(self) -> None:
        quiet_since = time.monotonic()
        while not self._done.wait(self.poll_seconds):
            if self._read():
                quiet_since = time.monotonic()
            elif time.monotonic() - quiet_since >= self.tick_seconds:
                quiet_since = time.monotonic()
                self._hand({"event": "tick", "time": time.time()})
        self._read()

    def _read(self) -> int:
        try:
            with open(self.path, "rb") as stream:
                stream.seek(self._offset)
                chunk = stream.read()
        except FileNotFoundError:
            return 0
        self._offset += len(chunk)
        *lines, self._pending = (self._pending + chunk).split(b"\n")
        for line in lines:
            with contextlib.suppress(ValueError):
                self._hand(json.loads(line))
        return len(lines)

    def _hand(self, event: dict[str, Any]) -> None:
        with contextlib.suppress(Exception):
            self.handle(event)
