"""OFALoss (OFA-KD, Hao et al. 2023) against plain-Python values, its γ = 1 identity, both enhance modes."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from workbench.losses import OFALoss

STUDENT = [[0.5, -1.0, 2.0], [1.5, 0.0, -0.5]]
TEACHER = [[2.0, 0.5, -1.0], [-0.5, 1.0, 3.0]]
TARGETS = [0, 2]


def softmax(row: list[float], T: float) -> list[float]:
    exps = [math.exp(z / T) for z in row]
    return [e / sum(exps) for e in exps]


def by_hand(gamma: float, T: float, enhance: str) -> float:
    total = 0.0
    for s_row, t_row, y in zip(STUDENT, TEACHER, TARGETS):
        p_s, p_t = softmax(s_row, T), softmax(t_row, T)
        for c in range(3):
            if c == y:
                weight = (p_t[c] + 1.0) ** gamma - 1.0
            else:
                weight = p_t[c] ** gamma if enhance == "released" else p_t[c]
            total -= weight * math.log(p_s[c])
    return total / len(STUDENT)


def call(term: OFALoss, student=STUDENT, teacher=TEACHER, targets=TARGETS) -> torch.Tensor:
    return term(torch.tensor(student, dtype=torch.float64), torch.tensor(teacher, dtype=torch.float64),
                torch.tensor(targets))


@pytest.mark.parametrize("enhance", ["released", "target"])
@pytest.mark.parametrize("gamma, T", [(1.0, 1.0), (1.5, 1.0), (1.3, 2.0), (0.5, 3.0)])
def test_matches_the_formula_by_hand(gamma, T, enhance):
    assert call(OFALoss(gamma=gamma, T=T, enhance=enhance)).item() == pytest.approx(by_hand(gamma, T, enhance),
                                                                                    rel=1e-12)


@pytest.mark.parametrize("enhance", ["released", "target"])
@pytest.mark.parametrize("T", [1.0, 4.0])
def test_gamma_one_is_cross_entropy_on_the_teachers_probabilities(enhance, T):
    student, teacher = torch.randn(5, 7, dtype=torch.float64), 3 * torch.randn(5, 7, dtype=torch.float64)
    targets = torch.tensor([0, 6, 3, 3, 1])
    reference = F.cross_entropy(student / T, F.softmax(teacher / T, dim=1))  # soft-label CE, no T² scale
    assert OFALoss(gamma=1.0, T=T, enhance=enhance)(student, teacher, targets).item() == pytest.approx(
        reference.item(), rel=1e-12)


def test_the_modes_differ_by_the_non_target_powers():
    released, target = call(OFALoss(gamma=1.5)).item(), call(OFALoss(gamma=1.5, enhance="target")).item()
    gap = 0.0  # released − target = −mean Σ_{c ≠ y} (p_t,c^γ − p_t,c) log p_s,c
    for s_row, t_row, y in zip(STUDENT, TEACHER, TARGETS):
        p_s, p_t = softmax(s_row, 1.0), softmax(t_row, 1.0)
        gap -= sum((p_t[c] ** 1.5 - p_t[c]) * math.log(p_s[c]) for c in range(3) if c != y)
    assert released != pytest.approx(target, rel=1e-3)
    assert released - target == pytest.approx(gap / 2, rel=1e-10)


def test_gradient_reaches_the_student_only():
    student = torch.tensor(STUDENT, requires_grad=True)
    teacher = torch.tensor(TEACHER, requires_grad=True)
    OFALoss(gamma=1.2, T=2.0)(student, teacher, torch.tensor(TARGETS)).backward()
    assert teacher.grad is None
    assert torch.isfinite(student.grad).all() and student.grad.abs().sum() > 0


def test_huge_logits_stay_finite():
    student = torch.tensor([[1000.0, -1000.0, 0.0], [-1000.0, 1000.0, 0.0]], requires_grad=True)
    teacher = torch.tensor([[-1000.0, 1000.0, 0.0], [1000.0, -1000.0, 0.0]])
    loss = OFALoss(gamma=1.5)(student, teacher, torch.tensor([2, 0]))
    loss.backward()
    # the weight sits on the teacher's top class, where log p_s = −2000 in both rows: weight 1 in row 1 (not
    # the target), (1 + 1)^1.5 − 1 in row 2 (the target); the released log(softmax) gives 0 · log 0 = NaN here
    assert loss.item() == pytest.approx((1 + 2**1.5 - 1) * 2000 / 2, rel=1e-6)
    assert torch.isfinite(student.grad).all()


def test_a_class_masked_on_both_sides_is_left_out():
    student, teacher = torch.tensor(STUDENT, dtype=torch.float64), torch.tensor(TEACHER, dtype=torch.float64)
    pad = torch.full((2, 1), -math.inf, dtype=torch.float64)
    masked_student = torch.cat([student, pad], dim=1).requires_grad_(True)
    loss = OFALoss(gamma=1.5)(masked_student, torch.cat([teacher, pad], dim=1), torch.tensor(TARGETS))
    loss.backward()
    assert loss.item() == pytest.approx(by_hand(1.5, 1.0, "released"), rel=1e-12)
    assert torch.isfinite(masked_student.grad).all() and torch.equal(masked_student.grad[:, 3], torch.zeros(2,
                                                                                            dtype=torch.float64))


def test_token_logits_skip_ignored_targets():
    student, teacher = torch.tensor([STUDENT]), torch.tensor([TEACHER])  # [1, 2 tokens, 3 classes]
    loss = OFALoss(gamma=1.5)(student, teacher, torch.tensor([[TARGETS[0], -100]]))
    first = OFALoss(gamma=1.5)(student[0, :1], teacher[0, :1], torch.tensor(TARGETS[:1]))
    assert loss.item() == pytest.approx(first.item(), rel=1e-6)


@pytest.mark.parametrize("kwargs, message", [
    ({"gamma": 0.0}, "gamma must be a finite number > 0"),
    ({"gamma": -1.0}, "gamma must be a finite number > 0"),
    ({"T": 0.0}, "T must be a finite number > 0"),
    ({"T": math.nan}, "T must be a finite number > 0"),
    ({"enhance": "paper"}, "enhance must be one of"),
])
def test_bad_settings_are_refused(kwargs, message):
    with pytest.raises(ValueError, match=message):
        OFALoss(**kwargs)


def test_targets_are_required():
    with pytest.raises(ValueError, match="OFALoss needs targets"):
        OFALoss()(torch.zeros(2, 3), torch.zeros(2, 3))
    with pytest.raises(ValueError, match=r"class indices in \[0, 3\)"):
        OFALoss()(torch.zeros(2, 3), torch.zeros(2, 3), torch.tensor([0, 3]))
