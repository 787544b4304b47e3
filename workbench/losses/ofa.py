"""OFA-KD (Hao et al. 2023): its loss, the branch terms that carry it to every student stage, and
:func:`ofa_terms`, which sets up the whole method for a :class:`~workbench.train.Distiller`.

OFA-KD hangs a branch (:mod:`workbench.losses.ofa_branches`) on each student stage that projects the
stage into the logit space, and distils every branch and the student's own logits against the teacher's
final logits with :class:`OFALoss`. Only the teacher's logits are read, so the teacher may be any model
that returns logits, of any architecture.
"""
from __future__ import annotations

import numbers
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from workbench.batches import inputs_of, logits_of, run_model, take, to_device
from workbench.capture import LayerSelector, capture, resolve_layers, stage_names
from workbench.losses.base import Term, check_setting, logit_rows
from workbench.losses.ofa_branches import branch_family, make_branch
from workbench.probes.stream import eval_mode

__all__ = ["OFALoss", "OFABranch", "OFASetup", "ofa_terms", "branch_column", "ENHANCE_MODES", "LOGITS"]

ENHANCE_MODES = ("released", "target")
# The Distiller's word for "this side reads the model's logits" (workbench.train.Distiller.LOGITS).
LOGITS = "logits"


class OFALoss(Term):
    """OFA loss: ``−mean_i Σ_c w_i,c · log p_s,c``, the teacher's probabilities re-weighted towards the target.

    With ``p_t = softmax(z_t / T)``, ``log p_s = log_softmax(z_s / T)`` and ``y`` the one-hot target:

    - ``enhance="released"`` (default, the authors' released ``ofa_loss``): ``w_c = (p_t,c + y_c)^γ − y_c``,
      so the non-target probabilities are raised to γ too;
    - ``enhance="target"`` (the paper's text): ``w_y = (p_t,y + 1)^γ − 1`` at the target, ``w_c = p_t,c``
      elsewhere.

    For ``γ = 1`` both are ``w = p_t``: cross-entropy on the teacher's probabilities (KD's KL plus the
    teacher's entropy, a constant). γ > 1 puts more weight on the target class when the teacher is
    unsure of it (the paper uses γ in 1.0–1.5). As in the released code the value is *not* scaled by
    ``T²``. It uses ``log_softmax`` (the released ``log(softmax)`` gives NaN once a probability
    underflows). A class with weight 0 (``-inf`` in the teacher and not the target) takes no part, as in
    :mod:`workbench.losses.logits`; a student ``-inf`` where the weight is positive gives ``+inf``.

    Hao, Guo, Chen, Wang, Yang & Xu (2023), "One-for-All: Bridge the Gap Between Heterogeneous
    Architectures in Knowledge Distillation", NeurIPS, https://arxiv.org/abs/2310.19444.
    Shapes: logits ``[n, C]`` (or ``[n, t, C]``), targets ``[n]`` (or ``[n, t]``, -100 skipped) -> scalar.

    Example:
        >>> import math, torch
        >>> student, teacher = torch.zeros(1, 2), torch.tensor([[0.0, math.log(3.0)]])  # p_t = [1/4, 3/4]
        >>> round(OFALoss(gamma=2.0)(student, teacher, torch.tensor([1])).item(), 4)  # (1/16 + 49/16 − 1)·ln 2
        1.4729
        >>> round(OFALoss(gamma=2.0, enhance="target")(student, teacher, torch.tensor([1])).item(), 4)  # (1/4 + 33/16)·ln 2
        1.6029
    """

    def __init__(
        self, gamma: float = 1.0, T: float = 1.0, enhance: str = "released", teacher_detach: bool = True
    ) -> None:
        super().__init__(teacher_detach)
        self.gamma = check_setting("OFALoss", "gamma", gamma, positive=True)
        self.T = check_setting("OFALoss", "T", T, positive=True)
        if enhance not in ENHANCE_MODES:
            raise ValueError(f"OFALoss: enhance must be one of {ENHANCE_MODES}, got {enhance!r}")
        self.enhance = enhance

    def weights(self, teacher_rows: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """The weights ``w`` ``[r, C]`` of each class's ``−log p_s`` from teacher logit rows and targets ``[r]``."""
        p_t = F.softmax(teacher_rows / self.T, dim=1)
        y = F.one_hot(targets, p_t.shape[1]).to(p_t.dtype)
        if self.enhance == "released":
            return (p_t + y).pow(self.gamma) - y
        return torch.where(y.bool(), (p_t + 1.0).pow(self.gamma) - 1.0, p_t)

    def forward(
        self, student: torch.Tensor, teacher: torch.Tensor, targets: torch.Tensor | None = None
    ) -> torch.Tensor:
        if targets is None:
            raise ValueError("OFALoss needs targets: the class index of each sample, shape [n] (or [n, t])")
        student, teacher, targets = logit_rows(student, self.teacher_side(teacher), targets, "OFALoss",
                                               needs_targets=True)
        w = self.weights(teacher, targets)
        # weight 0 (teacher -inf, not the target): 0 · log p_s is 0 even where log p_s is -inf, with 0 gradient
        log_s = F.log_softmax(student / self.T, dim=1).masked_fill(w == 0, 0.0)
        return -(w * log_s).sum(dim=1).mean()

    def extra_repr(self) -> str:
        return f"gamma={self.gamma}, T={self.T}, enhance={self.enhance!r}"


class OFABranch(Term):
    """A Distiller term: ``loss(branch(student_features), teacher_logits, targets)``.

    ``branch`` (a stage -> logits module, :func:`~workbench.losses.ofa_branches.make_branch`) is trainable:
    it is part of the Distiller's parameters and checkpoints, and not of the exported student. Give it a
    ``("logits", stage)`` layers pair so that it gets the student's stage and the teacher's logits.

    Example:
        >>> import torch
        >>> from workbench.losses.ofa_branches import make_branch
        >>> term = OFABranch(make_branch((4, 8, 8, 8), 1, 2, 3, 16), OFALoss(gamma=1.2))
        >>> value = term(torch.randn(4, 8, 8, 8), torch.randn(4, 3), torch.tensor([0, 1, 2, 0]))
        >>> value.dim(), term.logits(torch.randn(4, 8, 8, 8)).shape
        (0, torch.Size([4, 3]))
    """

    def __init__(self, branch: nn.Module, loss: OFALoss | None = None) -> None:
        super().__init__()
        self.branch = branch
        self.loss = loss if loss is not None else OFALoss()

    def logits(self, features: torch.Tensor) -> torch.Tensor:
        """The branch's logits for one batch of the stage's features."""
        return self.branch(features)

    def forward(
        self, student: torch.Tensor, teacher: torch.Tensor, targets: torch.Tensor | None = None
    ) -> torch.Tensor:
        return self.loss(self.logits(student), teacher, targets)


SETUP_KEYS = ("terms", "layers", "ce_weight", "label_smoothing")
EXAMPLE_SAMPLES = 16  # ofa_terms reads the stage shapes on at most this many samples of its example


@dataclass(frozen=True)
class OFASetup(Mapping):
    """What :func:`ofa_terms` returns: a mapping of the :class:`~workbench.train.Distiller` keywords
    ``terms``, ``layers``, ``ce_weight`` and ``label_smoothing`` (so ``Distiller(teacher, student, **setup)``),
    and, as attributes, the student ``stages`` that carry branches (model order), ``columns`` (stage ->
    term name, the fit history column of its branch loss) and ``final`` (the term on the final logits)."""

    terms: dict[str, tuple[nn.Module, float]]
    layers: dict[str, tuple[str, str]]
    ce_weight: float
    label_smoothing: float
    stages: list[str] = field(default_factory=list)
    columns: dict[str, str] = field(default_factory=dict)
    final: str = "ofa"

    def __getitem__(self, key: str) -> Any:
        if key not in SETUP_KEYS:
            raise KeyError(key)
        return getattr(self, key)

    def __iter__(self) -> Iterator[str]:
        return iter(SETUP_KEYS)

    def __len__(self) -> int:
        return len(SETUP_KEYS)


def _per_stage(name: str, value: Any, count: int, positive: bool) -> list[float]:
    """``value`` (a number, or a sequence of ``count`` numbers) as ``count`` checked floats."""
    if isinstance(value, numbers.Real) or (isinstance(value, torch.Tensor) and value.numel() == 1):
        values = [value] * count
    elif isinstance(value, Sequence) and not isinstance(value, str):
        values = list(value)
        if len(values) != count:
            raise ValueError(f"ofa_terms: {name} has {len(values)} values; give one number or {count}")
    else:
        raise ValueError(f"ofa_terms: {name} must be a number or a sequence of {count} numbers, got {value!r}")
    return [check_setting("ofa_terms", name, item, positive=positive) for item in values]


def branch_column(layer: str) -> str:
    """The term name (fit history column) of the branch on student ``layer``: dots become ``_``.

    Example:
        >>> branch_column("blocks.0")
        'ofa@blocks_0'
    """
    return "ofa@" + layer.replace(".", "_")


def _width(model: nn.Module) -> int | None:
    """A model's pre-logit feature width when it says so (timm's ``num_features``)."""
    width = getattr(model, "num_features", None)
    return width if isinstance(width, int) and not isinstance(width, bool) and width > 0 else None


def _stage_shapes(student: nn.Module, layers: list[str], example: Any) -> tuple[dict[str, tuple[int, ...]], Any]:
    """Each layer's output shape and the student's logits on ``example`` (eval mode, no grad, modes restored)."""
    parameter = next(student.parameters(), None)
    device = parameter.device if parameter is not None else torch.device("cpu")
    inputs = to_device(take(inputs_of(example), EXAMPLE_SAMPLES), device)
    with eval_mode(student), torch.no_grad(), capture(student, layers) as activations:
        output = run_model(student, inputs)
        missing = [name for name in layers if name not in activations]
        if missing:
            raise RuntimeError(f"ofa_terms: student layers {missing} did not run in the forward pass")
        return {name: tuple(activations[name].shape) for name in layers}, output


def ofa_terms(
    teacher: nn.Module,
    student: nn.Module,
    example: Any,
    stages: LayerSelector = "stages",
    *,
    gamma: float | Sequence[float] = 1.0,
    T: float = 1.0,
    enhance: str = "released",
    ce_weight: float = 1.0,
    kd_weight: float = 1.0,
    ofa_weight: float | Sequence[float] = 1.0,
    label_smoothing: float = 0.1,
    family: str | None = None,
    teacher_width: int | None = None,
    num_classes: int | None = None,
    target_grid: int = 4,
    seed: int | None = None,
) -> OFASetup:
    """OFA-KD for any teacher/student pair, as :class:`~workbench.train.Distiller` keywords:
    ``total = ce_weight · CE(label_smoothing) + kd_weight · L(final student logits)
    + Σ_stages ofa_weight_i · L(branch_i logits)``, every ``L`` an :class:`OFALoss` against the teacher's
    final logits.

    ``example``: a batch (``(x, y)`` or inputs; its first 16 samples are used) run through the student to
    find each stage's output shape and the class count. ``stages``: the student layers that get a branch — ``"stages"`` (its
    ``feature_info`` / heuristic stages), names or globs. A branch at stage ``i`` of the student's ``S``
    stages is built by :func:`~workbench.losses.ofa_branches.make_branch` (when ``stages`` are other layers,
    ``i`` and ``S`` count the chosen layers). ``family`` forces ``"cnn"`` or ``"tokens"`` branches (default:
    from each stage's shape). The CNN branch ends in ``max(d_student, d_teacher)`` channels:
    ``d_student`` is the student's ``num_features`` (else its last stage's width), ``d_teacher``
    ``teacher_width`` or the teacher's ``num_features`` (else ignored) — teacher features are never read.
    ``gamma``: one γ, or ``len(stages) + 1`` (the last for the final logits, as the authors'
    ``--ofa-eps``); ``ofa_weight``: one weight or one per stage. ``seed``: the branches' initial weights
    (``None``: the global random stream). Term names: ``"ofa"`` and ``"ofa@<stage>"`` (dots as ``_``).

    Example:
        >>> import torch
        >>> from workbench import models
        >>> from workbench.train import Distiller
        >>> teacher = models.create("cnn", img_size=16).eval()
        >>> student = models.create("vit", img_size=16, patch_size=4, depth=2)
        >>> batch = (torch.randn(8, 1, 16, 16), torch.randint(0, 10, (8,)))
        >>> setup = ofa_terms(teacher, student, batch, gamma=1.2)
        >>> setup.stages, sorted(setup)
        (['blocks.0', 'blocks.1'], ['ce_weight', 'label_smoothing', 'layers', 'terms'])
        >>> distiller = Distiller(teacher, student, **setup)
        >>> total, parts = distiller.step(batch)
        >>> sorted(parts)
        ['ce', 'ofa', 'ofa@blocks_0', 'ofa@blocks_1']
    """
    if not isinstance(teacher, nn.Module) or not isinstance(student, nn.Module):
        raise TypeError("ofa_terms: teacher and student must be torch.nn.Module instances")
    layers = resolve_layers(student, stages)
    if not layers:
        raise ValueError(f"ofa_terms: stages={stages!r} selects no student layer")
    all_stages = stage_names(student)
    if all(layer in all_stages for layer in layers):
        positions, count = [all_stages.index(layer) + 1 for layer in layers], len(all_stages)
    else:
        positions, count = list(range(1, len(layers) + 1)), len(layers)
    gammas = _per_stage("gamma", gamma, len(layers) + 1, positive=True)
    weights = _per_stage("ofa_weight", ofa_weight, len(layers), positive=False)
    smoothing = check_setting("ofa_terms", "label_smoothing", label_smoothing)
    if smoothing >= 1:
        raise ValueError(f"ofa_terms: label_smoothing must be in [0, 1), got {label_smoothing!r}")
    last = all_stages[-1] if all_stages else layers[-1]  # its width is d_student without num_features
    shapes, output = _stage_shapes(student, list(dict.fromkeys([*layers, last])), example)
    classes = num_classes if num_classes is not None else logits_of(output, student).shape[-1]
    student_width = _width(student)
    if student_width is None:  # the width of the student's last stage: channels of a map, else the last dim
        student_width = shapes[last][1] if len(shapes[last]) == 4 else shapes[last][-1]
    width_t = teacher_width if teacher_width is not None else _width(teacher)
    terms: dict[str, tuple[nn.Module, float]] = {
        "ofa": (OFALoss(gamma=gammas[-1], T=T, enhance=enhance), check_setting("ofa_terms", "kd_weight", kd_weight))
    }
    pairs, columns = {}, {}
    with torch.random.fork_rng(devices=[]):
        if seed is not None:
            torch.manual_seed(seed)
        for layer, position, gamma_i, weight in zip(layers, positions, gammas, weights):
            shape = shapes[layer]
            cnn = branch_family(shape, family, layer) == "cnn"
            width = max(student_width, width_t or 0) if cnn else student_width
            branch = make_branch(shape, position, count, int(classes), int(width), family=family,
                                 prefix=getattr(student, "num_prefix_tokens", None), target_grid=target_grid,
                                 layer=layer)
            column = branch_column(layer)
            terms[column] = (OFABranch(branch, OFALoss(gamma=gamma_i, T=T, enhance=enhance)), weight)
            pairs[column] = (LOGITS, layer)
            columns[layer] = column
    parameter = next(student.parameters(), None)
    if parameter is not None:  # the branches live where the student does
        for term, _ in terms.values():
            term.to(parameter.device)
    return OFASetup(terms, pairs, check_setting("ofa_terms", "ce_weight", ce_weight), smoothing, list(layers),
                    columns)
