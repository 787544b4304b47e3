"""One offline model factory: built-in tiny nets, any timm name, transformers models from a config.

Nothing downloads: timm models are built with ``pretrained=False`` and transformers models from a
config. Weights from disk go through :func:`workbench.models.load_weights`.
"""
from __future__ import annotations

import difflib
from typing import Any, Callable

from torch import nn

from workbench.models.tiny import BenchCNN, TinyCNN, TinyMLP, TinyResNet, tiny_mixer, tiny_vit

__all__ = ["create", "available", "HEADS"]

_BUILTINS: dict[str, Callable[..., nn.Module]] = {
    "cnn": TinyCNN,
    "cnn_small": lambda **kwargs: TinyCNN(**{"widths": (8, 16, 32), **kwargs}),
    "bench_cnn": BenchCNN,
    "vit": tiny_vit,
    "mixer": tiny_mixer,
    "resnet": TinyResNet,
    "mlp": TinyMLP,
}

_BERT_TINY = dict(
    hidden_size=64,
    num_hidden_layers=2,
    num_attention_heads=2,
    intermediate_size=128,
    vocab_size=1000,
    max_position_embeddings=128,
)
# bos/eos inside the tiny vocabulary (GPT-2's 50256 would not be).
_GPT2_TINY = dict(n_embd=64, n_layer=2, n_head=2, vocab_size=1000, n_positions=128, bos_token_id=0, eos_token_id=0)
# name -> (model_type, config defaults, head); the head names a transformers Auto class (see HEADS)
_HF_TINY = {
    "bert_tiny": ("bert", _BERT_TINY, None),
    "bert_tiny_cls": ("bert", _BERT_TINY, "sequence_classification"),
    "bert_tiny_mlm": ("bert", _BERT_TINY, "masked_lm"),
    "gpt2_tiny": ("gpt2", _GPT2_TINY, None),
    "gpt2_tiny_lm": ("gpt2", _GPT2_TINY, "causal_lm"),
}
HEADS = {
    None: "AutoModel",
    "causal_lm": "AutoModelForCausalLM",
    "masked_lm": "AutoModelForMaskedLM",
    "sequence_classification": "AutoModelForSequenceClassification",
    "token_classification": "AutoModelForTokenClassification",
}
"""Heads a transformers model can be built with: ``head=`` value -> the transformers Auto class."""
_HF_PREFIX = "hf:"
# Names of the module lists that hold the transformer layers in common transformers models.
_LAYER_LIST_NAMES = ("layer", "layers", "h", "block", "blocks")


def available() -> list[str]:
    """Names of the built-in nets and tiny transformers models (any timm name works too).

    Example:
        >>> from workbench.models import available
        >>> "cnn" in available() and "bert_tiny" in available()
        True
    """
    return sorted([*_BUILTINS, *_HF_TINY])


def create(name: str, **kwargs: Any) -> nn.Module:
    """Build a model by name, offline, with freshly initialised weights.

    ``name`` is a built-in (``"cnn"``, ``"cnn_small"``, ``"bench_cnn"``, ``"vit"``, ``"mixer"``, ``"resnet"``, ``"mlp"``), a tiny
    transformers model (kwargs override config fields), ``"hf:<model_type>"`` (kwargs are config fields
    for ``AutoConfig.for_model``), or any timm model name (kwargs such as ``in_chans``, ``num_classes``,
    ``img_size`` pass through to timm). Every model returned has a timm-style ``feature_info`` list.

    Transformers models and their heads: ``"bert_tiny"`` / ``"gpt2_tiny"`` are headless base models
    (``BertModel`` / ``GPT2Model``: hidden states, no logits — for feature probes and hints; logit
    terms and prediction probes refuse them). Models with a head: ``"gpt2_tiny_lm"``
    (``GPT2LMHeadModel``, next-token logits over the vocabulary), ``"bert_tiny_cls"``
    (``BertForSequenceClassification``; ``num_labels=`` sets the classes, default 2), ``"bert_tiny_mlm"``
    (``BertForMaskedLM``). Any transformers model takes ``head=`` (a key of :data:`HEADS`:
    ``"causal_lm"``, ``"masked_lm"``, ``"sequence_classification"``, ``"token_classification"``), e.g.
    ``create("hf:llama", head="causal_lm", ...)``; ``head=None`` keeps the base model.

    Raises ``ValueError`` for ``pretrained=True`` (nothing downloads; use ``load_weights``) and for
    unknown names (the message lists close names).

    Example:
        >>> import torch
        >>> from workbench.models import create
        >>> model = create("cnn", widths=(8, 16))
        >>> model(torch.zeros(2, 1, 32, 32)).shape
        torch.Size([2, 10])
        >>> [d["module"] for d in model.feature_info]
        ['blocks.0', 'blocks.1']
        >>> type(create("gpt2_tiny_lm")).__name__, type(create("bert_tiny", head="sequence_classification")).__name__
        ('GPT2LMHeadModel', 'BertForSequenceClassification')
    """
    if not isinstance(name, str):
        raise TypeError(f"model name must be a str, got {type(name).__name__}")
    if kwargs.pop("pretrained", False):
        raise ValueError(
            f"create({name!r}, pretrained=True): nothing downloads at run time. Build the model with "
            "pretrained=False and load weights from disk with "
            "workbench.models.load_weights(model, 'weights.safetensors')."
        )
    for refused in ("checkpoint_path", "pretrained_cfg_overlay", "cache_dir"):
        if refused in kwargs:
            raise ValueError(
                f"create({name!r}, {refused}=...) is not supported: load weights from disk with "
                "workbench.models.load_weights(model, path), which never unpickles arbitrary code."
            )
    if name in _BUILTINS:
        return _BUILTINS[name](**kwargs)
    if name in _HF_TINY:
        model_type, defaults, head = _HF_TINY[name]
        head = kwargs.pop("head", head)
        return _create_hf(model_type, {**defaults, **kwargs}, head)
    if name.startswith(_HF_PREFIX):
        head = kwargs.pop("head", None)
        return _create_hf(name[len(_HF_PREFIX):], kwargs, head)
    import timm

    if timm.is_model(name):
        model = timm.create_model(name, pretrained=False, **kwargs)
        _ensure_feature_info(model)
        return model
    raise ValueError(_unknown_name_message(name))


