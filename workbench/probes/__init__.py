"""Read-only measurements of a teacher and a student: similarity (CKA and friends), predictions, and the
accuracy of a distiller's stage branches (:func:`branch_accuracy`)."""
from workbench.probes.branches import BranchAccuracy, branch_accuracy

__all__ = ["BranchAccuracy", "branch_accuracy"]
