"""The result of a layer-by-layer CKA probe: numbers, a table, two figures, and a JSON file on disk."""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from workbench.probes.result_io import JsonResult
from workbench.plots import heatmap_figure, heatmap_plot


@dataclass
class CKAResult(JsonResult):
    """CKA between teacher layers (rows) and student layers (columns).

    Example:
        >>> import numpy as np
        >>> result = CKAResult(np.array([[0.9, 0.2], [0.3, 0.8]]), ["t1", "t2"], ["s1", "s2"], n_samples=100)
        >>> result.best_matches()["teacher_layer"].tolist()
        ['t1', 't2']
    """

    values: np.ndarray
    teacher_layers: list[str]
    student_layers: list[str]
    n_samples: int
    kernel: str = "linear"
    debiased: bool = True
    teacher_name: str = "teacher"
    student_name: str = "student"
    extra: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.values = np.asarray(self.values, dtype=np.float64)
        expected = (len(self.teacher_layers), len(self.student_layers))
        if self.values.shape != expected:
            raise ValueError(f"values has shape {self.values.shape}, the layer lists imply {expected}")

    @property
    def title(self) -> str:
        """A one-line description used by the figures."""
        estimator = "debiased" if self.debiased else "biased"
        return (
            f"{self.kernel} CKA ({estimator}), {self.teacher_name} vs {self.student_name}, "
            f"n = {self.n_samples:,}"
        )

    def to_frame(self) -> pd.DataFrame:
        """The matrix as a DataFrame (index: teacher layers, columns: student layers)."""
        frame = pd.DataFrame(self.values, index=self.teacher_layers, columns=self.student_layers)
        frame.index.name, frame.columns.name = "teacher_layer", "student_layer"
        return frame

    def best_matches(self) -> pd.DataFrame:
        """For each student layer, the teacher layer it is most similar to and that CKA."""
        best = np.nanargmax(np.nan_to_num(self.values, nan=-np.inf), axis=0)
        return pd.DataFrame(
            {
                "student_layer": self.student_layers,
                "teacher_layer": [self.teacher_layers[i] for i in best],
                "cka": self.values[best, np.arange(len(self.student_layers))],
            }
        )

    def plot(self, ax=None):
        """Annotated matplotlib heatmap; returns the ``Axes``."""
        return heatmap_plot(self.values, self.teacher_layers, self.student_layers, title=self.title, ax=ax)

    def figure(self):
        """Interactive plotly heatmap with the layer names and value on hover."""
        return heatmap_figure(self.values, self.teacher_layers, self.student_layers, title=self.title)
