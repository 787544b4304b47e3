"""Feature terms: hints (FitNet, cosine), attention transfer, and the norm-and-direction (ND) loss.

Hint terms project the student to the teacher's layout first (:mod:`workbench.losses.projectors`); the
projector is created on the first call or by ``term.build(student_example, teacher_example)``.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from workbench.losses.base import ProjectedTerm, Term, check_same_samples
from workbench.losses.projectors import resize, tokens_to_map


class FitNet(ProjectedTerm):
    """FitNets hint: ``mean((r(F_s) − F_t)²)`` over all elements, ``r`` the student-side projector.

    Romero et al. (2015), "FitNets: Hints for Thin Deep Nets", https://arxiv.org/abs/1412.6550 (the paper
    writes ½‖·‖²; the element mean here is mmrazor / mdistiller's). No hyper-parameters.
    Shapes: maps ``[n, c, h, w]``, tokens ``[n, t, d]`` or vectors ``[n, d]`` on either side -> scalar.

    Example:
        >>> import torch
        >>> term = FitNet().build(torch.zeros(2, 8, 4, 4), torch.zeros(2, 16, 2, 2))
        >>> sum(p.numel() for p in term.parameters())  # 1×1 conv 8->16 and BatchNorm(16)
        160
        >>> term(torch.randn(2, 8, 4, 4), torch.randn(2, 16, 2, 2)).shape
        torch.Size([])
    """

    def forward(
        self, student: torch.Tensor, teacher: torch.Tensor, targets: torch.Tensor | None = None
    ) -> torch.Tensor:
        projected, teacher = self.project(student, teacher)
        return F.mse_loss(projected, teacher.to(projected.dtype))


class CosineHint(ProjectedTerm):
    """Cosine hint: ``1 − mean cos(r(F_s), F_t)``, the cosine taken over the feature dimension.

    That is per sample for vectors, per token for tokens, per position (over channels) for maps: only
    directions are matched, not norms. A generic hint, as in e.g. the cosine feature losses of ViT
    distillation; no single paper. Shapes: as :class:`FitNet` -> scalar in [0, 2].

    Example:
        >>> import torch
        >>> x = torch.randn(4, 8)
        >>> round(CosineHint()(3 * x, x).item(), 6)
        0.0
    """

    def forward(
        self, student: torch.Tensor, teacher: torch.Tensor, targets: torch.Tensor | None = None
    ) -> torch.Tensor:
        projected, teacher = self.project(student, teacher)
        dim = 1 if projected.dim() == 4 else -1
        return 1 - F.cosine_similarity(projected, teacher.to(projected.dtype), dim=dim, eps=1e-8).mean()


def attention_map(features: torch.Tensor, p: float = 2.0, size: tuple[int, int] | None = None) -> torch.Tensor:
    """Spatial attention ``Q = mean_c |F_c|^p``, resized to ``size``, flattened and L2-normalised: ``[n, h·w]``.

    Example:
        >>> attention_map(torch.ones(2, 3, 2, 2))
        tensor([[0.5000, 0.5000, 0.5000, 0.5000],
                [0.5000, 0.5000, 0.5000, 0.5000]])
    """
    if features.dim() == 3:
        features = tokens_to_map(features)
    if features.dim() != 4:
        raise ValueError(f"attention transfer needs maps [n, c, h, w] or tokens [n, t, d], got {tuple(features.shape)}")
    attention = features.abs().pow(p).mean(dim=1, keepdim=True)
    if size is not None:
        attention = resize(attention, size)
    return F.normalize(attention.flatten(1), dim=1)


class AttentionTransfer(Term):
    """Attention transfer: ``mean((Q_s/‖Q_s‖ − Q_t/‖Q_t‖)²)`` over samples and positions.

    ``Q = mean_c |F_c|^p`` per position (see :func:`attention_map`); channel counts may differ (no projector),
    a student map of another size is resized to the teacher's (pooling or bilinear), ViT tokens are put on
    their grid. Zagoruyko & Komodakis (2017), "Paying More Attention to Attention",
    https://arxiv.org/abs/1612.03928; the element mean is the authors' ``at_loss``, whose training code
    weights it by β = 10³ (put that weight in the Distiller). Default ``p = 2``.
    Shapes: maps ``[n, c, h, w]`` (or tokens ``[n, t, d]``) -> scalar.

    Example:
        >>> import torch
        >>> x = torch.randn(2, 4, 3, 3)
        >>> round(AttentionTransfer()(x, torch.cat([x, 2 * x], dim=1)).item(), 6)  # same attention, other widths
        0.0
    """

    def __init__(self, p: float = 2.0, teacher_detach: bool = True) -> None:
        super().__init__(teacher_detach)
        self.p = p

    def forward(
        self, student: torch.Tensor, teacher: torch.Tensor, targets: torch.Tensor | None = None
    ) -> torch.Tensor:
        check_same_samples(student, teacher, "AttentionTransfer")
        attention_t = attention_map(self.teacher_side(teacher), self.p)
        side = teacher.shape[-2:] if teacher.dim() == 4 else tokens_to_map(teacher[:1]).shape[-2:]
        attention_s = attention_map(student, self.p, size=tuple(side))
        return (attention_s - attention_t.to(attention_s.dtype)).pow(2).mean()

    def extra_repr(self) -> str:
        return f"p={self.p}"


def class_means(features: torch.Tensor, targets: torch.Tensor, num_classes: int | None = None) -> torch.Tensor:
    """Mean feature of each class: ``[n, d]``, ``[n]`` -> ``[num_classes, d]`` (zeros for absent classes).

    Example:
        >>> class_means(torch.tensor([[1.0, 0.0], [3.0, 2.0], [0.0, 5.0]]), torch.tensor([0, 0, 1]))
        tensor([[2., 1.],
                [0., 5.]])
    """
    targets = targets.to(features.device)
    num_classes = int(targets.max()) + 1 if num_classes is None else num_classes
    sums = features.new_zeros(num_classes, features.shape[1]).index_add_(0, targets, features)
    counts = torch.bincount(targets, minlength=num_classes).clamp_min(1).to(features.dtype)
    return sums / counts[:, None]


class NormDirection(ProjectedTerm):
    """ND loss: ``mean_i [1 − ⟨r(s_i), e_{y_i}⟩ / max(‖r(s_i)‖, ‖t_i‖)]``, ``e_c = μ_c / ‖μ_c‖``.

    ``μ_c`` is the teacher's mean embedding of class c. While the student's norm is below the teacher's,
    the loss rewards a longer projection on ``e_{y_i}`` (large norm); above it, only the cosine to
    ``e_{y_i}`` counts (direction). This is the authors' ``DirectNormLoss``. The paper computes ``μ_c``
    over the whole training set with the teacher: pass them as ``class_means`` (see :func:`class_means`);
    without them, the means of the teacher embeddings in the batch are used — a noisier stand-in.
    Wang, Cheng, Zhou, Liu & Zhu (2023), "Improving Knowledge Distillation via Regularizing Feature Norm
    and Direction", https://arxiv.org/abs/2305.17007. Weight it with the paper's ND factor in the Distiller.
    Shapes: embeddings ``[n, d_s]``, ``[n, d_t]`` (a linear projector if d_s ≠ d_t), targets ``[n]`` -> scalar.

    Example:
        >>> import torch
        >>> teacher, targets = torch.tensor([[2.0, 0.0], [0.0, 1.0]]), torch.tensor([0, 1])
        >>> NormDirection()(teacher.clone(), teacher, targets).item()  # each class mean is the sample itself
        0.0
    """

    def __init__(
        self, class_means: torch.Tensor | None = None, projector: nn.Module | None = None, teacher_detach: bool = True
    ) -> None:
        super().__init__(projector, teacher_detach)
        if class_means is not None and class_means.dim() != 2:
            raise ValueError(f"class_means must be [num_classes, d_teacher], got {tuple(class_means.shape)}")
        self.register_buffer("class_means", None if class_means is None else class_means.detach().clone())

    def forward(
        self, student: torch.Tensor, teacher: torch.Tensor, targets: torch.Tensor | None = None
    ) -> torch.Tensor:
        if student.dim() != 2 or teacher.dim() != 2:
            raise ValueError(
                f"NormDirection works on embeddings [n, d] (pooled penultimate features); "
                f"got student {tuple(student.shape)}, teacher {tuple(teacher.shape)}"
            )
        if not isinstance(targets, torch.Tensor) or targets.shape != (student.shape[0],):
            raise ValueError(f"NormDirection needs targets: class indices of shape [{student.shape[0]}]")
        projected, teacher = self.project(student, teacher)
        targets = targets.to(teacher.device)
        means = class_means(teacher, targets) if self.class_means is None else self.class_means
        if means.shape[1] != teacher.shape[1] or int(targets.max()) >= means.shape[0]:
            raise ValueError(
                f"class_means {tuple(means.shape)} must cover every target class (max {int(targets.max())}) "
                f"in the teacher's width {teacher.shape[1]}"
            )
        directions = F.normalize(means[targets].to(projected.dtype), dim=1)
        scale = torch.maximum(projected.norm(dim=1), teacher.norm(dim=1).to(projected.dtype)).clamp_min(1e-12)
        return (1 - (projected * directions).sum(dim=1) / scale).mean()
