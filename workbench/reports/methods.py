"""Distillation methods for the ``distill`` report, written as text: every loss term of
:mod:`workbench.losses` by a short name, combined with ``+``, with settings, layers and weights.

Syntax (spaces allowed between the parts)::

    method  = "student" | term ("+" term)*
    term    = name ["(" key=value ("," key=value)* ")"] ["@" layers] ["*" weight]
    layers  = "stages" | "middle" | "last" | layer | teacher_layer ":" student_layer

- ``student`` is the student trained alone on the labels; every other method keeps that cross-entropy
  (weight 1) and adds its terms: ``CE + Σ weight · term``.
- ``name``: ``kd``, ``dkd``, ``dist``, ``rkl`` (reverse KL), ``js`` (Jensen–Shannon), ``taid`` — logit
  terms — and ``fitnet``, ``at`` (attention transfer), ``nd`` (norm and direction), ``cosine`` (cosine
  hint), ``rkd``, ``sp`` (similarity preserving), ``pkt``, ``cka`` — feature terms — and ``ofa``
  (OFA-KD, :func:`workbench.losses.ofa_terms`: the OFA loss on the final logits and on a logit branch
  at every student stage, ``ofa@last`` / ``ofa@middle`` / ``ofa@<student layer>`` for one; it reads
  only the teacher's logits, and its cross-entropy has label smoothing 0.1 as the authors') (see
  :data:`TERMS`; the class names, e.g. ``AttentionTransfer``, and a few aliases are accepted, in any case).
- settings are the term's constructor keywords, values JSON numbers or ``true`` / ``false`` (a word
  such as ``linear`` for TAID's ``schedule``): ``kd(T=2)``, ``dkd(beta=4)``, ``rkd(angle_weight=0)``.
- layers (feature terms only; logit terms refuse them): ``stages`` is one term per matched pair of
  stages (:func:`workbench.stage_names`; equal counts pair stage i with stage i, otherwise every stage
  of the model with fewer is paired with the stage at the same relative depth of the other, so first
  meets first and last meets last), ``middle`` / ``last`` the middle / last stage of each model, a
  layer name used on both sides (``blocks.1``), or ``teacher_layer:student_layer`` (``layer2:blocks.1``).
  Layer names are exact module names (:func:`workbench.layer_names`); ``*`` is the weight, not a glob.
  A feature term written without ``@`` takes the report's ``feature_layers`` (``"auto"``: its own
  placement in :data:`TERMS` — hints at the middle stage, attention transfer at every stage, relation,
  CKA and ND terms at the last stage).
- weight: a number ≥ 0 (default: the term's weight in :data:`TERMS`): ``at`` 1000 (β = 10³ of the
  authors' code, RepDistiller's ``-b 1000``), ``sp`` 3000 (the paper's γ, RepDistiller's ``-b 3000``),
  ``pkt`` 30000 (RepDistiller's ``-b 30000``), ``dist`` 2, every other term 1 (``nd``: the authors'
  ``nd_weight=1.0``). Settings default to the term class's own (the papers', see each docstring).
  Those weights were tuned for SGD on CIFAR ResNets; with the report's AdamW on its small CNNs the
  large ones can swamp the cross-entropy, so compare a few (``at*1``, ``sp*30``, ``pkt*3000``).
- ``nd`` works on pooled embeddings (:class:`EmbeddingNormDirection`) with the teacher's class means
  over the training data (:func:`method_distiller`'s ``data=``); ``taid`` gets the run's step count for
  its schedule (``total_steps=``), as :func:`workbench.reports.run_comparison` passes them.

Examples: ``"kd"``, ``"kd(T=2)"``, ``"kd+fitnet@blocks.1"``, ``"at@stages"``, ``"kd*0.5+rkd@last*2"``,
``"fitnet@layer2:blocks.1"``. In a shell: ``-p 'methods=["student", "kd+fitnet@blocks.1", "at@stages"]'``.

The names of :data:`METHODS` (``student``, ``kd``, ``dkd``, ``dist``, ``fitnet``, ``rkd``, ``cka``)
mean what they meant before composites existed (the committed results tables used them).

Example:
    >>> from workbench.reports.methods import parse_method
    >>> spec = parse_method("KD(T=2) + fitnet@blocks.1*0.5")
    >>> str(spec), [term.name for term in spec.terms]
    ('kd(T=2.0)+fitnet@blocks.1*0.5', ['kd', 'fitnet'])
"""
from __future__ import annotations

import difflib
import inspect
import json
import math
import re
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from workbench import losses
from workbench.capture import capture, resolve_layers, stage_names
from workbench.losses.ofa import LOGITS as BRANCH_LOGITS
from workbench.losses.ofa import branch_column, ofa_terms
from workbench.train.distiller import Distiller

__all__ = [
    "TERMS", "METHODS", "LAYER_RULES", "TermKind", "TermSpec", "MethodSpec", "Method", "PlannedTerm", "parse_method",
    "check_feature_layers", "check_layer_rule", "plan_method", "check_method_layers", "layer_pairs", "stage_pairs",
    "method_distiller", "describe_method", "describe_term", "teacher_class_means", "pooled", "EmbeddingNormDirection",
]

