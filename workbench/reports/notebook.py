"""Helpers that a report notebook calls inside its kernel: offline plotly, evaluation data, models, summary."""
from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import numpy as np

from workbench.reports.runner import REPORT_ENV

def setup_notebook() -> bool:
    """Make plotly embed plotly.js once (offline, no CDN) and return whether to show progress bars.

    Bars are off in a report kernel (static HTML cannot show them; ``tqdm.notebook`` ignores
    ``TQDM_DISABLE``), on when a person runs the notebook in JupyterLab.

    Example:
        >>> from workbench.reports import setup_notebook
        >>> progress = setup_notebook()
    """
    import plotly.io as pio
    from plotly.io.base_renderers import NotebookRenderer

    class OfflineNotebookRenderer(NotebookRenderer):
        """plotly's notebook renderer without its per-figure MathJax CDN script."""

        def to_mimebundle(self, fig_dict: dict) -> dict:
            html = pio.to_html(fig_dict, config=self.config, include_plotlyjs=False, include_mathjax=False,
                               full_html=False, default_width="100%", default_height=525, validate=False)
            return {"text/html": html}

    pio.renderers["kd_offline"] = OfflineNotebookRenderer()
    pio.renderers.default = "plotly_mimetype+kd_offline"
    return os.environ.get(REPORT_ENV) != "1"


IMAGE_SIZE, CHANNELS = 32, 1  # what workbench.train.trained uses by default


def evaluation_data(dataset: str = "digits", n_samples: int = 450) -> Any:
    """Held-out images for a report: the digits test split (450 images), the animals test split
    (1,944) or ``n_samples`` fresh shapes; another name is a ``ValueError`` listing the datasets.

    Example:
        >>> from workbench.reports import evaluation_data
        >>> len(evaluation_data("digits")), len(evaluation_data("animals")), len(evaluation_data("shapes", 64))
        (450, 1944, 64)
    """
    from workbench.train.cache import evaluation_split

    return evaluation_split(dataset, IMAGE_SIZE, CHANNELS, n_shapes=n_samples)


def report_model(
    name: str, dataset: str = "digits", *, weights: str | os.PathLike | None = None, epochs: int | None = None,
    lr: float | None = None, seed: int = 0, progress: bool = True, **model_kwargs: Any,
) -> Any:
    """A model for a report: ``workbench.train.trained`` (trained once, then cached; ``epochs`` / ``lr``
    None: the model family's recipe, ``workbench.train.default_recipe``), or built and loaded from
    ``weights`` (safetensors / ``torch.load(weights_only=True)``) when given.

    Example:
        >>> from workbench.reports import report_model
        >>> student = report_model("cnn_small", epochs=1, progress=False)  # doctest: +SKIP
    """
    from workbench import models, train
    from workbench.reports.progress import fit_callbacks
    from workbench.train.cache import num_classes

    if weights is None:  # a run that trains tells the CLI its epochs (workbench.reports.progress)
        return train.trained(name, dataset, epochs=epochs, lr=lr, seed=seed, size=IMAGE_SIZE, channels=CHANNELS,
                             progress=progress, callbacks=fit_callbacks(model=name), **model_kwargs)
    kwargs = {"num_classes": num_classes(dataset), "in_chans": CHANNELS, **model_kwargs}
    return models.load_weights(models.create_sized(name, IMAGE_SIZE, **kwargs), weights).eval()


def _layers_paragraph(cka: Any, teacher: str, student: str, withheld: bool = False) -> str:
    """The **Layers.** paragraph: matches, layer order and weakest layer over the layers with a defined CKA;
    dead layers (all-NaN rows / columns) are named and take no part in the conclusions. ``withheld``: the
    matches are given as unreliable and the layer order and the weakest layer are not concluded."""
    dead_teacher, dead_student = cka.dead_layers()
    if np.isnan(cka.values).all():
        return (f"**Layers.** No layer could be compared: CKA is undefined (NaN) for every pair of the "
                f"{len(cka.teacher_layers)} teacher and {len(cka.student_layers)} student layers over "
                f"{cka.n_samples:,} samples: all of one side's layers are dead (the same features for every "
                "sample). Choose other layers.")
    best = cka.best_matches().dropna(subset=["teacher_layer"])
    pairs = ", ".join(f"`{r.student_layer}` → `{r.teacher_layer}` ({r.cka:.2f})" for r in best.itertuples())
    order = [cka.teacher_layers.index(name) for name in best["teacher_layer"]]
    weakest = best.loc[best["cka"].idxmin()]
    text = (f"**Layers.** Each layer of the student (`{student}`) and the teacher (`{teacher}`) layer it resembles "
            f"most, by CKA over {cka.n_samples:,} samples: {pairs}.")
    if withheld:
        text += (" **Unreliable while the sanity checks above flag a problem**: no conclusion is drawn about "
                 "the layer order or where a feature-distillation term should go; fix the flagged problem and "
                 "re-run.")
    else:
        if len(order) > 1:
            text += f" The matches {'keep' if order == sorted(order) else 'do not keep'} the layer order."
        text += (f" The student layer least like any teacher layer is `{weakest.student_layer}` (best CKA "
                 f"{weakest.cka:.2f}): the first candidate for a feature-distillation term.")
    if dead_teacher or dead_student:
        named = "; ".join(f"{role} {', '.join(f'`{name}`' for name in names)}"
                          for role, names in (("teacher", dead_teacher), ("student", dead_student)) if names)
        text += (f" Dead layers (the same features for every sample, so CKA is undefined and they are left out "
                 f"of the matches and the layer order): {named}.")
    return text


def gap_summary(cka: Any, predictions: Any, teacher: str = "teacher", student: str = "student",
                flags: Sequence[Any] = ()) -> str:
    """A short Markdown paragraph: best-matching layers, layer order, weakest layer, agreement, KL, accuracy.

    ``flags``: the sanity flags of the report (:mod:`workbench.reports.sanity`); while any stands, the
    layer order and the candidate layer for a feature-distillation term are withheld.

    Example:
        >>> import numpy as np
        >>> from workbench.similarity import CKAResult, PredictionResult
        >>> cka = CKAResult(np.array([[0.9, 0.2], [0.3, 0.8]]), ["t1", "t2"], ["s1", "s2"], n_samples=8)
        >>> p = PredictionResult(np.array([[3, 1], [0, 4]]), agreement=0.875, kl=0.1, temperature=1.0, n_samples=8)
        >>> "87.5%" in gap_summary(cka, p)
        True
    """
    lines = [_layers_paragraph(cka, teacher, student, withheld=bool(flags))]
    lines += [
        f"**Predictions.** The student agrees with the teacher's top-1 class on {predictions.agreement:.1%} of "
        f"{predictions.n_samples:,} samples; the mean KL(teacher ‖ student) at T = {predictions.temperature:g} "
        f"is {predictions.kl:.3f} nats.",
    ]
    if predictions.teacher_accuracy is not None and predictions.student_accuracy is not None:
        gap = 100 * (predictions.teacher_accuracy - predictions.student_accuracy)
        lines.append(f"**Accuracy.** Teacher {predictions.teacher_accuracy:.1%}, student "
                     f"{predictions.student_accuracy:.1%}: a gap of {gap:.1f} points.")
    return "\n\n".join(lines)
