"""Drawing a report's progress events (:mod:`workbench.reports.progress`) for a person at a terminal.

:class:`ProgressState` folds the events into what is running — the cell (``i/N`` and its heading or first
line), the training run (method, seed, epoch ``e/E``) — and estimates the time left: from the steps done over
the time taken, within the report's known total when a grid of runs announced itself (``plan``: runs ×
epochs × steps per epoch), else within the current run; with no training in sight it shows how long the
cell has been running. :class:`ProgressPrinter` writes it to a stream: on a terminal one line updated in
place (carriage return, cut to the terminal's width), elsewhere one plain line per event (cells, runs,
epochs; never per step).

Example:
    >>> state = ProgressState()
    >>> for event in [{"event": "cell", "index": 3, "cells": 9, "heading": "Training", "first_line": "x = 1",
    ...                "time": 0.0},
    ...               {"event": "plan", "runs": 2, "epochs": 2, "time": 0.0},
    ...               {"event": "run_start", "method": "kd", "seed": 0, "epochs": 2, "steps": 0, "time": 0.0},
    ...               {"event": "epoch", "method": "kd", "seed": 0, "epoch": 1, "epochs": 2, "steps": 5,
    ...                "steps_per_epoch": 5, "time": 10.0}]:
    ...     state.feed(event)
    >>> state.line()
    'cell 3/9 | kd seed 0 | epoch 1/2 | run 1/2 | about 30 s left | Training: x = 1'
"""
from __future__ import annotations

import os
import shutil
import threading
from dataclasses import dataclass, field
from typing import Any, TextIO

__all__ = ["ProgressState", "ProgressPrinter", "format_seconds"]


def format_seconds(seconds: float) -> str:
    """``42 s``, ``3 min 05 s``, ``1 h 02 min``.

    Example:
        >>> format_seconds(42.4), format_seconds(185), format_seconds(3725)
        ('42 s', '3 min 05 s', '1 h 02 min')
    """
    seconds = max(0, round(seconds))
    if seconds < 60:
        return f"{seconds} s"
    if seconds < 3600:
        return f"{seconds // 60} min {seconds % 60:02d} s"
    return f"{seconds // 3600} h {seconds % 3600 // 60:02d} min"


