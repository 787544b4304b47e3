"""A small, seeded supervised training loop (cross-entropy) and an accuracy helper."""
from __future__ import annotations

import math
from typing import Any, Callable, Iterable

import pandas as pd
import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from workbench.data.loaders import as_loader, inputs_of, targets_of
from workbench.devices import resolve_device

__all__ = ["fit", "accuracy", "logits_of"]

SCHEDULES = ("constant", "cosine")
OptimizerLike = torch.optim.Optimizer | Callable[[Iterable[nn.Parameter]], torch.optim.Optimizer]


def logits_of(output: Any) -> torch.Tensor:
    """The logits of a model output: a tensor, a tuple's first element, or a ``ModelOutput.logits``.

    Example:
        >>> import torch
        >>> from workbench.train import logits_of
        >>> logits_of((torch.ones(2, 3), None)).shape
        torch.Size([2, 3])
    """
    if isinstance(output, torch.Tensor):
        return output
    logits = getattr(output, "logits", None)
    if isinstance(logits, torch.Tensor):
        return logits
    if isinstance(output, (tuple, list)) and output and isinstance(output[0], torch.Tensor):
        return output[0]
    raise TypeError(f"cannot find logits in a model output of type {type(output).__name__}")


def _to_device(value: Any, device: torch.device) -> Any:
    if isinstance(value, torch.Tensor):
        return value.to(device, non_blocking=True)
    if isinstance(value, dict):
        return {key: _to_device(item, device) for key, item in value.items()}
    return value


def _forward(model: nn.Module, inputs: Any) -> torch.Tensor:
    return logits_of(model(**inputs) if isinstance(inputs, dict) else model(inputs))


def _make_optimizer(model: nn.Module, optimizer: OptimizerLike | None, lr: float) -> torch.optim.Optimizer:
    if optimizer is None:
        return torch.optim.AdamW(model.parameters(), lr=lr)
    if isinstance(optimizer, torch.optim.Optimizer):
        return optimizer
    return optimizer(model.parameters())


def _rng_scope(device: torch.device) -> Any:
    """Fork the global RNG so seeding inside ``fit`` does not change the caller's random stream."""
    devices = [device.index if device.index is not None else torch.cuda.current_device()] if device.type == "cuda" else []
    return torch.random.fork_rng(devices=devices)


def fit(
    model: nn.Module,
    data: Any,
    epochs: int = 1,
    *,
    lr: float = 1e-3,
    batch_size: int = 128,
    optimizer: OptimizerLike | None = None,
    device: str | torch.device = "auto",
    seed: int = 0,
    eval_data: Any = None,
    progress: bool = True,
    schedule: str = "constant",
) -> pd.DataFrame:
    """Train ``model`` with cross-entropy on ``(x, y)`` batches; return the history, one row per step.

    ``data`` is anything :func:`workbench.data.as_loader` takes (a DataLoader is used as is, else it
    is shuffled with a generator seeded by ``seed``). AdamW at ``lr`` unless ``optimizer`` (an
    optimizer, or a callable taking the parameters) is given; ``schedule="cosine"`` decays every
    parameter group's learning rate per step from its initial value to 0. Seeded and deterministic on CPU; the
    caller's global RNG state is left untouched. Columns: ``epoch`` and ``step`` (both from 1),
    ``loss``, ``lr``, and ``eval_accuracy`` on each epoch's last step when ``eval_data`` is given.
    The model stays on ``device`` and is left in eval mode. A non-finite loss raises
    ``FloatingPointError``.

    Example:
        >>> import torch
        >>> from workbench.train import fit
        >>> model = torch.nn.Linear(4, 2)
        >>> x, y = torch.randn(32, 4), torch.randint(0, 2, (32,))
        >>> history = fit(model, (x, y), epochs=2, batch_size=16, device="cpu", progress=False)
        >>> len(history), list(history.columns)
        (4, ['epoch', 'step', 'loss', 'lr'])
    """
    if epochs < 1:
        raise ValueError(f"epochs must be >= 1, got {epochs}")
    if schedule not in SCHEDULES:
        raise ValueError(f"schedule must be one of {SCHEDULES}, got {schedule!r}")
    device = resolve_device(device)
    model.to(device)
    rows: list[dict[str, Any]] = []
    with _rng_scope(device):
        torch.manual_seed(seed)
        loader = as_loader(data, batch_size=batch_size, shuffle=True, seed=seed)
        opt = _make_optimizer(model, optimizer, lr)
        try:
            total: int | None = epochs * len(loader)
        except TypeError:  # an IterableDataset without __len__
            total = None
        if schedule == "cosine" and total is None:
            raise ValueError("schedule='cosine' needs data of known length (a sized dataset or loader)")
        scheduler = (
            torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=total) if schedule == "cosine" else None
        )
        bar = tqdm(total=total, disable=not progress, desc="fit", leave=False)
        step = 0
        try:
            for epoch in range(1, epochs + 1):
                model.train()
                for batch in loader:
                    step += 1
                    loss = _train_step(model, opt, batch, device, epoch, step)
                    rows.append({"epoch": epoch, "step": step, "loss": loss, "lr": opt.param_groups[0]["lr"]})
                    if scheduler is not None:
                        scheduler.step()
                    bar.update(1)
                    bar.set_postfix(epoch=epoch, loss=f"{loss:.4f}", refresh=False)
                if eval_data is not None:
                    rows[-1]["eval_accuracy"] = accuracy(model, eval_data, batch_size=max(batch_size, 256), device=device)
        finally:
            bar.close()
            model.eval()
    history = pd.DataFrame(rows, columns=["epoch", "step", "loss", "lr"] + (["eval_accuracy"] if eval_data is not None else []))
    return history


def _train_step(
    model: nn.Module, opt: torch.optim.Optimizer, batch: Any, device: torch.device, epoch: int, step: int
) -> float:
    targets = targets_of(batch)
    if targets is None:
        raise TypeError(
            "fit needs labelled batches: (x, y) tuples or dicts with 'labels'; got a batch without targets"
        )
    inputs = _to_device(inputs_of(batch), device)
    logits = _forward(model, inputs)
    loss = F.cross_entropy(logits, targets.to(device))
    value = float(loss.detach())
    if not math.isfinite(value):
        raise FloatingPointError(f"training loss is {value} at epoch {epoch}, step {step}; try a lower lr")
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    return value


@torch.no_grad()
def accuracy(model: nn.Module, data: Any, batch_size: int = 256, device: str | torch.device = "auto") -> float:
    """Top-1 accuracy in [0, 1] of ``model`` on labelled ``data`` (anything ``as_loader`` takes).

    The model is moved to ``device``; its train/eval mode is restored afterwards.

    Example:
        >>> import torch
        >>> from workbench.train import accuracy
        >>> model = torch.nn.Linear(2, 2, bias=False)
        >>> _ = model.weight.data.copy_(torch.eye(2))
        >>> accuracy(model, (torch.eye(2), torch.tensor([0, 1])), device="cpu")
        1.0
    """
    device = resolve_device(device)
    was_training = model.training
    model.to(device).eval()
    correct, seen = 0, 0
    try:
        for batch in as_loader(data, batch_size=batch_size):
            targets = targets_of(batch)
            if targets is None:
                raise TypeError("accuracy needs labelled batches: (x, y) tuples or dicts with 'labels'")
            logits = _forward(model, _to_device(inputs_of(batch), device))
            correct += int((logits.argmax(dim=-1) == targets.to(device)).sum())
            seen += len(targets)
    finally:
        model.train(was_training)
    if seen == 0:
        raise ValueError("accuracy got no samples")
    return correct / seen
