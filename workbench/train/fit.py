"""One training loop for plain models (cross-entropy) and Distillers: seeded, resumable, AMP, and DDP under torchrun.

Reproducibility without saved RNG state: each epoch's sample order is ``randperm`` seeded by
``seed + epoch`` (a ``DistributedSampler``, also with one process), and the global RNG is reseeded
before every step from ``(seed, rank, step)``. A run resumed from a checkpoint therefore repeats the
uninterrupted run's history exactly on the CPU.
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Sequence

import numpy as np
import pandas as pd
import torch
from torch import nn
from tqdm.auto import tqdm

from workbench.batches import (
    count_correct, cross_entropy, inputs_of, is_causal_lm, logits_of, run_model, targets_of, to_device, token_mask,
)
from workbench.data.loaders import as_loader
from workbench.devices import resolve_device
from workbench.train.callbacks import TrainState
from workbench.train.checkpointer import Checkpointer
from workbench.train.distributed import EpochBatches, samples_in, setup_distributed, wrap_ddp
from workbench.train.guard import FiniteGuard, checkpoint_note
from workbench.train.distiller import Distiller
from workbench.train.interrupt import StopOnInterrupt, agree_to_stop, mark_interrupted, stop_for
from workbench.train.precision import autocast_settings

__all__ = ["fit", "accuracy", "logits_of", "History"]

History = pd.DataFrame  # one row per step: epoch, step, loss, each term, lr (+ eval_accuracy per epoch)
SCHEDULES = ("constant", "cosine")
OptimizerLike = torch.optim.Optimizer | Callable[[Iterable[nn.Parameter]], torch.optim.Optimizer]


class _Supervised(nn.Module):
    """A plain model as a training objective: ``batch -> (cross-entropy, {})``."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, batch: Any) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        targets = targets_of(batch)
        if targets is None:
            raise TypeError(
                "fit needs labelled batches: (x, y) tuples or dicts with 'labels'; got a batch without targets"
            )
        inputs = inputs_of(batch)
        logits = _forward(self.model, inputs)
        shift = logits.dim() > 2 and is_causal_lm(self.model)  # causal LMs: position t predicts token t + 1
        return cross_entropy(logits, targets, mask=token_mask(inputs), shift=shift), {}


def _forward(model: nn.Module, inputs: Any) -> torch.Tensor:
    return logits_of(run_model(model, inputs), model)


def _rng_scope(device: torch.device) -> Any:
    """Fork the global RNG so seeding inside ``fit`` does not change the caller's random stream."""
    devices = [device.index if device.index is not None else torch.cuda.current_device()] if device.type == "cuda" else []
    return torch.random.fork_rng(devices=devices)


def _step_seed(seed: int, rank: int, step: int) -> int:
    return int(np.random.SeedSequence([seed % 2**63, rank, step]).generate_state(1, np.uint64)[0] % 2**63)


def _make_optimizer(objective: nn.Module, optimizer: OptimizerLike | None, lr: float) -> torch.optim.Optimizer:
    distiller = objective if isinstance(objective, Distiller) else None
    params = distiller.trainable_parameters() if distiller else list(objective.parameters())
    if optimizer is None:
        return torch.optim.AdamW(params, lr=lr)
    if not isinstance(optimizer, torch.optim.Optimizer):
        return optimizer(params)
    if distiller is not None:
        held = {id(p) for group in optimizer.param_groups for p in group["params"]}
        missing = [name for name, p in distiller.terms.named_parameters() if p.requires_grad and id(p) not in held]
        if missing:
            raise ValueError(
                f"the optimizer does not hold {len(missing)} trainable term parameters ({missing[:3]}); "
                "make it from distiller.trainable_parameters() after distiller.build(batch), or pass a "
                "callable (e.g. lambda params: torch.optim.SGD(params, lr=0.1))"
            )
    return optimizer


def _make_scheduler(optimizer: torch.optim.Optimizer, scheduler: Any, schedule: str, total: int | None) -> Any:
    if scheduler is not None and schedule != "constant":
        raise ValueError(f"pass either scheduler= or schedule={schedule!r}, not both")
    if scheduler is None:
        if schedule != "cosine":
            return None
        if total is None:
            raise ValueError("schedule='cosine' needs data of known length (a sized dataset or loader)")
        return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=total)
    if isinstance(scheduler, torch.optim.lr_scheduler.LRScheduler):
        return scheduler
    return scheduler(optimizer)


