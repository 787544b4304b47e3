"""GapExplorer: choose teacher and student layers, compute their CKA matrix without freezing the notebook,
click a cell to read that teacher layer against every student layer.

The widget composes :func:`workbench.layer_table` (what the pickers list),
:func:`workbench.similarity.cka_matrix` and :meth:`CKAResult.figure`; it holds no math of its own. The
row plot is read from ``result.values``, never recomputed. Compute runs ``cka_matrix`` in a background
thread (the kernel stays free: torch releases the GIL), driving a progress bar through its ``on_batch``
hook; Cancel stops it between batches, and ``workbench.capture`` removes the hooks whatever happens.
Errors are shown in the status line (the traceback below it) and kept in ``.error``. An ipywidgets
``Output`` cannot capture another thread's prints, so nothing here prints: the thread sets widget values.
"""
from __future__ import annotations

import dataclasses
import html
import inspect
import math
import threading
import traceback
from collections.abc import Sequence

import ipywidgets
import numpy as np
from plotly.callbacks import Points
from torch import nn

from widgets import cka_figures
from widgets.cancellable import BackgroundJob
from widgets.layer_picker import LayerPicker
from workbench.capture import resolve_layers
from workbench.data import as_loader, num_samples
from workbench.layer_table import first_sample, layer_table
from workbench.models import count_parameters
from workbench.probes.cka_stream import check_kernel
from workbench.probes.kernels import KERNELS
from workbench.probes.sample_size import DEFAULT_WIDTH, sample_size_warning
from workbench.similarity import CKAResult, cka_matrix

# arguments the controls own; every other cka_matrix keyword passes through unchanged
_CONTROLLED = ("teacher_layers", "student_layers", "kernel", "debiased", "n_samples", "progress")
_DRIVEN = ("on_batch",)  # the widget's own progress and cancellation hook
_PASSED_THROUGH = tuple(
    name
    for name in inspect.signature(cka_matrix).parameters
    if name not in ("teacher", "student", "data", *_CONTROLLED, *_DRIVEN)
)
_CKA_BATCH_SIZE = inspect.signature(cka_matrix).parameters["batch_size"].default  # the biased bias is per batch
COLOUR_RANGES = (("fixed 0–1", "fixed"), ("data range", "data"))


def model_label(model: nn.Module, role: str) -> str:
    """``"teacher TinyCNN (12.3k parameters)"``: the role, the class name and the parameter count.

    Example:
        >>> from torch import nn
        >>> model_label(nn.Linear(100, 20), "student")
        'student Linear (2.0k parameters)'
    """
    return f"{role} {type(model).__name__} ({_short_count(count_parameters(model))} parameters)"


def _short_count(count: int) -> str:
    for size, suffix in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if count >= size:
            return f"{count / size:.1f}{suffix}"
    return str(count)


