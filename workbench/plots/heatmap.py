"""Annotated layer-by-layer heatmaps (rows: teacher layers, columns: student layers)."""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def heatmap_plot(
    values: np.ndarray,
    row_labels: Sequence[str],
    column_labels: Sequence[str],
    *,
    title: str = "",
    row_title: str = "teacher layer",
    column_title: str = "student layer",
    value_name: str = "CKA",
    vmin: float = 0.0,
    vmax: float = 1.0,
    ax=None,
):
    """A static matplotlib heatmap with every cell annotated; returns the ``Axes``.

    Example:
        >>> import numpy as np
        >>> ax = heatmap_plot(np.eye(2), ["t0", "t1"], ["s0", "s1"], title="demo")
        >>> ax.get_title()
        'demo'
    """
    import matplotlib.pyplot as plt

    values = np.asarray(values, dtype=float)
    if ax is None:
        width = min(2.0 + 0.7 * len(column_labels), 16)
        height = min(1.5 + 0.5 * len(row_labels), 14)
        _, ax = plt.subplots(figsize=(width, height), layout="constrained")
    image = ax.imshow(values, cmap="magma", vmin=vmin, vmax=vmax, aspect="auto")
    ax.figure.colorbar(image, ax=ax, label=value_name)
    ax.set_xticks(range(len(column_labels)), column_labels, rotation=45, ha="right")
    ax.set_yticks(range(len(row_labels)), row_labels)
    ax.set_xlabel(column_title)
    ax.set_ylabel(row_title)
    ax.set_title(title)
    if values.size <= 400:
        midpoint = (vmin + vmax) / 2
        for (row, column), value in np.ndenumerate(values):
            colour = "black" if value > midpoint else "white"
            ax.text(column, row, f"{value:.2f}", ha="center", va="center", color=colour, fontsize=8)
    return ax


def heatmap_figure(
    values: np.ndarray,
    row_labels: Sequence[str],
    column_labels: Sequence[str],
    *,
    title: str = "",
    row_title: str = "teacher layer",
    column_title: str = "student layer",
    value_name: str = "CKA",
    vmin: float = 0.0,
    vmax: float = 1.0,
):
    """An interactive plotly heatmap; hovering a cell shows both layer names and the value.

    Example:
        >>> import numpy as np
        >>> fig = heatmap_figure(np.eye(2), ["t0", "t1"], ["s0", "s1"])
        >>> fig.data[0].z.shape
        (2, 2)
    """
    import plotly.graph_objects as go

    values = np.asarray(values, dtype=float)
    figure = go.Figure(
        go.Heatmap(
            z=values,
            x=list(column_labels),
            y=list(row_labels),
            zmin=vmin,
            zmax=vmax,
            colorscale="Magma",
            colorbar={"title": {"text": value_name}},
            text=np.vectorize(lambda v: f"{v:.3f}")(values) if values.size <= 400 else None,
            texttemplate="%{text}" if values.size <= 400 else None,
            hovertemplate=f"{row_title}: %{{y}}<br>{column_title}: %{{x}}<br>{value_name}: %{{z:.4f}}<extra></extra>",
        )
    )
    figure.update_layout(
        title=title,
        xaxis={"title": {"text": column_title}, "type": "category"},
        yaxis={"title": {"text": row_title}, "type": "category", "autorange": "reversed"},
        height=max(320, 60 + 40 * len(row_labels)),
    )
    return figure