def _call(callbacks: Sequence[Any], hook: str, state: TrainState) -> None:
    for callback in callbacks:
        method = getattr(callback, hook, None)
        if method is not None:
            method(state)


def _train_step(module: nn.Module, optimizer: torch.optim.Optimizer, scaler: Any, dtype: torch.dtype | None,
                batch: Any, state: TrainState, seed: int, last_checkpoint: Any, guard: FiniteGuard) -> dict[str, float]:
    """One optimizer step; returns the logged values (averaged over ranks). Non-finite -> FloatingPointError.

    The loss values, the gradients' check and the previous step's parameter check are read in one host
    sync, after the backward pass and before the optimizer steps (see :mod:`workbench.train.guard`).
    """
    batch = to_device(batch, state.device)

    def forward(target: nn.Module) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        torch.manual_seed(_step_seed(seed, state.rank, state.step))
        with torch.autocast(state.device.type, dtype=dtype, enabled=dtype is not None):
            return target(batch)

    total, parts = forward(module)
    names = ["loss", *parts]
    logged = torch.stack([total.detach().float(), *(value.float().to(total.device) for value in parts.values())])
    optimizer.zero_grad(set_to_none=True)
    (scaler.scale(total) if scaler is not None else total).backward()  # a NaN loss is refused below, before a step
    if state.world_size > 1:  # also keeps the ranks in step: all stop together on a NaN anywhere
        torch.distributed.all_reduce(logged)
        logged /= state.world_size
    numbers = torch.cat([logged, guard.flags(logged.device)]).tolist()
    values = dict(zip(names, numbers))
    flags = guard.verify_parameters(numbers[len(names):], last_checkpoint)
    bad = [name for name, value in values.items() if not math.isfinite(value)]
    if bad:
        culprits = [name for name in bad if name != "loss"] or ["loss"]
        note = checkpoint_note(last_checkpoint)
        raise FloatingPointError(
            f"non-finite training loss at epoch {state.epoch}, step {state.step} (batch index {state.batch_index} "
            f"of the epoch, from 0): non-finite terms {culprits} "
            f"({', '.join(f'{name}={values[name]}' for name in culprits)}).{note} "
            "Try a lower lr, or check the inputs and the terms named."
        )
    guard.verify_gradients(flags, state, values["loss"], last_checkpoint, forward)
    try:
        if scaler is not None:
            scaler.step(optimizer)
            scaler.update()
        else:
            optimizer.step()
    except KeyboardInterrupt as interrupt:  # the update had begun: the step counts as done (see fit)
        stop_for(interrupt, state)
    guard.after_step(state, logged.device)
    return values


@dataclass
class _Loop:
    """The pieces of one ``fit`` run that every step uses, and the loop over one epoch's batches."""

    module: nn.Module  # what is called: the objective, or its DDP wrapper
    objective: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: Any
    scaler: Any
    dtype: torch.dtype | None
    batches: EpochBatches
    checkpoints: Checkpointer
    callbacks: list[Any]
    state: TrainState
    seed: int
    bar: Any
    guard: FiniteGuard

    def run_epoch(self, epoch: int, skip: int) -> tuple[int, bool]:
        """Train on one epoch's batches from ``skip`` on; ``(next batch index, whether the epoch completed)``.

        A ``KeyboardInterrupt`` in it (one that reached Python: fit's handler not installed) ends the run;
        the unfinished step is discarded (a step counts once its row is in the history).
        """
        state, per_epoch = self.state, self.batches.per_epoch
        self.objective.train()
        state.epoch, rows_before = epoch, len(state.rows)
        try:
            for index, batch in self.batches.epoch(epoch, skip):
                self.step(epoch, index, batch)
                if agree_to_stop(state):
                    break
        except KeyboardInterrupt as interrupt:
            stop_for(interrupt, state)
            state.step = len(state.rows)
            self.optimizer.zero_grad(set_to_none=True)  # the discarded step's gradients
        next_index = skip + len(state.rows) - rows_before
        last_checkpoint = self.checkpoints.last if self.checkpoints.directory is not None else False
        self.guard.settle(last_checkpoint)  # before evaluation, the epoch's checkpoint and the end
        if next_index == 0 and not state.stop:
            raise ValueError(f"the training data gave no batches in epoch {epoch} (an empty iterable, or one that "
                             "can be read only once); fit needs at least one sample every epoch")
        return next_index, not state.stop or next_index == per_epoch

    def step(self, epoch: int, index: int, batch: Any) -> None:
        """One step: train, log, callbacks, a checkpoint when due. An error names the epoch, step and batch."""
        state = self.state
        state.step, state.batch_index = state.step + 1, index
        last_checkpoint = self.checkpoints.last if self.checkpoints.directory is not None else False
        try:
            values = _train_step(self.module, self.optimizer, self.scaler, self.dtype, batch, state, self.seed,
                                 last_checkpoint, self.guard)
        except FloatingPointError:
            raise  # its message names the step already
        except Exception as error:
            if hasattr(error, "add_note"):  # Python 3.11+
                error.add_note(f"raised in fit at epoch {epoch}, step {state.step} (batch index {index} of the epoch, "
                               f"from 0; a batch of {samples_in(batch)} samples)")
            raise
        lr = self.optimizer.param_groups[0]["lr"]
        if self.scheduler is not None:
            self.scheduler.step()
        state.rows.append({"epoch": epoch, "step": state.step, **values, "lr": lr})
        self.bar.update(1)
        self.bar.set_postfix(epoch=epoch, loss=f"{values['loss']:.4f}", refresh=False)
        if self.callbacks:  # they may read the weights: check the update first
            self.guard.settle(last_checkpoint)
        _call(self.callbacks, "on_step_end", state)
        end_of_epoch = self.batches.per_epoch is not None and index == self.batches.per_epoch - 1
        if self.checkpoints.due(state.step) and not end_of_epoch and not state.stop:
            self.guard.settle(last_checkpoint)
            self.checkpoints.save(state.step, epoch, index + 1, state.rows)


