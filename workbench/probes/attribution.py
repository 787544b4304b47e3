"""Where a teacher and a student look: attribution maps of both models for the same inputs and targets, and
how well the maps agree.

Two methods (:data:`METHODS`), both from captum:

- ``"gradcam"``: Grad-CAM (Selvaraju et al. 2017) at one layer of each model,
  ``ReLU(Σ_c mean_hw(∂y_target/∂A_c) · A_c)`` for the layer's activation ``A`` ``[n, c, h, w]``. A token
  layer (``[n, tokens, d]``, timm ViT / Mixer blocks) is read on its patch grid: the prefix tokens (a class
  token, ``model.num_prefix_tokens``) are dropped and the patch tokens reshaped to ``[n, d, h, w]``.
- ``"ig"``: integrated gradients (Sundararajan et al. 2017) on the inputs from a zero baseline, the
  absolute attribution summed over the channels; no layer.

Each map is resized (bilinear) to a common grid, then min-max normalised to [0, 1] per sample; a
constant map (Grad-CAM all zero: no positive evidence at that layer) is stored as all zeros and its
agreement is NaN with a ``RuntimeWarning``, never a made-up number. The agreement per sample is the
Pearson and the Spearman correlation of the two flattened maps and the IoU of their top-``top_k`` pixels.
"""
from __future__ import annotations

import difflib
import math
import warnings
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from scipy import stats
from torch import nn
from torch.utils.data import Dataset
from tqdm.auto import tqdm

from workbench.batches import inputs_of, logits_of, run_model, targets_of
from workbench.capture import layer_names, stage_names
from workbench.data import as_loader
from workbench.devices import model_device
from workbench.probes.result_io import JsonResult, check_array, check_float, check_text
from workbench.probes.stream import eval_mode

__all__ = ["METHODS", "AttributionResult", "agreement", "compare", "gradcam_maps", "normalize", "resolve_layer"]

METHODS = ("gradcam", "ig")
"""The attribution methods :func:`compare` knows: Grad-CAM at a layer, integrated gradients on the input."""
CONSTANT = 1e-6  # a map whose range is at most this fraction of its largest |value| is constant (float32 noise)
_ROUNDING = 1e-9  # how far outside its range a stored number may lie as rounding


# ---------------------------------------------------------------------------------------------- maps → numbers
def _is_constant(values: np.ndarray) -> bool:
    """Whether a map is constant up to float32 rounding (an all-zero map is)."""
    return bool(np.ptp(values) <= CONSTANT * np.max(np.abs(values)))


def normalize(maps: np.ndarray) -> np.ndarray:
    """Min-max normalise each map ``maps[i]`` to [0, 1] (float64); a constant map becomes all zeros.

    "Constant" allows float32 rounding: a range of at most ``CONSTANT`` (1e-6) times the map's largest
    absolute value.

    Example:
        >>> normalize(np.array([[[1.0, 3.0], [2.0, 5.0]], [[4.0, 4.0], [4.0, 4.0]]])).tolist()
        [[[0.0, 0.5], [0.25, 1.0]], [[0.0, 0.0], [0.0, 0.0]]]
    """
    maps = np.asarray(maps, dtype=np.float64)
    out = np.zeros_like(maps)
    for index, values in enumerate(maps):
        if not _is_constant(values):
            out[index] = (values - values.min()) / np.ptp(values)
    return out


def _top_k_iou(a: np.ndarray, b: np.ndarray, k: int) -> float:
    top_a = set(np.argsort(-a, kind="stable")[:k].tolist())
    top_b = set(np.argsort(-b, kind="stable")[:k].tolist())
    return len(top_a & top_b) / len(top_a | top_b)


