"""TrainingMonitor: a ``fit`` callback that is also a widget, with live loss-term, accuracy and CKA plots,
several runs overlaid, and a Stop button.

Display it in a notebook, pass it to :func:`workbench.train.fit` in ``callbacks=``, and its plotly
``FigureWidget``\\ s fill in while training runs. It holds no math of its own: the loss plot is
``state.rows`` (the history ``fit`` returns), the accuracy plot its ``eval_accuracy`` entries, the CKA
plot a :class:`workbench.similarity.CKATrajectory`'s ``steps`` and ``values``. What is drawn is built by
:mod:`widgets.training_runs`; figures are redrawn every ``every`` steps, at each epoch's end and at the
end. The layout fits its notebook cell at any width: the figures size themselves to their box, and the
loss and accuracy plots share a row or wrap onto two.

The Stop button works while the training runs through ``await monitor.run(fit, ...)`` (the work goes to
a worker thread and the kernel keeps handling widget events, see :mod:`widgets.background`); a plain
blocking ``fit(...)`` holds the kernel, so there the button stays disabled and the kernel's interrupt
(Ctrl-C) is the way to stop: ``fit`` ends cleanly either way and the status says so.
"""
from __future__ import annotations

import asyncio
import copy
import html
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

import ipywidgets
import plotly.graph_objects as go

from widgets.background import await_in_thread
from widgets.training_runs import RunRecord, accuracy_traces, loss_traces, outcome_of, status_line
from workbench.similarity import CKATrajectory
from workbench.train.callbacks import Callback, TrainState

__all__ = ["TrainingMonitor", "STOP_REASON"]

STOP_REASON = "stop button"  # the stop_reason a click on Stop gives the run
INTERRUPT_REASON = "KeyboardInterrupt"  # what fit itself records for Ctrl-C (workbench.train.interrupt)
T = TypeVar("T")
_BLOCKING_TIP = ("Stop works when training runs through `await monitor.run(fit, ...)`; a plain fit(...) holds the "
                 "kernel: interrupt the kernel (Ctrl-C) instead, fit then ends cleanly after the current step")


