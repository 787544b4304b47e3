"""How a student's predictions differ from its teacher's: top-1 agreement, KL at a temperature, accuracy."""
from __future__ import annotations

import math
from contextlib import closing
from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from torch import nn

from workbench.probes.result_io import JsonResult, check_array, check_float, check_int
from workbench.batches import targets_of
from workbench.plots import heatmap_figure, heatmap_plot
from workbench.probes.stream import paired_batches


@dataclass
class PredictionResult(JsonResult):
    """Teacher-vs-student prediction statistics over a dataset.

    ``values`` counts samples by (teacher's top-1 class, student's top-1 class); ``kl`` is the mean
    KL(p_teacher^T ‖ p_student^T) of the temperature-T softmaxes, without the T² factor of the KD loss.

    Example:
        >>> import numpy as np
        >>> r = PredictionResult(np.array([[3, 1], [0, 4]]), agreement=0.875, kl=0.1, temperature=1.0, n_samples=8)
        >>> float(r.to_frame().loc["agreement", "value"])
        0.875
    """

    values: np.ndarray
    agreement: float
    kl: float
    temperature: float
    n_samples: int
    teacher_accuracy: float | None = None
    student_accuracy: float | None = None

    def __post_init__(self) -> None:
        """Check every field: whole non-negative counts, ``n_samples`` and ``agreement`` consistent with
        them, ``kl`` ≥ 0 (NaN or +Inf pass), a positive finite temperature, accuracies in [0, 1] or None."""
        counts = check_array(self.values, "values", ndim=2)
        if counts.shape[0] != counts.shape[1]:
            raise ValueError(f"values must be a square [classes, classes] matrix, got shape {list(counts.shape)}")
        bad = ~((counts >= 0) & (counts < 2**53) & (counts == np.floor(counts)))  # NaN is bad too
        if bad.any():
            raise ValueError(f"values must hold whole counts ≥ 0, found {float(counts[bad][0])!r}")
        self.values = counts.astype(np.int64)
        total = int(self.values.sum())
        self.n_samples = check_int(self.n_samples, "n_samples", minimum=1)
        if self.n_samples != total:
            raise ValueError(f"n_samples is {self.n_samples} but the counts in values sum to {total}")
        self.agreement = check_float(self.agreement, "agreement", 0.0, 1.0)
        agreed = int(np.trace(self.values))
        if abs(self.agreement - agreed / total) > 1e-9:
            raise ValueError(
                f"agreement is {self.agreement!r} but the counts in values give {agreed} / {total} = {agreed / total!r}"
            )
        self.kl = check_float(self.kl, "kl", low=-1e-9, allow_nan=True)  # ≥ 0 up to rounding
        self.temperature = check_float(self.temperature, "temperature", allow_nan=True)
        if not (0 < self.temperature < math.inf):
            raise ValueError(f"temperature must be a positive finite number, got {self.temperature!r}")
        for name in ("teacher_accuracy", "student_accuracy"):
            if getattr(self, name) is not None:
                setattr(self, name, check_float(getattr(self, name), name, 0.0, 1.0))

    def to_frame(self) -> pd.DataFrame:
        """The summary numbers as a one-column table."""
        rows = {
            "agreement": self.agreement,
            "kl": self.kl,
            "temperature": self.temperature,
            "teacher_accuracy": self.teacher_accuracy,
            "student_accuracy": self.student_accuracy,
            "n_samples": self.n_samples,
        }
        frame = pd.DataFrame({"value": {key: value for key, value in rows.items() if value is not None}})
        frame.index.name = "statistic"
        return frame

    def _normalised(self) -> np.ndarray:
        totals = self.values.sum(axis=1, keepdims=True)
        return np.divide(self.values, totals, out=np.zeros(self.values.shape), where=totals > 0)

    def _labels(self) -> tuple[list[str], list[str]]:
        return [str(c) for c in range(self.values.shape[0])], [str(c) for c in range(self.values.shape[1])]

    def plot(self, ax=None):
        """Row-normalised matplotlib heatmap: of the samples the teacher calls c, where the student goes."""
        rows, columns = self._labels()
        return heatmap_plot(
            self._normalised(), rows, columns, ax=ax, title=f"prediction agreement {self.agreement:.1%}",
            row_title="teacher's class", column_title="student's class", value_name="fraction of row",
        )

    def figure(self):
        """The same as :meth:`plot`, interactive."""
        rows, columns = self._labels()
        return heatmap_figure(
            self._normalised(), rows, columns, title=f"prediction agreement {self.agreement:.1%}",
            row_title="teacher's class", column_title="student's class", value_name="fraction of row",
        )