def agreement(teacher_maps: np.ndarray, student_maps: np.ndarray, top_k: float = 0.1) -> dict[str, np.ndarray]:
    """Per-sample agreement of two stacks of maps ``[n, h, w]``: ``"pearson"``, ``"spearman"`` and ``"iou"``.

    Pearson and Spearman are scipy's ``pearsonr`` / ``spearmanr`` of the flattened maps; ``iou`` is
    ``|A∩B| / |A∪B|`` of the ``k = max(1, round(top_k · h · w))`` highest pixels of each map (ties broken by
    position, first pixel first). A sample where either map is constant gets NaN for all three, with a
    ``RuntimeWarning`` naming the samples.

    Example:
        >>> a = np.array([[[0.0, 1.0], [2.0, 3.0]]])
        >>> b = np.array([[[0.0, 1.0], [3.0, 2.0]]])
        >>> {name: round(float(value[0]), 3) for name, value in agreement(a, b, top_k=0.5).items()}
        {'pearson': 0.8, 'spearman': 0.8, 'iou': 1.0}
    """
    teacher_maps, student_maps = np.asarray(teacher_maps, np.float64), np.asarray(student_maps, np.float64)
    if teacher_maps.ndim != 3 or teacher_maps.shape != student_maps.shape:
        raise ValueError(f"agreement needs two stacks of maps of one shape [n, h, w], got {list(teacher_maps.shape)} "
                         f"and {list(student_maps.shape)}")
    top_k = _check_top_k(top_k)
    pixels = teacher_maps.shape[1] * teacher_maps.shape[2]
    k = max(1, round(top_k * pixels))
    values = {name: np.full(len(teacher_maps), np.nan) for name in ("pearson", "spearman", "iou")}
    constant = []
    for index, (a, b) in enumerate(zip(teacher_maps.reshape(len(teacher_maps), -1),
                                       student_maps.reshape(len(student_maps), -1))):
        if _is_constant(a) or _is_constant(b):
            constant.append(index)
            continue
        values["pearson"][index] = stats.pearsonr(a, b).statistic
        values["spearman"][index] = stats.spearmanr(a, b).statistic
        values["iou"][index] = _top_k_iou(a, b, k)
    if constant:
        warnings.warn(
            f"attribution maps of samples {constant} are constant (e.g. all zero: no gradient or no positive "
            "evidence reaches the layer; the last block of a class-token ViT, whose patch tokens the head never "
            "reads, is one); their agreement is NaN. Choose another layer or method.",
            RuntimeWarning, stacklevel=2)
    return values


def _check_top_k(top_k: Any) -> float:
    top_k = check_float(top_k, "top_k", allow_nan=True)
    if not 0.0 < top_k <= 1.0:
        raise ValueError(f"top_k must be in (0, 1] (the fraction of pixels the IoU compares), got {top_k!r}")
    return top_k


def _nanmean(values: np.ndarray) -> float:
    with warnings.catch_warnings():  # all NaN: the mean is NaN, said already when the maps were compared
        warnings.simplefilter("ignore", RuntimeWarning)
        return float(np.nanmean(values))


