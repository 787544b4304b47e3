"""The reports' sanity flags against hand computations, the sanity box, and conclusions withheld."""
from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
import torch

from workbench import models
from workbench.reports import gap_summary
from workbench.reports.compare import Comparison
from workbench.reports.sanity import (
    CHANCE_MARGIN, RISING_POINTS, Flag, ModelCard, Sanity, larger_student, model_cards_table, near_chance,
    row_marks, still_rising, too_few_samples,
)
from workbench.similarity import CKAResult, PredictionResult


def _binomial_tail(k: int, n: int, p: float) -> float:
    """P(X ≥ k) for X ~ Binomial(n, p), summed by hand."""
    return sum(math.comb(n, i) * p**i * (1 - p) ** (n - i) for i in range(k, n + 1))


def test_near_chance_margin_and_binomial_test():
    # 10 classes: the margin is a quarter of the way from 10 % to 100 %
    assert 0.1 + CHANCE_MARGIN * 0.9 == pytest.approx(0.325)
    assert near_chance(0.32, 450, 10, "s", "").kind == "near_chance"
    assert near_chance(0.33, 450, 10, "s", "") is None
    # above the margin but on too few samples to beat chance: 2 of 4 right, 4 classes (chance 25 %)
    assert _binomial_tail(2, 4, 0.25) > 1e-3
    flag = near_chance(0.5, 4, 4, "s", "")
    assert flag is not None and f"p = {_binomial_tail(2, 4, 0.25):.2g}" in flag.problem
    # the same accuracy on 400 samples is far above chance
    assert _binomial_tail(200, 400, 0.25) < 1e-20 and near_chance(0.5, 400, 4, "s", "") is None
    with pytest.raises(ValueError, match="accuracy in \\[0, 1\\]"):
        near_chance(1.5, 10, 10, "s", "")


def test_still_rising_compares_the_end_with_the_best_before_the_last_quarter():
    # 8 epochs: the last quarter is 2 epochs; best before it 0.90, end 0.94 → 4 points > 3
    flag = still_rising([0.5, 0.7, 0.8, 0.85, 0.88, 0.90, 0.92, 0.94], "student", "Train longer.")
    assert flag.kind == "still_rising" and "4.0 points over the last 2 of 8 epochs (90.0 % → 94.0 %)" in flag.problem
    assert still_rising([0.5, 0.7, 0.8, 0.85, 0.88, 0.92, 0.92, 0.94], "s", "") is None  # 2 points
    # a dip before the end is not a rise: the best earlier epoch counts
    assert still_rising([0.2, 0.95, 0.9, 0.96], "s", "") is None
    assert RISING_POINTS == 3.0
    assert still_rising([0.3], "s", "").problem.startswith("trained a single epoch")
    with pytest.raises(ValueError, match="at least one epoch"):
        still_rising([], "s", "")


def test_measured_recipe_runs_pass_and_a_short_run_is_flagged():
    # held-out accuracy per epoch of trained("cnn") (6 epochs, docs/recipes.md) and of cnn_small after 6 epochs
    cnn = [0.2267, 0.5756, 0.9689, 0.9644, 0.9911, 0.9867]
    cnn_small_6 = [0.1978, 0.1689, 0.3378, 0.6844, 0.8978, 0.9022]
    assert still_rising(cnn, "teacher", "") is None
    assert still_rising(cnn_small_6, "student", "") is not None


