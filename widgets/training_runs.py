"""What a :class:`~widgets.TrainingMonitor` draws, as plain data: its runs' curves as plotly trace specs and
the status line. No widgets here, so the overlay and the wording are testable without a kernel.

A monitor keeps one :class:`RunRecord` per ``fit`` run it watched (a comparison gives one per method and
seed). Every run keeps its curves; the current (last) run is drawn at full strength, earlier ones faded
and grouped in the legend under their names. A monitor that saw one run draws exactly what it always did:
one trace per loss column (``loss``, ``ce``, each term) and one ``eval accuracy`` trace, no groups.
"""
from __future__ import annotations

import html
from dataclasses import dataclass, field
from typing import Any

from plotly.colors import qualitative

__all__ = ["RunRecord", "loss_traces", "accuracy_traces", "status_line", "EARLIER_OPACITY"]

# row keys that are not loss values (everything else in a history row is the total or a term)
_NOT_LOSSES = ("epoch", "step", "lr", "eval_accuracy")
EARLIER_OPACITY = 0.3  # runs before the current one: visible, but not in the way
_COLOURS = qualitative.Plotly


@dataclass
class RunRecord:
    """One run as the monitor saw it: its ``name``, its history ``rows`` (dicts, one per step) and, once it
    ended, its ``outcome`` (``"done"`` or ``"interrupted at epoch e, step s (reason)"``; ``None`` while running).

    Example:
        >>> RunRecord("kd, seed 0", [{"epoch": 1, "step": 1, "loss": 0.5}]).finished
        False
    """

    name: str
    rows: list[dict[str, Any]] = field(default_factory=list)
    outcome: str | None = None

    @property
    def finished(self) -> bool:
        """Whether the run has ended (completed or interrupted)."""
        return self.outcome is not None


def loss_columns(rows: list[dict[str, Any]]) -> list[str]:
    """``loss`` first, then every other loss-valued key in the order the rows introduce them.

    Example:
        >>> loss_columns([{"epoch": 1, "step": 1, "ce": 1.0, "loss": 2.0, "kd": 1.0, "lr": 0.1}])
        ['loss', 'ce', 'kd']
    """
    names: list[str] = []
    for row in rows:
        names.extend(key for key in row if key not in _NOT_LOSSES and key not in names)
    return sorted(names, key=lambda name: name != "loss")  # stable: loss first, the rest as found


def _style(run: RunRecord, current: bool, several: bool, colour: str, trace: dict[str, Any]) -> dict[str, Any]:
    """Faded and grouped under the run's name when there are several runs; the current one stands out."""
    trace["line"] = {"color": colour, "width": 2.5 if current and several else 1.5}
    if several:
        trace.update(legendgroup=run.name, legendgrouptitle={"text": run.name},
                     opacity=1.0 if current else EARLIER_OPACITY)
    return trace


def loss_traces(runs: list[RunRecord]) -> list[dict[str, Any]]:
    """Trace specs (``go.Scatter`` keyword arguments) for the loss plot: every run's loss columns.

    A column keeps its colour across runs; earlier runs are faded (``EARLIER_OPACITY``) and each run is a
    legend group titled with its name. With one run: one trace per column, named by the column, as before.

    Example:
        >>> runs = [RunRecord("kd", [{"epoch": 1, "step": 1, "loss": 1.0, "kd": 0.5}], "done"),
        ...         RunRecord("at", [{"epoch": 1, "step": 1, "loss": 2.0, "at": 0.1}])]
        >>> [(t["legendgroup"], t["name"], t["opacity"]) for t in loss_traces(runs)]
        [('kd', 'loss', 0.3), ('kd', 'kd', 0.3), ('at', 'loss', 1.0), ('at', 'at', 1.0)]
    """
    several = len(runs) > 1
    columns: list[str] = []
    for run in runs:
        columns.extend(name for name in loss_columns(run.rows) if name not in columns)
    traces = []
    for index, run in enumerate(runs):
        steps = [row["step"] for row in run.rows]
        for name in loss_columns(run.rows):
            trace = {"name": name, "x": steps, "y": [row.get(name) for row in run.rows], "mode": "lines"}
            traces.append(_style(run, index == len(runs) - 1, several, _COLOURS[columns.index(name) % len(_COLOURS)],
                                 trace))
    return traces


