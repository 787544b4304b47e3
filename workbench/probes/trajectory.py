"""CKATrajectory: a training callback that measures teacher-student CKA every k steps on a fixed probe set.

It lives with the probes (it composes :func:`cka_matrix`) and plugs into :func:`workbench.train.fit`
through the callback protocol of :mod:`workbench.train.callbacks`.
"""
from __future__ import annotations

from typing import Any, Sequence

import numpy as np
import pandas as pd
import torch
from torch import nn
from torch.utils.data import DataLoader

from workbench.batches import inputs_of, n_samples_of
from workbench.data import as_loader
from workbench.probes.cka_result import CKAResult
from workbench.probes.cka_stream import cka_matrix
from workbench.probes.stream import TOKEN_MODES
from workbench.train.callbacks import Callback, TrainState


def _rank_and_world() -> tuple[int, int]:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


class CKATrajectory(Callback):
    """CKA between teacher and student layers every ``every`` steps on a fixed probe set.

    Measures at the start (step 0; a resumed run starts from the checkpointed points), every ``every``
    steps and after the last step, with
    :func:`workbench.similarity.cka_matrix` (minibatch CKA over ``probe_data`` in batches of
    ``batch_size``, models in eval mode, then each module's train/eval flag restored). Under
    ``torchrun`` each rank measures every ``world_size``-th probe batch and the sums are all-reduced,
    so every rank records the same matrix as one process would. Pass ``teacher=`` when training a
    plain model; with a Distiller its teacher is used. Token batches (dicts with ``input_ids`` /
    ``attention_mask``) are measured with their masks; ``tokens`` is :func:`cka_matrix`'s (``"mean"``
    per sequence, or ``"tokens"``: every unpadded token a sample).

    Results: ``.steps`` (list), ``.values`` ``[n_points, n_teacher_layers, n_student_layers]``,
    ``.to_frame()`` (long: step, teacher_layer, student_layer, cka), ``.result(i)`` (a ``CKAResult``),
    ``.plot()`` (matplotlib, one line per layer pair) and ``.figure()`` (plotly).

    Example:
        >>> import torch
        >>> from torch import nn
        >>> from workbench.losses import KD
        >>> from workbench.train import Distiller, fit
        >>> _ = torch.manual_seed(0); x, y = torch.randn(64, 6), torch.randint(0, 3, (64,))
        >>> teacher = nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 3)).eval()
        >>> student = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 3))
        >>> trajectory = CKATrajectory(x[:32], ["0", "2"], ["0", "2"], every=2, batch_size=16)
        >>> _ = fit(Distiller(teacher, student, {"kd": KD()}), (x, y), batch_size=16, callbacks=[trajectory],
        ...         device="cpu", progress=False)
        >>> trajectory.steps, trajectory.values.shape
        ([0, 2, 4], (3, 2, 2))
    """

    def __init__(
        self,
        probe_data: Any,
        teacher_layers: str | Sequence[str] = "stages",
        student_layers: str | Sequence[str] = "stages",
        every: int = 100,
        *,
        teacher: nn.Module | None = None,
        kernel: str = "linear",
        debiased: bool = True,
        batch_size: int = 128,
        tokens: str = "mean",
    ) -> None:
        if not isinstance(every, int) or every < 1:
            raise ValueError(f"every must be a positive number of steps, got {every!r}")
        if tokens not in TOKEN_MODES:
            raise ValueError(f"tokens must be one of {TOKEN_MODES}, got {tokens!r}")
        self.probe_data, self.every, self.teacher = probe_data, every, teacher
        self.teacher_layers, self.student_layers = teacher_layers, student_layers
        self.kernel, self.debiased, self.batch_size, self.tokens = kernel, debiased, batch_size, tokens
        self.steps: list[int] = []
        self._values: list[np.ndarray] = []
        self.teacher_names: list[str] = []
        self.student_names: list[str] = []
        self.n_samples = 0
        self._probe: Any = None

    # -- measuring -------------------------------------------------------------------------------
    def _probe_loader(self) -> Any:
        """This rank's share of the fixed probe batches, as a loader of ready batches."""
        batches = [inputs_of(batch) for batch in as_loader(self.probe_data, batch_size=self.batch_size)]
        rank, world = _rank_and_world()
        smallest = min((n_samples_of(batch) for batch in batches), default=0)
        if len(batches) < world:
            raise ValueError(
                f"CKATrajectory: {len(batches)} probe batches cannot be shared by {world} ranks; "
                "use more probe samples or a smaller batch_size"
            )
        if smallest < (4 if self.debiased else 2):
            raise ValueError(
                f"CKATrajectory: a probe batch holds {smallest} samples, too few for CKA; choose batch_size "
                "so that every batch (the last one too) has at least 4"
            )
        return DataLoader(batches[rank::world], batch_size=None)

    def measure(self, teacher: nn.Module, student: nn.Module, step: int, device: torch.device | str = "cpu") -> None:
        """Measure now and record it at ``step`` (``fit`` calls this; usable by hand too)."""

        if self._probe is None:
            self._probe = self._probe_loader()
        result = cka_matrix(
            teacher, student, self._probe, self.teacher_layers, self.student_layers,
            kernel=self.kernel, debiased=self.debiased, device=device, progress=False, tokens=self.tokens,
        )
        self.teacher_names, self.student_names = result.teacher_layers, result.student_layers
        self.n_samples = result.n_samples
        self.steps.append(int(step))
        self._values.append(result.values)

    def _models(self, state: TrainState) -> tuple[nn.Module, nn.Module]:
        teacher = self.teacher if self.teacher is not None else getattr(state.distiller, "teacher", None)
        if teacher is None:
            raise ValueError("CKATrajectory needs a teacher: train a Distiller or pass CKATrajectory(..., teacher=model)")
        return teacher, state.student

    def on_train_begin(self, state: TrainState) -> None:
        if state.step == 0:  # a fresh run starts a fresh trajectory; a resumed one keeps its loaded points
            self.steps, self._values = [], []
        if not self.steps:
            self.measure(*self._models(state), step=state.step, device=state.device)

    def on_step_end(self, state: TrainState) -> None:
        if state.step % self.every == 0:
            self.measure(*self._models(state), step=state.step, device=state.device)

    def on_train_end(self, state: TrainState) -> None:
        if state.step not in self.steps:
            self.measure(*self._models(state), step=state.step, device=state.device)

    # -- checkpointing ---------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """The trajectory so far, JSON-able (saved with fit's checkpoints)."""
        return {
            "steps": list(self.steps),
            "values": [value.tolist() for value in self._values],
            "teacher_names": self.teacher_names,
            "student_names": self.student_names,
            "n_samples": self.n_samples,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned."""
        self.steps = [int(step) for step in state["steps"]]
        self._values = [np.asarray(value, dtype=np.float64) for value in state["values"]]
        self.teacher_names, self.student_names = list(state["teacher_names"]), list(state["student_names"])
        self.n_samples = int(state["n_samples"])

    # -- results ---------------------------------------------------------------------------------
    @property
    def values(self) -> np.ndarray:
        """``[n_points, n_teacher_layers, n_student_layers]`` CKA, one matrix per recorded step."""
        if not self._values:
            return np.zeros((0, len(self.teacher_names), len(self.student_names)))
        return np.stack(self._values)

    def result(self, index: int = -1):
        """The matrix recorded at ``steps[index]`` as a :class:`workbench.similarity.CKAResult`."""

        return CKAResult(
            self._values[index], self.teacher_names, self.student_names, n_samples=self.n_samples,
            kernel=self.kernel, debiased=self.debiased, extra={"step": self.steps[index]},
        )

    def to_frame(self) -> pd.DataFrame:
        """Long format: one row per (step, teacher_layer, student_layer) with its ``cka``."""
        rows = [
            {"step": step, "teacher_layer": t, "student_layer": s, "cka": float(matrix[i, j])}
            for step, matrix in zip(self.steps, self._values)
            for i, t in enumerate(self.teacher_names)
            for j, s in enumerate(self.student_names)
        ]
        return pd.DataFrame(rows, columns=["step", "teacher_layer", "student_layer", "cka"])

    def pairs(self, which: str | Sequence[tuple[str, str]] = "auto") -> list[tuple[str, str]]:
        """Layer pairs to draw: ``"all"``; ``"matched"`` (each student layer with its most similar teacher
        layer at the last point); ``"auto"`` (all up to 16 pairs, else matched); or your own list."""
        if not self._values:
            raise ValueError("CKATrajectory has recorded nothing yet: run fit with it first")
        everything = [(t, s) for t in self.teacher_names for s in self.student_names]
        if which == "auto":
            which = "all" if len(everything) <= 16 else "matched"
        if which == "all":
            return everything
        if which == "matched":
            best = np.nan_to_num(self._values[-1], nan=-np.inf).argmax(axis=0)
            return [(self.teacher_names[i], s) for i, s in zip(best, self.student_names)]
        if isinstance(which, str):
            raise ValueError(f"pairs must be 'auto', 'all', 'matched' or a list of (teacher, student) names, got {which!r}")
        which = [tuple(pair) for pair in which]
        unknown = [pair for pair in which if pair not in everything]
        if unknown:
            raise KeyError(f"unknown layer pairs {unknown}; teacher layers {self.teacher_names}, student layers {self.student_names}")
        return which

    def _series(self, which: Any) -> list[tuple[str, np.ndarray]]:
        values = self.values
        return [
            (f"{t} ↔ {s}", values[:, self.teacher_names.index(t), self.student_names.index(s)])
            for t, s in self.pairs(which)
        ]

    def plot(self, pairs: str | Sequence[tuple[str, str]] = "auto", ax: Any = None) -> Any:
        """Matplotlib: CKA over training steps, one line per (teacher, student) pair; returns the Axes."""
        import matplotlib.pyplot as plt

        if ax is None:
            _, ax = plt.subplots(figsize=(7, 4))
        for label, series in self._series(pairs):
            ax.plot(self.steps, series, marker="o", markersize=3, label=label)
        ax.set(xlabel="training step", ylabel=f"{self.kernel} CKA", title="teacher-student alignment during training")
        ax.legend(fontsize="small", title="teacher ↔ student")
        return ax

    def figure(self, pairs: str | Sequence[tuple[str, str]] = "auto") -> Any:
        """Plotly version of :meth:`plot`, one trace per pair."""
        import plotly.graph_objects as go

        figure = go.Figure()
        for label, series in self._series(pairs):
            figure.add_trace(go.Scatter(x=self.steps, y=series, mode="lines+markers", name=label))
        figure.update_layout(
            title="teacher-student alignment during training", xaxis_title="training step",
            yaxis_title=f"{self.kernel} CKA", legend_title="teacher ↔ student",
        )
        return figure