def compare_predictions(
    teacher: nn.Module,
    student: nn.Module,
    data: object,
    temperature: float = 1.0,
    device: str | torch.device = "auto",
    *,
    batch_size: int = 128,
    n_samples: int | None = None,
    student_data: object = None,
    progress: bool = True,
) -> PredictionResult:
    """Top-1 agreement, mean KL(teacher ‖ student) at ``temperature``, and accuracies when labels are given.

    Example:
        >>> import torch
        >>> from torch import nn
        >>> net = nn.Linear(4, 3)
        >>> r = compare_predictions(net, net, torch.randn(20, 4), device="cpu", progress=False)
        >>> r.agreement, round(r.kl, 12)
        (1.0, 0.0)
    """
    if not temperature > 0:
        raise ValueError(f"temperature must be positive, got {temperature!r}")
    counts = None
    kl_sum, correct_teacher, correct_student, labelled = 0.0, 0, 0, 0
    batches = paired_batches(
        teacher, student, data, teacher_layers=None, student_layers=None, student_data=student_data,
        batch_size=batch_size, n_samples=n_samples, device=device, progress=progress, description="predictions",
        logits=True,  # a model without logits (a headless transformer) is refused, naming it
    )
    with closing(batches):
        for batch in batches:
            if batch.teacher_output.dim() > 2 or batch.student_output.dim() > 2:
                raise ValueError(
                    f"compare_predictions compares one prediction per sample, but the models give logits of shape "
                    f"{list(batch.teacher_output.shape)} / {list(batch.student_output.shape)} (per token?); "
                    "compare token predictions with a Distiller's KD term, or pool to one prediction per sample"
                )
            teacher_logits = batch.teacher_output.reshape(batch.n, -1).double()
            student_logits = batch.student_output.reshape(batch.n, -1).double()
            if teacher_logits.shape[1] != student_logits.shape[1]:
                raise ValueError(
                    f"teacher and student predict different class counts: {teacher_logits.shape[1]} "
                    f"vs {student_logits.shape[1]}"
                )
            log_p_teacher = F.log_softmax(teacher_logits / temperature, dim=1)
            log_p_student = F.log_softmax(student_logits / temperature, dim=1)
            kl_sum += F.kl_div(log_p_student, log_p_teacher, log_target=True, reduction="sum").item()
            teacher_top, student_top = teacher_logits.argmax(1).cpu(), student_logits.argmax(1).cpu()
            n_classes = teacher_logits.shape[1]
            if counts is None:
                counts = torch.zeros(n_classes, n_classes, dtype=torch.int64)
            counts += torch.bincount(teacher_top * n_classes + student_top, minlength=n_classes**2).reshape(
                n_classes, n_classes
            )
            labels = targets_of(batch.batch)
            if labels is not None:
                labels = labels[: batch.n].cpu()
                correct_teacher += int((teacher_top == labels).sum())
                correct_student += int((student_top == labels).sum())
                labelled += batch.n
    if counts is None:
        raise ValueError("the data held no samples")
    n = int(counts.sum())
    return PredictionResult(
        values=counts.numpy(),
        agreement=float(counts.diagonal().sum()) / n,
        kl=kl_sum / n,
        temperature=temperature,
        n_samples=n,
        teacher_accuracy=correct_teacher / labelled if labelled else None,
        student_accuracy=correct_student / labelled if labelled else None,
    )
