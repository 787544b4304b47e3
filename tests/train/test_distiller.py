"""workbench.Distiller: the loss against terms computed by hand, the frozen teacher, projectors, bad input."""
from __future__ import annotations

import math
import re
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import workbench as wb
from workbench import models
from workbench.losses import KD, FitNet
from workbench.models import read_state_dict
from workbench.train import Distiller

DOCS = Path(__file__).resolve().parents[2] / "docs" / "distiller.md"


def _pair(student_classes: int = 10):
    torch.manual_seed(0)
    teacher = models.create("cnn", widths=(8, 16), img_size=16).eval()
    student = models.create("cnn", widths=(4, 8), img_size=16, num_classes=student_classes)
    return teacher, student


@pytest.fixture
def batch():
    generator = torch.Generator().manual_seed(1)
    return torch.randn(12, 1, 16, 16, generator=generator), torch.randint(0, 10, (12,), generator=generator)


def _distiller(batch, **kwargs):
    teacher, student = _pair()
    return Distiller(
        teacher, student, {"kd": (KD(T=4), 1.0), "hint": (FitNet(), 0.5)},
        layers={"hint": ("blocks.1", "blocks.1")}, ce_weight=0.7, example=batch, **kwargs,
    )


def test_step_matches_terms_computed_by_hand(batch):
    distiller = _distiller(batch)
    x, y = batch
    total, parts = distiller.step(batch)
    assert list(parts) == ["ce", "kd", "hint"]
    assert total.dim() == 0 and total.requires_grad
    assert all(isinstance(v, torch.Tensor) and v.dim() == 0 and not v.requires_grad for v in parts.values())

    # independent reference: own hooks, Hinton's formula, the projector applied by hand
    features = {}
    hooks = [
        model.blocks[1].register_forward_hook(lambda m, i, o, role=role: features.__setitem__(role, o))
        for role, model in (("teacher", distiller.teacher), ("student", distiller.student))
    ]
    with torch.no_grad():
        teacher_logits = distiller.teacher(x)
        student_logits = distiller.student(x)
        projected = distiller.terms["hint"].projector(features["student"])
    for hook in hooks:
        hook.remove()
    p_t = F.softmax(teacher_logits / 4, dim=1)
    kd = 16 * (p_t * (p_t.log() - F.log_softmax(student_logits / 4, dim=1))).sum(1).mean()
    hint = ((projected - features["teacher"]) ** 2).mean()
    ce = F.cross_entropy(student_logits, y)
    for name, expected in (("ce", ce), ("kd", kd), ("hint", hint)):
        assert float(parts[name]) == pytest.approx(float(expected), rel=1e-4), name
    assert total.item() == pytest.approx(float(0.7 * ce + kd + 0.5 * hint), rel=1e-4)


def test_teacher_frozen_outside_parameters_and_moves_along(batch):
    teacher, student = _pair()
    teacher.train()
    with pytest.warns(UserWarning, match="train mode"):
        distiller = Distiller(teacher, student, {"hint": (FitNet(), 1.0)}, layers={"hint": ("blocks.1", "blocks.1")},
                              example=batch)
    assert not teacher.training and not any(p.requires_grad for p in teacher.parameters())
    student_ids = {id(p) for p in student.parameters()}
    projector_ids = {id(p) for p in distiller.terms["hint"].projector.parameters()}
    assert projector_ids and {id(p) for p in distiller.trainable_parameters()} == student_ids | projector_ids
    assert {id(p) for p in distiller.parameters()} == student_ids | projector_ids
    assert not {id(p) for p in teacher.parameters()} & {id(p) for p in distiller.parameters()}
    assert {key.split(".")[0] for key in distiller.state_dict()} == {"student", "terms"}

    total, _ = distiller.step(batch)
    total.backward()
    assert all(p.grad is None for p in teacher.parameters())
    assert all(p.grad is not None for p in distiller.terms["hint"].projector.parameters())
    assert student.head.weight.grad is not None  # through ce

    distiller.double()
    assert next(teacher.parameters()).dtype == torch.float64 == next(student.parameters()).dtype


def test_lazy_projectors_are_built_before_the_optimizer(batch):
    teacher, student = _pair()
    distiller = Distiller(teacher, student, {"hint": FitNet()}, layers={"hint": ("blocks.0", "blocks.0")})
    assert distiller.unbuilt_terms() == ["hint"]
    with pytest.raises(RuntimeError, match=r"distiller.build\(batch\)"):
        distiller.trainable_parameters()
    running_mean = student.blocks[0][1].running_mean.clone()
    distiller.train()
    assert distiller.build(batch) is distiller
    assert distiller.unbuilt_terms() == []
    assert torch.equal(student.blocks[0][1].running_mean, running_mean), "build must not update BatchNorm"
    assert student.training and distiller.terms["hint"].projector.training and not teacher.training
    # 1x1 conv (no bias) and BatchNorm weight and bias
    assert len(distiller.trainable_parameters()) == len(list(student.parameters())) + 3


