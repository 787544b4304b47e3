"""count_parameters / count_flops against counts made by hand."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from workbench.models import TinyCNN, count_flops, count_parameters


def test_linear_and_conv_flops_are_twice_the_multiply_accumulates():
    assert count_flops(nn.Linear(7, 5), torch.zeros(3, 7)) == 2 * 7 * 5
    conv = nn.Conv2d(3, 8, kernel_size=3, stride=2, padding=1)
    # output 8 × 5 × 5 positions, each 3·3·3 multiply-accumulates
    assert count_flops(conv, torch.zeros(4, 3, 10, 10)) == 2 * (8 * 5 * 5) * (3 * 3 * 3)
    grouped = nn.Conv2d(4, 8, kernel_size=3, padding=1, groups=2)
    assert count_flops(grouped, torch.zeros(1, 4, 6, 6)) == 2 * (8 * 6 * 6) * (2 * 3 * 3)


def test_tiny_cnn_counts_by_hand():
    model = TinyCNN(widths=(4, 8), in_chans=1, num_classes=3, img_size=8)
    convs = 2 * (4 * 8 * 8) * (1 * 9) + 2 * (8 * 4 * 4) * (4 * 9)  # the second block after a 2x2 pool
    assert count_flops(model, torch.zeros(5, 1, 8, 8)) == convs + 2 * 8 * 3
    weights = 1 * 4 * 9 + 4 * 8 * 9  # convs have no bias
    batch_norms = 2 * (4 + 8)
    head = 8 * 3 + 3
    assert count_parameters(model) == weights + batch_norms + head


def test_one_sample_whatever_the_batch_and_mode_restored():
    model = TinyCNN(widths=(4,), img_size=8).train()
    assert count_flops(model, torch.zeros(1, 1, 8, 8)) == count_flops(model, torch.zeros(9, 1, 8, 8))
    assert model.training


def test_shared_and_frozen_parameters():
    shared = nn.Linear(3, 3)
    model = nn.Sequential(shared, nn.ReLU(), shared, nn.Linear(3, 2))
    assert count_parameters(model) == 12 + 8
    model[3].weight.requires_grad_(False)
    assert count_parameters(model, trainable_only=True) == 12 + 2


def test_dict_input_goes_in_as_keywords():
    class TwoInputs(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(4, 2), nn.Linear(6, 2)

        def forward(self, left, right):
            return self.a(left) + self.b(right)

    assert count_flops(TwoInputs(), {"left": torch.zeros(3, 4), "right": torch.zeros(3, 6)}) == 2 * (8 + 12)


@pytest.mark.parametrize("model, example, error, match", [
    (nn.Linear(2, 2), torch.zeros(0, 2), ValueError, "at least one sample"),
    (nn.Linear(2, 2), [1, 2], TypeError, "model input batch"),
    ("cnn", torch.zeros(1, 2), TypeError, "torch.nn.Module"),
])
def test_bad_input(model, example, error, match):
    with pytest.raises(error, match=match):
        count_flops(model, example)
