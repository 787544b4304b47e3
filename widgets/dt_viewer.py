"""DTViewer: step through the denoising trajectories of several diffusion variants side by side — each
model's prediction of the final image (x̂0) at the chosen point of its run, for one seed, beside the
commitment curves.

The viewer composes :class:`workbench.probes.dt.DTTrajectory` results (from ``dt.trajectory`` /
``dt.hybrid``, or ``load``-ed from disk) and the figures of :mod:`workbench.probes.dt_figures`; it holds no
math of its own. Runs of different lengths (a 32-step base, a 4-step student) are aligned by the fraction of
their trajectory, as in :func:`~workbench.probes.dt_figures.strip`: the slider walks the longest run step by
step and every other run shows its step nearest to the same fraction (:func:`nearest_step`).
"""
from __future__ import annotations

import html
from collections.abc import Mapping

import ipywidgets
import numpy as np
import plotly.graph_objects as go
from plotly.subplots import make_subplots

from widgets.student_search import _show_figure
from widgets.training_monitor import _fitted
from workbench.probes.dt import DTTrajectory, _images, check_trajectories
from workbench.probes.dt_figures import commitment_figure, nearest_step

__all__ = ["DTViewer", "images_figure"]

COLUMNS = ("x_T", "x̂0 now", "final")


def images_figure(trajectories: Mapping[str, DTTrajectory], steps: Mapping[str, int], sample: int, *,
                  height: int | None = None) -> go.Figure:
    """Plotly: one row per variant — x_T, x̂0 at ``steps[variant]`` and the final sample of seed ``sample``;
    each x̂0 titled with its step, timestep and the model that ran it, each row by its variant (the
    y-axis title). Values in [-1, 1] are shown as [0, 1]
    (grey for one channel, RGB for three), the image's rows top to bottom.

    Example:
        >>> x = np.zeros((4, 2, 1, 2, 2))
        >>> run = DTTrajectory(np.arange(4.0)[::-1], x, x, x[0], ["s"] * 4, ["m"] * 4)
        >>> figure = images_figure({"base": run}, {"base": 2}, sample=1)
        >>> len(figure.data), figure.layout.annotations[1].text, figure.layout.yaxis.title.text
        (3, 'x̂0 step 2 of 4<br>t=1, m', 'base')
    """
    names = list(trajectories)
    titles = []
    for name in names:
        run, step = trajectories[name], steps[name]
        titles += ["x_T", f"x̂0 step {step} of {run.steps}<br>t={run.timesteps[step]:g}, {run.models[step]}",
                   "final"]
    height = height or 170 * len(names) + 60
    figure = make_subplots(rows=len(names), cols=len(COLUMNS), subplot_titles=titles, horizontal_spacing=0.03,
                           vertical_spacing=min(48 / height, 0.3))
    for row, name in enumerate(names, start=1):
        run, step = trajectories[name], steps[name]
        for column, image in enumerate((run.x_t[0, sample], run.x0_hat[step, sample], run.final[sample]), start=1):
            figure.add_trace(_image_trace(_images(image), f"{name}: {COLUMNS[column - 1]}"), row, column)
        figure.update_yaxes(title_text=html.escape(name), title_font_size=11, row=row, col=1)
    figure.update_xaxes(showticklabels=False, showgrid=False, zeroline=False, fixedrange=True)
    figure.update_yaxes(showticklabels=False, showgrid=False, zeroline=False, fixedrange=True, autorange="reversed",
                        scaleanchor="x", constrain="domain")
    figure.update_annotations(font_size=10)
    figure.update_layout(height=height, autosize=True, margin={"l": 40, "r": 20, "t": 40, "b": 10},
                         showlegend=False, plot_bgcolor="white")
    return figure


