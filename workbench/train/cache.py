"""Trained tiny teachers and students on demand, cached on disk by a hash of every setting."""
from __future__ import annotations

import hashlib
import json
import math
import os
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import TensorDataset

from workbench import data as wb_data
from workbench import models
from workbench.files import write_atomic
from workbench.train.fit import fit
from workbench.train.recipes import default_recipe

__all__ = ["TrainingRecord", "cache_dir", "trained", "trained_path", "training_record"]

CACHE_ENV = "KD_WORKBENCH_CACHE"
NUM_CLASSES = {"digits": 10, "animals": 10, "shapes": 4}
DATASETS = tuple(NUM_CLASSES)
# Bump when what a cache entry means changes (the training loop below), so old entries are not mistaken
# for new ones. Epochs and lr are in every entry's hash, so changing a default recipe needs no bump.
RECIPE_VERSION = 2
BATCH_SIZE = 64
SHAPES_TRAIN_SIZE = 4096
# shapes(..., seed=0) is the default evaluation set, so training draws from another seed.
SHAPES_TRAIN_SEED = 1
SHAPES_EVAL_SIZE = 512
RECORD_ATTRIBUTE = "training_record"
# fit's policy for a short last batch. The cached models train on cross-entropy alone, which any batch
# size serves, so they keep their short last batch (1,347 digits = 21 × 64 + 3): the teachers are the very
# models the committed results in reports/results/ were made with. Distillation runs use fit's default.
LAST_BATCH = "keep"


def cache_dir() -> Path:
    """The weight cache folder: ``$KD_WORKBENCH_CACHE``, else ``~/.cache/kd-workbench``.

    Example:
        >>> from workbench.train import cache_dir
        >>> cache_dir().name != ""
        True
    """
    configured = os.environ.get(CACHE_ENV)
    return Path(configured).expanduser() if configured else Path.home() / ".cache" / "kd-workbench"


def num_classes(dataset: str) -> int:
    """The number of classes of ``dataset`` (one of :data:`DATASETS`); another name is a ``ValueError``
    that lists them.

    Example:
        >>> from workbench.train.cache import num_classes
        >>> num_classes("animals"), num_classes("shapes")
        (10, 4)
    """
    if dataset not in NUM_CLASSES:
        raise ValueError(f"dataset must be one of {DATASETS}, got {dataset!r}")
    return NUM_CLASSES[dataset]


def training_data(dataset: str, size: int, channels: int) -> TensorDataset:
    """The training set :func:`trained` uses: ``digits("train")``, ``animals("train")`` or
    ``shapes(4096, seed=1)``.

    Evaluate on held-out data: ``digits("test", size, channels)``, ``animals("test", size, channels)``
    or ``shapes(n, seed=0)``.

    Example:
        >>> from workbench.train.cache import training_data
        >>> len(training_data("digits", 32, 1))
        1347
    """
    if dataset == "digits":
        return wb_data.digits("train", size=size, channels=channels)
    if dataset == "animals":
        return wb_data.animals("train", size=size, channels=channels)
    if dataset == "shapes":
        return wb_data.shapes(SHAPES_TRAIN_SIZE, size=size, channels=channels, seed=SHAPES_TRAIN_SEED)
    raise ValueError(f"dataset must be one of {DATASETS}, got {dataset!r}")


def _check_image_model(name: str) -> None:
    if name in models.factory._HF_TINY or name.startswith(models.factory._HF_PREFIX):
        raise ValueError(f"trained({name!r}) trains image classifiers; {name!r} is a transformers model")


def _build(name: str, dataset: str, size: int, channels: int, model_kwargs: dict[str, Any]) -> nn.Module:
    _check_image_model(name)
    kwargs = dict(model_kwargs)
    kwargs.setdefault("num_classes", num_classes(dataset))
    kwargs.setdefault("in_chans", channels)
    return models.create_sized(name, size, **kwargs)


def cache_path(name: str, settings: dict[str, Any]) -> Path:
    """The cache file for ``settings``: ``<cache_dir>/<name>-<dataset>-<sha256[:16]>.safetensors``.

    Example:
        >>> from workbench.train.cache import cache_path
        >>> cache_path("cnn", {"dataset": "digits"}).suffix
        '.safetensors'
    """
    blob = json.dumps(settings, sort_keys=True, default=repr)
    digest = hashlib.sha256(blob.encode()).hexdigest()[:16]
    safe_name = "".join(c if c.isalnum() or c in "-_." else "_" for c in name)
    return cache_dir() / f"{safe_name}-{settings.get('dataset', 'data')}-{digest}.safetensors"


