"""GapExplorer: choose teacher and student layers, compute their CKA matrix, click a cell to read that
teacher layer against every student layer.

The widget composes :func:`workbench.similarity.cka_matrix` and :meth:`CKAResult.figure`; it holds no
math of its own. The row plot is read from ``result.values``, never recomputed. Errors from a
computation are shown in the status line (the traceback below it) and re-raised by :meth:`compute`;
the hooks ``cka_matrix`` registers are removed by :func:`workbench.capture` whatever happens.
"""
from __future__ import annotations

import html
import inspect
import time
import traceback
from collections.abc import Sequence

import ipywidgets
import numpy as np
import plotly.graph_objects as go
from plotly.callbacks import Points
from torch import nn

from workbench.capture import layer_names, resolve_layers
from workbench.data import num_samples
from workbench.probes.cka_stream import check_kernel
from workbench.probes.kernels import KERNELS
from workbench.similarity import CKAResult, cka_matrix

# arguments the controls own; every other cka_matrix keyword passes through unchanged
_CONTROLLED = ("teacher_layers", "student_layers", "kernel", "debiased", "n_samples")
_PASSED_THROUGH = tuple(
    name
    for name in inspect.signature(cka_matrix).parameters
    if name not in ("teacher", "student", "data", *_CONTROLLED)
)
_HIGHLIGHT = "#2a9d8f"


