"""The result of a layer-by-layer CKA probe: numbers, a table, two figures, and a JSON file on disk."""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from workbench.probes.kernels import KERNELS, check_precision
from workbench.probes.result_io import (
    JsonResult, check_array, check_flag, check_int, check_json_dict, check_text, check_texts,
)
from workbench.plots import heatmap_figure, heatmap_plot

CKA_ROUNDING = {"full": 1e-4, "bf16": 1e-3}  # how far outside its exact range a CKA may lie as rounding


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
    precision: str = "full"
    extra: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        """Check every field (types, shape, range); a file that fails is refused by ``load``.

        The biased CKA lies in [0, 1] (the inner product of two PSD centred Grams over their norms), the
        debiased one in [-1, 1] (Cauchy–Schwarz on U-centred Grams); values up to ``CKA_ROUNDING`` (of the
        Grams' ``precision``) outside pass as rounding, NaN (undefined, a dead layer) passes, ±Inf does not.
        """
        self.teacher_layers = check_texts(self.teacher_layers, "teacher_layers")
        self.student_layers = check_texts(self.student_layers, "student_layers")
        self.kernel = check_text(self.kernel, "kernel")
        if self.kernel not in KERNELS:
            raise ValueError(f"kernel must be one of {KERNELS}, got {self.kernel!r}")
        self.debiased = check_flag(self.debiased, "debiased")
        self.n_samples = check_int(self.n_samples, "n_samples", minimum=4 if self.debiased else 2)
        self.teacher_name = check_text(self.teacher_name, "teacher_name")
        self.student_name = check_text(self.student_name, "student_name")
        self.precision = check_text(self.precision, "precision")
        check_precision(self.precision)
        self.extra = check_json_dict(self.extra, "extra")
        self.values = check_array(self.values, "values", ndim=2)
        expected = [len(self.teacher_layers), len(self.student_layers)]
        if list(self.values.shape) != expected:
            raise ValueError(f"values has shape {list(self.values.shape)}, the layer lists imply {expected}")
        low = -1 if self.debiased else 0
        rounding = CKA_ROUNDING[self.precision]
        outside = ~np.isnan(self.values) & ((self.values < low - rounding) | (self.values > 1 + rounding))
        if outside.any():
            row, column = np.argwhere(outside)[0]
            raise ValueError(
                f"values[{row}, {column}] = {float(self.values[row, column])!r} is outside [{low}, 1], the range of "
                f"{'debiased' if self.debiased else 'biased'} CKA"
            )

    @property
    def title(self) -> str:
        """A one-line description used by the figures."""
        estimator = "debiased" if self.debiased else "biased"
        grams = "" if self.precision == "full" else f", {self.precision} Grams"
        return (
            f"{self.kernel} CKA ({estimator}{grams}), {self.teacher_name} vs {self.student_name}, "
            f"n = {self.n_samples:,}"
        )

    def to_frame(self) -> pd.DataFrame:
        """The matrix as a DataFrame (index: teacher layers, columns: student layers)."""
        frame = pd.DataFrame(self.values, index=self.teacher_layers, columns=self.student_layers)
        frame.index.name, frame.columns.name = "teacher_layer", "student_layer"
        return frame

    def dead_layers(self) -> tuple[list[str], list[str]]:
        """``(teacher, student)`` layers with no defined CKA (an all-NaN row / column: a dead layer).

        Example:
            >>> result = CKAResult(np.array([[0.9, np.nan], [np.nan, np.nan]]), ["t1", "t2"], ["s1", "s2"], n_samples=8)
            >>> result.dead_layers()
            (['t2'], ['s2'])
        """
        undefined = np.isnan(self.values)
        return ([name for name, dead in zip(self.teacher_layers, undefined.all(axis=1)) if dead],
                [name for name, dead in zip(self.student_layers, undefined.all(axis=0)) if dead])

    def best_matches(self) -> pd.DataFrame:
        """For each student layer, the teacher layer it is most similar to and that CKA.

        NaN entries (dead layers) are never chosen; a student layer with no defined CKA at all gets
        ``teacher_layer`` None and ``cka`` NaN, not a made-up match.

        Example:
            >>> result = CKAResult(np.array([[np.nan, np.nan], [0.4, np.nan]]), ["t1", "t2"], ["s1", "s2"], n_samples=8)
            >>> result.best_matches()["teacher_layer"].tolist()
            ['t2', None]
        """
        defined = ~np.isnan(self.values).all(axis=0)
        best = np.argmax(np.nan_to_num(self.values, nan=-np.inf), axis=0)
        columns = np.arange(len(self.student_layers))
        return pd.DataFrame(
            {
                "student_layer": self.student_layers,
                "teacher_layer": pd.Series(  # object dtype: pandas' string dtype would turn None into NaN
                    [self.teacher_layers[i] if ok else None for i, ok in zip(best, defined)], dtype=object
                ),
                "cka": np.where(defined, self.values[best, columns], np.nan),
            }
        )

    def plot(self, ax=None):
        """Annotated matplotlib heatmap; returns the ``Axes``."""
        return heatmap_plot(self.values, self.teacher_layers, self.student_layers, title=self.title, ax=ax)

    def figure(self):
        """Interactive plotly heatmap with the layer names and value on hover."""
        return heatmap_figure(self.values, self.teacher_layers, self.student_layers, title=self.title)
