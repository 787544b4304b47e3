"""fit's last_batch policy: a short epoch tail merged (default), dropped or kept; errors inside a step name it."""
from __future__ import annotations

import math

import pandas as pd
import pytest
import torch
from hypothesis import given, settings, strategies as st
from torch.utils.data import DataLoader, IterableDataset, TensorDataset

from spike_terms import Crash, CrashAt
from workbench import models
from workbench.data import digits
from workbench.losses import KD, CKALoss, Term
from workbench.train import Distiller, fit
from workbench.train.distributed import EpochBatches, batch_sizes

SETTINGS = dict(batch_size=32, lr=3e-3, device="cpu", seed=1, progress=False)


class Samples(Term):
    """Logs how many samples the step's batch holds (weight 0: no effect on training)."""

    def forward(self, student, teacher, targets=None):
        return torch.tensor(float(student.shape[0]))


@pytest.fixture(scope="module")
def pixels():
    return digits("train", size=8).tensors  # 1347 samples of 8 x 8


def _distiller(with_cka=False):
    torch.manual_seed(0)
    teacher = models.create("mlp", hidden=(32,), img_size=8).eval()
    student = models.create("mlp", hidden=(16,), img_size=8)
    terms = {"kd": (KD(T=4), 1.0), "samples": (Samples(), 0.0)}
    if not with_cka:
        return Distiller(teacher, student, terms)
    return Distiller(teacher, student, {**terms, "cka": (CKALoss(), 1.0)}, layers={"cka": ("layers.0", "layers.0")})


def _sizes(history, epoch):
    return history.loc[history["epoch"] == epoch, "samples"].astype(int).tolist()


def test_cka_loss_trains_an_epoch_of_digits_at_batch_64(pixels):
    """1347 = 21 x 64 + 3: the 3-sample tail used to make CKALoss(debiased=True) fail at the epoch's end."""
    x, y = pixels
    assert len(x) == 1347
    distiller = _distiller(with_cka=True)
    history = fit(distiller, (x, y), **{**SETTINGS, "batch_size": 64})
    assert len(history) == 1347 // 64 == 21
    assert _sizes(history, 1) == [64] * 20 + [64 + 1347 % 64]  # the tail joined the last full batch
    assert history["cka"].notna().all() and history["loss"].map(math.isfinite).all()


@pytest.mark.parametrize("n, batch", [(134, 32), (150, 32), (128, 32), (20, 32), (1347, 64), (9, 2)])
@pytest.mark.parametrize("policy", ["merge", "drop", "keep"])
def test_batches_per_epoch_follow_the_policy_arithmetic(n, batch, policy):
    x = torch.arange(n, dtype=torch.float32).unsqueeze(1)
    data = (x, torch.zeros(n, dtype=torch.long))
    if policy == "drop" and n < batch:
        with pytest.raises(ValueError, match="last_batch='drop' leaves no batch.*smaller batch_size"):
            EpochBatches(data, batch, seed=0, rank=0, world=1, last_batch=policy)
        return
    batches = EpochBatches(data, batch, seed=0, rank=0, world=1, last_batch=policy)
    seen = [inputs.flatten().long().tolist() for _, (inputs, _) in batches.epoch(2)]
    sizes = [len(part) for part in seen]
    full, tail = n // batch, n - batch * (n // batch)
    expected = {
        "keep": [batch] * full + ([tail] if tail else []),
        "drop": [batch] * full,
        # merged when the tail is under half a batch or under 4 samples, and there is a batch to join
        "merge": ([batch] * (full - 1) + [batch + tail]) if tail and full and (2 * tail < batch or tail < 4)
        else [batch] * full + ([tail] if tail else []),
    }[policy]
    assert sizes == expected and batches.per_epoch == len(expected)
    flat = [i for part in seen for i in part]
    assert len(set(flat)) == len(flat) and len(flat) == (full * batch if policy == "drop" else n)


@settings(max_examples=200, deadline=None)
@given(st.integers(1, 2000), st.integers(1, 256))
def test_merge_keeps_every_sample_and_no_batch_below_the_floor(n, batch):
    sizes = batch_sizes(n, batch, "merge")
    assert sum(sizes) == n and all(size == batch for size in sizes[:-1])
    if len(sizes) > 1:  # the data holds more than one batch: its last is no tiny tail
        assert sizes[-1] >= min(batch, 4) and 2 * sizes[-1] >= batch
        assert sizes[-1] < batch + max(batch / 2, 4)