# ---------------------------------------------------------------------------------------------- the result
@dataclass
class AttributionResult(JsonResult):
    """Teacher and student attribution maps of the same ``n`` inputs and targets, and their agreement.

    ``inputs`` ``[n, c, H, W]``, ``targets`` ``[n]`` (the class each map explains), ``teacher_maps`` /
    ``student_maps`` ``[n, h, w]`` on a common grid in [0, 1], and per sample ``pearson``, ``spearman`` and
    ``iou`` (top-``top_k`` IoU; NaN where a map is constant). ``.save(path)`` / ``AttributionResult.load(path)``
    keep it as JSON.

    Example:
        >>> import torch
        >>> from workbench import models
        >>> _ = torch.manual_seed(0)
        >>> teacher = models.create("cnn", widths=(8, 16), img_size=16)
        >>> data = (torch.randn(3, 1, 16, 16), torch.tensor([1, 2, 3]))
        >>> result = compare(teacher, teacher, data, progress=False)
        >>> result.teacher_maps.shape, result.to_frame()["iou"].tolist()
        ((3, 16, 16), [1.0, 1.0, 1.0])
    """

    method: str
    teacher_layer: str
    student_layer: str
    inputs: np.ndarray
    targets: np.ndarray
    teacher_maps: np.ndarray
    student_maps: np.ndarray
    pearson: np.ndarray
    spearman: np.ndarray
    iou: np.ndarray
    top_k: float = 0.1

    def __post_init__(self) -> None:
        """Check every field (types, shapes, ranges); a file that fails is refused by ``load``."""
        self.method = _check_method(check_text(self.method, "method"))
        self.teacher_layer = check_text(self.teacher_layer, "teacher_layer")
        self.student_layer = check_text(self.student_layer, "student_layer")
        self.top_k = _check_top_k(self.top_k)
        self.inputs = check_array(self.inputs, "inputs", ndim=4)
        n = len(self.inputs)
        targets = check_array(self.targets, "targets", ndim=1)
        if not np.all(np.isfinite(targets) & (targets == np.round(targets)) & (targets >= 0)):
            raise ValueError(f"targets must be class indices (whole numbers ≥ 0), got {targets.tolist()}")
        self.targets = targets.astype(np.int64)
        for name in ("teacher_maps", "student_maps"):
            maps = check_array(getattr(self, name), name, ndim=3)
            if len(maps) != n or not np.all((maps >= -_ROUNDING) & (maps <= 1 + _ROUNDING)):
                raise ValueError(f"{name} must be {n} maps with values in [0, 1], got shape {list(maps.shape)} "
                                 f"and range [{maps.min()}, {maps.max()}]")
            setattr(self, name, maps)
        if self.teacher_maps.shape != self.student_maps.shape:
            raise ValueError(f"teacher_maps {list(self.teacher_maps.shape)} and student_maps "
                             f"{list(self.student_maps.shape)} must share one grid")
        for name, low in (("pearson", -1.0), ("spearman", -1.0), ("iou", 0.0)):
            values = check_array(getattr(self, name), name, ndim=1)
            inside = np.isnan(values) | ((values >= low - _ROUNDING) & (values <= 1 + _ROUNDING))
            if len(values) != n or not inside.all():
                raise ValueError(f"{name} must hold {n} numbers in [{low}, 1] (or NaN), got {values.tolist()}")
            setattr(self, name, values)
        if len(self.targets) != n:
            raise ValueError(f"targets has {len(self.targets)} entries for {n} inputs")

    @property
    def title(self) -> str:
        """One line: the method, the layers and the mean agreement."""
        means = self.summary()
        return (f"{self.method}: teacher {self.teacher_layer} vs student {self.student_layer}, "
                f"{means['n_samples']} samples; mean Pearson {means['pearson']:.3f}, Spearman "
                f"{means['spearman']:.3f}, top-{self.top_k:.0%} IoU {means['iou']:.3f}")

    def to_frame(self) -> pd.DataFrame:
        """One row per sample, in sample order: ``sample``, ``target``, ``pearson``, ``spearman``, ``iou``.

        Example:
            >>> result = AttributionResult("ig", "input", "input", np.zeros((2, 1, 2, 2)), [3, 5],
            ...                            np.eye(2)[None].repeat(2, 0), np.eye(2)[None].repeat(2, 0),
            ...                            [1.0, 1.0], [1.0, 1.0], [1.0, np.nan], top_k=0.5)
            >>> result.to_frame().to_dict("list")
            {'sample': [0, 1], 'target': [3, 5], 'pearson': [1.0, 1.0], 'spearman': [1.0, 1.0], 'iou': [1.0, nan]}
        """
        return pd.DataFrame({"sample": np.arange(len(self.targets)), "target": self.targets,
                             "pearson": self.pearson, "spearman": self.spearman, "iou": self.iou})

    def summary(self) -> pd.Series:
        """The means over the samples of ``pearson``, ``spearman`` and ``iou`` (NaN samples left out; NaN if
        all are) and ``n_samples``.

        Example:
            >>> result = AttributionResult("ig", "input", "input", np.zeros((2, 1, 2, 2)), [3, 5],
            ...                            np.eye(2)[None].repeat(2, 0), np.eye(2)[None].repeat(2, 0),
            ...                            [1.0, 0.5], [1.0, 0.0], [1.0, np.nan], top_k=0.5)
            >>> result.summary().to_dict()
            {'pearson': 0.75, 'spearman': 0.5, 'iou': 1.0, 'n_samples': 2}
        """
        return pd.Series({"pearson": _nanmean(self.pearson), "spearman": _nanmean(self.spearman),
                          "iou": _nanmean(self.iou), "n_samples": len(self.targets)}, dtype=object)

    def _check_sample(self, sample: Any) -> int:
        if isinstance(sample, (bool, np.bool_)) or not isinstance(sample, (int, np.integer)):
            raise TypeError(f"sample must be a whole number, got {sample!r}")
        if not 0 <= sample < len(self.targets):
            raise IndexError(f"sample {sample} is out of range: the result holds samples 0..{len(self.targets) - 1}")
        return int(sample)

    def _sample_title(self, sample: int) -> str:
        return (f"sample {sample} (target {self.targets[sample]}): Pearson {self.pearson[sample]:.3f}, "
                f"Spearman {self.spearman[sample]:.3f}, top-{self.top_k:.0%} IoU {self.iou[sample]:.3f}")

    def image(self, sample: int) -> np.ndarray:
        """The input of ``sample`` as one 2-D image ``[H, W]`` (the mean over its channels).

        Example:
            >>> result = AttributionResult("ig", "input", "input", np.arange(8.0).reshape(1, 2, 2, 2), [0],
            ...                            np.zeros((1, 2, 2)), np.zeros((1, 2, 2)), [np.nan], [np.nan], [np.nan])
            >>> result.image(0).tolist()
            [[2.0, 3.0], [4.0, 5.0]]
        """
        return self.inputs[self._check_sample(sample)].mean(axis=0)

    def figure(self, sample: int = 0) -> Any:
        """Plotly: three heatmaps in a row — the input (channel mean), the teacher's map, the student's map —
        titled with the sample, its target and its agreement.

        Example:
            >>> result = AttributionResult("ig", "input", "input", np.zeros((1, 1, 2, 2)), [4],
            ...                            np.eye(2)[None], np.eye(2)[None], [1.0], [1.0], [1.0], top_k=0.5)
            >>> figure = result.figure(0)
            >>> [trace.type for trace in figure.data], figure.layout.title.text
            (['heatmap', 'heatmap', 'heatmap'], 'sample 0 (target 4): Pearson 1.000, Spearman 1.000, top-50% IoU 1.000')
        """
        import plotly.graph_objects as go
        from plotly.subplots import make_subplots

        sample = self._check_sample(sample)
        figure = make_subplots(rows=1, cols=3, subplot_titles=(
            "input", f"teacher: {self.teacher_layer}", f"student: {self.student_layer}"), horizontal_spacing=0.06)
        figure.add_trace(go.Heatmap(z=self.image(sample), colorscale="gray", showscale=False, name="input"), 1, 1)
        for column, (name, maps) in enumerate((("teacher", self.teacher_maps), ("student", self.student_maps)), 2):
            figure.add_trace(go.Heatmap(z=maps[sample], zmin=0, zmax=1, colorscale="Inferno", name=name,
                                        showscale=column == 3, colorbar={"len": 0.9}), 1, column)
        for column in (1, 2, 3):
            figure.update_yaxes(autorange="reversed", scaleanchor=f"x{column if column > 1 else ''}",
                                showticklabels=False, row=1, col=column)
            figure.update_xaxes(constrain="domain", showticklabels=False, row=1, col=column)
        figure.update_layout(title=self._sample_title(sample), margin={"t": 70})
        return figure

    def plot(self, samples: Sequence[int] | None = None) -> Any:
        """Matplotlib: one row per sample (default: the first four), columns input | teacher map | student
        map, under a title with the method, the layers and the mean agreement; returns the ``Figure``.

        Example:
            >>> result = AttributionResult("ig", "input", "input", np.zeros((2, 1, 2, 2)), [4, 1],
            ...                            np.eye(2)[None].repeat(2, 0), np.eye(2)[None].repeat(2, 0),
            ...                            [1.0, 1.0], [1.0, 1.0], [1.0, 1.0], top_k=0.5)
            >>> len(result.plot().axes), len(result.plot(samples=[1]).axes)
            (6, 3)
        """
        import matplotlib.pyplot as plt

        chosen = list(range(min(4, len(self.targets)))) if samples is None else \
            [self._check_sample(sample) for sample in samples]
        if not chosen:
            raise ValueError("plot needs at least one sample")
        figure, axes = plt.subplots(len(chosen), 3, figsize=(8, 2.7 * len(chosen) + 0.6), squeeze=False)
        for row, sample in zip(axes, chosen):
            row[0].imshow(self.image(sample), cmap="gray")
            row[0].set_title(f"sample {sample}, target {self.targets[sample]}", fontsize=9)
            for ax, maps, role in ((row[1], self.teacher_maps, "teacher"), (row[2], self.student_maps, "student")):
                ax.imshow(maps[sample], cmap="inferno", vmin=0, vmax=1)
                ax.set_title(role, fontsize=9)
            row[2].set_title(f"student (r = {self.pearson[sample]:.2f}, IoU = {self.iou[sample]:.2f})", fontsize=9)
            for ax in row:
                ax.set_xticks([])
                ax.set_yticks([])
        figure.suptitle(self.title, fontsize=9)
        figure.tight_layout()
        return figure


