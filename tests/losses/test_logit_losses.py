"""Logit terms (KD, ReverseKL, JensenShannon, DKD, DIST, TAID): hand values, identities, gradients, errors."""
from __future__ import annotations

import math
import re
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from workbench.losses import DIST, DKD, KD, TAID, JensenShannon, ReverseKL

LN3 = math.log(3.0)


def kl(p, q) -> float:
    return sum(pi * math.log(pi / qi) for pi, qi in zip(p, q) if pi > 0)


@pytest.fixture
def logits():
    generator = torch.Generator().manual_seed(0)
    return torch.randn(6, 5, generator=generator), 2 * torch.randn(6, 5, generator=generator)


def test_kd_hand_value_and_batchmean():
    # row 1: p_t = softmax([0, ln 3]) = [1/4, 3/4], p_s = [1/2, 1/2]; row 2: equal -> 0; T² = 16; mean of 2 rows
    student = torch.zeros(2, 2)
    teacher = torch.tensor([[0.0, 4 * LN3], [0.0, 0.0]])
    expected = 16 * (0.25 * math.log(0.5) + 0.75 * math.log(1.5)) / 2
    assert KD(T=4.0)(student, teacher).item() == pytest.approx(expected, rel=1e-6)


def test_reverse_kl_hand_value_and_swap_identity(logits):
    student, teacher = torch.tensor([[0.0, LN3]]), torch.zeros(1, 2)  # KL([1/4, 3/4] ‖ [1/2, 1/2])
    assert ReverseKL()(student, teacher).item() == pytest.approx(kl([0.25, 0.75], [0.5, 0.5]), rel=1e-6)
    s, t = logits
    assert ReverseKL(T=2.0)(s, t).item() == pytest.approx(KD(T=2.0)(t, s).item(), rel=1e-6)


def test_jensen_shannon_hand_value_symmetry_and_bound(logits):
    p_s, p_t = [0.5, 0.5], [0.25, 0.75]
    m = [0.375, 0.625]
    expected = 0.5 * kl(p_t, m) + 0.5 * kl(p_s, m)
    assert JensenShannon()(torch.zeros(1, 2), torch.tensor([[0.0, LN3]])).item() == pytest.approx(expected, rel=1e-6)
    s, t = logits
    term = JensenShannon(T=2.0)
    assert term(s, t).item() == pytest.approx(term(t, s).item(), rel=1e-6)
    assert term(100 * s, -100 * s).item() <= 4 * math.log(2) + 1e-6


def test_dkd_hand_value_and_temperature_scaling():
    # p_s = [1/3]*3, p_t = [1/2, 3/8, 1/8], target 0 -> b_t = [1/2, 1/2], b_s = [1/3, 2/3];
    # non-target: p̂_t = [3/4, 1/4], p̂_s = [1/2, 1/2]
    teacher = torch.log(torch.tensor([[4.0, 3.0, 1.0]]))
    tckd = kl([0.5, 0.5], [1 / 3, 2 / 3])
    nckd = kl([0.75, 0.25], [0.5, 0.5])
    targets = torch.tensor([0])
    assert DKD(alpha=1.0, beta=8.0, T=1.0)(torch.zeros(1, 3), teacher, targets).item() == pytest.approx(
        tckd + 8 * nckd, rel=1e-6
    )
    assert DKD(alpha=0.5, beta=2.0, T=2.0)(torch.zeros(1, 3), 2 * teacher, targets).item() == pytest.approx(
        4 * (0.5 * tckd + 2 * nckd), rel=1e-6
    )


def mdistiller_dkd(logits_student, logits_teacher, target, alpha, beta, temperature):
    """mdistiller's ``dkd_loss`` (distillers/DKD.py), rewritten with the same operations."""
    gt_mask = torch.zeros_like(logits_student).scatter_(1, target[:, None], 1).bool()
    other_mask = ~gt_mask

    def cat_mask(t, mask1, mask2):
        return torch.cat([(t * mask1).sum(1, keepdim=True), (t * mask2).sum(1, keepdim=True)], dim=1)

    pred_student = cat_mask(F.softmax(logits_student / temperature, dim=1), gt_mask, other_mask)
    pred_teacher = cat_mask(F.softmax(logits_teacher / temperature, dim=1), gt_mask, other_mask)
    n = target.shape[0]
    tckd = F.kl_div(torch.log(pred_student), pred_teacher, reduction="sum") * temperature**2 / n
    teacher_part2 = F.softmax(logits_teacher / temperature - 1000.0 * gt_mask, dim=1)
    log_student_part2 = F.log_softmax(logits_student / temperature - 1000.0 * gt_mask, dim=1)
    nckd = F.kl_div(log_student_part2, teacher_part2, reduction="sum") * temperature**2 / n
    return alpha * tckd + beta * nckd


