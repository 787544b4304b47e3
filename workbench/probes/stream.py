"""One pass of a dataset through a teacher and a student, yielding each batch's outputs and activations.

Every probe that compares the two models (CKA matrices, prediction agreement) reads through
:func:`paired_batches`, so the loop, the device handling, the eval-mode switch and the input checks
live in one place. The models are put in eval mode for the pass and given back their mode after.

Batches are read by :mod:`workbench.batches`: a dict batch reaches the model whole (``attention_mask``
and the rest as keyword arguments). Token features ``[n, t, d]`` of a batch with a token mask (a dict
batch: its ``attention_mask``, all ones when absent) enter a probe by ``tokens``: ``"mean"`` (default)
averages each sequence's unpadded positions, one sample per sequence; ``"tokens"`` makes every unpadded
token a sample. Padding never counts. Other features (and every tensor batch) are flattened per sample.
"""
from __future__ import annotations

from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass

import torch
from torch import nn
from tqdm.auto import tqdm

from workbench.batches import inputs_of, logits_of, n_samples_of, run_model, take, to_device, token_mask, token_rows
from workbench.capture import Activations, LayerSelector, as_tensor, capture, flatten_per_sample
from workbench.data import as_loader, num_samples
from workbench.devices import resolve_device

TOKEN_MODES = ("mean", "tokens")


@dataclass
class PairedBatch:
    """What one batch produced: model outputs, per-layer flattened features, the raw batch.

    ``n`` counts the batch's samples (sequences); in ``tokens="tokens"`` mode the features hold one row
    per unpadded token instead.
    """

    teacher_output: torch.Tensor
    student_output: torch.Tensor
    teacher_features: dict[str, torch.Tensor]
    student_features: dict[str, torch.Tensor]
    batch: object
    n: int


@contextmanager
def eval_mode(*models: nn.Module) -> Iterator[None]:
    """Put models in eval mode inside the block and restore each module's own training flag after."""
    flags = [[(module, module.training) for module in model.modules()] for model in models]
    try:
        for model in models:
            model.eval()
        yield
    finally:
        for pairs in flags:
            for module, training in pairs:
                module.training = training


def _features(activations: Activations, role: str, mask: torch.Tensor | None, tokens: str) -> dict[str, torch.Tensor]:
    missing = [name for name in activations.layers if name not in activations]
    if missing:
        raise RuntimeError(f"{role} layers {missing} did not run in the forward pass; choose layers that do")
    if mask is None:
        return activations.flat()
    return {name: _token_features(activations[name], mask, tokens, f"{role} layer {name!r}") for name in activations}


def _token_features(value: torch.Tensor, mask: torch.Tensor, tokens: str, what: str) -> torch.Tensor:
    """One layer's features of a token batch: masked mean per sequence, or one row per unpadded token."""
    token_shaped = value.dim() >= 3 and value.shape[:2] == mask.shape
    if tokens == "tokens":
        if not token_shaped:
            raise ValueError(
                f"tokens='tokens' makes every unpadded token a sample, but {what} gives {list(value.shape)}, not "
                f"[n, t, ...] over the batch's {list(mask.shape)} tokens; use tokens='mean' or per-token layers"
            )
        return flatten_per_sample(token_rows(value, mask))
    if not token_shaped:
        return flatten_per_sample(value)
    weights = mask.to(value.device, torch.float32 if value.dtype in (torch.float16, torch.bfloat16) else value.dtype)
    counts = weights.sum(dim=1)
    if not bool(counts.all()):
        raise ValueError(f"a sequence in the batch has no unpadded token (its attention_mask is all 0): {what}")
    weights = weights.reshape(*mask.shape, *[1] * (value.dim() - 2))
    pooled = (value.to(weights.dtype) * weights).sum(dim=1) / counts.reshape(-1, *[1] * (value.dim() - 2))
    return flatten_per_sample(pooled)


def _same_positions(teacher_mask: torch.Tensor | None, student_mask: torch.Tensor | None) -> bool:
    if teacher_mask is None or student_mask is None:
        return teacher_mask is student_mask
    return teacher_mask.shape == student_mask.shape and bool(torch.equal(teacher_mask, student_mask))


def _output(model: nn.Module, output: object, logits: bool) -> torch.Tensor:
    return logits_of(output, model) if logits else as_tensor(output)


def _check_finite(features: dict[str, torch.Tensor], role: str, first_sample: int) -> None:
    for name, value in features.items():
        if not torch.isfinite(value).all():
            raise FloatingPointError(
                f"{role} layer {name!r} produced NaN or Inf in the batch starting at sample {first_sample}"
            )