# ---------------------------------------------------------------------------------------------- inputs
def _check_method(method: Any) -> str:
    if method not in METHODS:
        raise ValueError(f"unknown attribution method {method!r}; the method must be one of {METHODS}")
    return method


def resolve_layer(model: nn.Module, layer: str) -> str:
    """The module name a layer setting means: ``"last"`` / ``"first"`` → the model's last / first stage
    (:func:`workbench.capture.stage_names`), an exact module name → itself. Anything else is a
    ``ValueError`` listing close names and the stages.

    Example:
        >>> from workbench import models
        >>> model = models.create("cnn", widths=(8, 16), img_size=16)
        >>> resolve_layer(model, "last"), resolve_layer(model, "first"), resolve_layer(model, "blocks.1.0")
        ('blocks.1', 'blocks.0', 'blocks.1.0')
    """
    if not isinstance(layer, str):
        raise TypeError(f"a layer is a module name, 'first' or 'last', got {type(layer).__name__}: {layer!r}")
    stages = stage_names(model)
    if layer in ("first", "last"):
        if not stages:
            raise ValueError(f"{type(model).__name__} has no stages to take the {layer} of; pass a module name")
        return stages[0] if layer == "first" else stages[-1]
    if layer:
        try:
            model.get_submodule(layer)
            return layer
        except AttributeError:
            pass
    close = difflib.get_close_matches(layer, layer_names(model), n=5, cutoff=0.4)
    raise ValueError(f"{type(model).__name__} has no module {layer!r} to attribute at; closest names: {close}; "
                     f"its stages: {stages} (or 'first' / 'last')")


