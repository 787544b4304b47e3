"""How a student's predictions differ from its teacher's: top-1 agreement, KL at a temperature, accuracy."""
from __future__ import annotations

from contextlib import closing
from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from torch import nn

from workbench.probes.result_io import JsonResult
from workbench.data import targets_of
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
        self.values = np.asarray(self.values, dtype=np.int64)

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
    )
    with closing(batches):
        for batch in batches:
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
