"""How varied, how real and how recognisable class-conditional samples are, in a classifier's feature space.

For each sampling variant (base, distilled, hybrid, …) :func:`sample_quality` reports, from the final
samples of its :class:`~workbench.probes.dt.DTTrajectory`:

- ``pixel_diversity``: the mean pairwise L2 distance between samples of one class (averaged over classes),
- ``feature_diversity``: the same with the cosine distance between the classifier's embeddings
  (the layer ``layer``, read through :func:`workbench.capture.capture`) — the paper's DreamSim
  diversity, with an offline feature space,
- ``frechet``: the Fréchet distance of all samples' embeddings to the embeddings of real held-out images,
- ``accuracy``: how often the classifier names the class the sample was drawn for,
- ``network_evaluations`` and ``seconds_per_sample``: what the variant costs.

Diversity is measured within a class because that is what distillation loses: one prompt (one class),
many seeds, one composition.
"""
from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch import nn

from workbench.capture import capture
from workbench.devices import model_device
from workbench.probes.diversity import frechet_distance, pairwise_cosine_distance, pairwise_distance
from workbench.probes.dt import DTTrajectory, check_trajectories
from workbench.probes.result_io import JsonResult, check_json_dict, check_text
from workbench.probes.stream import eval_mode

__all__ = ["COLUMNS", "SampleQuality", "embed", "sample_quality"]

COLUMNS = ("variant", "samples", "pixel_diversity", "feature_diversity", "frechet", "accuracy",
           "network_evaluations", "seconds_per_sample")


def embed(classifier: nn.Module, images: Any, *, layer: str, preprocess: Callable | None = None,
          batch_size: int = 256) -> tuple[np.ndarray, np.ndarray]:
    """The classifier's embedding at ``layer`` (flattened per sample) and its predicted class, per image.

    ``images`` ``[n, c, h, w]`` (array or tensor) pass through ``preprocess`` (e.g. from the sampler's
    [-1, 1] to the classifier's normalisation) first. The classifier runs in eval mode without gradients.

    Example:
        >>> from workbench.models import create
        >>> net = create("cnn_small", img_size=8)
        >>> features, predicted = embed(net, np.zeros((3, 1, 8, 8)), layer="pool")
        >>> features.shape, predicted.shape
        ((3, 32), (3,))
    """
    x = torch.as_tensor(np.asarray(images), dtype=torch.float32)
    device = model_device(classifier)
    features, predictions = [], []
    with eval_mode(classifier), torch.no_grad(), capture(classifier, [layer]) as captured:
        for batch in x.split(batch_size):
            batch = preprocess(batch) if preprocess is not None else batch
            logits = classifier(batch.to(device))
            features.append(captured[layer].flatten(1).double().cpu())
            predictions.append(logits.argmax(dim=1).cpu())
    return torch.cat(features).numpy(), torch.cat(predictions).numpy()


def _within_class(values: np.ndarray, labels: np.ndarray, distance: Callable[[np.ndarray], float]) -> list[float]:
    """``distance`` over the samples of each class (in label order); every class needs two samples."""
    groups = [values[labels == label] for label in np.unique(labels)] if len(labels) else [values]
    if any(len(group) < 2 for group in groups):
        raise ValueError("diversity needs at least two samples of every class: draw more seeds per class")
    return [distance(group) for group in groups]