def _samples(data: Any, n_samples: int) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The first ``n_samples`` inputs ``[n, c, h, w]`` of ``data`` and their labels (None: unlabelled)."""
    if isinstance(data, (torch.Tensor, np.ndarray)):
        batches: Any = [(data,)]
    elif isinstance(data, (tuple, list)) and data and isinstance(data[0], (torch.Tensor, np.ndarray)):
        batches = [data]
    elif isinstance(data, Dataset):
        batches = as_loader(data, batch_size=n_samples)
    else:
        batches = data
    inputs, labels, count = [], [], 0
    for batch in batches:
        x, y = torch.as_tensor(inputs_of(batch)), targets_of(batch)
        inputs.append(x[: n_samples - count])
        labels.append(None if y is None else torch.as_tensor(y)[: n_samples - count])
        count += len(inputs[-1])
        if count >= n_samples:
            break
    if count == 0:
        raise ValueError("the data holds no samples: pass (x, y) tensors or a DataLoader of (x, y) batches")
    x = torch.cat(inputs)
    if x.dim() != 4 or not x.is_floating_point():
        raise ValueError(f"attribution maps need float image inputs [n, c, h, w], got {x.dtype} {list(x.shape)}")
    if any(y is None for y in labels):
        return x, None
    return x, torch.cat(labels)


def _forward(model: nn.Module) -> Callable[[torch.Tensor], torch.Tensor]:
    def forward(inputs: torch.Tensor) -> torch.Tensor:
        return logits_of(run_model(model, inputs), model)

    return forward


def _targets(models: dict[str, nn.Module], x: torch.Tensor, labels: torch.Tensor | None, targets: Any) -> torch.Tensor:
    """The class each map explains, checked against both models' class ranges."""
    with torch.no_grad():
        logits = {role: _forward(model)(x) for role, model in models.items()}
    for role, values in logits.items():
        if values.dim() != 2:
            raise ValueError(f"the {role} gives logits of shape {list(values.shape)}, not [n, classes]")
    if targets is None:
        if labels is None:
            raise ValueError("the data has no labels: pass targets='teacher' (the teacher's predicted classes) "
                             "or one class index per sample")
        chosen, source = labels, "the labels"
    elif isinstance(targets, str):
        if targets != "teacher":
            raise ValueError(f"targets must be None (the labels), 'teacher' or class indices, got {targets!r}")
        chosen, source = logits["teacher"].argmax(dim=1), "the teacher's predictions"
    else:
        chosen, source = torch.as_tensor(targets), "targets"
    if chosen.is_floating_point() or chosen.is_complex() or chosen.dtype == torch.bool or chosen.dim() != 1:
        raise ValueError(f"{source} must be a 1-D list of class indices, got {chosen.dtype} {list(chosen.shape)}")
    if len(chosen) != len(x):
        raise ValueError(f"{source} has {len(chosen)} entries for {len(x)} samples (n_samples); give one per sample")
    for role, values in logits.items():
        classes = values.shape[1]
        if not bool(((chosen >= 0) & (chosen < classes)).all()):
            raise ValueError(f"{source} {chosen.tolist()} are not all classes of the {role}: it has {classes} "
                             f"classes (0..{classes - 1})")
    return chosen.to(device=x.device, dtype=torch.long)


