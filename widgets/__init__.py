"""Interactive explorers for notebooks: ipywidgets that compose workbench results and figures.

Example:
    >>> from widgets import GapExplorer
    >>> GapExplorer.__name__
    'GapExplorer'
"""
from widgets.attribution_compare import AttributionCompare
from widgets.dt_viewer import DTViewer
from widgets.gap_explorer import GapExplorer
from widgets.ofa_explorer import OFAExplorer
from widgets.student_search import StudentSearch
from widgets.training_monitor import TrainingMonitor

__all__ = ["AttributionCompare", "DTViewer", "GapExplorer", "OFAExplorer", "StudentSearch", "TrainingMonitor"]
