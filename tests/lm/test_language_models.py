"""Language models end to end: tiny GPT-2 and BERT from configs, against Hugging Face's own loss and by hand.

Every reference here is computed in the test: ``model(**batch, labels=labels).loss`` (Hugging Face's
shifted causal LM loss and its sequence-classification loss), KD / hints over the unpadded positions
picked by hand, and CKA from Song et al.'s unbiased HSIC on hand-picked token rows.
"""
from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset
from transformers import BertConfig, BertForSequenceClassification, BertModel, GPT2Config, GPT2LMHeadModel, GPT2Model

from workbench import models
from workbench.losses import KD, FitNet, JensenShannon, ReverseKL
from workbench.similarity import CKATrajectory, cka_matrix, compare_predictions
from workbench.train import Distiller, accuracy, fit

VOCAB, LENGTH = 50, 8
NO_DROPOUT = dict(resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)


def gpt2(seed: int, width: int = 32, head: bool = True):
    torch.manual_seed(seed)
    config = GPT2Config(n_embd=width, n_layer=2, n_head=2, vocab_size=VOCAB, n_positions=32, bos_token_id=0,
                        eos_token_id=0, **NO_DROPOUT)
    return (GPT2LMHeadModel if head else GPT2Model)(config).eval()


def bert_config(width: int = 32, **kwargs):
    return BertConfig(hidden_size=width, num_hidden_layers=2, num_attention_heads=2, intermediate_size=2 * width,
                      vocab_size=VOCAB, max_position_embeddings=32, hidden_dropout_prob=0.0,
                      attention_probs_dropout_prob=0.0, **kwargs)


def bert(seed: int, width: int = 32):
    torch.manual_seed(seed)
    return BertModel(bert_config(width)).eval()


