"""What ``fit`` needs to run under ``torchrun``: the process group, each rank's share of every global
batch, the policy for an epoch's short last batch, and the DistributedDataParallel wrapper.

The same code runs with one process: the sample order always comes from a ``DistributedSampler`` seeded
by ``seed + epoch``, which is what makes a resumed run repeat the uninterrupted one exactly.
"""
from __future__ import annotations

import os
import warnings
from collections.abc import Iterator, Mapping
from itertools import islice
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader, DistributedSampler, IterableDataset

from workbench.batches import inputs_of, n_samples_of, targets_of
from workbench.data.loaders import as_loader
from workbench.devices import resolve_device
from workbench.train.distiller import Distiller

__all__ = ["EpochBatches", "LAST_BATCH", "MIN_BATCH", "batch_sizes", "samples_in", "setup_distributed", "wrap_ddp"]

LAST_BATCH = ("merge", "drop", "keep")
MIN_BATCH = 4  # batch terms need several samples: CKALoss(debiased=True) 4, RKD angles 3, SP 2


def _merges(tail: int, batch_size: int) -> bool:
    """Whether ``last_batch="merge"`` joins a tail of ``tail`` samples to the batch before it."""
    return 0 < tail and (tail < batch_size / 2 or tail < MIN_BATCH)


def _check_policy(last_batch: str) -> None:
    if last_batch not in LAST_BATCH:
        raise ValueError(f"last_batch must be one of {LAST_BATCH}, got {last_batch!r}")


def batch_sizes(n_samples: int, batch_size: int, last_batch: str = "merge") -> list[int]:
    """The sizes of an epoch's batches of ``n_samples`` under a ``last_batch`` policy.

    ``"keep"``: full batches, then the tail (``n_samples % batch_size``) as its own batch. ``"drop"``:
    the full batches only. ``"merge"``: a tail shorter than half a batch or than ``MIN_BATCH`` (4)
    samples joins the batch before it (that batch holds fewer than 1.5 batches, or ``batch_size + 3``);
    a longer tail is its own batch. So no batch is below ``min(batch_size, 4)`` or half a batch, and
    no sample is left out, unless the data is smaller than that (then it is one batch).

    Example:
        >>> batch_sizes(1347, 64)[-2:], len(batch_sizes(1347, 64))  # 1347 = 21 x 64 + 3
        ([64, 67], 21)
        >>> batch_sizes(1347, 64, "keep")[-2:], batch_sizes(1347, 64, "drop")[-1], batch_sizes(100, 64)
        ([64, 3], 64, [64, 36])
    """
    _check_policy(last_batch)
    full, tail = divmod(n_samples, batch_size)
    if last_batch == "drop" or tail == 0:
        return [batch_size] * full
    if last_batch == "merge" and full > 0 and _merges(tail, batch_size):
        return [batch_size] * (full - 1) + [batch_size + tail]
    return [batch_size] * full + [tail]


def _concatenate(head: Any, tail: Any) -> Any:
    """Two default-collated batches as one (tensors joined along the sample axis, lists of items extended)."""
    if isinstance(head, torch.Tensor):
        return torch.cat([head, tail])
    if type(head) is dict:
        return {key: _concatenate(value, tail[key]) for key, value in head.items()}
    if isinstance(head, (list, tuple)) and head and all(isinstance(item, (torch.Tensor, Mapping, list, tuple))
                                                        for item in head):
        return type(head)(_concatenate(a, b) for a, b in zip(head, tail))
    if isinstance(head, list):
        return head + tail
    raise TypeError(f"cannot join batches of type {type(head).__name__}")


def samples_in(batch: Any) -> int | None:
    """How many samples a batch holds (``None`` when its inputs do not say).

    Example:
        >>> import torch
        >>> samples_in((torch.zeros(5, 2), torch.zeros(5)))
        5
    """
    try:
        return n_samples_of(inputs_of(batch))
    except (TypeError, StopIteration, KeyError):
        return None


