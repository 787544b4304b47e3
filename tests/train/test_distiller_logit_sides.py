"""A term's teacher side and student side can each be the model's logits (``Distiller.LOGITS``) or a layer."""
from __future__ import annotations

import os
import tempfile
from collections import OrderedDict

import pytest
import torch
from torch import nn

from workbench.losses import KD
from workbench.models.weights import load_weights
from workbench.train import Distiller


class Record(nn.Module):
    """Keeps what it was called with; a trainable projector makes the loss reach the student's features."""

    def __init__(self, width: int, classes: int) -> None:
        super().__init__()
        self.projector = nn.Linear(width, classes)
        self.seen: tuple = ()

    def forward(self, student: torch.Tensor, teacher: torch.Tensor, targets: torch.Tensor | None = None) -> torch.Tensor:
        self.seen = (student, teacher, targets)
        source = self.projector(student) if student.shape[-1] != teacher.shape[-1] else student
        return ((source - teacher) ** 2).mean()


def models() -> tuple[nn.Module, nn.Module]:
    torch.manual_seed(0)
    teacher = nn.Sequential(nn.Linear(4, 16), nn.ReLU(), nn.Linear(16, 3)).eval()
    student = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3))
    return teacher, student


def batch() -> tuple[torch.Tensor, torch.Tensor]:
    torch.manual_seed(1)
    return torch.randn(6, 4), torch.tensor([0, 1, 2, 0, 1, 2])


def test_student_features_against_teacher_logits_get_exactly_those_tensors() -> None:
    teacher, student = models()
    term = Record(8, 3)
    distiller = Distiller(teacher, student, {"mix": term}, layers={"mix": (Distiller.LOGITS, "1")}, ce_weight=0)
    x, y = batch()
    distiller.step((x, y))
    seen_student, seen_teacher, seen_targets = term.seen
    torch.testing.assert_close(seen_student, torch.relu(student[0](x)), rtol=0, atol=0)
    with torch.no_grad():
        torch.testing.assert_close(seen_teacher, teacher(x), rtol=0, atol=0)
    assert torch.equal(seen_targets, y)
    assert distiller.layers == {"mix": ("logits", "1")} and distiller.logit_terms() == []


def test_teacher_features_against_student_logits() -> None:
    teacher, student = models()
    term = Record(3, 16)
    distiller = Distiller(teacher, student, {"mix": term}, layers={"mix": ("0", "logits")}, ce_weight=0)
    x, y = batch()
    distiller.step((x, y))
    with torch.no_grad():
        torch.testing.assert_close(term.seen[0], student(x), rtol=0, atol=0)
        torch.testing.assert_close(term.seen[1], teacher[0](x), rtol=0, atol=0)


def test_logits_on_both_sides_is_the_plain_logit_term() -> None:
    teacher, student = models()
    x, y = batch()
    plain = Distiller(teacher, student, {"kd": (KD(T=2), 0.7)})
    sides = Distiller(teacher, student, {"kd": (KD(T=2), 0.7)}, layers={"kd": ("logits", "logits")})
    total_plain, parts_plain = plain.step((x, y))
    total_sides, parts_sides = sides.step((x, y))
    assert sides.logit_terms() == ["kd"] and sides.layers == {}
    torch.testing.assert_close(total_sides, total_plain, rtol=0, atol=0)
    assert parts_sides.keys() == parts_plain.keys()
    for name in parts_plain:
        torch.testing.assert_close(parts_sides[name], parts_plain[name], rtol=0, atol=0)
    # and an independent reference: KD at T=2 is T² · KL(p_t || p_s)
    with torch.no_grad():
        log_s, p_t = torch.log_softmax(student(x) / 2, -1), torch.softmax(teacher(x) / 2, -1)
        kl = (p_t * (p_t.log() - log_s)).sum(-1).mean() * 4
    torch.testing.assert_close(parts_sides["kd"], kl, rtol=1e-5, atol=1e-6)


def test_logits_on_both_sides_keeps_the_class_count_check() -> None:
    teacher = nn.Sequential(nn.Linear(4, 5)).eval()
    _, student = models()
    with pytest.raises(ValueError, match="5 classes|3 classes"):
        Distiller(teacher, student, {"kd": KD()}, layers={"kd": ("logits", "logits")}, example=batch())


