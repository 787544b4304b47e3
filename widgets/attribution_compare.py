"""AttributionCompare: where a teacher and a student look — pick a sample and a layer, see the input, the
teacher's map and the student's map side by side with how well they agree.

The widget composes :func:`workbench.probes.attribution.compare` (the maps for a set of samples, both models
in eval mode, on a common grid, and their per-sample agreement) and the :class:`AttributionResult` it returns
(``figure(sample)`` draws the three panels, ``to_frame()`` / ``summary()`` give the numbers). It holds no math
of its own. One ``compare`` runs per layer pair (the first time that pair is chosen; then it is cached), for
all the samples at once, so moving the sample slider only redraws.
"""
from __future__ import annotations

import html
import inspect
import traceback
from typing import Any

import ipywidgets
import plotly.graph_objects as go
from torch import nn

from widgets.student_search import _show_figure
from workbench.capture import stage_names
from workbench.probes import attribution
from workbench.probes.attribution import AttributionResult

__all__ = ["AttributionCompare", "AGREEMENT"]

AGREEMENT = ("pearson", "spearman", "iou")  # the per-sample agreement numbers, in the order shown
_OWNED = ("teacher_layer", "student_layer", "progress")  # the dropdowns and the widget's own status
_COMPARE_ARGUMENTS = tuple(name for name in inspect.signature(attribution.compare).parameters
                           if name not in ("teacher", "student", "data", *_OWNED))
_LAYERLESS = ("ig",)  # methods attributing the input itself: no layer to choose