def evaluation_split(dataset: str, size: int, channels: int, n_shapes: int = SHAPES_EVAL_SIZE) -> TensorDataset:
    """The held-out data :func:`trained` scores each epoch on (and the reports measure on):
    ``digits("test")``, ``animals("test")`` or ``shapes(n_shapes, seed=0)`` (never seen in training).

    Example:
        >>> from workbench.train.cache import evaluation_split
        >>> len(evaluation_split("digits", 32, 1)), len(evaluation_split("shapes", 16, 1))
        (450, 512)
    """
    if dataset == "digits":
        return wb_data.digits("test", size=size, channels=channels)
    if dataset == "animals":
        return wb_data.animals("test", size=size, channels=channels)
    if dataset == "shapes":
        return wb_data.shapes(n_shapes, size=size, channels=channels, seed=0)
    raise ValueError(f"dataset must be one of {DATASETS}, got {dataset!r}")


@dataclass(frozen=True)
class TrainingRecord:
    """How a cached model was trained: its settings, and the held-out accuracy after each epoch
    (``eval_accuracy[e]`` after epoch ``e + 1``, on ``n_eval`` samples of :func:`evaluation_split`).
    Stored as JSON beside the weights (``<weights>.json``)."""

    name: str
    dataset: str
    epochs: int
    lr: float
    eval_accuracy: tuple[float, ...]
    n_eval: int
    num_classes: int
    recipe: str  # the recipe family, or "custom" when epochs / lr were given

    @property
    def final_accuracy(self) -> float:
        """The held-out accuracy after the last epoch."""
        return self.eval_accuracy[-1]

    def to_json(self) -> str:
        """The record as JSON text (what the sidecar file holds)."""
        return json.dumps({**asdict(self), "eval_accuracy": list(self.eval_accuracy)}, indent=1) + "\n"

    @classmethod
    def from_json(cls, text: str) -> TrainingRecord:
        """A record read back from :meth:`to_json` text."""
        fields = json.loads(text)
        return cls(**{**fields, "eval_accuracy": tuple(float(a) for a in fields["eval_accuracy"])})


def record_path(weights: Path) -> Path:
    """The training record beside a cached weights file: the same name with ``.json``.

    Example:
        >>> from pathlib import Path
        >>> from workbench.train.cache import record_path
        >>> record_path(Path("cnn-digits-0123.safetensors")).name
        'cnn-digits-0123.json'
    """
    return weights.with_suffix(".json")


def training_record(model: nn.Module) -> TrainingRecord | None:
    """The :class:`TrainingRecord` of a model :func:`trained` returned (None for any other model).

    Example:
        >>> from workbench.train import trained, training_record
        >>> record = training_record(trained("cnn_small", epochs=1, progress=False))
        >>> record.epochs, len(record.eval_accuracy)
        (1, 1)
    """
    record = getattr(model, RECORD_ATTRIBUTE, None)
    return record if isinstance(record, TrainingRecord) else None


def _settings(name: str, dataset: str, epochs: int, seed: int, size: int, channels: int, lr: float,
              model_kwargs: dict[str, Any]) -> dict[str, Any]:
    return {
        "name": name,
        "dataset": dataset,
        "epochs": epochs,
        "seed": seed,
        "size": size,
        "channels": channels,
        "lr": lr,
        "batch_size": BATCH_SIZE,
        "schedule": "cosine",
        "last_batch": LAST_BATCH,
        "model_kwargs": model_kwargs,
        "torch": torch.__version__,
        "recipe": RECIPE_VERSION,
    }


def trained_path(
    name: str, dataset: str = "digits", *, epochs: int | None = None, seed: int = 0, size: int = 32,
    channels: int = 1, lr: float | None = None, **model_kwargs: Any,
) -> Path:
    """The cache file :func:`trained` reads or writes for these arguments (``None``: the recipe's).

    Example:
        >>> from workbench.train.cache import trained_path
        >>> trained_path("cnn") == trained_path("cnn", epochs=6, lr=5e-3)  # the cnn recipe: 6 epochs, 5e-3
        True
    """
    recipe = default_recipe(name)
    epochs = recipe.epochs if epochs is None else epochs
    lr = recipe.lr if lr is None else lr
    return cache_path(name, _settings(name, dataset, epochs, seed, size, channels, lr, model_kwargs))


