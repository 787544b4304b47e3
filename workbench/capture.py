"""Forward-hook capture of activations by layer name: the one way anything in the workbench reads them.

Selectors are exact module names (``"blocks.2"``), globs (``"layer*"``, ``"blocks.*"``; ``*`` stays within
one dotted level, ``**`` crosses levels), or ``"stages"``:
the modules named by a timm-style ``model.feature_info`` when present, else the heuristic of
:func:`stage_names`. Hooks are removed when the ``with`` block ends, also on an exception or an interrupt.

Selectors in detail:

- Globs read as :mod:`fnmatch` within one dotted level: ``?`` is one character, ``[ab]`` / ``[a-c]`` a
  class, ``[!f]`` any character but ``f``; none of them (nor ``*``) matches the ``.`` between levels,
  ``**`` does. A ``[`` without a closing ``]`` is literal (``"[]"`` selects a module named ``[]``).
- A module registered twice (``model.b = model.a``) has one name in :func:`layer_names` (the first, which
  globs match); the other resolves when given exactly and is reported under that name. Selecting both
  names hooks the module once and gives both names its output.
- A module that runs more than once in one forward (shared weights) is stored once: by default its last
  call, with a warning naming it; ``capture(..., on_repeat="first" | "last" | "error")`` chooses.
"""
from __future__ import annotations

import difflib
import re
import warnings
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


def _class_end(selector: str, start: int) -> int:
    """Index of the ``]`` closing the class opened at ``selector[start] == "["``, or -1 (fnmatch's rules)."""
    end = start + 1
    if end < len(selector) and selector[end] == "!":
        end += 1
    if end < len(selector) and selector[end] == "]":  # a "]" first in the class is a member
        end += 1
    end = selector.find("]", end)
    return end


def _class_regex(members: str) -> str:
    """A glob class body (between the brackets) as a regex that never matches the level separator."""
    negated = members.startswith("!")
    members = members[1:] if negated else members
    items, index = [], 0
    while index < len(members):
        if index + 2 < len(members) and members[index + 1] == "-":  # a range, as fnmatch reads it
            low, high = members[index], members[index + 2]
            if low <= high:  # a reversed range is empty
                items.append(f"{re.escape(low)}-{re.escape(high)}")
            index += 3
        else:
            items.append(re.escape(members[index]))
            index += 1
    if negated:
        return f"[^{''.join(items)}.]"
    return f"(?!\\.)[{''.join(items)}]" if items else "(?!)"


def glob_pattern(selector: str) -> re.Pattern:
    """Compile a layer glob: ``*``, ``?`` and ``[...]`` stay within one dotted level, ``**`` crosses levels.

    So ``"layer*"`` selects ResNet's four stages but not their blocks, and ``"blocks.**.fc*"`` reaches down.
    Character classes read as in :mod:`fnmatch`: ``[!f]`` is any character but ``f``, a ``]`` first in
    the class is a member, ``a-c`` is a range; a ``[`` without its ``]`` (``"[]"``, ``"[a"``) is literal.
    On names without dots a selector matches exactly what ``fnmatch.fnmatchcase`` matches.

    Example:
        >>> bool(glob_pattern("layer*").fullmatch("layer1")), bool(glob_pattern("layer*").fullmatch("layer1.0"))
        (True, False)
        >>> [name for name in ["fc", "conv", "bn"] if glob_pattern("[!f]*").fullmatch(name)]
        ['conv', 'bn']
    """
    regex, index = [], 0
    while index < len(selector):
        char = selector[index]
        if char == "*":
            stars = len(selector[index:]) - len(selector[index:].lstrip("*"))
            regex.append(".*" if stars > 1 else "[^.]*")
            index += stars
        elif char == "?":
            regex.append("[^.]")
            index += 1
        elif char == "[" and (end := _class_end(selector, index)) > 0:
            regex.append(_class_regex(selector[index + 1 : end]))
            index = end + 1
        else:
            regex.append(re.escape(char))
            index += 1
    return re.compile("".join(regex))


def resolve_layers(model: nn.Module, layers: LayerSelector) -> list[str]:
    """Expand a selector (names, globs or ``"stages"``) into existing module names, in model order.

    An empty list selects nothing. An unknown name or a glob that matches nothing raises ``KeyError`` listing the closest names.
    A module registered under two names (``model.b = model.a``) is listed by :func:`layer_names` once,
    under its first name, and globs match that name; its other name resolves when given exactly, and sorts
    just after the first.

    Example:
        >>> from torch import nn
        >>> net = nn.Sequential(nn.Linear(2, 3), nn.ReLU(), nn.Linear(3, 1))
        >>> resolve_layers(net, "[02]")
        ['0', '2']
    """
    selectors = [layers] if isinstance(layers, str) else list(layers)
    first_names = {id(module): name for name, module in model.named_modules() if name}
    known = list(first_names.values())
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
            matches = [selector] if _first_name(model, selector, first_names) else []
        if not matches:
            close = difflib.get_close_matches(selector, known, n=5, cutoff=0.4) or known[:5]
            raise KeyError(
                f"{type(model).__name__} has no layer matching {selector!r}; closest names: {close}. "
                "List them all with workbench.layer_names(model)."
            )
        chosen.extend(name for name in matches if name not in chosen)
    order = {name: index for index, name in enumerate(known)}

    def model_order(name: str) -> tuple[int, bool]:
        first = _first_name(model, name, first_names)
        return order[first], name != first

    return sorted(chosen, key=model_order)


