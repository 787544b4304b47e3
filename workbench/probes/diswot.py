"""DisWOT: which student to distil into, without training (Dong, Li & Wei, CVPR 2023, arXiv 2303.15678).

At random initialisation, a student whose *semantic* maps and *sample relations* resemble the teacher's
tends to distil better. For a batch of B labelled samples, each network contributes:

- **relation** — the B×B Gram matrix of its per-sample flattened features at one layer (by default its last
  stage: the last feature map before pooling), each row L2-normalised: ``Ĝ``. The relation distance is
  ``M_r = ‖Ĝ_T − Ĝ_S‖²_F / B²``.
- **semantic**, in two variants:

  * ``"gradcam"`` (width-agnostic): Grad-CAM maps (captum ``LayerGradCam``, the labelled class, the same layer)
    resized to a common grid, flattened, and compared exactly as the relation term: ``M_s = ‖Â_T − Â_S‖²_F /
    B²`` with ``Â`` the row-normalised B×B Gram of the maps;
  * ``"released"`` (the authors' released code): after one cross-entropy backward, the gradient ``g`` of the
    classifier weight (K classes × C channels); per class the C×C outer product ``g_k g_kᵀ``, rows
    L2-normalised; ``M_s = Σ_k ‖Ĝ_T,k − Ĝ_S,k‖²_F / (K·C)``. It needs the same classifier input width C in
    both networks.

The DisWOT **score** is ``−(M_s + M_r)``: higher is closer to the teacher. Both networks are re-drawn by
default from the paper's Gaussian initialisation (:func:`gaussian_init`: N(0, 1) convolution and linear
weights, zero biases, normalisation layers (1, 0)) and run in train mode (batch statistics), on copies — the
models passed in are never changed. ``trained_teacher=True`` keeps the teacher's own weights and runs it in
eval mode.

:func:`search` scores many candidate students (a list of model specs, or a generated
:class:`~workbench.probes.student_search.SearchSpace` searched by aging evolution), beside cheap baselines
(parameters, FLOPs, :mod:`workbench.probes.zero_cost` proxies), into a
:class:`~workbench.probes.student_search.SearchResult`.
"""
from __future__ import annotations

import copy
import math
import time
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from workbench.batches import inputs_of, logits_of, run_model, targets_of, to_device
from workbench.capture import capture
from workbench.data import as_loader
from workbench.devices import resolve_device
from workbench.models import count_flops, count_parameters
from workbench.probes import attribution
from workbench.probes.result_io import check_int
from workbench.probes.student_search import (
    Candidate, SearchResult, SearchSpace, aging_evolution, describe_space, exhaustive, parse_candidates, seeded,
)
from workbench.probes.zero_cost import PROXIES

__all__ = ["DisWOTScore", "Signature", "gaussian_init", "classifier_of", "semantic_layer", "signature", "score",
           "search", "SEMANTIC", "TERMS"]

SEMANTIC = ("gradcam", "released")
"""The semantic term's variants: Grad-CAM map relations (any widths) and the released classifier-gradient term."""
TERMS = ("relation", "semantic_gradcam", "semantic_released")
"""DisWOT's distances, as a search result names them (lower is closer to the teacher)."""
_NORMS = (nn.modules.batchnorm._NormBase, nn.GroupNorm, nn.LayerNorm)
_WEIGHTED = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)


def gaussian_init(model: nn.Module, generator: torch.Generator | None = None) -> nn.Module:
    """Re-draw ``model``'s weights in place as DisWOT does: every convolution and linear weight from N(0, 1),
    their biases zero, every batch / group / layer norm weight 1 and bias 0; returns ``model``. Other
    parameters (a ViT's position embedding and class token) keep their values.

    Example:
        >>> import torch
        >>> from torch import nn
        >>> net = nn.Sequential(nn.Conv2d(1, 64, 3), nn.BatchNorm2d(64))
        >>> net = gaussian_init(net, torch.Generator().manual_seed(0))
        >>> round(net[0].weight.std().item(), 1), net[0].bias.abs().max().item(), net[1].weight.min().item()
        (1.0, 0.0, 1.0)
    """
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, _WEIGHTED):
                module.weight.copy_(torch.randn(module.weight.shape, generator=generator))
                if module.bias is not None:
                    module.bias.zero_()
            elif isinstance(module, _NORMS) and getattr(module, "weight", None) is not None:
                module.weight.fill_(1.0)
                if module.bias is not None:
                    module.bias.zero_()
    return model