class GapExplorer(ipywidgets.VBox):
    """Interactive layer-by-layer CKA between a teacher and a student, for real models.

    Controls: ``teacher_layers`` / ``student_layers`` (:class:`~widgets.layer_picker.LayerPicker`: a glob
    filter box, a stages / leaf / all view, each layer's type and output shape from one forward of the
    first sample; the stages preselected), ``kernel`` (``Dropdown``), ``debiased`` (``Checkbox``),
    ``n_samples`` (``BoundedIntText``, 0 = all), ``colour_range`` (``ToggleButtons``: fixed 0–1 or the
    data's min–max, applied without recomputing), ``compute_button`` and ``cancel_button``. Output:
    ``progress`` (``IntProgress``, batches done of the total) and ``progress_text``, ``status`` (``HTML``:
    what happened, and a warning whenever the chosen n is below the estimator's minimum), ``details``
    (``Output``: the traceback after an error), ``heatmap`` (``go.FigureWidget``; click a cell) and
    ``row_plot`` (the clicked teacher layer against every student layer). ``result`` is the last
    :class:`CKAResult` (``None`` before the first computation); ``error`` the last exception.

    ``teacher_name`` / ``student_name`` name the models in the titles and in ``result.teacher_name`` /
    ``student_name`` (default: role, class name and parameter count, so two models of one class read
    apart). ``cka_kwargs`` are :func:`~workbench.similarity.cka_matrix` keywords: ``teacher_layers``,
    ``student_layers``, ``kernel``, ``debiased`` and ``n_samples`` set the controls' first values;
    ``progress=False`` hides the progress bar; the rest (``batch_size``, ``device``, ``student_data``,
    ...) are passed on as given.

    Pressing Compute runs in a background thread (:meth:`compute_async`; :meth:`wait` joins it);
    :meth:`compute` runs in the calling thread and returns the result, for scripts.

    Example:
        >>> import torch
        >>> from torch import nn
        >>> from widgets import GapExplorer
        >>> torch.manual_seed(0)  # doctest: +ELLIPSIS
        <torch._C.Generator object at ...>
        >>> teacher = nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 16), nn.ReLU(), nn.Linear(16, 4))
        >>> student = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 4))
        >>> explorer = GapExplorer(teacher, student, torch.randn(64, 8), batch_size=32, device="cpu",
        ...                        student_name="small MLP")
        >>> explorer.teacher_layers.select.options[0][0]      # name · type · output shape
        '0 · Linear · 32'
        >>> explorer.kernel.value = "rbf"
        >>> result = explorer.compute()          # or press Compute; in a notebook, display `explorer`
        >>> explorer.heatmap.data[0].z.shape, result.kernel, result.student_name
        ((5, 3), 'rbf', 'small MLP')
        >>> explorer.show_row("2")               # what clicking a cell of row "2" does
        >>> bool(np.allclose(explorer.row_plot.data[0].y, result.values[2]))
        True
        >>> explorer.n_samples.value = 5         # too few samples: the status line says so
        >>> "unreliable" in explorer.status.value
        True
    """

    def __init__(self, teacher: nn.Module, student: nn.Module, data: object, *, teacher_name: str | None = None,
                 student_name: str | None = None, **cka_kwargs):
        unknown = sorted(set(cka_kwargs) - set(_CONTROLLED) - set(_PASSED_THROUGH))
        if unknown:
            raise TypeError(
                f"GapExplorer got unknown cka_matrix arguments {unknown}; "
                f"valid ones are {sorted(_CONTROLLED + _PASSED_THROUGH)}"
            )
        check_kernel(cka_kwargs.get("kernel", "linear"))
        self.teacher, self.student, self.data = teacher, student, data
        self.teacher_name = teacher_name or model_label(teacher, "teacher")
        self.student_name = student_name or model_label(student, "student")
        self.cka_kwargs = {name: value for name, value in cka_kwargs.items() if name not in _CONTROLLED}
        self.result: CKAResult | None = None
        self.error: BaseException | None = None
        self.selected_teacher_layer: str | None = None
        self._job: BackgroundJob | None = None  # the running computation
        self._last_job: BackgroundJob | None = None
        self._status_text = "Choose layers and settings, then press <b>Compute</b>."

        shape_notes = []
        student_data = self.cka_kwargs.get("student_data")
        self.teacher_layers = self._picker(teacher, data, cka_kwargs.get("teacher_layers", "stages"), "teacher",
                                           shape_notes)
        self.student_layers = self._picker(student, data if student_data is None else student_data,
                                           cka_kwargs.get("student_layers", "stages"), "student", shape_notes)
        if shape_notes:
            self._status_text += " " + " ".join(shape_notes)
        self.kernel = ipywidgets.Dropdown(
            options=list(KERNELS), value=cka_kwargs.get("kernel", "linear"), description="kernel"
        )
        self.debiased = ipywidgets.Checkbox(value=bool(cka_kwargs.get("debiased", True)), description="debiased")
        self.total_samples = num_samples(data)
        total = self.total_samples
        self.n_samples = ipywidgets.BoundedIntText(
            value=cka_kwargs.get("n_samples") or total or 0,
            min=0,
            max=total if total else 2**31 - 1,
            description="n_samples",
            tooltip="samples to use; 0 = all",
        )
        self.colour_range = ipywidgets.ToggleButtons(
            options=COLOUR_RANGES, value="fixed", description="colours",
            tooltips=["the colour scale spans 0 to 1", "the colour scale spans the matrix's min to max"],
            style={"button_width": "96px", "description_width": "initial"},
        )
        self.compute_button = ipywidgets.Button(
            description="Compute", button_style="primary", icon="play", tooltip="compute the CKA matrix"
        )
        self.cancel_button = ipywidgets.Button(
            description="Cancel", icon="stop", disabled=True, tooltip="stop the computation after this batch"
        )
        self.progress = ipywidgets.IntProgress(value=0, min=0, max=1, bar_style="info",
                                               layout=ipywidgets.Layout(flex="1 1 auto", width="auto"))
        self.progress_text = ipywidgets.Label(value="", layout=ipywidgets.Layout(flex="0 1 auto"))
        self.status = ipywidgets.HTML(layout=ipywidgets.Layout(max_width="100%"))
        self.details = ipywidgets.Output(layout=ipywidgets.Layout(max_width="100%", overflow="auto"))
        self.heatmap, self.row_plot = cka_figures.empty_figures()
        self.heatmap.data[0].on_click(self.select_row)

        self.compute_button.on_click(self._on_compute_clicked)
        self.cancel_button.on_click(lambda _button: self.cancel())
        self.colour_range.observe(lambda _change: self._apply_colour_range(), names="value")
        for control in (self.kernel, self.debiased, self.n_samples, self.teacher_layers, self.student_layers):
            control.observe(lambda _change: self._render_status(), names="value")
        for control in (self.kernel, self.debiased, self.n_samples, self.colour_range):
            control.layout = ipywidgets.Layout(width="auto", max_width="100%")
        for button in (self.compute_button, self.cancel_button):
            button.layout = ipywidgets.Layout(width="auto", flex="1 1 auto")
        settings = ipywidgets.VBox(
            [self.kernel, self.debiased, self.n_samples, self.colour_range,
             ipywidgets.HBox([self.compute_button, self.cancel_button], layout=ipywidgets.Layout(max_width="100%"))],
            layout=ipywidgets.Layout(flex="0 1 240px", min_width="0", max_width="100%"),
        )
        progress_row = ipywidgets.HBox([self.progress, self.progress_text],
                                       layout=ipywidgets.Layout(max_width="100%", width="100%"))
        progress_row.layout.display = None if cka_kwargs.get("progress", True) else "none"
        controls = ipywidgets.HBox(
            [self.teacher_layers, self.student_layers, settings],
            layout=ipywidgets.Layout(flex_flow="row wrap", width="100%", max_width="100%", grid_gap="8px"),
        )
        super().__init__(
            [controls, progress_row, self.status, self.details, self.heatmap, self.row_plot],
            layout=ipywidgets.Layout(width="100%", max_width="100%"),
        )
        self.add_class("kd-gap-explorer")
        for widget, name in ((self.status, "kd-status"), (self.progress_text, "kd-progress-text"),
                             (self.compute_button, "kd-compute"), (self.cancel_button, "kd-cancel"),
                             (self.colour_range, "kd-colour-range"), (self.heatmap, "kd-heatmap"),
                             (self.row_plot, "kd-row-plot")):
            widget.add_class(name)  # for the browser test and for styling
        self._render_status()

    def _picker(self, model: nn.Module, data: object, selector: object, role: str, notes: list[str]) -> LayerPicker:
        chosen = resolve_layers(model, selector)  # a bad selector fails here, naming the closest layers
        try:
            table = layer_table(model, first_sample(data))
        except Exception as error:  # the pickers still list every layer, without shapes
            table = layer_table(model)
            notes.append(f"(no {role} output shapes: {html.escape(f'{type(error).__name__}: {error}')})")
        return LayerPicker(table, chosen, role=role)

    # ------------------------------------------------------------------ computing
    @property
    def running(self) -> bool:
        """Whether a computation is under way."""
        return self._job is not None

    def compute(self) -> CKAResult:
        """Run ``cka_matrix`` in this thread with the controls' values, show the heatmap and the first
        (or the previously selected) teacher layer's row; returns the :class:`CKAResult`.

        A failure is shown in ``status`` (traceback in ``details``), kept in ``error`` and re-raised;
        the previous ``result`` and figures stay as they were.
        """
        job, arguments = self._start()
        self._work(job, arguments)
        return job.wait()

    def compute_async(self) -> threading.Thread | None:
        """Start ``cka_matrix`` in a background thread (what the Compute button does) and return it;
        ``None`` when the controls' values are refused (the reason is in ``status`` and ``error``)."""
        try:
            job, arguments = self._start()
        except Exception:
            return None
        return job.start(self._work, job, arguments, name="GapExplorer CKA computation")

    def wait(self, timeout: float | None = None) -> CKAResult | None:
        """Wait for the background computation; returns its result (``None`` if cancelled), re-raises
        its error, raises ``TimeoutError`` if it is still running after ``timeout`` seconds."""
        return self.result if self._last_job is None else self._last_job.wait(timeout)

    def cancel(self) -> None:
        """Stop the running computation after its current batch (the previous result stays)."""
        job = self._job
        if job is not None:
            job.cancel()
            self.cancel_button.disabled = True
            if self._job is job:  # not finished meanwhile: its own end message comes later
                self._set_status("Cancelling after the current batch…")

    def _start(self) -> tuple[BackgroundJob, dict]:
        """Check the controls and mark a computation as running; a refusal is shown and raised."""
        if self._job is not None:
            raise RuntimeError("a computation is already running: wait() for it or cancel() it first")
        try:
            arguments = self._arguments()
        except Exception as error:
            self.error = error
            self._set_status(f"{type(error).__name__}: {error}", error=True)
            raise
        job = BackgroundJob(total_steps=self._total_batches(arguments))
        self._job = self._last_job = job
        self.compute_button.disabled, self.cancel_button.disabled = True, False
        self.details.outputs = ()
        self.progress.max, self.progress.value = max(job.total_steps or 1, 1), 0
        self.progress.bar_style = "info"
        self._show_progress(job, 0)
        self._set_status(
            f"Computing {arguments['kernel']} CKA: {len(arguments['teacher_layers'])} teacher × "
            f"{len(arguments['student_layers'])} student layers…"
        )
        return job, arguments

    def _work(self, job: BackgroundJob, arguments: dict) -> None:
        """The computation, in whichever thread runs it; ends by showing what happened."""
        def cka(job: BackgroundJob) -> CKAResult:
            result = cka_matrix(self.teacher, self.student, self.data, **arguments,
                                on_batch=lambda batches, samples: self._on_batch(job, batches, samples))
            return dataclasses.replace(result, teacher_name=self.teacher_name, student_name=self.student_name)

        job.run(cka)
        self._job = None
        self.compute_button.disabled, self.cancel_button.disabled = False, True
        self._finish(job)

    def _on_batch(self, job: BackgroundJob, batches: int, samples: int) -> None:
        self.progress.max = max(self.progress.max, batches)
        self.progress.value = batches
        job.steps = batches
        self._show_progress(job, samples)
        job.step(batches)  # raises Cancelled once Cancel was pressed

    def _show_progress(self, job: BackgroundJob, samples: int) -> None:
        total = "?" if job.total_steps is None else job.total_steps
        self.progress_text.value = f"{job.steps}/{total} batches · {samples:,} samples"

    def _finish(self, job: BackgroundJob) -> None:
        if job.cancelled:
            self.progress.bar_style = "warning"
            kept = "the previous result is still shown" if self.result is not None else "nothing computed yet"
            self._set_status(f"Cancelled after {job.steps} of {job.total_steps or '?'} batches; {kept}.")
            return
        if isinstance(job.error, KeyboardInterrupt):
            self.progress.bar_style = "warning"
            self._set_status("Interrupted; the previous result is still shown.", error=True)
            return
        if job.error is not None:
            self.error = job.error
            self.progress.bar_style = "danger"
            self._set_status(f"{type(job.error).__name__}: {job.error}", error=True)
            self.details.outputs = (
                {"output_type": "stream", "name": "stderr", "text": "".join(traceback.format_exception(job.error))},
            )
            return
        result = job.result
        self.progress.bar_style = "success"
        self.error = None
        self.result = result
        self._show_heatmap(result)
        selected = self.selected_teacher_layer
        self.show_row(selected if selected in result.teacher_layers else result.teacher_layers[0])
        self._set_status(
            f"Done in {job.seconds:.1f} s ({len(result.teacher_layers)} teacher × {len(result.student_layers)} "
            f"student layers): {html.escape(result.title)}. "
            "Click a cell to see that teacher layer against every student layer."
        )

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
            "progress": False,  # the widget's own bar: tqdm cannot reach a widget from another thread
        }

    def _total_batches(self, arguments: dict) -> int | None:
        loader = as_loader(self.data, batch_size=arguments.get("batch_size", 128))
        samples = self.chosen_n_samples()
        if loader.batch_size and samples:
            return math.ceil(samples / loader.batch_size)
        try:
            return len(loader)
        except TypeError:
            return None

    def chosen_n_samples(self) -> int | None:
        """The samples the next computation will use (``n_samples``, at most the data's size); None when
        neither is known."""
        chosen = self.n_samples.value or None
        if chosen is None or self.total_samples is None:
            return chosen or self.total_samples
        return min(chosen, self.total_samples)

    def _on_compute_clicked(self, _button: ipywidgets.Button) -> None:
        self.compute_async()  # a refusal is already shown in the status line and kept in self.error

    # ------------------------------------------------------------------ status
    def sample_size_warnings(self) -> list[str]:
        """Why the chosen n (and the shown result's n) is too small for its estimator; empty when enough."""
        width = self._widest_layer()
        batch_size = self.cka_kwargs.get("batch_size", _CKA_BATCH_SIZE)
        warnings = []
        chosen = self.chosen_n_samples()
        if chosen:
            warning = sample_size_warning(chosen, self.kernel.value, self.debiased.value, width, batch_size)
            if warning:
                warnings.append(warning)
        result = self.result
        if result is not None:
            warning = sample_size_warning(result.n_samples, result.kernel, result.debiased, width, batch_size)
            if warning and warning not in warnings:
                warnings.append(f"The matrix shown: {warning}")
        return warnings

    def _widest_layer(self) -> int:
        """Features per sample of the widest selected layer (what the biased estimator's bias grows with)."""
        widths = [
            math.prod(shape)
            for picker in (self.teacher_layers, self.student_layers)
            for shape in picker.table.set_index("name").loc[list(picker.value), "output_shape"]
            if shape is not None
        ]
        return max(widths) if widths else DEFAULT_WIDTH

    def _set_status(self, text: str, *, error: bool = False) -> None:
        if error:
            text = f'<span style="color:#b00020"><b>Error</b>: {html.escape(text)}</span>'
        self._status_text = text
        self._render_status()

    def _render_status(self) -> None:
        lines = [self._status_text] + [
            f'<span class="kd-sample-warning" style="color:#9a5b00">⚠ {html.escape(warning)}</span>'
            for warning in self.sample_size_warnings()
        ]
        self.status.value = "<br>".join(lines)

    # ------------------------------------------------------------------ figures
    def _show_heatmap(self, result: CKAResult) -> None:
        cka_figures.show_heatmap(self.heatmap, result, self.colour_limits())

    def colour_limits(self) -> tuple[float, float]:
        """``(zmin, zmax)`` of the heatmap's colour scale: 0–1, or the shown matrix's min–max."""
        if self.colour_range.value == "fixed" or self.result is None:
            return 0.0, 1.0
        return cka_figures.data_limits(self.result.values)

    def _apply_colour_range(self) -> None:
        """Set the colour scale from the toggle; the matrix is not recomputed."""
        trace = self.heatmap.data[0]
        trace.zmin, trace.zmax = self.colour_limits()

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
        cka_figures.show_row(self.row_plot, self.heatmap, result, row, student_layer)
        self.selected_teacher_layer = result.teacher_layers[row]

    def _require_result(self) -> CKAResult:
        if self.result is None:
            raise RuntimeError("nothing computed yet: press Compute or call .compute() first")
        return self.result


def _index(names: Sequence[str], name: str, what: str) -> int:
    if name not in names:
        raise KeyError(f"no {what} {name!r} in the result; it holds {list(names)}")
    return list(names).index(name)


def _row_index(point_index: object) -> int:
    """A heatmap point index is ``[row, column]``; a flat index is taken as the row."""
    return int(point_index[0]) if isinstance(point_index, (list, tuple)) else int(point_index)
