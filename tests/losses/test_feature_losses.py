"""Feature terms (FitNet, CosineHint, AttentionTransfer, NormDirection) and the automatic projectors."""
from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from workbench.losses import AttentionTransfer, CosineHint, FitNet, NormDirection, class_means, make_projector
from workbench.losses.projectors import map_to_tokens, tokens_to_map


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def test_fitnet_hand_value_without_and_with_a_projector():
    student, teacher = torch.tensor([[1.0, 2.0], [3.0, 4.0]]), torch.tensor([[0.0, 0.0], [1.0, 1.0]])
    term = FitNet()
    assert term(student, teacher).item() == pytest.approx((1 + 4 + 4 + 9) / 4)
    assert sum(p.numel() for p in term.parameters()) == 0  # equal shapes: identity projector
    wide = FitNet().build(student, torch.zeros(2, 3))
    with torch.no_grad():
        wide.projector.body.weight.copy_(torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]]))
        wide.projector.body.bias.zero_()
    # projected rows: [1, 2, 3] and [3, 4, 7]; teacher rows [0, 1, 2], [1, 1, 1]
    expected = (1 + 1 + 1 + 4 + 9 + 36) / 6
    assert wide(student, torch.tensor([[0.0, 1.0, 2.0], [1.0, 1.0, 1.0]])).item() == pytest.approx(expected)


def test_cosine_hint_hand_value_and_scale_invariance():
    value = CosineHint()(torch.tensor([[1.0, 0.0]]), torch.tensor([[1.0, 1.0]])).item()
    assert value == pytest.approx(1 - 1 / math.sqrt(2))
    x, y = torch.randn(3, 4, 5, 5, generator=gen()), torch.randn(3, 4, 5, 5, generator=gen(1))
    assert CosineHint()(7 * x, y).item() == pytest.approx(CosineHint()(x, y).item(), rel=1e-5)
    assert CosineHint()(x, x.clone()).item() == pytest.approx(0.0, abs=1e-6)


def test_attention_transfer_hand_value():
    # Q_s = [1², 2²] = [1, 4] -> [1, 4]/√17; Q_t = [4, 4] -> [1, 1]/√2; mean over the 2 positions
    student, teacher = torch.tensor([[[[1.0, 2.0]]]]), torch.tensor([[[[2.0, -2.0]]]])
    a, b = 1 / math.sqrt(17), 1 / math.sqrt(2)
    expected = ((a - b) ** 2 + (4 * a - b) ** 2) / 2
    assert AttentionTransfer()(student, teacher).item() == pytest.approx(expected, rel=1e-6)
    # p = 1: Q_s = [1, 2]/√5
    expected_p1 = ((1 / math.sqrt(5) - b) ** 2 + (2 / math.sqrt(5) - b) ** 2) / 2
    assert AttentionTransfer(p=1)(student, teacher).item() == pytest.approx(expected_p1, rel=1e-6)


def test_attention_transfer_invariances_and_resize():
    x = torch.randn(2, 3, 4, 4, generator=gen())
    wider = torch.cat([x, -x, 2 * x], dim=1)  # same attention up to a constant factor, 9 channels
    assert AttentionTransfer()(x, wider).item() == pytest.approx(0.0, abs=1e-7)
    assert AttentionTransfer()(5 * x, x).item() == pytest.approx(0.0, abs=1e-7)
    # a student map made of constant 2×2 blocks pools exactly onto the teacher's 2×2 grid
    small = torch.randn(2, 3, 2, 2, generator=gen(1))
    blocky = small.repeat_interleave(2, dim=2).repeat_interleave(2, dim=3)
    assert AttentionTransfer()(blocky, small).item() == pytest.approx(0.0, abs=1e-7)
    upsampled = AttentionTransfer()(small, blocky)  # a smaller student map is upsampled (bilinear): not exact
    assert upsampled.shape == () and 0 < upsampled.item() < 0.1