def classifier_of(model: nn.Module) -> nn.Linear:
    """The final linear classifier: timm's ``get_classifier()``, else a ``head`` / ``fc`` / ``classifier``
    linear module, else the last ``nn.Linear`` registered.

    Example:
        >>> from workbench import models
        >>> classifier_of(models.create("cnn", widths=(8, 16))).in_features
        16
    """
    found = model.get_classifier() if hasattr(model, "get_classifier") else None
    for name in ("head", "fc", "classifier"):
        if not isinstance(found, nn.Linear):
            found = getattr(model, name, None)
    if not isinstance(found, nn.Linear):
        linears = [module for module in model.modules() if isinstance(module, nn.Linear)]
        found = linears[-1] if linears else None
    if not isinstance(found, nn.Linear):
        raise ValueError(f"{type(model).__name__} has no linear classifier: DisWOT's released semantic term reads "
                         "its weight gradient; use semantic='gradcam'")
    return found


def _normalised_gram(rows: torch.Tensor) -> torch.Tensor:
    """``G = X Xᵀ`` of per-sample rows, each row of G L2-normalised (float64)."""
    rows = rows.flatten(1).double()
    return F.normalize(rows @ rows.T, dim=1)


@dataclass
class Signature:
    """What one network contributes to DisWOT on one batch: the row-normalised relation Gram (B×B), the
    row-normalised Gram of its Grad-CAM maps (B×B), and the normalised per-class classifier-gradient outer
    products (K×C×C; None when not asked for)."""

    relation: torch.Tensor
    gradcam: torch.Tensor
    released: torch.Tensor | None


def semantic_layer(model: nn.Module, layer: str = "last") -> str:
    """Where the Grad-CAM term reads ``model``: ``layer`` resolved (``"last"``: the last stage), except in a
    class-token network (timm ``global_pool="token"``) whose head reads the class token only — its last
    block's patch tokens get no gradient — where it is that block's ``norm1`` (the input of its attention,
    through which the patches reach the class token), as Grad-CAM is usually taken on a ViT.

    Example:
        >>> from workbench import models
        >>> semantic_layer(models.create("cnn", widths=(8, 16))), semantic_layer(models.create("vit", depth=2))
        ('blocks.1', 'blocks.1.norm1')
    """
    name = attribution.resolve_layer(model, layer)
    if getattr(model, "global_pool", None) == "token" and getattr(model, "num_prefix_tokens", 0):
        module = model.get_submodule(name)
        if isinstance(getattr(module, "norm1", None), nn.Module):
            return f"{name}.norm1"
    return name


def signature(model: nn.Module, batch: Any, *, layer: str = "last", grid: tuple[int, int] | None = None,
              released: bool = True) -> Signature:
    """One network's :class:`Signature` on ``batch`` (``(x, y)``), in the model's current mode and weights (the
    caller chooses them: :func:`score` uses a Gaussian-initialised copy in train mode). ``layer``: a module
    name, or ``"last"`` for the last stage (the Grad-CAM term reads :func:`semantic_layer` of it); ``grid``:
    the Grad-CAM maps' common size (default: the input's). Grad-CAM maps that are all zero for the whole
    batch (no gradient reaches the layer) make the Grad-CAM Gram NaN, with a warning.

    Example:
        >>> import torch
        >>> from workbench import models
        >>> x, y = torch.randn(6, 1, 16, 16), torch.randint(0, 10, (6,))
        >>> sig = signature(models.create("cnn", widths=(8, 16), img_size=16), (x, y))
        >>> tuple(sig.relation.shape), tuple(sig.gradcam.shape), tuple(sig.released.shape)
        ((6, 6), (6, 6), (10, 16, 16))
    """
    x, y = _labelled(batch)
    cam_layer = semantic_layer(model, layer)
    layer = attribution.resolve_layer(model, layer)
    grid = tuple(grid) if grid is not None else tuple(x.shape[-2:])
    with capture(model, [layer, cam_layer]) as activations:
        logits = logits_of(run_model(model, x), model)
        features, spatial = activations[layer], activations[cam_layer].dim() in (3, 4)
    relation = _normalised_gram(features)
    maps = attribution.gradcam_maps(model, x, y, cam_layer, size=grid) if spatial else None
    if maps is None or not bool(maps.abs().max() > 0):
        why = ("gives no spatial map or tokens (a Grad-CAM map needs [n, c, h, w] or [n, tokens, d])" if maps is None
               else "has all-zero maps (no gradient reaches it from the labelled class)")
        warnings.warn(f"DisWOT: {type(model).__name__} at {cam_layer!r} {why}; its Grad-CAM term is NaN",
                      RuntimeWarning, stacklevel=2)
        gradcam = torch.full((len(x), len(x)), math.nan, dtype=torch.float64, device=features.device)
    else:
        gradcam = _normalised_gram(maps)
    outer = None
    if released:
        weight = classifier_of(model).weight
        grad, = torch.autograd.grad(F.cross_entropy(logits, y), [weight])
        grad = grad.double()
        outer = F.normalize(grad[:, :, None] * grad[:, None, :], dim=2)
    return Signature(relation=relation, gradcam=gradcam, released=outer)