@dataclass
class ProgressState:
    """What a report is doing, folded from its events (:meth:`feed`); :meth:`line` describes it."""

    cell: dict[str, Any] | None = None
    run: dict[str, Any] | None = None
    plan: dict[str, Any] | None = None
    runs_done: int = 0
    steps_per_epoch: int | None = None
    now: float = 0.0
    run_started: float = 0.0
    plan_started: float = 0.0
    run_first_step: int = 0
    events: list[str] = field(default_factory=list)

    def feed(self, event: dict[str, Any]) -> None:
        """Take one event in."""
        kind, self.now = event.get("event"), float(event.get("time", self.now))
        if kind == "cell":
            self.cell = {**event, "started": self.now}
        elif kind == "plan":
            self.plan, self.plan_started, self.runs_done, self.steps_per_epoch = event, self.now, 0, None
        elif kind == "plan_end":
            self.plan = None
        elif kind == "run_start":
            self.run, self.run_started, self.run_first_step = event, self.now, int(event.get("steps") or 0)
            if self.plan is None:
                self.steps_per_epoch = None
        elif kind in ("step", "epoch") and self.run is not None:
            self.run = {**self.run, **event}
            if event.get("steps_per_epoch"):
                self.steps_per_epoch = int(event["steps_per_epoch"])
        elif kind == "run_end" and self.run is not None:
            self.run = None
            self.runs_done += 1

    def seconds_left(self) -> float | None:
        """The estimated seconds left of the plan (else of the current run), or None while unknown."""
        per_epoch = self.steps_per_epoch
        if per_epoch is None:
            return None
        steps = int(self.run.get("steps") or 0) - self.run_first_step if self.run else 0
        if self.plan is not None:
            epochs, started = int(self.plan["epochs"]), self.plan_started
            total, done = int(self.plan["runs"]) * epochs * per_epoch, self.runs_done * epochs * per_epoch + steps
        elif self.run is not None:
            started = self.run_started
            total, done = int(self.run["epochs"]) * per_epoch - self.run_first_step, steps
        else:
            return None
        elapsed = self.now - started
        if done <= 0 or elapsed <= 0:
            return None
        return max(0.0, (total - done) * elapsed / done)

    def _cell_title(self) -> str:
        cell = self.cell or {}
        return ": ".join(part for part in (cell.get("heading"), cell.get("first_line")) if part)

    def _cell_text(self) -> str:
        cell, title = self.cell or {}, self._cell_title()
        return f"cell {cell.get('index')}/{cell.get('cells')}{f' {title}' if title else ''}"

    def _run_text(self, starting: bool = False) -> list[str]:
        run = self.run or {}
        name = run.get("method") or run.get("model") or "training"
        seed = f" seed {run['seed']}" if run.get("seed") is not None else ""
        parts = [f"{name}{seed}"]
        if run.get("epochs") and starting:
            parts[0] = f"training {parts[0]} for {run['epochs']} epoch{'s' if run['epochs'] != 1 else ''}"
        elif run.get("epochs"):
            parts.append(f"epoch {run.get('epoch', 1)}/{run['epochs']}")
        if self.plan is not None:
            parts.append(f"run {min(self.runs_done + 1, int(self.plan['runs']))}/{self.plan['runs']}")
        return parts

    def line(self) -> str:
        """The cell number, the training run, the time left (or the cell's time so far) and the cell's
        heading and first line, joined by ``|``: the most telling first, so a narrow terminal cuts the title."""
        cell = self.cell or {}
        parts = [f"cell {cell.get('index')}/{cell.get('cells')}"] if self.cell else []
        if self.run is not None:
            parts += self._run_text()
        elif self.plan is not None:  # between two runs (measuring the last one)
            parts.append(f"{self.runs_done}/{self.plan['runs']} runs done")
        left = self.seconds_left()
        if left is not None and (self.run is not None or self.plan is not None):
            parts.append(f"about {format_seconds(left)} left")
        elif self.cell:
            parts.append(format_seconds(self.now - self.cell["started"]))
        if self._cell_title():
            parts.append(self._cell_title())
        return " | ".join(parts)

    def plain(self, event: dict[str, Any]) -> str | None:
        """The line a plain (non-terminal) log gets for ``event``: cells, runs and epochs; None otherwise."""
        kind = event.get("event")
        if kind == "cell":
            return self._cell_text()
        if kind in ("run_start", "epoch") and self.run is not None:
            parts = self._run_text(starting=kind == "run_start")
            if kind == "epoch" and event.get("eval_accuracy") is not None:
                parts.append(f"test accuracy {100 * float(event['eval_accuracy']):.2f} %")
            left = self.seconds_left()
            return "  " + " | ".join(parts + ([f"about {format_seconds(left)} left"] if left is not None else []))
        if kind == "run_end":
            run = event.get("method") or event.get("model") or "training"
            return f"  {run} done{' (interrupted)' if event.get('interrupted') else ''}"
        return None


class ProgressPrinter:
    """Call it with each event: on a terminal (``stream.isatty()``) one line redrawn in place, cut to the
    terminal's width; otherwise one line per cell, run start, epoch and run end. ``close()`` ends the line.

    Example:
        >>> import io
        >>> out = io.StringIO()
        >>> printer = ProgressPrinter(out)
        >>> printer({"event": "cell", "index": 1, "cells": 2, "first_line": "import torch", "time": 0.0})
        >>> printer.close(); out.getvalue()
        'cell 1/2 import torch\\n'
    """

    def __init__(self, stream: TextIO, width: int | None = None) -> None:
        self.stream, self.state, self.shown = stream, ProgressState(), 0
        self.tty = bool(getattr(stream, "isatty", lambda: False)())
        self.width, self._lock = width, threading.Lock()

    def _columns(self) -> int:
        if self.width is not None:
            return self.width
        try:
            return os.get_terminal_size(self.stream.fileno()).columns
        except (AttributeError, OSError, ValueError):
            return shutil.get_terminal_size().columns

    def __call__(self, event: dict[str, Any]) -> None:
        with self._lock:
            if event.get("event") != "tick":
                self.state.feed(event)
            elif self.tty:
                self.state.now = max(self.state.now, float(event.get("time", 0.0)))
            if self.tty:
                self._redraw(self.state.line())
                return
            text = self.state.plain(event)
            if text is not None:
                self.stream.write(text + "\n")
                self.stream.flush()

    def _redraw(self, text: str) -> None:
        text = text[: max(self._columns() - 1, 1)]
        self.stream.write("\r" + text + " " * max(self.shown - len(text), 0))
        self.stream.flush()
        self.shown = len(text)

    def close(self) -> None:
        """End the updating line (a newline) so what follows starts on its own line."""
        with self._lock:
            if self.tty and self.shown:
                self.stream.write("\n")
                self.stream.flush()
            self.shown = 0