def test_norm_direction_hand_value_with_batch_and_given_means():
    teacher = torch.tensor([[2.0, 0.0], [1.0, 1.0], [0.0, 3.0]])
    student = torch.tensor([[1.0, 0.0], [0.0, 4.0], [0.0, 1.0]])
    targets = torch.tensor([0, 0, 1])
    # batch means: class 0 -> [1.5, 0.5], e_0 = [3, 1]/√10; class 1 -> [0, 3], e_1 = [0, 1]
    rows = [1 - (3 / math.sqrt(10)) / 2, 1 - (4 / math.sqrt(10)) / 4, 1 - 1 / 3]
    assert NormDirection()(student, teacher, targets).item() == pytest.approx(sum(rows) / 3, rel=1e-6)
    given = NormDirection(class_means=torch.tensor([[0.0, 5.0], [1.0, 0.0]]))  # e_0 = [0, 1], e_1 = [1, 0]
    rows = [1 - 0 / 2, 1 - 4 / 4, 1 - 0 / 3]
    assert given(student, teacher, targets).item() == pytest.approx(sum(rows) / 3, rel=1e-6)


def test_norm_direction_rewards_norm_up_to_the_teacher_then_direction_only():
    teacher, targets = torch.tensor([[4.0, 0.0], [0.0, 4.0]]), torch.tensor([0, 1])
    losses = [NormDirection()(scale * torch.eye(2), teacher, targets).item() for scale in (1.0, 2.0, 4.0, 8.0)]
    assert losses[0] > losses[1] > losses[2] == pytest.approx(0.0, abs=1e-7)
    assert losses[3] == pytest.approx(0.0, abs=1e-7)
    assert NormDirection()(teacher.clone(), teacher, targets).item() == pytest.approx(0.0, abs=1e-7)


def test_class_means_helper():
    features = torch.tensor([[1.0, 0.0], [3.0, 2.0], [0.0, 5.0]])
    torch.testing.assert_close(
        class_means(features, torch.tensor([0, 0, 2]), num_classes=4),
        torch.tensor([[2.0, 1.0], [0.0, 0.0], [0.0, 5.0], [0.0, 0.0]]),
    )


def test_projector_shapes_and_teacher_views():
    maps_down = make_projector((2, 8, 8, 8), (2, 16, 4, 4))
    assert maps_down(torch.randn(2, 8, 8, 8)).shape == (2, 16, 4, 4)
    assert isinstance(maps_down.body[0], nn.Conv2d) and isinstance(maps_down.body[1], nn.BatchNorm2d)
    assert make_projector((2, 8, 2, 2), (2, 8, 4, 4))(torch.randn(2, 8, 2, 2)).shape == (2, 8, 4, 4)
    vit_student = make_projector((2, 17, 6), (2, 16, 4, 4))  # cls + 4×4 tokens -> a map
    assert vit_student(torch.randn(2, 17, 6)).shape == (2, 16, 4, 4)
    vit_teacher = make_projector((2, 8, 8, 8), (2, 17, 12))  # a map -> the teacher's patch tokens
    assert vit_teacher(torch.randn(2, 8, 8, 8)).shape == (2, 16, 12)
    assert vit_teacher.teacher_view(torch.randn(2, 17, 12)).shape == (2, 16, 12)
    same_count = make_projector((2, 10, 6), (2, 10, 12))
    assert isinstance(same_count.body, nn.Linear) and same_count(torch.randn(2, 10, 6)).shape == (2, 10, 12)
    assert make_projector((2, 65, 6), (2, 17, 12))(torch.randn(2, 65, 6)).shape == (2, 16, 12)
    assert make_projector((2, 6), (2, 12))(torch.randn(2, 6)).shape == (2, 12)