def _grid(size: Any, x: torch.Tensor) -> tuple[int, int]:
    if size is None:
        return int(x.shape[2]), int(x.shape[3])
    grid = (size, size) if isinstance(size, int) else tuple(size) if isinstance(size, (tuple, list)) else ()
    if len(grid) != 2 or not all(isinstance(side, int) and not isinstance(side, bool) and side > 0 for side in grid):
        raise ValueError(f"size must be a positive int or (height, width), got {size!r}")
    return grid


# ---------------------------------------------------------------------------------------------- the models
@contextmanager
def _not_inplace(models: Sequence[nn.Module]) -> Iterator[None]:
    """Every ``inplace=True`` flag of the models off (in-place ReLUs break captum's hooks), gradients on;
    the flags come back, also on an error."""
    flagged = [module for model in models for module in model.modules() if getattr(module, "inplace", False) is True]
    try:
        for module in flagged:
            module.inplace = False
        with torch.enable_grad():
            yield
    finally:
        for module in flagged:
            module.inplace = True


@contextmanager
def _prepared(models: Sequence[nn.Module], device: torch.device) -> Iterator[None]:
    """The models on ``device``, in eval mode, without in-place ops, gradients on; their devices, modes and
    flags come back, also on an error."""
    devices = [model_device(model) for model in models]
    try:
        for model in models:
            model.to(device)
        with eval_mode(*models), _not_inplace(models):
            yield
    finally:
        for model, original in zip(models, devices):
            model.to(original)


