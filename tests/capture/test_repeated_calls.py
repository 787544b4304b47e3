"""A captured module called more than once in one forward (shared weights): warned, or as chosen."""
from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

import workbench as wb


class Siamese(nn.Module):
    """One encoder applied to both halves of the input: ``encoder`` runs twice per forward."""

    def __init__(self) -> None:
        super().__init__()
        self.encoder = nn.Linear(3, 4)
        self.head = nn.Linear(8, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        left, right = x.chunk(2, dim=1)
        return self.head(torch.cat([self.encoder(left), self.encoder(right)], dim=1))


@pytest.fixture
def siamese_input():
    return torch.randn(5, 6, generator=torch.Generator().manual_seed(0))


def test_a_second_call_warns_once_naming_the_layer_and_keeps_the_last(siamese_input):
    net = Siamese()
    left, right = siamese_input.chunk(2, dim=1)
    with pytest.warns(UserWarning, match=r"'encoder' ran 2 times in one forward of Siamese.*keeps the last call"):
        with wb.capture(net, ["encoder", "head"]) as acts:
            net(siamese_input)
            with warnings.catch_warnings():
                warnings.simplefilter("error")
                net(siamese_input)  # warned once per capture block, not once per batch
    assert torch.equal(acts["encoder"], net.encoder(right))


@pytest.mark.parametrize("on_repeat, side", [("last", 1), ("first", 0)])
def test_on_repeat_last_or_first_keeps_that_call_silently(siamese_input, on_repeat, side):
    net = Siamese()
    halves = siamese_input.chunk(2, dim=1)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with wb.capture(net, ["encoder"], on_repeat=on_repeat) as acts:
            net(siamese_input)
            net(siamese_input)  # a new forward: its first call counts again
    assert torch.equal(acts["encoder"], net.encoder(halves[side]))


def test_on_repeat_error_refuses_and_removes_the_hooks(siamese_input, hook_count):
    net = Siamese()
    with pytest.raises(RuntimeError, match=r"'encoder' ran 2 times in one forward of Siamese"):
        with wb.capture(net, ["encoder"], on_repeat="error"):
            net(siamese_input)
    assert hook_count(net) == 0
    with pytest.raises(ValueError, match=r"on_repeat must be one of .*'warn'.*got 'all'"):
        with wb.capture(net, ["encoder"], on_repeat="all"):
            pass


def test_one_call_per_forward_and_direct_calls_do_not_warn(siamese_input):
    net = nn.Sequential(nn.Linear(6, 4), nn.ReLU())
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with wb.capture(net, ["0", "1"]) as acts:
            for _ in range(3):
                net(siamese_input)
            net[0](siamese_input)  # a layer called on its own, outside a forward of the model: kept
            net[0](siamese_input)
    assert torch.equal(acts["0"], net[0](siamese_input))


def test_activation_checkpointing_recompute_in_backward_is_not_a_repeat(siamese_input):
    class Checkpointed(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.block = nn.Sequential(nn.Linear(6, 4), nn.Tanh())

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return torch.utils.checkpoint.checkpoint(self.block, x, use_reentrant=False).sum()

    net = Checkpointed()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with wb.capture(net, ["block.0"], detach=False):
            net(siamese_input.requires_grad_(True)).backward()  # backward re-runs block.0
