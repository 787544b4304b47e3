"""Figures over several DT runs at once (base, distilled, hybrid, …): the DT strip and the commitment curves.

One run's own figures are :meth:`DTTrajectory.plot` / :meth:`DTTrajectory.figure`; these put variants
side by side. Runs of different lengths are aligned by the *fraction of the trajectory*: column
``j`` of ``columns`` shows each run's step nearest to ``j / (columns − 1)`` of its way.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

from workbench.probes.dt import DTTrajectory, _images, check_trajectories

__all__ = ["commitment_figure", "nearest_step", "strip"]


def nearest_step(run: DTTrajectory, fraction: float) -> int:
    """The step of ``run`` nearest to ``fraction`` (0 … 1) of its way (ties go to the earlier step).

    Example:
        >>> x = np.zeros((5, 1, 1, 2, 2))
        >>> run = DTTrajectory(np.arange(5.0)[::-1], x, x, x[0], ["s"] * 5, ["m"] * 5)
        >>> [nearest_step(run, f) for f in (0.0, 0.5, 0.6, 1.0)]
        [0, 2, 2, 4]
    """
    if not 0.0 <= fraction <= 1.0:
        raise ValueError(f"fraction must lie in [0, 1], got {fraction}")
    position = fraction * (run.steps - 1)
    return int(np.floor(position + 0.5 - 1e-9))


def strip(trajectories: Mapping[str, DTTrajectory], samples: Sequence[int] = (0, 1, 2), columns: int = 6):
    """The DT strip of several variants (matplotlib ``Figure``): rows seeds × variants, columns x_T, then
    x̂0 at ``columns`` fractions of each run (0 = its first step … 1 = its last), then the final sample.

    Each image's title gives the run's own step and timestep, so a 4-step distilled run and a 32-step
    base run line up by how far along they are.

    Example:
        >>> x = np.zeros((4, 3, 1, 2, 2))
        >>> run = DTTrajectory(np.arange(4.0)[::-1], x, x, x[0], ["s"] * 4, ["m"] * 4)
        >>> figure = strip({"base": run, "distilled": run}, samples=[0, 1], columns=3)
        >>> len(figure.axes)
        20
    """
    import matplotlib.pyplot as plt

    check_trajectories(trajectories)
    fractions = np.linspace(0.0, 1.0, columns) if columns > 1 else np.zeros(1)
    rows = [(sample, name, run) for sample in samples for name, run in trajectories.items()]
    for sample, name, run in rows:
        if not 0 <= sample < run.final.shape[0]:
            raise ValueError(f"sample {sample} does not exist: {name!r} has {run.final.shape[0]} samples")
    figure, axes = plt.subplots(len(rows), columns + 2, figsize=(1.15 * (columns + 2) + 1.2, 1.2 * len(rows) + 0.6),
                                squeeze=False, layout="constrained")
    for row, (sample, name, run) in enumerate(rows):
        steps = [nearest_step(run, fraction) for fraction in fractions]
        images = [run.x_t[0, sample]] + [run.x0_hat[step, sample] for step in steps] + [run.final[sample]]
        titles = ["x_T"] + [f"x̂0 step {step}\nt={run.timesteps[step]:g}" for step in steps] + ["final"]
        for ax, image, title in zip(axes[row], images, titles):
            ax.imshow(_images(image), cmap="gray", vmin=0, vmax=1)
            ax.set_xticks([]), ax.set_yticks([])
            ax.set_title(title, fontsize=6)
        label = f"{name}\nseed {sample}" + (f", class {run.labels[sample]}" if run.labels else "")
        axes[row][0].set_ylabel(label, fontsize=7, rotation=0, ha="right", va="center")
    figure.suptitle("DT: each model's prediction of the final image (x̂0) along its trajectory", fontsize=9)
    return figure


def commitment_figure(trajectories: Mapping[str, DTTrajectory], *, marker: float | None = None):
    """Plotly: each variant's commitment curve — mean ‖x̂0_k − final‖ over samples against the fraction
    of its trajectory (:meth:`DTTrajectory.commitment`); a curve near 0 from the start is a model that
    committed at its first step. ``marker``: a vertical line at that fraction.

    Example:
        >>> x0 = np.stack([np.zeros((2, 1, 1, 2)), np.ones((2, 1, 1, 2))])
        >>> run = DTTrajectory(np.array([1.0, 0.0]), x0, x0, x0[1], ["s", "s"], ["m", "m"])
        >>> [[float(y) for y in trace.y] for trace in commitment_figure({"base": run}).data]
        [[1.4142135623730951, 0.0]]
    """
    import plotly.graph_objects as go

    check_trajectories(trajectories)
    figure = go.Figure()
    for name, run in trajectories.items():
        curve = run.commitment()
        figure.add_trace(go.Scatter(
            x=curve["fraction"], y=curve["distance"], mode="lines+markers", name=name,
            customdata=np.stack([curve["step"], curve["timestep"], curve["model"]], axis=1),
            hovertemplate="%{fullData.name}: step %{customdata[0]} (t=%{customdata[1]}, %{customdata[2]})"
                          "<br>‖x̂0 − final‖ = %{y:.3f}<extra></extra>",
        ))
    if marker is not None:
        figure.add_vline(x=marker, line_dash="dot", line_color="grey")
    figure.update_layout(title="Commitment: how far each step's x̂0 is from the final sample",
                         xaxis_title="fraction of the trajectory (0: first step, 1: last)",
                         yaxis_title="mean ‖x̂0_k − final‖₂", height=360)
    return figure