def _check_budget(epochs: Any, lr: Any) -> None:
    if isinstance(epochs, bool) or not isinstance(epochs, int) or epochs < 1:
        raise ValueError(f"epochs must be a positive int or None (the recipe's), got {epochs!r}")
    if isinstance(lr, bool) or not isinstance(lr, (int, float)) or not math.isfinite(lr) or lr <= 0:
        raise ValueError(f"lr must be a finite positive number or None (the recipe's), got {lr!r}")


def trained(
    name: str,
    dataset: str = "digits",
    *,
    epochs: int | None = None,
    seed: int = 0,
    size: int = 32,
    channels: int = 1,
    lr: float | None = None,
    progress: bool = True,
    callbacks: Sequence[Any] = (),
    **model_kwargs: Any,
) -> nn.Module:
    """A ``models.create(name, ...)`` model trained on ``dataset``, loaded from the cache when present.

    ``epochs`` / ``lr`` default to the model family's recipe (:func:`workbench.train.recipes.default_recipe`,
    ``docs/recipes.md``: e.g. 6 epochs at 5e-3 for ``"cnn"``, 30 at 1e-3 for ``"vit"``). The model is
    built with ``in_chans=channels`` and ``img_size=size`` (when it takes them) and ``num_classes`` of the
    dataset, trained with :func:`fit` (AdamW, batch 64, cosine schedule, ``callbacks`` passed on) on
    ``training_data(dataset, size, channels)``, scored after every epoch on the held-out
    :func:`evaluation_split`, and saved as safetensors under :func:`cache_dir`, in a file named by a
    hash of every setting and the torch version, with its :class:`TrainingRecord` beside it (JSON).
    A second call with the same settings loads the file instead of training. Returns the model on the
    CPU, in eval mode; :func:`training_record` gives its record.

    A run that comes back interrupted (Ctrl-C, or a callback's ``request_stop``) is not cached: it
    raises ``KeyboardInterrupt`` saying where it stopped.

    Example:
        >>> from workbench.data import digits
        >>> from workbench.train import trained, accuracy
        >>> student = trained("cnn_small", epochs=1, progress=False)
        >>> 0.0 <= accuracy(student, digits("test"), device="cpu") <= 1.0
        True
    """
    if dataset not in DATASETS:
        raise ValueError(f"dataset must be one of {DATASETS}, got {dataset!r}")
    _check_image_model(name)
    recipe = default_recipe(name)
    family = recipe.family if epochs is None and lr is None else "custom"
    epochs = recipe.epochs if epochs is None else epochs
    lr = recipe.lr if lr is None else lr
    _check_budget(epochs, lr)
    path = cache_path(name, _settings(name, dataset, epochs, seed, size, channels, lr, model_kwargs))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)  # the initial weights depend on the seed too
        model = _build(name, dataset, size, channels, model_kwargs)
    sidecar = record_path(path)
    if path.is_file() and sidecar.is_file():  # an entry without its record (older code) is trained again
        models.load_weights(model, path)
        setattr(model, RECORD_ATTRIBUTE, TrainingRecord.from_json(sidecar.read_text(encoding="utf-8")))
        return model.eval()
    held_out = evaluation_split(dataset, size, channels)
    history = fit(
        model,
        training_data(dataset, size, channels),
        held_out,
        epochs=epochs,
        lr=lr,
        batch_size=BATCH_SIZE,
        seed=seed,
        progress=progress,
        schedule="cosine",
        last_batch=LAST_BATCH,
        callbacks=callbacks,
    )
    stopped = history.attrs.get("interrupted")
    if stopped:
        where = (f" at epoch {stopped.get('epoch')}, step {stopped.get('step')} ({stopped.get('reason')})"
                 if isinstance(stopped, dict) else "")
        raise KeyboardInterrupt(f"training {name!r} on {dataset} was interrupted{where}; nothing was cached")
    record = TrainingRecord(name, dataset, epochs, float(lr),
                            tuple(float(a) for a in history["eval_accuracy"].dropna()),
                            len(held_out), num_classes(dataset), family)
    model.cpu()
    models.save_weights(model, path)
    write_atomic(sidecar, record.to_json())
    setattr(model, RECORD_ATTRIBUTE, record)
    return model.eval()
