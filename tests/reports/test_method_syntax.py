"""Method strings of the distill report: parsing, the canonical spelling, and every error message."""
from __future__ import annotations

import inspect
import re

import pytest

from workbench import losses
from workbench.reports.methods import TERMS, MethodSpec, TermSpec, check_feature_layers, parse_method

ALL_LOSS_CLASSES = [getattr(losses, name) for name in losses.__all__
                    if inspect.isclass(getattr(losses, name)) and issubclass(getattr(losses, name), losses.Term)
                    and name not in ("Term", "ProjectedTerm")]


def test_every_loss_term_has_a_name():
    assert len(ALL_LOSS_CLASSES) == 16  # the 14 of issue 8, OFALoss and OFABranch
    named = {kind.cls for kind in TERMS.values()} | {kind.cls.__mro__[1] for kind in TERMS.values()}
    named.add(losses.OFABranch)  # the ofa term's branches (built by ofa_terms, not named on their own)
    assert set(ALL_LOSS_CLASSES) <= named
    for kind in TERMS.values():  # every class name reads as its term, in any case
        assert parse_method(kind.cls.__name__.upper()).terms[0].name == kind.name


@pytest.mark.parametrize("text, expected", [
    ("student", MethodSpec(())),
    ("kd", MethodSpec((TermSpec("kd"),))),
    ("kd(T=2)", MethodSpec((TermSpec("kd", (("T", 2.0),)),))),
    ("kd+fitnet@blocks.1", MethodSpec((TermSpec("kd"), TermSpec("fitnet", layers="blocks.1")))),
    ("at@stages", MethodSpec((TermSpec("at", layers="stages"),))),
    ("kd*0.5+rkd@last*2", MethodSpec((TermSpec("kd", weight=0.5), TermSpec("rkd", layers="last", weight=2.0)))),
    ("fitnet@layer2:blocks.1", MethodSpec((TermSpec("fitnet", layers="layer2:blocks.1"),))),
    (" KD ( T = 2 ) + hint @ blocks.1 * 1e+3", MethodSpec((TermSpec("kd", (("T", 2.0),)),
                                                           TermSpec("fitnet", layers="blocks.1", weight=1000.0)))),
    ("taid(schedule=linear, total_steps=10)", MethodSpec((TermSpec("taid", (("schedule", "linear"),
                                                                            ("total_steps", 10))),))),
    ("cka(debiased=false)+dkd(alpha=1,beta=4)", MethodSpec((TermSpec("cka", (("debiased", False),)),
                                                            TermSpec("dkd", (("alpha", 1.0), ("beta", 4.0)))))),
])
def test_parse_and_round_trip(text, expected):
    spec = parse_method(text)
    assert spec == expected
    assert parse_method(str(spec)) == spec  # the canonical spelling reads back as the same method


def test_canonical_spelling():
    assert str(parse_method("Attention@stages*10 + SP")) == "at@stages*10.0+sp"
    assert str(parse_method("kd(T=2)*0.5")) == "kd(T=2.0)*0.5"
    assert str(parse_method("cka(debiased=false)")) == "cka(debiased=false)"


@pytest.mark.parametrize("text, message", [
    ("kdd", "unknown term 'kdd'; did you mean 'kd' or 'rkd' or 'dkd'? the terms are ['kd', 'dkd'"),
    ("fitnett", "unknown term 'fitnett'; did you mean 'fitnet'?"),
    ("attn@stages", "did you mean 'at'?"),
    ("student+kd", "'student' is the student alone and stands by itself"),
    ("kd@blocks.1", "kd compares logits and takes no layers; drop '@blocks.1'"),
    ("kd(T=0)", "KD: T must be a finite number > 0, got 0.0"),
    ("kd(t=2)", "kd has no setting 't'; did you mean 'T'? its settings are ['T']"),
    ("dkd(betta=2)", "dkd has no setting 'betta'; did you mean 'beta'? its settings are ['alpha', 'beta', 'T']"),
    ("fitnet(projector=1)", "fitnet has no setting 'projector'; it has no settings"),
    ("kd(T=abc)", "kd(T=…) must be a number (default 4.0), got 'abc'"),
    ("kd(T=[1])", "kd(T=…) must be a number (default 4.0), got '[1]'"),
    ("rkd(angle_weight=true)", "must be a number"),
    ("taid(total_steps=1.5)", "taid(total_steps=…) must be an integer (default none), got '1.5'"),
    ("taid(schedule=cosine)", "TAID: schedule must be one of ('adaptive', 'linear'), got 'cosine'"),
    ("taid(alpha_start=0.9,alpha_end=0.5)", "TAID: need 0 ≤ alpha_start ≤ alpha_end ≤ 1"),
    ("cka(debiased=True)", "write cka(debiased=true) (JSON true/false), not 'True'"),
    ("kd(T)", "settings are key=value pairs, e.g. kd(T=2); got 'T'"),
    ("kd(T=2,T=3)", "kd sets 'T' twice"),
    ("kd(T=2", "'(' is not closed after kd"),
    ("kd*x", "the weight of kd must be a number ≥ 0 after '*', e.g. kd*0.5; got 'x'"),
    ("kd*-1", "got '-1'"),
    ("kd*", "got ''"),
    ("fitnet@", "fitnet@'' is not a layer rule: give stages / middle / last"),
    ("fitnet@a:b:c", "fitnet@'a:b:c' is not a layer rule"),
    ("kd+", "expected a term name at ''"),
    ("kd fitnet", "a space separates two names; join terms with '+', e.g. 'kd+fitnet'"),
    ("", "a method must be a non-empty string"),
])
def test_errors_say_what_to_write(text, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        parse_method(text)


def test_a_method_must_be_text():
    with pytest.raises(ValueError, match="a method must be a non-empty string such as 'kd'"):
        parse_method(["kd"])


def test_feature_layers_rule():
    assert [check_feature_layers(v) for v in ("auto", "stages", "middle", "last", "blocks.1", "a:b")] == [
        "auto", "stages", "middle", "last", "blocks.1", "a:b"]
    with pytest.raises(ValueError, match=re.escape("feature_layers: 'blocks.*' is not a layer rule")):
        check_feature_layers("blocks.*")
    with pytest.raises(ValueError, match="feature_layers must be a string"):
        check_feature_layers(3)


def test_the_distill_report_checks_feature_layers_before_anything_runs():
    from workbench import reports
    from workbench.reports import declarations
    from workbench.reports.values import ParameterError

    values = {name: spec["default"] for name, spec in reports.report_parameters("distill").items()}
    assert values["feature_layers"] == "auto"
    values["student_kwargs"] = {"widths": [4, 8]}  # a 2-stage student: the check builds it, untrained
    declarations.check_values("distill", {**values, "feature_layers": "blocks.1"}, models=True)
    with pytest.raises(ParameterError, match=re.escape("parameter feature_layers = 'a:b:c'")):
        declarations.check_values("distill", {**values, "feature_layers": "a:b:c"})
    with pytest.raises(ParameterError, match=r"feature_layers.*student side: .*no layer matching 'blocks\.2'"):
        declarations.check_values("distill", {**values, "feature_layers": "blocks.2"}, models=True)
    with pytest.raises(ParameterError, match=r"parameter methods.*term 'at@blocks.2', student side"):
        declarations.check_values("distill", {**values, "methods": ["kd", "at@blocks.2"]}, models=True)