LAYER_RULES = ("stages", "middle", "last")
# keywords a method string may not set: modules and tensors are made here, TAID must update itself in fit
HIDDEN_KEYWORDS = ("projector", "class_means", "auto_update", "teacher_detach")


@dataclass(frozen=True)
class TermKind:
    """One loss term by name: its class, ``kind`` (``"logits"``, ``"features"`` or ``"branches"``: OFA-KD's
    logit branches on student layers), default ``weight`` and
    ``settings`` (on top of the constructor's), ``placement`` (the layers it takes under
    ``feature_layers="auto"``), the words for descriptions (``label``, ``shown`` settings, ``paper``)
    and accepted ``aliases``."""

    name: str
    cls: type[nn.Module]
    kind: str
    label: str
    paper: str
    weight: float = 1.0
    settings: dict[str, Any] = field(default_factory=dict)
    placement: str = "last"
    shown: tuple[str, ...] = ()
    aliases: tuple[str, ...] = ()

    def keywords(self) -> dict[str, inspect.Parameter]:
        """The constructor keywords a method string may set."""
        parameters = inspect.signature(self.cls.__init__).parameters
        return {key: p for key, p in parameters.items() if key != "self" and key not in HIDDEN_KEYWORDS}

    def make(self, **settings: Any) -> nn.Module:
        """A fresh term with this kind's default settings, updated by ``settings``."""
        return self.cls(**{**self.settings, **settings})


def pooled(features: torch.Tensor) -> torch.Tensor:
    """Features as one vector per sample: maps ``[n, c, h, w]`` averaged over positions, tokens ``[n, t, d]``
    over tokens, vectors ``[n, d]`` as they are.

    Example:
        >>> pooled(torch.ones(2, 3, 4, 4)).shape, pooled(torch.ones(2, 5, 3)).shape
        (torch.Size([2, 3]), torch.Size([2, 3]))
    """
    if features.dim() == 4:
        return features.mean(dim=(2, 3))
    if features.dim() == 3:
        return features.mean(dim=1)
    if features.dim() == 2:
        return features
    raise ValueError(f"cannot pool features of shape {tuple(features.shape)} to embeddings [n, d]")


class EmbeddingNormDirection(losses.NormDirection):
    """:class:`~workbench.losses.NormDirection` on pooled features (see :func:`pooled`), so it can sit on a
    stage: the output of a CNN's last stage averaged over positions is the embedding its head reads.

    Example:
        >>> teacher, targets = torch.tensor([[2.0, 0.0], [0.0, 1.0]])[:, :, None, None], torch.tensor([0, 1])
        >>> EmbeddingNormDirection()(teacher.clone(), teacher, targets).item()
        0.0
    """

    def forward(
        self, student: torch.Tensor, teacher: torch.Tensor, targets: torch.Tensor | None = None
    ) -> torch.Tensor:
        return super().forward(pooled(student), pooled(teacher), targets)


def _terms() -> dict[str, TermKind]:
    kinds = [
        TermKind("kd", losses.KD, "logits", "KD", "Hinton et al. 2015", shown=("T",), aliases=("kl", "hinton")),
        TermKind("dkd", losses.DKD, "logits", "DKD", "Zhao et al. 2022", shown=("alpha", "beta", "T"),
                 aliases=("decoupled",)),
        TermKind("dist", losses.DIST, "logits", "DIST", "Huang et al. 2022", weight=2.0, shown=("beta", "gamma")),
        TermKind("rkl", losses.ReverseKL, "logits", "reverse KL", "Gu et al. 2024", shown=("T",),
                 aliases=("reverse_kl", "reverse-kl", "minillm")),
        TermKind("js", losses.JensenShannon, "logits", "Jensen–Shannon", "Lin 1991; Agarwal et al. 2024",
                 shown=("T",), aliases=("jsd", "jensen_shannon")),
        TermKind("taid", losses.TAID, "logits", "TAID", "Shing et al. 2025", shown=("alpha_start", "alpha_end")),
        TermKind("ofa", losses.OFALoss, "branches", "OFA-KD", "Hao et al. 2023", placement="stages",
                 shown=("gamma", "T"), aliases=("ofa_kd", "ofakd")),
        TermKind("fitnet", losses.FitNet, "features", "FitNet hint (1×1-conv projector, MSE)", "Romero et al. 2015",
                 placement="middle", aliases=("fitnets", "hint")),
        TermKind("at", losses.AttentionTransfer, "features", "attention transfer", "Zagoruyko & Komodakis 2017",
                 weight=1000.0, placement="stages", shown=("p",), aliases=("attention", "attention_transfer")),
        TermKind("nd", EmbeddingNormDirection, "features", "ND loss (pooled embeddings, teacher class means)",
                 "Wang et al. 2023", aliases=("norm_direction", "normdirection")),
        TermKind("cosine", losses.CosineHint, "features", "cosine hint (projector)", "a generic hint",
                 placement="middle", aliases=("cos", "cosine_hint")),
        TermKind("rkd", losses.RKD, "features", "RKD distance and angle", "Park et al. 2019"),
        TermKind("sp", losses.SimilarityPreserving, "features", "similarity-preserving", "Tung & Mori 2019",
                 weight=3000.0, aliases=("similarity_preserving",)),
        TermKind("pkt", losses.PKT, "features", "PKT", "Passalis & Tefas 2018", weight=30000.0,
                 aliases=("probabilistic",)),
        TermKind("cka", losses.CKALoss, "features", "CKALoss (1 − linear CKA)", "Kornblith et al. 2019",
                 aliases=("ckaloss",)),
    ]
    return {kind.name: kind for kind in kinds}


