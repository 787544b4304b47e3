"""OFAExplorer: a :class:`~widgets.TrainingMonitor` that also shows an OFA-KD run stage by stage — each
branch's loss while ``fit`` trains, and each branch's accuracy on held-out data at every epoch's end beside
the student head's.

A branch is a Distiller term with a ``.branch`` (a module projecting a student stage into the logit space,
as :func:`workbench.losses.ofa_terms` builds one per stage). The explorer holds no math of its own: the
branch-loss plot is the fit history's branch columns (``"ofa@<stage>"``, each term's unweighted value per
step), the branch-accuracy plot the :class:`~workbench.probes.BranchAccuracy` that
:func:`workbench.probes.branch_accuracy` returns on the held-out data at each epoch's end. Everything the
monitor does — the loss terms, the evaluation accuracy, CKA, several runs, Stop and the status line — it
does as a :class:`~widgets.TrainingMonitor` (a subclass: the same hooks, one more row of figures).
"""
from __future__ import annotations

import html
from collections.abc import Sequence
from typing import Any

import ipywidgets
import pandas as pd
from plotly.colors import sample_colorscale

from widgets.training_monitor import TrainingMonitor, _figure, _fitted, _set_traces
from workbench.probes import BranchAccuracy, branch_accuracy
from workbench.probes.branches import branch_terms
from workbench.train.callbacks import TrainState

__all__ = ["OFAExplorer", "branch_loss_traces", "branch_accuracy_traces"]

HEAD = "head"  # the student's own classifier: the last point of every depth axis
HEAD_COLOUR = "#222222"
_WAITING = "branches: waiting for fit(..., callbacks=[explorer]) to start"
_HOW = ("Distiller(teacher, student, **workbench.losses.ofa_terms(teacher, student, batch)) hangs one on every "
        "student stage")


def _depth_colours(count: int) -> list[str]:
    """One colour per depth, shallow to deep (a sequential scale: depth reads as colour in both plots)."""
    return sample_colorscale("Viridis", [index / max(count - 1, 1) * 0.85 for index in range(count)])


def branch_loss_traces(rows: Sequence[dict[str, Any]], branches: dict[str, str],
                       final_terms: Sequence[str] = ()) -> list[dict[str, Any]]:
    """Trace specs (``go.Scatter`` keyword arguments) for the branch-loss plot: one per branch, named by its
    stage, its history column's values per step; then each of ``final_terms`` (terms on the student's final
    logits, e.g. ``"ofa"``), dashed, named ``"head: <term>"``.

    Example:
        >>> rows = [{"step": 1, "loss": 9.0, "ofa": 2.0, "ofa@blocks_0": 2.3}, {"step": 2, "loss": 8.0, "ofa": 1.5,
        ...         "ofa@blocks_0": 2.1}]
        >>> [(t["name"], t["y"]) for t in branch_loss_traces(rows, {"ofa@blocks_0": "blocks.0"}, ["ofa"])]
        [('blocks.0', [2.3, 2.1]), ('head: ofa', [2.0, 1.5])]
    """
    steps = [row["step"] for row in rows]
    colours = _depth_colours(len(branches))
    traces = [{"name": layer, "x": steps, "y": [row.get(term) for row in rows], "mode": "lines",
               "line": {"color": colour, "width": 1.5}, "hovertemplate": f"{html.escape(term)}: %{{y:.4f}}<extra>"
               f"step %{{x}}</extra>"} for (term, layer), colour in zip(branches.items(), colours)]
    traces += [{"name": f"{HEAD}: {term}", "x": steps, "y": [row.get(term) for row in rows], "mode": "lines",
                "line": {"color": HEAD_COLOUR, "width": 1.5, "dash": "dash"}} for term in final_terms]
    return traces


def branch_accuracy_traces(results: Sequence[tuple[int, int, BranchAccuracy]]) -> list[dict[str, Any]]:
    """Trace specs for the branch-accuracy plot from ``(epoch, step, BranchAccuracy)`` per evaluated epoch:
    one trace per branch (named by its layer) and one for the student's head, accuracy against the step.

    Example:
        >>> from workbench.probes import BranchAccuracy
        >>> result = BranchAccuracy(["ofa@blocks_0"], ["blocks.0"], [0.25], 0.5, 8)
        >>> [(t["name"], t["x"], t["y"]) for t in branch_accuracy_traces([(1, 4, result)])]
        [('blocks.0', [4], [0.25]), ('head', [4], [0.5])]
    """
    if not results:
        return []
    layers = results[-1][2].layers
    steps = [step for _, step, _ in results]  # the epoch ends' steps, as the monitor's accuracy plot
    colours = _depth_colours(len(layers))
    traces = []
    for index, (layer, colour) in enumerate(zip(layers, colours)):
        traces.append({"name": layer, "x": steps, "y": [result.accuracy[index] for _, _, result in results],
                       "mode": "lines+markers", "line": {"color": colour, "width": 1.5},
                       "hovertemplate": "step %{x}: %{y:.1%}<extra>" + html.escape(layer) + "</extra>"})
    traces.append({"name": HEAD, "x": steps, "y": [result.final_accuracy for _, _, result in results],
                   "mode": "lines+markers", "line": {"color": HEAD_COLOUR, "width": 2.5, "dash": "dash"},
                   "hovertemplate": "step %{x}: %{y:.1%}<extra>student head</extra>"})
    return traces


