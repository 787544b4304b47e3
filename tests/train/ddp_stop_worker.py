"""A run stopped on rank 0 only, under torchrun: tests/train/test_interrupt.py checks every rank stops with it.

    torchrun --nproc_per_node=2 --standalone tests/train/ddp_stop_worker.py OUT_PREFIX

Each rank writes ``OUT_PREFIX.<rank>.json``: the per-step batch sizes this rank saw, and the history's
interrupted mark. 134 samples in global batches of 32: each rank's share of 67 is 16, 16, 16 and a
merged 19 (its 3-sample tail joins the batch before it).
"""
from __future__ import annotations

import json
import sys

import torch
import torch.distributed as dist

from test_last_batch import Samples
from workbench import models
from workbench.data import digits
from workbench.losses import KD
from workbench.train import Callback, Distiller, fit


class StopOnRankZero(Callback):
    def on_step_end(self, state):
        if state.rank == 0 and state.step == 6:
            state.request_stop("stop button")


if __name__ == "__main__":
    torch.set_num_threads(1)
    x, y = digits("train", size=8).tensors
    torch.manual_seed(0)
    teacher = models.create("mlp", hidden=(32,), img_size=8).eval()
    student = models.create("mlp", hidden=(16,), img_size=8)
    distiller = Distiller(teacher, student, {"kd": (KD(T=4), 1.0), "samples": (Samples(), 0.0)})
    history = fit(distiller, (x[:134], y[:134]), epochs=2, batch_size=32, device="cpu", progress=False,
                  callbacks=[StopOnRankZero()])
    rank = dist.get_rank()
    with open(f"{sys.argv[1]}.{rank}.json", "w") as file:
        # the logged values are rank means: 'samples' is the mean share, equal on both ranks here
        json.dump({"samples": history["samples"].tolist(), "interrupted": history.attrs.get("interrupted")}, file)
    dist.destroy_process_group()