TERMS: dict[str, TermKind] = _terms()


def _names() -> dict[str, str]:
    """Every accepted spelling, lower case -> canonical term name."""
    names = {}
    for kind in TERMS.values():
        for spelling in (kind.name, kind.cls.__name__, *kind.aliases):
            names[spelling.lower()] = kind.name
    names["normdirection"] = names["embeddingnormdirection"] = "nd"
    return names


NAMES = _names()


@dataclass(frozen=True)
class TermSpec:
    """One term of a method as written: canonical ``name``, explicit ``settings`` (key, value pairs),
    ``layers`` (``None``: the report's rule) and explicit ``weight`` (``None``: the default)."""

    name: str
    settings: tuple[tuple[str, Any], ...] = ()
    layers: str | None = None
    weight: float | None = None

    @property
    def kind(self) -> TermKind:
        return TERMS[self.name]

    def __str__(self) -> str:
        text = self.name
        if self.settings:
            text += "(" + ", ".join(f"{key}={_value_text(value)}" for key, value in self.settings) + ")"
        if self.layers is not None:
            text += f"@{self.layers}"
        if self.weight is not None:
            text += f"*{self.weight!r}"
        return text


@dataclass(frozen=True)
class MethodSpec:
    """A parsed method: ``terms`` (empty for ``"student"``); ``str()`` gives the canonical spelling."""

    terms: tuple[TermSpec, ...]

    def __str__(self) -> str:
        return "+".join(str(term) for term in self.terms) if self.terms else "student"