class GapExplorer(ipywidgets.VBox):
    """Interactive layer-by-layer CKA between a teacher and a student.

    Controls: ``teacher_layers`` / ``student_layers`` (``SelectMultiple`` over every layer name,
    defaulting to the models' stages), ``kernel`` (``Dropdown``), ``debiased`` (``Checkbox``),
    ``n_samples`` (``BoundedIntText``, 0 = all), ``compute_button``. Output: ``progress`` (an ``Output``
    holding the ``tqdm`` bar while computing and the traceback after an error), ``status`` (``HTML``),
    ``heatmap`` (``go.FigureWidget`` of ``result.figure()``; click a cell) and ``row_plot``
    (``go.FigureWidget``: the clicked teacher layer's CKA against every student layer). ``result`` is
    the last :class:`CKAResult` (``None`` before the first computation); ``error`` the last exception.

    ``cka_kwargs`` are :func:`~workbench.similarity.cka_matrix` keywords: ``teacher_layers``,
    ``student_layers``, ``kernel``, ``debiased`` and ``n_samples`` set the controls' first values; the
    rest (``batch_size``, ``device``, ``student_data``, ``progress``, ...) are passed on as given.

    Example:
        >>> import torch
        >>> from torch import nn
        >>> from widgets import GapExplorer
        >>> torch.manual_seed(0)  # doctest: +ELLIPSIS
        <torch._C.Generator object at ...>
        >>> teacher = nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 16), nn.ReLU(), nn.Linear(16, 4))
        >>> student = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 4))
        >>> explorer = GapExplorer(teacher, student, torch.randn(64, 8), batch_size=32, device="cpu",
        ...                        progress=False)
        >>> explorer.kernel.value = "rbf"
        >>> result = explorer.compute()          # or press Compute; in a notebook, display `explorer`
        >>> explorer.heatmap.data[0].z.shape, result.kernel
        ((5, 3), 'rbf')
        >>> explorer.show_row("2")               # what clicking a cell of row "2" does
        >>> bool(np.allclose(explorer.row_plot.data[0].y, result.values[2]))
        True
    """

    def __init__(self, teacher: nn.Module, student: nn.Module, data: object, **cka_kwargs):
        unknown = sorted(set(cka_kwargs) - set(_CONTROLLED) - set(_PASSED_THROUGH))
        if unknown:
            raise TypeError(
                f"GapExplorer got unknown cka_matrix arguments {unknown}; "
                f"valid ones are {sorted(_CONTROLLED + _PASSED_THROUGH)}"
            )
        check_kernel(cka_kwargs.get("kernel", "linear"))
        self.teacher, self.student, self.data = teacher, student, data
        self.cka_kwargs = {name: value for name, value in cka_kwargs.items() if name not in _CONTROLLED}
        self.result: CKAResult | None = None
        self.error: BaseException | None = None
        self.selected_teacher_layer: str | None = None

        self.teacher_layers = _layer_select(teacher, cka_kwargs.get("teacher_layers", "stages"), "teacher")
        self.student_layers = _layer_select(student, cka_kwargs.get("student_layers", "stages"), "student")
        self.kernel = ipywidgets.Dropdown(
            options=list(KERNELS), value=cka_kwargs.get("kernel", "linear"), description="kernel"
        )
        self.debiased = ipywidgets.Checkbox(value=bool(cka_kwargs.get("debiased", True)), description="debiased")
        total = num_samples(data)
        self.n_samples = ipywidgets.BoundedIntText(
            value=cka_kwargs.get("n_samples") or total or 0,
            min=0,
            max=total if total else 2**31 - 1,
            description="n_samples",
            tooltip="samples to use; 0 = all",
        )
        self.compute_button = ipywidgets.Button(
            description="Compute", button_style="primary", icon="play", tooltip="compute the CKA matrix"
        )
        self.progress = ipywidgets.Output(_view_count=0)  # the frontend counts its views
        self.status = ipywidgets.HTML(value="Choose layers and settings, then press <b>Compute</b>.")
        self.heatmap, self.row_plot = _empty_figures()
        self.heatmap.data[0].on_click(self.select_row)

        self.compute_button.on_click(self._on_compute_clicked)
        for control in (self.teacher_layers, self.student_layers):
            control.style = {"description_width": "initial"}
        for control in (self.kernel, self.debiased, self.n_samples, self.compute_button):
            control.layout.width = "230px"
        settings = ipywidgets.VBox([self.kernel, self.debiased, self.n_samples, self.compute_button])
        super().__init__(
            [
                ipywidgets.HBox([self.teacher_layers, self.student_layers, settings]),
                self.progress,
                self.status,
                self.heatmap,
                self.row_plot,
            ]
        )
        self.add_class("kd-gap-explorer")

    # ------------------------------------------------------------------ computing
    def compute(self) -> CKAResult:
        """Run ``cka_matrix`` with the controls' values, show the heatmap and the first (or the
        previously selected) teacher layer's row; returns the :class:`CKAResult`.

        A failure is shown in ``status`` (traceback in ``progress``), kept in ``error`` and re-raised;
        the previous ``result`` and figures stay as they were.
        """
        self.compute_button.disabled = True
        capturing = self._progress_is_shown()
        self._clear_progress(capturing)
        started = time.perf_counter()
        try:
            arguments = self._arguments()
            self._set_status(
                f"Computing {arguments['kernel']} CKA: {len(arguments['teacher_layers'])} teacher × "
                f"{len(arguments['student_layers'])} student layers…"
            )
            result = self._run_cka(arguments, capturing)
        except KeyboardInterrupt:
            self._set_status("Interrupted; the previous result is still shown.", error=True)
            raise
        except Exception as error:
            self.error = error
            self._set_status(f"{type(error).__name__}: {error}", error=True)
            self._write_progress("".join(traceback.format_exception(error)), capturing)
            raise
        finally:
            self.compute_button.disabled = False
        # a finished tqdm bar closes its widget, so its display would read "Loading widget..." for good
        self._clear_progress(capturing)
        self.error = None
        self.result = result
        self._show_heatmap(result)
        selected = self.selected_teacher_layer
        self.show_row(selected if selected in result.teacher_layers else result.teacher_layers[0])
        self._set_status(
            f"Done in {time.perf_counter() - started:.1f} s: {html.escape(result.title)}. "
            "Click a cell to see that teacher layer against every student layer."
        )
        return result

    def _run_cka(self, arguments: dict, capturing: bool) -> CKAResult:
        if not capturing:
            return cka_matrix(self.teacher, self.student, self.data, **arguments)
        failure: BaseException | None = None
        with self.progress:  # in a kernel an Output swallows what is raised inside it: carry it out
            try:
                result = cka_matrix(self.teacher, self.student, self.data, **arguments)
            except BaseException as error:
                failure = error
        if failure is not None:
            raise failure
        return result

    def _progress_is_shown(self) -> bool:
        """Whether the progress area is on screen in a kernel's frontend, so that it can capture the
        ``tqdm`` bar; until it is (e.g. ``compute()`` before the widget is displayed) the bar goes
        wherever ``tqdm.auto`` puts it."""
        shell = _ipython()
        return shell is not None and getattr(shell, "kernel", None) is not None and bool(self.progress._view_count)

    def _clear_progress(self, capturing: bool) -> None:
        if capturing:
            self.progress.clear_output()  # through the capture, so it lands after the bar it clears
        else:
            self.progress.outputs = ()  # clear_output() would print control codes outside a kernel

    def _write_progress(self, text: str, capturing: bool) -> None:
        if capturing:
            with self.progress:
                print(text)
        else:
            self.progress.append_stdout(text)

    def _arguments(self) -> dict:
        """The ``cka_matrix`` keywords from the controls, checked before anything runs."""
        if not self.teacher_layers.value:
            raise ValueError("choose at least one teacher layer")
        if not self.student_layers.value:
            raise ValueError("choose at least one student layer")
        return {
            **self.cka_kwargs,
            "teacher_layers": list(self.teacher_layers.value),
            "student_layers": list(self.student_layers.value),
            "kernel": self.kernel.value,
            "debiased": self.debiased.value,
            "n_samples": self.n_samples.value or None,
        }

    def _on_compute_clicked(self, _button: ipywidgets.Button) -> None:
        try:
            self.compute()
        except Exception:
            pass  # already shown in the status line and the traceback area, kept in self.error

    # ------------------------------------------------------------------ figures
    def _show_heatmap(self, result: CKAResult) -> None:
        """Replace the heatmap's trace and layout by those of ``result.figure()``, in place."""
        fresh = result.figure()
        new_trace = fresh.data[0].to_plotly_json()
        trace = self.heatmap.data[0]
        stale = set(trace.to_plotly_json()) - set(new_trace)
        with self.heatmap.batch_update():
            for name in stale - {"type", "uid"}:
                trace[name] = None  # e.g. cell text, which large matrices go without
            trace.update({name: value for name, value in new_trace.items() if name not in ("type", "uid")})
            self.heatmap.layout = fresh.layout

    def select_row(self, trace: object, points: Points, state: object = None) -> None:
        """Heatmap click handler (plotly's ``on_click`` signature): show the clicked cell's row."""
        if self.result is None or not points.point_inds:
            return
        try:
            teacher_layer = points.ys[0]
            if teacher_layer not in self.result.teacher_layers:
                teacher_layer = self.result.teacher_layers[_row_index(points.point_inds[0])]
            student_layer = points.xs[0] if points.xs and points.xs[0] in self.result.student_layers else None
            self.show_row(teacher_layer, student_layer)
        except Exception as error:
            self.error = error
            self._set_status(f"could not show the clicked row: {type(error).__name__}: {error}", error=True)

    def show_row(self, teacher_layer: str | int, student_layer: str | None = None) -> None:
        """Show one teacher layer's CKA against every student layer (from ``result.values``); the
        optional ``student_layer`` bar is highlighted."""
        result = self._require_result()
        row = teacher_layer if isinstance(teacher_layer, (int, np.integer)) else _index(
            result.teacher_layers, teacher_layer, "teacher layer"
        )
        name = result.teacher_layers[row]
        values = result.values[row]
        colours = [_HIGHLIGHT if layer == student_layer else "#5b5f97" for layer in result.student_layers]
        with self.row_plot.batch_update():
            bars = self.row_plot.data[0]
            bars.x, bars.y = list(result.student_layers), values
            bars.marker.color = colours
            bars.text = [f"{value:.3f}" for value in values]
            bars.hovertemplate = "student layer: %{x}<br>CKA: %{y:.4f}<extra></extra>"
            self.row_plot.layout.title.text = f"teacher layer {name}: {result.kernel} CKA against every student layer"
            self.row_plot.layout.yaxis.range = [min(0.0, float(np.nanmin(values))), max(1.0, float(np.nanmax(values)))]
        with self.heatmap.batch_update():
            self.heatmap.layout.shapes = [
                {
                    "type": "rect", "xref": "paper", "x0": 0, "x1": 1, "yref": "y",
                    "y0": row - 0.5, "y1": row + 0.5, "line": {"color": _HIGHLIGHT, "width": 3},
                }
            ]
        self.selected_teacher_layer = name

    def _require_result(self) -> CKAResult:
        if self.result is None:
            raise RuntimeError("nothing computed yet: press Compute or call .compute() first")
        return self.result

    def _set_status(self, text: str, *, error: bool = False) -> None:
        if error:
            text = f'<span style="color:#b00020"><b>Error</b>: {html.escape(text)}</span>'
        self.status.value = text


