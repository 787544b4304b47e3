"""What ``fit`` does with a checkpoint folder: one run per folder, written when due, resumed safely.

- **A new run** (``resume=False``) refuses a folder that holds checkpoints (``FileExistsError``) unless
  ``overwrite=True``: then the old run's checkpoints are removed only after the new run's first
  checkpoint is safely written. Each run has an id; pruning only ever removes the same run's older
  checkpoints, so another run's higher step numbers can never make a run delete its own work.
- **The folder is checked before the first epoch**: made if missing, and a probe file written (a file
  in the way, a read-only or full disk fail then, not after an epoch of training).
- **Resuming** (``resume=True``) reads the newest checkpoint completely before loading anything; a
  damaged one (missing file, truncated weights, bad ``state.json``) is skipped with a warning naming
  what was wrong, and the newest intact one is used. The optimizer / scheduler / grad-scaler *recipe*
  (classes and hyper-parameters as made, before any step: lr, betas, T_max, ...) is stored with every
  checkpoint; resuming with another one is a ``ValueError`` listing the differences — never a silent mix
  of the saved state with new settings. Positions outside this run's data (a batch index past the
  epoch, an epoch past ``epochs``) are refused.
"""
from __future__ import annotations

import json
import os
import secrets
import shutil
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from workbench.files import DiskFullError, write_atomic
from workbench.train.checkpoint import (CheckpointState, _apply, _make_folder, _read, save_checkpoint,
                                        step_folders)

__all__ = ["Checkpointer", "recipe"]


def _plain(value: Any) -> Any:
    """``value`` as JSON would give it back (tensors as lists, tuples as lists, objects by type name)."""
    def convert(item: Any) -> Any:
        return item.tolist() if isinstance(item, torch.Tensor) else f"<{type(item).__name__}>"

    return json.loads(json.dumps(value, default=convert))


def recipe(optimizer: Any = None, scheduler: Any = None, scaler: Any = None) -> dict[str, Any]:
    """What the optimizer, scheduler and grad scaler were made with: classes and settings, JSON-plain.

    Take it before the first step (``fit`` does): the optimizer's param-group settings (lr, betas, ...)
    and the scheduler's constructor state (T_max, base_lrs, ...), which later steps change.

    Example:
        >>> import torch
        >>> from workbench.train.checkpointer import recipe
        >>> optimizer = torch.optim.SGD(torch.nn.Linear(2, 1).parameters(), lr=0.1)
        >>> made = recipe(optimizer)
        >>> made["optimizer"]["class"], made["optimizer"]["groups"][0]["lr"], made["scheduler"]
        ('torch.optim.sgd.SGD', 0.1, None)
    """
    def describe(thing: Any, state: Any) -> dict[str, Any] | None:
        if thing is None:
            return None
        return {"class": f"{type(thing).__module__}.{type(thing).__qualname__}", **_plain(state)}

    groups = None if optimizer is None else {
        "groups": [{key: value for key, value in group.items() if key != "params"} for group in optimizer.param_groups]}
    return {"optimizer": describe(optimizer, groups),
            "scheduler": describe(scheduler, None if scheduler is None else scheduler.state_dict()),
            "scaler": describe(scaler, None if scaler is None else scaler.state_dict())}


def _differences(saved: Any, now: Any, where: str = "") -> list[str]:
    if isinstance(saved, dict) and isinstance(now, dict):
        return [line for key in sorted(set(saved) | set(now), key=str)
                for line in _differences(saved.get(key), now.get(key), f"{where}.{key}" if where else str(key))]
    if isinstance(saved, list) and isinstance(now, list) and len(saved) == len(now):
        return [line for index, (a, b) in enumerate(zip(saved, now)) for line in _differences(a, b, f"{where}[{index}]")]
    return [] if saved == now else [f"{where}: {saved!r} (checkpoint) vs {now!r} (now)"]