class AttributionCompare(ipywidgets.VBox):
    """Teacher and student attribution maps (Grad-CAM, or integrated gradients) for one sample at a time,
    with their agreement.

    ``AttributionCompare(teacher, student, data, method="gradcam", *, teacher_layer=None,
    student_layer="last", **compare_kwargs)``: the models, labelled data (anything ``compare`` takes), and
    ``compare``'s settings (``n_samples``, ``targets``, ``size``, ``top_k``, ``n_steps``, ``device``, ...).

    Controls: ``student_layer`` (``Dropdown`` over the student's stages, the last one first shown) and
    ``teacher_layer`` (the teacher's stages; it follows the student to the stage at the same relative depth —
    first with first, last with last — and can then be set apart), both disabled for ``method="ig"``;
    ``sample`` (``IntSlider`` over the compared samples). Output: ``figure`` (``go.FigureWidget``: input |
    teacher map | student map, ``AttributionResult.figure(sample)``), ``numbers`` (``HTML`` table: this
    sample's Pearson, Spearman and top-k IoU, and their means over the samples), ``status`` and ``details``
    (the traceback after an error). ``result`` is the :class:`AttributionResult` shown, ``results`` the cache
    (``(teacher_layer, student_layer)`` → result); ``sample_agreement()`` / ``mean_agreement()`` are the
    numbers shown. Choosing a layer pair not seen yet runs ``compare`` (in the kernel's thread: a moment).

    Example:
        >>> import torch
        >>> from workbench import models
        >>> from widgets import AttributionCompare
        >>> _ = torch.manual_seed(0)
        >>> data = (torch.randn(8, 1, 16, 16), torch.randint(0, 10, (8,)))
        >>> teacher = models.create("cnn", widths=(8, 16, 32), img_size=16)
        >>> student = models.create("cnn", widths=(8, 16), img_size=16)
        >>> view = AttributionCompare(teacher, student, data, n_samples=4, device="cpu")
        >>> view.student_layer.value, view.teacher_layer.value
        ('blocks.1', 'blocks.2')
        >>> view.student_layer.value = "blocks.0"   # the teacher follows: the same relative depth
        >>> view.teacher_layer.value, sorted(view.results)
        ('blocks.0', [('blocks.0', 'blocks.0'), ('blocks.2', 'blocks.1')])
        >>> view.sample.value = 3
        >>> view.sample_agreement() == view.result.to_frame().iloc[3][["pearson", "spearman", "iou"]].to_dict()
        True
    """

    def __init__(self, teacher: nn.Module, student: nn.Module, data: Any, method: str = "gradcam", *,
                 teacher_layer: str | None = None, student_layer: str = "last", title: str | None = None,
                 height: int = 320, **compare_kwargs: Any) -> None:
        unknown = sorted(set(compare_kwargs) - set(_COMPARE_ARGUMENTS))
        if unknown:
            raise TypeError(f"AttributionCompare got unknown attribution.compare arguments {unknown}; valid ones "
                            f"are {sorted(_COMPARE_ARGUMENTS)} (the layers are teacher_layer= / student_layer=)")
        self.teacher, self.student, self.data = teacher, student, data
        self.method, self.compare_kwargs = method, dict(compare_kwargs)
        self.results: dict[tuple[str, str], AttributionResult] = {}
        self.result: AttributionResult | None = None
        self.error: BaseException | None = None
        self.teacher_stages, self.student_stages = _stages(teacher, "teacher"), _stages(student, "student")
        first_student = attribution.resolve_layer(student, student_layer)
        first_teacher = attribution.resolve_layer(teacher, teacher_layer) if teacher_layer is not None else \
            self.matching_teacher_layer(first_student)

        layerless = method in _LAYERLESS
        self.title = ipywidgets.HTML(value=f"<b>{html.escape(title or _default_title(method))}</b>")
        self.student_layer = ipywidgets.Dropdown(options=_options(self.student_stages, first_student),
                                                 value=first_student, description="student", disabled=layerless,
                                                 layout=ipywidgets.Layout(width="auto", max_width="100%"))
        self.teacher_layer = ipywidgets.Dropdown(options=_options(self.teacher_stages, first_teacher),
                                                 value=first_teacher, description="teacher", disabled=layerless,
                                                 layout=ipywidgets.Layout(width="auto", max_width="100%"))
        self.sample = ipywidgets.IntSlider(value=0, min=0, max=0, description="sample", continuous_update=False,
                                           layout=ipywidgets.Layout(width="auto", flex="1 1 16em",
                                                                    max_width="100%"))
        self.status = ipywidgets.HTML(layout=ipywidgets.Layout(max_width="100%"))
        self.numbers = ipywidgets.HTML(layout=ipywidgets.Layout(max_width="100%", overflow="auto"))
        self.details = ipywidgets.Output(layout=ipywidgets.Layout(max_width="100%", overflow="auto"))
        self.figure = go.FigureWidget()
        self.figure.update_layout(height=height, autosize=True)
        self.figure._config = {**self.figure._config, "responsive": True}  # follows the window's width
        self.height = height

        controls = ipywidgets.HBox([self.student_layer, self.teacher_layer, self.sample],
                                   layout=ipywidgets.Layout(width="100%", max_width="100%", flex_flow="row wrap",
                                                            align_items="center", grid_gap="8px"))
        super().__init__([self.title, controls, self.status, self.details,
                          ipywidgets.VBox([self.figure], layout=ipywidgets.Layout(width="100%", max_width="100%",
                                                                                 overflow="hidden")),
                          self.numbers], layout=ipywidgets.Layout(width="100%", max_width="100%"))
        self.add_class("kd-attribution-compare")
        for widget, name in ((self.status, "kd-attribution-status"), (self.numbers, "kd-attribution-numbers"),
                             (self.figure, "kd-attribution-figure")):
            widget.add_class(name)  # for the browser test and for styling
        self.student_layer.observe(self._on_student_layer, names="value")
        self.teacher_layer.observe(lambda _change: self.show(), names="value")
        self.sample.observe(lambda _change: self._draw(), names="value")
        if self.show() is None:  # bad settings (a method, a layer, the data) fail where the widget is made
            raise self.error

    # ------------------------------------------------------------------ layers
    def matching_teacher_layer(self, student_layer: str) -> str:
        """The teacher stage at ``student_layer``'s relative depth among the student's stages (first ↔
        first, last ↔ last); the teacher's last stage for a layer that is not a student stage.

        Example:
            >>> from torch import nn
            >>> view = AttributionCompare.__new__(AttributionCompare)
            >>> view.teacher_stages, view.student_stages = ["t0", "t1", "t2", "t3", "t4"], ["s0", "s1", "s2"]
            >>> [view.matching_teacher_layer(layer) for layer in ["s0", "s1", "s2", "head"]]
            ['t0', 't2', 't4', 't4']
        """
        if student_layer not in self.student_stages:
            return self.teacher_stages[-1]
        depth, last = self.student_stages.index(student_layer), len(self.student_stages) - 1
        return self.teacher_stages[round(depth * (len(self.teacher_stages) - 1) / last) if last else -1]

    def _on_student_layer(self, change: dict) -> None:
        teacher_layer = self.matching_teacher_layer(change["new"])
        if self.teacher_layer.value == teacher_layer:
            self.show()
        else:
            self.teacher_layer.value = teacher_layer  # its observer shows the pair

    # ------------------------------------------------------------------ computing and showing
    def show(self) -> AttributionResult | None:
        """Show the chosen layer pair (``compare`` runs the first time a pair is chosen); returns its result,
        ``None`` after a failure (shown in ``status``, kept in ``error``; the previous maps stay)."""
        key = self._key()
        if key not in self.results:
            self.status.value = f"Computing {html.escape(self.method)} maps: {_pair(key)}…"
            try:
                layers = {} if self.method in _LAYERLESS else {"teacher_layer": key[0], "student_layer": key[1]}
                self.results[key] = attribution.compare(self.teacher, self.student, self.data, method=self.method,
                                                        progress=False, **layers, **self.compare_kwargs)
            except Exception as error:  # a bad layer or input: said in the widget, the last maps stay
                self.error = error
                self.status.value = (f'<span style="color:#b00020"><b>Error</b>: '
                                     f"{html.escape(f'{type(error).__name__}: {error}')}</span>")
                self.details.outputs = ({"output_type": "stream", "name": "stderr",
                                         "text": "".join(traceback.format_exception(error))},)
                return None
        self.error, self.details.outputs = None, ()
        self.result = self.results[key]
        count = len(self.result.targets)
        if self.sample.max != count - 1:
            self.sample.value = min(self.sample.value, count - 1)
            self.sample.max = count - 1
        self.status.value = (f"{html.escape(self.result.method)} maps of {count} samples at {_pair(key)}; "
                             "move the slider for another sample.")
        self._draw()
        return self.result

    def _key(self) -> tuple[str, str]:
        if self.method in _LAYERLESS:
            return ("input", "input")
        return self.teacher_layer.value, self.student_layer.value

    def _draw(self) -> None:
        if self.result is None:
            return
        fresh = self.result.figure(self.sample.value)
        fresh.update_layout(height=self.height)
        _show_figure(self.figure, fresh)
        self.numbers.value = agreement_html(self.sample.value, self.sample_agreement(), self.mean_agreement(),
                                            self.result.top_k)

    def sample_agreement(self) -> dict[str, float]:
        """The shown sample's ``pearson``, ``spearman`` and ``iou`` (a row of ``result.to_frame()``)."""
        row = self._require_result().to_frame().iloc[self.sample.value]
        return {name: float(row[name]) for name in AGREEMENT}

    def mean_agreement(self) -> dict[str, float]:
        """The means over the compared samples (``result.summary()``)."""
        summary = self._require_result().summary()
        return {name: float(summary[name]) for name in AGREEMENT}

    def _require_result(self) -> AttributionResult:
        if self.result is None:
            raise RuntimeError(f"nothing shown yet: {self.status.value}")
        return self.result


