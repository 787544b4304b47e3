"""The GapExplorer's two live figures: a CKA heatmap and one teacher layer's row, updated in place.

Both are ``plotly`` ``FigureWidget``s that take their container's width: no layout width is ever set,
the plotly.js ``responsive`` config follows the window, and titles wrap instead of running past the
edge. Everything shown is read from a :class:`~workbench.similarity.CKAResult`; nothing is computed.
"""
from __future__ import annotations

import textwrap

import numpy as np
import plotly.graph_objects as go

from workbench.similarity import CKAResult

HIGHLIGHT = "#2a9d8f"
BAR = "#5b5f97"
MAX_HEATMAP_HEIGHT = 900  # pixels: 93 layers at 40 px a row would be 3,800
TITLE_CHARACTERS = 60  # a title line's length before it wraps (about 420 px of plotly's title font)
MARGIN = {"l": 10, "r": 30, "t": 80, "b": 10}  # the right margin keeps plotly's corner drag handles inside


def wrap_title(text: str) -> str:
    """A plotly title broken into lines of at most :data:`TITLE_CHARACTERS` (``<br>`` between them).

    Example:
        >>> wrap_title("linear CKA (debiased), teacher ResNet (11.2M parameters) vs student ResNet (4.9M parameters)")
        'linear CKA (debiased), teacher ResNet (11.2M parameters) vs<br>student ResNet (4.9M parameters)'
    """
    return "<br>".join(textwrap.wrap(text, TITLE_CHARACTERS))


def empty_figures() -> tuple[go.FigureWidget, go.FigureWidget]:
    """The heatmap and the row plot before anything is computed; both take their container's width.

    Example:
        >>> heatmap, row_plot = empty_figures()
        >>> heatmap.layout.width is None, heatmap.layout.autosize, row_plot.data[0].type
        (True, True, 'bar')
    """
    heatmap = go.FigureWidget(go.Heatmap(z=[[]], colorscale="Magma"))
    heatmap.update_layout(
        height=320, title="CKA: not computed yet", autosize=True, margin=MARGIN,
        xaxis={"automargin": True}, yaxis={"automargin": True},
    )
    row_plot = go.FigureWidget(go.Bar(x=[], y=[], marker={"color": []}))
    row_plot.update_layout(
        height=300,
        autosize=True,
        title="click a heatmap cell to see that teacher<br>layer against every student layer",
        xaxis={"title": {"text": "student layer"}, "type": "category", "automargin": True},
        yaxis={"title": {"text": "CKA"}, "automargin": True},
        margin=MARGIN,
    )
    for figure in (heatmap, row_plot):
        figure._config = {**figure._config, "responsive": True}  # plotly.js follows the window's width
    return heatmap, row_plot


def show_heatmap(heatmap: go.FigureWidget, result: CKAResult, colour_limits: tuple[float, float]) -> None:
    """Replace the heatmap's trace by that of ``result.figure()`` and take its title, height and axes,
    in place; the colour scale spans ``colour_limits``."""
    fresh = result.figure()
    new_trace = fresh.data[0].to_plotly_json()
    trace = heatmap.data[0]
    stale = set(trace.to_plotly_json()) - set(new_trace)
    with heatmap.batch_update():
        for name in stale - {"type", "uid"}:
            trace[name] = None  # e.g. cell text, which large matrices go without
        trace.update({name: value for name, value in new_trace.items() if name not in ("type", "uid")})
        trace.zmin, trace.zmax = colour_limits
        # the figure's own layout keys only: no width, so the figure keeps its container's width
        heatmap.update_layout(
            title={"text": wrap_title(result.title)},
            height=min(fresh.layout.height or MAX_HEATMAP_HEIGHT, MAX_HEATMAP_HEIGHT),
            xaxis=fresh.layout.xaxis.to_plotly_json(), yaxis=fresh.layout.yaxis.to_plotly_json(),
        )
    # plotly.js answers a new height by fixing the width where it is (autosize off), so a later, narrower
    # window would cut the figure; this relayout gives the width back to the container
    heatmap._send_relayout_msg({"autosize": True, "width": None})


def data_limits(values: np.ndarray) -> tuple[float, float]:
    """``(min, max)`` of a matrix, NaN (dead layers) left out; ``(0, 1)`` when every entry is NaN; a
    constant matrix gets a sliver of range, so that its colour is defined.

    Example:
        >>> data_limits(np.array([[0.2, np.nan], [0.7, 0.4]]))
        (0.2, 0.7)
    """
    if np.isnan(values).all():
        return 0.0, 1.0
    low, high = float(np.nanmin(values)), float(np.nanmax(values))
    if high - low < 1e-9:
        low, high = low - 5e-4, high + 5e-4
    return low, high


def show_row(row_plot: go.FigureWidget, heatmap: go.FigureWidget, result: CKAResult, row: int,
             student_layer: str | None = None) -> None:
    """Plot teacher layer ``row`` of ``result`` against every student layer (``student_layer``'s bar
    highlighted) and frame that row on the heatmap."""
    name = result.teacher_layers[row]
    values = result.values[row]
    title = f"teacher layer {name}: {result.kernel} CKA against every student layer"
    with row_plot.batch_update():
        bars = row_plot.data[0]
        bars.x, bars.y = list(result.student_layers), values
        bars.marker.color = [HIGHLIGHT if layer == student_layer else BAR for layer in result.student_layers]
        bars.text = [f"{value:.3f}" for value in values]
        bars.hovertemplate = "student layer: %{x}<br>CKA: %{y:.4f}<extra></extra>"
        row_plot.layout.title.text = wrap_title(title)
        row_plot.layout.yaxis.range = [min(0.0, float(np.nanmin(values))), max(1.0, float(np.nanmax(values)))]
    with heatmap.batch_update():
        heatmap.layout.shapes = [
            {
                "type": "rect", "xref": "paper", "x0": 0, "x1": 1, "yref": "y",
                "y0": row - 0.5, "y1": row + 0.5, "line": {"color": HIGHLIGHT, "width": 3},
            }
        ]
