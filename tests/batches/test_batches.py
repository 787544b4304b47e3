"""workbench.batches: what a batch holds, what reaches the model, logits, token masks and label alignment."""
from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader
from transformers import BertConfig, BertForMaskedLM, BertLMHeadModel, GPT2Config, GPT2ForSequenceClassification
from transformers import GPT2LMHeadModel, GPT2Model
from transformers.loss.loss_utils import ForCausalLMLoss

from workbench.batches import (
    count_correct, cross_entropy, inputs_of, is_causal_lm, logits_of, n_samples_of, prediction_targets,
    resolve_shift, run_model, take, targets_of, token_mask, token_rows,
)
from workbench.losses import KD
from workbench.similarity import cka_matrix
from workbench.train import Distiller


class Recorder(nn.Module):
    """Records the keyword arguments of every call; returns logits from the token ids."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(10, 10)
        self.calls: list[dict] = []

    def forward(self, input_ids, attention_mask=None, token_type_ids=None, position_ids=None):
        self.calls.append({"attention_mask": attention_mask, "token_type_ids": token_type_ids,
                           "position_ids": position_ids})
        return self.embed(input_ids)


def text_batch():
    ids = torch.tensor([[1, 2, 3, 4], [5, 6, 0, 0], [7, 8, 9, 1], [2, 3, 0, 0]])
    mask = (ids != 0).long()
    return {"input_ids": ids, "attention_mask": mask, "token_type_ids": torch.zeros_like(ids),
            "position_ids": torch.arange(4).expand(4, 4), "labels": ids.masked_fill(mask == 0, -100)}


def test_inputs_and_targets_of_every_batch_kind():
    x, y = torch.ones(2, 3), torch.tensor([1, 0])
    assert inputs_of(x) is x and inputs_of((x, y)) is x and inputs_of([x, y]) is x
    assert inputs_of({"pixel_values": x, "labels": y}) == {"pixel_values": x}
    batch = text_batch()
    assert sorted(inputs_of(batch)) == ["attention_mask", "input_ids", "position_ids", "token_type_ids"]
    assert targets_of((x, y)) is y and targets_of({"labels": y}) is y and targets_of(x) is None
    with pytest.raises(TypeError, match="pixel_values"):
        inputs_of({"image": x})
    with pytest.raises(TypeError):
        inputs_of(3.0)
    assert n_samples_of(inputs_of(batch)) == 4 and n_samples_of(x) == 2
    assert take(inputs_of(batch), 2)["position_ids"].shape == (2, 4)


def test_run_model_passes_the_whole_dict_but_a_lone_input_positionally():
    model = Recorder()
    batch = text_batch()
    run_model(model, inputs_of(batch))
    call = model.calls[-1]
    assert call["attention_mask"] is batch["attention_mask"] and call["token_type_ids"] is batch["token_type_ids"]
    assert call["position_ids"] is batch["position_ids"]
    assert run_model(nn.Linear(3, 2), {"x": torch.ones(4, 3)}).shape == (4, 2)
    assert run_model(nn.Linear(3, 2), {"pixel_values": torch.ones(4, 3)}).shape == (4, 2)


def test_distiller_feeds_every_entry_to_both_models():
    teacher, student = Recorder().eval(), Recorder()
    batch = text_batch()
    Distiller(teacher, student, {"kd": KD()}, ce_weight=0).step(batch)
    for model in (teacher, student):
        call = model.calls[-1]
        assert torch.equal(call["attention_mask"], batch["attention_mask"])
        assert torch.equal(call["token_type_ids"], batch["token_type_ids"])
        assert torch.equal(call["position_ids"], batch["position_ids"])


def test_probes_feed_every_entry_to_both_models():
    teacher, student = Recorder(), Recorder()
    batch = text_batch()
    cka_matrix(teacher, student, DataLoader([batch], batch_size=None), ["embed"], ["embed"], device="cpu",
               progress=False)
    for model in (teacher, student):
        assert torch.equal(model.calls[-1]["attention_mask"], batch["attention_mask"])
        assert torch.equal(model.calls[-1]["position_ids"], batch["position_ids"])


def test_logits_of_refuses_outputs_without_logits_naming_the_model():
    torch.manual_seed(0)
    model = GPT2Model(GPT2Config(n_embd=16, n_layer=1, n_head=2, vocab_size=20, n_positions=8))
    output = model(input_ids=torch.zeros(1, 3, dtype=torch.long))
    with pytest.raises(TypeError, match=r"GPT2Model returned a BaseModelOutputWithPastAndCrossAttentions without "
                                        r"logits \(fields: \['last_hidden_state'"):
        logits_of(output, model)
    assert logits_of({"logits": torch.ones(2, 3)}).shape == (2, 3)


def test_token_mask_and_rows():
    batch = text_batch()
    mask = token_mask(inputs_of(batch))
    assert mask.dtype == torch.bool and mask.sum() == 12
    assert token_mask({"input_ids": batch["input_ids"]}).all()  # no mask: every position is real
    assert token_mask(torch.ones(4, 4)) is None and token_mask({"pixel_values": torch.ones(4, 3)}) is None
    values = torch.arange(4 * 4 * 2.0).reshape(4, 4, 2)
    assert torch.equal(token_rows(values, mask), torch.stack([values[i, j] for i in range(4) for j in range(4)
                                                              if mask[i, j]]))
    assert token_rows(torch.ones(4, 4), mask).shape == (4, 4)  # one row per sequence: unchanged


def test_causal_cross_entropy_is_hugging_face_loss_and_skips_padding():
    torch.manual_seed(0)
    logits = torch.randn(4, 4, 10)
    batch = text_batch()
    mask = batch["attention_mask"].bool()
    expected = ForCausalLMLoss(logits, batch["labels"], vocab_size=10)
    assert cross_entropy(logits, batch["labels"], mask=mask, shift=True).item() == pytest.approx(expected.item())
    # padding skipped by the attention mask even when the labels do not mark it with -100
    assert cross_entropy(logits, batch["input_ids"], mask=mask, shift=True).item() == pytest.approx(expected.item())
    assert prediction_targets(batch["labels"], mask, shift=True)[1].tolist() == [6, -100, -100, -100]
    with pytest.raises(ValueError, match="token labels"):
        cross_entropy(torch.randn(4, 3), torch.tensor([0, 1, 2, 0]), shift=True)


def test_count_correct_over_predicted_tokens():
    batch = text_batch()
    logits = torch.nn.functional.one_hot(batch["input_ids"].roll(-1, dims=1), 10).float()  # predicts the next token
    correct, counted = count_correct(logits, batch["labels"], mask=batch["attention_mask"].bool(), shift=True)
    assert (correct, counted) == (8, 8)  # 3 + 1 + 3 + 1 positions have a next real token


def test_causal_models_detected_from_their_config():
    gpt2 = GPT2Config(n_embd=16, n_layer=1, n_head=2, vocab_size=20, n_positions=8)
    bert = dict(hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32, vocab_size=20)
    assert is_causal_lm(GPT2LMHeadModel(gpt2)) and is_causal_lm(BertLMHeadModel(BertConfig(**bert, is_decoder=True)))
    assert not is_causal_lm(BertForMaskedLM(BertConfig(**bert)))
    assert not is_causal_lm(GPT2ForSequenceClassification(gpt2)) and not is_causal_lm(nn.Linear(2, 2))
    assert resolve_shift(GPT2LMHeadModel(gpt2), False) is False
    with pytest.raises(ValueError, match="shift_labels"):
        resolve_shift(nn.Linear(2, 2), 1)
