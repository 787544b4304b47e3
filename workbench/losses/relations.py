"""Relation terms: match how samples relate to each other in a batch (distances, angles, similarities).

They compare ``[n, n]`` (or ``[n, n, n]``) relation matrices, so student and teacher widths may differ
and no projector is needed. Features of any shape ``[n, ...]`` are flattened per sample.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from workbench.losses.base import Term, check_same_samples


def _flat_pair(student: torch.Tensor, teacher: torch.Tensor, term: str) -> tuple[torch.Tensor, torch.Tensor]:
    check_same_samples(student, teacher, term)
    student, teacher = (x.reshape(x.shape[0], -1) for x in (student, teacher))
    if student.dtype in (torch.float16, torch.bfloat16):
        student = student.float()
    return student, teacher.to(student.dtype)


def pairwise_distances(embeddings: torch.Tensor) -> torch.Tensor:
    """Euclidean distances ``[n, n]`` with a zero diagonal and finite gradients for equal rows.

    Example:
        >>> pairwise_distances(torch.tensor([[0.0, 0.0], [3.0, 4.0]]))
        tensor([[0., 5.],
                [5., 0.]])
    """
    centred = embeddings - embeddings.mean(dim=0, keepdim=True)  # distances are translation-free; less cancellation
    squared_norms = (centred * centred).sum(dim=1)
    squared = (squared_norms[:, None] + squared_norms[None, :] - 2 * centred @ centred.T).clamp_min(1e-12)
    off_diagonal = ~torch.eye(len(embeddings), dtype=torch.bool, device=embeddings.device)
    return squared.sqrt() * off_diagonal


def _normalised_distances(embeddings: torch.Tensor) -> torch.Tensor:
    distances = pairwise_distances(embeddings)
    n = len(embeddings)
    return distances / (distances.sum() / (n * (n - 1))).clamp_min(1e-12)


def _angles(embeddings: torch.Tensor) -> torch.Tensor:
    """``[n, n, n]``: entry (i, j, k) is ``cos ∠(e_j − e_i, e_k − e_i)`` (0 where j = i or k = i)."""
    directions = F.normalize(embeddings[None, :, :] - embeddings[:, None, :], p=2, dim=2)
    return directions @ directions.transpose(1, 2)


class RKD(Term):
    """Relational KD: ``w_d · L_distance + w_a · L_angle``, each a smooth-L1 (Huber, δ = 1) mean.

    - distance: ``ψ_D(i, j) = ‖e_i − e_j‖ / μ``, μ the mean distance over pairs i ≠ j; Huber over all n²
      entries;
    - angle: ``ψ_A(i, j, k) = cos ∠(e_j − e_i, e_k − e_i)``; Huber over all n³ entries.

    Both are invariant to the scale (and translation) of either embedding. Park, Kim, Lu & Cho (2019),
    "Relational Knowledge Distillation", https://arxiv.org/abs/1904.05068; the reductions are the authors'
    code. Defaults ``distance_weight=25, angle_weight=50`` (their metric-learning code, and mdistiller).
    Shapes: ``[n, ...]`` on each side, any widths, n ≥ 2 -> scalar. Memory O(n² · d) for the angles.

    Example:
        >>> import torch
        >>> x = torch.randn(6, 4)
        >>> round(RKD()(5 * x + 1, x).item(), 5)
        0.0
    """

    def __init__(self, distance_weight: float = 25.0, angle_weight: float = 50.0, teacher_detach: bool = True) -> None:
        super().__init__(teacher_detach)
        self.distance_weight, self.angle_weight = distance_weight, angle_weight

    def forward(
        self, student: torch.Tensor, teacher: torch.Tensor, targets: torch.Tensor | None = None
    ) -> torch.Tensor:
        student, teacher = _flat_pair(student, self.teacher_side(teacher), "RKD")
        if len(student) < 2:
            raise ValueError(f"RKD needs at least 2 samples per batch, got {len(student)}")
        loss = student.new_zeros(())
        if self.distance_weight:
            distance = F.smooth_l1_loss(_normalised_distances(student), _normalised_distances(teacher))
            loss = loss + self.distance_weight * distance
        if self.angle_weight:
            loss = loss + self.angle_weight * F.smooth_l1_loss(_angles(student), _angles(teacher))
        return loss

    def extra_repr(self) -> str:
        return f"distance_weight={self.distance_weight}, angle_weight={self.angle_weight}"


class SimilarityPreserving(Term):
    """Similarity-preserving KD: ``‖G̃_s − G̃_t‖²_F / n²``, ``G̃`` = row-L2-normalised ``G = F Fᵀ``.

    Invariant to scaling either feature. Tung & Mori (2019), "Similarity-Preserving Knowledge
    Distillation", https://arxiv.org/abs/1907.09682; the paper weights it by γ = 3000 (CIFAR-10) in the
    training loss — put that in the Distiller. Shapes: ``[n, ...]`` on each side, any widths -> scalar.

    Example:
        >>> import torch
        >>> x = torch.randn(5, 3)
        >>> round(SimilarityPreserving()(7 * x, x).item(), 6)
        0.0
    """

    def forward(
        self, student: torch.Tensor, teacher: torch.Tensor, targets: torch.Tensor | None = None
    ) -> torch.Tensor:
        student, teacher = _flat_pair(student, self.teacher_side(teacher), "SimilarityPreserving")
        gram_s, gram_t = (F.normalize(x @ x.T, p=2, dim=1) for x in (student, teacher))
        return (gram_s - gram_t).pow(2).sum() / len(student) ** 2


class PKT(Term):
    """Probabilistic knowledge transfer: KL between cosine-similarity distributions of the batch.

    ``K_ij = (1 + cos(x_i, x_j)) / 2``, ``P_ij = K_ij / Σ_j K_ij`` for each side; the loss is
    ``mean over all (i, j) of P^t_ij · log((P^t_ij + ε) / (P^s_ij + ε))``, ε = 1e-7 — the authors' code,
    which is ``(1/n) · mean_i KL(P^t_i ‖ P^s_i)``. Passalis & Tefas (2018), "Learning Deep Representations
    with Probabilistic Knowledge Transfer", https://arxiv.org/abs/1803.10837.
    Shapes: ``[n, ...]`` on each side, any widths -> scalar.

    Example:
        >>> import torch
        >>> x = torch.randn(5, 3)
        >>> PKT()(x, x.clone()).item()
        0.0
    """

    def __init__(self, eps: float = 1e-7, teacher_detach: bool = True) -> None:
        super().__init__(teacher_detach)
        self.eps = eps

    def forward(
        self, student: torch.Tensor, teacher: torch.Tensor, targets: torch.Tensor | None = None
    ) -> torch.Tensor:
        student, teacher = _flat_pair(student, self.teacher_side(teacher), "PKT")
        probabilities = []
        for features in (student, teacher):
            unit = F.normalize(features, p=2, dim=1)
            kernel = (unit @ unit.T + 1) / 2
            probabilities.append(kernel / kernel.sum(dim=1, keepdim=True))
        p_s, p_t = probabilities
        return (p_t * torch.log((p_t + self.eps) / (p_s + self.eps))).mean()

    def extra_repr(self) -> str:
        return f"eps={self.eps}"