def paired_batches(
    teacher: nn.Module,
    student: nn.Module,
    data: object,
    *,
    teacher_layers: LayerSelector | None = "stages",
    student_layers: LayerSelector | None = "stages",
    student_data: object = None,
    batch_size: int = 128,
    n_samples: int | None = None,
    min_batch: int = 1,
    device: str | torch.device = "auto",
    progress: bool = True,
    description: str = "probing",
    check_finite: bool = True,
    tokens: str = "mean",
    logits: bool = False,
) -> Iterator[PairedBatch]:
    """Run ``data`` through both models without gradients, yielding a :class:`PairedBatch` per batch.

    ``student_data`` feeds the student other inputs for the same samples (e.g. another resolution or
    tokenizer); its sample count must equal ``data``'s. ``n_samples`` stops after that many samples.
    Layers ``None`` capture nothing (outputs only). ``check_finite`` raises on NaN/Inf features, naming
    the layer (a consumer that checks cheaper derived values may turn it off). Every batch must hold at
    least ``min_batch`` samples (checked before the pass when the size is known). ``tokens`` says how
    token features enter (``"mean"`` or ``"tokens"``, see the module docstring); ``"tokens"`` needs the
    teacher's and the student's batches to hold the same token positions. ``logits=True`` yields the
    models' logits as outputs and refuses outputs without any (a headless transformer), naming the model.

    Example:
        >>> import torch
        >>> from torch import nn
        >>> t = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3))
        >>> s = nn.Sequential(nn.Linear(4, 3))
        >>> batches = list(paired_batches(t, s, torch.randn(10, 4), teacher_layers=["0"],
        ...                               student_layers=["0"], batch_size=5, device="cpu", progress=False))
        >>> [b.n for b in batches], batches[0].teacher_features["0"].shape
        ([5, 5], torch.Size([5, 8]))
    """
    if tokens not in TOKEN_MODES:
        raise ValueError(f"tokens must be one of {TOKEN_MODES}, got {tokens!r}")
    device = resolve_device(device)
    loader = as_loader(data, batch_size=batch_size)
    student_loader = None if student_data is None else as_loader(student_data, batch_size=batch_size)
    total = num_samples(loader)
    if student_loader is not None:
        student_total = num_samples(student_loader)
        if total is not None and student_total is not None and total != student_total:
            raise ValueError(
                f"teacher and student data must hold the same samples: the teacher's has {total}, "
                f"the student's has {student_total}"
            )
    if n_samples is not None:
        if n_samples < 1:
            raise ValueError(f"n_samples must be positive, got {n_samples}")
        total = n_samples if total is None else min(total, n_samples)
    if total is not None and loader.batch_size:
        last = total % loader.batch_size or min(total, loader.batch_size)
        if min(last, loader.batch_size) < min_batch:
            raise ValueError(
                f"{total} samples in batches of {loader.batch_size} leave a last batch of {last}; "
                f"this probe needs at least {min_batch} per batch: change batch_size or n_samples"
            )
    teacher.to(device)
    student.to(device)
    seen = 0
    with ExitStack() as stack:
        stack.enter_context(eval_mode(teacher, student))
        teacher_acts = stack.enter_context(capture(teacher, teacher_layers or []))
        student_acts = stack.enter_context(capture(student, student_layers or []))
        bar = stack.enter_context(
            tqdm(total=total, desc=description, unit="sample", disable=not progress)
        )
        student_batches = iter(student_loader) if student_loader is not None else None
        for batch in loader:
            teacher_inputs = inputs_of(batch)
            student_inputs = teacher_inputs
            if student_batches is not None:
                student_batch = next(student_batches, None)
                if student_batch is None:
                    raise ValueError(f"the student's data ran out after {seen} samples; the teacher's holds more")
                student_inputs = inputs_of(student_batch)
            n = n_samples_of(teacher_inputs)
            if n_samples is not None and seen + n > n_samples:
                n = n_samples - seen
                teacher_inputs, student_inputs = take(teacher_inputs, n), take(student_inputs, n)
            if n_samples_of(student_inputs) != n:
                raise ValueError(
                    f"teacher and student batches differ at sample {seen}: {n} vs {n_samples_of(student_inputs)} "
                    "samples"
                )
            if n < min_batch:
                raise ValueError(f"a batch of {n} samples reached the probe; it needs at least {min_batch}")
            teacher_inputs = to_device(teacher_inputs, device)
            student_inputs = teacher_inputs if student_batches is None else to_device(student_inputs, device)
            teacher_mask, student_mask = token_mask(teacher_inputs), token_mask(student_inputs)
            if tokens == "tokens" and student_batches is not None and not _same_positions(teacher_mask, student_mask):
                raise ValueError(
                    f"tokens='tokens' pairs the teacher's and the student's token rows, but their batches at sample "
                    f"{seen} hold different token positions (attention masks); use tokens='mean' for other tokenisers"
                )
            with torch.no_grad():
                teacher_output = _output(teacher, run_model(teacher, teacher_inputs), logits)
                student_output = _output(student, run_model(student, student_inputs), logits)
            teacher_features = _features(teacher_acts, "teacher", teacher_mask, tokens)
            student_features = _features(student_acts, "student", student_mask, tokens)
            if check_finite:
                _check_finite(teacher_features, "teacher", seen)
                _check_finite(student_features, "student", seen)
            yield PairedBatch(teacher_output, student_output, teacher_features, student_features, batch, n)
            # drop this generator's references before the next forward, so that a consumer done with the batch
            # frees its activations then: at most one batch of features is alive, not two
            del teacher_output, student_output, teacher_features, student_features
            teacher_acts.clear()
            student_acts.clear()
            seen += n
            bar.update(n)
            if n_samples is not None and seen >= n_samples:
                break
        if student_batches is not None and n_samples is None and next(student_batches, None) is not None:
            raise ValueError(f"the student's data holds more samples than the teacher's {seen}")