def test_bad_input_fails_at_construction_with_useful_messages(batch):
    teacher, student = _pair()
    with pytest.raises(KeyError, match=r"teacher side.*'blocks\.9'.*closest names: \['blocks\.1', 'blocks\.0'"):
        Distiller(teacher, student, {"hint": FitNet()}, layers={"hint": ("blocks.9", "blocks.1")})
    with pytest.raises(KeyError, match=r"student side.*'blok\.1'.*blocks\.1"):
        Distiller(teacher, student, {"hint": FitNet()}, layers={"hint": ("blocks.1", "blok.1")})
    with pytest.raises(ValueError, match=r"picks 2 layers"):
        Distiller(teacher, student, {"hint": FitNet()}, layers={"hint": ("blocks.*", "blocks.1")})
    with pytest.raises(ValueError, match=r"terms that do not exist: \['hnt'\]"):
        Distiller(teacher, student, {"hint": FitNet()}, layers={"hnt": ("blocks.1", "blocks.1")})
    _, four_classes = _pair(student_classes=4)
    with pytest.raises(ValueError, match=r"student has 4 classes and the teacher has 10"):
        Distiller(teacher, four_classes, {"kd": KD()})
    for bad in (float("nan"), float("inf"), "1.0", None, True):
        with pytest.raises(ValueError, match=r"term 'kd'"):
            Distiller(teacher, student, {"kd": (KD(), bad)})
        with pytest.raises(ValueError, match=r"ce_weight"):
            Distiller(teacher, student, {"kd": KD()}, ce_weight=bad)
    with pytest.raises(ValueError, match="reserved"):
        Distiller(teacher, student, {"loss": KD()})
    with pytest.raises(TypeError, match="nn.Module"):
        Distiller(teacher, student, {"kd": (lambda s, t, y=None: (s - t).pow(2).mean(), 1.0)})
    with pytest.raises(ValueError, match="same module"):
        Distiller(student, student, {"kd": KD()})


def test_class_count_mismatch_without_num_classes_fails_on_first_step():
    teacher = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(16, 10)).eval()
    student = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(16, 4))
    batch = (torch.randn(6, 16), torch.randint(0, 4, (6,)))
    with pytest.raises(ValueError, match=r"student has 4 classes and the teacher has 10"):
        Distiller(teacher, student, {"kd": KD()}, example=batch)
    distiller = Distiller(teacher, student, {"kd": KD()})  # no example: checked on the first step
    with pytest.raises(ValueError, match=r"student has 4 classes and the teacher has 10"):
        distiller.step(batch)


def test_hooks_are_removed_after_steps_and_errors(batch, hook_count):
    distiller = _distiller(batch)
    distiller.step(batch)
    assert hook_count(distiller.teacher) == 0 and hook_count(distiller.student) == 0

    class Broken(wb.losses.Term):
        def forward(self, student, teacher, targets=None):
            raise RuntimeError("broken term")

    teacher, student = _pair()
    broken = Distiller(teacher, student, {"bad": Broken()}, layers={"bad": ("blocks.1", "blocks.1")})
    with pytest.raises(RuntimeError, match="broken term"):
        broken.step(batch)
    assert hook_count(teacher) == 0 and hook_count(student) == 0


def test_unlabelled_batches_need_ce_weight_zero(batch):
    x, _ = batch
    teacher, student = _pair()
    with pytest.raises(ValueError, match="ce_weight=0"):
        Distiller(teacher, student, {"kd": KD()}).step(x)
    total, parts = Distiller(teacher, student, {"kd": KD()}, ce_weight=0).step(x)
    assert list(parts) == ["kd"] and total.item() == pytest.approx(float(parts["kd"]))
    with pytest.raises(ValueError, match="nothing to train"):
        Distiller(teacher, student, {}, ce_weight=0)


def test_set_weight_changes_the_next_total(batch):
    distiller = _distiller(batch)
    distiller.eval()  # BatchNorm in eval mode, so two steps on the same batch agree
    _, parts = distiller.step(batch)
    distiller.set_weight("kd", 3.0)
    distiller.set_weight("ce", 0.0)
    total, _ = distiller.step(batch)
    assert total.item() == pytest.approx(3 * float(parts["kd"]) + 0.5 * float(parts["hint"]), rel=1e-5)
    with pytest.raises(ValueError, match="term 'kd'"):
        distiller.set_weight("kd", float("nan"))
    with pytest.raises(KeyError, match="no term named"):
        distiller.set_weight("at", 1.0)


def test_export_student_writes_only_the_students_weights(batch, tmp_path):
    distiller = _distiller(batch)
    path = distiller.export_student(tmp_path / "student.safetensors")
    assert path.read_bytes()[8:9] == b"{"  # a safetensors header, not a pickle
    saved = read_state_dict(path)
    assert set(saved) == set(distiller.student.state_dict())
    fresh = models.create("cnn", widths=(4, 8), img_size=16)
    models.load_weights(fresh, path)
    for key, value in distiller.student.state_dict().items():
        assert torch.equal(fresh.state_dict()[key], value), key
    with pytest.raises(ValueError, match="safetensors"):
        distiller.export_student(tmp_path / "student.pt")


def test_docs_custom_term_example_runs():
    """docs/distiller.md: a new loss is one file; the worked example trains with it."""
    text = DOCS.read_text()
    match = re.search(r"<!-- example: custom-term -->\s*```python\n(.*?)```", text, re.S)
    assert match, "the custom-term example is missing from docs/distiller.md"
    namespace: dict = {}
    exec(compile(match.group(1), str(DOCS), "exec"), namespace)
    assert math.isfinite(namespace["history"]["loss"].iloc[-1])


def test_docs_language_model_example_runs():
    """docs/distiller.md: a padded GPT-2 batch distils over its real tokens with Hugging Face's shifted CE."""
    text = DOCS.read_text()
    match = re.search(r"<!-- example: language-model -->\s*```python\n(.*?)```", text, re.S)
    assert match, "the language-model example is missing from docs/distiller.md"
    namespace: dict = {}
    exec(compile(match.group(1), str(DOCS), "exec"), namespace)  # it asserts CE == model(**batch).loss
    assert sorted(namespace["parts"]) == ["ce", "kd"]
