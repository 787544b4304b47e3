"""Logit terms on masked logits (-inf classes), and their refusals of bad hyper-parameters and targets."""
from __future__ import annotations

import math

import pytest
import torch

from workbench.losses import DIST, DKD, KD, TAID, JensenShannon, ReverseKL

MASKED = [2, 5]  # vocabulary padding: -inf on both sides, in every row
KEEP = [0, 1, 3, 4, 6]
TARGETS = torch.tensor([0, 1, 3, 4, 6, 0])  # never a masked class
TARGETS_KEPT = torch.tensor([KEEP.index(int(y)) for y in TARGETS])  # the same classes after the removal


def make_terms() -> list:
    return [KD(), ReverseKL(T=2.0), JensenShannon(T=1.5), DKD(), DIST(T=2.0), TAID(alpha_start=0.6, auto_update=False),
            TAID(alpha_start=0.0, auto_update=False), TAID(alpha_start=1.0, auto_update=False)]


def term_id(term) -> str:
    return f"{type(term).__name__}({term.extra_repr().split(',')[0]})"


@pytest.fixture
def logits():
    generator = torch.Generator().manual_seed(3)
    return torch.randn(6, 7, generator=generator, dtype=torch.float64), 2 * torch.randn(6, 7, generator=generator,
                                                                                     dtype=torch.float64)


def masked(x: torch.Tensor, columns=MASKED) -> torch.Tensor:
    x = x.clone()
    x[:, columns] = -math.inf
    return x


@pytest.mark.parametrize("term", make_terms(), ids=term_id)
def test_classes_masked_on_both_sides_are_left_out(term, logits):
    # the reference: the same term on the logits with the masked columns removed
    s, t = logits
    student = masked(s).requires_grad_(True)
    loss = term(student, masked(t), TARGETS)
    reference_student = s[:, KEEP].clone().requires_grad_(True)
    reference = term(reference_student, t[:, KEEP], TARGETS_KEPT)
    assert math.isfinite(loss.item())
    assert loss.item() == pytest.approx(reference.item(), rel=1e-10, abs=1e-12)
    loss.backward()
    reference.backward()
    assert torch.isfinite(student.grad).all()
    assert torch.equal(student.grad[:, MASKED], torch.zeros(6, 2, dtype=torch.float64))
    torch.testing.assert_close(student.grad[:, KEEP], reference_student.grad, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("term", [KD(T=3.0), ReverseKL(), JensenShannon(), TAID(alpha_start=0.5, auto_update=False)],
                         ids=term_id)
def test_per_row_masks_and_a_trainable_teacher(term, logits):
    s, t = logits
    columns = [[1], [2, 3], [], [0, 6], [5], [4]]
    s_masked, t_masked = s.clone(), t.clone()
    for row, cut in enumerate(columns):
        s_masked[row, cut] = t_masked[row, cut] = -math.inf
    term.teacher_detach = False
    student, teacher = s_masked.requires_grad_(True), t_masked.requires_grad_(True)
    loss = term(student, teacher)
    rows = [[c for c in range(7) if c not in cut] for cut in columns]
    reference = sum(term(s[i : i + 1, keep], t[i : i + 1, keep]) for i, keep in enumerate(rows)) / 6
    assert loss.item() == pytest.approx(reference.item(), rel=1e-10)
    loss.backward()
    assert torch.isfinite(student.grad).all() and torch.isfinite(teacher.grad).all()


def kl_by_hand(p: list[float], q: list[float]) -> float:
    return sum(pi * math.log(pi / qi) for pi, qi in zip(p, q) if pi > 0)


def test_a_class_masked_on_one_side_only():
    # the side whose probability is 0 contributes 0 (0 · log 0 = 0); mass against a 0 is an infinite KL
    finite, cut = torch.tensor([[0.0, math.log(3.0), 0.0]]), torch.tensor([[0.0, math.log(3.0), -math.inf]])
    p_finite, p_cut = [0.2, 0.6, 0.2], [0.25, 0.75, 0.0]
    assert KD(T=1.0)(finite, cut).item() == pytest.approx(kl_by_hand(p_cut, p_finite), rel=1e-6)
    assert ReverseKL()(cut, finite).item() == pytest.approx(kl_by_hand(p_cut, p_finite), rel=1e-6)
    assert KD(T=1.0)(cut, finite).item() == math.inf
    assert ReverseKL()(finite, cut).item() == math.inf
    m = [(a + b) / 2 for a, b in zip(p_finite, p_cut)]
    expected = (kl_by_hand(p_cut, m) + kl_by_hand(p_finite, m)) / 2
    assert JensenShannon()(finite, cut).item() == pytest.approx(expected, rel=1e-6)
    student = cut.clone().requires_grad_(True)
    KD(T=1.0)(student, finite).backward()
    assert torch.isfinite(student.grad).all()


TEMPERED = [KD, ReverseKL, JensenShannon, DKD, DIST]


@pytest.mark.parametrize("make", TEMPERED, ids=lambda make: make.__name__)
@pytest.mark.parametrize("T", [0.0, -1.0, math.nan, math.inf, "4"])
def test_temperature_must_be_finite_and_positive(make, T):
    with pytest.raises((ValueError, TypeError), match=rf"{make.__name__}: T must be a finite number > 0, got"):
        make(T=T)


@pytest.mark.parametrize("make, name", [(DKD, "alpha"), (DKD, "beta"), (DIST, "beta"), (DIST, "gamma")])
@pytest.mark.parametrize("value", [-1.0, math.nan, math.inf])
def test_weights_inside_a_term_must_be_finite_and_non_negative(make, name, value):
    with pytest.raises(ValueError, match=rf"{make.__name__}: {name} must be a finite number ≥ 0, got {value}"):
        make(**{name: value})


@pytest.mark.parametrize("kwargs, message", [
    ({"step_size": math.nan}, r"step_size must be a finite number ≥ 0, got nan"),
    ({"momentum": 1.5}, r"momentum must be in \[0, 1\], got 1.5"),
    ({"momentum": math.nan}, r"momentum must be in \[0, 1\], got nan"),
    ({"total_steps": 0}, r"total_steps must be a positive integer or None, got 0"),
    ({"total_steps": 2.5}, r"total_steps must be a positive integer or None, got 2.5"),
    ({"alpha_start": math.nan}, r"need 0 ≤ alpha_start ≤ alpha_end ≤ 1, got nan and 1.0"),
])
def test_taid_refuses_bad_schedule_settings(kwargs, message):
    with pytest.raises(ValueError, match=rf"TAID: {message}"):
        TAID(**kwargs)


def test_good_settings_are_kept_as_given():
    assert KD(T=2).T == 2.0 and DKD(alpha=0.0, beta=0.5, T=1).beta == 0.5 and DIST(gamma=0.0).gamma == 0.0


@pytest.mark.parametrize("term", [KD(), DKD()], ids=term_id)
def test_float_targets_are_named_by_their_dtype(term, logits):
    s, t = logits
    with pytest.raises(ValueError, match=r"targets must be integer class indices \(int64\), got dtype float32"):
        term(s, t, TARGETS.float())
    with pytest.raises(ValueError, match=r"targets must be .*of shape \(6,\), got shape \(3,\)"):
        term(s, t, TARGETS[:3])


def test_any_integer_dtype_of_targets_is_read_as_class_indices(logits):
    s, t = logits
    assert DKD()(s, t, TARGETS.int()).item() == DKD()(s, t, TARGETS).item()  # one_hot needed int64 before
