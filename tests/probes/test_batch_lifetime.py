"""A streamed batch's activations are freed before the next batch's forward: the probes hold one batch of
features at a time, not two (the generator and the consumer's loop variable used to keep the last one)."""
from __future__ import annotations

import weakref

import torch
from torch import nn

from workbench.probes.cka_stream import cka_matrix
from workbench.probes.stream import paired_batches


class Recorder(nn.Module):
    """A two-layer model that notes, as each forward starts, how many earlier outputs of its first layer are
    still alive: weak references to their storages (a storage's Python object lives as long as the storage
    does, views included; a weak reference to the output tensor itself would die with its first view)."""

    def __init__(self) -> None:
        super().__init__()
        self.first, self.second = nn.Linear(6, 8), nn.Linear(8, 3)
        self.outputs: list[weakref.ref] = []
        self.alive_at_start: list[int] = []
        self.first.register_forward_hook(lambda module, args, output: self.outputs.append(weakref.ref(output.untyped_storage())))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.alive_at_start.append(sum(ref() is not None for ref in self.outputs))
        return self.second(torch.relu(self.first(x)))


def test_paired_batches_keeps_no_earlier_batch_alive():
    teacher, student = Recorder(), Recorder()
    for batch in paired_batches(teacher, student, torch.randn(40, 6), teacher_layers=["first"],
                                student_layers=["first"], batch_size=10, progress=False):
        assert batch.teacher_features["first"].shape == (10, 8)
        del batch  # a consumer done with the batch
    assert teacher.alive_at_start == [0, 0, 0, 0] and student.alive_at_start == [0, 0, 0, 0]


def test_a_batch_a_consumer_keeps_stays_whole():
    teacher, student = Recorder(), Recorder()
    batches = list(paired_batches(teacher, student, torch.randn(30, 6), teacher_layers=["first"],
                                  student_layers=["first"], batch_size=10, progress=False))
    assert teacher.alive_at_start == [0, 1, 2]  # kept by the list, as asked
    assert [tuple(b.teacher_features["first"].shape) for b in batches] == [(10, 8)] * 3


def test_cka_matrix_frees_each_batch_before_the_next_forward():
    teacher, student = Recorder(), Recorder()
    result = cka_matrix(teacher, student, torch.randn(40, 6), ["first"], ["first"], batch_size=10, device="cpu",
                        progress=False)
    assert result.n_samples == 40
    assert teacher.alive_at_start == [0, 0, 0, 0] and student.alive_at_start == [0, 0, 0, 0]
