"""How "logit-ready" each student stage is: the held-out accuracy of every branch of a Distiller.

A branch is a Distiller term with a ``branch`` module and a ``logits(features)`` method that turns one
student layer's output into class logits — OFA-KD's stage branches (:func:`workbench.losses.ofa_terms`).
:func:`branch_accuracy` runs the data through the student once, reads every branch's layer with
:func:`workbench.capture`, and counts each branch's top-1 hits beside the student's own head.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
import torch
from tqdm.auto import tqdm

from workbench.batches import count_correct, inputs_of, logits_of, run_model, targets_of, to_device
from workbench.capture import capture
from workbench.data import as_loader, num_samples
from workbench.devices import resolve_device
from workbench.probes.stream import eval_mode

__all__ = ["BranchAccuracy", "branch_accuracy", "branch_terms"]


@dataclass
class BranchAccuracy:
    """Top-1 accuracy (in [0, 1]) of each branch (``terms``, on student ``layers``, in depth order) and of the
    student's own head (``final_accuracy``) on the same ``n_samples`` held-out samples."""

    terms: list[str]
    layers: list[str]
    accuracy: list[float]
    final_accuracy: float
    n_samples: int

    def __post_init__(self) -> None:
        if not (len(self.terms) == len(self.layers) == len(self.accuracy)):
            raise ValueError(f"terms, layers and accuracy must have one entry per branch, got "
                             f"{len(self.terms)}, {len(self.layers)} and {len(self.accuracy)}")
        values = [*self.accuracy, self.final_accuracy]
        if any(not (0.0 <= value <= 1.0) for value in values if not np.isnan(value)):
            raise ValueError(f"accuracies must lie in [0, 1], got {values}")

    def to_frame(self) -> pd.DataFrame:
        """One row per branch (``depth`` 1, 2, …) and a last row for the student's head (``depth`` "head").

        Example:
            >>> BranchAccuracy(["ofa@a"], ["a"], [0.5], 0.75, 4).to_frame().to_dict("list")
            {'term': ['ofa@a', 'head'], 'layer': ['a', 'head'], 'depth': [1, 'head'], 'accuracy': [0.5, 0.75]}
        """
        return pd.DataFrame({
            "term": [*self.terms, "head"],
            "layer": [*self.layers, "head"],
            "depth": [*range(1, len(self.terms) + 1), "head"],
            "accuracy": [*self.accuracy, self.final_accuracy],
        })

    def _labels(self) -> list[str]:
        return [*self.layers, "student head"]

    def plot(self, ax: Any = None, label: str | None = None) -> Any:
        """Matplotlib: accuracy % per branch in depth order, the student's head last; returns the axes.

        Example:
            >>> ax = BranchAccuracy(["ofa@a", "ofa@b"], ["a", "b"], [0.4, 0.8], 0.9, 10).plot()
            >>> [tick.get_text() for tick in ax.get_xticklabels()]
            ['a', 'b', 'student head']
        """
        import matplotlib.pyplot as plt

        if ax is None:
            _, ax = plt.subplots(figsize=(5, 3.2))
        values = 100 * np.asarray([*self.accuracy, self.final_accuracy], dtype=float)
        positions = np.arange(len(values))
        ax.plot(positions, values, marker="o", label=label)
        ax.set_xticks(positions, self._labels(), rotation=30, ha="right")
        ax.set(xlabel="student stage (its branch)", ylabel="held-out accuracy %", ylim=(0, 100),
               title=f"branch accuracy ({self.n_samples} samples)")
        ax.grid(alpha=0.3)
        return ax

    def figure(self) -> Any:
        """Plotly version of :meth:`plot`."""
        import plotly.graph_objects as go

        values = [100 * value for value in (*self.accuracy, self.final_accuracy)]
        figure = go.Figure(go.Scatter(x=self._labels(), y=values, mode="lines+markers", name="accuracy"))
        figure.update_layout(title=f"branch accuracy ({self.n_samples} samples)", xaxis_title="student stage (its branch)",
                             yaxis_title="held-out accuracy %", yaxis_range=[0, 100])
        return figure