def _check_arguments(eval: Any, eval_data: Any, epochs: int, schedule: str, checkpoint_dir: Any,
                     checkpoint_every: Any, resume: bool, overwrite: bool = False) -> Any:
    """Fail early on bad settings; returns the evaluation data (``eval`` or its alias ``eval_data``)."""
    if isinstance(eval, int) and not isinstance(eval, bool):
        raise TypeError("fit(model, train, eval, epochs): the third argument is the evaluation data; pass epochs=N")
    if eval is not None and eval_data is not None:
        raise ValueError("pass the evaluation data once: eval= or its alias eval_data=")
    if epochs < 1:
        raise ValueError(f"epochs must be >= 1, got {epochs}")
    if schedule not in SCHEDULES:
        raise ValueError(f"schedule must be one of {SCHEDULES}, got {schedule!r}")
    if checkpoint_every is not None and (not isinstance(checkpoint_every, int) or checkpoint_every < 1):
        raise ValueError(f"checkpoint_every must be a positive number of steps or None, got {checkpoint_every!r}")
    if resume and checkpoint_dir is None:
        raise ValueError("resume=True needs checkpoint_dir= (where the checkpoints are)")
    if overwrite and checkpoint_dir is None:
        raise ValueError("overwrite=True needs checkpoint_dir= (the folder whose old run it replaces)")
    return eval if eval is not None else eval_data


def _history(rows: list[dict[str, Any]], with_eval: bool) -> History:
    head, tail = ["epoch", "step", "loss"], ["lr"] + (["eval_accuracy"] if with_eval else [])
    parts: list[str] = []
    for row in rows:
        parts.extend(key for key in row if key not in head + tail + parts and key != "eval_accuracy")
    return pd.DataFrame(rows, columns=head + parts + tail)


