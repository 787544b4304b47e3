"""The rules report parameter declarations are made of (:mod:`workbench.reports.declarations`).

A :class:`Rule` says what values one parameter allows: a short ``allowed`` text for ``--list``, a value
``check`` and a ``check_models`` run just before a report runs, with the report's untrained models built as
the report builds them (:class:`Context`), and an example value for messages. The helpers build the usual
rules: :func:`choice`, :func:`integer`, :func:`number`, :func:`flag`, :func:`text`, :func:`optional`,
:func:`seed_list`, :func:`device`, :func:`model_name`, :func:`model_kwargs`, :func:`layer_selector`,
:func:`weights_file`, :func:`method_list`, :func:`method_weights`, :func:`output_file`. A check returns
``None`` when the value is fine, else a sentence saying what is wrong (or raises ``ValueError`` with it).

Example:
    >>> from workbench.reports.rules import integer
    >>> integer(1, what="training epochs").check(0, None)
    'must be a whole number >= 1 (training epochs)'
"""
from __future__ import annotations

import difflib
import json
import math
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from workbench.reports.values import _short

__all__ = [
    "Rule", "Declaration", "Context", "Unavailable", "choice", "integer", "number", "flag", "optional", "text",
    "seed_list", "device", "model_name", "model_kwargs", "layer_selector", "weights_file", "method_list",
    "method_weights", "output_file",
]

Check = Callable[[Any, "Context"], "str | None"]
IMAGE_SHAPE = "1×32×32"  # what report_model / seeded_model build for: workbench.reports.notebook.IMAGE_SIZE, CHANNELS


@dataclass(frozen=True)
class Rule:
    """The values one parameter allows.

    ``allowed``: a short text for ``--list``; ``check(value, context)``: ``None`` when the value is fine,
    else what is wrong (it may also raise ``ValueError``); ``check_models(value, context)``: the same, run
    after every ``check`` passed, with the built untrained models at hand (``context.model("teacher")``);
    ``example``: a good value as JSON text, shown in messages.
    """

    allowed: str
    check: Check | None = None
    check_models: Check | None = None
    example: str | None = None


@dataclass(frozen=True)
class Declaration:
    """A report's rules, one per parameter, and how its models are built for the model checks:
    ``models`` maps a role (``"teacher"``) to its ``(name parameter, kwargs parameter)``; ``dataset``
    names the parameter that sets the number of classes."""

    rules: dict[str, Rule]
    models: dict[str, tuple[str, str]] = field(default_factory=dict)
    dataset: str = "dataset"


class Unavailable(Exception):
    """A model check whose model's name was not among the values: nothing to check it against."""


class Context:
    """What a check sees: every value (``values``), the report's name and the built untrained models."""

    def __init__(self, report: str, declaration: Declaration, values: Mapping[str, Any]) -> None:
        self.report, self.declaration, self.values = report, declaration, dict(values)
        self._built: dict[str, Any] = {}

    def model(self, role: str) -> Any:
        """The ``role`` model (``"teacher"``, ``"student"``) built untrained as the report builds it, run once
        on a batch of zeros; ``ValueError`` saying why it cannot be built or cannot take the images."""
        if role not in self._built:
            try:
                self._built[role] = _build(*self._model_settings(role))
            except ValueError as error:
                self._built[role] = error
        built = self._built[role]
        if isinstance(built, ValueError):
            raise built
        return built

    def _model_settings(self, role: str) -> tuple[str, dict[str, Any], str]:
        name_parameter, kwargs_parameter = self.declaration.models[role]
        if name_parameter not in self.values:
            raise Unavailable(role)
        return (self.values[name_parameter], dict(self.values.get(kwargs_parameter) or {}),
                self.values.get(self.declaration.dataset, "digits"))


