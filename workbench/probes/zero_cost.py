"""Zero-cost proxies: what an untrained network says about how well it will train, from one batch.

The cheap baselines a training-free student search is compared with:

- :func:`nwot` — "neural architecture search without training" (Mellor et al., ICML 2021): the binary
  activation code of each sample (which units of every ReLU-like activation are on) and the kernel
  ``K = c cᵀ + (1 − c)(1 − c)ᵀ`` (``K_ij`` counts the units on which samples i and j agree); the score is
  ``log |det K|``. Networks that separate the batch's samples into distinct linear regions score high.
- :func:`snip` — connection sensitivity (Lee et al., ICLR 2019), summed as in Abdelfattah et al. (ICLR
  2021): ``Σ |∂L/∂w ⊙ w|`` over the weights of every convolution and linear layer, L the cross-entropy.
- :func:`grad_norm` — ``Σ ‖∂L/∂w‖₂`` over the same weight tensors (Abdelfattah et al. 2021).

Each runs the network as it is (train mode: batch statistics, as right after initialisation) on a copy,
so the caller's model, its mode and its gradients are untouched.
"""
from __future__ import annotations

import copy
import math
import warnings
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from workbench.batches import logits_of, run_model
from workbench.capture import capture

__all__ = ["nwot", "snip", "grad_norm", "PROXIES", "ACTIVATIONS"]

ACTIVATIONS = (nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.GELU, nn.SiLU, nn.ELU)
"""The activation modules whose on/off pattern :func:`nwot` reads (for each, output > 0 exactly where its input
is > 0, so the code of its output is the code of its input)."""


def _fresh_copy(model: nn.Module) -> nn.Module:
    clone = copy.deepcopy(model).requires_grad_(True)  # a frozen network's weights still get gradients
    clone.train()
    clone.zero_grad(set_to_none=True)
    return clone


def nwot(model: nn.Module, x: torch.Tensor) -> float:
    """Mellor et al.'s NWOT score of ``model`` on the batch ``x``: ``log |det K|``, ``K`` the agreement kernel
    of the samples' binary activation codes over every activation module (:data:`ACTIVATIONS`). ``-inf``
    (with a warning) when two samples share a code everywhere (``K`` singular); NaN with a warning for a
    model without such activations.

    Example:
        >>> import torch
        >>> from torch import nn
        >>> _ = torch.manual_seed(0)
        >>> net = nn.Sequential(nn.Linear(4, 64), nn.ReLU(), nn.Linear(64, 2))
        >>> x = torch.randn(8, 4)
        >>> codes = (net[0](x) > 0).double()  # the kernel, by hand
        >>> kernel = codes @ codes.T + (1 - codes) @ (1 - codes).T
        >>> round(nwot(net, x), 6) == round(torch.linalg.slogdet(kernel).logabsdet.item(), 6)
        True
    """
    clone = _fresh_copy(model)
    names = [name for name, module in clone.named_modules() if name and isinstance(module, ACTIVATIONS)]
    if not names:
        kinds = ", ".join(activation.__name__ for activation in ACTIVATIONS)
        warnings.warn(f"nwot: {type(model).__name__} has no ReLU-like activation module ({kinds}); its score is NaN",
                      RuntimeWarning, stacklevel=2)
        return math.nan
    with torch.no_grad(), capture(clone, names, on_repeat="last") as activations:
        run_model(clone, x)
        codes = torch.cat([(activations[name] > 0).flatten(1).double() for name in names], dim=1)
    kernel = codes @ codes.T + (1 - codes) @ (1 - codes).T
    sign, logdet = torch.linalg.slogdet(kernel)
    if sign <= 0:
        warnings.warn("nwot: two samples have the same activation code on every unit (the kernel is singular); "
                      "the score is -inf", RuntimeWarning, stacklevel=2)
        return -math.inf
    return float(logdet)


def _weights(model: nn.Module) -> list[nn.Parameter]:
    return [module.weight for module in model.modules()
            if isinstance(module, (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear))]


def _loss_gradients(model: nn.Module, x: torch.Tensor,
                    y: torch.Tensor) -> tuple[list[nn.Parameter], list[torch.Tensor]]:
    clone = _fresh_copy(model)
    weights = _weights(clone)
    if not weights:
        raise ValueError(f"{type(model).__name__} has no convolution or linear weight to score")
    logits = logits_of(run_model(clone, x), clone)
    loss = F.cross_entropy(logits, y)
    grads = torch.autograd.grad(loss, weights, allow_unused=True)
    return weights, [torch.zeros_like(w) if g is None else g for w, g in zip(weights, grads)]


def snip(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    """SNIP saliency summed over the network: ``Σ |∂L/∂w ⊙ w|`` over every convolution / linear weight, L the
    mean cross-entropy of the batch ``(x, y)``.

    Example:
        >>> import torch
        >>> from torch import nn
        >>> _ = torch.manual_seed(0)
        >>> net = nn.Linear(3, 2, bias=False)
        >>> x, y = torch.randn(4, 3), torch.tensor([0, 1, 1, 0])
        >>> grad, = torch.autograd.grad(nn.functional.cross_entropy(net(x), y), [net.weight])
        >>> round(snip(net, x, y), 6) == round((grad * net.weight).abs().sum().item(), 6)
        True
    """
    weights, grads = _loss_gradients(model, x, y)
    with torch.no_grad():
        return float(sum((g * w).abs().sum().double() for w, g in zip(weights, grads)))


def grad_norm(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    """``Σ ‖∂L/∂w‖₂`` over every convolution / linear weight tensor, L the mean cross-entropy of ``(x, y)``.

    Example:
        >>> import torch
        >>> from torch import nn
        >>> net = nn.Linear(3, 2, bias=False)
        >>> x, y = torch.randn(4, 3), torch.tensor([0, 1, 1, 0])
        >>> grad, = torch.autograd.grad(nn.functional.cross_entropy(net(x), y), [net.weight])
        >>> round(grad_norm(net, x, y), 6) == round(grad.norm().item(), 6)
        True
    """
    _, grads = _loss_gradients(model, x, y)
    return float(sum(g.double().norm() for g in grads))


PROXIES: dict[str, Callable[..., float]] = {"nwot": lambda model, x, y: nwot(model, x), "snip": snip,
                                            "grad_norm": grad_norm}
"""Each proxy as ``proxy(model, x, y) -> float`` (higher predicts better), by name."""
