"""Training checkpoints that load without unpickling code: safetensors weights, tensors-only optimizer state, JSON.

A checkpoint is a folder ``<directory>/step-000042/`` holding

- ``weights.safetensors``: the trained module's ``state_dict`` — for a :class:`~workbench.train.Distiller`
  the student and the terms' projectors (never the teacher);
- ``optimizer.pt`` (when there is an optimizer): ``torch.save`` of the optimizer's, scheduler's and
  grad scaler's state dicts — tensors, numbers, strings and containers only, read back with
  ``torch.load(weights_only=True)``;
- ``state.json``: where training continues (``step``, ``epoch``, ``batch_index``: batches already done
  in that epoch), the ``run`` that wrote it, the history rows so far and metadata (for ``fit``: the
  optimizer / scheduler recipe, seed, batch size, callback states). No RNG state: ``fit`` reseeds every
  step from ``(seed, rank, step)`` and orders each epoch from ``seed + epoch``, so none is needed.

Every file is written through :func:`workbench.files.atomic_path` into a temporary folder that is renamed
when complete, so a crash or a full disk (:class:`~workbench.files.DiskFullError`, "No space left on
device") never leaves a half checkpoint that looks whole, nor touches the previous ones. Parameters
must be finite: non-finite weights are never saved. Pruning (``keep_last``) removes only checkpoints
of the *same run* with lower steps, after the new one is in place — another run's checkpoints in the
folder are never touched.
"""
from __future__ import annotations

import json
import os
import re
import secrets
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from workbench.files import atomic_path, write_atomic
from workbench.models.weights import apply_state_dict, read_state_dict, save_weights

__all__ = ["CheckpointState", "save_checkpoint", "load_checkpoint", "latest_checkpoint", "list_checkpoints",
           "step_folders"]

FORMAT_VERSION = 1
KEEP_LAST = 2
WEIGHTS_FILE, OPTIMIZER_FILE, STATE_FILE = "weights.safetensors", "optimizer.pt", "state.json"
_NAME = re.compile(r"step-(\d+)")
_PLAIN = (torch.Tensor, int, float, bool, str, type(None))


@dataclass
class CheckpointState:
    """What :func:`load_checkpoint` read besides the tensors: the position, the run and the history so far."""

    path: Path
    step: int
    epoch: int
    batch_index: int
    history: list[dict[str, Any]] = field(default_factory=list)
    metadata: dict[str, Any] = field(default_factory=dict)
    run: str | None = None


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


def step_folders(directory: str | os.PathLike) -> list[Path]:
    """Every ``step-NNNNNN`` folder under ``directory``, complete or damaged, oldest step first.

    Example:
        >>> import tempfile
        >>> step_folders(tempfile.mkdtemp())
        []
    """
    directory = Path(directory)
    if not directory.is_dir():
        return []
    found = [(int(match.group(1)), path) for path in directory.iterdir()
             if (match := _NAME.fullmatch(path.name)) and path.is_dir()]
    return [path for _, path in sorted(found)]


def list_checkpoints(directory: str | os.PathLike) -> list[Path]:
    """Complete checkpoint folders (those with a ``state.json``) under ``directory``, oldest step first.

    Example:
        >>> import tempfile
        >>> list_checkpoints(tempfile.mkdtemp())
        []
    """
    return [path for path in step_folders(directory) if (path / STATE_FILE).is_file()]


def latest_checkpoint(directory: str | os.PathLike) -> Path | None:
    """The newest complete checkpoint folder under ``directory``, or ``None``.

    Example:
        >>> import tempfile
        >>> latest_checkpoint(tempfile.mkdtemp()) is None
        True
    """
    found = list_checkpoints(directory)
    return found[-1] if found else None


