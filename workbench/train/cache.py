"""Trained tiny teachers and students on demand, cached on disk by a hash of every setting."""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import TensorDataset

from workbench import data as wb_data
from workbench import models
from workbench.train.fit import fit

__all__ = ["trained", "cache_dir"]

CACHE_ENV = "KD_WORKBENCH_CACHE"
NUM_CLASSES = {"digits": 10, "animals": 10, "shapes": 4}
DATASETS = tuple(NUM_CLASSES)
# Bump when the recipe below changes, so old cache entries are not mistaken for new ones.
RECIPE_VERSION = 2
BATCH_SIZE = 64
SHAPES_TRAIN_SIZE = 4096
# shapes(..., seed=0) is the default evaluation set, so training draws from another seed.
SHAPES_TRAIN_SEED = 1
DEFAULT_EPOCHS = 6
DEFAULT_LR = 5e-3


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


def _build(name: str, dataset: str, size: int, channels: int, model_kwargs: dict[str, Any]) -> nn.Module:
    if name in models.factory._HF_TINY or name.startswith(models.factory._HF_PREFIX):
        raise ValueError(f"trained({name!r}) trains image classifiers; {name!r} is a transformers model")
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


def trained(
    name: str,
    dataset: str = "digits",
    *,
    epochs: int = DEFAULT_EPOCHS,
    seed: int = 0,
    size: int = 32,
    channels: int = 1,
    lr: float = DEFAULT_LR,
    progress: bool = True,
    **model_kwargs: Any,
) -> nn.Module:
    """A ``models.create(name, ...)`` model trained on ``dataset``, loaded from the cache when present.

    The model is built with ``in_chans=channels`` and ``img_size=size`` (when it takes them) and
    ``num_classes`` of the dataset, trained with :func:`fit` (AdamW, batch 64, cosine schedule) on
    ``training_data(dataset, size, channels)`` — evaluate on ``digits("test", size, channels)`` or
    ``shapes(n, seed=0)`` — and saved as safetensors under :func:`cache_dir`, in a file named by a
    hash of every setting and the torch version. A second call with the same settings loads the file
    instead of training. Returns the model on the CPU, in eval mode.

    Example:
        >>> from workbench.data import digits
        >>> from workbench.train import trained, accuracy
        >>> student = trained("cnn_small", epochs=1, progress=False)
        >>> 0.0 <= accuracy(student, digits("test"), device="cpu") <= 1.0
        True
    """
    if dataset not in DATASETS:
        raise ValueError(f"dataset must be one of {DATASETS}, got {dataset!r}")
    settings = {
        "name": name,
        "dataset": dataset,
        "epochs": epochs,
        "seed": seed,
        "size": size,
        "channels": channels,
        "lr": lr,
        "batch_size": BATCH_SIZE,
        "schedule": "cosine",
        "model_kwargs": model_kwargs,
        "torch": torch.__version__,
        "recipe": RECIPE_VERSION,
    }
    path = cache_path(name, settings)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)  # the initial weights depend on the seed too
        model = _build(name, dataset, size, channels, model_kwargs)
    if path.is_file():
        models.load_weights(model, path)
        return model.eval()
    fit(
        model,
        training_data(dataset, size, channels),
        epochs=epochs,
        lr=lr,
        batch_size=BATCH_SIZE,
        seed=seed,
        progress=progress,
        schedule="cosine",
    )
    model.cpu()
    models.save_weights(model, path)
    return model.eval()
