"""Training checkpoints that load without unpickling code: safetensors weights, tensors-only optimizer state, JSON.

A checkpoint is a folder ``<directory>/step-000042/`` holding

- ``weights.safetensors``: the trained module's ``state_dict`` — for a :class:`~workbench.train.Distiller`
  the student and the terms' projectors (never the teacher);
- ``optimizer.pt`` (when there is an optimizer): ``torch.save`` of the optimizer's, scheduler's and
  grad scaler's state dicts — tensors, numbers, strings and containers only, read back with
  ``torch.load(weights_only=True)``;
- ``state.json``: where training continues (``step``, ``epoch``, ``batch_index``: batches already done
  in that epoch), the history rows so far and free-form metadata. No RNG state: ``fit`` reseeds every
  step from ``(seed, rank, step)`` and orders each epoch from ``seed + epoch``, so none is needed.

The folder is written under a temporary name and renamed when complete, so a crash mid-write never
leaves a half checkpoint that looks whole; older checkpoints beyond ``keep_last`` are removed only
after the new one is in place.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from workbench.models.weights import load_weights, save_weights

__all__ = ["Checkpointer", "CheckpointState", "save_checkpoint", "load_checkpoint", "latest_checkpoint", "list_checkpoints"]

FORMAT_VERSION = 1
KEEP_LAST = 2
WEIGHTS_FILE, OPTIMIZER_FILE, STATE_FILE = "weights.safetensors", "optimizer.pt", "state.json"
_NAME = re.compile(r"step-(\d+)")
_PLAIN = (torch.Tensor, int, float, bool, str, type(None))


@dataclass
class CheckpointState:
    """What :func:`load_checkpoint` read besides the tensors: the position and the history so far."""

    path: Path
    step: int
    epoch: int
    batch_index: int
    history: list[dict[str, Any]] = field(default_factory=list)
    metadata: dict[str, Any] = field(default_factory=dict)


def _check_plain(value: Any, where: str) -> None:
    """Refuse anything ``torch.load(weights_only=True)`` could not read back (objects, functions)."""
    if isinstance(value, dict):
        for key, item in value.items():
            _check_plain(key, where)
            _check_plain(item, f"{where}[{key!r}]")
    elif isinstance(value, (list, tuple)):
        for index, item in enumerate(value):
            _check_plain(item, f"{where}[{index}]")
    elif not isinstance(value, _PLAIN):
        raise TypeError(
            f"cannot checkpoint {where}: it holds a {type(value).__name__}; only tensors, numbers, strings and "
            "containers of them are saved (so that loading never unpickles code)"
        )


def list_checkpoints(directory: str | os.PathLike) -> list[Path]:
    """Complete checkpoint folders under ``directory``, oldest step first.

    Example:
        >>> import tempfile
        >>> list_checkpoints(tempfile.mkdtemp())
        []
    """
    directory = Path(directory)
    if not directory.is_dir():
        return []
    found = [
        (int(match.group(1)), path)
        for path in directory.iterdir()
        if (match := _NAME.fullmatch(path.name)) and (path / STATE_FILE).is_file()
    ]
    return [path for _, path in sorted(found)]


def latest_checkpoint(directory: str | os.PathLike) -> Path | None:
    """The newest complete checkpoint folder under ``directory``, or ``None``.

    Example:
        >>> import tempfile
        >>> latest_checkpoint(tempfile.mkdtemp()) is None
        True
    """
    found = list_checkpoints(directory)
    return found[-1] if found else None


def save_checkpoint(
    directory: str | os.PathLike,
    module: nn.Module,
    *,
    step: int,
    epoch: int = 1,
    batch_index: int = 0,
    optimizer: torch.optim.Optimizer | None = None,
    scheduler: Any = None,
    scaler: Any = None,
    history: list[dict[str, Any]] | tuple = (),
    metadata: dict[str, Any] | None = None,
    keep_last: int = KEEP_LAST,
) -> Path:
    """Write ``<directory>/step-<step>/`` atomically and prune all but the ``keep_last`` newest; returns it.

    Example:
        >>> import tempfile, torch
        >>> model = torch.nn.Linear(3, 2)
        >>> optimizer = torch.optim.AdamW(model.parameters())
        >>> path = save_checkpoint(tempfile.mkdtemp(), model, step=7, optimizer=optimizer)
        >>> path.name, sorted(p.name for p in path.iterdir())
        ('step-000007', ['optimizer.pt', 'state.json', 'weights.safetensors'])
    """
    if keep_last < 1:
        raise ValueError(f"keep_last must be >= 1, got {keep_last}")
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    states = {"optimizer": optimizer, "scheduler": scheduler, "scaler": scaler}
    bundle = {key: value.state_dict() for key, value in states.items() if value is not None}
    _check_plain(bundle, "the optimizer state")
    state = {
        "format": FORMAT_VERSION,
        "step": int(step),
        "epoch": int(epoch),
        "batch_index": int(batch_index),
        "history": list(history),
        "metadata": dict(metadata or {}),
    }
    final = directory / f"step-{int(step):06d}"
    temporary = Path(tempfile.mkdtemp(dir=directory, prefix=f".{final.name}.", suffix=".tmp"))
    try:
        save_weights(module, temporary / WEIGHTS_FILE)
        if bundle:
            torch.save(bundle, temporary / OPTIMIZER_FILE)
        (temporary / STATE_FILE).write_text(json.dumps(state, indent=1))  # written last: marks it complete
        if final.exists():  # the same step written again (a resumed run): replace it
            shutil.rmtree(final)
        os.replace(temporary, final)
    finally:
        if temporary.exists():
            shutil.rmtree(temporary, ignore_errors=True)
    for old in list_checkpoints(directory)[:-keep_last]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def load_checkpoint(
    path: str | os.PathLike,
    module: nn.Module,
    *,
    optimizer: torch.optim.Optimizer | None = None,
    scheduler: Any = None,
    scaler: Any = None,
) -> CheckpointState:
    """Load a checkpoint folder (or the newest under a directory) into ``module`` and the given states.

    Weights load strictly through safetensors; the optimizer file with ``torch.load(weights_only=True)``.

    Example:
        >>> import tempfile, torch
        >>> model = torch.nn.Linear(3, 2)
        >>> folder = tempfile.mkdtemp()
        >>> _ = save_checkpoint(folder, model, step=3, epoch=2, history=[{"step": 3, "loss": 0.5}])
        >>> state = load_checkpoint(folder, torch.nn.Linear(3, 2))
        >>> state.step, state.epoch, state.history
        (3, 2, [{'step': 3, 'loss': 0.5}])
    """
    path = Path(path)
    if not (path / STATE_FILE).is_file():
        newest = latest_checkpoint(path)
        if newest is None:
            raise FileNotFoundError(f"no checkpoint in {str(path)!r}: expected step-NNNNNN folders with {STATE_FILE}")
        path = newest
    state = json.loads((path / STATE_FILE).read_text())
    if state.get("format") != FORMAT_VERSION:
        raise ValueError(f"{str(path)!r} has checkpoint format {state.get('format')!r}; this version reads {FORMAT_VERSION}")
    load_weights(module, path / WEIGHTS_FILE)
    wanted = {"optimizer": optimizer, "scheduler": scheduler, "scaler": scaler}
    if any(value is not None for value in wanted.values()):
        bundle = {}
        if (path / OPTIMIZER_FILE).is_file():
            bundle = torch.load(path / OPTIMIZER_FILE, map_location="cpu", weights_only=True)
        for key, target in wanted.items():
            if target is None:
                continue
            if key not in bundle:
                raise ValueError(f"{str(path)!r} holds no {key} state to resume from")
            target.load_state_dict(bundle[key])
    return CheckpointState(
        path=path,
        step=state["step"],
        epoch=state["epoch"],
        batch_index=state["batch_index"],
        history=state["history"],
        metadata=state["metadata"],
    )


class Checkpointer:
    """What ``fit`` does with checkpoints: when to write them, what goes in, and resuming from the newest.

    ``states`` are the optimizer / scheduler / scaler (keyword names of :func:`save_checkpoint`);
    ``metadata`` settings that must match on resume (a mismatch warns); ``callbacks`` with
    ``state_dict()`` / ``load_state_dict()`` are saved and restored too. Under DDP only rank 0
    writes, and every rank waits for it. ``directory=None`` turns everything off.

    Example:
        >>> import tempfile, torch
        >>> model = torch.nn.Linear(2, 2)
        >>> checkpointer = Checkpointer(tempfile.mkdtemp(), every=2, module=model)
        >>> checkpointer.due(4), checkpointer.resume()
        (True, None)
        >>> checkpointer.save(step=4, epoch=1, batch_index=4, rows=[])
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
        self.metadata, self.callbacks = dict(metadata or {}), list(callbacks)
        self.rank, self.world_size = rank, world_size
        self.last: Path | None = None

    def due(self, step: int) -> bool:
        """Whether ``step`` is a multiple of ``every`` (and checkpointing is on)."""
        return self.directory is not None and self.every is not None and step % self.every == 0

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
            self.last = save_checkpoint(
                self.directory, self.module, step=step, epoch=epoch, batch_index=batch_index,
                history=rows, metadata={**self.metadata, "callbacks": callback_states}, **self.states,
            )
        else:
            self.last = self.directory / f"step-{step:06d}"
        if self.world_size > 1:
            torch.distributed.barrier()  # no rank reads a checkpoint before rank 0 has finished it

    def resume(self) -> CheckpointState | None:
        """Load the newest checkpoint into the module, states and callbacks; ``None`` if there is none."""
        if self.directory is None or latest_checkpoint(self.directory) is None:
            return None
        loaded = load_checkpoint(self.directory, self.module, **self.states)
        changed = {
            key: (loaded.metadata[key], value)
            for key, value in self.metadata.items()
            if key in loaded.metadata and loaded.metadata[key] != value
        }
        if changed:
            warnings.warn(
                f"resuming {loaded.path} with other settings {changed} (saved, now): the history will not "
                "match an uninterrupted run",
                stacklevel=3,
            )
        for index, state in loaded.metadata.get("callbacks", {}).items():
            if int(index) < len(self.callbacks) and hasattr(self.callbacks[int(index)], "load_state_dict"):
                self.callbacks[int(index)].load_state_dict(state)
        self.last = loaded.path
        return loaded