class Checkpointer:
    """What ``fit`` does with checkpoints: when to write them, what goes in, and resuming from the newest.

    ``states`` are the optimizer / scheduler / scaler (keyword names of :func:`save_checkpoint`), made
    but not yet stepped (their :func:`recipe` is taken here); ``metadata`` settings that should match on
    resume (a mismatch warns); ``callbacks`` with ``state_dict()`` / ``load_state_dict()`` are saved and
    restored too. Under DDP only rank 0 writes, and every rank waits for it. ``directory=None`` turns
    everything off. Call :meth:`start` before training.

    Example:
        >>> import tempfile, torch
        >>> model = torch.nn.Linear(2, 2)
        >>> checkpointer = Checkpointer(tempfile.mkdtemp(), every=2, module=model)
        >>> checkpointer.start(resume=True) is None, checkpointer.due(4)  # nothing to resume: a new run
        (True, True)
        >>> checkpointer.save(step=4, epoch=1, batch_index=4, rows=[{"step": s} for s in range(1, 5)])
        >>> checkpointer.last.name, checkpointer.resume().step
        ('step-000004', 4)
    """

    def __init__(
        self,
        directory: str | os.PathLike | None,
        every: int | None,
        module: nn.Module,
        states: dict[str, Any] | None = None,
        metadata: dict[str, Any] | None = None,
        callbacks: Sequence[Any] = (),
        rank: int = 0,
        world_size: int = 1,
    ) -> None:
        self.directory = Path(directory) if directory is not None else None
        self.every, self.module = every, module
        self.states = {key: value for key, value in (states or {}).items() if value is not None}
        self.recipe = recipe(**self.states)
        self.metadata, self.callbacks = dict(metadata or {}), list(callbacks)
        self.rank, self.world_size = rank, world_size
        self.last: Path | None = None
        self.run = secrets.token_hex(8)
        self._replaced: list[Path] = []  # an older run's checkpoints, removed after this run's first one

    def due(self, step: int) -> bool:
        """Whether ``step`` is a multiple of ``every`` (and checkpointing is on)."""
        return self.directory is not None and self.every is not None and step % self.every == 0

    def start(self, resume: bool = False, overwrite: bool = False, per_epoch: int | None = None,
              epochs: int | None = None) -> CheckpointState | None:
        """Check the folder, then resume from it (``resume=True``) or claim it for a new run.

        Returns what was loaded, or ``None`` for a new run. ``per_epoch`` (batches per epoch) and
        ``epochs`` of this run bound the position a checkpoint may resume at.
        """
        if self.directory is None:
            return None
        if resume and overwrite:
            raise ValueError("pass resume=True (continue the run in checkpoint_dir) or overwrite=True (replace "
                             "it with a new run), not both")
        if self.rank == 0:
            self.check_writable()
        if resume:
            loaded = self.resume(per_epoch, epochs)
            if loaded is not None:
                return loaded
        folders = step_folders(self.directory)
        if folders and not overwrite:
            raise FileExistsError(
                f"checkpoint_dir {str(self.directory)!r} already holds checkpoints of another run "
                f"({', '.join(p.name for p in folders[-3:])}); a new run there would mix with them. Pass "
                "resume=True to continue that run, overwrite=True to replace it (its checkpoints are removed "
                "once this run's first checkpoint is written), or another checkpoint_dir"
            )
        self._replaced = folders
        return None

    def check_writable(self) -> None:
        """Make the folder and write (then remove) a probe file in it; a clear ``OSError`` if that fails."""
        assert self.directory is not None
        _make_folder(self.directory)
        probe = self.directory / f".write-test-{secrets.token_hex(4)}"
        try:
            write_atomic(probe, b"")
            probe.unlink()
        except DiskFullError:
            raise
        except OSError as error:
            raise OSError(error.errno, f"checkpoint_dir {str(self.directory)!r} cannot be written "
                                       f"({error.strerror or error}); choose a writable folder") from error

    def save(self, step: int, epoch: int, batch_index: int, rows: list[dict[str, Any]]) -> None:
        """Write the checkpoint for ``step``; training continues at batch ``batch_index`` of ``epoch``."""
        if self.directory is None:
            return
        if self.rank == 0:
            callback_states = {
                str(index): callback.state_dict()
                for index, callback in enumerate(self.callbacks)
                if hasattr(callback, "state_dict") and not isinstance(callback, nn.Module)
            }
            metadata = {**self.metadata, "recipe": self.recipe, "callbacks": callback_states}
            self.last = save_checkpoint(self.directory, self.module, step=step, epoch=epoch, batch_index=batch_index,
                                        history=rows, metadata=metadata, run=self.run, **self.states)
            replaced, self._replaced = self._replaced, []
            for old in replaced:
                if old != self.last:
                    shutil.rmtree(old, ignore_errors=True)
        else:
            self.last = self.directory / f"step-{step:06d}"
        if self.world_size > 1:
            torch.distributed.barrier()  # no rank reads a checkpoint before rank 0 has finished it

    def _newest_intact(self) -> tuple[Path, tuple] | None:
        folders = step_folders(self.directory)
        if not folders:
            return None
        skipped = []
        for folder in reversed(folders):
            try:
                read = _read(folder, with_optimizer=bool(self.states))
                state, _, bundle = read
                missing = [key for key in self.states if key not in bundle]
                if missing:
                    raise ValueError(f"no {' / '.join(missing)} state (is {folder.name}/optimizer.pt missing?)")
                if len(state["history"]) != state["step"]:
                    raise ValueError(f"state.json holds {len(state['history'])} history rows for step {state['step']}")
            except (OSError, ValueError) as error:
                skipped.append(f"{folder.name}: {error}")
                continue
            if skipped:
                warnings.warn(f"resuming from {folder}, the newest intact checkpoint; skipped damaged checkpoints "
                              f"in {str(self.directory)!r}: {'; '.join(skipped)}", stacklevel=4)
            return folder, read
        raise ValueError(f"no intact checkpoint to resume from in {str(self.directory)!r}: {'; '.join(skipped)}. "
                         "Remove the damaged folders, or start a new run (resume=False, overwrite=True)")

    def _check(self, folder: Path, state: dict[str, Any], per_epoch: int | None, epochs: int | None) -> None:
        saved = state["metadata"].get("recipe")
        if saved is None:
            warnings.warn(f"{folder} records no optimizer / scheduler recipe (an older checkpoint): resuming "
                          "without checking that they match", stacklevel=4)
        elif differences := _differences(saved, self.recipe):
            raise ValueError(
                f"cannot resume {str(folder)!r}: this run's optimizer / scheduler / grad scaler differ from the "
                f"checkpoint's: {'; '.join(differences[:6])}. Loading its state into them would silently mix two "
                "recipes (e.g. an old T_max with a new lr). Resume with the same optimizer, lr and schedule (for "
                "schedule='cosine' the same epochs), or start a new run: overwrite=True or another checkpoint_dir"
            )
        if per_epoch is not None and state["batch_index"] >= per_epoch:
            raise ValueError(f"{str(folder / 'state.json')!r}: batch_index {state['batch_index']} is outside this "
                             f"run's epoch of {per_epoch} batches; was it written with other data or batch_size?")
        if epochs is not None and state["epoch"] > epochs + 1:
            raise ValueError(f"{str(folder)!r} is at epoch {state['epoch']}, past this run's epochs={epochs}: pass "
                             f"epochs >= {state['epoch'] - 1} to resume it")

    def resume(self, per_epoch: int | None = None, epochs: int | None = None) -> CheckpointState | None:
        """Load the newest intact checkpoint into the module, states and callbacks; ``None`` if there is none."""
        if self.directory is None:
            return None
        found = self._newest_intact()
        if found is None:
            return None
        folder, read = found
        self._check(folder, read[0], per_epoch, epochs)
        loaded = _apply(folder, read, self.module, self.states)
        changed = {key: (loaded.metadata[key], value) for key, value in self.metadata.items()
                   if key in loaded.metadata and loaded.metadata[key] != value}
        if changed:
            warnings.warn(f"resuming {loaded.path} with other settings {changed} (saved, now): the history will "
                          "not match an uninterrupted run", stacklevel=3)
        for index, state in loaded.metadata.get("callbacks", {}).items():
            if int(index) < len(self.callbacks) and hasattr(self.callbacks[int(index)], "load_state_dict"):
                self.callbacks[int(index)].load_state_dict(state)
        self.last, self.run = loaded.path, loaded.run  # its run goes on: pruning keeps working
        return loaded