def test_dkd_matches_mdistiller(logits):
    s, t = logits
    targets = torch.tensor([0, 1, 2, 3, 4, 0])
    for alpha, beta, T in ((1.0, 8.0, 4.0), (1.0, 0.5, 1.0)):
        expected = mdistiller_dkd(s.double(), t.double(), targets, alpha, beta, T).item()
        assert DKD(alpha, beta, T)(s, t, targets).item() == pytest.approx(expected, rel=1e-5)


def test_dkd_decomposition_of_kd_and_alpha_beta_one_is_not_kd(logits):
    s, t = (x.double() for x in logits)
    targets = torch.tensor([0, 1, 2, 3, 4, 0])
    T = 4.0
    p_t, log_p_t, log_p_s = F.softmax(t / T, 1), F.log_softmax(t / T, 1), F.log_softmax(s / T, 1)
    kd_per_sample = T**2 * (p_t * (log_p_t - log_p_s)).sum(1)
    tckd, nckd = DKD(T=T).parts(s, t, targets)
    teacher_target_probability = p_t[torch.arange(6), targets]
    # Zhao et al. Eq. 1: KD = TCKD + (1 − p_t,target) · NCKD, per sample
    torch.testing.assert_close(tckd + (1 - teacher_target_probability) * nckd, kd_per_sample, rtol=1e-10, atol=1e-12)
    # so DKD(1, 1) = KD + mean(p_t,target · NCKD) > KD
    gap = DKD(alpha=1.0, beta=1.0, T=T)(s, t, targets) - KD(T=T)(s, t)
    assert gap.item() == pytest.approx((teacher_target_probability * nckd).mean().item(), rel=1e-10)
    assert gap.item() > 1e-3


def test_dist_hand_value_against_numpy_pearson(logits):
    s, t = logits
    T = 2.0
    probs_s, probs_t = (np.exp(x.numpy() / T) / np.exp(x.numpy() / T).sum(1, keepdims=True) for x in (s, t))
    inter = 1 - np.mean([np.corrcoef(probs_s[i], probs_t[i])[0, 1] for i in range(6)])
    intra = 1 - np.mean([np.corrcoef(probs_s[:, j], probs_t[:, j])[0, 1] for j in range(5)])
    expected = T**2 * (2.0 * inter + 0.5 * intra)
    assert DIST(beta=2.0, gamma=0.5, T=T)(s, t).item() == pytest.approx(expected, rel=1e-5)


def test_taid_hand_value_gradient_and_endpoints(logits):
    # α = 0.4: mixed logits 0.6·[0, 0] + 0.4·[0, 2.5 ln 3] = [0, ln 3] -> p = [1/4, 3/4]; q_s = [1/2, 1/2]
    student = torch.zeros(1, 2, requires_grad=True)
    term = TAID(auto_update=False)
    loss = term(student, torch.tensor([[0.0, 2.5 * LN3]]))
    assert loss.item() == pytest.approx(kl([0.25, 0.75], [0.5, 0.5]), rel=1e-6)
    loss.backward()  # the target is held fixed: ∂/∂z_s = q_s − p_α
    torch.testing.assert_close(student.grad, torch.tensor([[0.25, -0.25]]))
    s, t = logits
    assert TAID(alpha_start=0.0, auto_update=False)(s, t).item() == pytest.approx(0.0, abs=1e-7)
    assert TAID(alpha_start=1.0, auto_update=False)(s, t).item() == pytest.approx(KD(T=1.0)(s, t).item(), rel=1e-6)


def sigmoid(x: float) -> float:
    return 1 / (1 + math.exp(-x))


def test_taid_adaptive_schedule_by_hand():
    term = TAID(step_size=0.1, momentum=0.5)
    assert term.update(1.0) == pytest.approx(0.4)  # the first step only records the loss
    # δ = (1 − 0.8)/1 = 0.2, m = 0.5·0 + 0.5·0.2 = 0.1, α = 0.4 + 0.1·σ(0.1)·0.6
    alpha = 0.4 + 0.1 * sigmoid(0.1) * 0.6
    assert term.update(0.8) == pytest.approx(alpha, rel=1e-12)
    # δ = (0.8 − 0.9)/0.8 = −0.125, m = 0.05 − 0.0625 = −0.0125: α still grows, more slowly
    alpha += 0.1 * sigmoid(-0.0125) * (1 - alpha)
    assert term.step(0.9) == pytest.approx(alpha, rel=1e-12)