@dataclass
class SampleQuality(JsonResult):
    """One row per sampling variant: the columns of :data:`COLUMNS` (see the module docstring), and
    ``per_class``: variant → the feature diversity of each class (in label order), for paired tests.

    Example:
        >>> row = dict(zip(COLUMNS, ["base", 4, 1.0, 0.05, 12.0, 1.0, 32, 0.01]))
        >>> float(SampleQuality([row]).to_frame().loc["base", "feature_diversity"])
        0.05
    """

    rows: list[dict]
    feature_layer: str = "pool"
    per_class: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        """Every row has every column; a file that fails is refused by ``load``."""
        if not isinstance(self.rows, list) or not self.rows:
            raise ValueError("rows must be a non-empty list of dicts")
        for index, row in enumerate(self.rows):
            if not isinstance(row, dict) or set(row) != set(COLUMNS):
                raise ValueError(f"rows[{index}] must have exactly the columns {list(COLUMNS)}")
        self.feature_layer = check_text(self.feature_layer, "feature_layer")
        self.per_class = check_json_dict(self.per_class, "per_class")

    def to_frame(self) -> pd.DataFrame:
        """The table indexed by variant."""
        return pd.DataFrame(self.rows, columns=list(COLUMNS)).set_index("variant")

    def to_markdown(self) -> str:
        """The table as Markdown (diversities to 3 decimals, Fréchet to 1, accuracy as a percentage).

        Example:
            >>> row = dict(zip(COLUMNS, ["base", 4, 1.0, 0.05, 12.0, 1.0, 32, 0.01]))
            >>> print(SampleQuality([row]).to_markdown().splitlines()[2])
            | base | 4 | 1.000 | 0.050 | 12.0 | 100.0 % | 32 | 10.0 |
        """
        lines = ["| variant | samples | pixel diversity | feature diversity | Fréchet distance | accuracy | "
                 "network evaluations | ms / sample |", "|---|---:|---:|---:|---:|---:|---:|---:|"]
        for row in self.rows:
            lines.append(
                f"| {row['variant']} | {row['samples']} | {row['pixel_diversity']:.3f} | "
                f"{row['feature_diversity']:.3f} | {row['frechet']:.1f} | {100 * row['accuracy']:.1f} % | "
                f"{row['network_evaluations']} | {1000 * row['seconds_per_sample']:.1f} |"
            )
        return "\n".join(lines)


def sample_quality(
    trajectories: Mapping[str, DTTrajectory], classifier: nn.Module, real_images: Any, *, layer: str = "pool",
    preprocess: Callable | None = None,
) -> SampleQuality:
    """Diversity, Fréchet distance, accuracy and cost of each variant's final samples (see the module).

    ``trajectories``: variant name → a run over many seeds with class labels (``DTTrajectory.labels``;
    without labels every sample counts as one class and accuracy is NaN). ``real_images``: held-out real
    images in the samples' space, embedded the same way.

    Example:
        >>> from workbench.models import create
        >>> x = np.random.default_rng(0).uniform(-1, 1, (1, 6, 1, 8, 8))
        >>> run = DTTrajectory(np.array([0.0]), x, x, x[0], ["s"], ["m"], labels=[0, 0, 0, 1, 1, 1])
        >>> table = sample_quality({"base": run}, create("cnn_small", img_size=8), x[0], layer="pool")
        >>> bool(round(table.rows[0]["pixel_diversity"], 6) == round(np.mean([pairwise_distance(x[0, :3]),
        ...                                                                   pairwise_distance(x[0, 3:])]), 6))
        True
    """
    check_trajectories(trajectories)
    real_features, _ = embed(classifier, real_images, layer=layer, preprocess=preprocess)
    rows, per_class = [], {}
    for name, run in trajectories.items():
        features, predicted = embed(classifier, run.final, layer=layer, preprocess=preprocess)
        labels = np.asarray(run.labels, dtype=np.int64)
        n = run.final.shape[0]
        per_class[name] = _within_class(features, labels, pairwise_cosine_distance)
        rows.append({
            "variant": name,
            "samples": n,
            "pixel_diversity": float(np.mean(_within_class(run.final.reshape(n, -1), labels, pairwise_distance))),
            "feature_diversity": float(np.mean(per_class[name])),
            "frechet": frechet_distance(features, real_features),
            "accuracy": float(np.mean(predicted == labels)) if len(labels) else float("nan"),
            "network_evaluations": run.network_evaluations,
            "seconds_per_sample": run.seconds / n,
        })
    return SampleQuality(rows, layer, per_class)
