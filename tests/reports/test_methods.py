"""Methods of the distill report built into Distillers: every term trains, layers and weights as written,
the old method names unchanged, composites and interruptions in run_comparison."""
from __future__ import annotations

import math

import pandas as pd
import pytest
import torch

from workbench import losses, models
from workbench.capture import stage_names
from workbench.reports import compare
from workbench.reports.methods import (
    METHODS, TERMS, check_method_layers, describe_method, method_distiller, plan_method, stage_pairs,
    teacher_class_means,
)
from workbench.train import Distiller, fit
from workbench.train.distiller import RESERVED_NAMES


def tiny(widths=(4, 8), seed=0):
    torch.manual_seed(seed)
    return models.create("cnn", widths=widths, img_size=16)


@pytest.fixture
def pair():
    return tiny((8, 16), seed=1).eval(), tiny((4, 8))


@pytest.fixture
def data():
    generator = torch.Generator().manual_seed(0)
    return torch.randn(48, 1, 16, 16, generator=generator), torch.randint(0, 10, (48,), generator=generator)


def parameters_of(module):
    return [p.detach().clone() for p in module.parameters()]


@pytest.mark.parametrize("name", list(TERMS))
def test_every_term_trains_through_method_distiller(name, pair, data):
    teacher, student = pair
    distiller = method_distiller(name, teacher, student, data=data, total_steps=3)
    assert isinstance(distiller, Distiller) and distiller.ce_weight == 1.0
    distiller.build((data[0][:16], data[1][:16]))
    projectors = {column: parameters_of(term) for column, term in distiller.terms.items() if list(term.parameters())}
    student_before = parameters_of(student)
    history = fit(distiller, data, epochs=1, batch_size=16, device="cpu", progress=False)
    assert len(history) == 3
    for column in ["loss", "ce", *distiller.terms]:
        assert history[column].map(math.isfinite).all(), (name, column, history[column].tolist())
    assert any(not torch.equal(a, b) for a, b in zip(student_before, student.parameters()))
    if name in ("fitnet", "cosine", "nd"):  # projected terms: widths 16 -> 8 differ, so a projector exists
        assert projectors, name
    for column, before in projectors.items():  # the projectors were in the optimizer
        after = list(distiller.terms[column].parameters())
        assert any(not torch.equal(a, b) for a, b in zip(before, after)), column
    if name == "taid":  # the linear floor of the schedule reached alpha_end at the run's last step
        assert distiller.terms["taid"].alpha == pytest.approx(1.0)