def _image_trace(image: np.ndarray, name: str):
    if image.ndim == 3:  # RGB in [0, 1]
        return go.Image(z=np.round(image * 255).astype(np.uint8), name=name, hoverinfo="name")
    return go.Heatmap(z=image, zmin=0, zmax=1, colorscale="gray", showscale=False, name=name,
                      hovertemplate="%{z:.2f}<extra>" + html.escape(name) + "</extra>")


class DTViewer(ipywidgets.VBox):
    """The DT trajectories of several variants (base, distilled, hybrid, …) for one seed at a time.

    ``DTViewer(trajectories, *, sample=0, step=0, title=None, height=None)``: ``trajectories`` maps a
    variant's name to its :class:`~workbench.probes.dt.DTTrajectory`; every run must hold the same seeds
    (the same number of samples, in the same order — as ``dt.trajectory`` / ``dt.hybrid`` make them from one
    ``seed``).

    Controls: ``step`` (``IntSlider`` over the longest run's steps; every other run shows its step nearest to
    the same fraction of its trajectory), ``seed`` (``Dropdown`` over the samples, with their class labels)
    and ``toggles`` (one ``ToggleButton`` per variant: the variants shown). Output: ``images``
    (``go.FigureWidget``, :func:`images_figure`: a row per shown variant — x_T, x̂0 now, final),
    ``commitment`` (``go.FigureWidget``: :func:`~workbench.probes.dt_figures.commitment_figure` of the shown
    variants — the mean over samples of ‖x̂0_k − final‖ against the fraction — with a dotted line at the
    slider's fraction) and ``status`` (each shown variant's step and timestep). ``shown()`` is the variants
    shown, ``steps()`` the step each shows.

    Example:
        >>> import numpy as np
        >>> from workbench.probes.dt import DTTrajectory
        >>> from widgets import DTViewer
        >>> def run(steps, n=3):
        ...     x = np.random.default_rng(steps).uniform(-1, 1, (steps, n, 1, 8, 8))
        ...     return DTTrajectory(np.linspace(999, 0, steps), x, x, x[-1], ["s"] * steps, ["m"] * steps,
        ...                         labels=[0, 1, 2])
        >>> viewer = DTViewer({"base": run(32), "distilled": run(4)})
        >>> viewer.step.max, viewer.seed.options[1]
        (31, ('seed 1 · class 1', 1))
        >>> viewer.step.value = 16
        >>> viewer.steps()   # half-way: base step 16 of 32, distilled step 2 of 4
        {'base': 16, 'distilled': 2}
        >>> viewer.toggles["base"].value = False
        >>> viewer.shown(), [trace.name for trace in viewer.commitment.data]
        (['distilled'], ['distilled'])
    """

    def __init__(self, trajectories: Mapping[str, DTTrajectory], *, sample: int = 0, step: int = 0,
                 title: str | None = None, height: int | None = None) -> None:
        check_trajectories(trajectories)
        self.trajectories = dict(trajectories)
        counts = {name: run.final.shape[0] for name, run in self.trajectories.items()}
        if len(set(counts.values())) > 1:
            listed = ", ".join(f"{name} {count}" for name, count in counts.items())
            raise ValueError(f"the variants hold different numbers of samples ({listed}): the seed picker needs "
                             "the same seeds in every run (sample them from one seed)")
        samples, longest = next(iter(counts.values())), max(run.steps for run in self.trajectories.values())
        if not 0 <= sample < samples:
            raise ValueError(f"sample {sample} does not exist: the runs hold samples 0 … {samples - 1}")
        if not 0 <= step < longest:
            raise ValueError(f"step {step} does not exist: the longest run has steps 0 … {longest - 1}")
        self.height = height
        labels = next(iter(self.trajectories.values())).labels
        full = ipywidgets.Layout(width="100%", max_width="100%")
        self.title = ipywidgets.HTML(value=f"<b>{html.escape(title or _default_title(self.trajectories))}</b>")
        self.step = ipywidgets.IntSlider(value=step, min=0, max=longest - 1, description="step",
                                         continuous_update=True,
                                         layout=ipywidgets.Layout(width="auto", flex="1 1 18em", max_width="100%"))
        self.seed = ipywidgets.Dropdown(
            options=[(f"seed {index}" + (f" · class {labels[index]}" if labels else ""), index)
                     for index in range(samples)],
            value=sample, description="seed", layout=ipywidgets.Layout(width="auto", max_width="100%"))
        self.toggles = {name: ipywidgets.ToggleButton(value=True, description=name, tooltip=f"show {name}",
                                                      layout=ipywidgets.Layout(width="auto"))
                        for name in self.trajectories}
        self.status = ipywidgets.HTML(layout=ipywidgets.Layout(max_width="100%"))
        self.images = go.FigureWidget()
        self.commitment = go.FigureWidget()
        for figure in (self.images, self.commitment):
            figure.update_layout(autosize=True)
            figure._config = {**figure._config, "responsive": True}  # follows the window's width
        controls = ipywidgets.HBox([self.step, self.seed, ipywidgets.HBox(list(self.toggles.values()))],
                                   layout=ipywidgets.Layout(width="100%", max_width="100%", flex_flow="row wrap",
                                                            align_items="center", grid_gap="8px"))
        figures = ipywidgets.HBox([_fitted(self.images), _fitted(self.commitment)],
                                  layout=ipywidgets.Layout(width="100%", max_width="100%", flex_flow="row wrap"))
        super().__init__([self.title, controls, self.status, figures], layout=full)
        self.add_class("kd-dt-viewer")
        for widget, name in ((self.status, "kd-dt-status"), (self.images, "kd-dt-images"),
                             (self.commitment, "kd-dt-commitment")):
            widget.add_class(name)  # for the browser test and for styling
        for control in (self.step, self.seed, *self.toggles.values()):
            control.observe(lambda _change: self.refresh(), names="value")
        self.refresh()

    # ------------------------------------------------------------------ what is shown
    @property
    def fraction(self) -> float:
        """The slider's place as a fraction of the longest run (0: first step, 1: last)."""
        return self.step.value / max(self.step.max, 1)

    def shown(self) -> list[str]:
        """The variants toggled on, in the order they were given."""
        return [name for name, toggle in self.toggles.items() if toggle.value]

    def steps(self) -> dict[str, int]:
        """The step each shown variant shows: its step nearest to :attr:`fraction` of its trajectory."""
        return {name: nearest_step(self.trajectories[name], self.fraction) for name in self.shown()}

    # ------------------------------------------------------------------ drawing
    def refresh(self) -> None:
        """Redraw the images for the slider's step and the chosen seed, and the shown variants' curves."""
        shown = {name: self.trajectories[name] for name in self.shown()}
        if not shown:
            self.status.value = "<b>no variant shown</b>: toggle one on"
            _show_figure(self.images, go.Figure(layout={"height": 120, "title": "no variant shown"}))
            _show_figure(self.commitment, go.Figure(layout={"height": 120}))
            return
        steps = self.steps()
        _show_figure(self.images, images_figure(shown, steps, self.seed.value, height=self.height))
        curves = commitment_figure(shown, marker=self.fraction)
        curves.update_layout(title={"text": "commitment: mean ‖x̂0_k − final‖ over seeds", "font_size": 13},
                             legend={"orientation": "h", "y": -0.3}, margin={"l": 50, "r": 20, "t": 40, "b": 10})
        _show_figure(self.commitment, curves)
        self.status.value = " · ".join(
            f"<b>{html.escape(name)}</b> step {step} of {shown[name].steps} (t={shown[name].timesteps[step]:g}, "
            f"{html.escape(shown[name].models[step])})" for name, step in steps.items())


def _default_title(trajectories: Mapping[str, DTTrajectory]) -> str:
    return "DT: each model's prediction of the final image, " + " vs ".join(trajectories)
