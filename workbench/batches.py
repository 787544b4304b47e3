"""Batch plumbing: what a batch holds, moving it, feeding it to a model, its logits, its token mask.

Every probe, :func:`workbench.train.fit` and the :class:`workbench.train.Distiller` read batches through
these functions, so the rules live in one place:

- A batch is a tensor (inputs only), an ``(x, y)`` tuple / list, or a dict (or Hugging Face
  ``BatchEncoding``) holding one of :data:`INPUT_KEYS` and optionally labels (:data:`TARGET_KEYS`).
- The model input of a dict batch is the *whole* dict minus its labels: ``attention_mask``,
  ``token_type_ids``, ``position_ids``, … all reach the model as keyword arguments
  (:func:`run_model`). A dict holding a lone ``pixel_values`` / ``input_ids`` / ``x`` is passed
  positionally, so a plain ``forward(x)`` module takes it too.
- Padding is not a sample. The token mask of a dict batch is its ``attention_mask`` (all ones when a
  dict of ``input_ids`` has none); tensors and ``(x, y)`` batches have none, so the vision path does
  no extra work. Token-shaped values ``[n, t, ...]`` (logits, hidden states) keep only their
  unpadded positions (:func:`token_rows`).
- Token labels are aligned with the predictions by :func:`prediction_targets`: padded positions become
  ``-100`` (ignored), and for causal language models (:func:`is_causal_lm`) labels shift left by one,
  since position t predicts token t + 1 — the convention of Hugging Face's ``ForCausalLMLoss``.
"""
from __future__ import annotations

import functools
from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "INPUT_KEYS", "TARGET_KEYS", "IGNORE_INDEX", "inputs_of", "targets_of", "to_device", "run_model",
    "n_samples_of", "take", "logits_of", "token_mask", "token_rows", "is_causal_lm", "resolve_shift",
    "prediction_targets", "cross_entropy", "count_correct",
]

INPUT_KEYS = ("pixel_values", "input_ids", "inputs_embeds", "input_values", "input_features", "x")
TARGET_KEYS = ("labels", "label", "y", "targets")
IGNORE_INDEX = -100  # labels equal to this are skipped (the Hugging Face / cross-entropy convention)
_POSITIONAL_KEYS = ("pixel_values", "input_ids", "x", "input_values", "input_features")


def inputs_of(batch: Any) -> Any:
    """The model input of a batch: the tensor itself, ``x`` of ``(x, y)``, or a dict minus its labels.

    Example:
        >>> import torch
        >>> inputs_of((torch.ones(2, 3), torch.zeros(2))).shape
        torch.Size([2, 3])
        >>> sorted(inputs_of({"input_ids": torch.ones(2, 5), "attention_mask": torch.ones(2, 5), "labels": 0}))
        ['attention_mask', 'input_ids']
    """
    if isinstance(batch, torch.Tensor):
        return batch
    if isinstance(batch, (tuple, list)) and batch:
        return batch[0]
    if isinstance(batch, Mapping):
        if not any(key in batch for key in INPUT_KEYS):
            raise TypeError(f"batch dict has no input entry: expected one of {INPUT_KEYS}, got keys {list(batch)}")
        return {key: value for key, value in batch.items() if key not in TARGET_KEYS}
    raise TypeError(
        f"cannot find the model input in a batch of type {type(batch).__name__}: "
        f"expected a Tensor, an (x, y) tuple/list or a dict with one of {INPUT_KEYS}"
    )


def targets_of(batch: Any) -> torch.Tensor | None:
    """The labels of a batch: ``y`` of ``(x, y)``, a dict's ``labels``/``label``/``y``/``targets``, else None.

    Example:
        >>> import torch
        >>> targets_of((torch.ones(2, 3), torch.tensor([1, 0]))).tolist()
        [1, 0]
        >>> targets_of(torch.ones(2, 3)) is None
        True
    """
    if isinstance(batch, (tuple, list)) and len(batch) >= 2:
        return batch[1]
    if isinstance(batch, Mapping):
        for key in TARGET_KEYS:
            if key in batch:
                return batch[key]
    return None


def to_device(value: Any, device: torch.device) -> Any:
    """Move the tensors of a batch (a tensor, or tuples / lists / dicts of them) to ``device``.

    Example:
        >>> import torch
        >>> x, y = to_device([torch.ones(2), torch.zeros(2)], torch.device("cpu"))
        >>> x.device.type
        'cpu'
    """
    if isinstance(value, torch.Tensor):
        return value.to(device, non_blocking=True)
    if isinstance(value, Mapping):
        return {key: to_device(item, device) for key, item in value.items()}
    if isinstance(value, (tuple, list)):
        return type(value)(to_device(item, device) for item in value)
    return value