def _first_name(model: nn.Module, name: str, first_names: dict[int, str]) -> str | None:
    """The name ``named_modules`` gives the module that ``name`` reaches by attribute path (None: none)."""
    try:
        module = model.get_submodule(name)
    except AttributeError:
        return None
    return first_names.get(id(module))


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


ON_REPEAT = ("warn", "last", "first", "error")


class _CallCounter:
    """Notices a hooked module that runs again within one forward of the root model (shared weights).

    The root's pre-hook opens a forward and its post-hook closes it; plain Python counters only, so the
    check costs no device synchronisation. Calls outside a forward of the root (a layer called on its
    own, activation checkpointing re-running a block in the backward pass) are never repeats.
    """

    def __init__(self, model: nn.Module, on_repeat: str) -> None:
        if on_repeat not in ON_REPEAT:
            raise ValueError(f"on_repeat must be one of {ON_REPEAT}, got {on_repeat!r}")
        self.model_name, self.on_repeat = type(model).__name__, on_repeat
        self.forward_index, self.in_forward = 0, False
        self.calls: dict[int, tuple[int, int]] = {}  # module id -> (forward index, calls in it)
        self.warned: set[int] = set()

    def open(self, *_: object) -> None:
        self.forward_index, self.in_forward = self.forward_index + 1, True

    def close(self, *_: object) -> None:
        self.in_forward = False

    def keep(self, key: int, names: list[str]) -> bool:
        """Whether this call's output replaces the stored one (False: keep the first call's)."""
        if not self.in_forward:
            return True
        index, count = self.calls.get(key, (0, 0))
        count = count + 1 if index == self.forward_index else 1
        self.calls[key] = (self.forward_index, count)
        if count == 1:
            return True
        message = f"layer {names[0]!r} ran {count} times in one forward of {self.model_name} (shared weights?)"
        if self.on_repeat == "error":
            raise RuntimeError(f"{message}; capture(..., on_repeat='last' or 'first') keeps one of the calls")
        if self.on_repeat == "warn" and key not in self.warned:
            self.warned.add(key)
            warnings.warn(
                f"{message}: the capture keeps the last call only; pass on_repeat='last' or 'first' to choose "
                "without this warning, or 'error' to refuse",
                stacklevel=2,
            )
        return self.on_repeat != "first"


@contextmanager
def capture(
    model: nn.Module, layers: LayerSelector = "stages", *, detach: bool = True, on_repeat: str = "warn"
) -> Iterator[Activations]:
    """Record the outputs of the selected layers on every forward inside the ``with`` block.

    Each forward overwrites the previous outputs. ``detach=False`` keeps the autograd graph (losses).
    A layer that runs more than once in one forward of ``model`` (a shared module) is stored once:
    ``on_repeat="warn"`` (default) keeps its last call and warns once per block, naming the layer;
    ``"last"`` / ``"first"`` keep that call silently; ``"error"`` raises ``RuntimeError``. Two names of
    one module (an alias) share one hook and both receive its output.

    Example:
        >>> import torch
        >>> from torch import nn
        >>> net = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
        >>> with capture(net, ["0", "2"]) as acts:
        ...     _ = net(torch.randn(5, 4))
        >>> acts["0"].shape, len(net[0]._forward_hooks)
        (torch.Size([5, 8]), 0)
    """
    counter = _CallCounter(model, on_repeat)
    names = resolve_layers(model, layers)
    activations = Activations(names)
    names_of: dict[int, tuple[nn.Module, list[str]]] = {}
    for name in names:
        module = model.get_submodule(name)
        names_of.setdefault(id(module), (module, []))[1].append(name)

    def recorder(key: int, module_names: list[str]):
        def hook(_module: nn.Module, _inputs: object, output: object) -> None:
            if counter.keep(key, module_names):
                tensor = as_tensor(output)
                tensor = tensor.detach() if detach else tensor
                for name in module_names:
                    activations._outputs[name] = tensor

        return hook

    handles = []
    try:
        if names:
            handles.append(model.register_forward_pre_hook(counter.open))
            handles.append(model.register_forward_hook(counter.close, always_call=True))
        for key, (module, module_names) in names_of.items():
            handles.append(module.register_forward_hook(recorder(key, module_names)))
        yield activations
    finally:
        for handle in handles:
            handle.remove()
