"""A model's named modules as a table: type, output shape, parameter count, leaf and stage flags.

What a layer picker lists and what a researcher reads before choosing layers for a probe or a hint
term. The shapes come from one forward of an example batch through :func:`workbench.capture` (so a
tuple output gives its first element, a Hugging Face ``ModelOutput`` its hidden state, as everywhere
else); the hooks are removed when the forward ends, also on an error.
"""
from __future__ import annotations

from typing import Any

import pandas as pd
import torch
from torch import nn

from workbench.batches import inputs_of, n_samples_of, run_model, take, to_device
from workbench.capture import capture, layer_names, stage_names
from workbench.data import as_loader
from workbench.devices import model_device
from workbench.probes.stream import eval_mode

__all__ = ["LAYER_TABLE_COLUMNS", "first_sample", "layer_table"]

LAYER_TABLE_COLUMNS = ("name", "type", "output_shape", "parameters", "leaf", "stage", "depth")


def first_sample(data: Any) -> Any:
    """The model input of ``data``'s first sample, as a batch of one (what :func:`layer_table` takes).

    ``data`` is anything :func:`workbench.data.as_loader` reads (a tensor, an ``(x, y)`` pair, a
    ``Dataset``, a ``DataLoader``); a dict batch keeps its masks.

    Example:
        >>> import torch
        >>> first_sample((torch.zeros(10, 3, 8, 8), torch.arange(10))).shape
        torch.Size([1, 3, 8, 8])
    """
    batch = next(iter(as_loader(data, batch_size=1)), None)
    if batch is None:
        raise ValueError("the data holds no samples: pass at least one to read the layers' output shapes")
    return take(inputs_of(batch), 1)


def _output_shapes(model: nn.Module, names: list[str], example: Any) -> dict[str, tuple[int, ...]]:
    """Each layer's output shape per sample (the batch dimension dropped) in one forward of ``example``."""
    inputs = to_device(inputs_of(example), model_device(model))
    if n_samples_of(inputs) < 1:
        raise ValueError("the example batch holds no samples: pass at least one (e.g. x[:1])")
    # a module called twice in one forward (a shared activation) keeps its last call, silently
    with eval_mode(model), torch.no_grad(), capture(model, names, on_repeat="last") as activations:
        try:
            run_model(model, inputs)
        except Exception as error:
            raise RuntimeError(
                f"layer_table: {type(model).__name__} failed on the example batch: {type(error).__name__}: {error}. "
                "Pass a batch the model takes (with its batch dimension, e.g. x[:1] for one sample)"
            ) from error
        return {name: tuple(activations[name].shape[1:]) for name in activations}


def layer_table(model: nn.Module, example: Any = None) -> pd.DataFrame:
    """One row per named module of ``model`` (the root excluded), in registration order.

    Columns: ``name`` (what a layer selector takes), ``type`` (the module's class name),
    ``output_shape`` (a tuple of ints: the output of one sample, its batch dimension dropped; ``None``
    without an ``example`` or for a module that did not run), ``parameters`` (the module's parameters,
    its children's included), ``leaf`` (no child modules), ``stage`` (one of
    :func:`workbench.stage_names`), ``depth`` (dotted levels below the root: ``layer1.0`` is 2).

    ``example`` is a batch the model takes (a tensor with its batch dimension, an ``(x, y)`` pair, a
    dict batch); one sample is a batch of one (``x[:1]``, or :func:`first_sample` of a dataset). The
    model runs once on it in eval mode without gradients, on the model's device; its training flags and
    hooks are as before afterwards.

    Example:
        >>> import torch
        >>> from torch import nn
        >>> net = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 8 * 8, 2))
        >>> table = layer_table(net, torch.zeros(1, 3, 8, 8))
        >>> table[["name", "type", "output_shape", "parameters"]].values.tolist()
        [['0', 'Conv2d', (4, 8, 8), 112], ['1', 'ReLU', (4, 8, 8), 0], ['2', 'Flatten', (256,), 0], ['3', 'Linear', (2,), 514]]
        >>> layer_table(net)["output_shape"].tolist()
        [None, None, None, None]
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"layer_table takes a torch.nn.Module, got {type(model).__name__}")
    names = layer_names(model)
    shapes = {} if example is None else _output_shapes(model, names, example)
    stages = set(stage_names(model))
    rows = []
    for name in names:
        module = model.get_submodule(name)
        rows.append(
            {
                "name": name,
                "type": type(module).__name__,
                "output_shape": shapes.get(name),
                "parameters": sum(parameter.numel() for parameter in module.parameters()),
                "leaf": next(module.children(), None) is None,
                "stage": name in stages,
                "depth": name.count(".") + 1,
            }
        )
    frame = pd.DataFrame(rows, columns=list(LAYER_TABLE_COLUMNS))
    return frame.astype({"output_shape": object, "parameters": "int64", "leaf": bool, "stage": bool, "depth": "int64"})