def test_ranks_share_every_merged_global_batch():
    """2 ranks, 134 samples, global batches of 32: each rank 67 = 4 x 16 + 3, the 3 joining its 4th batch."""
    n = 134
    data = (torch.arange(n, dtype=torch.float32).unsqueeze(1), torch.zeros(n, dtype=torch.long))
    one = [x.flatten().long().tolist() for _, (x, _) in EpochBatches(data, 32, 0, 0, 1).epoch(1)]
    ranks = [[x.flatten().long().tolist() for _, (x, _) in EpochBatches(data, 32, 0, rank, 2).epoch(1)]
             for rank in (0, 1)]
    assert [len(part) for part in ranks[0]] == [len(part) for part in ranks[1]] == [16, 16, 16, 19]
    assert [len(part) for part in one] == [32, 32, 32, 38]
    for k in range(3):  # the full global batches hold the same samples as one process's
        assert sorted(ranks[0][k] + ranks[1][k]) == sorted(one[k])
    assert sorted(i for rank in ranks for part in rank for i in part) == list(range(n))  # 134 = 2 x 67: no padding


def test_history_batch_sizes_and_cosine_total_per_policy(pixels):
    x, y = pixels[0][:134], pixels[1][:134]  # 134 = 4 x 32 + 6: merged (6 < 16)
    histories = {policy: fit(_distiller(), (x, y), epochs=2, schedule="cosine", last_batch=policy, **SETTINGS)
                 for policy in ("merge", "drop", "keep")}
    expected = {"merge": [32, 32, 32, 38], "drop": [32] * 4, "keep": [32] * 4 + [6]}
    for policy, history in histories.items():
        assert _sizes(history, 1) == _sizes(history, 2) == expected[policy], policy
        total = len(history)  # the cosine schedule spans exactly the steps the policy makes
        assert history["lr"].tolist() == pytest.approx(
            [3e-3 * (1 + math.cos(math.pi * t / total)) / 2 for t in range(total)], rel=1e-6), policy
    assert min(_sizes(histories["merge"], 1)) >= 4
    with pytest.raises(ValueError, match=r"last_batch must be one of \('merge', 'drop', 'keep'\), got 'pad'"):
        fit(_distiller(), (x, y), last_batch="pad", **SETTINGS)


def test_resume_across_a_merged_epoch_repeats_the_uninterrupted_history(pixels, tmp_path):
    x, y = pixels[0][:134], pixels[1][:134]
    run = dict(epochs=2, schedule="cosine", checkpoint_every=3, **SETTINGS)
    expected = fit(_distiller(), (x, y), epochs=2, schedule="cosine", **SETTINGS)
    with pytest.raises(Crash):  # the newest checkpoint is step 3: the merged batch (index 3) is still ahead
        fit(_distiller(), (x, y), checkpoint_dir=tmp_path, callbacks=[CrashAt(at_step=5)], **run)
    history = fit(_distiller(), (x, y), checkpoint_dir=tmp_path, resume=True, **run)
    pd.testing.assert_frame_equal(history, expected)
    assert _sizes(history, 1)[-1] == 38


class Stream(IterableDataset):
    def __init__(self, x, y, sized):
        self.x, self.y, self.sized = x, y, sized

    def __iter__(self):
        return iter(zip(self.x, self.y))

    def __len__(self):
        if not self.sized:
            raise TypeError("no length")
        return len(self.x)


@pytest.mark.parametrize("sized", [True, False])
def test_an_iterable_dataset_is_merged_and_counted_alike(pixels, sized):
    x, y = pixels[0][:134], pixels[1][:134]
    history = fit(_distiller(), Stream(x, y, sized), epochs=2, **SETTINGS)
    assert _sizes(history, 1) == _sizes(history, 2) == [32, 32, 32, 38]
    dropped = fit(_distiller(), Stream(x, y, sized), last_batch="drop", **SETTINGS)
    assert _sizes(dropped, 1) == [32] * 4
    if sized:  # its length gives the cosine schedule the right total
        cosine = fit(_distiller(), Stream(x, y, sized), epochs=2, schedule="cosine", **SETTINGS)
        assert cosine["lr"].iloc[-1] == pytest.approx(3e-3 * (1 + math.cos(math.pi * 7 / 8)) / 2, rel=1e-6)


def test_a_users_dataloader_is_used_as_it_is_with_one_warning_for_a_tiny_tail(pixels):
    x, y = pixels[0][:131], pixels[1][:131]  # 131 = 4 x 32 + 3
    loader = DataLoader(TensorDataset(x, y), batch_size=32)
    with pytest.warns(UserWarning, match="last batch holds 3 samples .*drop_last=True") as caught:
        history = fit(_distiller(), loader, epochs=2, **SETTINGS)
    assert len([w for w in caught if "last batch holds" in str(w.message)]) == 1  # once, not every epoch
    assert _sizes(history, 1) == _sizes(history, 2) == [32] * 4 + [3]


def test_an_error_inside_a_step_names_epoch_step_and_batch(pixels):
    x, y = pixels[0][:131], pixels[1][:131]  # kept: a last batch of 3, too few for the debiased CKA
    distiller = _distiller(with_cka=True)
    with pytest.raises(ValueError, match="needs at least 4 samples per batch, got 3") as error:
        fit(distiller, (x, y), epochs=2, last_batch="keep", **SETTINGS)
    assert error.value.__notes__ == [
        "raised in fit at epoch 1, step 5 (batch index 4 of the epoch, from 0; a batch of 3 samples)"]