def test_an_unknown_layer_beside_logits_lists_the_closest_names() -> None:
    teacher, _ = models()
    student = nn.Sequential(OrderedDict([("block0", nn.Linear(4, 8)), ("act", nn.ReLU()), ("head", nn.Linear(8, 3))]))
    with pytest.raises(KeyError, match=r"student side.*closest names: \['block0'"):
        Distiller(teacher, student, {"mix": Record(8, 3)}, layers={"mix": ("logits", "blok0")})
    with pytest.raises(ValueError, match="teacher_layer, student_layer"):
        Distiller(teacher, student, {"mix": Record(8, 3)}, layers={"mix": ("logits",)})


def test_a_module_named_logits_warns_and_is_reached_with_a_glob() -> None:
    teacher, _ = models()
    torch.manual_seed(2)
    student = nn.Sequential(OrderedDict([("logits", nn.Linear(4, 8)), ("act", nn.ReLU()), ("head", nn.Linear(8, 3))]))
    x, y = batch()
    term = Record(3, 16)
    with pytest.warns(UserWarning, match="not its module named 'logits'.*logit\\[s\\]"):
        distiller = Distiller(teacher, student, {"mix": term}, layers={"mix": ("0", "logits")}, ce_weight=0)
    distiller.step((x, y))
    with torch.no_grad():
        torch.testing.assert_close(term.seen[0], student(x), rtol=0, atol=0)  # the reserved word wins
    module_term = Record(8, 16)
    module = Distiller(teacher, student, {"mix": module_term}, layers={"mix": ("0", "logit[s]")}, ce_weight=0)
    assert module.layers == {"mix": ("0", "logits")}
    module.step((x, y))
    with torch.no_grad():
        torch.testing.assert_close(module_term.seen[0], student.logits(x), rtol=0, atol=0)


def test_gradients_reach_the_student_and_the_projector_only() -> None:
    teacher, student = models()
    distiller = Distiller(teacher, student, {"mix": Record(8, 3)}, layers={"mix": ("logits", "1")}, ce_weight=0)
    total, _ = distiller.step(batch())
    total.backward()
    assert all(p.grad is None for p in teacher.parameters())
    assert student[0].weight.grad is not None and student[0].weight.grad.abs().sum() > 0
    head = student[2].weight.grad  # not on the path to layer "1"; CE stays in the graph at weight 0
    assert head is None or not head.any()
    assert distiller.terms["mix"].projector.weight.grad is not None


def test_state_dict_and_export_student_are_unaffected() -> None:
    teacher, student = models()
    distiller = Distiller(teacher, student, {"mix": Record(8, 3)}, layers={"mix": ("logits", "1")})
    keys = set(distiller.state_dict())
    assert keys == {f"student.{k}" for k in student.state_dict()} | {"terms.mix.projector.weight", "terms.mix.projector.bias"}
    path = distiller.export_student(os.path.join(tempfile.mkdtemp(), "student.safetensors"))
    fresh = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3))
    load_weights(fresh, path)
    for name, value in student.state_dict().items():
        assert torch.equal(fresh.state_dict()[name], value)


class TokenModel(nn.Module):
    """A tiny token model: embedding -> hidden [n, t, d] -> token logits [n, t, V]."""

    def __init__(self, width: int, vocab: int = 7) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, width)
        self.head = nn.Linear(width, vocab)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        return self.head(self.embed(input_ids))


def test_token_sequences_mixed_term_gets_unpadded_rows_and_aligned_labels() -> None:
    torch.manual_seed(3)
    teacher, student = TokenModel(12).eval(), TokenModel(6)
    ids = torch.tensor([[1, 2, 3, 4], [5, 6, 0, 0]])
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0]])
    labels = ids.clone()
    term = Record(6, 7)
    distiller = Distiller(teacher, student, {"mix": term}, layers={"mix": ("logits", "embed")}, shift_labels=True)
    distiller.step({"input_ids": ids, "attention_mask": mask, "labels": labels})
    keep = mask.bool()
    with torch.no_grad():
        torch.testing.assert_close(term.seen[0], student.embed(ids)[keep], rtol=0, atol=0)
        torch.testing.assert_close(term.seen[1], teacher(ids)[keep], rtol=0, atol=0)
    # position t predicts token t + 1; the last real position of each row has no next token
    assert term.seen[2].tolist() == [2, 3, 4, -100, 6, -100]