class OFAExplorer(TrainingMonitor):
    """A :class:`~widgets.TrainingMonitor` with an OFA-KD row: per-stage branch loss while ``fit`` trains, and
    per-stage branch accuracy on ``data`` at each epoch's end beside the student head's (final logits).

    Use it as the monitor: display it, pass it in ``fit``'s ``callbacks=`` (``await explorer.run(fit, ...)``
    for a live Stop button). ``branch_loss_plot`` has one trace per branch term of the Distiller (any term
    with a ``.branch`` and a ``.logits(features)``, in the student's layer order), its history column per
    step, colour by depth, and the terms on the final logits dashed (``"head: ofa"``).
    ``branch_accuracy_plot`` has one trace per branch and a ``"head"`` trace:
    :func:`workbench.probes.branch_accuracy` on ``data`` (labelled held-out data; ``None``: no accuracy
    plot) after each epoch, against the step. ``results`` keeps those
    ``(epoch, step, BranchAccuracy)`` of the run under way (the last run), ``accuracy_frame()`` as a table;
    ``branch_status`` says which branches there are and the last epoch's accuracies, or, for a model or
    Distiller without branch terms, that there is nothing to show per stage (the rest of the monitor works
    as usual). An epoch cut short by a stop is not measured (as ``fit`` does not evaluate it).

    ``batch_size`` is ``branch_accuracy``'s; every other keyword (``every``, ``trajectory``,
    ``probe_data``, ``title``, ``height``, ...) is :class:`~widgets.TrainingMonitor`'s. The branch plots show
    the run under way; the monitor's loss and accuracy plots overlay every run.

    Example:
        >>> import torch
        >>> from workbench import models
        >>> from workbench.losses import ofa_terms
        >>> from workbench.train import Distiller, fit
        >>> from widgets import OFAExplorer
        >>> _ = torch.manual_seed(0)
        >>> x, y = torch.randn(32, 1, 16, 16), torch.randint(0, 10, (32,))
        >>> teacher = models.create("cnn", widths=(8, 16), img_size=16).eval()
        >>> student = models.create("vit", img_size=16, patch_size=4, dim=16, depth=2, heads=2)
        >>> distiller = Distiller(teacher, student, **ofa_terms(teacher, student, (x, y)))
        >>> explorer = OFAExplorer((x, y), every=2)
        >>> history = fit(distiller, (x, y), (x, y), epochs=2, batch_size=16, callbacks=[explorer],
        ...               device="cpu", progress=False)
        >>> [trace.name for trace in explorer.branch_loss_plot.data]
        ['blocks.0', 'blocks.1', 'head: ofa']
        >>> list(explorer.branch_loss_plot.data[0].y) == history["ofa@blocks_0"].tolist()
        True
        >>> [trace.name for trace in explorer.branch_accuracy_plot.data], len(explorer.results)
        (['blocks.0', 'blocks.1', 'head'], 2)
        >>> bool(explorer.results[-1][2].final_accuracy == history["eval_accuracy"].iloc[-1])  # the same data
        True
    """

    def __init__(self, data: Any = None, *, batch_size: int = 256, every: int = 10,
                 title: str = "OFA-KD: per-stage branches", height: int = 280, **monitor_kwargs: Any) -> None:
        if not isinstance(batch_size, int) or isinstance(batch_size, bool) or batch_size < 1:
            raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
        self.data, self.batch_size = data, batch_size
        self.branches: dict[str, str] = {}  # the run under way's branch terms -> student layers
        self.final_terms: list[str] = []  # its terms on the final logits (drawn dashed beside the branches)
        self.results: list[tuple[int, int, BranchAccuracy]] = []
        self._kind: str | None = None  # "model", "distiller", "branches": what the run under way trains
        self._terms: list[str] = []
        super().__init__(every=every, title=title, height=height, **monitor_kwargs)
        self.branch_status = ipywidgets.HTML(value=_WAITING, layout=ipywidgets.Layout(flex="1 1 12em", min_width="0"))
        self.branch_status.add_class("kd-ofa-status")
        self.branch_loss_plot = _figure("branch loss per stage (unweighted)", "loss", height)
        self.branch_accuracy_plot = _figure(
            "held-out accuracy per branch (epoch ends)" if data is not None
            else "branch accuracy: no held-out data (data=)", "top-1 accuracy", height)
        self.branch_accuracy_plot.update_yaxes(rangemode="tozero", tickformat=".0%")
        self.plots = [self.branch_loss_plot, self.branch_accuracy_plot, *self.plots]
        row = ipywidgets.HBox([_fitted(self.branch_loss_plot), _fitted(self.branch_accuracy_plot)],
                              layout=ipywidgets.Layout(width="100%", max_width="100%", flex_flow="row wrap"))
        title_widget, controls, *rest = self.children
        status_row = ipywidgets.HBox([self.branch_status], layout=ipywidgets.Layout(width="100%", max_width="100%"))
        self.children = (title_widget, controls, status_row, row, *rest)
        self.add_class("kd-ofa-explorer")

    # ------------------------------------------------------------------ callback hooks
    def on_train_begin(self, state: TrainState) -> None:
        """A new run: find its branch terms (none is a state the status line explains), then as the monitor."""
        distiller = state.distiller
        self.branches = branch_terms(distiller) if distiller is not None else {}
        self.final_terms = [] if distiller is None else [name for name in distiller.logit_terms()
                                                         if name not in self.branches]
        self._kind = "model" if distiller is None else "branches" if self.branches else "distiller"
        self.results = []
        self._terms = [] if distiller is None else list(distiller.terms)
        super().on_train_begin(state)

    def on_epoch_end(self, state: TrainState) -> None:
        """Measure every branch's accuracy on the held-out data (unless the epoch was cut short), then redraw."""
        if self.data is not None and self.branches and not state.interrupted and state.rows:
            result = branch_accuracy(state.distiller, self.data, batch_size=self.batch_size, device=state.device)
            self.results.append((state.epoch, state.rows[-1]["step"], result))
        super().on_epoch_end(state)

    # ------------------------------------------------------------------ results
    def accuracy_frame(self) -> pd.DataFrame:
        """Every measured epoch of the run under way as one table: ``epoch``, ``step`` and the columns of
        :meth:`BranchAccuracy.to_frame` (``term``, ``layer``, ``depth``, ``accuracy``; the head row last)."""
        frames = [result.to_frame().assign(epoch=epoch, step=step) for epoch, step, result in self.results]
        if not frames:
            return pd.DataFrame(columns=["epoch", "step", "term", "layer", "depth", "accuracy"])
        frame = pd.concat(frames, ignore_index=True)
        return frame[["epoch", "step", *[column for column in frame.columns if column not in ("epoch", "step")]]]

    # ------------------------------------------------------------------ drawing
    def refresh(self, state: TrainState | None = None, *, whole: bool = True) -> None:
        """Redraw the monitor's figures (:meth:`TrainingMonitor.refresh`), then the branch row."""
        super().refresh(state, whole=whole)
        if self._kind != "branches":
            self._ui(self._draw_branches, [], [], self._branch_status(), whole)
            return
        rows = self.runs[-1].rows if self.runs else []
        self._ui(self._draw_branches, branch_loss_traces(rows, self.branches, self.final_terms),
                 branch_accuracy_traces(self.results), self._branch_status(), whole)

    def _branch_status(self) -> str:
        if self._kind is None:
            return _WAITING
        if self._kind == "model":
            return (f"<b>no branches</b>: the model trained is not a Distiller, so there is nothing to show per "
                    f"stage; {html.escape(_HOW)}")
        if self._kind == "distiller":
            terms = html.escape(", ".join(self._terms)) or "none"
            return (f"<b>no branches</b>: none of this Distiller's terms ({terms}) has a <code>.branch</code>, so "
                    f"there is nothing to show per stage; {html.escape(_HOW)}")
        parts = [f"{len(self.branches)} branch{'es' if len(self.branches) > 1 else ''} at "
                 + ", ".join(html.escape(layer) for layer in self.branches.values())]
        if self.data is None:
            parts.append("no held-out data: pass OFAExplorer(data=...) for each branch's accuracy")
        elif self.results:
            epoch, _, result = self.results[-1]
            accuracies = [f"{html.escape(layer)} {value:.1%}" for layer, value in zip(result.layers, result.accuracy)]
            parts.append(f"epoch {epoch}, held-out accuracy ({result.n_samples} samples): "
                         + " · ".join([*accuracies, f"<b>{HEAD} {result.final_accuracy:.1%}</b>"]))
        else:
            parts.append("held-out accuracy after the first epoch")
        return " · ".join(parts)

    def _draw_branches(self, loss: list[dict], accuracy: list[dict], status: str, whole: bool) -> None:
        _set_traces(self.branch_loss_plot, loss, whole=whole)
        _set_traces(self.branch_accuracy_plot, accuracy, whole=whole)
        self.branch_status.value = status
