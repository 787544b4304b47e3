"""Differentiable distillation terms, one calling convention: ``term(student, teacher, targets=None)``.

``student`` and ``teacher`` are that term's tensors for one batch (logits, or features of named layers);
the teacher side is detached inside the term; the result is a scalar tensor. Terms compose by addition
with weights, in the ``Distiller`` or in any loop of your own. See ``docs/losses.md`` for the table.

Example:
    >>> import torch
    >>> from workbench.losses import KD, CKALoss
    >>> student, teacher = torch.randn(8, 10, requires_grad=True), torch.randn(8, 10)
    >>> loss = KD(T=4.0)(student, teacher) + 0.5 * CKALoss()(student, teacher)
    >>> loss.backward(); student.grad.shape
    torch.Size([8, 10])
"""
from workbench.losses.base import IGNORE_INDEX, ProjectedTerm, Term
from workbench.losses.cka import CKALoss
from workbench.losses.dist import DIST
from workbench.losses.dkd import DKD
from workbench.losses.features import AttentionTransfer, CosineHint, FitNet, NormDirection, class_means
from workbench.losses.logits import KD, JensenShannon, ReverseKL
from workbench.losses.ofa import OFABranch, OFALoss, OFASetup, ofa_terms
from workbench.losses.projectors import Projector, make_projector
from workbench.losses.relations import PKT, RKD, SimilarityPreserving
from workbench.losses.taid import TAID

__all__ = [
    "AttentionTransfer",
    "CKALoss",
    "CosineHint",
    "DIST",
    "DKD",
    "FitNet",
    "IGNORE_INDEX",
    "JensenShannon",
    "KD",
    "NormDirection",
    "OFABranch",
    "OFALoss",
    "OFASetup",
    "PKT",
    "ProjectedTerm",
    "Projector",
    "RKD",
    "ReverseKL",
    "SimilarityPreserving",
    "TAID",
    "Term",
    "class_means",
    "make_projector",
    "ofa_terms",
]