def _labelled(batch: Any) -> tuple[torch.Tensor, torch.Tensor]:
    x, y = inputs_of(batch), targets_of(batch)
    if not isinstance(x, torch.Tensor) or y is None:
        raise TypeError("DisWOT needs labelled image batches (x, y): the semantic term follows the labelled class")
    return x, y.long()


def _gram_distance(teacher: torch.Tensor, student: torch.Tensor) -> float:
    return float(((teacher - student) ** 2).sum() / teacher.shape[0] ** 2)


def _released_distance(teacher: torch.Tensor | None, student: torch.Tensor | None) -> float:
    if teacher is None or student is None or teacher.shape != student.shape:  # other classifier widths
        return math.nan
    classes, channels = teacher.shape[:2]
    return float(((teacher - student) ** 2).sum() / (classes * channels))


@dataclass
class DisWOTScore:
    """DisWOT's terms for one teacher–student pair, averaged over ``n_batches`` batches (``n_samples`` samples):
    ``relation`` (M_r), ``semantic_gradcam`` and ``semantic_released`` (M_s in each variant; NaN where the
    released one cannot be computed), and ``score = −(M_s + M_r)`` with M_s the ``semantic`` variant.

    Example:
        >>> DisWOTScore(score=-0.75, relation=0.5, semantic_gradcam=0.25, semantic_released=float("nan"),
        ...             semantic="gradcam", n_samples=64, n_batches=1).to_dict()["score"]
        -0.75
    """

    score: float
    relation: float
    semantic_gradcam: float
    semantic_released: float
    semantic: str
    n_samples: int
    n_batches: int

    def to_dict(self) -> dict[str, Any]:
        """The fields as a plain dict."""
        return asdict(self)


def _check_semantic(semantic: str) -> str:
    if semantic not in SEMANTIC:
        raise ValueError(f"semantic must be one of {SEMANTIC}, got {semantic!r}")
    return semantic


def _prepared(model: nn.Module, device: torch.device, init: bool, generator_seed: int) -> nn.Module:
    """A copy of ``model`` on ``device``: Gaussian-initialised in train mode, or as trained in eval mode."""
    clone = copy.deepcopy(model).to(device).requires_grad_(True)  # a frozen teacher still gives gradients
    if init:
        gaussian_init(clone, torch.Generator().manual_seed(generator_seed))  # CPU draws, copied to the device
        return clone.train()
    return clone.eval()


