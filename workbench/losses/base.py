"""The calling convention shared by every distillation term, and the input checks behind it.

Every term is a small ``nn.Module`` called ``term(student, teacher, targets=None) -> scalar``: the
student's and the teacher's tensors for one batch (logits, or features of named layers), optional class
indices, and the teacher side detached inside the term (``teacher_detach=True``, as mmrazor). A term
knows nothing about models or hooks, so it can be called in any training loop.
"""
from __future__ import annotations

import math
import numbers

import torch
from torch import nn

from workbench.batches import IGNORE_INDEX  # targets equal to this (-100) are skipped, as in cross-entropy
from workbench.losses.projectors import Projector, make_projector


class Term(nn.Module):
    """Base of every term: holds ``teacher_detach`` and the teacher-side detach.

    Example:
        >>> import torch
        >>> class MeanGap(Term):
        ...     def forward(self, student, teacher, targets=None):
        ...         return (student - self.teacher_side(teacher)).mean()
        >>> MeanGap()(torch.ones(2, 3), torch.zeros(2, 3)).item()
        1.0
    """

    def __init__(self, teacher_detach: bool = True) -> None:
        super().__init__()
        self.teacher_detach = teacher_detach

    def teacher_side(self, teacher: torch.Tensor) -> torch.Tensor:
        return teacher.detach() if self.teacher_detach else teacher


def check_setting(term: str, name: str, value: object, *, positive: bool = False) -> float:
    """A term's hyper-parameter as a float; ``ValueError`` unless it is finite and ≥ 0 (``> 0`` if ``positive``).

    Example:
        >>> check_setting("KD", "T", 4, positive=True)
        4.0
        >>> check_setting("KD", "T", 0.0, positive=True)
        Traceback (most recent call last):
        ...
        ValueError: KD: T must be a finite number > 0, got 0.0
    """
    if isinstance(value, torch.Tensor) and value.numel() == 1:
        value = value.item()
    number = float(value) if isinstance(value, numbers.Real) and not isinstance(value, bool) else math.nan
    if not math.isfinite(number) or number < 0 or (positive and number == 0):
        raise ValueError(f"{term}: {name} must be a finite number {'>' if positive else '≥'} 0, got {value!r}")
    return number


def check_same_samples(student: torch.Tensor, teacher: torch.Tensor, term: str) -> None:
    """Raise unless both are tensors with a sample dimension and the same number of samples.

    Example:
        >>> check_same_samples(torch.zeros(4, 3), torch.zeros(5, 3), "KD")
        Traceback (most recent call last):
        ...
        ValueError: KD: student and teacher must hold the same samples: the student has 4, the teacher has 5
    """
    for side, value in (("student", student), ("teacher", teacher)):
        if not isinstance(value, torch.Tensor):
            raise TypeError(f"{term}: {side} must be a torch tensor, got {type(value).__name__}")
        if value.dim() < 2:
            raise ValueError(
                f"{term}: {side} must be [n, ...] with a feature dimension, got shape {tuple(value.shape)}"
            )
    if student.shape[0] != teacher.shape[0]:
        raise ValueError(
            f"{term}: student and teacher must hold the same samples: "
            f"the student has {student.shape[0]}, the teacher has {teacher.shape[0]}"
        )


