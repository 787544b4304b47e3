"""Finite training for ``fit``: gradients checked before every optimizer step, parameters after it.

A finite loss can still have a NaN / Inf gradient (``sqrt`` at 0, a division by a vanishing norm), and
finite gradients can still give non-finite weights (``eps=0``, a huge lr). Either would turn the
weights into NaN and, worse, the next checkpoint would be called "the last good one". So every step

- checks the gradients before ``optimizer.step()`` — except under an fp16 ``GradScaler``, whose job is
  exactly that (an overflowing step is skipped and the scale halved);
- checks the parameters after it, verified at the next step's host sync, before any checkpoint is
  written, before callbacks see the weights and at each epoch's end.

The fast path is one fused ``torch._foreach_norm`` over the gradients and one over the parameters per
step, read in the same host sync as the logged loss values. Only when a check fails are the tensors
inspected one by one (a norm can overflow for finite values) and, for a gradient, the step re-run
term by term with ``torch.autograd.grad`` on the offending parameter to name the term.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from workbench.train.callbacks import TrainState

__all__ = ["FiniteGuard", "checkpoint_note"]

_SHOW = 5


def checkpoint_note(last_checkpoint: Path | None | bool) -> str:
    """The sentence an error ends with about checkpoints (``False``: checkpointing is off).

    Example:
        >>> checkpoint_note(None)
        ' No checkpoint had been written yet.'
    """
    if last_checkpoint is False:
        return ""
    if last_checkpoint:
        return f" The last good checkpoint, {last_checkpoint}, is kept."
    return " No checkpoint had been written yet."


def _few(names: list[str]) -> str:
    return ", ".join(names[:_SHOW]) + (f" and {len(names) - _SHOW} more" if len(names) > _SHOW else "")


class FiniteGuard:
    """Checks that ``optimizer``'s gradients and parameters stay finite; names come from ``named``.

    Example:
        >>> import torch
        >>> model = torch.nn.Linear(2, 1)
        >>> optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
        >>> guard = FiniteGuard(model, model, optimizer, scaler=None)
        >>> model(torch.ones(1, 2)).sum().backward()
        >>> guard.flags(torch.device("cpu")).tolist()  # 1.0: the gradients are finite
        [1.0]
    """

    def __init__(self, objective: nn.Module, named: nn.Module, optimizer: torch.optim.Optimizer, scaler: Any) -> None:
        names = {id(p): name for name, p in named.named_parameters()}
        self.objective = objective  # what is re-run, term by term, to name the term of a bad gradient
        self.optimizer = optimizer
        self.parameters = [p for group in optimizer.param_groups for p in group["params"]]
        self.names = [names.get(id(p), f"parameter {index} of the optimizer") for index, p in enumerate(self.parameters)]
        self.gradients_checked = scaler is None  # a GradScaler skips steps with inf gradients itself
        self._uniform = len({(p.dtype, p.device) for p in self.parameters}) <= 1
        self._pending: tuple[int, int, torch.Tensor] | None = None  # (epoch, step, flag) of the last update

    def _all_finite(self, tensors: list[torch.Tensor], device: torch.device) -> torch.Tensor:
        """1.0 when every tensor is finite (0.0 may also mean a norm overflowed: rechecked exactly then)."""
        tensors = [t._values() if t.is_sparse else t for t in tensors]
        if not tensors:
            return torch.ones((), device=device)
        norms = torch._foreach_norm(tensors)
        if not self._uniform:
            norms = [norm.float().to(device) for norm in norms]
        return torch.stack(norms).isfinite().all().float().to(device)

    def flags(self, device: torch.device) -> torch.Tensor:
        """The checks to read in this step's host sync: the pending parameters' flag, then the gradients'."""
        parts = []
        if self._pending is not None:
            parts.append(self._pending[2])
        if self.gradients_checked:
            parts.append(self._all_finite([p.grad for p in self.parameters if p.grad is not None], device))
        return torch.stack(parts).to(device) if parts else torch.zeros(0, device=device)

    def _bad(self, tensors: list[torch.Tensor | None]) -> list[int]:
        return [index for index, tensor in enumerate(tensors)
                if tensor is not None and not bool(torch.isfinite(tensor.detach()).all())]

    def verify_parameters(self, flags: list[float], last_checkpoint: Any) -> list[float]:
        """Raise if the last optimizer step made a parameter non-finite; returns the flags not consumed."""
        if self._pending is None:
            return flags
        (epoch, step, _), self._pending = self._pending, None
        if flags[0] == 1.0:
            return flags[1:]
        bad = self._bad([p for p in self.parameters])
        if bad:
            settings = {key: value for key, value in self.optimizer.param_groups[0].items()
                        if key in ("lr", "eps", "momentum", "weight_decay", "betas")}
            raise FloatingPointError(
                f"the optimizer step of epoch {epoch}, step {step} made {len(bad)} parameters non-finite "
                f"({_few([self.names[i] for i in bad])}) from a finite loss and finite gradients: check the "
                f"optimizer's settings ({type(self.optimizer).__name__} {settings}). The weights are now non-finite; "
                f"no checkpoint was written from them.{checkpoint_note(last_checkpoint)}"
            )
        return flags[1:]

    def settle(self, last_checkpoint: Any) -> None:
        """Verify the last update now (one host sync): before a checkpoint, callbacks or an epoch's end."""
        if self._pending is not None:
            self.verify_parameters([float(self._pending[2])], last_checkpoint)

    def verify_gradients(self, flags: list[float], state: TrainState, loss: float, last_checkpoint: Any,
                         rerun: Callable[[nn.Module], tuple[torch.Tensor, dict]]) -> None:
        """Raise, naming the step, the term and the parameters, if a gradient is non-finite."""
        if not self.gradients_checked or flags[0] == 1.0:
            return
        bad = self._bad([p.grad for p in self.parameters])
        if not bad:
            return  # a norm overflowed, the values are finite
        culprit = self.parameters[bad[0]]
        terms = self._terms_of(culprit, rerun)
        label = ("term " if len(terms) == 1 else "terms ") + ", ".join(map(repr, terms))
        blamed = (f"{label} gives {self.names[bad[0]]} a non-finite gradient" if terms
                  else "re-running the step term by term gave finite gradients, so no single term is to blame")
        raise FloatingPointError(
            f"non-finite gradient at epoch {state.epoch}, step {state.step} (batch index {state.batch_index} of the "
            f"epoch, from 0) although the loss is finite (loss={loss:.6g}): {len(bad)} parameters have NaN / Inf "
            f"gradients ({_few([self.names[i] for i in bad])}); {blamed}. The optimizer did not step: the weights "
            f"are unchanged.{checkpoint_note(last_checkpoint)} Try a lower lr, or check the term named."
        )

    def after_step(self, state: TrainState, device: torch.device) -> None:
        """Start the check of the parameters the step just wrote (read at the next sync or :meth:`settle`)."""
        self._pending = (state.epoch, state.step, self._all_finite([p.detach() for p in self.parameters], device))

    def _terms_of(self, parameter: nn.Parameter, rerun: Callable) -> list[str]:
        """Which terms give ``parameter`` a non-finite gradient: the step re-run, each term differentiated alone."""
        terms = getattr(self.objective, "terms", None)
        if not isinstance(terms, nn.ModuleDict):
            return ["cross-entropy (the loss)"]  # a plain model has one term
        outputs: dict[str, torch.Tensor] = {}
        hooks = [term.register_forward_hook(lambda module, args, output, name=name: outputs.__setitem__(name, output))
                 for name, term in terms.items()]
        buffers = {name: buffer.clone() for name, buffer in self.objective.named_buffers()}
        try:
            with torch.enable_grad():
                total, parts = rerun(self.objective)
        finally:
            for hook in hooks:
                hook.remove()
            with torch.no_grad():  # the re-run must not move BatchNorm statistics (or TAID's alpha) twice
                for name, buffer in self.objective.named_buffers():
                    if name in buffers:
                        buffer.copy_(buffers[name])
        blamed = []
        for name, value in outputs.items():
            weighted = self.objective.weights[name] * value
            if isinstance(weighted, torch.Tensor) and weighted.requires_grad:
                (gradient,) = torch.autograd.grad(weighted, parameter, retain_graph=True, allow_unused=True)
                if gradient is not None and not bool(torch.isfinite(gradient).all()):
                    blamed.append(name)
        if not blamed and "ce" in parts and total.requires_grad:
            (gradient,) = torch.autograd.grad(total, parameter, allow_unused=True)
            if gradient is not None and not bool(torch.isfinite(gradient).all()):
                blamed.append("ce")
        return blamed