def _non_finite_parameters(module: nn.Module) -> list[str]:
    return [name for name, value in module.named_parameters()
            if value.is_floating_point() or value.is_complex()
            if not bool(torch.isfinite(value.detach()).all())]


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
    run: str | None = None,
) -> Path:
    """Write ``<directory>/step-<step>/`` atomically, then prune this ``run``'s older ones beyond ``keep_last``.

    ``run`` names the run (``fit`` draws one per new run); only checkpoints of the same run (``None``
    matches checkpoints saved without one) with lower steps are pruned. Refuses (``ValueError``,
    nothing written) when a parameter of ``module`` holds NaN or Inf. Returns the folder.

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
    _check_position(int(step), int(epoch), int(batch_index), "save_checkpoint")
    bad = _non_finite_parameters(module)
    if bad:
        raise ValueError(f"refusing to checkpoint non-finite weights: {len(bad)} parameters hold NaN or Inf "
                         f"({', '.join(bad[:5])}{', ...' if len(bad) > 5 else ''})")
    directory = Path(directory)
    states = {"optimizer": optimizer, "scheduler": scheduler, "scaler": scaler}
    bundle = {key: value.state_dict() for key, value in states.items() if value is not None}
    _check_plain(bundle, "the optimizer state")
    state = {"format": FORMAT_VERSION, "step": int(step), "epoch": int(epoch), "batch_index": int(batch_index),
             "run": run, "history": list(history), "metadata": dict(metadata or {})}
    text = json.dumps(state, indent=1)
    final = directory / f"step-{int(step):06d}"
    _make_folder(directory)
    temporary = Path(tempfile.mkdtemp(dir=directory, prefix=f".{final.name}.", suffix=".tmp"))
    try:
        save_weights(module, temporary / WEIGHTS_FILE)
        if bundle:
            with atomic_path(temporary / OPTIMIZER_FILE) as optimizer_file:
                torch.save(bundle, optimizer_file)
        write_atomic(temporary / STATE_FILE, text)  # written last: marks it complete
        _swap_into_place(temporary, final)
    finally:
        if temporary.exists():
            shutil.rmtree(temporary, ignore_errors=True)
    _prune(directory, run, int(step), keep_last)
    return final


def _make_folder(directory: Path) -> None:
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except (FileExistsError, NotADirectoryError) as error:
        raise NotADirectoryError(
            error.errno, f"checkpoint folder {str(directory)!r} cannot be made: {str(error.filename)!r} is a "
            "file, not a folder; choose another checkpoint_dir") from None


def _swap_into_place(temporary: Path, final: Path) -> None:
    """Rename the finished folder onto ``final``; an old folder of that name is moved aside first, then removed."""
    aside = None
    if final.exists():  # the same step written again (a resumed run): replace it
        aside = final.with_name(f".{final.name}.{secrets.token_hex(4)}.old")
        os.replace(final, aside)
    os.replace(temporary, final)
    if aside is not None:
        shutil.rmtree(aside, ignore_errors=True)


def _prune(directory: Path, run: str | None, step: int, keep_last: int) -> None:
    older = []
    for path in list_checkpoints(directory):
        number = int(path.name.split("-")[1])
        if number < step and _run_of(path) == (run,):
            older.append(path)
    for old in older[: max(len(older) - (keep_last - 1), 0)]:
        shutil.rmtree(old, ignore_errors=True)


def _run_of(path: Path) -> tuple[str | None] | None:
    """``(run,)`` of a complete checkpoint, ``None`` when its state cannot be read (never pruned then)."""
    try:
        return (_read_state(path).get("run"),)
    except (OSError, ValueError):
        return None


def _check_position(step: int, epoch: int, batch_index: int, where: str) -> None:
    problems = [f"{name}={value}" for name, value, low in (("step", step, 0), ("epoch", epoch, 1),
                                                             ("batch_index", batch_index, 0)) if value < low]
    if problems:
        raise ValueError(f"{where}: {', '.join(problems)} out of range (step >= 0, epoch >= 1, batch_index >= 0)")


def _read_state(path: Path) -> dict[str, Any]:
    """``state.json`` of the checkpoint folder ``path``, checked; ``ValueError`` naming the file and field."""
    file = path / STATE_FILE
    if not file.is_file():
        raise FileNotFoundError(f"{str(file)!r} is missing: the checkpoint is incomplete")
    try:
        state = json.loads(file.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ValueError(f"{str(file)!r} is damaged: not valid JSON ({error})") from None
    if not isinstance(state, dict):
        raise ValueError(f"{str(file)!r} is damaged: it holds a {type(state).__name__}, not a JSON object")
    if state.get("format") != FORMAT_VERSION:
        raise ValueError(f"{str(file)!r} has checkpoint format {state.get('format')!r}; this version reads {FORMAT_VERSION}")
    kinds = {"step": int, "epoch": int, "batch_index": int, "history": list, "metadata": dict}
    for key, kind in kinds.items():
        value = state.get(key)
        if not isinstance(value, kind) or isinstance(value, bool):
            raise ValueError(f"{str(file)!r} is damaged: {key!r} must be a {kind.__name__}, got {value!r:.80}")
    if not all(isinstance(row, dict) for row in state["history"]):
        raise ValueError(f"{str(file)!r} is damaged: 'history' must be a list of rows (JSON objects)")
    if not isinstance(state.get("run"), (str, type(None))):
        raise ValueError(f"{str(file)!r} is damaged: 'run' must be a string, got {state['run']!r:.80}")
    _check_position(state["step"], state["epoch"], state["batch_index"], repr(str(file)))
    return state


def _read(path: Path, with_optimizer: bool) -> tuple[dict[str, Any], dict[str, torch.Tensor], dict[str, Any]]:
    """Read and check every file of a checkpoint folder before anything is loaded into a module."""
    state = _read_state(path)
    weights = read_state_dict(path / WEIGHTS_FILE)
    bundle: dict[str, Any] = {}
    if with_optimizer and (path / OPTIMIZER_FILE).exists():
        try:
            bundle = torch.load(path / OPTIMIZER_FILE, map_location="cpu", weights_only=True)
        except Exception as error:  # torch.load raises many types; all mean "damaged or unsafe"
            raise ValueError(f"{str(path / OPTIMIZER_FILE)!r} is damaged or unsafe ({type(error).__name__}: "
                             f"{str(error).splitlines()[0] if str(error) else ''})") from None
        if not isinstance(bundle, dict):
            raise ValueError(f"{str(path / OPTIMIZER_FILE)!r} is damaged: it holds a {type(bundle).__name__}")
    return state, weights, bundle


def _resolve(path: Path) -> Path:
    if (path / STATE_FILE).exists() or _NAME.fullmatch(path.name):
        return path
    newest = latest_checkpoint(path)
    if newest is None:
        raise FileNotFoundError(f"no checkpoint in {str(path)!r}: expected step-NNNNNN folders with {STATE_FILE}")
    return newest


def _apply(path: Path, read: tuple, module: nn.Module, wanted: dict[str, Any]) -> CheckpointState:
    state, weights, bundle = read
    apply_state_dict(module, weights, str(path / WEIGHTS_FILE))
    for key, target in wanted.items():
        if target is None:
            continue
        if key not in bundle:
            raise ValueError(f"{str(path)!r} holds no {key} state to resume from")
        target.load_state_dict(bundle[key])
    return CheckpointState(path=path, step=state["step"], epoch=state["epoch"], batch_index=state["batch_index"],
                           history=state["history"], metadata=state["metadata"], run=state.get("run"))


def load_checkpoint(
    path: str | os.PathLike,
    module: nn.Module,
    *,
    optimizer: torch.optim.Optimizer | None = None,
    scheduler: Any = None,
    scaler: Any = None,
) -> CheckpointState:
    """Load a checkpoint folder (or the newest under a directory) into ``module`` and the given states.

    Every file is read and checked before anything is loaded: a damaged ``state.json`` (not JSON,
    wrong types, a negative step or epoch) or weight / optimizer file is a ``ValueError`` naming the
    file. Weights load strictly through safetensors; the optimizer file with
    ``torch.load(weights_only=True)``.

    Example:
        >>> import tempfile, torch
        >>> model = torch.nn.Linear(3, 2)
        >>> folder = tempfile.mkdtemp()
        >>> _ = save_checkpoint(folder, model, step=3, epoch=2, history=[{"step": 3, "loss": 0.5}])
        >>> state = load_checkpoint(folder, torch.nn.Linear(3, 2))
        >>> state.step, state.epoch, state.history
        (3, 2, [{'step': 3, 'loss': 0.5}])
    """
    path = _resolve(Path(path))
    wanted = {"optimizer": optimizer, "scheduler": scheduler, "scaler": scaler}
    read = _read(path, with_optimizer=any(value is not None for value in wanted.values()))
    return _apply(path, read, module, wanted)

