"""DTViewer without a browser: the step each variant shows is its step nearest to the slider's fraction
(counted here by hand), the images are the chosen seed's x_T, x̂0 at that step and final sample (rescaled by
hand), the commitment curves are the mean distances to the final sample computed here, the toggles and the
seed picker redraw, and bad input is refused with a clear error. One viewer runs on real base / distilled /
hybrid trajectories of tiny UNets."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from widgets import DTViewer
from workbench.probes.dt import DTTrajectory, hybrid, trajectory

diffusers = pytest.importorskip("diffusers")
pytestmark = pytest.mark.usefixtures("one_thread")

SAMPLES = 3


def fake_run(steps: int, seed: int, channels: int = 1) -> DTTrajectory:
    rng = np.random.default_rng(seed)
    x_t = rng.uniform(-1.5, 1.5, (steps, SAMPLES, channels, 4, 4))
    x0 = rng.uniform(-1.5, 1.5, (steps, SAMPLES, channels, 4, 4))
    return DTTrajectory(np.linspace(999, 0, steps).round(), x_t, x0, x0[-1], ["s"] * steps,
                        ["base"] * (steps // 2) + ["student"] * (steps - steps // 2), labels=[7, 3, 1],
                        variant=f"run {steps}")


@pytest.fixture
def runs():
    return {"base": fake_run(32, 0), "distilled": fake_run(4, 1), "hybrid": fake_run(5, 2)}


def by_hand_step(steps: int, fraction: float) -> int:
    """The step whose fraction k / (steps − 1) is nearest; the earlier one on a tie."""
    distances = np.abs(np.arange(steps) / (steps - 1) - fraction)
    return int(np.flatnonzero(distances <= distances.min() + 1e-12)[0])


def shown_image(image: np.ndarray) -> np.ndarray:
    return np.clip((image[0] + 1) / 2, 0, 1)  # one channel: [-1, 1] -> [0, 1]


def test_every_variant_shows_its_step_nearest_to_the_sliders_fraction(runs):
    viewer = DTViewer(runs)
    assert viewer.step.max == 31
    for value in range(32):
        viewer.step.value = value
        fraction = value / 31
        assert viewer.fraction == pytest.approx(fraction)
        assert viewer.steps() == {name: by_hand_step(run.steps, fraction) for name, run in runs.items()}
    viewer.step.value = 31
    assert viewer.steps() == {"base": 31, "distilled": 3, "hybrid": 4}


def test_the_images_are_the_chosen_seeds_x_t_x0_and_final(runs):
    viewer = DTViewer(runs, sample=1, step=10)
    steps = viewer.steps()
    assert len(viewer.images.data) == 3 * len(runs)
    for row, (name, run) in enumerate(runs.items()):
        expected = [run.x_t[0, 1], run.x0_hat[steps[name], 1], run.final[1]]
        for column, image in enumerate(expected):
            trace = viewer.images.data[3 * row + column]
            assert np.allclose(np.asarray(trace.z, dtype=float), shown_image(image))
            assert trace.zmin == 0 and trace.zmax == 1
        title = viewer.images.layout.annotations[3 * row + 1].text
        assert title.startswith(f"x̂0 step {steps[name]} of {run.steps}<br>t={run.timesteps[steps[name]]:g}")
    assert [viewer.images.layout[f"yaxis{3 * row + 1 if row else ''}"].title.text for row in range(3)] == list(runs)

    viewer.seed.value = 2
    assert np.allclose(np.asarray(viewer.images.data[2].z, dtype=float), shown_image(runs["base"].final[2]))
    assert viewer.seed.options[0] == ("seed 0 · class 7", 0)


def test_the_commitment_curves_are_the_mean_distances_to_the_final_sample(runs):
    viewer = DTViewer(runs)
    assert [trace.name for trace in viewer.commitment.data] == list(runs)
    for trace, run in zip(viewer.commitment.data, runs.values()):
        distances = [np.mean([np.sqrt(((run.x0_hat[k, i] - run.final[i]) ** 2).sum()) for i in range(SAMPLES)])
                     for k in range(run.steps)]
        assert np.allclose(trace.y, distances, rtol=1e-12)
        assert np.allclose(trace.x, np.arange(run.steps) / (run.steps - 1))
    viewer.step.value = 20
    assert viewer.commitment.layout.shapes[0].x0 == pytest.approx(20 / 31)


def test_the_toggles_choose_the_variants_shown(runs):
    viewer = DTViewer(runs)
    viewer.toggles["base"].value = False
    assert viewer.shown() == ["distilled", "hybrid"] and len(viewer.images.data) == 6
    assert [trace.name for trace in viewer.commitment.data] == ["distilled", "hybrid"]
    assert "<b>base</b>" not in viewer.status.value and "<b>distilled</b> step 0 of 4" in viewer.status.value
    for name in ("distilled", "hybrid"):
        viewer.toggles[name].value = False
    assert viewer.shown() == [] and len(viewer.images.data) == 0 and "no variant shown" in viewer.status.value
    viewer.toggles["hybrid"].value = True
    assert len(viewer.images.data) == 3


def test_colour_runs_show_as_rgb_images():
    run = fake_run(3, 0, channels=3)
    viewer = DTViewer({"rgb": run})
    trace = viewer.images.data[1]
    assert trace.type == "image"
    expected = np.round(np.clip((np.moveaxis(run.x0_hat[0, 0], 0, -1) + 1) / 2, 0, 1) * 255)
    assert np.array_equal(np.asarray(trace.z), expected.astype(np.uint8))


@pytest.mark.parametrize("make, message", [
    (lambda runs: {}, "trajectories is empty"),
    (lambda runs: {"base": runs["base"], "other": "a string"}, "is a str, not a DTTrajectory"),
    (lambda runs: {"base": runs["base"], "short": DTTrajectory(
        np.ones(2), np.zeros((2, 2, 1, 4, 4)), np.zeros((2, 2, 1, 4, 4)), np.zeros((2, 1, 4, 4)), ["s"] * 2,
        ["m"] * 2)}, r"different numbers of samples \(base 3, short 2\)"),
])
def test_bad_trajectories_are_refused(runs, make, message):
    with pytest.raises((ValueError, TypeError), match=message):
        DTViewer(make(runs))


def test_a_seed_or_step_that_does_not_exist_is_refused(runs):
    with pytest.raises(ValueError, match=r"sample 3 does not exist: the runs hold samples 0 … 2"):
        DTViewer(runs, sample=3)
    with pytest.raises(ValueError, match=r"step 32 does not exist: the longest run has steps 0 … 31"):
        DTViewer(runs, step=32)


def test_real_base_distilled_and_hybrid_runs():
    torch.manual_seed(0)
    models = [diffusers.UNet2DModel(sample_size=8, in_channels=1, out_channels=1, block_out_channels=(8, 16),
                                    layers_per_block=1, norm_num_groups=8, down_block_types=("DownBlock2D",) * 2,
                                    up_block_types=("UpBlock2D",) * 2).eval() for _ in range(2)]
    shape = (SAMPLES, 1, 8, 8)
    runs = {"base": trajectory(models[0], diffusers.DDIMScheduler(), num_inference_steps=8, shape=shape, seed=3),
            "distilled": trajectory(models[1], diffusers.DDIMScheduler(), num_inference_steps=2, shape=shape, seed=3),
            "hybrid": hybrid(models[0], models[1], switch_after=1, base_scheduler=diffusers.DDIMScheduler(),
                             distilled_scheduler=diffusers.DDIMScheduler(), num_base_steps=8,
                             num_distilled_steps=2, shape=shape, seed=3)}
    viewer = DTViewer(runs)
    viewer.step.value = 7
    assert viewer.steps() == {"base": 7, "distilled": 1, "hybrid": runs["hybrid"].steps - 1}
    final = np.asarray(viewer.images.data[5].z, dtype=float)  # the distilled row's final sample
    assert np.allclose(final, shown_image(runs["distilled"].final[0]))
    assert "(t=" in viewer.status.value and len(viewer.commitment.data) == 3
