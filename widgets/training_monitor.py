"""TrainingMonitor: a ``fit`` callback that is also a widget, with live loss-term, accuracy and CKA plots.

Display it in a notebook, pass it to :func:`workbench.train.fit` in ``callbacks=``, and its three
plotly ``FigureWidget``\\ s fill in while training runs. It holds no math of its own: the loss plot is
``state.rows`` (the history ``fit`` returns), the accuracy plot its ``eval_accuracy`` entries, the CKA
plot a :class:`workbench.similarity.CKATrajectory`'s ``steps`` and ``values``. Figures are redrawn
every ``every`` steps, at each epoch's end and at the end, so drawing costs little next to training.
"""
from __future__ import annotations

import html
from collections.abc import Sequence
from typing import Any

import ipywidgets
import plotly.graph_objects as go

from workbench.similarity import CKATrajectory
from workbench.train.callbacks import Callback, TrainState

__all__ = ["TrainingMonitor"]

# row keys that are not loss values (everything else in a history row is the total or a term)
_NOT_LOSSES = ("epoch", "step", "lr", "eval_accuracy")


class TrainingMonitor(ipywidgets.VBox, Callback):
    """Live plots of a training run: loss terms, evaluation accuracy and teacher-student CKA.

    Use it as a callback of :func:`workbench.train.fit` and display it (it is an ``ipywidgets.VBox``).
    ``loss_plot`` has one trace per history column that holds a loss (``loss``, ``ce``, each term),
    ``accuracy_plot`` the ``eval_accuracy`` recorded at each epoch's end (give ``fit`` evaluation data),
    ``cka_plot`` one trace per (teacher, student) layer pair of the trajectory (``pairs``: ``"auto"``,
    ``"all"``, ``"matched"`` or a list, see :meth:`CKATrajectory.pairs`); ``status`` is a one-line
    summary. Figures are redrawn every ``every`` steps, at each epoch's end and when training ends.

    CKA: pass ``trajectory=`` a :class:`~workbench.similarity.CKATrajectory` that you also give to
    ``fit`` (``callbacks=[monitor, trajectory]``, any order: the monitor completes the last point at
    the end), or pass ``probe_data=`` (with ``teacher_layers`` / ``student_layers`` / ``cka_every``)
    and the monitor makes one (``.trajectory``) and runs it itself — then list only the monitor.
    Without either there is no CKA plot. A monitor can be reused: each run starts from its own rows.

    Example:
        >>> import torch
        >>> from torch import nn
        >>> from workbench.losses import KD
        >>> from workbench.train import Distiller, fit
        >>> from widgets import TrainingMonitor
        >>> _ = torch.manual_seed(0); x, y = torch.randn(64, 6), torch.randint(0, 3, (64,))
        >>> teacher = nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 3)).eval()
        >>> student = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 3))
        >>> monitor = TrainingMonitor(probe_data=x[:32], teacher_layers=["0"], student_layers=["0"],
        ...                           every=2, cka_every=2, batch_size=16)
        >>> history = fit(Distiller(teacher, student, {"kd": KD()}), (x, y), (x, y), batch_size=16,
        ...               callbacks=[monitor], device="cpu", progress=False)
        >>> [trace.name for trace in monitor.loss_plot.data]
        ['loss', 'ce', 'kd']
        >>> list(monitor.loss_plot.data[0].y) == history["loss"].tolist(), monitor.trajectory.steps
        (True, [0, 2, 4])
    """

    def __init__(
        self,
        trajectory: CKATrajectory | None = None,
        *,
        every: int = 10,
        probe_data: Any = None,
        teacher_layers: str | Sequence[str] = "stages",
        student_layers: str | Sequence[str] = "stages",
        cka_every: int | None = None,
        pairs: str | Sequence[tuple[str, str]] = "auto",
        title: str = "training",
        height: int = 280,
        **trajectory_kwargs: Any,
    ) -> None:
        if not isinstance(every, int) or isinstance(every, bool) or every < 1:
            raise ValueError(f"every must be a positive number of steps, got {every!r}")
        if trajectory is not None and probe_data is not None:
            raise ValueError("pass either trajectory= (a CKATrajectory you run) or probe_data= (the monitor makes "
                             "one), not both")
        if trajectory is not None and not isinstance(trajectory, CKATrajectory):
            raise TypeError(f"trajectory must be a workbench.similarity.CKATrajectory, got {type(trajectory).__name__}")
        self.owns_trajectory = probe_data is not None
        if self.owns_trajectory:
            trajectory = CKATrajectory(probe_data, teacher_layers, student_layers, every=cka_every or 5 * every,
                                       **trajectory_kwargs)
        elif trajectory_kwargs or cka_every is not None:
            raise TypeError("cka_every and CKATrajectory arguments "
                            f"{sorted(trajectory_kwargs)} only apply with probe_data= (the monitor's own trajectory)")
        self.trajectory = trajectory
        self.every, self.pairs = every, pairs
        self.refreshes = 0  # how many times the figures were redrawn (the throttle is testable)
        self._state: TrainState | None = None
        self._cka_points = -1

        self.title = ipywidgets.HTML(value=f"<b>{html.escape(title)}</b>")
        self.status = ipywidgets.HTML(value="waiting for fit(..., callbacks=[monitor]) to start")
        self.loss_plot = _figure("loss terms (unweighted; loss = weighted total)", "loss", height)
        self.accuracy_plot = _figure("evaluation accuracy (student, end of each epoch)", "top-1 accuracy", height)
        self.cka_plot = _figure(
            "teacher-student CKA" if trajectory is not None else "CKA: no trajectory (pass trajectory= or probe_data=)",
            "CKA", height,
        )
        self.accuracy_plot.update_yaxes(rangemode="tozero")
        plots = [ipywidgets.HBox([self.loss_plot, self.accuracy_plot])]
        if trajectory is not None:
            plots.append(self.cka_plot)
        super().__init__([self.title, self.status, *plots])
        self.add_class("kd-training-monitor")

    # ------------------------------------------------------------------ callback hooks
    def on_train_begin(self, state: TrainState) -> None:
        """Start from this run's rows (empty, or a resumed run's history); run an own trajectory."""
        self._state, self._cka_points = state, -1
        if self.owns_trajectory:
            self.trajectory.on_train_begin(state)
        self.refresh(state)

    def on_step_end(self, state: TrainState) -> None:
        """Run an own trajectory; redraw every ``every`` steps."""
        if self.owns_trajectory:
            self.trajectory.on_step_end(state)
        if state.step % self.every == 0:
            self.refresh(state)

    def on_epoch_end(self, state: TrainState) -> None:
        """Redraw, with the epoch's evaluation accuracy."""
        self.refresh(state)

    def on_train_end(self, state: TrainState) -> None:
        """Complete the trajectory's last point (a no-op when it has it) and draw everything."""
        if self.trajectory is not None:
            self.trajectory.on_train_end(state)  # measures only if the final step is missing
        self.refresh(state, final=True)

    # state_dict / load_state_dict: an own trajectory is checkpointed and resumed with fit's checkpoints
    def state_dict(self) -> dict[str, Any]:
        """The own trajectory's state (saved with ``fit`` checkpoints); empty otherwise."""
        return {"trajectory": self.trajectory.state_dict()} if self.owns_trajectory else {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned."""
        if self.owns_trajectory and "trajectory" in state:
            self.trajectory.load_state_dict(state["trajectory"])

    # ------------------------------------------------------------------ drawing
    def refresh(self, state: TrainState | None = None, *, final: bool = False) -> None:
        """Redraw the three figures from ``state.rows`` and the trajectory (the last state if None)."""
        state = state or self._state
        if state is None:
            return
        rows = state.rows
        steps = [row["step"] for row in rows]
        names = _loss_columns(rows)
        _set_traces(self.loss_plot, [(name, steps, [row.get(name) for row in rows], "lines") for name in names])
        evaluated = [row for row in rows if row.get("eval_accuracy") is not None]
        _set_traces(self.accuracy_plot, [
            ("eval accuracy", [row["step"] for row in evaluated], [row["eval_accuracy"] for row in evaluated],
             "lines+markers")
        ] if evaluated else [])
        if self.trajectory is not None and len(self.trajectory.steps) != self._cka_points:
            self._draw_cka()
        self.refreshes += 1
        self.status.value = _status(state, rows, final)

    def _draw_cka(self) -> None:
        trajectory = self.trajectory
        self._cka_points = len(trajectory.steps)
        if not trajectory.steps:
            _set_traces(self.cka_plot, [])
            return
        values = trajectory.values
        traces = [
            (f"{teacher} ↔ {student}", list(trajectory.steps),
             values[:, trajectory.teacher_names.index(teacher), trajectory.student_names.index(student)].tolist(),
             "lines+markers")
            for teacher, student in trajectory.pairs(self.pairs)
        ]
        _set_traces(self.cka_plot, traces)
        self.cka_plot.layout.yaxis.title.text = f"{trajectory.kernel} CKA"


def _figure(title: str, y_title: str, height: int) -> go.FigureWidget:
    figure = go.FigureWidget()
    figure.update_layout(
        title=title, height=height, margin={"l": 50, "r": 20, "t": 50, "b": 40},
        xaxis_title="training step", yaxis_title=y_title, legend={"font": {"size": 10}},
    )
    return figure


def _set_traces(figure: go.FigureWidget, traces: list[tuple[str, list, list, str]]) -> None:
    """Give ``figure`` exactly these ``(name, x, y, mode)`` traces: in place when the names are unchanged."""
    with figure.batch_update():
        if [trace.name for trace in figure.data] != [name for name, *_ in traces]:
            figure.data = ()
            for name, x, y, mode in traces:
                figure.add_scatter(x=x, y=y, name=name, mode=mode)
            return
        for trace, (_, x, y, _) in zip(figure.data, traces):
            trace.x, trace.y = x, y


def _loss_columns(rows: list[dict[str, Any]]) -> list[str]:
    """``loss`` first, then every other loss-valued key in the order the rows introduce them."""
    names: list[str] = []
    for row in rows:
        names.extend(key for key in row if key not in _NOT_LOSSES and key not in names)
    return sorted(names, key=lambda name: name != "loss")  # stable: loss first, the rest as found


def _status(state: TrainState, rows: list[dict[str, Any]], final: bool) -> str:
    if not rows:
        return f"epoch {state.epoch}/{state.epochs}: starting"
    last = rows[-1]
    parts = [f"epoch {last['epoch']}/{state.epochs}", f"step {last['step']}", f"loss {last['loss']:.4f}"]
    accuracies = [row["eval_accuracy"] for row in rows if row.get("eval_accuracy") is not None]
    if accuracies:
        parts.append(f"eval accuracy {accuracies[-1]:.1%}")
    return ("<b>done</b> · " if final else "") + " · ".join(parts)
