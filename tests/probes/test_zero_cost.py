"""The zero-cost proxies against hand computations on multi-layer networks (every activation's code, every
weight's gradient read here with plain hooks and autograd), their edge cases, and that the model passed in
is left as it was."""
from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from workbench import models
from workbench.probes import zero_cost

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def batch():
    generator = torch.Generator().manual_seed(0)
    return torch.randn(10, 1, 16, 16, generator=generator), torch.randint(0, 10, (10,), generator=generator)


@pytest.mark.parametrize("name, kwargs", [("cnn", {"widths": (8, 16)}), ("vit", {"patch_size": 4, "dim": 16,
                                                                                 "depth": 2, "heads": 2})])
def test_nwot_is_the_log_determinant_of_the_code_agreement_kernel(batch, name, kwargs):
    x, _ = batch
    torch.manual_seed(0)
    model = models.create_sized(name, 16, **kwargs)
    clone = copy.deepcopy(model).train()
    codes, handles = [], []
    for module in clone.modules():
        if isinstance(module, (nn.ReLU, nn.GELU)):
            handles.append(module.register_forward_hook(
                lambda m, i, o: codes.append((i[0] > 0).flatten(1).double())))  # the activation's *input*
    with torch.no_grad():
        clone(x)
    for handle in handles:
        handle.remove()
    c = torch.cat(codes, dim=1)
    kernel = c @ c.T + (1 - c) @ (1 - c).T
    assert kernel[0, 1] == float((c[0] == c[1]).sum()) and kernel[0, 0] == c.shape[1]  # units agreeing
    assert zero_cost.nwot(model, x) == pytest.approx(torch.linalg.slogdet(kernel).logabsdet.item(), rel=1e-9)


def test_nwot_of_a_batch_with_a_repeated_sample_is_minus_infinity(batch):
    x, _ = batch
    model = models.create("cnn", widths=(8,), img_size=16)
    repeated = torch.cat([x[:3], x[:1]])
    with pytest.warns(RuntimeWarning, match="singular"):
        assert zero_cost.nwot(model, repeated) == -math.inf
    with pytest.warns(RuntimeWarning, match="no ReLU-like activation"):
        assert math.isnan(zero_cost.nwot(nn.Sequential(nn.Flatten(), nn.Linear(256, 10)), x))


@pytest.mark.parametrize("name, kwargs", [("cnn", {"widths": (8, 16)}), ("resnet", {"widths": (8, 16)})])
def test_snip_and_grad_norm_sum_over_every_conv_and_linear_weight(batch, name, kwargs):
    x, y = batch
    torch.manual_seed(0)
    model = models.create_sized(name, 16, **kwargs)
    clone = copy.deepcopy(model).train()
    weights = [m.weight for m in clone.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    grads = torch.autograd.grad(F.cross_entropy(clone(x), y), weights)
    snip = sum(float((g * w.detach()).abs().sum()) for g, w in zip(grads, weights))
    norm = sum(float(g.norm()) for g in grads)
    assert zero_cost.snip(model, x, y) == pytest.approx(snip, rel=1e-6)
    assert zero_cost.grad_norm(model, x, y) == pytest.approx(norm, rel=1e-6)
    assert len(weights) >= 3  # the network really has several layers


def test_the_model_passed_in_is_untouched(batch):
    x, y = batch
    model = models.create("cnn", widths=(8, 16), img_size=16).eval()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    for name, proxy in zero_cost.PROXIES.items():
        proxy(model, x, y)
    assert not model.training and all(p.grad is None for p in model.parameters())
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())  # BN running stats too