def fit(
    model: nn.Module,
    train: Any,
    eval: Any = None,
    epochs: int = 1,
    *,
    lr: float = 1e-3,
    batch_size: int = 128,
    optimizer: OptimizerLike | None = None,
    scheduler: Any = None,
    schedule: str = "constant",
    device: str | torch.device = "auto",
    seed: int = 0,
    callbacks: Sequence[Any] = (),
    checkpoint_dir: str | os.PathLike | None = None,
    checkpoint_every: int | None = None,
    resume: bool = False,
    overwrite: bool = False,
    amp: str | bool | None = "auto",
    progress: bool = True,
    eval_data: Any = None,
    last_batch: str = "merge",
) -> History:
    """Train a plain model (cross-entropy) or a :class:`Distiller`; return the history, one row per step.

    ``train`` / ``eval`` are anything :func:`workbench.data.as_loader` takes (``eval_data`` is an alias
    of ``eval``). Each epoch visits ``train`` in an order seeded by ``seed + epoch``, in global batches
    of ``batch_size``. AdamW at ``lr`` unless ``optimizer`` (an optimizer, or a callable taking the
    parameters) is given; ``scheduler`` is a callable ``optimizer -> LR scheduler`` stepped after every
    step (``schedule="cosine"`` is a shortcut). A Distiller is built on the first batch before the
    optimizer is made, so its projectors are trained. ``amp="auto"`` uses bf16 autocast (fp16 with a
    GradScaler where bf16 is missing) on CUDA and nothing elsewhere; ``"bf16"`` and ``"fp16"`` (with a
    GradScaler) force it, on CUDA or the CPU; ``"off"``.

    Columns: ``epoch``, ``step`` (from 1), ``loss`` (the weighted total), each term's unweighted
    value (``ce``, ...) for a Distiller, ``lr``, and ``eval_accuracy`` (the student's top-1) on each
    epoch's last row when ``eval`` is given. A non-finite loss raises ``FloatingPointError`` naming the
    step, the terms and the batch index, before any weight changes; so does a non-finite gradient under
    a finite loss (naming the term and the parameters; under an fp16 GradScaler such a step is skipped
    instead), and an optimizer step that made a parameter non-finite (see :mod:`workbench.train.guard`).
    Empty training data is a ``ValueError``.

    ``checkpoint_dir``: write a checkpoint every ``checkpoint_every`` steps (else at each epoch's end)
    and at the end (see :mod:`workbench.train.checkpoint`); the folder is checked writable before the
    first epoch. ``resume=True`` continues from the newest intact one there (or starts afresh if there
    is none), repeating the uninterrupted history exactly on the CPU; it refuses another optimizer or
    schedule than the checkpoint's. A new run refuses a folder holding checkpoints unless
    ``overwrite=True``, which removes them once the new run's first checkpoint is written (see
    :mod:`workbench.train.checkpointer`). ``callbacks``: see :mod:`workbench.train.callbacks`. Under ``torchrun`` (or an initialised
    process group) the trained module is wrapped in DistributedDataParallel, each rank takes its share
    of every global batch, and the logged values are averaged over ranks. Seeded and deterministic on
    the CPU; the caller's RNG state is left untouched. The model is left in eval mode on ``device``.

    ``last_batch``: what an epoch's short tail (``len(train) % batch_size`` samples) becomes.
    ``"merge"`` (default): a tail shorter than half a batch or than 4 samples joins the batch before
    it (1347 samples in batches of 64: 20 of 64 and one of 67); a longer tail is its own batch. So every
    sample is used every epoch and no batch is below ``min(batch_size, 4)`` samples or half a batch,
    which batch terms (``CKALoss`` debiased, RKD angles, SP) need. ``"drop"``: the tail is left out
    (another one each epoch: the order is reshuffled). ``"keep"``: the tail is its own batch, however
    small. Under ``torchrun`` the rule applies to each rank's share (``batch_size // world`` a batch).
    An ``IterableDataset`` is batched alike; a ``DataLoader`` of yours is used as it is (set its
    ``drop_last``), with one warning if its last batch is tiny. An exception raised inside a step keeps
    its type and gets a note: "raised in fit at epoch e, step s (batch index b of the epoch, ...)".

    Stopping early: a callback's ``state.request_stop(reason)`` (a stop button) or Ctrl-C ends the run
    after the current step; a second Ctrl-C raises ``KeyboardInterrupt`` at once, and a
    ``KeyboardInterrupt`` raised anyway discards the unfinished step (see :mod:`workbench.train.interrupt`
    for what happens to the weights). A checkpoint is then written when ``checkpoint_dir`` is set
    (``resume=True`` continues it), ``on_train_end`` sees ``state.interrupted`` and ``state.stop_reason``
    (``"KeyboardInterrupt"`` for Ctrl-C), an epoch cut short is not evaluated (call :func:`accuracy`),
    and the history so far comes back with ``history.attrs["interrupted"] = {"epoch", "step", "reason"}``
    and a line on stderr. A completed run, or one ended by ``state.stop = True``, has no such mark.

    Example:
        >>> import torch
        >>> from workbench.train import fit
        >>> model = torch.nn.Linear(4, 2)
        >>> x, y = torch.randn(32, 4), torch.randint(0, 2, (32,))
        >>> history = fit(model, (x, y), epochs=2, batch_size=16, device="cpu", progress=False)
        >>> len(history), list(history.columns)
        (4, ['epoch', 'step', 'loss', 'lr'])
    """
    eval = _check_arguments(eval, eval_data, epochs, schedule, checkpoint_dir, checkpoint_every, resume, overwrite)
    device, rank, world = setup_distributed(device)
    distiller = model if isinstance(model, Distiller) else None
    objective = distiller if distiller is not None else _Supervised(model)
    objective.to(device)
    callbacks = list(callbacks)
    with _rng_scope(device):
        torch.manual_seed(seed)
        batches = EpochBatches(train, batch_size, seed, rank, world, last_batch)
        first = to_device(batches.first(), device) if distiller is not None else None
        if distiller is not None and distiller.unbuilt_terms():
            distiller.build(first)
        opt = _make_optimizer(objective, optimizer, lr)
        total = None if batches.per_epoch is None else epochs * batches.per_epoch
        sched = _make_scheduler(opt, scheduler, schedule, total)
        dtype, scaler = autocast_settings(amp, device)
        checkpoints = Checkpointer(
            checkpoint_dir, checkpoint_every, distiller or model, {"optimizer": opt, "scheduler": sched, "scaler": scaler},
            {"seed": seed, "batch_size": batch_size, "last_batch": last_batch, "world_size": world,
             "amp": str(dtype)}, callbacks, rank, world,
        )
        loaded = checkpoints.start(resume, overwrite, batches.per_epoch, epochs)  # before the first epoch
        module = wrap_ddp(objective, device, first) if world > 1 else objective
        state = TrainState(model=model, distiller=distiller, student=distiller.student if distiller else model,
                           optimizer=opt, device=device, epochs=epochs, rank=rank, world_size=world,
                           rows=list(loaded.history) if loaded else [])
        start_epoch, skip = (loaded.epoch, loaded.batch_index) if loaded else (1, 0)
        state.step, state.epoch = (loaded.step if loaded else 0), start_epoch
        loop = _Loop(module, objective, opt, sched, scaler, dtype, batches, checkpoints, callbacks, state, seed,
                     tqdm(total=total, initial=state.step, disable=not progress, desc="fit", leave=False),
                     FiniteGuard(objective, distiller or model, opt, scaler))
        try:
            with StopOnInterrupt(state):
                _call(callbacks, "on_train_begin", state)
                for epoch in range(start_epoch, epochs + 1):
                    if state.stop:
                        break
                    first_index = skip if epoch == start_epoch else 0
                    next_index, completed = loop.run_epoch(epoch, first_index)
                    if eval is not None and next_index > first_index and (completed or not state.interrupted):
                        _evaluate(state, eval, max(batch_size, 256))
                    _call(callbacks, "on_epoch_end", state)
                    if checkpoint_dir is not None and (checkpoint_every is None or checkpoints.due(state.step)
                                                       or epoch == epochs or (state.stop and state.step > 0)):
                        checkpoints.save(state.step, *((epoch + 1, 0) if completed else (epoch, next_index)),
                                         state.rows)
                _call(callbacks, "on_train_end", state)
        finally:
            loop.bar.close()
            objective.eval()
    return mark_interrupted(_history(state.rows, eval is not None), state, announce=rank == 0)


def _evaluate(state: TrainState, data: Any, batch_size: int) -> None:
    """The epoch's eval accuracy on its last row; an interrupt here skips it and ends the run."""
    try:
        state.rows[-1]["eval_accuracy"] = accuracy(state.student, data, batch_size, state.device)
    except KeyboardInterrupt as interrupt:
        stop_for(interrupt, state)


@torch.no_grad()
def accuracy(model: nn.Module, data: Any, batch_size: int = 256, device: str | torch.device = "auto") -> float:
    """Top-1 accuracy in [0, 1] of ``model`` on labelled ``data`` (anything ``as_loader`` takes).

    The model is moved to ``device``; its train/eval mode is restored afterwards. Pass a Distiller's
    ``.student`` to score the student.

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
            inputs = to_device(inputs_of(batch), device)
            logits = _forward(model, inputs)
            shift = logits.dim() > 2 and is_causal_lm(model)
            counts = count_correct(logits, targets, mask=token_mask(inputs), shift=shift)
            correct, seen = correct + counts[0], seen + counts[1]
    finally:
        model.train(was_training)
    if seen == 0:
        raise ValueError("accuracy got no samples")
    return correct / seen
