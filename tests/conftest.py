"""Shared test fixtures: small seeded models and inputs, and a hook counter."""
from __future__ import annotations

import pytest
import torch
from torch import nn


class ConvNet(nn.Module):
    """A small conv net with named stages, for probes: ``blocks.0..2``, ``pool``, ``head``."""

    def __init__(self, widths=(8, 16, 32), in_chans=3, num_classes=5):
        super().__init__()
        layers, previous = [], in_chans
        for index, width in enumerate(widths):
            stride = 1 if index == 0 else 2
            layers.append(nn.Sequential(nn.Conv2d(previous, width, 3, stride, 1), nn.BatchNorm2d(width), nn.ReLU()))
            previous = width
        self.blocks = nn.Sequential(*layers)
        self.pool = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.head = nn.Linear(previous, num_classes)

    def forward(self, x):
        return self.head(self.pool(self.blocks(x)))


@pytest.fixture
def one_thread():
    """One torch thread for the test (fastest for tiny nets on a shared CPU), restored afterwards."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def conv_pair():
    """A (teacher, student) pair of small random conv nets on 3×16×16 inputs, seeded."""
    torch.manual_seed(0)
    return ConvNet((16, 32, 64)).eval(), ConvNet((8, 16, 16)).eval()


@pytest.fixture
def images():
    """300 seeded random 3×16×16 inputs."""
    return torch.randn(300, 3, 16, 16, generator=torch.Generator().manual_seed(1))


@pytest.fixture
def hook_count():
    """A function counting the forward hooks left on any module of a model."""
    return lambda model: sum(len(module._forward_hooks) for module in model.modules())
