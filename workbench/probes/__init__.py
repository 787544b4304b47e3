"""Read-only measurements of a teacher and a student: similarity (CKA and friends), predictions, the
accuracy of a distiller's stage branches (:func:`branch_accuracy`), DisWOT's training-free student search
(:mod:`workbench.probes.diswot`, with :mod:`~workbench.probes.student_search` and the zero-cost baselines of
:mod:`~workbench.probes.zero_cost`) and attribution agreement (:mod:`workbench.probes.attribution`)."""
from workbench.probes.branches import BranchAccuracy, branch_accuracy

__all__ = ["BranchAccuracy", "branch_accuracy"]
