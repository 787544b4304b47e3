"""Forward-hook capture of activations by layer name: the one way anything in the workbench reads them.

Selectors are exact module names (``"blocks.2"``), globs (``"layer*"``, ``"blocks.*"``; ``*`` stays within
one dotted level, ``**`` crosses levels), or ``"stages"``:
the modules named by a timm-style ``model.feature_info`` when present, else the heuristic of
:func:`stage_names`. Hooks are removed when the ``with`` block ends, also on an exception or an interrupt.
"""
from __future__ import annotations

import difflib
import re
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager

import torch
from torch import nn

LayerSelector = str | Sequence[str]


def layer_names(model: nn.Module) -> list[str]:
    """All addressable module names of ``model`` in registration order (the root module excluded).

    Example:
        >>> from torch import nn
        >>> layer_names(nn.Sequential(nn.Linear(2, 3), nn.ReLU()))
        ['0', '1']
    """
    return [name for name, _ in model.named_modules() if name]


def stage_names(model: nn.Module) -> list[str]:
    """The model's stages: ``feature_info`` module names if the model has them, else a heuristic.

    The heuristic takes the children of the longest ``nn.Sequential`` / ``nn.ModuleList`` in the model
    (ResNet-like ``layer*`` stages, ViT ``blocks.*``, BERT ``encoder.layer.*``, GPT-2 ``h.*``); a model
    without such a container gets its direct children.

    Example:
        >>> from torch import nn
        >>> stage_names(nn.Sequential(nn.Linear(2, 3), nn.ReLU(), nn.Linear(3, 1)))
        ['0', '1', '2']
    """
    info = getattr(model, "feature_info", None)
    if info is not None:
        entries = info.get_dicts() if hasattr(info, "get_dicts") else list(info)
        names = [entry["module"] for entry in entries if isinstance(entry, Mapping) and "module" in entry]
        known = set(layer_names(model))
        if names and all(name in known for name in names):
            return names
    containers = [
        (name, module)
        for name, module in model.named_modules()
        if isinstance(module, (nn.Sequential, nn.ModuleList)) and len(module) > 1
    ]
    if containers:
        prefix, longest = max(containers, key=lambda item: len(item[1]))
        return [f"{prefix}.{child}" if prefix else child for child, _ in longest.named_children()]
    return [name for name, _ in model.named_children()]


def glob_pattern(selector: str) -> re.Pattern:
    """Compile a layer glob: ``*`` and ``?`` stay within one dotted level, ``**`` crosses levels.

    So ``"layer*"`` selects ResNet's four stages but not their blocks, and ``"blocks.**.fc*"`` reaches down.

    Example:
        >>> bool(glob_pattern("layer*").fullmatch("layer1")), bool(glob_pattern("layer*").fullmatch("layer1.0"))
        (True, False)
    """
    parts = re.split(r"(\*\*|\*|\?|\[[^\]]*\])", selector)
    translated = {"**": ".*", "*": "[^.]*", "?": "[^.]"}
    regex = "".join(
        translated.get(part) or (part if part.startswith("[") and part.endswith("]") else re.escape(part))
        for part in parts
    )
    return re.compile(regex)


def resolve_layers(model: nn.Module, layers: LayerSelector) -> list[str]:
    """Expand a selector (names, globs or ``"stages"``) into existing module names, in model order.

    An empty list selects nothing. An unknown name or a glob that matches nothing raises ``KeyError`` listing the closest names.

    Example:
        >>> from torch import nn
        >>> net = nn.Sequential(nn.Linear(2, 3), nn.ReLU(), nn.Linear(3, 1))
        >>> resolve_layers(net, "[02]")
        ['0', '2']
    """
    selectors = [layers] if isinstance(layers, str) else list(layers)
    known = layer_names(model)
    chosen: list[str] = []
    for selector in selectors:
        if not isinstance(selector, str):
            raise TypeError(f"a layer selector must be a string, got {type(selector).__name__}: {selector!r}")
        if selector == "stages":
            matches = stage_names(model)
        elif any(char in selector for char in "*?["):
            pattern = glob_pattern(selector)
            matches = [name for name in known if pattern.fullmatch(name)]
        else:
            matches = [selector] if selector in known else []
        if not matches:
            close = difflib.get_close_matches(selector, known, n=5, cutoff=0.4) or known[:5]
            raise KeyError(
                f"{type(model).__name__} has no layer matching {selector!r}; closest names: {close}. "
                "List them all with workbench.layer_names(model)."
            )
        chosen.extend(name for name in matches if name not in chosen)
    order = {name: index for index, name in enumerate(known)}
    return sorted(chosen, key=order.__getitem__)