def run_model(model: nn.Module, inputs: Any) -> Any:
    """``model(**inputs)`` for a dict input (every entry, masks included), else ``model(inputs)``.

    A dict whose only entry is ``pixel_values``, ``input_ids``, ``x``, ``input_values`` or
    ``input_features`` is passed positionally, so modules with a plain ``forward(x)`` take it too.

    Example:
        >>> import torch
        >>> from torch import nn
        >>> run_model(nn.Linear(3, 2), {"x": torch.ones(4, 3)}).shape
        torch.Size([4, 2])
    """
    if isinstance(inputs, Mapping):
        if len(inputs) == 1:
            ((key, value),) = inputs.items()
            if key in _POSITIONAL_KEYS:
                return model(value)
        return model(**inputs)
    return model(inputs)


def _first_input(inputs: Any) -> Any:
    if isinstance(inputs, Mapping):
        return next(inputs[key] for key in INPUT_KEYS if key in inputs)
    return inputs


def n_samples_of(inputs: Any) -> int:
    """How many samples a model input holds (a dict: its input entry's first dimension).

    Example:
        >>> import torch
        >>> n_samples_of({"input_ids": torch.ones(3, 7), "attention_mask": torch.ones(3, 7)})
        3
    """
    return len(_first_input(inputs))


def take(inputs: Any, n: int) -> Any:
    """The first ``n`` samples of a model input (every tensor entry of a dict is cut alike).

    Example:
        >>> import torch
        >>> take({"input_ids": torch.ones(3, 7), "attention_mask": torch.ones(3, 7)}, 2)["attention_mask"].shape
        torch.Size([2, 7])
    """
    if isinstance(inputs, Mapping):
        return {key: value[:n] if isinstance(value, torch.Tensor) and value.dim() > 0 else value
                for key, value in inputs.items()}
    return inputs[:n]


def logits_of(output: Any, model: nn.Module | None = None) -> torch.Tensor:
    """The logits of a model output: a tensor, a ``ModelOutput``'s / dict's ``logits``, a tuple's first element.

    An output without logits (e.g. a ``BaseModelOutput`` of a headless ``GPT2Model``) is a ``TypeError``
    naming the model and pointing at a model with a head: its hidden units are not classes.

    Example:
        >>> import torch
        >>> logits_of((torch.ones(2, 3), None)).shape
        torch.Size([2, 3])
        >>> logits_of({"last_hidden_state": torch.ones(2, 4)})
        Traceback (most recent call last):
        ...
        TypeError: the model returned a dict without logits (fields: ['last_hidden_state']): ...
    """
    if isinstance(output, torch.Tensor):
        return output
    if isinstance(output, Mapping):
        logits = output.get("logits")
        if isinstance(logits, torch.Tensor):
            return logits
        name = f"the model {type(model).__name__}" if model is not None else "the model"
        raise TypeError(
            f"{name} returned a {type(output).__name__} without logits (fields: {list(output.keys())}): "
            "its hidden units are not classes. Logit terms, cross-entropy and prediction probes need a model "
            "with a head: workbench.models.create('gpt2_tiny_lm' | 'bert_tiny_cls'), create(name, head="
            "'causal_lm' | 'sequence_classification'), or transformers' AutoModelForCausalLM / "
            "AutoModelForSequenceClassification; or distil its hidden states with a feature term (layers=)"
        )
    logits = getattr(output, "logits", None)
    if isinstance(logits, torch.Tensor):
        return logits
    if isinstance(output, (tuple, list)) and output and isinstance(output[0], torch.Tensor):
        return output[0]
    raise TypeError(f"cannot find logits in a model output of type {type(output).__name__}")


def token_mask(inputs: Any) -> torch.Tensor | None:
    """``[n, t]`` bool: True at real (unpadded) tokens of a dict input, else None (tensors, ``(x, y)``).

    The dict's 2-D ``attention_mask``; all ones when a dict of ``input_ids`` / ``inputs_embeds`` has no
    mask (every position is real); None for other dicts and for masks of other shapes (e.g. 4-D).

    Example:
        >>> import torch
        >>> token_mask({"input_ids": torch.ones(2, 3), "attention_mask": torch.tensor([[1, 1, 0], [1, 1, 1]])})
        tensor([[ True,  True, False],
                [ True,  True,  True]])
        >>> token_mask(torch.ones(2, 3)) is None
        True
    """
    if not isinstance(inputs, Mapping):
        return None
    mask = inputs.get("attention_mask")
    if isinstance(mask, torch.Tensor):
        return mask.bool() if mask.dim() == 2 else None
    tokens = inputs.get("input_ids", inputs.get("inputs_embeds"))
    if isinstance(tokens, torch.Tensor) and tokens.dim() >= 2:
        return torch.ones(tokens.shape[:2], dtype=torch.bool, device=tokens.device)
    return None