def create_sized(name: str, img_size: int, /, **kwargs: Any) -> nn.Module:
    """:func:`create` for ``img_size`` × ``img_size`` images: ``img_size`` is passed on when the model
    takes one (the built-in nets, timm ViTs) and left out when it takes any size (timm ResNets).

    An ``img_size`` in ``kwargs`` wins. Other bad arguments still raise their ``TypeError``.

    Example:
        >>> from workbench.models import create_sized
        >>> create_sized("cnn", 16, widths=(8,)).img_size
        16
        >>> type(create_sized("resnet18", 16, num_classes=4)).__name__  # a ResNet takes any size
        'ResNet'
    """
    if "img_size" in kwargs:
        return create(name, **kwargs)
    try:  # a model class refuses the keyword when binding its arguments, before any weight is drawn
        return create(name, **kwargs, img_size=img_size)
    except TypeError as error:
        if "img_size" not in str(error):
            raise
        return create(name, **kwargs)


def _unknown_name_message(name: str) -> str:
    import timm

    candidates = [*available(), *timm.list_models()]
    close = difflib.get_close_matches(name, candidates, n=6, cutoff=0.5)
    hint = f" Close names: {', '.join(close)}." if close else ""
    return (
        f"unknown model name {name!r}.{hint} Built-in: {', '.join(available())}; also any timm name "
        "(timm.list_models()) or 'hf:<model_type>' with config kwargs."
    )


def _create_hf(model_type: str, config_kwargs: dict[str, Any], head: str | None = None) -> nn.Module:
    import transformers
    from transformers import AutoConfig

    if head not in HEADS:
        raise ValueError(f"unknown head {head!r}: choose one of {list(HEADS)} (None: the base model, no head)")
    config_kwargs = {"attn_implementation": "eager", **config_kwargs}
    try:
        config = AutoConfig.for_model(model_type, **config_kwargs)
    except ValueError as error:
        close = difflib.get_close_matches(model_type, _hf_model_types(), n=5, cutoff=0.5)
        hint = f" Close model types: {', '.join(close)}." if close else ""
        raise ValueError(f"unknown transformers model type {model_type!r} in 'hf:{model_type}'.{hint}") from error
    auto_class = getattr(transformers, HEADS[head])
    try:
        model = auto_class.from_config(config, attn_implementation=config_kwargs["attn_implementation"])
    except ValueError as error:  # no such head for this model type
        raise ValueError(f"transformers has no {head!r} head for model type {model_type!r}: {error}") from None
    model.feature_info = _hf_feature_info(model)
    return model


def _hf_model_types() -> list[str]:
    from transformers import CONFIG_MAPPING

    return list(CONFIG_MAPPING.keys())


def _hf_feature_info(model: nn.Module) -> list[dict[str, Any]]:
    """The transformer layers of a transformers model: the longest ModuleList named like a layer list."""
    lists = [
        (module_name, module)
        for module_name, module in model.named_modules()
        if isinstance(module, nn.ModuleList) and len(module) > 0
    ]
    named = [item for item in lists if item[0].rsplit(".", 1)[-1] in _LAYER_LIST_NAMES]
    pool = named or lists
    if not pool:
        return []
    list_name, layers = max(pool, key=lambda item: len(item[1]))
    config = getattr(model, "config", None)
    hidden = getattr(config, "hidden_size", None) or getattr(config, "d_model", None) or 0
    return [{"module": f"{list_name}.{i}", "num_chs": int(hidden), "reduction": 1} for i in range(len(layers))]


def _ensure_feature_info(model: nn.Module) -> None:
    """timm models expose ``feature_info`` already; keep it a plain list of dicts either way."""
    info = getattr(model, "feature_info", None)
    if info is not None and not isinstance(info, list):
        info = list(getattr(info, "info", info))
        model.feature_info = info