# The definitions of the methods before composites (workbench/reports/compare.py at 35db4f4), kept here
# as the reference the moved names must still build.
def _middle(stages):
    return stages[(len(stages) - 1) // 2]


OLD = {
    "kd": (lambda t, s, w: ({"kd": (losses.KD(T=4.0), w)}, {}), 1.0),
    "dkd": (lambda t, s, w: ({"dkd": (losses.DKD(alpha=1.0, beta=8.0, T=4.0), w)}, {}), 1.0),
    "dist": (lambda t, s, w: ({"dist": (losses.DIST(), w)}, {}), 2.0),
    "fitnet": (lambda t, s, w: ({"fitnet": (losses.FitNet(), w)}, {"fitnet": (_middle(t), _middle(s))}), 1.0),
    "rkd": (lambda t, s, w: ({"rkd": (losses.RKD(), w)}, {"rkd": (t[-1], s[-1])}), 1.0),
    "cka": (lambda t, s, w: ({"cka": (losses.CKALoss(), w)}, {"cka": (t[-1], s[-1])}), 1.0),
}
OLD_DESCRIPTIONS = {
    "student": "the student alone: cross-entropy on the labels",
    "kd": "CE + KD(T=4) on the logits (Hinton et al. 2015)",
    "dkd": "CE + DKD(α=1, β=8, T=4) on the logits (Zhao et al. 2022)",
    "dist": "CE + DIST(β=1, γ=1) on the logits (Huang et al. 2022)",
    "fitnet": "CE + FitNet hint (1×1-conv projector, MSE) between the middle stages (Romero et al. 2015)",
    "rkd": "CE + RKD distance and angle between the last stages (Park et al. 2019)",
    "cka": "CE + CKALoss (1 − linear CKA) between the last stages",
}


def settings_of(term):
    return {key: value for key, value in vars(term).items() if not key.startswith("_") and key != "training"}


@pytest.mark.parametrize("stages", [(3, 3), (4, 2), (2, 3)])
@pytest.mark.parametrize("name", list(OLD))
def test_the_old_names_build_what_they_built(name, stages):
    teacher = tiny(tuple(4 * 2**i for i in range(stages[0]))).eval()
    student = tiny(tuple(2**i for i in range(1, stages[1] + 1)))
    make, default_weight = OLD[name]
    for weight in (None, 0.25):
        terms, layers = make(stage_names(teacher), stage_names(student),
                             default_weight if weight is None else weight)
        distiller = method_distiller(name, teacher, student, weight)
        assert distiller.layers == layers and distiller.weights == {k: w for k, (_, w) in terms.items()}
        assert list(distiller.terms) == list(terms)
        for key, (term, _) in terms.items():
            assert type(distiller.terms[key]) is type(term) and settings_of(distiller.terms[key]) == settings_of(term)
        # and through the Method objects that moved with them
        new_terms, new_layers = METHODS[name].make(stage_names(teacher), stage_names(student),
                                                   METHODS[name].weight if weight is None else weight)
        assert new_layers == layers and {k: w for k, (_, w) in new_terms.items()} == distiller.weights
    assert METHODS[name].weight == default_weight


def test_the_old_descriptions_and_imports_are_kept():
    assert {name: METHODS[name].description for name in OLD_DESCRIPTIONS} == OLD_DESCRIPTIONS
    assert {name: describe_method(name) for name in OLD_DESCRIPTIONS} == OLD_DESCRIPTIONS
    assert compare.METHODS is METHODS and compare.method_distiller is method_distiller
    assert compare._middle(["a", "b", "c", "d"]) == "b" and compare.Method is METHODS["kd"].__class__


def test_a_composite_builds_each_term_on_the_named_layers(pair):
    teacher, student = pair
    distiller = method_distiller("kd+fitnet@blocks.1", teacher, student)
    assert list(distiller.terms) == ["kd", "fitnet"] and distiller.weights == {"kd": 1.0, "fitnet": 1.0}
    assert isinstance(distiller.terms["kd"], losses.KD) and isinstance(distiller.terms["fitnet"], losses.FitNet)
    assert distiller.layers == {"fitnet": ("blocks.1", "blocks.1")} and distiller.logit_terms() == ["kd"]
    distiller = method_distiller("kd(T=2)*0.5+rkd@blocks.0*2+fitnet@blocks.1:blocks.0", teacher, student, weight=3)
    assert distiller.terms["kd"].T == 2.0
    assert distiller.weights == {"kd": 0.5, "rkd": 2.0, "fitnet": 3.0}  # weight= only where none was written
    assert distiller.layers == {"rkd": ("blocks.0", "blocks.0"), "fitnet": ("blocks.1", "blocks.0")}


def test_at_stages_makes_one_term_per_stage_pair():
    teacher, student = tiny((4, 8, 16)).eval(), tiny((4, 8))
    distiller = method_distiller("at@stages", teacher, student)
    # 2 student stages against 3 teacher stages: same relative depth 0 and 1 -> teacher stages 0 and 2
    assert distiller.layers == {"at@blocks_0": ("blocks.0", "blocks.0"),
                                "at@blocks_2:blocks_1": ("blocks.2", "blocks.1")}
    assert all(isinstance(term, losses.AttentionTransfer) for term in distiller.terms.values())
    assert distiller.weights == {"at@blocks_0": 1000.0, "at@blocks_2:blocks_1": 1000.0}
    same = method_distiller("at@stages", tiny((4, 8)).eval(), tiny((2, 4)))
    assert list(same.layers.values()) == [("blocks.0", "blocks.0"), ("blocks.1", "blocks.1")]


def test_stage_pairs_follow_relative_depth():
    for n_teacher in range(1, 7):
        for n_student in range(1, 7):
            teacher, student = [f"t{i}" for i in range(n_teacher)], [f"s{i}" for i in range(n_student)]
            pairs = stage_pairs(teacher, student)
            assert len(pairs) == min(n_teacher, n_student)
            assert pairs[-1] == (teacher[-1], student[-1])
            if len(pairs) > 1:
                assert pairs[0] == (teacher[0], student[0])
            depth = [(int(t[1:]) / (n_teacher - 1) if n_teacher > 1 else 1.0,  # a single stage is the last
                      int(s[1:]) / (n_student - 1) if n_student > 1 else 1.0) for t, s in pairs]
            for t, s in depth:  # each stage meets the nearest relative depth on the other side
                step = 1 / (2 * max(max(n_teacher, n_student) - 1, 1))
                assert abs(t - s) <= step + 1e-9
            assert len({t for t, _ in pairs}) == len(pairs) == len({s for _, s in pairs})


def test_feature_layers_places_terms_without_at(pair):
    teacher, student = pair
    auto = check_method_layers("fitnet+rkd+cka+nd+sp+pkt+cosine", teacher, student)
    assert auto["fitnet"] == auto["cosine"] == ("blocks.0", "blocks.0")  # middle of 2 stages: the first
    assert {auto[k] for k in ("rkd", "cka", "nd", "sp", "pkt")} == {("blocks.1", "blocks.1")}
    assert check_method_layers("fitnet+rkd", teacher, student, "last") == {
        "fitnet": ("blocks.1", "blocks.1"), "rkd": ("blocks.1", "blocks.1")}
    assert check_method_layers("rkd+fitnet@blocks.1", teacher, student, "blocks.0:pool") == {
        "rkd": ("blocks.0", "pool"), "fitnet": ("blocks.1", "blocks.1")}
    assert method_distiller("kd", teacher, student, feature_layers="middle").layers == {}


def test_unknown_layers_name_the_term_the_side_and_the_nearest_names(pair):
    teacher, student = pair
    with pytest.raises(ValueError, match=r"term 'fitnet@blocks\.9', teacher side: TinyCNN has no layer matching "
                                         r"'blocks\.9'; closest names: \['blocks\.1', 'blocks\.0'"):
        check_method_layers("kd+fitnet@blocks.9", teacher, student)
    with pytest.raises(ValueError, match=r"term 'rkd@blocks\.1:blok', student side: .*closest names: \['blocks"):
        method_distiller("rkd@blocks.1:blok", teacher, student)
    with pytest.raises(ValueError, match="the teacher has no stages for '@last'; name the layers"):
        check_method_layers("rkd", torch.nn.Identity(), student)


def test_history_columns_are_readable_and_unique(pair, data):
    teacher, student = pair
    columns = [p.column for p in plan_method("kd+kd(T=2)+at@stages+rkd+rkd@b.0", ["a.0", "a.1"], ["b.0", "b.1"])]
    assert columns == ["kd", "kd_2", "at@a_0:b_0", "at@a_1:b_1", "rkd@a_1:b_1", "rkd@b_0"]
    names = list(method_distiller("+".join(TERMS), teacher, student, data=data).terms)
    at = list(TERMS).index("at")  # attention transfer sits at both stages: one column each
    ofa = list(TERMS).index("ofa")  # OFA-KD: its final-logit term, then a branch per student stage
    expected = list(TERMS)[:ofa + 1] + ["ofa@blocks_0", "ofa@blocks_1"] + list(TERMS)[ofa + 1:at]
    expected += ["at@blocks_0", "at@blocks_1"] + list(TERMS)[at + 1:]
    assert sorted(names) == sorted(expected) and len(names) == len(expected)
    assert not set(names) & set(RESERVED_NAMES)


def test_nd_uses_the_teachers_class_means_over_the_data(pair, data):
    teacher, student = pair
    with torch.no_grad():
        embeddings = teacher.pool(teacher.blocks(data[0]))  # TinyCNN: the last stage, averaged = the head's input
    expected = torch.stack([embeddings[data[1] == c].mean(0) if (data[1] == c).any() else torch.zeros(16)
                            for c in range(10)])
    means = teacher_class_means(teacher, data, "blocks.1", batch_size=7)
    torch.testing.assert_close(means, expected)
    distiller = method_distiller("nd", teacher, student, data=data)
    torch.testing.assert_close(distiller.terms["nd"].class_means, expected)
    assert method_distiller("nd", teacher, student).terms["nd"].class_means is None  # the batch's means
    with pytest.raises(ValueError, match="need labelled data"):
        teacher_class_means(teacher, data[0], "blocks.1")


def test_taid_linear_needs_the_run_length(pair):
    teacher, student = pair
    assert method_distiller("taid(schedule=linear)", teacher, student, total_steps=10).terms["taid"].total_steps == 10
    assert method_distiller("taid(total_steps=4)", teacher, student, total_steps=10).terms["taid"].total_steps == 4
    with pytest.raises(ValueError, match=r"needs total_steps; pass the run's length \(method_distiller"):
        method_distiller("taid(schedule=linear)", teacher, student)


def test_describe_composites():
    assert describe_method("kd(T=2)*0.5+fitnet@blocks.1") == (
        "CE + 0.5 × KD(T=2) on the logits (Hinton et al. 2015) + FitNet hint (1×1-conv projector, MSE) at "
        "blocks.1 (Romero et al. 2015)")
    assert describe_method("at") == (
        "CE + 1000 × attention transfer (p=2) at every stage pair (Zagoruyko & Komodakis 2017)")
    assert describe_method("rkd", "blocks.0:blocks.1") == (
        "CE + RKD distance and angle between teacher blocks.0 and student blocks.1 (Park et al. 2019)")
    assert describe_method("KD") == describe_method("kd") and describe_method("student") == OLD_DESCRIPTIONS["student"]


class Spy:
    """Records, at the end of each run, the TAID schedule length the distiller trained with."""

    def __init__(self, seen):
        self.seen = seen

    def on_train_end(self, state):
        if state.distiller is not None and "taid" in state.distiller.terms:
            self.seen.append((state.distiller.terms["taid"].total_steps, state.step))


def test_run_comparison_takes_composites_and_every_term(tmp_path, data):
    teacher = tiny((8, 16), seed=1).eval()
    seen = []
    methods = ["student", "kd*0.5+fitnet@blocks.1", "at@stages", "taid", "nd+sp"]
    result = compare.run_comparison(teacher, lambda seed: tiny((4, 8), seed), data, data, methods, [0], epochs=2,
                                    batch_size=16, device="cpu", weights={"at@stages": 10.0},
                                    callbacks=lambda method, seed: [Spy(seen)])
    assert result.methods == methods and result.interrupted is None and result.missing == []
    assert {"kd", "fitnet"} <= set(result.histories[("kd*0.5+fitnet@blocks.1", 0)].columns)
    assert {"at@blocks_0", "at@blocks_1"} <= set(result.histories[("at@stages", 0)].columns)
    assert seen == [(6, 6)]  # TAID's schedule spans the run: 2 epochs × 3 batches
    path = result.save_markdown(tmp_path / "t.md")
    text = path.read_text()
    assert "- `kd*0.5+fitnet@blocks.1`: CE + 0.5 × KD(T=4) on the logits" in text
    assert "- `at@stages`: CE + 10 × attention transfer (p=2) at every stage pair" in text  # weights= shown
    assert "feature_layers='auto'" in text


def test_run_comparison_checks_methods_and_layers_before_training(monkeypatch, data):
    teacher = tiny((8, 16), seed=1).eval()
    monkeypatch.setattr(compare, "fit", lambda *args, **kwargs: pytest.fail("trained before the check"))
    made = []
    make = lambda seed: made.append(seed) or tiny()  # noqa: E731
    with pytest.raises(ValueError, match="methods: method 'at@stage': at@'stage'|unknown layer|no layer matching"):
        compare.run_comparison(teacher, make, data, data, ["student", "at@stage"], [0, 1], device="cpu")
    with pytest.raises(ValueError, match="methods: method 'kdd': unknown term 'kdd'; did you mean 'kd'"):
        compare.run_comparison(teacher, make, data, data, ["student", "kdd"], [0], device="cpu")
    with pytest.raises(ValueError, match="must not repeat"):
        compare.run_comparison(teacher, make, data, data, ["kd", "KD"], [0], device="cpu")
    with pytest.raises(ValueError, match="feature_layers: 'blocks.\\*' is not a layer rule"):
        compare.run_comparison(teacher, make, data, data, ["kd"], [0], device="cpu", feature_layers="blocks.*")
    assert made == [0]  # only the layer check built a student ('at@stage' names a layer that does not exist)


def stop_in_run(index):
    """callbacks= for run_comparison: the run numbered ``index`` asks to stop after its second step."""
    calls = []

    class Stop:
        def on_step_end(self, state):
            if state.step == 2:
                state.request_stop("stop button")

    def callbacks(method, seed):
        calls.append((method, seed))
        return [Stop()] if len(calls) == index + 1 else []

    return callbacks


def test_an_interrupted_run_ends_the_comparison_with_what_finished(data):
    teacher = tiny((8, 16), seed=1).eval()
    result = compare.run_comparison(teacher, lambda seed: tiny((4, 8), seed), data, data, ["student", "kd", "rkd"],
                                    [0, 1], epochs=2, batch_size=16, device="cpu", callbacks=stop_in_run(2))
    assert result.runs[["method", "seed"]].values.tolist() == [["student", 0], ["student", 1]]
    assert result.interrupted["method"] == "kd" and result.interrupted["seed"] == 0
    assert result.interrupted["reason"] == "stop button" and result.interrupted["step"] == 2
    assert len(result.histories[("kd", 0)]) == 2 and ("kd", 1) not in result.histories
    assert result.missing == [("kd", 0), ("kd", 1), ("rkd", 0), ("rkd", 1)]
    text = result.to_markdown()
    assert "**Interrupted** (stop button) in `kd` seed 0 at epoch 1, step 2: 4 of 6 runs missing (`kd` seed 0, " \
           "`kd` seed 1, `rkd` seed 0, `rkd` seed 1)" in text
    assert "| student |" in text and "| kd |" not in text


def test_an_interruption_in_the_first_run_gives_an_empty_table(monkeypatch, data):
    teacher = tiny((8, 16), seed=1).eval()

    def interrupted_fit(*args, **kwargs):
        history = pd.DataFrame({"epoch": [1], "step": [1], "loss": [2.3]})
        history.attrs["interrupted"] = {"epoch": 1, "step": 1, "reason": "KeyboardInterrupt"}
        return history

    monkeypatch.setattr(compare, "fit", interrupted_fit)
    result = compare.run_comparison(teacher, lambda seed: tiny(), data, data, ["student", "kd"], [0], device="cpu")
    assert result.runs.empty and result.table().empty and result.missing == [("student", 0), ("kd", 0)]
    assert "**Interrupted** (KeyboardInterrupt) in `student` seed 0 at epoch 1, step 1: 2 of 2 runs missing" in \
        result.to_markdown()


def test_a_weighted_method_renders_as_written_in_the_markdown_table():
    import mistune

    runs = pd.DataFrame({"method": ["student", "kd*0.5+rkd@last*2"], "seed": [0, 0], "accuracy": [0.5, 0.6],
                         "matched_cka": [0.1, 0.2], "seconds": [1.0, 1.0]})
    html = mistune.html(compare.Comparison(runs).to_markdown())
    assert "<td>kd*0.5+rkd@last*2</td>" in html and "<em>" not in html


def test_ofa_method_is_ofa_terms_with_label_smoothing(pair, data):
    from workbench.losses import OFABranch, ofa_terms

    teacher, student = pair
    distiller = method_distiller("ofa(gamma=1.3, T=2)*0.5", teacher, student, data=data, seed=4)
    setup = ofa_terms(teacher, student, (data[0][:8], data[1][:8]), gamma=1.3, T=2.0, kd_weight=0.5, ofa_weight=0.5,
                      seed=4)
    assert distiller.label_smoothing == 0.1 and distiller.weights == {name: w for name, (_, w) in setup["terms"].items()}
    assert distiller.layers == setup["layers"] == {"ofa@blocks_0": ("logits", "blocks.0"),
                                                  "ofa@blocks_1": ("logits", "blocks.1")}
    for name, (term, _) in setup["terms"].items():  # the same branches, weight for weight (same seed)
        assert type(distiller.terms[name]) is type(term)
        for a, b in zip(distiller.terms[name].state_dict().values(), term.state_dict().values()):
            assert torch.equal(a, b)
    assert isinstance(distiller.terms["ofa@blocks_1"], OFABranch) and distiller.terms["ofa"].gamma == 1.3
    assert list(method_distiller("kd+ofa@last", teacher, student, data=data).terms) == ["kd", "ofa", "ofa@blocks_1"]
    assert describe_method("ofa@last").startswith("CE + OFA-KD (γ=1, T=1) on the final logits and a logit branch at "
                                                  "the student's last stage")


@pytest.mark.parametrize("method, message", [
    ("ofa@blocks.1:blocks.0", "read only the teacher's logits; write ofa@blocks.0"),
    ("ofa+ofa@last", "ofa appears twice"),
    ("ofa@blokcs.1", "student side: .* closest names"),
])
def test_ofa_method_errors(pair, data, method, message):
    teacher, student = pair
    with pytest.raises(ValueError, match=message):
        method_distiller(method, teacher, student, data=data)


def test_ofa_method_needs_data(pair):
    with pytest.raises(ValueError, match="pass data="):
        method_distiller("ofa", *pair)
    with pytest.raises(ValueError, match="use method_distiller"):
        METHODS["ofa"].make(["a"], ["b"], 1.0)
