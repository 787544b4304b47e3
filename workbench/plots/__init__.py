"""Figure builders from result objects: matplotlib for static figures, plotly for interactive ones."""
from workbench.plots.heatmap import heatmap_figure, heatmap_plot

__all__ = ["heatmap_figure", "heatmap_plot"]
