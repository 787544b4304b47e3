"""Teacher/student similarity probes — the public names users and reports call.

Example:
    >>> import numpy as np
    >>> from workbench import similarity
    >>> np.random.seed(1337); X = np.random.randn(100, 10); Y = np.random.randn(100, 10) + X
    >>> round(similarity.linear_cka(X, Y), 5)
    0.55761
"""
from workbench.probes.cka_result import CKAResult
from workbench.probes.cka_stream import CKAAccumulator, cka_matrix
from workbench.probes.pairwise import linear_cka, mutual_knn, rbf_cka
from workbench.probes.predictions import PredictionResult, compare_predictions
from workbench.probes.trajectory import CKATrajectory

__all__ = [
    "CKAAccumulator",
    "CKAResult",
    "CKATrajectory",
    "PredictionResult",
    "cka_matrix",
    "compare_predictions",
    "linear_cka",
    "mutual_knn",
    "rbf_cka",
]