def token_rows(value: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """``[n, t, ...]`` -> ``[r, ...]``: the ``r`` unpadded positions, when ``value`` is token-shaped.

    A value whose first two dimensions are not the mask's (pooled features, one logit row per
    sequence) is returned unchanged, and so is everything when ``mask`` is None.

    Example:
        >>> import torch
        >>> mask = torch.tensor([[True, True, False], [True, False, False]])
        >>> token_rows(torch.zeros(2, 3, 5), mask).shape, token_rows(torch.zeros(2, 5), mask).shape
        (torch.Size([3, 5]), torch.Size([2, 5]))
    """
    if mask is None or value.dim() < 3 or value.shape[:2] != mask.shape:
        return value
    return value[mask.to(value.device)]


def is_causal_lm(model: nn.Module) -> bool:
    """Whether ``model`` is a causal language model (position t predicts token t + 1), from its config.

    True for the classes transformers lists as causal LMs (``GPT2LMHeadModel``, ``LlamaForCausalLM``,
    ``BertLMHeadModel``, …) and for decoder configs (``config.is_decoder``) outside encoder-decoders;
    False for models without a transformers config.

    Example:
        >>> from torch import nn
        >>> is_causal_lm(nn.Linear(2, 2))
        False
    """
    config = getattr(model, "config", None)
    if config is None or getattr(config, "is_encoder_decoder", False):
        return False
    if getattr(config, "is_decoder", False):
        return True
    return type(model).__name__ in _causal_lm_classes()


@functools.cache
def _causal_lm_classes() -> frozenset[str]:
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    return frozenset(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.values())


def resolve_shift(model: nn.Module, shift_labels: bool | None) -> bool:
    """``shift_labels`` as given, or (None) whether ``model`` is a causal LM (:func:`is_causal_lm`).

    Example:
        >>> from torch import nn
        >>> resolve_shift(nn.Linear(2, 2), None), resolve_shift(nn.Linear(2, 2), True)
        (False, True)
    """
    if shift_labels is None:
        return is_causal_lm(model)
    if not isinstance(shift_labels, bool):
        raise ValueError(f"shift_labels must be None (detect from the model), True or False, got {shift_labels!r}")
    return shift_labels


def prediction_targets(targets: torch.Tensor, mask: torch.Tensor | None, shift: bool) -> torch.Tensor:
    """Token labels ``[n, t]`` aligned with the predictions: padding -> -100; ``shift``: position t gets label t + 1.

    The last position of a shifted row has no next token and gets -100. Labels of another shape are
    returned unchanged (``shift`` then is an error: there is no next token to align with).

    Example:
        >>> import torch
        >>> labels, mask = torch.tensor([[5, 6, 7, 8]]), torch.tensor([[True, True, True, False]])
        >>> prediction_targets(labels, mask, shift=True).tolist()
        [[6, 7, -100, -100]]
    """
    if targets.dim() < 2:
        if shift:
            raise ValueError(
                f"shift_labels=True needs token labels [n, t], got labels of shape {tuple(targets.shape)}; "
                "pass shift_labels=False (or None) for one label per sample"
            )
        return targets
    if mask is not None and targets.shape == mask.shape:
        targets = targets.masked_fill(~mask.to(targets.device), IGNORE_INDEX)
    if shift:
        targets = F.pad(targets[:, 1:], (0, 1), value=IGNORE_INDEX)
    return targets


def cross_entropy(
    logits: torch.Tensor, targets: torch.Tensor, *, mask: torch.Tensor | None = None, shift: bool = False,
    label_smoothing: float = 0.0,
) -> torch.Tensor:
    """Cross-entropy on ``[n, C]`` logits, or token logits ``[n, t, C]`` with ``[n, t]`` labels.

    Token labels go through :func:`prediction_targets` (padding and -100 skipped, shifted by one for
    causal models); the value is the mean over the positions left — Hugging Face's causal LM loss
    when ``shift=True``. ``label_smoothing`` as in :func:`torch.nn.functional.cross_entropy`.

    Example:
        >>> import torch
        >>> round(cross_entropy(torch.zeros(2, 4), torch.tensor([0, 3])).item(), 4)  # log 4
        1.3863
    """
    if logits.dim() > 2:
        targets = prediction_targets(targets, mask, shift)
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), ignore_index=IGNORE_INDEX,
                               label_smoothing=label_smoothing)
    if shift:
        prediction_targets(targets, None, shift)  # refuses: one label per sample cannot shift
    return F.cross_entropy(logits, targets, label_smoothing=label_smoothing)


def count_correct(
    logits: torch.Tensor, targets: torch.Tensor, *, mask: torch.Tensor | None = None, shift: bool = False
) -> tuple[int, int]:
    """``(correct, counted)`` top-1 predictions of a batch; token logits count the positions CE trains on.

    Example:
        >>> import torch
        >>> count_correct(torch.eye(3), torch.tensor([0, 1, 0]))
        (2, 3)
    """
    predicted = logits.argmax(dim=-1)
    targets = targets.to(predicted.device)
    if logits.dim() > 2:
        targets = prediction_targets(targets, mask, shift)
        counted = targets != IGNORE_INDEX
        correct, total = torch.stack([(predicted == targets)[counted].sum(), counted.sum()]).tolist()
        return int(correct), int(total)
    return int((predicted == targets).sum()), len(targets)
