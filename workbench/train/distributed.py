"""What ``fit`` needs to run under ``torchrun``: the process group, each rank's share of every global
batch, and the DistributedDataParallel wrapper.

The same code runs with one process: the sample order always comes from a ``DistributedSampler`` seeded
by ``seed + epoch``, which is what makes a resumed run repeat the uninterrupted one exactly.
"""
from __future__ import annotations

import os
from collections.abc import Iterator
from itertools import islice
from typing import Any

import torch
from torch import nn
from torch.utils.data import BatchSampler, DataLoader, DistributedSampler, IterableDataset

from workbench.batches import targets_of
from workbench.data.loaders import as_loader
from workbench.devices import resolve_device
from workbench.train.distiller import Distiller

__all__ = ["EpochBatches", "setup_distributed", "wrap_ddp"]


class EpochBatches:
    """This rank's batches of each epoch: samples ordered by ``seed + epoch``, each rank a share of every
    global batch of ``batch_size`` (rank r takes positions r, r + world, ... of it).

    Example:
        >>> import torch
        >>> from workbench.train.distributed import EpochBatches
        >>> data = (torch.arange(10.0).unsqueeze(1), torch.zeros(10, dtype=torch.long))
        >>> batches = EpochBatches(data, batch_size=4, seed=0, rank=0, world=1)
        >>> batches.per_epoch, [len(x) for _, (x, y) in batches.epoch(1)]
        (3, [4, 4, 2])
        >>> [x.flatten().tolist() for _, (x, y) in batches.epoch(1, skip=2)] == [x.flatten().tolist() for _, (x, y) in batches.epoch(1)][2:]
        True
    """

    def __init__(self, data: Any, batch_size: int, seed: int, rank: int, world: int) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if batch_size % world:
            raise ValueError(f"batch_size={batch_size} is the global batch; it must divide evenly among {world} ranks")
        self.loader: DataLoader | None = None
        if isinstance(data, DataLoader):
            if world > 1 and not isinstance(data.sampler, DistributedSampler):
                raise ValueError(
                    "under torchrun, pass the training data as tensors or a Dataset (fit shards it with a "
                    "DistributedSampler), or a DataLoader whose sampler is a DistributedSampler"
                )
            self.loader = data
        else:
            base = as_loader(data, batch_size=batch_size)
            if isinstance(base.dataset, IterableDataset):
                if world > 1:
                    raise ValueError("under torchrun, fit needs a map-style dataset (with __getitem__) to shard")
                self.loader = base
            else:
                self.dataset = base.dataset
                self.sampler = DistributedSampler(self.dataset, num_replicas=world, rank=rank, shuffle=True, seed=seed)
                self.batch_sampler = BatchSampler(self.sampler, batch_size // world, drop_last=False)
        try:
            self.per_epoch: int | None = len(self.loader if self.loader is not None else self.batch_sampler)
        except TypeError:  # an IterableDataset without __len__ (an empty one is caught after its first epoch)
            self.per_epoch = None
        if self.per_epoch == 0:
            raise ValueError("the training data holds no samples (an empty dataset or DataLoader: 0 batches per "
                             "epoch); fit needs at least one labelled sample")

    def epoch(self, epoch: int, skip: int = 0) -> Iterator[tuple[int, Any]]:
        """``(batch index in the epoch, batch)`` from batch ``skip`` on (skipped batches are not loaded)."""
        if self.loader is not None:
            if hasattr(self.loader.sampler, "set_epoch"):
                self.loader.sampler.set_epoch(epoch - 1)
            return islice(enumerate(self.loader), skip, None)
        self.sampler.set_epoch(epoch - 1)
        index_batches = list(self.batch_sampler)[skip:]
        return enumerate(DataLoader(self.dataset, batch_sampler=index_batches), start=skip)

    def first(self) -> Any:
        for _, batch in self.epoch(1):
            return batch
        raise ValueError("the training data holds no samples")


def setup_distributed(device: str | torch.device) -> tuple[torch.device, int, int]:
    """``(device, rank, world_size)``; starts the process group (NCCL on CUDA, else gloo) when torchrun's
    variables say so, else ``(device, 0, 1)``.

    Example:
        >>> from workbench.train.distributed import setup_distributed
        >>> setup_distributed("cpu")  # not under torchrun
        (device(type='cpu'), 0, 1)
    """
    import torch.distributed as dist

    wanted = resolve_device(device)
    if not dist.is_available():
        return wanted, 0, 1
    launched = int(os.environ.get("WORLD_SIZE", "1")) > 1 and "MASTER_ADDR" in os.environ
    if not dist.is_initialized() and launched:
        if wanted.type == "cuda":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group("nccl" if wanted.type == "cuda" else "gloo")
    if not dist.is_initialized():
        return wanted, 0, 1
    if wanted.type == "cuda" and wanted.index is None:
        wanted = torch.device("cuda", int(os.environ.get("LOCAL_RANK", torch.cuda.current_device())))
    return wanted, dist.get_rank(), dist.get_world_size()


def wrap_ddp(objective: nn.Module, device: torch.device, first_batch: Any) -> nn.Module:
    """DistributedDataParallel around the student (+ projectors); the teacher stays outside it."""
    from torch.nn.parallel import DistributedDataParallel

    # Without labels and logit terms, the student's layers after the deepest hint get no gradient.
    unused = isinstance(objective, Distiller) and not objective.logit_terms() and targets_of(first_batch) is None
    return DistributedDataParallel(
        objective, device_ids=[device.index] if device.type == "cuda" else None, find_unused_parameters=unused
    )