def branch_terms(distiller: Any) -> dict[str, str]:
    """The distiller's branch terms, name -> student layer, in the student's module order.

    Example:
        >>> from types import SimpleNamespace
        >>> from torch import nn
        >>> student = nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 2))
        >>> branch = SimpleNamespace(branch=nn.Identity(), logits=lambda x: x)
        >>> fake = SimpleNamespace(student=student, terms={"b": branch, "a": branch, "kd": nn.Identity()},
        ...                        layers={"b": ("logits", "1"), "a": ("logits", "0")})
        >>> branch_terms(fake)
        {'a': '0', 'b': '1'}
    """
    order = {name: index for index, (name, _) in enumerate(distiller.student.named_modules())}
    branches = {name: distiller.layers[name][1] for name, term in distiller.terms.items()
                if hasattr(term, "branch") and callable(getattr(term, "logits", None)) and name in distiller.layers}
    return dict(sorted(branches.items(), key=lambda item: order.get(item[1], len(order))))


@torch.no_grad()
def branch_accuracy(
    distiller: Any, data: Any, *, batch_size: int = 256, device: str = "auto", progress: bool = False
) -> BranchAccuracy:
    """Held-out top-1 accuracy of every branch of ``distiller`` and of the student's head on labelled ``data``
    (``(x, y)``, a Dataset or a DataLoader). The student and the branches run in eval mode under
    ``no_grad`` and get their modes back; nothing is trained. A distiller without branch terms is a
    ``ValueError``.

    Example:
        >>> import torch
        >>> from workbench import models
        >>> from workbench.losses import ofa_terms
        >>> from workbench.train import Distiller
        >>> teacher, student = models.create("cnn", img_size=16).eval(), models.create("cnn_small", img_size=16)
        >>> data = (torch.randn(20, 1, 16, 16), torch.randint(0, 10, (20,)))
        >>> distiller = Distiller(teacher, student, **ofa_terms(teacher, student, data))
        >>> result = branch_accuracy(distiller, data, device="cpu")
        >>> result.layers, result.n_samples
        (['blocks.0', 'blocks.1', 'blocks.2'], 20)
    """
    branches = branch_terms(distiller)
    if not branches:
        raise ValueError("branch_accuracy: the distiller has no branch terms (terms with a .branch that map a "
                         f"student layer to logits, e.g. from workbench.losses.ofa_terms); its terms are "
                         f"{list(distiller.terms)}")
    target = resolve_device(device)
    layers = list(dict.fromkeys(branches.values()))
    correct = dict.fromkeys(branches, 0)
    head_correct = counted = 0
    loader = as_loader(data, batch_size=batch_size)
    total = num_samples(data)
    original = next(distiller.student.parameters()).device
    modules = [distiller.student, *(distiller.terms[name] for name in branches)]
    try:
        for module in modules:
            module.to(target)
        with eval_mode(*modules), capture(distiller.student, layers) as activations:
            bar = tqdm(total=total, desc="branch accuracy", unit="sample", disable=not progress, leave=False)
            for batch in loader:
                targets = targets_of(batch)
                if targets is None:
                    raise ValueError("branch_accuracy needs labelled data: (x, y) batches or a dict with 'labels'")
                output = run_model(distiller.student, to_device(inputs_of(batch), target))
                hits, seen = count_correct(logits_of(output, distiller.student), targets.to(target))
                head_correct, counted = head_correct + hits, counted + seen
                for name, layer in branches.items():
                    correct[name] += count_correct(distiller.terms[name].logits(activations[layer]),
                                                   targets.to(target))[0]
                bar.update(seen)
            bar.close()
    finally:
        for module in modules:
            module.to(original)
    if counted == 0:
        raise ValueError("branch_accuracy: the data holds no samples")
    return BranchAccuracy(list(branches), list(branches.values()), [correct[name] / counted for name in branches],
                          head_correct / counted, counted)