def logit_rows(
    student: torch.Tensor, teacher: torch.Tensor, targets: torch.Tensor | None, term: str, needs_targets: bool = False
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Logits ``[n, C]`` or ``[n, t, C]`` -> rows ``[r, C]`` (float32 for half types) and targets ``[r]``.

    Rows whose target is ``IGNORE_INDEX`` (-100) are dropped, so padded tokens take no part.

    Example:
        >>> s, t, y = logit_rows(torch.zeros(2, 3, 5), torch.zeros(2, 3, 5), torch.tensor([[0, 1, -100]] * 2), "KD")
        >>> s.shape, y.tolist()
        (torch.Size([4, 5]), [0, 1, 0, 1])
    """
    check_same_samples(student, teacher, term)
    if student.shape[-1] != teacher.shape[-1]:
        raise ValueError(
            f"{term}: student and teacher logits must have the same number of classes: "
            f"the student has {student.shape[-1]}, the teacher has {teacher.shape[-1]}"
        )
    if student.shape != teacher.shape:
        raise ValueError(f"{term}: logit shapes differ: student {tuple(student.shape)}, teacher {tuple(teacher.shape)}")
    classes = student.shape[-1]
    rows = [x.reshape(-1, classes) for x in (student, teacher)]
    rows = [x.float() if x.dtype in (torch.float16, torch.bfloat16) else x for x in rows]
    if targets is None:
        if needs_targets:
            raise ValueError(f"{term} needs targets: class indices of shape {tuple(student.shape[:-1])}")
        return rows[0], rows[1], None
    if not isinstance(targets, torch.Tensor):
        raise ValueError(f"{term}: targets must be a tensor of integer class indices, got {type(targets).__name__}")
    if targets.is_floating_point() or targets.is_complex() or targets.dtype == torch.bool:
        dtype = str(targets.dtype).removeprefix("torch.")
        raise ValueError(f"{term}: targets must be integer class indices (int64), got dtype {dtype}")
    if targets.shape != student.shape[:-1]:
        raise ValueError(
            f"{term}: targets must be integer class indices of shape {tuple(student.shape[:-1])}, "
            f"got shape {tuple(targets.shape)}"
        )
    flat = targets.reshape(-1).to(student.device, torch.long)
    keep = flat != IGNORE_INDEX
    if (((flat < 0) | (flat >= classes)) & keep).any():
        raise ValueError(f"{term}: targets must be class indices in [0, {classes}) or {IGNORE_INDEX}")
    if not keep.all():
        if not keep.any():
            raise ValueError(f"{term}: every target is {IGNORE_INDEX} (ignored): no rows left to distil")
        return rows[0][keep], rows[1][keep], flat[keep]
    return rows[0], rows[1], flat


def _shape_of(example: torch.Tensor | tuple[int, ...]) -> tuple[int, ...]:
    return tuple(example.shape) if isinstance(example, torch.Tensor) else tuple(example)


class ProjectedTerm(Term):
    """A feature term whose student side goes through a projector to the teacher's layout first.

    The projector is a student-side trainable module made by :func:`make_projector` on the first call
    (so its parameters appear after one call), or eagerly by :meth:`build`; pass ``projector=`` to use
    your own module instead.
    """

    def __init__(self, projector: nn.Module | None = None, teacher_detach: bool = True) -> None:
        super().__init__(teacher_detach)
        self.register_module("projector", projector)

    def build(
        self, student_example: torch.Tensor | tuple[int, ...], teacher_example: torch.Tensor | tuple[int, ...]
    ) -> ProjectedTerm:
        """Create the projector now, from example tensors (or shapes), so an optimizer can include it."""
        if self.projector is None:
            projector = make_projector(_shape_of(student_example), _shape_of(teacher_example))
            if isinstance(student_example, torch.Tensor):
                projector = projector.to(device=student_example.device, dtype=student_example.dtype)
            self.projector = projector
        return self

    def project(self, student: torch.Tensor, teacher: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(projected student, teacher view)`` of equal shapes; the teacher side detached."""
        term = type(self).__name__
        check_same_samples(student, teacher, term)
        teacher = self.teacher_side(teacher)
        self.build(student, teacher)
        if isinstance(self.projector, Projector):
            projected, teacher = self.projector(student), self.projector.teacher_view(teacher)
        else:
            projected = self.projector(student)
        if projected.shape != teacher.shape:
            raise ValueError(
                f"{term}: the projected student has shape {tuple(projected.shape)} but the teacher has "
                f"{tuple(teacher.shape)}; use one term per (student layer, teacher layer) pair"
            )
        return projected, teacher
