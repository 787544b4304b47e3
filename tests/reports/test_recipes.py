"""Training recipes per model family and the trained-model cache's training records.

Each default recipe must clearly beat chance on a small budget (a real training run, seconds per
family); ``trained`` records the held-out accuracy of every epoch beside the cached weights, passes
callbacks on, never caches an interrupted run, and ``trained("cnn")`` (the README) hits the file the
default gap report trains.
"""
from __future__ import annotations

import json

import pandas as pd
import pytest
import torch
from scipy.stats import binomtest
from torch.utils.data import Subset

from workbench import reports
from workbench.reports.sanity import near_chance
from workbench.train import Callback, accuracy, cache, default_recipe, fit, trained, training_record
from workbench.train.recipes import MEASURED_MODELS, RECIPES, recipe_family

SMALL_SIZE, SMALL_TRAIN, SMALL_TEST, SMALL_BATCH = 16, 640, 300, 32



@pytest.fixture(autouse=True)
def private_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("KD_WORKBENCH_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def _small_budget_accuracy(name: str, lr: float) -> float:
    """A fifth of the recipe's epochs (at least 3) at ``lr`` on 640 digits at 16 px (20 steps an epoch)."""
    recipe = default_recipe(name)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = cache._build(name, "digits", SMALL_SIZE, 1, {})
    train = Subset(cache.training_data("digits", SMALL_SIZE, 1), range(SMALL_TRAIN))
    test = Subset(cache.evaluation_split("digits", SMALL_SIZE, 1), range(SMALL_TEST))
    fit(model, train, epochs=max(3, recipe.epochs // 5), lr=lr, batch_size=SMALL_BATCH, seed=0, device="cpu",
        progress=False)
    return accuracy(model, test, device="cpu")


@pytest.mark.parametrize("name", MEASURED_MODELS)
def test_each_default_recipe_clearly_beats_chance_on_a_small_budget(name, one_thread):
    score = _small_budget_accuracy(name, default_recipe(name).lr)
    # clearly: out of the sanity box's near-chance zone (32.5 % for 10 classes) and p < 1e-6
    assert near_chance(score, SMALL_TEST, 10, name, "") is None, f"{name}: {score:.1%}"
    assert binomtest(round(score * SMALL_TEST), SMALL_TEST, 0.1, alternative="greater").pvalue < 1e-6


def test_the_small_budget_check_can_fail(one_thread):
    assert near_chance(_small_budget_accuracy("mlp", 1e-7), SMALL_TEST, 10, "mlp", "") is not None


def test_every_family_has_a_recipe_and_names_map_to_families():
    assert {recipe_family(name) for name in MEASURED_MODELS} | {"timm"} == set(RECIPES)
    assert recipe_family("bench_cnn") == "cnn" and recipe_family("deit_tiny_patch16_224") == "timm_vit"
    assert recipe_family("resnet10t") == "timm_resnet" and recipe_family("convnext_atto") == "timm"
    assert (default_recipe("cnn").epochs, default_recipe("cnn").lr) == (6, 5e-3)  # the distill results' teacher
    with pytest.raises(ValueError, match="unknown model name 'cnnn'"):
        default_recipe("cnnn")


def test_the_readme_snippet_and_the_default_gap_report_share_their_models():
    """`make report` (the gap report's defaults) trains the files `trained("cnn")` / `trained("cnn_small")` read."""
    defaults = {name: spec["default"] for name, spec in reports.report_parameters("gap").items()}
    for role in ("teacher", "student"):
        from_report = cache.trained_path(
            defaults[role], defaults["dataset"], epochs=defaults[f"{role}_epochs"], lr=defaults[f"{role}_lr"],
            seed=defaults["seed"], size=reports.notebook.IMAGE_SIZE, channels=reports.notebook.CHANNELS,
            **defaults[f"{role}_kwargs"],
        )
        assert from_report == cache.trained_path({"teacher": "cnn", "student": "cnn_small"}[role])


def _fake_fit(calls):
    """fit's stand-in: no training, a history with one held-out accuracy per epoch."""
    def fake(model, train, eval=None, epochs=1, **kwargs):
        calls.append({"epochs": epochs, **kwargs, "eval": eval})
        rows = [{"epoch": e, "step": e, "loss": 1.0, "lr": kwargs["lr"], "eval_accuracy": 0.1 * e}
                for e in range(1, epochs + 1)]
        return pd.DataFrame(rows)
    return fake


def test_report_model_trains_the_file_trained_reads(monkeypatch):
    calls = []
    monkeypatch.setattr(cache, "fit", _fake_fit(calls))
    defaults = {name: spec["default"] for name, spec in reports.report_parameters("gap").items()}
    reports.report_model(defaults["student"], defaults["dataset"], epochs=defaults["student_epochs"],
                         lr=defaults["student_lr"], seed=defaults["seed"], progress=False)
    assert [call["epochs"] for call in calls] == [default_recipe("cnn_small").epochs]
    monkeypatch.setattr(cache, "fit", lambda *args, **kwargs: pytest.fail("trained() retrained a cached model"))
    assert training_record(trained("cnn_small")).epochs == default_recipe("cnn_small").epochs


def test_the_record_holds_each_epochs_held_out_accuracy(private_cache, one_thread):
    model = trained("cnn_small", epochs=2, lr=5e-3, progress=False, widths=(4, 8))
    record = training_record(model)
    assert (record.epochs, record.lr, record.recipe, record.n_eval, record.num_classes) == (2, 5e-3, "custom", 450, 10)
    assert len(record.eval_accuracy) == 2
    # the last entry is the returned model's accuracy on the held-out split, measured independently here
    assert record.final_accuracy == pytest.approx(accuracy(model, cache.evaluation_split("digits", 32, 1), device="cpu"))
    (weights,) = private_cache.glob("*.safetensors")
    sidecar = cache.record_path(weights)
    assert json.loads(sidecar.read_text())["eval_accuracy"] == list(record.eval_accuracy)
    again = trained("cnn_small", epochs=2, lr=5e-3, progress=False, widths=(4, 8))
    assert training_record(again) == record
    assert training_record(torch.nn.Linear(2, 2)) is None


def test_an_entry_without_its_record_is_trained_again(monkeypatch, private_cache):
    calls = []
    monkeypatch.setattr(cache, "fit", _fake_fit(calls))
    trained("mlp", epochs=3, progress=False, hidden=(8,))
    (weights,) = private_cache.glob("*.safetensors")
    cache.record_path(weights).unlink()  # as left by the code before training records
    record = training_record(trained("mlp", epochs=3, progress=False, hidden=(8,)))
    assert len(calls) == 2 and record.eval_accuracy == pytest.approx((0.1, 0.2, 0.3))
    assert calls[0]["lr"] == default_recipe("mlp").lr and calls[0]["last_batch"] == cache.LAST_BATCH == "keep"
    assert len(calls[0]["eval"]) == 450  # scored on the digits test split


def test_callbacks_reach_fit_and_an_interrupted_run_is_not_cached(private_cache):
    class StopAtStep(Callback):
        def __init__(self):
            self.steps = 0

        def on_step_end(self, state):
            self.steps += 1
            if self.steps == 2:
                state.request_stop("stop button")

    stopper = StopAtStep()
    with pytest.raises(KeyboardInterrupt, match="interrupted at epoch 1, step 2 \\(stop button\\); nothing was cached"):
        trained("cnn_small", epochs=2, progress=False, callbacks=[stopper], widths=(4,))
    assert stopper.steps == 2
    assert not private_cache.exists() or not any(private_cache.iterdir())  # no weights, no record


@pytest.mark.parametrize("arguments, match", [
    ({"epochs": 0}, "epochs must be a positive int or None"),
    ({"epochs": 2.5}, "epochs must be a positive int or None"),
    ({"lr": -1.0}, "lr must be a finite positive number or None"),
    ({"lr": float("nan")}, "lr must be a finite positive number or None"),
])
def test_bad_budgets_are_refused(arguments, match):
    with pytest.raises(ValueError, match=match):
        trained("cnn_small", progress=False, **arguments)
