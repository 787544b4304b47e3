"""OFA-KD's branches and ofa_terms: shapes per family and stage count, the authors' block counts, token
grids that are not powers of two, class tokens, forced families, errors, gradients, checkpoints, export,
label smoothing, per-stage γ and weights, and branch_accuracy against an independent count."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from timm.models.mlp_mixer import MlpMixer
from torch import nn

from workbench import models
from workbench.losses import OFABranch, OFALoss, ofa_terms
from workbench.losses.ofa_branches import (
    MapBranch, PatchMerging, SepConv, TokenBranch, branch_family, heads_for, make_branch, merges_for, token_grid,
)
from workbench.probes import branch_accuracy
from workbench.train import Distiller, fit
from workbench.train.checkpoint import load_checkpoint, save_checkpoint


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py: one torch thread


def sepconvs(branch: nn.Module) -> list[SepConv]:
    return [m for m in branch.modules() if isinstance(m, SepConv)]


# -- CNN branches ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("stages", [2, 3, 4])
def test_cnn_branches_have_s_minus_i_blocks_with_doubling_channels(stages):
    channels, size = 8, 32
    for stage in range(1, stages + 1):
        shape = (3, channels * 2 ** (stage - 1), size // 2 ** (stage - 1), size // 2 ** (stage - 1))
        branch = make_branch(shape, stage, stages, 7, 96)
        blocks = sepconvs(branch)
        assert len(blocks) == stages - stage
        if blocks:  # doubling channels, the last one to the width
            outs = [block[5].out_channels for block in blocks]
            assert outs[:-1] == [shape[1] * 2 ** (k + 1) for k in range(len(blocks) - 1)] and outs[-1] == 96
            assert all(block[0].stride == (2, 2) and block[0].groups == block[0].in_channels for block in blocks)
        else:  # the last stage: a 1×1 conv
            conv = branch.body[0]
            assert isinstance(conv, nn.Conv2d) and conv.kernel_size == (1, 1) and conv.out_channels == 96
        assert branch(torch.randn(*shape)).shape == (3, 7)


def test_cnn_branch_is_global_average_pool_then_linear():
    branch = make_branch((2, 4, 5, 5), 2, 2, 3, 6).eval()  # the last stage: 1×1 conv, GAP, linear
    x = torch.randn(2, 4, 5, 5)
    conv, head = branch.body[0], branch.head
    expected = head(conv(x).mean(dim=(2, 3)))
    torch.testing.assert_close(branch(x), expected)


# -- token branches ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("side,merges,grid", [(8, 1, 4), (6, 1, 3), (7, 1, 4), (5, 1, 3), (14, 2, 4), (4, 0, 4),
                                              (2, 0, 2), (9, 2, 3)])
def test_token_merges_follow_the_actual_grid(side, merges, grid):
    assert merges_for(side, 4) == merges
    branch = TokenBranch((2, side * side + 1, 12), blocks=1, width=12, num_classes=5, prefix=1)
    assert len(branch.merges) == merges and branch.grid == grid
    assert branch(torch.randn(2, side * side + 1, 12)).shape == (2, 5)


@pytest.mark.parametrize("stages", [2, 3, 4])
def test_token_branches_have_max_s_minus_i_1_blocks(stages):
    for stage in range(1, stages + 1):
        branch = make_branch((2, 37, 16), stage, stages, 10, 16)  # class token + 6×6 grid
        assert len(branch.blocks) == max(stages - stage, 1)
        assert branch(torch.randn(2, 37, 16)).shape == (2, 10)


def test_patch_merging_concatenates_2x2_neighbourhoods_as_swin():
    merge = PatchMerging(2, 1, 4)
    with torch.no_grad():  # identity reduction, no norm: the output is the 4 concatenated tokens
        merge.norm = nn.Identity()
        merge.reduction.weight.copy_(torch.eye(4))
        merge.act = nn.Identity()
    tokens = torch.tensor([[0.0], [1.0], [2.0], [3.0]])[None]  # row-major 2×2: (0,0)=0 (0,1)=1 (1,0)=2 (1,1)=3
    assert merge(tokens).tolist() == [[[0.0, 2.0, 1.0, 3.0]]]  # Swin's order x0 (0,0), x1 (1,0), x2 (0,1), x3 (1,1)


def test_odd_grid_is_zero_padded():
    merge = PatchMerging(3, 2, 2)
    assert merge(torch.randn(1, 9, 2)).shape == (1, 4, 2)


def test_class_token_is_read_out_and_patches_are_averaged_without_one():
    torch.manual_seed(0)
    with_cls = TokenBranch((2, 17, 8), blocks=1, width=8, num_classes=3, prefix=1).eval()
    x = torch.randn(2, 17, 8)
    tokens = with_cls.blocks(torch.cat([x[:, :1], with_cls.merges(x[:, 1:])], dim=1))
    torch.testing.assert_close(with_cls(x), with_cls.head(tokens[:, 0]))
    without = TokenBranch((2, 16, 8), blocks=1, width=8, num_classes=3, prefix=0).eval()
    patches = torch.randn(2, 16, 8)
    torch.testing.assert_close(without(patches), without.head(without.blocks(without.merges(patches)).mean(dim=1)))


def test_heads_fit_the_width():
    assert [heads_for(w) for w in (64, 96, 30, 10, 7)] == [4, 4, 3, 2, 1]
    branch = TokenBranch((2, 16, 10), blocks=1, width=10, num_classes=3, prefix=0)
    assert branch.blocks[0].attn.num_heads == 2


def test_width_changes_project_patches_and_class_token():
    branch = TokenBranch((2, 5, 8), blocks=1, width=12, num_classes=3, prefix=1)  # 2×2 grid: no merge
    assert isinstance(branch.widen, nn.Linear) and isinstance(branch.widen_prefix, nn.Linear)
    assert branch(torch.randn(2, 5, 8)).shape == (2, 3)


# -- families, forcing and errors ----------------------------------------------------------------------
def test_family_detected_and_forced_with_layout_conversion():
    assert branch_family((2, 8, 4, 4)) == "cnn" and branch_family((2, 17, 8)) == "tokens"
    forced_cnn = make_branch((2, 17, 8), 1, 2, 3, 16, family="cnn")  # tokens -> 4×4 map, cls dropped
    assert isinstance(forced_cnn, MapBranch) and forced_cnn(torch.randn(2, 17, 8)).shape == (2, 3)
    forced_tokens = make_branch((2, 8, 4, 4), 1, 2, 3, 8, family="tokens")
    assert isinstance(forced_tokens, TokenBranch) and forced_tokens(torch.randn(2, 8, 4, 4)).shape == (2, 3)
    # a forced CNN branch reads the tokens as the map a ViT would form
    map_branch = make_branch((2, 8, 4, 4), 2, 2, 3, 16).eval()
    tokens_branch = make_branch((2, 17, 8), 2, 2, 3, 16, family="cnn").eval()
    tokens_branch.load_state_dict(map_branch.state_dict())
    patches = torch.randn(2, 16, 8)
    as_map = patches.transpose(1, 2).reshape(2, 8, 4, 4)
    torch.testing.assert_close(tokens_branch(torch.cat([torch.randn(2, 1, 8), patches], 1)), map_branch(as_map))


@pytest.mark.parametrize("shape", [(4, 10), (4, 2, 3, 4, 5)])
def test_unknown_shapes_name_the_stage(shape):
    with pytest.raises(ValueError, match=r"'head\.fc'.*" + ", ".join(map(str, shape))):
        make_branch(shape, 1, 2, 3, 8, layer="head.fc")


def test_token_counts_off_a_square_grid_are_refused():
    with pytest.raises(ValueError, match="'blocks.1'.*18 tokens"):
        token_grid(18, None, "blocks.1")
    with pytest.raises(ValueError, match="family must be"):
        make_branch((2, 8, 4, 4), 1, 2, 3, 8, family="mlp")


def test_branch_refuses_other_shapes_naming_its_layer():
    branch = make_branch((2, 8, 4, 4), 1, 2, 3, 8, layer="blocks.0")
    with pytest.raises(ValueError, match="'blocks.0' was built for features \\[n, 8, 4, 4\\]"):
        branch(torch.randn(2, 8, 6, 6))


class VectorStages(nn.Module):
    """Stages that output vectors [n, d]: not a map, not tokens."""

    def __init__(self):
        super().__init__()
        self.blocks = nn.Sequential(nn.Linear(4, 6), nn.Linear(6, 3))

    def forward(self, x):
        return self.blocks(x)


class TupleStage(nn.Module):
    """A stage that returns a non-tensor object."""

    def __init__(self):
        super().__init__()
        self.blocks = nn.Sequential(nn.Identity())
        self.head = nn.Linear(4, 3)

    def forward(self, x):
        self.blocks(x)
        return self.head(x)


def test_ofa_terms_reports_stages_of_unknown_shape():
    teacher = nn.Linear(4, 3).eval()
    with pytest.raises(ValueError, match=r"'blocks.0'.*\(5, 6\).*neither a map"):
        ofa_terms(teacher, VectorStages(), torch.randn(5, 4), stages="blocks.0")


def test_ofa_terms_reports_a_stage_that_gives_no_tensor():
    class NoTensor(nn.Module):
        def forward(self, x):
            return "not a tensor"

    student = TupleStage()
    student.blocks[0] = NoTensor()
    with pytest.raises(TypeError, match="cannot read a tensor"):
        ofa_terms(nn.Linear(4, 3).eval(), student, torch.randn(5, 4), stages="blocks.0")


def test_unknown_layer_lists_close_names():
    teacher, student = models.create("cnn", img_size=16).eval(), models.create("cnn_small", img_size=16)
    with pytest.raises(KeyError, match="blocks"):
        ofa_terms(teacher, student, torch.randn(4, 1, 16, 16), stages="blokcs.0")


# -- ofa_terms on the three pair families -----------------------------------------------------------------
def pairs():
    cnn = models.create("cnn", img_size=16).eval()
    vit = models.create("vit", img_size=16, patch_size=4, depth=2).eval()
    timm_vit = models.create("vit_tiny_patch16_224", img_size=16, patch_size=4, depth=3, embed_dim=24, num_heads=2,
                             num_classes=10, in_chans=1)
    mixer = MlpMixer(num_classes=10, img_size=16, in_chans=1, patch_size=4, num_blocks=2, embed_dim=24)
    return {"vit->cnn": (vit, models.create("cnn_small", img_size=16)), "cnn->vit": (cnn, timm_vit),
            "cnn->mixer": (cnn, mixer)}


def batch(n=8, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(n, 1, 16, 16, generator=generator), torch.randint(0, 10, (n,), generator=generator)


@pytest.mark.parametrize("pair", ["vit->cnn", "cnn->vit", "cnn->mixer"])
def test_ofa_terms_total_is_the_weighted_sum_with_smoothed_ce(pair):
    teacher, student = pairs()[pair]
    x, y = batch()
    setup = ofa_terms(teacher, student, (x, y), gamma=1.3, T=2.0, ce_weight=0.5, kd_weight=2.0, ofa_weight=0.25)
    distiller = Distiller(teacher, student, **setup)
    assert setup.stages == [f"blocks.{i}" for i in range(len(setup.stages))]
    assert set(distiller.layers.values()) == {("logits", stage) for stage in setup.stages}
    distiller.eval()
    total, parts = distiller.step((x, y))
    with torch.no_grad():
        student_logits, teacher_logits = student(x), teacher(x)
    torch.testing.assert_close(parts["ce"], F.cross_entropy(student_logits, y, label_smoothing=0.1))
    torch.testing.assert_close(parts["ofa"], OFALoss(gamma=1.3, T=2.0)(student_logits, teacher_logits, y))
    from workbench.capture import capture

    with torch.no_grad(), capture(student, setup.stages) as features:
        student(x)
        for stage, column in setup.columns.items():
            branch_logits = setup["terms"][column][0].logits(features[stage])
            torch.testing.assert_close(parts[column], OFALoss(gamma=1.3, T=2.0)(branch_logits, teacher_logits, y))
    expected = 0.5 * parts["ce"] + 2.0 * parts["ofa"] + 0.25 * sum(parts[c] for c in setup.columns.values())
    torch.testing.assert_close(total.detach(), expected)


def test_per_stage_gamma_and_weights():
    teacher, student = pairs()["vit->cnn"]
    setup = ofa_terms(teacher, student, batch(), gamma=[1.0, 1.1, 1.2, 1.5], ofa_weight=[0.1, 0.2, 0.3])
    gammas = [setup["terms"][setup.columns[s]][0].loss.gamma for s in setup.stages]
    assert gammas == [1.0, 1.1, 1.2] and setup["terms"]["ofa"][0].gamma == 1.5
    assert [setup["terms"][setup.columns[s]][1] for s in setup.stages] == [0.1, 0.2, 0.3]
    with pytest.raises(ValueError, match="gamma has 2 values; give one number or 4"):
        ofa_terms(teacher, student, batch(), gamma=[1.0, 1.2])
    with pytest.raises(ValueError, match="label_smoothing"):
        ofa_terms(teacher, student, batch(), label_smoothing=1.0)


def test_cnn_branch_width_is_max_of_student_and_teacher_widths():
    teacher, student = pairs()["vit->cnn"]  # built-in ViT: num_features 64; cnn_small's last stage: 32 channels
    setup = ofa_terms(teacher, student, batch())
    last = setup["terms"][setup.columns["blocks.2"]][0].branch
    assert last.body[0].out_channels == max(64, 32) and last.head.in_features == 64
    narrow = ofa_terms(teacher, student, batch(), teacher_width=8)
    assert narrow["terms"][narrow.columns["blocks.2"]][0].branch.body[0].out_channels == 32


def test_named_layers_count_among_the_model_stages():
    teacher, student = pairs()["vit->cnn"]
    setup = ofa_terms(teacher, student, batch(), stages=["blocks.1", "blocks.2"])
    blocks = [len(sepconvs(setup["terms"][setup.columns[s]][0].branch)) for s in setup.stages]
    assert blocks == [1, 0]  # stage 2 and 3 of 3, as with all stages
    other = ofa_terms(teacher, student, batch(), stages=["blocks.1.*", "blocks.2"])  # not all stages
    assert len(other.stages) > 2


def test_seed_fixes_branch_weights_and_leaves_the_global_stream():
    teacher, student = pairs()["vit->cnn"]
    torch.manual_seed(5)
    state = torch.random.get_rng_state()
    one = ofa_terms(teacher, student, batch(), seed=3)
    assert torch.equal(torch.random.get_rng_state(), state)
    two = ofa_terms(teacher, student, batch(), seed=3)
    for column in one.columns.values():
        for a, b in zip(one["terms"][column][0].parameters(), two["terms"][column][0].parameters()):
            assert torch.equal(a, b)


def test_gradients_reach_student_and_branches_never_the_teacher():
    teacher, student = pairs()["cnn->vit"]
    teacher_copy = copy.deepcopy(teacher)
    distiller = Distiller(teacher, student, **ofa_terms(teacher, student, batch()))
    total, _ = distiller.step(batch())
    total.backward()
    assert all(p.grad is None for p in teacher.parameters()) and not any(p.requires_grad for p in teacher.parameters())
    branch_params = [p for name, p in distiller.named_parameters() if name.startswith("terms.ofa@")]
    assert branch_params and all(p.grad is not None and p.grad.abs().sum() > 0 for p in branch_params)
    stage_grads = [p.grad for p in student.blocks[0].parameters()]
    assert all(g is not None for g in stage_grads)
    for name, p in teacher.state_dict().items():
        assert torch.equal(p, teacher_copy.state_dict()[name])
    assert set(map(id, distiller.trainable_parameters())) == set(map(id, [*student.parameters(), *branch_params]))


def test_branches_are_checkpointed_and_not_exported(tmp_path):
    teacher, student = pairs()["cnn->mixer"]
    distiller = Distiller(teacher, student, **ofa_terms(teacher, student, batch(), seed=1))
    folder = save_checkpoint(tmp_path / "ckpt", distiller, step=1)
    keys = distiller.state_dict().keys()
    branch_keys = [k for k in keys if k.startswith("terms.ofa@")]
    assert branch_keys
    other = Distiller(teacher, copy.deepcopy(student), **ofa_terms(teacher, student, batch(), seed=2))
    load_checkpoint(folder, other)
    for key in branch_keys:
        assert torch.equal(other.state_dict()[key], distiller.state_dict()[key])
    exported = load_file(distiller.export_student(tmp_path / "student.safetensors"))
    assert set(exported) == set(student.state_dict()) and not any("ofa" in k for k in exported)


# -- branch accuracy ------------------------------------------------------------------------------------
def test_branch_accuracy_matches_an_independent_count():
    teacher, student = pairs()["vit->cnn"]
    x, y = batch(40, seed=3)
    distiller = Distiller(teacher, student, **ofa_terms(teacher, student, (x, y)))
    student.train()
    result = branch_accuracy(distiller, (x, y), batch_size=16, device="cpu")
    assert student.training and distiller.terms["ofa@blocks_0"].training  # modes given back
    from workbench.capture import capture

    distiller.eval()  # the student and the branches (BatchNorm on running statistics)
    with torch.no_grad(), capture(student, result.layers) as features:
        head = student(x)
        expected = [(distiller.terms[t].logits(features[layer]).argmax(1) == y).float().mean().item()
                    for t, layer in zip(result.terms, result.layers)]
    assert result.accuracy == pytest.approx(expected) and result.final_accuracy == pytest.approx(
        (head.argmax(1) == y).float().mean().item())
    frame = result.to_frame()
    assert frame["depth"].tolist() == [1, 2, 3, "head"] and result.n_samples == 40
    assert len(result.plot().lines) == 1 and len(result.figure().data) == 1


def test_branch_accuracy_without_branches_says_so():
    distiller = Distiller(nn.Linear(4, 3).eval(), nn.Linear(4, 3), {"kd": OFALoss()})
    with pytest.raises(ValueError, match="no branch terms"):
        branch_accuracy(distiller, (torch.randn(4, 4), torch.zeros(4, dtype=torch.long)))


# -- a one-epoch run of each pair ---------------------------------------------------------------------
@pytest.mark.parametrize("pair", ["vit->cnn", "cnn->vit", "cnn->mixer"])
def test_one_epoch_of_each_pair_trains_the_branches(pair):
    teacher, student = pairs()[pair]
    x, y = batch(48, seed=1)
    setup = ofa_terms(teacher, student, (x, y), seed=0)
    distiller = Distiller(teacher, student, **setup)
    before = {k: v.clone() for k, v in distiller.state_dict().items() if k.startswith("terms.ofa@")}
    history = fit(distiller, (x, y), (x, y), epochs=1, batch_size=16, lr=1e-3, device="cpu", progress=False)
    assert {"ce", "ofa", *setup.columns.values()} <= set(history.columns)
    assert history[list(setup.columns.values())].notna().all().all()
    after = distiller.state_dict()
    assert any(not torch.equal(before[k], after[k]) for k in before if before[k].is_floating_point())
    assert isinstance(distiller.terms[setup.columns[setup.stages[0]]], OFABranch)