def agreement_html(sample: int, values: dict[str, float], means: dict[str, float], top_k: float) -> str:
    """This sample's agreement beside the mean over samples, as a small HTML table (NaN as "—").

    Example:
        >>> text = agreement_html(2, {"pearson": 0.5, "spearman": 0.25, "iou": float("nan")},
        ...                       {"pearson": 0.4, "spearman": 0.3, "iou": 0.2}, 0.1)
        >>> "top-10% IoU" in text, "0.500" in text, "—" in text
        (True, True, True)
    """
    names = {"pearson": "Pearson", "spearman": "Spearman", "iou": f"top-{top_k:.0%} IoU"}

    def cell(value: float) -> str:
        return "—" if value != value else f"{value:.3f}"

    header = "".join(f"<th style='padding:1px 8px'>{names[name]}</th>" for name in AGREEMENT)
    rows = [f"<tr><td>{label}</td>" + "".join(f"<td style='padding:1px 8px;text-align:right'>{cell(row[name])}"
                                              "</td>" for name in AGREEMENT) + "</tr>"
            for label, row in ((f"sample {sample}", values), ("mean over samples", means))]
    return (f"<table class='kd-agreement' style='font-variant-numeric:tabular-nums'><thead><tr><th></th>{header}"
            f"</tr></thead><tbody>{''.join(rows)}</tbody></table>")


def _stages(model: nn.Module, role: str) -> list[str]:
    stages = stage_names(model)
    if not stages:
        raise ValueError(f"the {role} has no stages to choose from; pass its layer by name "
                         f"({role}_layer='...')")
    return stages


def _options(stages: list[str], chosen: str) -> list[str]:
    return stages if chosen in stages else [*stages, chosen]


def _pair(key: tuple[str, str]) -> str:
    if key == ("input", "input"):
        return "the inputs"
    return f"teacher {html.escape(key[0])} ↔ student {html.escape(key[1])}"


def _default_title(method: str) -> str:
    return {"gradcam": "Grad-CAM: teacher vs student", "ig": "integrated gradients: teacher vs student"}.get(
        method, f"{method}: teacher vs student")