def _grid_hook(grid: nn.Module, prefix: int, layer: str, calls: list[int]) -> Callable:
    """A forward hook routing the layer's output through ``grid`` as a map ``[n, c, h, w]``: a token output
    ``[n, tokens, d]`` loses its ``prefix`` tokens and its patch tokens are laid out on their square grid
    (and put back after, so the model computes what it always does). Each call appends to ``calls``."""
    def hook(_module: nn.Module, _inputs: Any, output: Any) -> torch.Tensor:
        calls.append(1)
        if not isinstance(output, torch.Tensor) or output.dim() not in (3, 4):
            shape = list(output.shape) if isinstance(output, torch.Tensor) else type(output).__name__
            raise ValueError(f"Grad-CAM at {layer!r} needs a map [n, c, h, w] or tokens [n, tokens, d], got {shape}")
        if output.dim() == 4:
            return grid(output)
        n, tokens, width = output.shape
        side = math.isqrt(max(tokens - prefix, 0))
        if side < 1 or side * side != tokens - prefix:
            raise ValueError(f"layer {layer!r} gives {tokens} tokens; less {prefix} prefix token(s) that is not a "
                             "square grid of patches")
        patches = grid(output[:, prefix:].transpose(1, 2).reshape(n, width, side, side))
        return torch.cat([output[:, :prefix], patches.flatten(2).transpose(1, 2)], dim=1)

    return hook


def _gradcam(model: nn.Module, x: torch.Tensor, targets: torch.Tensor, layer: str) -> torch.Tensor:
    """Raw Grad-CAM maps ``[n, h, w]`` at ``layer`` (captum's ``LayerGradCam`` on a map view of its output)."""
    from captum.attr import LayerGradCam

    grid, calls = nn.Identity(), []  # the grid is never a child of the model: only the hook below calls it
    handle = model.get_submodule(layer).register_forward_hook(
        _grid_hook(grid, int(getattr(model, "num_prefix_tokens", 0)), layer, calls))
    try:
        maps = LayerGradCam(_forward(model), grid).attribute(x, target=targets, relu_attributions=True)
    except AssertionError as error:  # captum's "Forward hook did not obtain any outputs for given layer"
        if not calls:
            raise ValueError(f"layer {layer!r} of {type(model).__name__} does not run in its forward pass: "
                             "choose a layer that does (e.g. one of its stages)") from error
        raise
    finally:
        handle.remove()
    return maps[:, 0]


def gradcam_maps(model: nn.Module, x: torch.Tensor, targets: torch.Tensor, layer: str = "last", *,
                 size: int | tuple[int, int] | None = None) -> torch.Tensor:
    """Raw Grad-CAM maps ``[n, H, W]`` of ``model`` at ``layer`` for the classes ``targets``, resized bilinearly
    to ``size`` (default: the input's H × W), not normalised, in the model's current mode (a caller such as
    DisWOT runs a freshly initialised network in train mode) and with gradients attached to nothing: in-place
    ops are switched off and every hook removed afterwards, also on an error.

    Example:
        >>> import torch
        >>> from workbench import models
        >>> model = models.create("cnn", widths=(8, 16), img_size=16)
        >>> maps = gradcam_maps(model, torch.randn(4, 1, 16, 16), torch.tensor([0, 1, 2, 3]))
        >>> tuple(maps.shape), bool((maps >= 0).all()), model.blocks[0][2].inplace
        ((4, 16, 16), True, True)
    """
    layer = resolve_layer(model, layer)
    with _not_inplace([model]):
        maps = _gradcam(model, x, targets.to(device=x.device, dtype=torch.long), layer)
    return _resized(maps, _grid(size, x))


def _integrated_gradients(model: nn.Module, x: torch.Tensor, targets: torch.Tensor, n_steps: int,
                          internal_batch_size: int) -> torch.Tensor:
    """``|IG|`` summed over the channels ``[n, H, W]``: captum's ``IntegratedGradients`` from a zero baseline."""
    from captum.attr import IntegratedGradients

    attributions = IntegratedGradients(_forward(model)).attribute(
        x, baselines=torch.zeros_like(x), target=targets, n_steps=n_steps, internal_batch_size=internal_batch_size)
    return attributions.abs().sum(dim=1)