def _batches(data: Any, batch_size: int, batches: int, device: torch.device) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The first ``batches`` labelled batches of ``data`` (a ``(x, y)`` pair, a Dataset or a DataLoader)."""
    batches = check_int(batches, "batches", minimum=1)
    loader = as_loader(data, batch_size=check_int(batch_size, "batch_size", minimum=2))
    out = []
    for batch in loader:
        x, y = _labelled(batch)
        if len(x) < 2:
            break
        out.append((to_device(x, device), to_device(y, device)))
        if len(out) == batches:
            break
    if not out:
        raise ValueError("DisWOT needs at least one labelled batch of two or more samples; the data gave none")
    return out


def _signatures(model: nn.Module, batches: Sequence[tuple[torch.Tensor, torch.Tensor]], layer: str) -> list[Signature]:
    return [signature(model, batch, layer=layer, released=True) for batch in batches]


def _terms(teacher: Sequence[Signature], student: Sequence[Signature], semantic: str, n_samples: int) -> DisWOTScore:
    relation = sum(_gram_distance(t.relation, s.relation) for t, s in zip(teacher, student)) / len(teacher)
    gradcam = sum(_gram_distance(t.gradcam, s.gradcam) for t, s in zip(teacher, student)) / len(teacher)
    released = sum(_released_distance(t.released, s.released) for t, s in zip(teacher, student)) / len(teacher)
    chosen = gradcam if semantic == "gradcam" else released
    return DisWOTScore(score=0.0 - (chosen + relation), relation=relation, semantic_gradcam=gradcam,
                       semantic_released=released, semantic=semantic, n_samples=n_samples, n_batches=len(teacher))


def _require_released(teacher: nn.Module, student: nn.Module, label: str = "the student") -> None:
    widths = classifier_of(teacher).in_features, classifier_of(student).in_features
    if widths[0] != widths[1]:
        raise ValueError(f"semantic='released' compares classifier weight gradients, which needs equal classifier "
                         f"input widths; the teacher's is {widths[0]}, {label}'s {widths[1]}. Use "
                         "semantic='gradcam' (Grad-CAM map relations, any widths)")


def score(teacher: nn.Module, student: nn.Module, data: Any, *, semantic: str = "gradcam",
          trained_teacher: bool = False, teacher_layer: str = "last", student_layer: str = "last",
          batch_size: int = 64, batches: int = 1, seed: int = 0, device: Any = "auto") -> DisWOTScore:
    """DisWOT's score of ``student`` for ``teacher`` on the first ``batches`` batches of ``batch_size`` labelled
    samples of ``data`` (a ``(x, y)`` pair, a Dataset or a DataLoader). Both networks are Gaussian-initialised
    copies (seed ``seed``) in train mode unless ``trained_teacher``; the models passed in are not changed.

    Example:
        >>> import torch
        >>> from workbench import models
        >>> _ = torch.manual_seed(0)
        >>> data = (torch.randn(16, 1, 16, 16), torch.randint(0, 10, (16,)))
        >>> teacher = models.create("cnn", widths=(8, 16), img_size=16)
        >>> same = score(teacher, teacher, data, device="cpu")
        >>> same.score, same.relation, same.semantic_released  # a network is its own best student
        (0.0, 0.0, 0.0)
        >>> score(teacher, models.create("cnn", widths=(8,), img_size=16), data, device="cpu").score < 0
        True
    """
    semantic = _check_semantic(semantic)
    if semantic == "released":
        _require_released(teacher, student)
    device = resolve_device(device)
    data_batches = _batches(data, batch_size, batches, device)
    n_samples = sum(len(x) for x, _ in data_batches)
    teacher_copy = _prepared(teacher, device, not trained_teacher, seed)
    student_copy = _prepared(student, device, True, seed)
    return _terms(_signatures(teacher_copy, data_batches, teacher_layer),
                  _signatures(student_copy, data_batches, student_layer), semantic, n_samples)


_CONSTRAINTS = {"parameters": "params", "params": "params", "flops": "flops"}


def _check_constraint(constraint: Mapping[str, Any] | None) -> dict[str, int]:
    if constraint is None:
        return {}
    if not isinstance(constraint, Mapping):
        raise TypeError(f"constraint must be a dict such as {{'parameters': 100_000, 'flops': 5_000_000}}, got "
                        f"{type(constraint).__name__}")
    unknown = sorted(set(constraint) - set(_CONSTRAINTS))
    if unknown:
        raise ValueError(f"unknown constraint(s) {unknown}: caps are 'parameters' and 'flops'")
    return {_CONSTRAINTS[key]: check_int(value, f"constraint[{key!r}]", minimum=1) for key, value in constraint.items()}


def search(teacher: nn.Module, candidates: Any, data: Any, *, budget: int | None = None,
           constraint: Mapping[str, int] | None = None, semantic: str = "gradcam",
           baselines: Sequence[str] = ("nwot", "snip", "grad_norm"), trained_teacher: bool = False,
           batch_size: int = 64, batches: int = 1, population: int = 10, sample_size: int = 3, seed: int = 0,
           device: Any = "auto", on_result: Callable[[dict[str, Any], int], None] | None = None,
           progress: bool = True) -> SearchResult:
    """Score candidate students for ``teacher`` without training them.

    ``candidates``: a list of model specs (names, ``{"name", "kwargs"}`` dicts, :class:`Candidate`\\ s), all
    scored in order (the first ``budget`` when given), or a :class:`SearchSpace`, scored exhaustively when
    ``budget`` is None or covers it and by aging evolution (``population``, ``sample_size``, seed ``seed``)
    otherwise. Each candidate is built with ``seed`` (so its score does not depend on what ran before), sized
    (parameters, FLOPs of one sample by torch's FLOP counter) and refused when over ``constraint``
    (``{"parameters": N, "flops": M}``; counted in ``skipped``); then DisWOT's terms (:func:`score`'s settings)
    and the ``baselines`` (:data:`workbench.probes.zero_cost.PROXIES`, on the candidate as built). The
    released semantic term is filled in where the classifier widths match the teacher's (NaN elsewhere).
    ``on_result(row, index)`` receives each scored candidate's row as it is scored.

    Example:
        >>> import torch
        >>> from workbench import models
        >>> _ = torch.manual_seed(0)
        >>> data = (torch.randn(16, 1, 16, 16), torch.randint(0, 10, (16,)))
        >>> teacher = models.create("cnn", widths=(8, 16), img_size=16)
        >>> candidates = [{"name": "cnn", "kwargs": {"widths": [8]}}, {"name": "cnn", "kwargs": {"widths": [8, 16]}}]
        >>> result = search(teacher, candidates, data, batch_size=16, device="cpu", progress=False)
        >>> result.best.label  # the teacher's own architecture scores 0, the best possible
        'cnn(widths=(8, 16))'
        >>> list(result.to_frame().columns)[:6]
        ['label', 'family', 'params', 'flops', 'score', 'relation']
    """
    semantic = _check_semantic(semantic)
    unknown = sorted(set(baselines) - set(PROXIES))
    if unknown:
        raise ValueError(f"unknown baseline(s) {unknown}; available: {sorted(PROXIES)}")
    caps = _check_constraint(constraint)
    space = candidates if isinstance(candidates, SearchSpace) else parse_candidates(candidates)
    if budget is not None:
        budget = check_int(budget, "budget", minimum=1)
    evolve = isinstance(space, SearchSpace) and budget is not None and budget < len(space)
    device = resolve_device(device)
    data_batches = _batches(data, batch_size, batches, device)
    x, y = data_batches[0]
    n_samples = sum(len(batch[0]) for batch in data_batches)
    teacher_copy = _prepared(teacher, device, not trained_teacher, seed)
    teacher_signatures = _signatures(teacher_copy, data_batches, "last")
    rows: list[dict[str, Any]] = []
    skipped = 0
    total = budget if evolve else (len(space) if budget is None else min(budget, len(space)))
    bar = tqdm(total=total, desc="DisWOT search", unit="candidate", disable=not progress)

    def evaluate(candidate: Candidate) -> dict[str, Any] | None:
        nonlocal skipped
        start = time.perf_counter()
        with seeded(seed):
            model = candidate.build(img_size=int(x.shape[-1]))
        size = {"params": count_parameters(model), "flops": count_flops(model.to(device), x[:1])}
        over = [f"{key} {size[key]:,} > {cap:,}" for key, cap in caps.items() if size[key] > cap]
        if over:
            skipped += 1
            bar.set_postfix_str(f"refused {candidate.label}: {', '.join(over)}")
            return None
        if semantic == "released":
            _require_released(teacher, model, candidate.label)
        student = _prepared(model, device, True, seed)
        terms = _terms(teacher_signatures, _signatures(student, data_batches, "last"), semantic, n_samples)
        row = {"candidate": candidate.to_json(), "label": candidate.label, "family": candidate.family, **size,
               "score": terms.score, **{name: getattr(terms, name) for name in TERMS}}
        for name in baselines:
            row[name] = PROXIES[name](model, x, y)
        row["seconds"] = time.perf_counter() - start
        rows.append(row)
        bar.update(1)
        if on_result is not None:
            on_result(row, len(rows) - 1)
        return row

    try:
        if evolve:
            steps = aging_evolution(space, evaluate, budget, population=population, sample_size=sample_size,
                                    seed=seed)
        else:
            steps = exhaustive(space, evaluate, budget)
        for _ in steps:
            pass
    finally:
        bar.close()
    if not rows:
        raise ValueError(f"no candidate fits the constraint {dict(constraint or {})}: all {skipped} were refused")
    settings = {"semantic": semantic, "baselines": list(baselines), "trained_teacher": bool(trained_teacher),
                "batch_size": batch_size, "batches": len(data_batches), "n_samples": n_samples, "seed": seed,
                "budget": budget, "constraint": dict(constraint or {}),
                "strategy": "aging evolution" if evolve else "exhaustive", "population": population,
                "sample_size": sample_size, "device": str(device), "teacher": type(teacher).__name__,
                **describe_space(space)}
    return SearchResult(candidates=[row["candidate"] for row in rows], params=[row["params"] for row in rows],
                        flops=[row["flops"] for row in rows],
                        scores={name: [row[name] for row in rows] for name in ("score", *TERMS, *baselines)},
                        seconds=[row["seconds"] for row in rows], skipped=skipped, settings=settings)