class TrainingMonitor(ipywidgets.VBox, Callback):
    """Live plots of training runs: loss terms, evaluation accuracy and teacher-student CKA, and a Stop button.

    Use it as a callback of :func:`workbench.train.fit` and display it (it is an ``ipywidgets.VBox``).
    ``loss_plot`` has one trace per history column that holds a loss (``loss``, ``ce``, each term),
    ``accuracy_plot`` the ``eval_accuracy`` recorded at each epoch's end (give ``fit`` evaluation data),
    ``cka_plot`` one trace per (teacher, student) layer pair of the trajectory (``pairs``: ``"auto"``,
    ``"all"``, ``"matched"`` or a list, see :meth:`CKATrajectory.pairs`); ``status`` is a one-line
    summary (``done``, or ``interrupted at epoch e, step s (reason)`` for a run that was stopped).

    Several runs: each ``fit`` the monitor watches is a run (``runs``, :class:`~widgets.training_runs.RunRecord`);
    name the next one with :meth:`start_run` (else ``"run k"``). Every run's curves stay, grouped in the
    legend under its name, earlier runs faded; the accuracy plot overlays every run's evaluation accuracy.
    The CKA plot shows the current run's trajectory. :meth:`clear_runs` forgets the earlier runs.

    Stop: ``history = await monitor.run(fit, model, data, callbacks=[monitor])`` trains in a worker thread
    while the cell waits, so a click on Stop reaches the kernel and ends the run after the current step
    (``state.request_stop("stop button")``: the history comes back marked as interrupted); Ctrl-C does the
    same with reason ``"KeyboardInterrupt"``. :meth:`stop` is the button's action, callable from code.

    CKA: pass ``trajectory=`` a :class:`~workbench.similarity.CKATrajectory` that you also give to
    ``fit`` (``callbacks=[monitor, trajectory]``, any order: the monitor completes the last point at
    the end), or pass ``probe_data=`` (with ``teacher_layers`` / ``student_layers`` / ``cka_every``)
    and the monitor makes one (``.trajectory``) and runs it itself — then list only the monitor.
    Without either there is no CKA plot.

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
        >>> monitor.start_run("kd, T=8")  # a second run, overlaid on the first
        >>> _ = fit(Distiller(teacher, student, {"kd": KD(T=8)}), (x, y), (x, y), batch_size=16,
        ...         callbacks=[monitor], device="cpu", progress=False)
        >>> [trace.name for trace in monitor.accuracy_plot.data], monitor.runs[-1].outcome
        (['run 1', 'kd, T=8'], 'done')
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
        self.runs: list[RunRecord] = []
        self._state: TrainState | None = None  # the run under way (None between runs)
        self._epochs = 1
        self._next_name: str | None = None
        self._stop_request: str | None = None  # a stop asked for (by the button) and not yet passed on to fit
        self._stop_every_run: str | None = None  # Ctrl-C during run(): every run still to come stops too
        self._loop: asyncio.AbstractEventLoop | None = None  # set while run() drives the training
        self._cka_points = -1

        self.title = ipywidgets.HTML(value=f"<b>{html.escape(title)}</b>")
        self.status = ipywidgets.HTML(value="waiting for fit(..., callbacks=[monitor]) to start",
                                      layout=ipywidgets.Layout(flex="1 1 12em", min_width="0"))
        self.status.add_class("kd-training-status")
        self.stop_button = ipywidgets.Button(description="Stop", icon="stop", disabled=True, tooltip=_BLOCKING_TIP,
                                             layout=ipywidgets.Layout(width="auto", flex="0 0 auto"))
        self.stop_button.on_click(lambda _button: self.stop(STOP_REASON))
        self.loss_plot = _figure("loss terms (unweighted; loss = weighted total)", "loss", height)
        self.accuracy_plot = _figure("evaluation accuracy (student, end of each epoch)", "top-1 accuracy", height)
        self.cka_plot = _figure(
            "teacher-student CKA" if trajectory is not None else "CKA: no trajectory (pass trajectory= or probe_data=)",
            "CKA", height,
        )
        self.accuracy_plot.update_yaxes(rangemode="tozero")
        self.plots = [self.loss_plot, self.accuracy_plot] + ([self.cka_plot] if trajectory is not None else [])
        full_width = ipywidgets.Layout(width="100%", max_width="100%", flex_flow="row wrap", align_items="center")
        rows = [ipywidgets.HBox([self.stop_button, self.status], layout=full_width),
                ipywidgets.HBox([_fitted(self.loss_plot), _fitted(self.accuracy_plot)],
                                layout=ipywidgets.Layout(width="100%", max_width="100%", flex_flow="row wrap"))]
        if trajectory is not None:
            rows.append(_fitted(self.cka_plot, basis="100%"))
        super().__init__([self.title, *rows], layout=ipywidgets.Layout(width="100%", max_width="100%"))
        self.add_class("kd-training-monitor")

    # ------------------------------------------------------------------ runs and stopping
    def start_run(self, name: str) -> None:
        """Name the next run (its legend group and status label), e.g. ``"kd, seed 0"``."""
        if not isinstance(name, str) or not name.strip():
            raise ValueError(f"a run name is a non-empty string such as 'kd, seed 0', got {name!r}")
        self._next_name = name

    def clear_runs(self) -> None:
        """Forget every finished run (their curves go); a run under way stays."""
        self.runs = [run for run in self.runs if not run.finished]
        self.refresh()

    def stop(self, reason: str = STOP_REASON) -> bool:
        """Ask the run under way to stop after its current step (what Stop does); ``False`` if none is running.

        The request reaches ``fit`` at the next step's end as ``state.request_stop(reason)``.
        """
        if self._state is None:
            return False
        self._stop_request = reason
        self._ui(self._set_stop_button, False)  # from any thread: the widget changes in the kernel's
        return True

    async def run(self, function: Callable[..., T], /, *args: Any, **kwargs: Any) -> T:
        """``await`` ``function(*args, **kwargs)`` (``fit`` with this monitor in its callbacks, or a comparison
        that passes it to every ``fit``) in a worker thread, so that Stop works while it trains.

        The kernel keeps handling widget events while the cell awaits; every redraw is handed back to the
        kernel's thread. Ctrl-C (the kernel's interrupt) asks the run under way, and every run still to
        come in this call, to stop after its current step (reason ``"KeyboardInterrupt"``), then waits for
        ``function`` to return: the cell gets the history so far, marked as interrupted.
        """
        if self._loop is not None:
            raise RuntimeError("this monitor is already driving a run: await it before starting another")
        self._loop = asyncio.get_running_loop()
        self._stop_every_run = None

        def interrupted() -> None:
            self._stop_every_run = INTERRUPT_REASON
            self.stop(INTERRUPT_REASON)

        try:
            return await await_in_thread(function, *args, on_cancel=interrupted, **kwargs)
        finally:
            self._loop, self._stop_every_run = None, None

    # ------------------------------------------------------------------ callback hooks
    def on_train_begin(self, state: TrainState) -> None:
        """A new run (named by :meth:`start_run`), from its rows (empty, or a resumed run's history)."""
        self._state, self._epochs, self._cka_points = state, state.epochs, -1
        self._stop_request = self._stop_every_run  # a click left over from an earlier run stops nothing
        self.runs.append(RunRecord(self._next_name or f"run {len(self.runs) + 1}", list(state.rows)))
        self._next_name = None
        if self.owns_trajectory:
            self.trajectory.on_train_begin(state)
        self._ui(self._set_stop_button, self._loop is not None and self._stop_request is None)
        self.refresh(state)

    def on_step_end(self, state: TrainState) -> None:
        """Pass a stop request on to ``fit``; run an own trajectory; redraw every ``every`` steps."""
        if self._stop_request is not None and not state.stop:
            state.request_stop(self._stop_request)
        if self.owns_trajectory:
            self.trajectory.on_step_end(state)
        if state.step % self.every == 0:
            self.refresh(state, whole=False)

    def on_epoch_end(self, state: TrainState) -> None:
        """Redraw, with the epoch's evaluation accuracy."""
        self.refresh(state)

    def on_train_end(self, state: TrainState) -> None:
        """Complete the trajectory's last point (a no-op when it has it), record the outcome, draw everything."""
        if self.trajectory is not None:
            self.trajectory.on_train_end(state)  # measures only if the final step is missing
        if self.runs:
            self.runs[-1].outcome = outcome_of(state)
        self.refresh(state)
        self._state = None
        self._ui(self._set_stop_button, False)

    # state_dict / load_state_dict: an own trajectory is checkpointed and resumed with fit's checkpoints
    def state_dict(self) -> dict[str, Any]:
        """The own trajectory's state (saved with ``fit`` checkpoints); empty otherwise."""
        return {"trajectory": self.trajectory.state_dict()} if self.owns_trajectory else {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned."""
        if self.owns_trajectory and "trajectory" in state:
            self.trajectory.load_state_dict(state["trajectory"])

    # ------------------------------------------------------------------ drawing
    def refresh(self, state: TrainState | None = None, *, whole: bool = True) -> None:
        """Redraw the figures from the runs' rows and the trajectory (``state``: the run under way's latest).

        ``whole=False`` (the redraws between epoch ends) sends only what changed to the views on the page."""
        if state is not None and self.runs:
            self.runs[-1].rows = list(state.rows)
        if not self.runs:
            self._ui(self._draw, [], [], None, "no runs: waiting for fit(..., callbacks=[monitor]) to start", True)
            return
        # built here, in the training thread; only applied in the kernel's (see run())
        cka = None
        if self.trajectory is not None and len(self.trajectory.steps) != self._cka_points:
            self._cka_points = len(self.trajectory.steps)
            cka = self._cka_traces()
        status = status_line(self.runs[-1], self._epochs, label=len(self.runs) > 1)
        if self._stop_request is not None and not self.runs[-1].finished:
            status += f" · stopping after this step ({html.escape(self._stop_request)})"
        self.refreshes += 1
        self._ui(self._draw, loss_traces(self.runs), accuracy_traces(self.runs), cka, status, whole)

    def _cka_traces(self) -> list[dict[str, Any]]:
        trajectory = self.trajectory
        steps = list(trajectory.steps)
        if not steps:
            return []
        values = trajectory.values[: len(steps)]
        return [
            {"name": f"{teacher} ↔ {student}", "x": steps, "mode": "lines+markers",
             "y": values[:, trajectory.teacher_names.index(teacher), trajectory.student_names.index(student)].tolist()}
            for teacher, student in trajectory.pairs(self.pairs)
        ]

    def _draw(self, loss: list[dict], accuracy: list[dict], cka: list[dict] | None, status: str, whole: bool) -> None:
        if cka is not None:
            self.cka_plot.layout.yaxis.title.text = f"{self.trajectory.kernel} CKA"
            _set_traces(self.cka_plot, cka, whole=whole)
        _set_traces(self.loss_plot, loss, whole=whole)
        _set_traces(self.accuracy_plot, accuracy, whole=whole)
        self.status.value = status

    def _set_stop_button(self, enabled: bool) -> None:
        self.stop_button.disabled = not enabled
        self.stop_button.tooltip = "Stop this run after the current step" if enabled else _BLOCKING_TIP

    def _ui(self, action: Callable[..., None], *args: Any) -> None:
        """Run a widget change in the kernel's thread: at once, or handed to run()'s event loop."""
        if self._loop is None:
            action(*args)
        else:
            self._loop.call_soon_threadsafe(action, *args)


def _figure(title: str, y_title: str, height: int) -> go.FigureWidget:
    """A figure that takes its box's width (no fixed pixel width)."""
    figure = go.FigureWidget()
    figure.update_layout(
        title=title, height=height, autosize=True, margin={"l": 50, "r": 20, "t": 50, "b": 40},
        xaxis_title="training step", yaxis_title=y_title, legend={"font": {"size": 10}, "groupclick": "togglegroup"},
    )
    return figure


def _fitted(figure: go.FigureWidget, basis: str = "22em") -> ipywidgets.VBox:
    """``figure`` in a box that shares its row (``basis`` wide at least, when there is room) and never
    grows past it; the figure stretches to the box's width."""
    return ipywidgets.VBox([figure], layout=ipywidgets.Layout(flex=f"1 1 {basis}", min_width="0", max_width="100%",
                                                              overflow="hidden"))


def _key(trace: Any) -> tuple[Any, Any]:
    return (trace.get("legendgroup"), trace["name"]) if isinstance(trace, dict) else (trace.legendgroup, trace.name)


def _set_traces(figure: go.FigureWidget, traces: list[dict[str, Any]], *, whole: bool = False) -> None:
    """Give ``figure`` exactly these traces (``go.Scatter`` keyword arguments): in place when the same
    (group, name) traces are there already, sending only the ones whose points changed.

    When the traces are replaced (or ``whole``), the figure's whole state is synced too: plotly's widget
    applies changes only in views that exist, so a view that renders later (``display(monitor)`` and
    ``fit`` in one cell: the kernel is faster than the page) would start from the empty figure."""
    with figure.batch_update():
        replace = [_key(trace) for trace in figure.data] != [_key(trace) for trace in traces]
        if replace:
            figure.data = ()
            for trace in traces:
                figure.add_scatter(**trace)
        else:
            for old, new in zip(figure.data, traces):
                if len(old.x) != len(new["x"]) or list(old.y[-1:]) != new["y"][-1:]:
                    old.x, old.y = new["x"], new["y"]
    if replace or whole:
        figure._widget_layout = copy.deepcopy(figure._layout_obj._props)  # what plotly's constructor syncs
        figure._widget_data = copy.deepcopy(figure._data)