def test_projector_pooling_by_hand_and_token_grid_round_trip():
    identity = make_projector((1, 1, 6, 6), (1, 1, 2, 2))  # same width: no parameters, only pooling
    assert list(identity.parameters()) == []
    x = (torch.arange(36.0) ** 2).reshape(1, 1, 6, 6)
    def block_mean(i: int, j: int) -> float:
        return sum(float(x[0, 0, 3 * i + a, 3 * j + b]) for a in range(3) for b in range(3)) / 9

    block_means = [[block_mean(i, j) for j in range(2)] for i in range(2)]
    torch.testing.assert_close(identity(x), torch.tensor([[block_means]]))
    tokens = torch.randn(2, 9, 5, generator=gen())
    assert tokens_to_map(tokens)[0, :, 0, 1].tolist() == tokens[0, 1].tolist()  # row-major positions
    torch.testing.assert_close(map_to_tokens(tokens_to_map(tokens)), tokens)


def test_projector_errors():
    with pytest.raises(ValueError, match="pool the map"):
        make_projector((2, 8, 4, 4), (2, 16))
    with pytest.raises(ValueError, match="cannot arrange 7 tokens"):
        make_projector((2, 7, 8), (2, 8, 4, 4))
    projector = make_projector((2, 8, 4, 4), (2, 16, 4, 4))
    with pytest.raises(ValueError, match="built for student features"):
        projector(torch.randn(2, 8, 5, 5))


def test_projectors_are_lazy_or_built_eagerly_and_trainable():
    student, teacher = torch.randn(4, 8, 4, 4, generator=gen()), torch.randn(4, 16, 4, 4, generator=gen(1))
    lazy = FitNet()
    assert list(lazy.parameters()) == []
    lazy(student, teacher)
    assert sum(p.numel() for p in lazy.parameters()) == 8 * 16 + 2 * 16
    eager = CosineHint().build((4, 8, 4, 4), (4, 16, 4, 4))
    optimizer = torch.optim.SGD(eager.parameters(), lr=0.5)
    before = eager(student, teacher).item()
    for _ in range(5):
        optimizer.zero_grad()
        eager(student, teacher).backward()
        optimizer.step()
    assert eager(student, teacher).item() < before
    custom = FitNet(projector=nn.Conv2d(8, 16, 1))
    assert custom(student, teacher).shape == ()


CASES = [
    (FitNet(), (4, 8, 4, 4), (4, 16, 2, 2)),
    (CosineHint(), (4, 17, 6), (4, 12, 4, 4)),
    (AttentionTransfer(), (4, 8, 4, 4), (4, 32, 2, 2)),
    (NormDirection(), (4, 6), (4, 10)),
]


@pytest.mark.parametrize("term,student_shape,teacher_shape", CASES, ids=[type(case[0]).__name__ for case in CASES])
def test_finite_student_gradient_and_no_teacher_gradient(term, student_shape, teacher_shape):
    student = torch.randn(student_shape, generator=gen()).requires_grad_(True)
    teacher = torch.randn(teacher_shape, generator=gen(1)).requires_grad_(True)
    term(student, teacher, torch.tensor([0, 1, 0, 1])).backward()
    assert teacher.grad is None
    assert torch.isfinite(student.grad).all() and student.grad.abs().sum() > 0
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in term.parameters())


@pytest.mark.parametrize(
    "term", [FitNet(), CosineHint(), AttentionTransfer(), NormDirection()], ids=lambda term: type(term).__name__
)
def test_clear_error_on_batch_mismatch(term):
    with pytest.raises(ValueError, match=r"student has 4, the teacher has 3"):
        term(torch.randn(4, 8), torch.randn(3, 8), torch.zeros(4, dtype=torch.long))


def test_norm_direction_input_errors():
    with pytest.raises(ValueError, match="needs targets"):
        NormDirection()(torch.randn(4, 8), torch.randn(4, 8))
    with pytest.raises(ValueError, match="embeddings"):
        NormDirection()(torch.randn(4, 8, 2, 2), torch.randn(4, 8, 2, 2), torch.zeros(4, dtype=torch.long))
    with pytest.raises(ValueError, match="cover every target class"):
        NormDirection(class_means=torch.ones(2, 8))(torch.randn(4, 8), torch.randn(4, 8), torch.tensor([0, 1, 2, 0]))
