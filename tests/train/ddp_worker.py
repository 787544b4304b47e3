"""The distillation run that tests/train/test_ddp.py compares: under torchrun, or in one process.

    torchrun --nproc_per_node=2 --standalone tests/train/ddp_worker.py OUT.json

writes (on rank 0) the history, the CKA trajectory and the final student weights to ``OUT.json``;
``run()`` is the same run in the calling process. The models are MLPs without BatchNorm and the
terms (KD, FitNet through a linear projector) are means over samples, so the ranks' mean losses and
DDP's averaged gradients equal one process's on the whole global batch.
"""
from __future__ import annotations

import json
import sys
from typing import Any

import torch
from torch.utils.data import TensorDataset

STEPS_PER_EPOCH = 8  # 256 samples in global batches of 32


def run(optimizer: str = "adamw") -> dict[str, Any]:
    """Train the fixed teacher/student pair for one epoch; return what the test compares."""
    from workbench import models
    from workbench.data import digits
    from workbench.losses import KD, FitNet, Term
    from workbench.similarity import CKATrajectory
    from workbench.train import Distiller, fit

    class Samples(Term):
        """Logs how many samples this rank's batch holds (weight 0: no effect on training)."""

        def forward(self, student, teacher, targets=None):
            return torch.tensor(float(student.shape[0]))

    x, y = digits("train", size=8).tensors
    train = TensorDataset(x[:256], y[:256])
    probe = x[256:320]  # 4 probe batches of 16: 2 per rank under 2 processes
    torch.manual_seed(0)
    teacher = models.create("mlp", hidden=(64, 32), img_size=8).eval()
    student = models.create("mlp", hidden=(32, 16), img_size=8)
    distiller = Distiller(
        teacher, student, {"kd": (KD(T=4.0), 1.0), "hint": (FitNet(), 0.5), "samples": (Samples(), 0.0)}, layers={"hint": ("layers.1", "layers.1")}
    )
    trajectory = CKATrajectory(probe, ["layers.0", "layers.1"], ["layers.0", "layers.1"], every=4, batch_size=16)
    make = (lambda p: torch.optim.SGD(p, lr=0.1)) if optimizer == "sgd" else None
    history = fit(distiller, train, epochs=1, batch_size=32, lr=3e-3, optimizer=make, device="cpu", seed=0,
                  callbacks=[trajectory], progress=False)
    return {
        "history": history.to_dict(orient="list"),
        "cka_steps": trajectory.steps,
        "cka": trajectory.values.tolist(),
        "student": {key: value.tolist() for key, value in student.state_dict().items()},
        "world_size": torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1,
    }


if __name__ == "__main__":
    torch.set_num_threads(1)
    result = run(*sys.argv[2:3])
    if torch.distributed.is_initialized():
        rank = torch.distributed.get_rank()
        torch.distributed.destroy_process_group()
    else:
        rank = 0
    if rank == 0:
        with open(sys.argv[1], "w") as file:
            json.dump(result, file)