def _ipython():
    try:
        from IPython import get_ipython
    except ImportError:
        return None
    return get_ipython()


def _empty_figures() -> tuple[go.FigureWidget, go.FigureWidget]:
    """The heatmap and the row plot before anything is computed."""
    heatmap = go.FigureWidget(go.Heatmap(z=[[]], colorscale="Magma"))
    heatmap.update_layout(height=320, title="CKA: not computed yet")
    row_plot = go.FigureWidget(go.Bar(x=[], y=[], marker={"color": []}))
    row_plot.update_layout(
        height=300,
        title="click a heatmap cell to see that teacher layer against every student layer",
        xaxis={"title": {"text": "student layer"}, "type": "category"},
        yaxis={"title": {"text": "CKA"}},
    )
    return heatmap, row_plot


def _layer_select(model: nn.Module, selector: object, role: str) -> ipywidgets.SelectMultiple:
    names = layer_names(model)
    chosen = resolve_layers(model, selector)
    return ipywidgets.SelectMultiple(
        options=names, value=tuple(chosen), rows=min(10, max(4, len(names))), description=f"{role} layers"
    )


def _index(names: Sequence[str], name: str, what: str) -> int:
    if name not in names:
        raise KeyError(f"no {what} {name!r} in the result; it holds {list(names)}")
    return list(names).index(name)


def _row_index(point_index: object) -> int:
    """A heatmap point index is ``[row, column]``; a flat index is taken as the row."""
    return int(point_index[0]) if isinstance(point_index, (list, tuple)) else int(point_index)
