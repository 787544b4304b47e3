"""Diffusion Target visualization: x̂0 per parameterisation against the schedulers' own, recording leaves
the samples alone, the hybrid's ends are the plain runs, pipelines record the same, and the metrics by hand."""
from __future__ import annotations

import inspect
import json
import math

import matplotlib
import numpy as np
import plotly.graph_objects as go
import pytest
import torch

from workbench.probes.dt import (
    SCHEDULERS, DTTrajectory, decode, first_step_diversity, frechet_distance, hybrid, pairwise_cosine_distance,
    pairwise_distance, predicted_x0, sample_space, trajectory,
)

diffusers = pytest.importorskip("diffusers")
pytestmark = pytest.mark.usefixtures("one_thread")

SHAPE = (3, 1, 8, 8)


def tiny_unet(seed: int = 0, **config) -> torch.nn.Module:
    """An untrained 1-channel 8×8 UNet2DModel (about 40k parameters)."""
    torch.manual_seed(seed)
    return diffusers.UNet2DModel(
        sample_size=8, in_channels=1, out_channels=1, block_out_channels=(8, 16), layers_per_block=1,
        norm_num_groups=8, down_block_types=("DownBlock2D",) * 2, up_block_types=("UpBlock2D",) * 2, **config,
    ).eval()


@pytest.fixture(scope="module")
def unet():
    return tiny_unet(0)


def plain_loop(model, scheduler, steps: int, seed: int = 0, shape=SHAPE) -> torch.Tensor:
    """The standard sampling loop, written out with no recording."""
    generator = torch.Generator().manual_seed(seed)
    scheduler.set_timesteps(steps)
    sample = torch.randn(shape, generator=generator) * scheduler.init_noise_sigma
    with torch.no_grad():
        for timestep in scheduler.timesteps:
            output = model(scheduler.scale_model_input(sample, timestep), timestep).sample
            sample = scheduler.step(output, timestep, sample, **noise_from(scheduler, generator)).prev_sample
    return sample


def noise_from(scheduler, generator: torch.Generator) -> dict:
    """The generator for a scheduler step that draws noise (LMS's step takes none)."""
    return {"generator": generator} if "generator" in inspect.signature(scheduler.step).parameters else {}


WITH_ORIGINAL = [
    ("DDPMScheduler", {"clip_sample": False}),
    ("DDIMScheduler", {"clip_sample": False}),
    ("EulerDiscreteScheduler", {}),
    ("EulerAncestralDiscreteScheduler", {}),
    ("LMSDiscreteScheduler", {}),
]


@pytest.mark.parametrize("prediction", ["epsilon", "v_prediction", "sample"])
@pytest.mark.parametrize("name, config", WITH_ORIGINAL, ids=[name for name, _ in WITH_ORIGINAL])
def test_computed_x0_equals_the_schedulers_pred_original_sample(unet, name, config, prediction):
    scheduler = getattr(diffusers, name)(prediction_type=prediction, **config)
    if prediction not in SCHEDULERS[name][1]:  # Euler ancestral's step raises for "sample": so does DT, up front
        with pytest.raises(ValueError, match=f"{name} with prediction_type='{prediction}'"):
            trajectory(unet, scheduler, num_inference_steps=2)
        return
    generator = torch.Generator().manual_seed(1)
    scheduler.set_timesteps(4)
    sample = torch.randn(SHAPE, generator=generator) * scheduler.init_noise_sigma
    with torch.no_grad():
        for index, timestep in enumerate(scheduler.timesteps):
            output = unet(scheduler.scale_model_input(sample, timestep), timestep).sample
            mine = predicted_x0(scheduler, sample, output, timestep=timestep, step_index=index)
            step = scheduler.step(output, timestep, sample, **noise_from(scheduler, generator))
            torch.testing.assert_close(mine, step.pred_original_sample.double(), atol=1e-5, rtol=1e-5)
            sample = step.prev_sample
    recorded = trajectory(unet, getattr(diffusers, name)(prediction_type=prediction, **config), num_inference_steps=2)
    assert recorded.x0_sources == ["pred_original_sample"] * 2