def accuracy_traces(runs: list[RunRecord]) -> list[dict[str, Any]]:
    """Trace specs for the accuracy plot: each run's ``eval_accuracy`` points, one trace per run that has some.

    One colour per run, named by the run when there are several (``"eval accuracy"`` for a single run).

    Example:
        >>> runs = [RunRecord("kd", [{"step": 4, "loss": 1.0, "eval_accuracy": 0.5}], "done"),
        ...         RunRecord("at", [{"step": 4, "loss": 1.0, "eval_accuracy": 0.7}])]
        >>> [(t["name"], t["y"], t["opacity"]) for t in accuracy_traces(runs)]
        [('kd', [0.5], 0.3), ('at', [0.7], 1.0)]
    """
    several = len(runs) > 1
    traces = []
    for index, run in enumerate(runs):
        evaluated = [row for row in run.rows if row.get("eval_accuracy") is not None]
        if not evaluated:
            continue
        trace = {"name": run.name if several else "eval accuracy", "x": [row["step"] for row in evaluated],
                 "y": [row["eval_accuracy"] for row in evaluated], "mode": "lines+markers"}
        traces.append(_style(run, index == len(runs) - 1, several, _COLOURS[index % len(_COLOURS)], trace))
    return traces


def outcome_of(state: Any) -> str:
    """How a run ended, from ``fit``'s state at ``on_train_end``: ``"done"`` or
    ``"interrupted at epoch e, step s (reason)"`` (``state.interrupted``, ``state.stop_reason``).

    Example:
        >>> import torch
        >>> from workbench.train.callbacks import TrainState
        >>> state = TrainState(None, None, None, None, torch.device("cpu"), epochs=25, step=140, epoch=6)
        >>> outcome_of(state)
        'done'
        >>> state.request_stop("stop button"); outcome_of(state)
        'interrupted at epoch 6, step 140 (stop button)'
    """
    if getattr(state, "interrupted", False):
        return f"interrupted at epoch {state.epoch}, step {state.step} ({state.stop_reason or 'stopped'})"
    return "done"


def status_line(run: RunRecord, epochs: int, *, label: bool = False) -> str:
    """The monitor's one-line HTML summary of ``run`` (trained for ``epochs`` epochs in all).

    While running: ``epoch e/E · step s · loss x · eval accuracy a``; once ended, the outcome comes
    first in bold (``done`` or ``interrupted at epoch e, step s (reason)``). ``label`` puts the run's
    name in front (a monitor that watched several runs).

    Example:
        >>> run = RunRecord("kd", [{"epoch": 6, "step": 140, "loss": 0.25}])
        >>> status_line(run, 25)
        'epoch 6/25 · step 140 · loss 0.2500'
        >>> run.outcome = "interrupted at epoch 6, step 140 (KeyboardInterrupt)"
        >>> status_line(run, 25, label=True)
        'kd · <b>interrupted at epoch 6, step 140 (KeyboardInterrupt)</b> · loss 0.2500'
    """
    prefix = [html.escape(run.name)] if label else []
    if not run.rows:
        return " · ".join(prefix + [run.outcome or f"epoch 1/{epochs}: starting"])
    last = run.rows[-1]
    parts = [f"epoch {last['epoch']}/{epochs}", f"step {last['step']}"] if run.outcome in (None, "done") else []
    parts.append(f"loss {last['loss']:.4f}")
    accuracies = [row["eval_accuracy"] for row in run.rows if row.get("eval_accuracy") is not None]
    if accuracies:
        parts.append(f"eval accuracy {accuracies[-1]:.1%}")
    outcome = [f"<b>{html.escape(run.outcome)}</b>"] if run.outcome else []
    return " · ".join(prefix + outcome + parts)