def padded_batch(n: int = 4, seed: int = 0) -> dict[str, torch.Tensor]:
    """Right-padded token batch: every other sequence holds half its positions, the rest is padding."""
    generator = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(1, VOCAB, (n, LENGTH), generator=generator)
    attention_mask = torch.ones(n, LENGTH, dtype=torch.long)
    attention_mask[1::2, LENGTH // 2:] = 0
    input_ids[attention_mask == 0] = 0  # the pad token
    return {"input_ids": input_ids, "attention_mask": attention_mask}


def with_labels(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
    return {**batch, "labels": labels}


def unbiased_hsic(k: np.ndarray, l: np.ndarray) -> float:
    """Song et al. (2012), unbiased HSIC estimator, eq. (5)."""
    n = k.shape[0]
    k, l = k.copy(), l.copy()
    np.fill_diagonal(k, 0)
    np.fill_diagonal(l, 0)
    ones = np.ones(n)
    return float(np.trace(k @ l) + (ones @ k @ ones) * (ones @ l @ ones) / ((n - 1) * (n - 2))
                 - 2 / (n - 2) * (ones @ k @ l @ ones)) / (n * (n - 3))


def reference_cka(x: torch.Tensor, y: torch.Tensor) -> float:
    x, y = x.double().numpy(), y.double().numpy()
    k, l = x @ x.T, y @ y.T
    return unbiased_hsic(k, l) / np.sqrt(unbiased_hsic(k, k) * unbiased_hsic(l, l))


def loader(*batches):
    return DataLoader(list(batches), batch_size=None)


class Samples(Dataset):
    """One dict per sequence, as a tokenised Hugging Face dataset gives them."""

    def __init__(self, batch: dict[str, torch.Tensor]) -> None:
        self.batch = batch

    def __len__(self) -> int:
        return len(self.batch["input_ids"])

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return {key: value[index] for key, value in self.batch.items()}


# -- the attention mask reaches the model -----------------------------------------------------------
def test_attention_mask_reaches_the_model_and_changes_its_output():
    model = bert(0)
    batch = padded_batch()
    with torch.no_grad():
        masked = model(**batch).last_hidden_state
        unmasked = model(input_ids=batch["input_ids"]).last_hidden_state
    real = batch["attention_mask"].bool()
    assert not torch.allclose(masked[real], unmasked[real])  # the reference test is not vacuous


# -- CKA over tokens: padding is not a sample -------------------------------------------------------
def _hidden(model, batch, layer):
    with torch.no_grad():
        return model(**batch, output_hidden_states=True).hidden_states[layer + 1]


def test_cka_token_mode_equals_cka_on_the_unpadded_tokens_by_hand():
    teacher, student = bert(0, 32), bert(1, 16)
    batch = padded_batch(4)
    result = cka_matrix(teacher, student, loader(batch), ["encoder.layer.0", "encoder.layer.1"],
                        ["encoder.layer.1"], tokens="tokens", device="cpu", progress=False)
    real = batch["attention_mask"].bool()
    student_rows = _hidden(student, batch, 1)[real]
    for index in range(2):
        expected = reference_cka(_hidden(teacher, batch, index)[real], student_rows)
        assert result.values[index, 0] == pytest.approx(expected, rel=1e-6, abs=1e-9)
    assert result.n_samples == int(real.sum())  # every unpadded token is a sample


def test_cka_default_is_the_masked_mean_per_sequence():
    teacher, student = bert(0, 32), bert(1, 16)
    batch = padded_batch(6, seed=3)
    result = cka_matrix(teacher, student, loader(batch), ["encoder.layer.1"], ["encoder.layer.1"],
                        device="cpu", progress=False)
    mask = batch["attention_mask"][..., None].float()

    def pooled(model):
        return (_hidden(model, batch, 1) * mask).sum(1) / mask.sum(1)

    assert result.values[0, 0] == pytest.approx(reference_cka(pooled(teacher), pooled(student)), rel=1e-6)
    assert result.n_samples == 6


def test_cka_on_a_half_padded_batch_is_not_the_unmasked_cka():
    teacher, student = bert(0, 32), bert(1, 16)
    batch = padded_batch(6, seed=3)
    layers = (["encoder.layer.1"], ["encoder.layer.1"])
    masked = cka_matrix(teacher, student, loader(batch), *layers, device="cpu", progress=False).values
    unmasked = cka_matrix(teacher, student, loader({"input_ids": batch["input_ids"]}), *layers,
                          device="cpu", progress=False).values
    assert abs(masked[0, 0] - unmasked[0, 0]) > 1e-4


def test_cka_token_mode_refuses_per_sample_layers_and_other_masks():
    teacher, student = bert(0, 32), bert(1, 16)
    batch = padded_batch(4)
    with pytest.raises(ValueError, match="pooler"):
        cka_matrix(teacher, student, loader(batch), ["pooler"], ["encoder.layer.1"], tokens="tokens",
                   device="cpu", progress=False)
    other = {**batch, "attention_mask": torch.ones_like(batch["attention_mask"])}
    with pytest.raises(ValueError, match="different token positions"):
        cka_matrix(teacher, student, loader(batch), ["encoder.layer.1"], ["encoder.layer.1"], tokens="tokens",
                   student_data=loader(other), device="cpu", progress=False)
    with pytest.raises(ValueError, match="tokens must be"):
        cka_matrix(teacher, student, loader(batch), ["encoder.layer.1"], ["encoder.layer.1"], tokens="flat",
                   device="cpu", progress=False)


# -- causal LM cross-entropy is shifted --------------------------------------------------------------
def test_distiller_causal_ce_equals_hugging_face_loss():
    teacher, student = gpt2(0), gpt2(1, 16)
    batch = with_labels(padded_batch())
    distiller = Distiller(teacher, student, {"kd": (KD(T=2), 0.0)})
    _, parts = distiller.step(batch)
    with torch.no_grad():
        expected = student(**batch).loss
    assert float(parts["ce"]) == pytest.approx(float(expected), rel=1e-5)


def test_shift_labels_false_trains_position_t_on_token_t():
    teacher, student = gpt2(0), gpt2(1, 16)
    batch = with_labels(padded_batch())
    distiller = Distiller(teacher, student, {"kd": (KD(T=2), 0.0)}, shift_labels=False)
    _, parts = distiller.step(batch)
    with torch.no_grad():
        logits = student(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    expected = F.cross_entropy(logits.reshape(-1, VOCAB), batch["labels"].reshape(-1), ignore_index=-100)
    assert float(parts["ce"]) == pytest.approx(float(expected), rel=1e-5)
    with pytest.raises(ValueError, match="shift_labels"):
        Distiller(teacher, student, {"kd": KD()}, shift_labels="yes")


def test_fit_cross_entropy_on_a_causal_lm_is_hugging_face_loss():
    model = gpt2(1, 16)
    batch = with_labels(padded_batch())
    with torch.no_grad():
        expected = float(model(**batch).loss)  # one batch of all samples: the mean over tokens ignores order
    history = fit(model, Samples(batch), epochs=1, batch_size=4, device="cpu", progress=False)
    assert history["loss"].iloc[0] == pytest.approx(expected, rel=1e-5)


def test_accuracy_of_a_causal_lm_counts_the_predicted_tokens():
    model = gpt2(1, 16)
    batch = with_labels(padded_batch())
    with torch.no_grad():
        predicted = model(**batch).logits.argmax(-1)[:, :-1]
    targets = batch["labels"][:, 1:]
    counted = targets != -100
    expected = float((predicted == targets)[counted].float().mean())
    assert accuracy(model, Samples(batch), batch_size=4, device="cpu") == pytest.approx(expected)


def test_sequence_classification_ce_equals_hugging_face_loss():
    torch.manual_seed(0)
    teacher = BertForSequenceClassification(bert_config(32, num_labels=3)).eval()
    student = BertForSequenceClassification(bert_config(16, num_labels=3))
    batch = {**padded_batch(), "token_type_ids": torch.zeros(4, LENGTH, dtype=torch.long),
             "labels": torch.tensor([0, 2, 1, 2])}
    _, parts = Distiller(teacher, student, {"kd": KD()}).step(batch)
    with torch.no_grad():
        assert float(parts["ce"]) == pytest.approx(float(student(**batch).loss), rel=1e-5)


# -- token KD and hints skip padding -----------------------------------------------------------------
def test_token_kd_is_the_mean_over_unpadded_positions_by_hand():
    teacher, student = gpt2(0), gpt2(1, 16)
    batch = padded_batch()
    _, parts = Distiller(teacher, student, {"kd": KD(T=2)}, ce_weight=0).step(batch)
    with torch.no_grad():
        s, t = student(**batch).logits, teacher(**batch).logits
    expected, count = 0.0, 0
    for i in range(4):
        for position in range(LENGTH):
            if batch["attention_mask"][i, position]:
                log_s, log_t = F.log_softmax(s[i, position] / 2, -1), F.log_softmax(t[i, position] / 2, -1)
                expected += float(4 * (log_t.exp() * (log_t - log_s)).sum())
                count += 1
    assert float(parts["kd"]) == pytest.approx(expected / count, rel=1e-5)


def test_token_kd_with_causal_labels_uses_the_positions_ce_trains_on():
    teacher, student = gpt2(0), gpt2(1, 16)
    batch = with_labels(padded_batch())
    _, parts = Distiller(teacher, student, {"kd": KD(T=1)}).step(batch)
    with torch.no_grad():
        s, t = student(**batch).logits[:, :-1], teacher(**batch).logits[:, :-1]
    keep = batch["labels"][:, 1:] != -100  # position t has a next token to predict
    expected = F.kl_div(F.log_softmax(s[keep], -1), F.log_softmax(t[keep], -1), log_target=True,
                        reduction="batchmean")
    assert float(parts["kd"]) == pytest.approx(float(expected), rel=1e-5)


def test_hint_over_hidden_states_skips_padding():
    teacher, student = gpt2(0, 32), gpt2(1, 16)
    batch = padded_batch()
    distiller = Distiller(teacher, student, {"hint": FitNet()}, layers={"hint": ("transformer.h.0", "transformer.h.0")},
                          ce_weight=0, example=batch)
    _, parts = distiller.step(batch)
    real = batch["attention_mask"].bool()
    with torch.no_grad():
        s = student(**batch, output_hidden_states=True).hidden_states[1][real]  # after block h.0
        t = teacher(**batch, output_hidden_states=True).hidden_states[1][real]
        expected = F.mse_loss(distiller.terms["hint"].projector(s), t)
    assert float(parts["hint"]) == pytest.approx(float(expected), rel=1e-5)


# -- heads: logits only from models that have them ---------------------------------------------------
def test_factory_builds_models_with_heads():
    lm = models.create("gpt2_tiny_lm")
    assert type(lm).__name__ == "GPT2LMHeadModel" and lm.feature_info
    ids = torch.randint(0, 1000, (2, 5))
    assert lm(input_ids=ids).logits.shape == (2, 5, lm.config.vocab_size)
    classifier = models.create("bert_tiny_cls", num_labels=3)
    assert type(classifier).__name__ == "BertForSequenceClassification"
    assert classifier(input_ids=ids).logits.shape == (2, 3)
    assert type(models.create("gpt2_tiny", head="causal_lm")).__name__ == "GPT2LMHeadModel"
    small = dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64, vocab_size=VOCAB)
    assert type(models.create("hf:bert", head="masked_lm", **small)).__name__ == "BertForMaskedLM"
    with pytest.raises(ValueError, match="causal_lm"):
        models.create("gpt2_tiny", head="lm")


def test_logit_terms_and_predictions_refuse_headless_models():
    teacher, student = gpt2(0, head=False), gpt2(1, 16, head=False)
    batch = padded_batch()
    with pytest.raises(TypeError, match="GPT2Model.*without logits.*gpt2_tiny_lm"):
        Distiller(teacher, student, {"kd": KD()}, ce_weight=0).step(batch)
    with pytest.raises(TypeError, match="GPT2Model.*without logits"):
        compare_predictions(teacher, student, loader(batch), device="cpu", progress=False)


def test_feature_terms_still_run_on_headless_models():
    teacher, student = gpt2(0, head=False), gpt2(1, 16, head=False)
    batch = padded_batch()
    distiller = Distiller(teacher, student, {"hint": FitNet()}, layers={"hint": ("h.1", "h.1")}, ce_weight=0,
                          example=batch)
    total, parts = distiller.step(batch)
    assert torch.isfinite(total) and list(parts) == ["hint"]


def test_cka_trajectory_measures_token_batches_with_their_mask():
    teacher, student = gpt2(0), gpt2(1, 16)
    batch = padded_batch(6, seed=3)
    initial = copy.deepcopy(student)
    trajectory = CKATrajectory(loader(batch), ["transformer.h.0"], ["transformer.h.0"], every=1, batch_size=6)
    fit(Distiller(teacher, student, {"kd": KD()}, ce_weight=0), Samples(batch), epochs=1, batch_size=6,
        callbacks=[trajectory], device="cpu", progress=False)
    mask = batch["attention_mask"][..., None].float()

    def pooled(model):
        return (_hidden(model, batch, 0) * mask).sum(1) / mask.sum(1)

    assert trajectory.steps == [0, 1]
    assert trajectory.values[0, 0, 0] == pytest.approx(reference_cka(pooled(teacher), pooled(initial)), rel=1e-6)
    with pytest.raises(ValueError, match="tokens must be"):
        CKATrajectory(loader(batch), tokens="flat")


@pytest.mark.parametrize("term", [ReverseKL(T=2), JensenShannon(T=2)], ids=["reverse_kl", "js"])
def test_other_token_divergences_see_only_unpadded_positions(term):
    teacher, student = gpt2(0), gpt2(1, 16)
    batch = padded_batch()
    _, parts = Distiller(teacher, student, {"div": term}, ce_weight=0).step(batch)
    real = batch["attention_mask"].bool()
    with torch.no_grad():
        s, t = student(**batch).logits[real], teacher(**batch).logits[real]  # [r, V]: the real tokens by hand
        padded = term(student(**batch).logits, teacher(**batch).logits)  # what counting padding would give
    assert float(parts["div"]) == pytest.approx(float(term(s, t)), rel=1e-5)
    assert abs(float(parts["div"]) - float(padded)) > 1e-6
