"""The tiny digits DDPM and its progressive distillation: the DDIM algebra against diffusers' own scheduler,
the student target's defining property, the schedule grid, caching by settings, and that a distillation
round makes the student's N/2 steps land where the teacher's N steps do."""
from __future__ import annotations

import json

import pytest
import torch

from workbench.train import diffusion, progressive
from workbench.train.diffusion import DiffusionConfig, NUM_TRAIN_TIMESTEPS, alphas, scheduler
from workbench.train.progressive import ddim_step, student_target

TINY = dict(widths=(8, 16), epochs=2, batch_size=64, distill_iterations=3, base_steps=8, student_steps=4)


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("KD_WORKBENCH_CACHE", str(tmp_path))
    return tmp_path


@pytest.mark.parametrize("timestep, steps", [(1023, 4), (767, 4), (255, 4), (63, 16), (991, 32)])
def test_ddim_step_is_diffusers_ddim_step(timestep, steps):
    sampler = scheduler()
    sampler.set_timesteps(steps)
    generator = torch.Generator().manual_seed(timestep)
    x, v = torch.randn(3, 1, 8, 8, generator=generator), torch.randn(3, 1, 8, 8, generator=generator)
    expected = sampler.step(v, timestep, x).prev_sample
    t = torch.tensor([timestep])
    ours = ddim_step(x, v, alphas(sampler, t), alphas(sampler, t - NUM_TRAIN_TIMESTEPS // steps))
    torch.testing.assert_close(ours, expected, atol=1e-5, rtol=1e-5)


def test_alphas_read_the_schedule_and_timestep_minus_one_is_the_clean_image():
    sampler = scheduler()
    alpha, sigma = alphas(sampler, torch.tensor([-1, 0, 500, 1023]))
    expected = torch.cat([torch.ones(1), sampler.alphas_cumprod[[0, 500, 1023]]])
    torch.testing.assert_close(alpha.flatten() ** 2, expected)
    torch.testing.assert_close(alpha.flatten() ** 2 + sigma.flatten() ** 2, torch.ones(4))


def test_the_student_target_is_the_clean_image_whose_one_step_lands_on_the_teacher_two_steps():
    sampler = scheduler()
    generator = torch.Generator().manual_seed(0)
    x_t = torch.randn(4, 1, 8, 8, generator=generator)
    x_s = torch.randn(4, 1, 8, 8, generator=generator)
    at, to = alphas(sampler, torch.full((4,), 767)), alphas(sampler, torch.full((4,), 255))
    target = student_target(x_t, x_s, at, to)
    v = (at[0] * x_t - target) / at[1]  # the v whose x̂0 = α·x − σ·v is the target
    torch.testing.assert_close(ddim_step(x_t, v, at, to), x_s, atol=1e-5, rtol=1e-5)
    last = student_target(x_t, x_s, at, alphas(sampler, torch.full((4,), -1)))  # the last step: x̃ is x_s
    torch.testing.assert_close(last, x_s)


@pytest.mark.parametrize("steps", [4, 8, 16, 32, 64])
def test_two_steps_of_n_are_one_step_of_n_over_two_on_the_trailing_grid(steps):
    fine, coarse = scheduler(), scheduler()
    fine.set_timesteps(steps)
    coarse.set_timesteps(steps // 2)
    assert fine.timesteps[::2].tolist() == coarse.timesteps.tolist()
    stride = NUM_TRAIN_TIMESTEPS // steps
    assert (fine.timesteps[:-1] - fine.timesteps[1:]).tolist() == [stride] * (steps - 1)
    assert fine.timesteps[-1].item() - stride == -1  # the last step lands on the clean image


@pytest.mark.parametrize("field, value, needle", [
    ("base_steps", 12, "power of two"), ("student_steps", 3, "power of two"), ("epochs", 0, "positive int"),
    ("widths", (12,), "multiples of 8"), ("guidance", 0.5, "guidance"), ("guidance", float("nan"), "finite scale"),
    ("ema", 1.0, "[0, 1)"), ("lr", float("nan"), "finite positive"),
])
def test_bad_settings_say_what_is_wrong(field, value, needle):
    with pytest.raises(ValueError, match=None) as error:
        DiffusionConfig(**{field: value})
    assert needle in str(error.value) and field in str(error.value)


def test_more_student_steps_than_base_steps_or_nothing_to_distil_is_refused(cache):
    with pytest.raises(ValueError, match="more than base_steps"):
        DiffusionConfig(base_steps=4, student_steps=8)
    with pytest.raises(ValueError, match="nothing to distil"):
        progressive.distilled_ddpm(**{**TINY, "base_steps": 4}, progress=False)


def test_the_base_is_cached_by_its_settings_and_read_back_without_training(cache, monkeypatch):
    model = diffusion.trained_ddpm(**TINY, progress=False)
    files = sorted(path.name for path in cache.iterdir())
    assert len(files) == 2 and files[0].startswith("ddpm_base-digits-")
    record = json.loads((cache / files[0]).read_text())
    assert record["kind"] == "base" and record["settings"]["epochs"] == 2 and len(record["losses"]) == 10
    monkeypatch.setattr(diffusion, "_train_base", lambda *a, **k: pytest.fail("trained again"))
    again = diffusion.trained_ddpm(**TINY, progress=False)
    for a, b in zip(model.state_dict().values(), again.state_dict().values()):
        assert torch.equal(a, b)
    # the distillation's settings are not the base's: another student reuses this base
    assert diffusion.entry_path("base", DiffusionConfig(**{**TINY, "guidance": 5.0}).base_settings()) == \
        diffusion.entry_path("base", DiffusionConfig(**TINY).base_settings())
    assert diffusion.entry_path("base", DiffusionConfig(**{**TINY, "epochs": 3}).base_settings()) != \
        diffusion.entry_path("base", DiffusionConfig(**TINY).base_settings())


def test_guided_and_unguided_students_are_separate_entries_with_their_rounds(cache):
    guided = progressive.distilled_ddpm(**TINY, progress=False)
    unguided = progressive.distilled_ddpm(**TINY, guided=False, progress=False)
    assert guided.diffusion_record.extra["guidance"] == 3.0 and unguided.diffusion_record.extra["guidance"] == 0.0
    assert [entry["steps"] for entry in guided.diffusion_record.extra["rounds"]] == [[8, 4]]
    names = sorted(path.name.split("-")[0] for path in cache.glob("*.safetensors"))
    assert names == ["ddpm_base", "ddpm_student_guided", "ddpm_student_unguided"]
    assert any(not torch.equal(a, b) for a, b in zip(guided.state_dict().values(), unguided.state_dict().values()))


def test_a_non_finite_loss_stops_the_run_and_caches_nothing(cache, monkeypatch):
    monkeypatch.setattr(diffusion, "digit_images", lambda split, size: (torch.full((8, 1, 8, 8), float("nan")),
                                                                         torch.zeros(8, dtype=torch.long)))
    with pytest.raises(FloatingPointError, match="step 1"):
        diffusion.trained_ddpm(**TINY, progress=False)
    assert not list(cache.iterdir())


def _ddim_samples(model, steps, x_T, labels):
    sampler = scheduler()
    sampler.set_timesteps(steps)
    x = x_T
    with torch.no_grad():
        for t in sampler.timesteps:
            x = sampler.step(model(x, t.expand(len(x)), class_labels=labels).sample, t, x).prev_sample
    return x


def test_a_distillation_round_brings_the_students_steps_to_where_the_teachers_land(cache):
    """An untrained teacher is still a fixed function: after one round the student's 4 DDIM steps end
    nearer the teacher's 8 steps than the teacher's own 4 steps do."""
    torch.manual_seed(0)
    config = DiffusionConfig(**{**TINY, "distill_iterations": 150, "distill_lr": 1e-3, "ema": 0.0, "batch_size": 128})
    teacher = diffusion.unet(config).eval()
    student, losses = progressive._distill_round(teacher, 8, 0.0, config, 0, torch.device("cpu"), False)
    assert sum(losses[-15:]) < 0.5 * sum(losses[:15])
    x_T = torch.randn(64, 1, 8, 8, generator=torch.Generator().manual_seed(1))
    labels = torch.arange(64) % 10
    reference = _ddim_samples(teacher, 8, x_T, labels)
    before = (_ddim_samples(teacher, 4, x_T, labels) - reference).pow(2).mean()
    after = (_ddim_samples(student.eval(), 4, x_T, labels) - reference).pow(2).mean()
    assert after < 0.5 * before, (float(before), float(after))


def test_classifier_input_and_digit_images_invert_each_other_onto_the_digits_normalisation():
    from workbench.data import digits

    images, labels = diffusion.digit_images("train")
    assert float(images.min()) == -1.0 and float(images.max()) == 1.0
    normalised, same_labels = digits("train", size=8).tensors
    torch.testing.assert_close(diffusion.classifier_input(8)(images), normalised, atol=1e-5, rtol=0)
    assert torch.equal(labels, same_labels)