def test_taid_linear_floor_linear_schedule_cap_and_monotone():
    floored = TAID(step_size=1e-9, total_steps=10)
    for _ in range(5):
        floored.update(1.0)
    assert floored.alpha == pytest.approx(0.4 + 0.6 * 5 / 10)
    linear = TAID(schedule="linear", total_steps=4, alpha_start=0.2, alpha_end=0.6)
    assert [round(linear.update(loss), 12) for loss in (5.0, 1.0, 9.0, 1.0, 1.0)] == [0.3, 0.4, 0.5, 0.6, 0.6]
    greedy = TAID(step_size=1.0, momentum=0.0, alpha_end=0.9)
    alphas = [greedy.update(loss) for loss in np.random.default_rng(0).uniform(0.1, 10.0, 50)]
    assert all(b >= a for a, b in zip(alphas, alphas[1:])) and alphas[-1] <= 0.9


def test_taid_auto_update_only_in_training_with_grad_and_state_dict(logits):
    s, t = logits
    term = TAID(step_size=0.5)
    term(s, t)
    term(s + 0.1 * t, t)
    assert int(term.num_updates) == 2 and term.alpha > 0.4
    before = term.alpha
    with torch.no_grad():
        term(s, t)
    term.eval()(s, t)
    assert term.alpha == before
    restored = TAID()
    restored.load_state_dict(term.state_dict())
    assert restored.alpha == before and int(restored.num_updates) == 2


def test_token_logits_skip_ignored_targets(logits):
    s, t = logits
    tokens_s, tokens_t = s.reshape(2, 3, 5), t.reshape(2, 3, 5)
    mask = torch.tensor([[0, -100, 1], [2, 3, -100]])
    keep = [0, 2, 3, 4]
    for term in (KD(), ReverseKL(), JensenShannon(), DIST(), TAID(auto_update=False)):
        assert term(tokens_s, tokens_t, mask).item() == pytest.approx(term(s[keep], t[keep]).item(), rel=1e-6)
    assert DKD()(tokens_s, tokens_t, mask).item() == pytest.approx(
        DKD()(s[keep], t[keep], torch.tensor([0, 1, 2, 3])).item(), rel=1e-6
    )


TERMS = [KD(), ReverseKL(), JensenShannon(), DKD(), DIST(), TAID(auto_update=False)]


@pytest.mark.parametrize("term", TERMS, ids=lambda term: type(term).__name__)
def test_zero_when_student_equals_teacher(term, logits):
    s, _ = logits
    assert term(s, s.clone(), torch.tensor([0, 1, 2, 3, 4, 0])).item() == pytest.approx(0.0, abs=1e-5)


@pytest.mark.parametrize("term", TERMS, ids=lambda term: type(term).__name__)
def test_finite_student_gradient_and_no_teacher_gradient(term, logits):
    student = logits[0].clone().requires_grad_(True)
    teacher = logits[1].clone().requires_grad_(True)
    term(student, teacher, torch.tensor([0, 1, 2, 3, 4, 0])).backward()
    assert teacher.grad is None
    assert torch.isfinite(student.grad).all() and student.grad.abs().sum() > 0


def test_teacher_detach_false_lets_the_teacher_learn(logits):
    teacher = logits[1].clone().requires_grad_(True)
    KD(teacher_detach=False)(logits[0], teacher).backward()
    assert teacher.grad is not None and teacher.grad.abs().sum() > 0


@pytest.mark.parametrize("term", TERMS, ids=lambda term: type(term).__name__)
def test_clear_errors_on_mismatched_shapes(term):
    targets = torch.zeros(4, dtype=torch.long)
    with pytest.raises(ValueError, match=r"classes.*student has 10, the teacher has 12"):
        term(torch.zeros(4, 10), torch.zeros(4, 12), targets)
    with pytest.raises(ValueError, match=r"same samples.*student has 4, the teacher has 3"):
        term(torch.zeros(4, 10), torch.zeros(3, 10), targets)
    with pytest.raises(ValueError, match=r"targets"):
        term(torch.zeros(4, 10), torch.zeros(4, 10), torch.full((4,), 10))


def test_dkd_needs_targets(logits):
    with pytest.raises(ValueError, match="DKD needs targets"):
        DKD()(*logits)


def test_docs_custom_term_example_runs():
    text = (Path(__file__).parents[2] / "docs" / "losses.md").read_text()
    section = text.split("## Adding a new loss", 1)[1]
    blocks = re.findall(r"```python\n(.*?)```", section, flags=re.S)
    assert blocks, "docs/losses.md lost its worked example"
    exec(compile("\n".join(blocks), "docs/losses.md", "exec"), {})