def test_too_few_cka_samples_and_larger_student():
    assert too_few_samples(450, "linear", True, "") is None
    assert "use at least 50 samples" in too_few_samples(5, "linear", True, "More.").problem
    assert too_few_samples(450, "linear", False, "").kind == "few_samples"  # the biased estimator needs 4,608
    teacher, student = models.create("cnn_small"), models.create("cnn")
    flag = larger_student(models.count_parameters(teacher), models.count_parameters(student), "Swap them.")
    assert f"{models.count_parameters(student):,} parameters" in flag.problem
    assert larger_student(10, 10, "") is None
    # a warning: shown, but the measurements stand, so nothing is withheld
    box = Sanity([flag], passed=["student converged"]).to_markdown()
    assert not flag.withholds and Sanity([flag]).blocking == []
    assert box.startswith("**Sanity checks: passed, with 1 warning.** student converged.")
    assert "- **student larger than teacher** (warning): the student has" in box
    rising = still_rising([0.3], "student", "")
    assert Sanity([flag, rising]).blocking == [rising]
    assert Sanity([flag, rising]).to_markdown().startswith("**Sanity checks: 1 problem — the conclusions below")


def test_the_box_lists_flags_with_advice_then_the_models():
    flag = still_rising([0.3], "student `vit`", "Train longer: -p student_epochs=30.")
    card = ModelCard("student", "vit", 206_026, 25_691_392, 0.141, "1 epoch")
    box = Sanity([flag], [card]).to_markdown()
    assert box.splitlines()[0] == "**Sanity checks: 1 problem — the conclusions below are withheld until it is fixed.**"
    assert "- **student `vit`**: trained a single epoch: nothing tells whether it converged. Train longer: " \
           "-p student_epochs=30." in box
    assert "| student | `vit` | 206,026 | 25.69 M | 14.1 % | 1 epoch |" in box
    passed = Sanity(passed=["teacher above chance", "CKA on 450 samples"]).to_markdown()
    assert passed == "**Sanity checks: passed.** teacher above chance; CKA on 450 samples."
    assert "| — |" in model_cards_table([ModelCard("teacher", "x", 1, 999, None, "loaded")])


def _gap_inputs():
    cka = CKAResult(np.array([[0.9, 0.2], [0.3, 0.8]]), ["t1", "t2"], ["s1", "s2"], n_samples=64)
    predictions = PredictionResult(np.array([[30, 2], [2, 30]]), agreement=60 / 64, kl=0.1, temperature=1.0,
                                   n_samples=64, teacher_accuracy=0.95, student_accuracy=0.9)
    return cka, predictions


def test_gap_summary_withholds_the_layer_conclusions_while_a_flag_stands():
    cka, predictions = _gap_inputs()
    sound = gap_summary(cka, predictions, "cnn", "vit")
    assert "The matches keep the layer order" in sound and "first candidate for a feature-distillation term" in sound
    flagged = gap_summary(cka, predictions, "cnn", "vit", flags=[still_rising([0.3], "student `vit`", "")])
    assert "The matches keep" not in flagged and "first candidate" not in flagged
    assert "Unreliable while the sanity checks above flag a problem" in flagged
    assert "agrees with the teacher's top-1 class on 93.8%" in flagged  # the facts stay


def _comparison(seeds):
    rows, histories = [], {}
    for method in ("student", "kd"):
        for seed in seeds:
            curve = [0.3, 0.5, 0.6, 0.7] if method == "kd" else [0.3, 0.8, 0.85, 0.86]
            rows.append({"method": method, "seed": seed, "accuracy": curve[-1] + 0.01 * seed, "matched_cka": 0.5,
                         "seconds": 1.0})
            histories[(method, seed)] = pd.DataFrame({"epoch": [1, 2, 3, 4], "step": [1, 2, 3, 4],
                                                      "loss": [1.0] * 4, "eval_accuracy": curve})
    return Comparison(pd.DataFrame(rows), histories, teacher_accuracy=0.98, settings={"epochs": 4})


def test_one_seed_has_no_spread():
    text = _comparison([0]).to_markdown()
    assert "| student | 86.00 ± n/a |" in text and "± 0.00" not in text
    assert "| student | 86.50 ± 0.71 |" in _comparison([0, 1]).to_markdown()  # std([86, 87], ddof=1)
    assert np.isnan(_comparison([0]).table().loc["student", "accuracy_std"])