def test_last_x0_of_deterministic_ddim_is_the_final_sample(unet):
    """DDIM (eta 0, set_alpha_to_one) steps to ᾱ_prev = 1 at the end: x_prev = √1·x̂0 + √0·ε̂ = x̂0."""
    result = trajectory(unet, diffusers.DDIMScheduler(clip_sample=False), num_inference_steps=4, shape=SHAPE)
    np.testing.assert_allclose(result.x0_hat[-1], result.final, atol=1e-6)
    assert result.commitment()["distance"].iloc[-1] < 1e-5
    assert result.commitment()["distance"].iloc[0] > 0.1


def alpha_bar(scheduler, timestep: float) -> float:
    return float(scheduler.alphas_cumprod[int(timestep)])


COMPUTED = ["DPMSolverMultistepScheduler", "UniPCMultistepScheduler", "DEISMultistepScheduler", "PNDMScheduler"]


@pytest.mark.parametrize("name", COMPUTED)
def test_solvers_without_pred_original_sample_get_the_epsilon_formula(unet, name):
    scheduler = getattr(diffusers, name)()
    result = trajectory(unet, scheduler, num_inference_steps=4, shape=SHAPE, seed=2)
    assert set(result.x0_sources) == {"computed (epsilon)"}
    with torch.no_grad():
        for k, timestep in enumerate(result.timesteps):
            x = torch.from_numpy(result.x_t[k])
            epsilon = unet(x.float(), torch.tensor(timestep)).sample.double()
            bar = alpha_bar(scheduler, timestep)
            by_hand = (x - math.sqrt(1 - bar) * epsilon) / math.sqrt(bar)
            np.testing.assert_allclose(result.x0_hat[k], by_hand.numpy(), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name", ["DPMSolverMultistepScheduler", "UniPCMultistepScheduler"])
def test_karras_sigmas_give_the_solvers_own_x0(unet, name):
    """With Karras sigmas the timesteps are rounded, so ᾱ[t] is not the step's noise level: σ[step] is.
    The reference is the solver's own x0 (``convert_model_output``, which reads the step it is at)."""
    result = trajectory(unet, getattr(diffusers, name)(use_karras_sigmas=True), num_inference_steps=4, shape=SHAPE)
    scheduler = getattr(diffusers, name)(use_karras_sigmas=True)
    scheduler.set_timesteps(4)
    sample = torch.randn(SHAPE, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        for index, timestep in enumerate(scheduler.timesteps):
            output = unet(sample, timestep).sample
            if index > 0:  # the step index is set by the first step
                reference = scheduler.convert_model_output(output, sample=sample)
                np.testing.assert_allclose(result.x0_hat[index], reference.double().numpy(), atol=1e-5, rtol=1e-5)
            sample = scheduler.step(output, timestep, sample).prev_sample


def test_dpm_solver_v_prediction_formula(unet):
    scheduler = diffusers.DPMSolverMultistepScheduler(prediction_type="v_prediction")
    result = trajectory(unet, scheduler, num_inference_steps=3, shape=SHAPE)
    with torch.no_grad():
        x = torch.from_numpy(result.x_t[1])
        v = unet(x.float(), torch.tensor(result.timesteps[1])).sample.double()
    bar = alpha_bar(scheduler, result.timesteps[1])
    by_hand = math.sqrt(bar) * x - math.sqrt(1 - bar) * v
    np.testing.assert_allclose(result.x0_hat[1], by_hand.numpy(), atol=1e-5, rtol=1e-5)


def test_flow_matching_euler_gets_x_minus_sigma_v(unet):
    scheduler = diffusers.FlowMatchEulerDiscreteScheduler()
    result = trajectory(unet, scheduler, num_inference_steps=4, shape=SHAPE)
    assert set(result.x0_sources) == {"computed (flow_prediction)"}
    assert sample_space(scheduler) == "flow"
    with torch.no_grad():
        for k, timestep in enumerate(result.timesteps):
            x = torch.from_numpy(result.x_t[k])
            v = unet(x.float(), torch.tensor(timestep, dtype=torch.float32)).sample.double()
            sigma = timestep / 1000  # shift 1: timesteps are σ · num_train_timesteps
            np.testing.assert_allclose(result.x0_hat[k], (x - sigma * v).numpy(), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name", ["DDPMScheduler", "EulerAncestralDiscreteScheduler", "DPMSolverMultistepScheduler"])
def test_recording_does_not_change_the_samples(unet, name):
    recorded = trajectory(unet, getattr(diffusers, name)(), num_inference_steps=4, shape=SHAPE, seed=5)
    plain = plain_loop(unet, getattr(diffusers, name)(), 4, seed=5)
    assert torch.equal(torch.from_numpy(recorded.final), plain.double())
    assert recorded.network_evaluations == 4


def test_classifier_free_guidance_mixes_cond_and_uncond():
    model = tiny_unet(3, num_class_embeds=4)
    labels, null, scale = [0, 1, 2], 3, 2.5
    result = trajectory(model, diffusers.DDIMScheduler(clip_sample=False), num_inference_steps=3,
                        class_labels=labels, guidance_scale=scale, null_class=null)
    assert result.network_evaluations == 6 and result.labels == labels
    scheduler = diffusers.DDIMScheduler(clip_sample=False)
    scheduler.set_timesteps(3)
    sample = torch.randn(SHAPE, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        for timestep in scheduler.timesteps:
            cond = model(sample, timestep, class_labels=torch.tensor(labels)).sample
            uncond = model(sample, timestep, class_labels=torch.full((3,), null)).sample
            sample = scheduler.step(uncond + scale * (cond - uncond), timestep, sample).prev_sample
    # DT runs cond and uncond as one batch of 6: float32 rounding differs from two calls, by ~1e-6 relative
    np.testing.assert_allclose(result.final, sample.double().numpy(), rtol=1e-4, atol=1e-4)


def two_models():
    return tiny_unet(0), tiny_unet(1)


def test_hybrid_ends_are_the_plain_runs():
    base, distilled = two_models()
    schedulers = lambda: {"base_scheduler": diffusers.DDPMScheduler(),  # noqa: E731
                          "distilled_scheduler": diffusers.DDPMScheduler()}
    settings = {"num_base_steps": 6, "num_distilled_steps": 2, "shape": SHAPE, "seed": 4}
    alone_base = trajectory(base, diffusers.DDPMScheduler(), num_inference_steps=6, shape=SHAPE, seed=4)
    alone_distilled = trajectory(distilled, diffusers.DDPMScheduler(), num_inference_steps=2, shape=SHAPE, seed=4)
    none_base = hybrid(base, distilled, switch_after=0, **schedulers(), **settings)
    all_base = hybrid(base, distilled, switch_after=6, **schedulers(), **settings)
    for mixed, alone in ((none_base, alone_distilled), (all_base, alone_base)):
        assert np.array_equal(mixed.final, alone.final) and np.array_equal(mixed.x0_hat, alone.x0_hat)
        assert mixed.timesteps.tolist() == alone.timesteps.tolist()
    assert set(none_base.models) == {"distilled"} and set(all_base.models) == {"base"}


def test_hybrid_continues_from_the_first_distilled_timestep_at_or_below_the_base():
    base, distilled = two_models()
    # DDIM leading spacing: base 6 steps [830, 664, 498, 332, 166, 0], distilled 2 steps [500, 0]
    result = hybrid(base, distilled, base_scheduler=diffusers.DDIMScheduler(),
                    distilled_scheduler=diffusers.DDIMScheduler(), switch_after=1, num_base_steps=6,
                    num_distilled_steps=2, shape=SHAPE)
    assert result.timesteps.tolist() == [830, 500, 0]
    assert result.models == ["base", "distilled", "distilled"]
    assert not np.array_equal(result.x_t[1], result.x_t[0])  # x_664 from the base, passed on as is


def test_hybrid_refuses_what_it_cannot_join():
    base, distilled = two_models()
    settings = {"num_base_steps": 6, "num_distilled_steps": 2, "shape": SHAPE}
    with pytest.raises(ValueError, match="variance-preserving.*sigma-scaled"):
        hybrid(base, distilled, base_scheduler=diffusers.DDIMScheduler(),
               distilled_scheduler=diffusers.EulerDiscreteScheduler(), switch_after=1, **settings)
    with pytest.raises(ValueError, match="below every distilled timestep"):
        hybrid(base, distilled, base_scheduler=diffusers.DDIMScheduler(),
               distilled_scheduler=diffusers.DDIMScheduler(timestep_spacing="trailing"), switch_after=4, **settings)
    with pytest.raises(ValueError, match="switch_after=7"):
        hybrid(base, distilled, base_scheduler=diffusers.DDIMScheduler(),
               distilled_scheduler=diffusers.DDIMScheduler(), switch_after=7, **settings)
    one = diffusers.DDIMScheduler()
    with pytest.raises(ValueError, match="one object"):
        hybrid(base, distilled, base_scheduler=one, distilled_scheduler=one, switch_after=1, **settings)
    with pytest.raises(ValueError, match="num_train_timesteps"):
        hybrid(base, distilled, base_scheduler=diffusers.DDIMScheduler(),
               distilled_scheduler=diffusers.DDIMScheduler(num_train_timesteps=500), switch_after=1, **settings)


@pytest.mark.parametrize("pipeline_class", ["DDPMPipeline", "DDIMPipeline"])
def test_a_pipeline_records_what_the_model_and_scheduler_path_records(unet, pipeline_class):
    scheduler = diffusers.DDIMScheduler(clip_sample=False) if pipeline_class == "DDIMPipeline" \
        else diffusers.DDPMScheduler(clip_sample=False)
    pipeline = getattr(diffusers, pipeline_class)(unet=unet, scheduler=scheduler)
    through_pipeline = trajectory(pipeline, num_inference_steps=3, seed=7, pipeline_kwargs={"batch_size": 3})
    direct = trajectory(unet, type(scheduler)(clip_sample=False), num_inference_steps=3, shape=SHAPE, seed=7)
    np.testing.assert_allclose(through_pipeline.x0_hat, direct.x0_hat, atol=1e-6)
    np.testing.assert_allclose(through_pipeline.final, direct.final, atol=1e-6)
    assert through_pipeline.network_evaluations == 3
    assert "step" not in vars(pipeline.scheduler)  # the recorder is gone


def test_the_pipeline_recorder_is_removed_on_errors(unet):
    pipeline = diffusers.DDIMPipeline(unet=unet, scheduler=diffusers.DDIMScheduler())
    with pytest.raises(TypeError):
        trajectory(pipeline, num_inference_steps=2, pipeline_kwargs={"no_such_argument": 1})
    assert "step" not in vars(pipeline.scheduler)
    assert not unet._forward_pre_hooks


def test_a_class_conditional_transformer_records():
    torch.manual_seed(0)
    dit = diffusers.DiTTransformer2DModel(num_attention_heads=2, attention_head_dim=8, in_channels=1,
                                          out_channels=1, num_layers=1, sample_size=8, patch_size=2,
                                          num_embeds_ada_norm=4, norm_num_groups=1)
    result = trajectory(dit, diffusers.DDIMScheduler(clip_sample=False), num_inference_steps=3,
                        class_labels=[0, 1, 2], guidance_scale=2.0, null_class=3)
    assert result.x0_hat.shape == (3, 3, 1, 8, 8) and result.network_evaluations == 6
    with pytest.raises(ValueError, match="class label 4 is out of range: the model has 4"):
        trajectory(dit, diffusers.DDIMScheduler(), num_inference_steps=1, class_labels=[4])


def tiny_text_to_image(tmp_path):
    """A latent text-to-image pipeline from configs: UNet2DConditionModel, AutoencoderKL, a CLIP text encoder
    and a CLIP tokenizer over a hand-written five-word vocabulary (no downloads)."""
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    torch.manual_seed(0)
    unet = diffusers.UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, block_out_channels=(8, 16), layers_per_block=1,
        norm_num_groups=8, down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=16, attention_head_dim=2,
    )
    vae = diffusers.AutoencoderKL(block_out_channels=(8,), layers_per_block=1, norm_num_groups=8, latent_channels=4)
    text = CLIPTextModel(CLIPTextConfig(vocab_size=8, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                        num_attention_heads=2, max_position_embeddings=8, bos_token_id=0,
                                        eos_token_id=1, pad_token_id=1))
    words = ["<|startoftext|>", "<|endoftext|>", "a</w>", "b</w>", "c</w>", "a", "b", "c"]
    (tmp_path / "vocab.json").write_text(json.dumps({word: index for index, word in enumerate(words)}))
    (tmp_path / "merges.txt").write_text("#version: 0.2\n")
    tokenizer = CLIPTokenizer(str(tmp_path / "vocab.json"), str(tmp_path / "merges.txt"), model_max_length=8)
    return diffusers.StableDiffusionPipeline(
        vae=vae, text_encoder=text, tokenizer=tokenizer, unet=unet,
        scheduler=diffusers.DDIMScheduler(clip_sample=False, steps_offset=1), safety_checker=None,
        feature_extractor=None, requires_safety_checker=False,
    )


def test_a_latent_text_to_image_pipeline_records_and_decodes(tmp_path):
    pipeline = tiny_text_to_image(tmp_path)
    settings = {"prompt": ["a b", "c"], "guidance_scale": 3.0, "height": 8, "width": 8, "output_type": "latent"}
    result = trajectory(pipeline, num_inference_steps=3, seed=0, pipeline_kwargs=settings)
    assert result.x0_hat.shape == (3, 2, 4, 8, 8) and result.network_evaluations == 6  # guided: two per step
    plain = pipeline(num_inference_steps=3, generator=torch.Generator().manual_seed(0), **settings).images
    assert torch.equal(torch.from_numpy(result.final), plain.double())  # recording changed nothing
    images = decode(result, pipeline.vae, steps=[2])
    assert images.x0_hat.shape == (2, 2, 3, 8, 8) and images.extra["decoded_steps"] == [0, 2]
    scale = pipeline.vae.config.scaling_factor
    with torch.no_grad():
        by_hand = pipeline.vae.decode(torch.from_numpy(result.x0_hat[2]).float() / scale).sample
    np.testing.assert_allclose(images.x0_hat[1], by_hand.double().numpy(), atol=1e-6)
    assert images.timesteps.tolist() == [result.timesteps[0], result.timesteps[2]]


def test_unsupported_schedulers_and_prediction_types_are_named(unet):
    with pytest.raises(ValueError, match="EDMEulerScheduler"):
        trajectory(unet, diffusers.EDMEulerScheduler(), num_inference_steps=2)
    with pytest.raises(ValueError, match="PNDMScheduler with prediction_type='sample'"):
        trajectory(unet, diffusers.PNDMScheduler(prediction_type="sample"), num_inference_steps=2)


@pytest.mark.parametrize("arguments, message", [
    ({"num_inference_steps": 0}, "num_inference_steps must be at least 1"),
    ({"guidance_scale": 0.5}, "pass 0 \\(or 1\\) for no guidance"),
    ({"guidance_scale": 3.0}, "needs class_labels"),
    ({"guidance_scale": 3.0, "class_labels": [0, 1, 2]}, "needs null_class"),
    ({"class_labels": [0, 9, 1]}, "class label 9 is out of range"),
    ({"class_labels": [0, 1]}, "2 class labels for 3 samples"),
    ({"pipeline_kwargs": {"batch_size": 2}}, "pipeline_kwargs is for pipelines"),
])
def test_bad_arguments_are_clear_errors(arguments, message):
    model = tiny_unet(0, num_class_embeds=4)
    settings = {"num_inference_steps": 2, "shape": SHAPE, **arguments}
    with pytest.raises(ValueError, match=message):
        trajectory(model, diffusers.DDIMScheduler(), **settings)


def test_a_pipeline_with_a_scheduler_is_refused(unet):
    pipeline = diffusers.DDIMPipeline(unet=unet, scheduler=diffusers.DDIMScheduler())
    with pytest.raises(ValueError, match="brings its own scheduler"):
        trajectory(pipeline, diffusers.DDIMScheduler(), num_inference_steps=2)
    with pytest.raises(ValueError, match="'shape'.*in pipeline_kwargs"):
        trajectory(pipeline, num_inference_steps=2, shape=SHAPE)


def test_predicted_x0_needs_the_step_for_sigma_schedulers():
    scheduler = diffusers.EulerDiscreteScheduler()
    scheduler.set_timesteps(2)
    with pytest.raises(ValueError, match="step_index"):
        predicted_x0(scheduler, torch.zeros(1), torch.zeros(1), timestep=999)


def test_pairwise_distances_by_hand():
    points = np.array([[0.0, 0.0], [3.0, 4.0], [6.0, 8.0]])  # distances 5, 10, 5
    assert pairwise_distance(points) == pytest.approx(20 / 3)
    assert pairwise_distance(torch.tensor(points).reshape(3, 1, 1, 2)) == pytest.approx(20 / 3)
    vectors = np.array([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])  # cosine distances 1, 1 − 1/√2, 1 − 1/√2
    assert pairwise_cosine_distance(vectors) == pytest.approx((1 + 2 * (1 - 1 / math.sqrt(2))) / 3)
    with pytest.raises(ValueError, match="at least two samples"):
        pairwise_distance(np.zeros((1, 4)))
    with pytest.raises(ValueError, match="all-zero vector"):
        pairwise_cosine_distance(np.array([[0.0, 0.0], [1.0, 0.0]]))


def test_frechet_distance_by_hand():
    rng = np.random.default_rng(0)
    a = rng.normal(size=(400, 3)) @ np.array([[1.0, 0.2, 0.0], [0.0, 1.5, 0.3], [0.0, 0.0, 0.7]])
    assert abs(frechet_distance(a, a)) < 1e-8
    shift = np.array([1.0, -2.0, 0.5])
    assert frechet_distance(a, a + shift) == pytest.approx(float(shift @ shift), abs=1e-8)
    x, y = rng.normal(1.0, 2.0, size=(300, 1)), rng.normal(-0.5, 0.5, size=(200, 1))
    one_dimensional = (x.mean() - y.mean()) ** 2 + (x.std(ddof=1) - y.std(ddof=1)) ** 2
    assert frechet_distance(x, y) == pytest.approx(one_dimensional, rel=1e-9)
    with pytest.warns(UserWarning, match="covariance is singular"):
        frechet_distance(rng.normal(size=(3, 5)), rng.normal(size=(30, 5)))
    with pytest.raises(ValueError, match="3 features, features_b 2"):
        frechet_distance(a, a[:, :2])


def test_first_step_diversity_is_the_first_x0s_pairwise_distance(unet):
    result = trajectory(unet, diffusers.DDIMScheduler(clip_sample=False), num_inference_steps=3, shape=SHAPE)
    assert first_step_diversity(result) == pytest.approx(pairwise_distance(result.x0_hat[0]))
    assert first_step_diversity(result) > 0


def test_save_load_round_trip_and_figures(unet, tmp_path):
    matplotlib.use("Agg")
    result = trajectory(unet, diffusers.DDIMScheduler(), num_inference_steps=3, shape=SHAPE, name="tiny")
    loaded = DTTrajectory.load(result.save(tmp_path / "dt.json"))
    for name in ("timesteps", "x_t", "x0_hat", "final"):
        assert np.array_equal(getattr(loaded, name), getattr(result, name))
    assert (loaded.x0_sources, loaded.models, loaded.variant, loaded.extra) == \
        (result.x0_sources, result.models, "tiny", result.extra)
    figure = result.plot(steps=[0, 2])
    assert isinstance(figure, matplotlib.figure.Figure) and len(figure.axes) == 3 * 3
    interactive = result.figure()
    assert isinstance(interactive, go.Figure) and len(interactive.frames) == 4
    assert interactive.layout.sliders[0].steps[0].label == "x_T"
    with pytest.raises(ValueError, match="step 5 does not exist"):
        result.plot(steps=[5])


def test_colour_images_plot_as_rgb():
    x = np.zeros((2, 2, 3, 4, 4))
    result = DTTrajectory(np.array([1.0, 0.0]), x, x, x[0], ["s", "s"], ["m", "m"])
    assert result.plot().axes[0].images[0].get_array().shape == (4, 4, 3)
    assert len(result.figure().frames) == 3


def test_a_damaged_result_is_refused():
    x = np.zeros((2, 1, 1, 2, 2))
    with pytest.raises(ValueError, match="timesteps has 1 entries for 2 steps"):
        DTTrajectory(np.array([1.0]), x, x, x[0], ["s", "s"], ["m", "m"])
    with pytest.raises(ValueError, match="final has shape"):
        DTTrajectory(np.array([1.0, 0.0]), x, x, x[0, :, :, :1], ["s", "s"], ["m", "m"])
