"""The Distiller: a frozen teacher, a student and weighted loss terms, read through ``workbench.capture``.

It is the only place that knows about models, hooks and weights together: a term is a plain
``term(student, teacher, targets=None) -> scalar`` module and gets either both models' logits or the
features of one named (teacher layer, student layer) pair. Term parameters (projectors) are
student-side and trainable; they are part of :meth:`Distiller.state_dict` (training checkpoints) and
left out of :meth:`Distiller.export_student`. The teacher is kept out of ``parameters()``,
``state_dict()`` and DDP, but moves with ``.to()``.
"""
from __future__ import annotations

import math
import numbers
import os
import warnings
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from torch import nn

from workbench.batches import (
    cross_entropy, inputs_of, logits_of, prediction_targets, resolve_shift, run_model, targets_of, to_device,
    token_mask, token_rows,
)
from workbench.capture import capture, resolve_layers

__all__ = ["Distiller"]

# History columns fit writes; a term may not take one of these names.
RESERVED_NAMES = ("ce", "loss", "epoch", "step", "lr", "eval_accuracy")
# In a ``layers`` pair, this word stands for the model's logits instead of a layer.
LOGITS = "logits"
TermSpec = nn.Module | tuple[nn.Module, float]


def check_weight(name: str, weight: Any) -> float:
    """``weight`` as a float, or a ``ValueError`` naming ``name`` unless it is a finite real number."""
    if isinstance(weight, torch.Tensor) and weight.numel() == 1:
        weight = weight.item()
    if isinstance(weight, bool) or not isinstance(weight, numbers.Real) or not math.isfinite(float(weight)):
        raise ValueError(f"the weight of {name} must be a finite number, got {weight!r}")
    return float(weight)


@contextmanager
def eval_mode(module: nn.Module) -> Iterator[None]:
    """Eval mode inside the block; each module gets its own flag back, new modules the root's."""
    flags = {sub: sub.training for sub in module.modules()}
    root_mode = module.training
    try:
        module.eval()
        yield
    finally:
        for sub in module.modules():
            sub.training = flags.get(sub, root_mode)