def _build(name: str, kwargs: dict[str, Any], dataset: str) -> Any:
    import torch

    from workbench.batches import logits_of
    from workbench.reports.compare import seeded_model
    from workbench.train.cache import num_classes

    classes = num_classes(dataset)
    try:
        model = seeded_model(name, dataset, 0, **kwargs)
    except (TypeError, ValueError, KeyError, AssertionError, RuntimeError) as error:
        raise ValueError(f"{name!r} cannot be built with {json.dumps(kwargs)} for {IMAGE_SHAPE} images and "
                         f"{classes} classes ({type(error).__name__}: {_first_line(error)})") from None
    try:
        with torch.no_grad():
            shape = tuple(logits_of(model.eval()(torch.zeros(2, 1, 32, 32)), model).shape)
    except Exception as error:  # any failure here means the report would fail on its first batch
        raise ValueError(f"{name!r} cannot take the report's {IMAGE_SHAPE} images ({type(error).__name__}: "
                         f"{_first_line(error)}); choose an image classifier") from None
    if shape != (2, classes):
        raise ValueError(f"{name!r} gives outputs of shape {list(shape)} for 2 images, not [2, {classes}] "
                         f"class logits; choose an image classifier")
    return model


def _first_line(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return text[0] if text else ""


# ---- rules ---------------------------------------------------------------------------------------------

def _is_int(value: Any) -> bool:
    return type(value) is int


def _is_number(value: Any) -> bool:
    return type(value) in (int, float) and math.isfinite(value)


def choice(options: Sequence[str], source: str = "") -> Rule:
    """One of ``options`` (``source`` says where they come from).

    Example:
        >>> choice(["linear", "rbf"]).check("cosine", None)
        "not one of 'linear', 'rbf'"
    """
    options = list(options)
    listed = ", ".join(repr(option) for option in options)

    def check(value: Any, context: Context) -> str | None:
        if value in options and type(value) is type(options[0]):
            return None
        close = difflib.get_close_matches(str(value), [str(o) for o in options], n=1, cutoff=0.6)
        hint = f" (did you mean {close[0]!r}?)" if close and close[0] != str(value) else ""
        return f"not one of {listed}{f' ({source})' if source else ''}{hint}"

    return Rule(" | ".join(str(o) for o in options), check, example=json.dumps(options[0]))


def integer(minimum: int, maximum: int | None = None, *, example: int | None = None, what: str = "") -> Rule:
    """A whole number ``minimum ≤ n`` (``≤ maximum``); ``what`` says what it counts.

    Example:
        >>> integer(1).check(0, None)
        'must be a whole number >= 1'
    """
    bounds = f">= {minimum}" + (f" and <= {maximum}" if maximum is not None else "")

    def check(value: Any, context: Context) -> str | None:
        if _is_int(value) and value >= minimum and (maximum is None or value <= maximum):
            return None
        return f"must be a whole number {bounds}{f' ({what})' if what else ''}"

    return Rule(f"int {bounds}", check, example=str(example if example is not None else max(minimum, 1)))


def number(*, above: float | None = None, minimum: float | None = None, example: float = 1.0, what: str = "") -> Rule:
    """A finite number ``> above`` or ``>= minimum``.

    Example:
        >>> number(above=0).check(0.0, None)
        'must be a number > 0'
    """
    bound = f"> {above:g}" if above is not None else f">= {minimum:g}" if minimum is not None else "finite"

    def check(value: Any, context: Context) -> str | None:
        if _is_number(value) and (above is None or value > above) and (minimum is None or value >= minimum):
            return None
        return f"must be a number {bound}{f' ({what})' if what else ''}"

    return Rule(f"number {bound}", check, example=repr(example))


def flag() -> Rule:
    """``True`` or ``False``."""
    return Rule("true | false", lambda value, context: None if type(value) is bool else "must be true or false",
                example="true")


def text(allowed: str = "text", example: str = '"..."') -> Rule:
    """Any string."""
    return Rule(allowed, lambda value, context: None if isinstance(value, str) else "must be text", example=example)


def optional(rule: Rule) -> Rule:
    """``None`` or what ``rule`` allows.

    Example:
        >>> optional(integer(1)).check(None, None) is None
        True
    """
    def lifted(check: Check | None) -> Check | None:
        if check is None:
            return None
        return lambda value, context: None if value is None else check(value, context)

    return Rule(f"None or {rule.allowed}", lifted(rule.check), lifted(rule.check_models), rule.example)


def seed_list() -> Rule:
    """A non-empty list of distinct whole numbers ``>= 0``."""
    def check(value: Any, context: Context) -> str | None:
        if not isinstance(value, list) or not value or not all(_is_int(seed) and seed >= 0 for seed in value):
            return "must be a non-empty list of whole numbers >= 0"
        repeated = sorted({seed for seed in value if value.count(seed) > 1})
        if repeated:
            return f"seed{'s' if len(repeated) > 1 else ''} {', '.join(map(str, repeated))} repeated: give distinct seeds"
        return None

    return Rule("list of distinct ints >= 0", check, example="[0, 1, 2]")


_DEVICE = re.compile(r"auto|cpu|mps|cuda(:\d+)?")


def device() -> Rule:
    """``"auto"``, ``"cpu"``, ``"cuda"``, ``"cuda:N"`` or ``"mps"``, and available on this machine."""
    def check(value: Any, context: Context) -> str | None:
        if not isinstance(value, str) or not _DEVICE.fullmatch(value):
            return "not a device: use auto (cuda, then mps, then cpu), cpu, cuda, cuda:N or mps"
        import torch

        if value.startswith("cuda"):
            count = torch.cuda.device_count() if torch.cuda.is_available() else 0
            index = int(value.partition(":")[2] or 0)
            if index >= count:
                return (f"this machine has {count} CUDA device{'s' if count != 1 else ''}"
                        f"{f' (cuda:0 to cuda:{count - 1})' if count else ''}: use auto or cpu")
        mps = getattr(torch.backends, "mps", None)
        if value == "mps" and not (mps is not None and mps.is_available()):
            return "MPS is not available on this machine: use auto or cpu"
        return None

    return Rule("auto | cpu | cuda | cuda:N | mps", check, example='"auto"')


def model_name(role: str) -> Rule:
    """A name :func:`workbench.models.create` knows (built-in, tiny transformers, ``hf:<type>``, timm) whose
    untrained model builds for the report's images (with empty model kwargs: else the kwargs rule says why)."""
    def check(value: Any, context: Context) -> str | None:
        if not isinstance(value, str):
            return "must be a model name (text)"
        from workbench.models import available

        if value in available() or value.startswith("hf:"):
            return None
        import timm

        if timm.is_model(value):
            return None
        from workbench.models.factory import _unknown_name_message

        return _unknown_name_message(value)

    def check_models(value: Any, context: Context) -> str | None:
        if context.values.get(context.declaration.models[role][1]):
            return None  # with kwargs the kwargs parameter is to blame: its rule reports
        context.model(role)
        return None

    from workbench.models.factory import _BUILTINS

    return Rule(f"a model name: {', '.join(_BUILTINS)} or a timm name", check, check_models, '"cnn"')


def model_kwargs(role: str) -> Rule:
    """A dict of arguments the ``role`` model takes (checked by building it)."""
    def check(value: Any, context: Context) -> str | None:
        return None if isinstance(value, dict) else "must be a dict of model arguments"

    def check_models(value: Any, context: Context) -> str | None:
        if value:
            context.model(role)
        return None

    return Rule(f"a dict of arguments the {role} model takes", check, check_models, '{"widths": [16, 32, 64]}')


def layer_selector(role: str) -> Rule:
    """``"stages"``, a name or glob, or a list of those, resolving to at least one layer of the built model
    (:func:`workbench.capture.resolve_layers`, whose error lists the nearest names)."""
    def check(value: Any, context: Context) -> str | None:
        if isinstance(value, str) or (isinstance(value, list) and value and all(isinstance(v, str) for v in value)):
            return None
        return 'must be "stages", a layer name or glob, or a non-empty list of layer names'

    def check_models(value: Any, context: Context) -> str | None:
        from workbench.capture import resolve_layers

        try:
            resolve_layers(context.model(role), value)
        except KeyError as error:
            return str(error.args[0] if error.args else error)
        return None

    return Rule(f'"stages", a glob or a list of the {role}\'s layer names', check, check_models,
                '["blocks.0", "blocks.1"]')


_WEIGHT_SUFFIXES = (".safetensors", ".pt", ".pth", ".bin")


def weights_file(role: str) -> Rule:
    """``None`` or an existing weight file (``.safetensors``, ``.pt``, ``.pth``, ``.bin``) that fits the
    built ``role`` model."""
    def check(value: Any, context: Context) -> str | None:
        if value is None:
            return None
        if not isinstance(value, str):
            return "must be the path of a weight file"
        path = Path(value)
        if path.suffix.lower() not in _WEIGHT_SUFFIXES:
            return f"must end in {', '.join(_WEIGHT_SUFFIXES)}"
        if not path.is_file():
            return f"no such file{' (a folder)' if path.is_dir() else ''} (relative paths are from {Path.cwd()})"
        return None

    def check_models(value: Any, context: Context) -> str | None:
        if value is None:
            return None
        from workbench.models import load_weights

        try:
            load_weights(context.model(role), value)
        except (ValueError, RuntimeError, OSError) as error:
            return f"does not fit the {role} model: {_first_line(error)}"
        return None

    return Rule("None or a .safetensors/.pt file", check, check_models, '"runs/teacher.safetensors"')


def method_list(feature_layers_parameter: str = "feature_layers") -> Rule:
    """A non-empty list of distinct method strings, each parsed by
    :func:`workbench.reports.methods.parse_method`, their layers checked against the built models
    (:func:`~workbench.reports.methods.check_method_layers`, with the report's ``feature_layers``)."""
    def check(value: Any, context: Context) -> str | None:
        if not isinstance(value, list) or not value or not all(isinstance(v, str) for v in value):
            return "must be a non-empty list of method strings"
        repeated = sorted({v for v in value if value.count(v) > 1})
        if repeated:
            return f"{', '.join(map(repr, repeated))} repeated: each method runs once per seed"
        from workbench.reports.methods import parse_method

        for method in value:
            parse_method(method)  # its ValueError says what to write instead
        return None

    def check_models(value: Any, context: Context) -> str | None:
        from workbench.reports.methods import check_method_layers

        teacher, student = context.model("teacher"), context.model("student")
        for method in value:  # its ValueError names the method, the term and the nearest layer names
            check_method_layers(method, teacher, student, context.values.get(feature_layers_parameter, "auto"))
        return None

    return Rule("a list of methods: student, kd, kd+fitnet@blocks.1, ... (workbench.reports.methods)", check, check_models,
                '["student", "kd", "kd+fitnet@blocks.1"]')


def method_weights(methods_parameter: str = "methods") -> Rule:
    """A dict ``{method: weight}``: keys among the ``methods`` parameter's, weights finite and ``>= 0``."""
    def check(value: Any, context: Context) -> str | None:
        if not isinstance(value, dict):
            return "must be a dict of method -> term weight"
        methods = context.values.get(methods_parameter) or []
        for key, weight in value.items():
            if key not in methods:
                return f"{key!r} is not one of the methods run ({', '.join(map(repr, methods))})"
            if not _is_number(weight) or weight < 0:
                return f"the weight of {key!r} must be a number >= 0, got {_short(weight)}"
        return None

    return Rule(f"a dict of weights >= 0 by method of {methods_parameter}", check, example='{"kd": 2.0}')


def output_file(report: str) -> Rule:
    """``None`` or a file the report writes: checked by :func:`workbench.reports.check_outputs` (suffix and
    folder with the values; an existing file, replaced only when asked, just before the run, when the
    CLI's ``--force`` is known). Its ``OutputError`` passes through unchanged."""
    def check(value: Any, context: Context, *, replace: bool = True) -> str | None:
        from workbench.reports.runner import check_outputs, get_report

        check_outputs(get_report(report), context.values, overwrite=replace)
        return None

    def check_before_run(value: Any, context: Context) -> str | None:
        return check(value, context, replace=False)

    return Rule("None or a new .md file", check, check_before_run, example='"reports/results/table.md"')