def as_tensor(output: object) -> torch.Tensor:
    """Normalise a module output to one tensor: tuples/lists give their first element, Hugging Face
    ``ModelOutput``s and dicts their ``last_hidden_state`` (else their first tensor).

    Example:
        >>> import torch
        >>> as_tensor((torch.ones(2), torch.zeros(3))).shape
        torch.Size([2])
    """
    if isinstance(output, torch.Tensor):
        return output
    if isinstance(output, Mapping):
        if "last_hidden_state" in output:
            return as_tensor(output["last_hidden_state"])
        for value in output.values():
            if isinstance(value, torch.Tensor):
                return value
    if isinstance(output, (tuple, list)) and output:
        return as_tensor(output[0])
    raise TypeError(f"cannot read a tensor from a module output of type {type(output).__name__}")


def flatten_per_sample(activation: torch.Tensor) -> torch.Tensor:
    """``[n, ...]`` -> ``[n, features]``: maps ``[n, c, h, w]`` and token sequences ``[n, t, d]`` alike.

    Example:
        >>> import torch
        >>> flatten_per_sample(torch.zeros(4, 3, 2, 2)).shape
        torch.Size([4, 12])
    """
    if activation.dim() == 1:
        return activation[:, None]
    return activation.reshape(activation.shape[0], -1)


class Activations(Mapping[str, torch.Tensor]):
    """The latest forward's output of each captured layer, by name (a read-only mapping)."""

    def __init__(self, layers: list[str]):
        self.layers = layers
        self._outputs: dict[str, torch.Tensor] = {}

    def __getitem__(self, name: str) -> torch.Tensor:
        if name not in self._outputs:
            if name in self.layers:
                raise KeyError(f"layer {name!r} has not run yet: call the model inside the capture block")
            raise KeyError(f"layer {name!r} is not captured; captured layers: {self.layers}")
        return self._outputs[name]

    def __iter__(self) -> Iterator[str]:
        return (name for name in self.layers if name in self._outputs)

    def __len__(self) -> int:
        return len(self._outputs)

    def flat(self) -> dict[str, torch.Tensor]:
        """Every captured output flattened to ``[n, features]``, in layer order."""
        return {name: flatten_per_sample(self[name]) for name in self}

    def clear(self) -> None:
        """Forget the stored outputs (the hooks stay until the ``with`` block ends)."""
        self._outputs.clear()


@contextmanager
def capture(model: nn.Module, layers: LayerSelector = "stages", *, detach: bool = True) -> Iterator[Activations]:
    """Record the outputs of the selected layers on every forward inside the ``with`` block.

    Each forward overwrites the previous outputs. ``detach=False`` keeps the autograd graph (losses).

    Example:
        >>> import torch
        >>> from torch import nn
        >>> net = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
        >>> with capture(net, ["0", "2"]) as acts:
        ...     _ = net(torch.randn(5, 4))
        >>> acts["0"].shape, len(net[0]._forward_hooks)
        (torch.Size([5, 8]), 0)
    """
    names = resolve_layers(model, layers)
    modules = dict(model.named_modules())
    activations = Activations(names)
    handles = []

    def recorder(name: str):
        def hook(_module: nn.Module, _inputs: object, output: object) -> None:
            tensor = as_tensor(output)
            activations._outputs[name] = tensor.detach() if detach else tensor

        return hook

    try:
        for name in names:
            handles.append(modules[name].register_forward_hook(recorder(name)))
        yield activations
    finally:
        for handle in handles:
            handle.remove()