def _value_text(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    return value if isinstance(value, str) else repr(value)


SYNTAX = ("a method is 'student' or term+term+…, a term name[(key=value, …)][@layers][*weight], "
          "e.g. 'kd(T=2)*0.5+fitnet@blocks.1'")
NUMBER = r"(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?"
TERM = re.compile(rf"(?P<name>[A-Za-z_][A-Za-z0-9_\-]*)(?:\((?P<settings>[^()]*)\))?(?:@(?P<layers>[^*+()@]*))?"
                  rf"(?:\*(?P<weight>{NUMBER}|[^+()@*]*))?")
LAYER = re.compile(r"[A-Za-z0-9_.\-]+")
WORD = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
# what the run supplies (method_distiller's total_steps=), stood in for when a method string is checked
RUN_SETTINGS = {"taid": {"total_steps": 1}}
TYPE_WORDS = {float: "a number", int: "an integer", bool: "true or false", str: "a word"}


def _closest(word: str, names: dict[str, str]) -> str:
    """``"did you mean 'a' or 'b'? "`` for the spellings in ``names`` (spelling -> canonical) close to ``word``."""
    close = difflib.get_close_matches(word.lower(), list(names), n=6, cutoff=0.5)
    close = list(dict.fromkeys(names[spelling] for spelling in close))[:3]
    return f"did you mean {' or '.join(repr(n) for n in close)}? " if close else ""


def _term_name(word: str, text: str) -> str:
    name = NAMES.get(word.lower())
    if name is None:
        raise ValueError(f"method {text!r}: unknown term {word!r}; {_closest(word, {**NAMES, 'student': 'student'})}"
                         f"the terms are {list(TERMS)} (or 'student' alone)")
    return name


def _setting(kind: TermKind, key: str, raw: str, text: str) -> Any:
    """``raw`` read as JSON (a number, true/false) or a bare word, and checked against ``key``'s default."""
    keywords = kind.keywords()
    if key not in keywords:
        known = f"its settings are {list(keywords)}" if keywords else "it has no settings"
        raise ValueError(f"method {text!r}: {kind.name} has no setting {key!r}; "
                         f"{_closest(key, {k.lower(): k for k in keywords})}{known}")
    try:
        value = json.loads(raw)
    except ValueError:
        if not WORD.fullmatch(raw):
            raise ValueError(f"method {text!r}: {kind.name}({key}=…) must be a number, true/false or a word, "
                             f"got {raw!r}") from None
        if raw.lower() in ("true", "false"):
            raise ValueError(f"method {text!r}: write {kind.name}({key}={raw.lower()}) (JSON true/false), "
                             f"not {raw!r}") from None
        value = raw
    default = keywords[key].default
    expected = type(default) if default is not None else int  # TAID's total_steps: int | None
    if expected is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if not isinstance(value, expected) or (expected is int and isinstance(value, bool)):
        raise ValueError(f"method {text!r}: {kind.name}({key}=…) must be {TYPE_WORDS[expected]} "
                         f"(default {_value_text(default) if default is not None else 'none'}), got {raw!r}")
    return value


def _settings(kind: TermKind, body: str, text: str) -> tuple[tuple[str, Any], ...]:
    settings: dict[str, Any] = {}
    for item in filter(None, (part.strip() for part in body.split(","))):
        key, equals, raw = (part.strip() for part in item.partition("="))
        if not equals or not key or not raw:
            raise ValueError(f"method {text!r}: settings are key=value pairs, e.g. {kind.name}"
                             f"({next(iter(kind.keywords()), 'T')}=2); got {item!r}")
        if key in settings:
            raise ValueError(f"method {text!r}: {kind.name} sets {key!r} twice")
        settings[key] = _setting(kind, key, raw, text)
    try:  # the term's own checks (T > 0, 0 ≤ α_start ≤ α_end ≤ 1, ...) before anything trains
        kind.make(**{**RUN_SETTINGS.get(kind.name, {}), **settings})
    except (TypeError, ValueError) as error:
        raise ValueError(f"method {text!r}: {error}") from None
    return tuple(settings.items())


def _layers(kind: TermKind, layers: str, text: str) -> str:
    if kind.kind == "logits":
        raise ValueError(f"method {text!r}: {kind.name} compares logits and takes no layers; drop '@{layers}' "
                         f"(feature terms take layers: {[k.name for k in TERMS.values() if k.kind != 'logits']})")
    rule = check_layer_rule(layers, f"method {text!r}: {kind.name}@")
    if kind.kind == "branches" and ":" in rule:
        raise ValueError(f"method {text!r}: {kind.name}'s branches hang on student layers and read only the "
                         f"teacher's logits; write {kind.name}@{rule.partition(':')[2]} (a student layer, "
                         "stages, middle or last)")
    return rule


def check_layer_rule(rule: str, context: str = "layers ") -> str:
    """``rule`` if it is ``stages``, ``middle``, ``last``, a layer name or ``teacher:student``; else a ``ValueError``.

    Example:
        >>> check_layer_rule("layer2:blocks.1")
        'layer2:blocks.1'
    """
    parts = rule.split(":") if isinstance(rule, str) else []
    if not 1 <= len(parts) <= 2 or not all(LAYER.fullmatch(part) for part in parts):
        raise ValueError(f"{context}{rule!r} is not a layer rule: give {' / '.join(LAYER_RULES)}, a layer name "
                         "such as 'blocks.1', or 'teacher_layer:student_layer' (letters, digits, _ . -)")
    return rule


def check_feature_layers(value: str) -> str:
    """The report's ``feature_layers``: ``"auto"`` or a layer rule for feature terms written without ``@``.

    Example:
        >>> check_feature_layers("auto"), check_feature_layers("last")
        ('auto', 'last')
    """
    if not isinstance(value, str):
        raise ValueError(f"feature_layers must be a string such as 'auto', 'last' or 'blocks.1', got {value!r}")
    return value if value == "auto" else check_layer_rule(value, "feature_layers: ")


def _weight(kind: TermKind, raw: str, text: str) -> float:
    weight = float(raw) if re.fullmatch(NUMBER, raw) else math.nan
    if not math.isfinite(weight) or weight < 0:
        raise ValueError(f"method {text!r}: the weight of {kind.name} must be a number ≥ 0 after '*', e.g. "
                         f"{kind.name}*0.5; got {raw!r}")
    return weight


def _term(text: str, compact: str, position: int) -> tuple[TermSpec, int]:
    """The term of ``compact`` (``text`` without spaces) starting at ``position``, and the position after it."""
    match = TERM.match(compact, position)
    if not match:
        raise ValueError(f"method {text!r}: expected a term name at {compact[position:]!r}; {SYNTAX}")
    if match["name"].lower() == "student":
        raise ValueError(f"method {text!r}: 'student' is the student alone and stands by itself; every other "
                         "method already keeps the cross-entropy on the labels (write e.g. 'kd', not 'student+kd')")
    kind = TERMS[_term_name(match["name"], text)]
    settings = () if match["settings"] is None else _settings(kind, match["settings"], text)
    layers = None if match["layers"] is None else _layers(kind, match["layers"], text)
    weight = None if match["weight"] is None else _weight(kind, match["weight"], text)
    return TermSpec(kind.name, settings, layers, weight), match.end()


def parse_method(text: str) -> MethodSpec:
    """Read a method string (syntax in this module's docstring); ``ValueError`` saying what to write instead.

    Example:
        >>> [str(term) for term in parse_method("kd*0.5+rkd@last*2").terms]
        ['kd*0.5', 'rkd@last*2.0']
        >>> parse_method("fitnett")
        Traceback (most recent call last):
        ...
        ValueError: method 'fitnett': unknown term 'fitnett'; did you mean 'fitnet'? the terms are ['kd', 'dkd', 'dist', 'rkl', 'js', 'taid', 'ofa', 'fitnet', 'at', 'nd', 'cosine', 'rkd', 'sp', 'pkt', 'cka'] (or 'student' alone)
    """
    if not isinstance(text, str) or not text.strip():
        raise ValueError(f"a method must be a non-empty string such as 'kd' or 'kd+fitnet@blocks.1', got {text!r}")
    if text.strip().lower() == "student":
        return MethodSpec(())
    if re.search(r"[\w.]\s+\w", text):
        raise ValueError(f"method {text!r}: a space separates two names; join terms with '+', e.g. 'kd+fitnet'")
    compact, terms, position = re.sub(r"\s+", "", text), [], 0
    while True:
        term, position = _term(text, compact, position)
        terms.append(term)
        if position == len(compact):
            return MethodSpec(tuple(terms))
        if compact[position] != "+":
            rest = compact[position:]
            hint = "'(' is not closed" if rest.startswith("(") and ")" not in rest else f"cannot read {rest!r}"
            raise ValueError(f"method {text!r}: {hint} after {term.name}; {SYNTAX}")
        position += 1


# -- layers ------------------------------------------------------------------------------------------------
def _middle(stages: list[str]) -> str:
    return stages[(len(stages) - 1) // 2]


def stage_pairs(teacher_stages: list[str], student_stages: list[str]) -> list[tuple[str, str]]:
    """``(teacher stage, student stage)`` pairs for ``@stages``: i ↔ i for equal counts, otherwise each stage
    of the model with fewer meets the other's stage at the same relative depth (first ↔ first, last ↔ last).

    Example:
        >>> stage_pairs(["t0", "t1", "t2", "t3"], ["s0", "s1"])
        [('t0', 's0'), ('t3', 's1')]
        >>> stage_pairs(["t0", "t1", "t2"], ["s0", "s1", "s2", "s3", "s4"])
        [('t0', 's0'), ('t1', 's2'), ('t2', 's4')]
    """
    fewer, more = sorted((teacher_stages, student_stages), key=len)
    n, m = len(fewer), len(more)
    matched = [more[round(i * (m - 1) / (n - 1)) if n > 1 else m - 1] for i in range(n)]
    pairs = list(zip(fewer, matched))
    return pairs if fewer is teacher_stages else [(t, s) for s, t in pairs]


def _rule_pairs(rule: str, teacher_stages: list[str], student_stages: list[str]) -> list[tuple[str, str]]:
    if rule in LAYER_RULES:
        for role, stages in (("teacher", teacher_stages), ("student", student_stages)):
            if not stages:
                raise ValueError(f"the {role} has no stages for '@{rule}'; name the layers instead "
                                 "(term@teacher_layer:student_layer)")
        if rule == "stages":
            return stage_pairs(teacher_stages, student_stages)
        pick = _middle if rule == "middle" else (lambda stages: stages[-1])
        return [(pick(teacher_stages), pick(student_stages))]
    teacher_layer, _, student_layer = rule.partition(":")
    return [(teacher_layer, student_layer or teacher_layer)]


def _branch_layers(rule: str, student_stages: list[str]) -> list[str]:
    """The student layers an OFA-KD rule gives branches: every stage, the middle or last one, or a name."""
    if rule in LAYER_RULES:
        if not student_stages:
            raise ValueError(f"the student has no stages for '@{rule}'; name the layer instead (ofa@layer)")
        return {"stages": student_stages, "middle": [_middle(student_stages)], "last": student_stages[-1:]}[rule]
    return [rule]


@dataclass(frozen=True)
class PlannedTerm:
    """One Distiller term of a method: its history ``column``, the ``term`` as written, its ``layers``
    (``None`` for logit terms) and the ``weight`` it trains with."""

    column: str
    term: TermSpec
    layers: tuple[str, str] | None
    weight: float


def _spec(method: str | MethodSpec) -> MethodSpec:
    return method if isinstance(method, MethodSpec) else parse_method(method)


def plan_method(
    method: str | MethodSpec,
    teacher_stages: list[str],
    student_stages: list[str],
    feature_layers: str = "auto",
    weight: float | None = None,
) -> list[PlannedTerm]:
    """The Distiller terms of ``method`` on models with these stages, before anything is built.

    A feature term without ``@`` takes ``feature_layers`` (``"auto"``: its own :attr:`TermKind.placement`);
    ``weight`` replaces the weight of every term written without ``*weight``. Columns are the term names;
    a name used twice gets its layer (``at@blocks_1``: dots are not allowed in column names), then a number.

    Example:
        >>> [(p.column, p.layers, p.weight) for p in plan_method("kd+at", ["t0", "t1"], ["s0", "s1"])]
        [('kd', None, 1.0), ('at@t0:s0', ('t0', 's0'), 1000.0), ('at@t1:s1', ('t1', 's1'), 1000.0)]
    """
    spec, feature_layers = _spec(method), check_feature_layers(feature_layers)
    planned: list[tuple[TermSpec, tuple[str, str] | None, float]] = []
    for term in spec.terms:
        kind = term.kind
        chosen = term.weight if term.weight is not None else kind.weight if weight is None else float(weight)
        if kind.kind == "logits":
            planned.append((term, None, chosen))
            continue
        if kind.kind == "branches":  # OFA-KD: its loss on the final logits, then a branch per student layer
            rule = term.layers or kind.placement
            planned.append((term, None, chosen))
            planned += [(term, (BRANCH_LOGITS, layer), chosen) for layer in _branch_layers(rule, student_stages)]
            continue
        rule = term.layers or (kind.placement if feature_layers == "auto" else feature_layers)
        planned += [(term, pair, chosen) for pair in _rule_pairs(rule, teacher_stages, student_stages)]
    uses = Counter(term.name for term, _, _ in planned)
    if sum(term.kind.kind == "branches" for term in spec.terms) > 1:
        raise ValueError("ofa appears twice; one OFA-KD term sets up every branch")
    result, seen = [], set()
    for term, layers, chosen in planned:
        column = term.name
        if term.kind.kind == "branches" and layers is not None:
            column = branch_column(layers[1])
        elif uses[term.name] > 1 and layers is not None:
            label = layers[1] if layers[0] == layers[1] else f"{layers[0]}:{layers[1]}"
            column = f"{term.name}@{label.replace('.', '_')}"
        unique, number = column, 2
        while unique in seen:
            unique, number = f"{column}_{number}", number + 1
        seen.add(unique)
        result.append(PlannedTerm(unique, term, layers, chosen))
    return result


def check_method_layers(
    method: str | MethodSpec, teacher: nn.Module, student: nn.Module, feature_layers: str = "auto"
) -> dict[str, tuple[str, str]]:
    """The layer pair of each feature term of ``method`` on these models; ``ValueError`` naming the term and
    the nearest layer names when a layer does not exist (checked with :func:`workbench.resolve_layers`).

    Example:
        >>> from workbench import models
        >>> teacher, student = models.create("cnn"), models.create("cnn_small")
        >>> check_method_layers("kd+fitnet@blocks.1+rkd", teacher, student)
        {'fitnet': ('blocks.1', 'blocks.1'), 'rkd': ('blocks.2', 'blocks.2')}
    """
    spec = _spec(method)
    try:
        planned = plan_method(spec, stage_names(teacher), stage_names(student), feature_layers)
    except ValueError as error:
        raise ValueError(f"method {str(spec)!r}: {error}") from None
    pairs = {}
    for item in planned:
        if item.layers is not None:
            try:
                _check_pair(item.layers, teacher, student)
            except ValueError as error:
                raise ValueError(f"method {str(spec)!r}, term {str(item.term)!r}, {error}") from None
            pairs[item.column] = item.layers
    return pairs


def _check_pair(pair: tuple[str, str], teacher: nn.Module, student: nn.Module) -> None:
    for role, model, layer in (("teacher", teacher, pair[0]), ("student", student, pair[1])):
        if layer == BRANCH_LOGITS and role == "teacher":
            continue  # a branch reads the teacher's logits, not a layer
        try:
            resolve_layers(model, layer)
        except KeyError as error:
            raise ValueError(f"{role} side: {error.args[0]}") from None


def layer_pairs(rule: str, teacher: nn.Module, student: nn.Module) -> list[tuple[str, str]]:
    """The ``(teacher layer, student layer)`` pairs a layer rule (``stages``, ``middle``, ``last``, a name,
    ``teacher:student``) picks on these models; ``ValueError`` with the nearest names for a missing layer.

    Example:
        >>> from workbench import models
        >>> layer_pairs("middle", models.create("cnn"), models.create("cnn", widths=(4, 8)))
        [('blocks.1', 'blocks.0')]
    """
    pairs = _rule_pairs(check_layer_rule(rule), stage_names(teacher), stage_names(student))
    for pair in pairs:
        try:
            _check_pair(pair, teacher, student)
        except ValueError as error:
            raise ValueError(f"layers {rule!r}, {error}") from None
    return pairs


# -- building ----------------------------------------------------------------------------------------------
@torch.no_grad()
def teacher_class_means(teacher: nn.Module, data: Any, layer: str, batch_size: int = 256) -> torch.Tensor:
    """The teacher's mean pooled feature (see :func:`pooled`) at ``layer`` per class over labelled ``data``:
    ``[num_classes, d]`` (what the ND loss calls ``μ_c``; ``num_classes`` from the teacher when it says).

    Example:
        >>> from torch import nn
        >>> teacher = nn.Sequential(nn.Identity())
        >>> teacher_class_means(teacher, (torch.tensor([[1.0], [3.0], [5.0]]), torch.tensor([0, 0, 1])), "0")
        tensor([[2.],
                [5.]])
    """
    from workbench.batches import inputs_of, run_model, targets_of, to_device
    from workbench.data import as_loader
    from workbench.train.distiller import eval_mode

    parameter = next(teacher.parameters(), None)
    device = parameter.device if parameter is not None else torch.device("cpu")
    features, labels = [], []
    with eval_mode(teacher), capture(teacher, [layer]) as activations:
        for batch in as_loader(data, batch_size=batch_size):
            targets = targets_of(batch)
            if targets is None:
                raise ValueError("the ND term's class means need labelled data ((x, y) batches)")
            run_model(teacher, to_device(inputs_of(batch), device))
            features.append(pooled(activations[layer]).float())
            labels.append(targets.reshape(-1))
    num_classes = getattr(teacher, "num_classes", None)
    return losses.class_means(torch.cat(features), torch.cat(labels).to(features[0].device),
                              num_classes if isinstance(num_classes, int) else None)


def _make_term(item: PlannedTerm, total_steps: int | None) -> nn.Module:
    settings = dict(item.term.settings)
    if item.term.name == "taid" and total_steps and "total_steps" not in settings:
        settings["total_steps"] = int(total_steps)  # the linear floor of its schedule spans the whole run
    try:
        return item.term.kind.make(**settings)
    except ValueError as error:
        raise ValueError(f"{str(item.term)!r}: {error}; pass the run's length (method_distiller(..., total_steps=N))"
                         f" or write {item.term.name}(total_steps=N)") from None


def _ofa_setup(items: list[PlannedTerm], teacher: nn.Module, student: nn.Module, data: Any, seed: int | None) -> Any:
    """OFA-KD's terms for the planned ``ofa`` items (the final-logit one first, then one per branch)."""
    from workbench.batches import inputs_of, targets_of
    from workbench.data import as_loader

    if data is None:
        raise ValueError(f"{str(items[0].term)!r}: OFA-KD sizes its branches on one batch; pass data= (the "
                         "training set) to method_distiller")
    example = next(iter(as_loader(data, batch_size=8)))
    example = (inputs_of(example), targets_of(example))
    final, *stages = items
    return ofa_terms(teacher, student, example, [item.layers[1] for item in stages], **dict(final.term.settings),
                     kd_weight=final.weight, ofa_weight=[item.weight for item in stages], seed=seed)


def method_distiller(
    method: str | MethodSpec,
    teacher: nn.Module,
    student: nn.Module,
    weight: float | None = None,
    feature_layers: str = "auto",
    *,
    data: Any = None,
    total_steps: int | None = None,
    seed: int | None = None,
) -> nn.Module:
    """The thing to train for ``method``: a :class:`~workbench.train.Distiller`, or ``student`` itself for
    ``"student"``.

    ``weight`` replaces the weight of every term written without ``*weight`` (cross-entropy keeps 1);
    ``feature_layers`` places feature terms written without ``@`` (see :func:`plan_method`). ``data``
    (labelled, e.g. the training set) gives the ND term the teacher's class means over it (without it,
    ND uses the batch's). ``total_steps`` (the run's optimizer steps) gives TAID the linear floor of its
    schedule, unless the method sets ``taid(total_steps=…)``. ``ofa`` (OFA-KD) is set up by
    :func:`workbench.losses.ofa_terms` on the first batch of ``data`` (which it needs, to size the
    branches), with the cross-entropy's label smoothing 0.1 and branch weights drawn from ``seed``
    (``None``: the global random stream). History columns are the planned term names.

    Example:
        >>> from workbench import models
        >>> from workbench.reports.methods import method_distiller
        >>> teacher, student = models.create("cnn").eval(), models.create("cnn_small")
        >>> method_distiller("fitnet", teacher, student).layers
        {'fitnet': ('blocks.1', 'blocks.1')}
        >>> distiller = method_distiller("kd(T=2)*0.5+at@stages", teacher, student)
        >>> distiller.weights
        {'kd': 0.5, 'at@blocks_0': 1000.0, 'at@blocks_1': 1000.0, 'at@blocks_2': 1000.0}
        >>> method_distiller("student", teacher, student) is student
        True
    """
    spec = _spec(method)
    if not spec.terms:
        return student
    check_method_layers(spec, teacher, student, feature_layers)
    planned = plan_method(spec, stage_names(teacher), stage_names(student), feature_layers, weight)
    branches = [item for item in planned if item.term.kind.kind == "branches"]
    terms = {item.column: (_make_term(item, total_steps), item.weight) for item in planned if item not in branches}
    layers = {item.column: item.layers for item in planned if item.layers is not None and item not in branches}
    label_smoothing = 0.0
    if branches:
        setup = _ofa_setup(branches, teacher, student, data, seed)
        terms.update(setup["terms"])
        layers.update(setup["layers"])
        label_smoothing = setup["label_smoothing"]
    distiller = Distiller(teacher, student, terms, layers=layers, label_smoothing=label_smoothing)
    if data is not None:
        for item in planned:
            if item.term.name == "nd":
                teacher_layer = distiller.layers[item.column][0]
                distiller.terms[item.column].class_means = teacher_class_means(teacher, data, teacher_layer)
    return distiller


# -- descriptions and the named methods --------------------------------------------------------------------
GREEK = {"alpha": "α", "beta": "β", "gamma": "γ"}


def _number(value: Any) -> str:
    return f"{value:g}" if isinstance(value, float) else _value_text(value)


def _where(rule: str) -> str:
    if rule in ("middle", "last"):
        return f"between the {rule} stages"
    if rule == "stages":
        return "at every stage pair"
    teacher_layer, _, student_layer = rule.partition(":")
    return f"between teacher {teacher_layer} and student {student_layer}" if student_layer else f"at {rule}"


def describe_term(term: TermSpec, feature_layers: str = "auto", weight: float | None = None) -> str:
    """One term in words, e.g. ``"0.5 × KD(T=2) on the logits (Hinton et al. 2015)"`` (``weight``: the
    weight of a term written without ``*weight``, as :func:`method_distiller`'s).

    Example:
        >>> describe_term(parse_method("at@stages").terms[0])
        '1000 × attention transfer (p=2) at every stage pair (Zagoruyko & Komodakis 2017)'
    """
    kind = term.kind
    weight = term.weight if term.weight is not None else kind.weight if weight is None else weight
    defaults = {key: p.default for key, p in kind.keywords().items()}
    values = {**{key: defaults[key] for key in kind.shown}, **kind.settings, **dict(term.settings)}
    shown = ", ".join(f"{GREEK.get(key, key)}={_number(value)}" for key, value in values.items())
    label = kind.label + (("" if kind.label.isalnum() else " ") + f"({shown})" if shown else "")
    if kind.kind == "branches":
        rule = term.layers or kind.placement
        where = ("and a logit branch at every student stage" if rule == "stages" else
                 f"and a logit branch at the student's {rule} stage" if rule in LAYER_RULES else
                 f"and a logit branch at student {rule}")
        return (f"{_number(float(weight)) + ' × ' if weight != 1 else ''}{label} on the final logits {where}, "
                f"cross-entropy with label smoothing 0.1 ({kind.paper})")
    if kind.kind == "logits":
        where = "on the logits"
    else:
        where = _where(term.layers or (kind.placement if feature_layers == "auto" else feature_layers))
    return f"{_number(float(weight)) + ' × ' if weight != 1 else ''}{label} {where} ({kind.paper})"


def describe_method(method: str | MethodSpec, feature_layers: str = "auto", weight: float | None = None) -> str:
    """``method`` in words, for the results table's "Methods:" list (a named method keeps its description
    unless ``weight`` or ``feature_layers`` change it; ``weight`` as :func:`method_distiller`'s).

    Example:
        >>> describe_method("kd(T=2)*0.5+fitnet@blocks.1")
        'CE + 0.5 × KD(T=2) on the logits (Hinton et al. 2015) + FitNet hint (1×1-conv projector, MSE) at blocks.1 (Romero et al. 2015)'
        >>> describe_method("dkd"), describe_method("dkd", weight=2)
        ('CE + DKD(α=1, β=8, T=4) on the logits (Zhao et al. 2022)', 'CE + 2 × DKD(α=1, β=8, T=4) on the logits (Zhao et al. 2022)')
    """
    placed = feature_layers == "auto" or method not in TERMS or TERMS[method].kind == "logits"
    if isinstance(method, str) and method in METHODS and placed and weight is None:
        return METHODS[method].description
    spec = _spec(method)
    if not spec.terms:
        return METHODS["student"].description
    return "CE + " + " + ".join(describe_term(term, feature_layers, weight) for term in spec.terms)


TermsAndLayers = tuple[dict[str, tuple[nn.Module, float]], dict[str, tuple[str, str]]]


@dataclass(frozen=True)
class Method:
    """A named distillation method: ``make(teacher_stages, student_stages, weight) -> (terms, layers)`` for a
    :class:`Distiller` (``make=None``: the student alone), its default term weight and a description."""

    name: str
    description: str
    make: Callable[[list[str], list[str], float], TermsAndLayers] | None = None
    weight: float = 1.0


def _maker(name: str) -> Callable[[list[str], list[str], float], TermsAndLayers]:
    def make(teacher_stages: list[str], student_stages: list[str], weight: float) -> TermsAndLayers:
        if TERMS[name].kind == "branches":
            raise ValueError(f"{name}'s branches are sized on the models and a batch: use "
                             f"method_distiller({name!r}, teacher, student, data=...)")
        planned = plan_method(name, teacher_stages, student_stages, weight=weight)
        return ({item.column: (_make_term(item, None), item.weight) for item in planned},
                {item.column: item.layers for item in planned if item.layers is not None})

    return make


# The descriptions of the methods the committed results tables used (reports/results/distill_*.md), verbatim.
_DESCRIPTIONS = {
    "student": "the student alone: cross-entropy on the labels",
    "kd": "CE + KD(T=4) on the logits (Hinton et al. 2015)",
    "dkd": "CE + DKD(α=1, β=8, T=4) on the logits (Zhao et al. 2022)",
    "dist": "CE + DIST(β=1, γ=1) on the logits (Huang et al. 2022)",
    "fitnet": "CE + FitNet hint (1×1-conv projector, MSE) between the middle stages (Romero et al. 2015)",
    "rkd": "CE + RKD distance and angle between the last stages (Park et al. 2019)",
    "cka": "CE + CKALoss (1 − linear CKA) between the last stages",
}

METHODS: dict[str, Method] = {"student": Method("student", _DESCRIPTIONS["student"])} | {
    name: Method(name, _DESCRIPTIONS.get(name) or describe_method(MethodSpec((TermSpec(name),))), _maker(name),
                 kind.weight)
    for name, kind in TERMS.items()
}