def _resized(maps: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """Maps ``[n, h, w]`` resized bilinearly to ``grid``."""
    if tuple(maps.shape[1:]) != grid:
        maps = F.interpolate(maps[:, None], size=grid, mode="bilinear", align_corners=False)[:, 0]
    return maps.detach()


def _on_grid(maps: torch.Tensor, grid: tuple[int, int]) -> np.ndarray:
    return normalize(_resized(maps, grid).cpu().to(torch.float64).numpy())


def compare(
    teacher: nn.Module,
    student: nn.Module,
    data: Any,
    method: str = "gradcam",
    *,
    teacher_layer: str = "last",
    student_layer: str = "last",
    n_samples: int = 16,
    targets: Any = None,
    size: int | tuple[int, int] | None = None,
    top_k: float = 0.1,
    n_steps: int = 32,
    internal_batch_size: int = 16,
    device: str | torch.device | None = None,
    progress: bool = True,
) -> AttributionResult:
    """Teacher and student attribution maps for the first ``n_samples`` samples of ``data``, and their
    per-sample agreement.

    ``data``: ``(x, y)`` tensors, or a DataLoader / iterable of ``(x, y)`` batches, images ``[n, c, h, w]``.
    ``targets``: the class each map explains — None: the labels; ``"teacher"``: the teacher's predicted
    class; or one class index per sample. ``method``: ``"gradcam"`` at ``teacher_layer`` / ``student_layer``
    (a module name, or ``"first"`` / ``"last"``: the model's first / last stage) or ``"ig"`` (integrated
    gradients on the input, ``n_steps`` steps from a zero baseline, ``internal_batch_size`` at a time;
    the layers are ignored and recorded as ``"input"``). The maps are resized bilinearly to ``size``
    (default: the input's H × W) and min-max normalised per sample; ``top_k`` is the fraction of pixels
    the IoU compares. Both models run in eval mode on ``device`` (default: the teacher's) with their
    in-place ops switched off; their devices, modes and ``inplace`` flags are restored, and every hook
    removed, also on an error.

    Example:
        >>> import torch
        >>> from workbench import models
        >>> _ = torch.manual_seed(0)
        >>> teacher = models.create("cnn", widths=(8, 16, 32), img_size=16)
        >>> student = models.create("cnn", widths=(8, 16), img_size=16)
        >>> data = (torch.randn(8, 1, 16, 16), torch.randint(0, 10, (8,)))
        >>> result = compare(teacher, student, data, n_samples=4, progress=False)
        >>> result.teacher_layer, result.student_layer, result.teacher_maps.shape
        ('blocks.2', 'blocks.1', (4, 16, 16))
        >>> list(result.summary().index)
        ['pearson', 'spearman', 'iou', 'n_samples']
    """
    method = _check_method(method)
    top_k = _check_top_k(top_k)
    if isinstance(n_samples, bool) or not isinstance(n_samples, int) or n_samples < 1:
        raise ValueError(f"n_samples must be a whole number ≥ 1, got {n_samples!r}")
    if method == "gradcam":
        layers = {"teacher": resolve_layer(teacher, teacher_layer), "student": resolve_layer(student, student_layer)}
    else:
        layers = {"teacher": "input", "student": "input"}
    models = {"teacher": teacher, "student": student}
    target_device = model_device(teacher) if device is None else torch.device(device)
    x, labels = _samples(data, n_samples)
    grid = _grid(size, x)
    maps: dict[str, np.ndarray] = {}
    with _prepared(list(models.values()), target_device):
        x = x.to(target_device)
        chosen = _targets(models, x, None if labels is None else labels.to(target_device), targets)
        for role in tqdm(models, desc=f"{method} maps", disable=not progress, leave=False):
            raw = (_gradcam(models[role], x, chosen, layers[role]) if method == "gradcam" else
                   _integrated_gradients(models[role], x, chosen, n_steps, internal_batch_size))
            maps[role] = _on_grid(raw, grid)
    numbers = agreement(maps["teacher"], maps["student"], top_k)
    return AttributionResult(method, layers["teacher"], layers["student"], x.detach().cpu().numpy(),
                             chosen.cpu().numpy(), maps["teacher"], maps["student"], numbers["pearson"],
                             numbers["spearman"], numbers["iou"], top_k=top_k)