class Distiller(nn.Module):
    """Teacher + student + weighted terms: ``total = ce_weight · CE + Σ weight_i · term_i``.

    ``terms`` maps a name to ``(term, weight)`` (or a bare term, weight 1). A term named in ``layers``
    gets the features of ``layers[name] = (teacher_layer, student_layer)`` (exact names, or a glob /
    selector that picks exactly one layer), captured with :func:`workbench.capture`; the others get
    both models' logits. Either side may be :attr:`Distiller.LOGITS` (the word ``"logits"``) for that
    model's logits instead of a layer: ``("logits", "blocks.0")`` calls
    ``term(student_features_at_blocks.0, teacher_logits, targets)``; ``("logits", "logits")`` is a plain
    logit term. The word always means the logits; a module literally named ``logits`` is reached with
    the glob ``"logit[s]"`` (a warning says so when a model has one). Cross-entropy on the labels is added with
    ``ce_weight`` (0 turns it off; the value is still logged when batches carry labels), with
    ``label_smoothing`` (0 by default; OFA-KD's recipe, :func:`workbench.losses.ofa_terms`, uses 0.1).
    The teacher is frozen (``requires_grad=False``), put in eval mode (with a warning when it was training) and run under ``no_grad``.

    Language models (batches read by :mod:`workbench.batches`): a dict batch reaches both models whole,
    minus its labels (``attention_mask``, ``token_type_ids``, … included). Padding is not a sample: token
    logits ``[n, t, V]`` and token features ``[n, t, d]`` keep only the unpadded positions (the
    ``attention_mask``) before a term is called, so KD / reverse KL / JS and hints are means over
    unpadded tokens; with token labels, logit terms get the labels aligned with each position's
    prediction and skip positions whose label is -100. Cross-entropy on token logits skips padding and
    -100 and is shifted by one position for causal LMs (position t predicts token t + 1, as Hugging Face's
    loss): ``shift_labels=None`` detects a causal LM from the student's config
    (:func:`workbench.batches.is_causal_lm`), ``True`` / ``False`` choose. KD needs no shift: both models
    predict the next token at t. A model output without logits (a headless ``GPT2Model``) is refused by
    logit terms and cross-entropy with a ``TypeError`` naming the model; feature terms still run.

    Projectors that terms create lazily are built from one batch by :meth:`build` (or ``example=``
    at construction); :func:`workbench.train.fit` calls it before it makes the optimizer, so the
    optimizer holds them. :meth:`trainable_parameters` refuses to answer before that.

    :meth:`step` returns ``(total, parts)``: ``total`` a differentiable scalar, ``parts`` the
    *unweighted* value of each term (and ``"ce"``) as a detached 0-dim tensor — no host sync, call
    ``float()`` yourself. Weights can be changed between steps with :meth:`set_weight` (warm-ups).

    Example:
        >>> import torch
        >>> from torch import nn
        >>> from workbench.losses import KD, FitNet
        >>> teacher = nn.Sequential(nn.Linear(4, 16), nn.ReLU(), nn.Linear(16, 3)).eval()
        >>> student = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3))
        >>> batch = (torch.randn(6, 4), torch.tensor([0, 1, 2, 0, 1, 2]))
        >>> distiller = Distiller(teacher, student, {"kd": (KD(T=4), 1.0), "hint": (FitNet(), 0.5)},
        ...                       layers={"hint": ("1", "1")}, example=batch)
        >>> total, parts = distiller.step(batch)
        >>> sorted(parts), total.requires_grad
        (['ce', 'hint', 'kd'], True)
        >>> len(distiller.trainable_parameters())  # 4 student tensors + the hint projector's weight and bias
        6
    """

    LOGITS = LOGITS

    def __init__(
        self,
        teacher: nn.Module,
        student: nn.Module,
        terms: Mapping[str, TermSpec],
        layers: Mapping[str, tuple[str, str]] | None = None,
        ce_weight: float = 1.0,
        *,
        shift_labels: bool | None = None,
        label_smoothing: float = 0.0,
        example: Any = None,
    ) -> None:
        super().__init__()
        if not isinstance(teacher, nn.Module) or not isinstance(student, nn.Module):
            raise TypeError("teacher and student must be torch.nn.Module instances")
        if teacher is student:
            raise ValueError("teacher and student are the same module; for self-distillation pass a frozen copy "
                             "(copy.deepcopy(student)) as the teacher")
        self.student = student
        self.__dict__["_teacher"] = teacher  # not a submodule: out of parameters(), state_dict() and DDP
        self.freeze_teacher()
        self.ce_weight = check_weight("ce_weight", ce_weight)
        self.label_smoothing = check_weight("label_smoothing", label_smoothing)
        if not 0 <= self.label_smoothing < 1:
            raise ValueError(f"label_smoothing must be in [0, 1), got {label_smoothing!r}")
        self.shift_labels = resolve_shift(student, shift_labels)
        self.terms = nn.ModuleDict()
        self.weights: dict[str, float] = {}
        for name, spec in dict(terms).items():
            term, weight = spec if isinstance(spec, tuple) else (spec, 1.0)
            self._check_name(name)
            if not isinstance(term, nn.Module):
                raise TypeError(
                    f"term {name!r} must be an nn.Module called term(student, teacher, targets=None), got "
                    f"{type(term).__name__}; subclass workbench.losses.Term (see docs/distiller.md)"
                )
            self.weights[name] = check_weight(f"term {name!r}", weight)
            self.terms[name] = term
        if not self.terms and self.ce_weight == 0:
            raise ValueError("nothing to train: no terms and ce_weight=0")
        self.layers = self._resolve_pairs(dict(layers or {}))
        self._check_class_counts()
        if example is not None:
            self.build(example)

    # -- construction checks ---------------------------------------------------------------------
    @property
    def teacher(self) -> nn.Module:
        """The frozen teacher (fixed at construction)."""
        return self.__dict__["_teacher"]

    def _check_name(self, name: Any) -> None:
        if not isinstance(name, str) or not name or "." in name:
            raise ValueError(f"term names must be non-empty strings without dots, got {name!r}")
        if name in RESERVED_NAMES:
            raise ValueError(f"term name {name!r} is reserved (history columns: {RESERVED_NAMES}); pick another")

    def _resolve_pairs(self, layers: dict[str, Any]) -> dict[str, tuple[str, str]]:
        unknown = [name for name in layers if name not in self.terms]
        if unknown:
            raise ValueError(f"layers names terms that do not exist: {unknown}; the terms are {list(self.terms)}")
        pairs = {}
        self.logit_flags: dict[str, tuple[bool, bool]] = {}  # (teacher side, student side) are logits
        for name, pair in layers.items():
            if not (isinstance(pair, (tuple, list)) and len(pair) == 2 and all(isinstance(p, str) for p in pair)):
                raise ValueError(f"layers[{name!r}] must be a (teacher_layer, student_layer) pair of names, got {pair!r}")
            sides = (("teacher", self.teacher, pair[0]), ("student", self.student, pair[1]))
            for role, model, selector in sides:
                if selector == LOGITS and LOGITS in dict(model.named_modules()):
                    warnings.warn(
                        f"layers[{name!r}]: {role} side {LOGITS!r} means the {role}'s logits (the model's "
                        f"output), not its module named {LOGITS!r}; write 'logit[s]' for that module",
                        stacklevel=3,
                    )
            if pair[0] == LOGITS and pair[1] == LOGITS:
                continue  # both sides logits: a plain logit term
            resolved = []
            for role, model, selector in sides:
                if selector == LOGITS:
                    resolved.append(LOGITS)
                    continue
                try:
                    names = resolve_layers(model, selector)
                except KeyError as error:
                    raise KeyError(f"layers[{name!r}], {role} side: {error.args[0]}") from None
                if len(names) != 1:
                    raise ValueError(
                        f"layers[{name!r}]: the {role} selector {selector!r} picks {len(names)} layers {names}; "
                        "a term takes one (teacher, student) pair — add one term per pair"
                    )
                resolved.append(names[0])
            pairs[name] = (resolved[0], resolved[1])
            self.logit_flags[name] = (pair[0] == LOGITS, pair[1] == LOGITS)
        return pairs

    def logit_terms(self) -> list[str]:
        """Names of the terms that compare logits (those without a ``layers`` entry)."""
        return [name for name in self.terms if name not in self.layers]

    def _logit_side(self, side: int) -> list[str]:
        """Terms that read the logits on ``side`` (0 teacher, 1 student): logit terms and mixed terms."""
        return [name for name in self.terms if name not in self.layers or self.logit_flags[name][side]]

    def _check_class_counts(self, student_classes: int | None = None, teacher_classes: int | None = None) -> None:
        student_classes = student_classes or getattr(self.student, "num_classes", None)
        teacher_classes = teacher_classes or getattr(self.teacher, "num_classes", None)
        logit_terms = self.logit_terms()
        if logit_terms and isinstance(student_classes, int) and isinstance(teacher_classes, int):
            if student_classes != teacher_classes:
                raise ValueError(
                    f"logit terms {logit_terms} compare the two models' logits, but the student has "
                    f"{student_classes} classes and the teacher has {teacher_classes}; give them the same "
                    "classes or distil features only (put those terms in layers=)"
                )

    def freeze_teacher(self) -> None:
        """``requires_grad=False`` on every teacher parameter; eval mode, with a warning if it was training."""
        self.teacher.requires_grad_(False)
        if self.teacher.training:
            warnings.warn(
                f"the teacher ({type(self.teacher).__name__}) was in train mode; the Distiller put it in eval "
                "mode so BatchNorm statistics and dropout stay fixed",
                stacklevel=3,
            )
            self.teacher.eval()

    def set_weight(self, name: str, weight: float) -> None:
        """Change the weight of term ``name`` (or ``"ce"``) from the next step on, e.g. in a warm-up callback."""
        if name == "ce":
            self.ce_weight = check_weight("ce_weight", weight)
        elif name in self.weights:
            self.weights[name] = check_weight(f"term {name!r}", weight)
        else:
            raise KeyError(f"no term named {name!r}; the terms are {['ce', *self.terms]}")

    # -- parameters and devices ------------------------------------------------------------------
    def unbuilt_terms(self) -> list[str]:
        """Terms that still create parameters on first use (a lazy projector, a lazy module)."""
        unbuilt = []
        for name, term in self.terms.items():
            lazy = any(isinstance(p, nn.parameter.UninitializedParameter) for p in term.parameters())
            if lazy or any("projector" in m._modules and m._modules["projector"] is None for m in term.modules()):
                unbuilt.append(name)
        return unbuilt

    @torch.no_grad()
    def build(self, batch: Any) -> Distiller:
        """Run one batch (eval mode, no gradients) so lazy projectors exist before the optimizer is made.

        Also checks the whole pipeline (layers run, class counts) on real data. BatchNorm statistics
        are not touched. Returns ``self``.
        """
        with eval_mode(self):
            self(batch)
        return self

    def trainable_parameters(self) -> list[nn.Parameter]:
        """The parameters to optimise: the student's, then the terms' (projectors), ``requires_grad`` only."""
        unbuilt = self.unbuilt_terms()
        if unbuilt:
            raise RuntimeError(
                f"terms {unbuilt} create their projectors on first use; call distiller.build(batch) (or pass "
                "example=batch to Distiller) before making the optimizer, so that it holds them"
            )
        return [p for p in self.parameters() if p.requires_grad]

    def _apply(self, fn: Any, recurse: bool = True) -> Distiller:
        super()._apply(fn, recurse)
        self.teacher._apply(fn, recurse)  # .to(), .cuda(), .double() move the teacher too
        return self

    def _device(self) -> torch.device:
        parameter = next(self.student.parameters(), None)
        return parameter.device if parameter is not None else torch.device("cpu")

    # -- the loss --------------------------------------------------------------------------------
    def _run(self, model: nn.Module, role: str, layers: list[str], inputs: Any, keep_graph: bool) -> tuple[Any, dict]:
        with capture(model, layers, detach=not keep_graph) as activations:
            output = run_model(model, inputs)
            missing = [name for name in layers if name not in activations]
            if missing:
                raise RuntimeError(f"{role} layers {missing} did not run in the forward pass; choose layers that do")
            return output, {name: activations[name] for name in layers}

    def _logit_rows(
        self, student: torch.Tensor, teacher: torch.Tensor, targets: torch.Tensor | None, mask: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """Token logits ``[n, t, C]``: the unpadded positions as rows, labels aligned with their predictions."""
        if student.dim() < 3:  # one prediction per sample (images, sequence classification)
            return student, teacher, targets
        if targets is not None and targets.dim() >= 2:
            targets = prediction_targets(targets, mask, self.shift_labels)
        if mask is None or student.shape[:2] != mask.shape:
            return student, teacher, targets
        if targets is not None and targets.shape == mask.shape:
            targets = targets[mask]
        return token_rows(student, mask), token_rows(teacher, mask), targets

    def forward(self, batch: Any) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Same as :meth:`step` (so DDP can wrap the distiller)."""
        device = self._device()
        inputs = to_device(inputs_of(batch), device)
        mask = token_mask(inputs)  # None for tensor and (x, y) batches: the vision path does nothing more
        targets = targets_of(batch)
        if targets is None and self.ce_weight != 0:
            raise ValueError(
                f"ce_weight={self.ce_weight} needs labelled batches ((x, y) or a dict with 'labels'); "
                "pass ce_weight=0 to distil on unlabelled data"
            )
        targets = None if targets is None else targets.to(device)
        if self.teacher.training:
            self.freeze_teacher()
        teacher_layers = sorted({pair[0] for name, pair in self.layers.items() if not self.logit_flags[name][0]})
        student_layers = sorted({pair[1] for name, pair in self.layers.items() if not self.logit_flags[name][1]})
        teacher_features: dict[str, torch.Tensor] = {}
        teacher_output = None
        if self.terms:
            with torch.no_grad():
                teacher_output, teacher_features = self._run(self.teacher, "teacher", teacher_layers, inputs, False)
        student_output, student_features = self._run(self.student, "student", student_layers, inputs, True)
        parts: dict[str, torch.Tensor] = {}
        total: torch.Tensor | None = None
        logit_terms = self.logit_terms()
        student_side, teacher_side = self._logit_side(1), self._logit_side(0)
        student_logits = teacher_logits = None
        if student_side or self.ce_weight != 0 or targets is not None:
            try:
                student_logits = logits_of(student_output, self.student)
            except TypeError:
                if student_side or self.ce_weight != 0:
                    raise
                # a headless student distilled on features only: no logits, so no CE to log
        if teacher_side:
            teacher_logits = logits_of(teacher_output, self.teacher)
        if logit_terms:
            self._check_class_counts(student_logits.shape[-1], teacher_logits.shape[-1])
        if targets is not None and student_logits is not None:
            parts["ce"] = cross_entropy(student_logits, targets, mask=mask, shift=self.shift_labels,
                                        label_smoothing=self.label_smoothing)
            total = self.ce_weight * parts["ce"]  # kept in the graph at weight 0, so DDP sees every parameter
        term_targets = targets
        if student_side or teacher_side:
            # each logit side as the logit terms get it (token rows, labels aligned with the predictions)
            reference = student_logits if student_logits is not None else teacher_logits
            student_logits, teacher_logits, term_targets = self._logit_rows(
                reference if student_logits is None else student_logits,
                reference if teacher_logits is None else teacher_logits, targets, mask,
            )
        for name, term in self.terms.items():
            if name in self.layers:
                teacher_layer, student_layer = self.layers[name]
                teacher_reads_logits, student_reads_logits = self.logit_flags[name]
                mixed = teacher_reads_logits or student_reads_logits
                student_value = student_logits if student_reads_logits else student_features[student_layer]
                teacher_value = teacher_logits if teacher_reads_logits else teacher_features[teacher_layer]
                if mask is not None:
                    student_value, teacher_value = token_rows(student_value, mask), token_rows(teacher_value, mask)
                # a side that is logits has its labels aligned as logit terms do; pure feature terms as before
                value = term(student_value, teacher_value, term_targets if mixed else targets)
            else:
                value = term(student_logits, teacher_logits, term_targets)
            if not isinstance(value, torch.Tensor) or value.dim() != 0:
                shape = tuple(value.shape) if isinstance(value, torch.Tensor) else type(value).__name__
                raise ValueError(f"term {name!r} must return a scalar tensor, got {shape}")
            parts[name] = value
            weighted = self.weights[name] * value
            total = weighted if total is None else total + weighted
        return total, {name: value.detach() for name, value in parts.items()}

    def step(self, batch: Any) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """``(total, parts)`` for one batch; ``total`` differentiable, ``parts`` detached 0-dim tensors.

        ``batch`` is ``(x, y)``, a dict with an input and ``labels``, or inputs alone when
        ``ce_weight=0``; it is moved to the student's device. Call ``total.backward()`` and step your
        optimizer, or let :func:`workbench.train.fit` do it.
        """
        return self(batch)

    def export_student(self, path: str | os.PathLike) -> Path:
        """Save the student's weights only (no projectors, no teacher) as ``.safetensors``; returns the path.

        Example:
            >>> import os, tempfile, torch
            >>> from torch import nn
            >>> from workbench.losses import KD
            >>> distiller = Distiller(nn.Linear(3, 2).eval(), nn.Linear(3, 2), {"kd": KD()})
            >>> path = distiller.export_student(os.path.join(tempfile.mkdtemp(), "student.safetensors"))
            >>> path.name
            'student.safetensors'
        """
        from workbench.models.weights import save_weights

        path = Path(path)
        if path.suffix.lower() != ".safetensors":
            raise ValueError(f"export_student writes safetensors: use a .safetensors path, got {str(path)!r}")
        return save_weights(self.student, path)

    def extra_repr(self) -> str:
        weights = ", ".join(f"{name}={weight:g}" for name, weight in {"ce": self.ce_weight, **self.weights}.items())
        if self.label_smoothing:
            weights += f" (label smoothing {self.label_smoothing:g})"
        layers = f", layers={self.layers}" if self.layers else ""
        return f"teacher={type(self.teacher).__name__} (frozen, not a submodule), weights: {weights}{layers}"