class EpochBatches:
    """This rank's batches of each epoch: samples ordered by ``seed + epoch``, each rank a share of every
    global batch of ``batch_size`` (rank r takes positions r, r + world, ... of it).

    ``last_batch`` (see :func:`batch_sizes`) applies to each rank's share (``batch_size // world`` a
    batch), so every rank has the same number of batches and every batch term sees enough samples on
    each rank. An ``IterableDataset`` is batched alike, the tail being joined to the batch before it
    (``"merge"``) or dropped. A ``DataLoader`` of the caller's is used as it is: a tiny last batch
    (below 4 samples or half the first batch) gets a warning, once.

    Example:
        >>> import torch
        >>> from workbench.train.distributed import EpochBatches
        >>> data = (torch.arange(10.0).unsqueeze(1), torch.zeros(10, dtype=torch.long))
        >>> batches = EpochBatches(data, batch_size=4, seed=0, rank=0, world=1, last_batch="keep")
        >>> batches.per_epoch, [len(x) for _, (x, y) in batches.epoch(1)]
        (3, [4, 4, 2])
        >>> [len(x) for _, (x, y) in EpochBatches(data, batch_size=4, seed=0, rank=0, world=1).epoch(1)]
        [4, 6]
        >>> [x.flatten().tolist() for _, (x, y) in batches.epoch(1, skip=2)] == [x.flatten().tolist() for _, (x, y) in batches.epoch(1)][2:]
        True
    """

    def __init__(self, data: Any, batch_size: int, seed: int, rank: int, world: int,
                 last_batch: str = "merge") -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if batch_size % world:
            raise ValueError(f"batch_size={batch_size} is the global batch; it must divide evenly among {world} ranks")
        _check_policy(last_batch)
        self.last_batch, self.share = last_batch, batch_size // world
        self.loader: DataLoader | None = None
        self.sizes: list[int] | None = None  # the map-style path: this rank's batch sizes
        self.stream = False  # fit's own loader over an IterableDataset
        self._warned = False
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
                self.loader = DataLoader(base.dataset, batch_size=batch_size, drop_last=last_batch == "drop")
                self.stream = True
            else:
                self.dataset = base.dataset
                self.sampler = DistributedSampler(self.dataset, num_replicas=world, rank=rank, shuffle=True, seed=seed)
                self.sizes = batch_sizes(len(self.sampler), self.share, last_batch)
        self.per_epoch = self._count(batch_size)
        if self.per_epoch == 0:
            raise ValueError(
                "the training data holds no samples (an empty dataset or DataLoader: 0 batches per epoch); fit needs "
                "at least one labelled sample" if last_batch != "drop" else
                f"last_batch='drop' leaves no batch: the data holds fewer samples than one batch of {batch_size}; "
                "pass a smaller batch_size or last_batch='merge'"
            )

    def _count(self, batch_size: int) -> int | None:
        if self.sizes is not None:
            return len(self.sizes)
        assert self.loader is not None
        if self.stream:  # an IterableDataset: its length (if any) says how many samples
            try:
                return len(batch_sizes(len(self.loader.dataset), batch_size, self.last_batch))  # type: ignore[arg-type]
            except TypeError:
                return None
        try:
            return len(self.loader)
        except TypeError:  # an IterableDataset without __len__ (an empty one is caught after its first epoch)
            return None

    def epoch(self, epoch: int, skip: int = 0) -> Iterator[tuple[int, Any]]:
        """``(batch index in the epoch, batch)`` from batch ``skip`` on (skipped batches are not loaded)."""
        if self.loader is None:
            self.sampler.set_epoch(epoch - 1)
            order, starts = list(self.sampler), [0]
            for size in self.sizes or []:
                starts.append(starts[-1] + size)
            index_batches = [order[start:stop] for start, stop in zip(starts[skip:-1], starts[skip + 1:])]
            return enumerate(DataLoader(self.dataset, batch_sampler=index_batches), start=skip)
        if hasattr(self.loader.sampler, "set_epoch"):
            self.loader.sampler.set_epoch(epoch - 1)
        batches = iter(self.loader)
        if self.stream:
            batches = self._joined(batches) if self.last_batch == "merge" else batches
        else:
            batches = self._watched(batches)
        return islice(enumerate(batches), skip, None)

    def _joined(self, batches: Iterator[Any]) -> Iterator[Any]:
        """An iterable dataset's batches with a short tail joined to the batch before it (``"merge"``)."""
        held = next(batches, None)
        for batch in batches:
            size = samples_in(batch)
            if size is not None and size < self.share and _merges(size, self.share):
                try:
                    batch, held = None, _concatenate(held, batch)
                except (TypeError, RuntimeError) as error:
                    self._warn_once(f"the iterable dataset's last batch of {size} samples could not be joined to "
                                    f"the batch before it ({error}); it is used as it is")
            if batch is not None:
                yield held
                held = batch
        if held is not None:
            yield held

    def _watched(self, batches: Iterator[Any]) -> Iterator[Any]:
        """A caller's loader as it is, with one warning if an epoch ends on a batch too small for batch terms."""
        first = last = None
        for batch in batches:
            last = samples_in(batch)
            first = last if first is None else first
            yield batch
        if first is not None and last is not None and last < first and _merges(last, first):
            self._warn_once(
                f"the DataLoader's last batch holds {last} samples (the first {first}): batch terms (CKALoss, "
                "RKD, SP) may fail on it and it makes a noisy step. fit uses a DataLoader as it is; pass "
                "drop_last=True to it, or pass its dataset to fit, whose last_batch='merge' joins a short tail "
                "to the batch before it")

    def _warn_once(self, message: str) -> None:
        if not self._warned:
            self._warned = True
            warnings.warn(message, stacklevel=4)

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