def test_flagged_methods_are_marked_and_not_ranked():
    comparison = _comparison([0])
    curves = comparison.curves()
    flags = [still_rising(curves[curves["method"] == m]["eval_accuracy"].tolist(), f"method `{m}`", "")
             for m in comparison.methods]
    flags = [flag for flag in flags if flag is not None]
    assert [flag.subject for flag in flags] == ["method `kd`"]  # 0.60 → 0.70 over the last epoch
    assert row_marks(flags) == {"kd": ["not converged"]}
    text = comparison.to_markdown(flags)
    assert text.startswith("**Not conclusive") and "| kd (*not converged*) | 70.00 ± n/a | -16.00 |" in text
    assert "| student | 86.00 ± n/a |" in text
    assert not comparison.to_markdown().startswith("**Not conclusive")


def test_row_marks_skip_other_flags():
    flags = [Flag("few_samples", "CKA", "", ""), Flag("near_chance", "teacher `cnn`", "", ""),
             Flag("still_rising", "teacher `cnn`", "", ""), Flag("near_chance", "teacher `cnn`", "", "")]
    assert row_marks(flags) == {"teacher": ["not converged", "near chance"]}


def test_model_stats_in_cards_match_the_counters():
    model = models.create("cnn_small")
    example = torch.zeros(1, 1, 32, 32)
    card = ModelCard("student", "cnn_small", models.count_parameters(model), models.count_flops(model, example), 0.9, "")
    assert "| student | `cnn_small` | 6,274 | 1.33 M | 90.0 % |" in model_cards_table([card])


def test_distill_teacher_still_rising_is_a_warning_but_a_method_withholds():
    from workbench.reports.sanity import distill_sanity
    from workbench.train import TrainingRecord
    from workbench.reports import evaluation_data

    comparison = _comparison([0])  # kd: 0.60 → 0.70 in its last epoch
    teacher, student = models.create("cnn", widths=(8, 16)), models.create("cnn", widths=(4, 8))
    # a record rising 3.3 points over its last 2 of 6 epochs (trained("cnn", "animals") with its tail merged)
    teacher.training_record = TrainingRecord("cnn", "digits", 6, 5e-3, (0.717, 0.842, 0.906, 0.932, 0.966, 0.965),
                                             450, 10, "cnn")
    comparison.settings.update(lr=0.01, train_samples=300)
    sanity = distill_sanity(comparison, "cnn", "cnn", teacher, student, evaluation_data("digits"), "digits")
    assert [(f.subject, f.withholds) for f in sanity.flags] == [("teacher `cnn`", False), ("method `kd`", True)]
    assert "96.5 %" in sanity.flags[0].problem and "-p teacher_epochs=16" in sanity.flags[0].advice
    assert [f.subject for f in sanity.blocking] == ["method `kd`"]



def test_distill_larger_student_advice_names_the_reports_own_parameters():
    from workbench.reports import evaluation_data
    from workbench.reports.sanity import distill_sanity

    comparison = _comparison([0])
    comparison.settings.update(lr=0.01, train_samples=300)
    small, large = models.create("cnn", widths=(4, 8)), models.create("cnn", widths=(8, 16))
    default = distill_sanity(comparison, "cnn", "cnn", small, large, evaluation_data("digits"), "digits")
    advice = {f.subject: f.advice for f in default.flags}
    assert advice["student larger than teacher"] == "Choose a smaller student (-p student=... -p student_kwargs=...)."
    ofa = distill_sanity(comparison, "cnn", "cnn", small, large, evaluation_data("digits"), "digits",
                         smaller_student="Change the pair.")
    assert {f.subject: f.advice for f in ofa.flags}["student larger than teacher"] == "Change the pair."
    assert not any(f.kind == "student_larger" for f in distill_sanity(
        comparison, "cnn", "cnn", large, small, evaluation_data("digits"), "digits").flags)
