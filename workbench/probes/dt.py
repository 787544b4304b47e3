"""Diffusion Target (DT) visualization: a sampler's prediction of the final image at every denoising step.

At step k a diffusion sampler holds the noisy sample x_t and the network's output; a change of variables
on those two gives x̂0_k, the image the model is heading for (Gandikota & Bau 2025, "Distilling
Diversity and Control in Diffusion Models", arXiv 2503.10637). No extra network evaluation is needed.
A base model's x̂0 wanders over the first steps; a distilled model's is nearly the final image at the
first step: it *commits* at once, which is where its diversity goes. :func:`hybrid` uses that: the base
model for the first ``k`` steps, then the distilled model.

x̂0 is the scheduler's own ``pred_original_sample`` where its step returns one, else computed from the
scheduler's parameterisation (:func:`predicted_x0`). diffusers is imported only inside functions, so the
engine imports without it.
"""
from __future__ import annotations

import inspect
import math
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Iterator, Mapping, Sequence

import numpy as np
import pandas as pd
import torch
from torch import nn

from workbench.devices import model_device, resolve_device
from workbench.probes.diversity import frechet_distance, pairwise_cosine_distance, pairwise_distance
from workbench.probes.stream import eval_mode
from workbench.probes.result_io import (
    JsonResult, check_array, check_float, check_int, check_json_dict, check_text, check_texts,
)

# How each supported scheduler's samples relate to x0 and where its noise level is read:
#   "alpha":  x_t = √ᾱ_t·x0 + √(1−ᾱ_t)·ε, ᾱ_t = alphas_cumprod[timestep]
#   "solver": the same space, noise level sigmas[step_index] (σ = √((1−ᾱ)/ᾱ), or flow sigmas)
#   "karras": x = x0 + σ·ε with σ = sigmas[step_index]; the model sees x / √(σ²+1)
#   "flow":   x_t = (1−σ)·x0 + σ·ε, the model predicts v = ε − x0
SCHEDULERS: dict[str, tuple[str, tuple[str, ...]]] = {
    "DDPMScheduler": ("alpha", ("epsilon", "v_prediction", "sample")),
    "DDIMScheduler": ("alpha", ("epsilon", "v_prediction", "sample")),
    "PNDMScheduler": ("alpha", ("epsilon", "v_prediction")),
    "DPMSolverMultistepScheduler": ("solver", ("epsilon", "v_prediction", "sample", "flow_prediction")),
    "UniPCMultistepScheduler": ("solver", ("epsilon", "v_prediction", "sample", "flow_prediction")),
    "DEISMultistepScheduler": ("solver", ("epsilon", "v_prediction", "sample", "flow_prediction")),
    "EulerDiscreteScheduler": ("karras", ("epsilon", "v_prediction", "sample")),
    "EulerAncestralDiscreteScheduler": ("karras", ("epsilon", "v_prediction")),
    "LMSDiscreteScheduler": ("karras", ("epsilon", "v_prediction", "sample")),
    "FlowMatchEulerDiscreteScheduler": ("flow", ("flow_prediction",)),
}
__all__ = [
    "DTTrajectory", "SCHEDULERS", "check_trajectories", "decode", "first_step_diversity", "frechet_distance", "hybrid",
    "pairwise_cosine_distance", "pairwise_distance", "predicted_x0", "sample_space", "trajectory",
]
IMAGE_LIMIT = 10  # columns a strip shows when no steps are chosen


def _rule(scheduler: Any) -> tuple[str, str]:
    """``(family, prediction_type)`` of a supported scheduler, or a ValueError naming it."""
    name = type(scheduler).__name__
    if name not in SCHEDULERS:
        raise ValueError(f"DT cannot read x̂0 from a {name}: supported schedulers are {sorted(SCHEDULERS)}")
    family, types = SCHEDULERS[name]
    prediction = getattr(scheduler.config, "prediction_type", "flow_prediction")
    if prediction not in types:
        raise ValueError(f"{name} with prediction_type={prediction!r} is not supported: use one of {list(types)}")
    return family, prediction


def sample_space(scheduler: Any) -> str:
    """The space a scheduler's samples live in: ``"variance-preserving"``, ``"sigma-scaled"`` or ``"flow"``.

    :func:`hybrid` passes x_t from one scheduler to the other as is, so both must share a space.

    Example:
        >>> from diffusers import DDIMScheduler, EulerDiscreteScheduler
        >>> sample_space(DDIMScheduler()), sample_space(EulerDiscreteScheduler())
        ('variance-preserving', 'sigma-scaled')
    """
    family, _ = _rule(scheduler)
    if family == "flow" or (family == "solver" and getattr(scheduler.config, "use_flow_sigmas", False)):
        return "flow"
    return "sigma-scaled" if family == "karras" else "variance-preserving"


def predicted_x0(
    scheduler: Any, sample: torch.Tensor, model_output: torch.Tensor, *, timestep: Any = None,
    step_index: int | None = None,
) -> torch.Tensor:
    """x̂0 from a step's sample and (guided) model output, by the scheduler's parameterisation.

    ``sample`` is what the scheduler's ``step`` receives (before ``scale_model_input``). DDPM, DDIM and
    PNDM read ᾱ_t = ``alphas_cumprod[timestep]``; the others read σ = ``sigmas[step_index]`` (the step's
    position in ``scheduler.timesteps``). Computed in float64:

    - ᾱ schedulers: epsilon (x − √(1−ᾱ)·ε̂)/√ᾱ; v_prediction √ᾱ·x − √(1−ᾱ)·v̂; sample: the output;
    - DPM-Solver, UniPC, DEIS: the same with α = 1/√(σ²+1), σ_t = σ·α (α = 1−σ, σ_t = σ with flow
      sigmas); flow_prediction x − σ·v̂;
    - Euler, Euler ancestral, LMS: epsilon x − σ·ε̂; v_prediction x/(σ²+1) − σ·v̂/√(σ²+1); sample: the output;
    - flow-matching Euler: x − σ·v̂.

    Example:
        >>> import torch
        >>> from diffusers import DDIMScheduler
        >>> scheduler = DDIMScheduler()
        >>> x0 = predicted_x0(scheduler, torch.ones(1), torch.zeros(1), timestep=0)
        >>> round(float(x0), 4) == round(float(scheduler.alphas_cumprod[0] ** -0.5), 4)
        True
    """
    family, prediction = _rule(scheduler)
    x, output = sample.detach().double(), model_output.detach().double().to(sample.device)
    if prediction == "sample":
        return output
    if family == "alpha":
        if timestep is None:
            raise ValueError(f"{type(scheduler).__name__} reads ᾱ at the timestep: pass timestep=")
        alpha = scheduler.alphas_cumprod[int(timestep)].double().sqrt().item()
        return _variance_preserving(x, output, alpha, math.sqrt(max(1.0 - alpha**2, 0.0)), prediction)
    if step_index is None:
        raise ValueError(f"{type(scheduler).__name__} reads σ at the step: pass step_index=")
    sigma = scheduler.sigmas[int(step_index)].double().item()
    if prediction == "flow_prediction":
        return x - sigma * output
    if family == "karras":
        if prediction == "epsilon":
            return x - sigma * output
        return x / (sigma**2 + 1) - sigma / math.sqrt(sigma**2 + 1) * output
    if getattr(scheduler.config, "use_flow_sigmas", False):
        alpha, sigma_t = 1.0 - sigma, sigma
    else:
        alpha = 1.0 / math.sqrt(sigma**2 + 1)
        sigma_t = sigma * alpha
    return _variance_preserving(x, output, alpha, sigma_t, prediction)


def _variance_preserving(x: torch.Tensor, output: torch.Tensor, alpha: float, sigma: float, prediction: str):
    if prediction == "epsilon":
        return (x - sigma * output) / alpha
    return alpha * x - sigma * output


def _copy(tensor: torch.Tensor) -> torch.Tensor:
    """A float64 CPU copy (never a view of what the sampler keeps using)."""
    return tensor.detach().to("cpu", torch.float64, copy=True)


class _Recorder:
    """Collects, step by step, x_t, x̂0 and where x̂0 came from; wraps a scheduler's ``step``."""

    def __init__(self) -> None:
        self.timesteps: list[float] = []
        self.x_t: list[torch.Tensor] = []
        self.x0_hat: list[torch.Tensor] = []
        self.sources: list[str] = []
        self.models: list[str] = []
        self.final: torch.Tensor | None = None
        self.evaluations = 0.0

    def step(self, scheduler: Any, step, model: str, model_output, timestep, sample, /, **kwargs):
        """Call ``step`` (the scheduler's own) with ``return_dict=True`` and record what it saw and made."""
        _, prediction = _rule(scheduler)
        x_t, model_copy = _copy(sample), _copy(model_output)
        output = step(model_output, timestep, sample, **kwargs, return_dict=True)
        original = getattr(output, "pred_original_sample", None)
        if original is not None:
            x0, source = _copy(original), "pred_original_sample"
        else:
            index = getattr(scheduler, "step_index", None)
            x0 = predicted_x0(scheduler, x_t, model_copy, timestep=timestep,
                              step_index=None if index is None else index - 1).cpu()
            source = f"computed ({prediction})"
        self.timesteps.append(float(timestep))
        self.x_t.append(x_t)
        self.x0_hat.append(x0)
        self.sources.append(source)
        self.models.append(model)
        self.final = _copy(output.prev_sample)
        return output

    def result(self, *, labels: list[int], variant: str, seconds: float, extra: dict) -> DTTrajectory:
        if not self.x_t:
            raise ValueError("no denoising step ran: nothing to record")
        n = self.x_t[0].shape[0]
        return DTTrajectory(
            timesteps=np.array(self.timesteps), x_t=torch.stack(self.x_t).numpy(),
            x0_hat=torch.stack(self.x0_hat).numpy(), final=self.final.numpy(), x0_sources=self.sources,
            models=self.models, labels=labels, variant=variant,
            network_evaluations=int(round(self.evaluations / n)), seconds=seconds, extra=extra,
        )


def _step_kwargs(scheduler: Any, generator: torch.Generator) -> dict:
    return {"generator": generator} if "generator" in inspect.signature(scheduler.step).parameters else {}


def _network_output(model: nn.Module, sample: torch.Tensor, timestep: torch.Tensor, labels) -> torch.Tensor:
    kwargs = {} if labels is None else {"class_labels": labels}
    output = model(sample, timestep.to(sample.device).expand(sample.shape[0]), **kwargs)
    if hasattr(output, "sample"):
        output = output.sample
    elif isinstance(output, tuple):
        output = output[0]
    if output.shape != sample.shape:
        raise ValueError(
            f"the model's output has shape {list(output.shape)} for a sample of shape {list(sample.shape)}: "
            "DT needs a model whose output is the prediction itself (no learned-variance channels)"
        )
    return output


@dataclass
class _Guidance:
    labels: torch.Tensor | None
    scale: float
    null_class: int | None

    @property
    def on(self) -> bool:
        return self.scale > 1

    def output(self, model: nn.Module, sample: torch.Tensor, timestep: torch.Tensor) -> torch.Tensor:
        """The model's output, with classifier-free guidance uncond + s·(cond − uncond) when on."""
        if not self.on:
            return _network_output(model, sample, timestep, self.labels)
        null = torch.full_like(self.labels, self.null_class)
        both = _network_output(model, torch.cat([sample, sample]), timestep, torch.cat([null, self.labels]))
        uncond, cond = both.chunk(2)
        return uncond + self.scale * (cond - uncond)


def _denoise(
    model: nn.Module, scheduler: Any, sample: torch.Tensor, recorder: _Recorder, *, start: int, stop: int,
    guidance: _Guidance, generator: torch.Generator, name: str, progress: bool,
) -> torch.Tensor:
    """The standard sampling loop over ``scheduler.timesteps[start:stop]``, every step recorded.

    Flow-matching Euler has no ``scale_model_input``: its model sees the sample as is.
    """
    from tqdm.auto import tqdm

    if hasattr(scheduler, "set_begin_index"):
        scheduler.set_begin_index(start)
    kwargs = _step_kwargs(scheduler, generator)
    for timestep in tqdm(scheduler.timesteps[start:stop], desc=f"DT {name}", disable=not progress, leave=False):
        scaled = hasattr(scheduler, "scale_model_input")
        model_input = scheduler.scale_model_input(sample, timestep) if scaled else sample
        output = guidance.output(model, model_input, timestep)
        recorder.evaluations += sample.shape[0] * (2 if guidance.on else 1)
        sample = recorder.step(scheduler, scheduler.step, name, output, timestep, sample, **kwargs).prev_sample
    return sample


def _generator(seed: int | torch.Generator) -> torch.Generator:
    if isinstance(seed, torch.Generator):
        return seed
    return torch.Generator().manual_seed(check_int(seed, "seed"))


def _model_device(model: nn.Module, device) -> torch.device:
    return resolve_device(device) if device is not None else model_device(model)


def _model_dtype(model: nn.Module) -> torch.dtype:
    parameter = next(model.parameters(), None)
    return parameter.dtype if parameter is not None else torch.float32


def _labels(class_labels, model: nn.Module) -> list[int]:
    """Class labels as a list of ints, checked against the model's number of class embeddings."""
    if class_labels is None:
        return []
    values = class_labels.tolist() if isinstance(class_labels, torch.Tensor) else list(class_labels)
    labels = [check_int(value, "class_labels[i]") for value in values]
    count = _class_count(model)
    wrong = [label for label in labels if count is not None and label >= count]
    if wrong:
        raise ValueError(f"class label {wrong[0]} is out of range: the model has {count} class embeddings")
    if not labels:
        raise ValueError("class_labels is empty: pass one label per sample, or None")
    return labels


def _class_count(model: nn.Module) -> int | None:
    config = getattr(model, "config", None)
    for key in ("num_class_embeds", "num_embeds_ada_norm"):
        if getattr(config, key, None) is not None:
            return int(getattr(config, key))
    return None


def _guidance(model: nn.Module, labels: list[int], scale: float, null_class, device, name: str) -> _Guidance:
    scale = check_float(scale, name, low=0.0)
    if 0 < scale < 1:
        raise ValueError(f"{name}={scale}: pass 0 (or 1) for no guidance, or a scale > 1 for classifier-free guidance")
    tensor = torch.tensor(labels, device=device) if labels else None
    if scale > 1:
        if tensor is None:
            raise ValueError(f"{name}={scale} needs class_labels (guidance mixes the conditional output in)")
        if null_class is None:
            raise ValueError(f"{name}={scale} needs null_class, the label the model was trained to read as 'no class'")
        null_class = _labels([null_class], model)[0]
    return _Guidance(tensor, scale, null_class)


def _shape(model: nn.Module, shape, labels: list[int]) -> tuple[int, int, int, int]:
    if shape is None:
        config = getattr(model, "config", None)
        size = getattr(config, "sample_size", None)
        channels = getattr(config, "in_channels", None)
        if size is None or channels is None:
            raise ValueError("the model has no config with sample_size and in_channels: pass shape=(n, c, h, w)")
        height, width = (size, size) if isinstance(size, int) else tuple(size)
        shape = (len(labels) or 1, channels, height, width)
    shape = tuple(check_int(value, "shape[i]", minimum=1) for value in shape)
    if len(shape) != 4:
        raise ValueError(f"shape must be (n, c, h, w), got {shape}")
    if labels and len(labels) != shape[0]:
        raise ValueError(f"{len(labels)} class labels for {shape[0]} samples: pass one label per sample")
    return shape


def _noise(shape, generator: torch.Generator, scheduler: Any, device, dtype) -> torch.Tensor:
    """x_T: standard normal noise drawn on the CPU (the same on every device) times ``init_noise_sigma``."""
    noise = torch.randn(shape, generator=generator, dtype=torch.float32)
    return (noise * getattr(scheduler, "init_noise_sigma", 1.0)).to(device, dtype)


def _is_pipeline(model: Any) -> bool:
    return hasattr(model, "scheduler") and hasattr(model, "components") and not isinstance(model, nn.Module)


def trajectory(
    model: Any,
    scheduler: Any = None,
    *,
    num_inference_steps: int,
    seed: int | torch.Generator = 0,
    shape: Sequence[int] | None = None,
    class_labels: Sequence[int] | torch.Tensor | None = None,
    guidance_scale: float = 0.0,
    null_class: int | None = None,
    device: str | torch.device | None = None,
    name: str = "model",
    progress: bool = False,
    pipeline_kwargs: dict | None = None,
) -> DTTrajectory:
    """Sample with ``model`` and ``scheduler`` and record x_t and x̂0 at every step.

    ``model`` is a diffusers ``UNet2DModel`` (class-conditional through ``class_embed_type`` /
    ``num_class_embeds``), a diffusers transformer, or any module called ``model(x, t[, class_labels=])``
    whose output (a tensor, or an object with ``.sample``) has the sample's shape. ``scheduler`` is one of
    :data:`SCHEDULERS`. The loop is the standard one (``set_timesteps``, ``scale_model_input``, the model,
    ``step``); x_T is drawn on the CPU from ``seed`` (times ``init_noise_sigma``) and the same generator
    feeds stochastic steps, so a seed gives the same samples with or without recording.
    ``shape`` defaults to ``(len(class_labels) or 1, in_channels, sample_size, sample_size)``.
    ``guidance_scale`` 0 or 1: the model's output as is; > 1: classifier-free guidance
    uncond + s·(cond − uncond), with ``null_class`` as the unconditional label. The model runs on
    ``device`` (default: where its parameters are; it is moved there) in eval mode without gradients,
    and gets its train/eval flag back afterwards.

    ``model`` may instead be a diffusers pipeline (``scheduler`` None): it is called with
    ``num_inference_steps``, a generator and ``pipeline_kwargs`` (e.g. ``{"batch_size": 4}``; shape,
    labels, guidance and device go there too, in the pipeline's own words), and its scheduler's ``step``
    is wrapped for the call (restored after, also on errors) to record each step. ``progress`` turns the
    pipeline's own progress bar on or off.

    Example:
        >>> from diffusers import DDIMScheduler, UNet2DModel
        >>> unet = UNet2DModel(sample_size=8, in_channels=1, out_channels=1, block_out_channels=(8, 16),
        ...                    layers_per_block=1, norm_num_groups=8,
        ...                    down_block_types=("DownBlock2D",) * 2, up_block_types=("UpBlock2D",) * 2)
        >>> result = trajectory(unet, DDIMScheduler(clip_sample=False), num_inference_steps=3, shape=(2, 1, 8, 8))
        >>> result.x0_hat.shape, result.x0_sources[0]
        ((3, 2, 1, 8, 8), 'pred_original_sample')
    """
    steps = check_int(num_inference_steps, "num_inference_steps", minimum=1)
    if _is_pipeline(model):
        if scheduler is not None:
            raise ValueError("a pipeline brings its own scheduler: pass scheduler=None (set pipeline.scheduler)")
        settings = {"shape": shape, "class_labels": class_labels, "guidance_scale": guidance_scale or None,
                    "null_class": null_class, "device": device}
        given = [key for key, value in settings.items() if value is not None]
        if given:
            raise ValueError(f"{given} are for a model and a scheduler: give a pipeline its settings in "
                             "pipeline_kwargs, under the pipeline's names")
        return _pipeline_trajectory(model, steps, _generator(seed), name, progress, dict(pipeline_kwargs or {}))
    if scheduler is None:
        raise ValueError("pass a scheduler (a diffusers scheduler instance) with the model")
    if pipeline_kwargs:
        raise ValueError("pipeline_kwargs is for pipelines; this is a model and a scheduler")
    device = _model_device(model, device)
    _set_timesteps(scheduler, steps, device)
    return _hybrid_run(
        [(model, scheduler, steps, 0, steps, guidance_scale, name)], seed=seed, shape=shape,
        class_labels=class_labels, null_class=null_class, device=device, variant=name, progress=progress,
    )


def _hybrid_run(
    parts: list[tuple[nn.Module, Any, int, int, int, float, str]], *, seed, shape, class_labels, null_class,
    device, variant: str, progress: bool,
) -> DTTrajectory:
    """Run ``(model, scheduler, steps, start, stop, guidance, name)`` parts in turn on one sample."""
    first_model, first_scheduler = parts[0][0], parts[0][1]
    device = _model_device(first_model, device)
    labels = _labels(class_labels, first_model)
    shape = _shape(first_model, shape, labels)
    plans = []
    for model, scheduler, steps, start, stop, scale, name in parts:
        _rule(scheduler)
        _labels(class_labels, model)
        guidance = _guidance(model, labels, scale, null_class, device, f"guidance_scale of {name}")
        plans.append((model, scheduler, start, stop, guidance, name))
    generator = _generator(seed)
    recorder, began = _Recorder(), time.perf_counter()
    with eval_mode(*{id(model): model for model, *_ in parts}.values()), torch.no_grad():
        sample = _noise(shape, generator, first_scheduler, device, _model_dtype(first_model))
        for model, scheduler, start, stop, guidance, name in plans:
            sample = _denoise(model.to(device), scheduler, sample, recorder, start=start, stop=stop,
                              guidance=guidance, generator=generator, name=name, progress=progress)
    extra = {
        "parts": [
            {"model": name, "scheduler": type(scheduler).__name__, "prediction_type": _rule(scheduler)[1],
             "num_inference_steps": steps, "steps_run": [start, stop], "guidance_scale": float(scale)}
            for _, scheduler, steps, start, stop, scale, name in parts
        ],
        "seed": seed if isinstance(seed, int) else None,
    }
    return recorder.result(labels=labels, variant=variant, seconds=time.perf_counter() - began, extra=extra)


def _set_timesteps(scheduler: Any, steps: int, device) -> None:
    _rule(scheduler)
    scheduler.set_timesteps(steps, device=device)


def hybrid(
    base: nn.Module,
    distilled: nn.Module,
    *,
    base_scheduler: Any,
    distilled_scheduler: Any,
    switch_after: int,
    num_base_steps: int,
    num_distilled_steps: int,
    seed: int | torch.Generator = 0,
    base_guidance: float = 0.0,
    distilled_guidance: float = 0.0,
    shape: Sequence[int] | None = None,
    class_labels: Sequence[int] | torch.Tensor | None = None,
    null_class: int | None = None,
    device: str | torch.device | None = None,
    progress: bool = False,
) -> DTTrajectory:
    """Diversity distillation: ``base`` for the first ``switch_after`` steps, then ``distilled``.

    The base runs steps ``0 … k−1`` of its ``num_base_steps`` schedule; its sample is then at the noise
    level of the base's timestep ``k``, t_k. The distilled model continues on its own
    ``num_distilled_steps`` schedule from its first timestep ≤ t_k, with x_t passed as is (no
    re-noising). ``k = 0`` is the distilled run (from its first timestep, on the same x_T); ``k =
    num_base_steps`` is the base run. Both schedulers must share ``num_train_timesteps`` and their
    :func:`sample_space`; a switch after which the distilled schedule has no timestep left is an error.

    Example:
        >>> from diffusers import DDIMScheduler, UNet2DModel
        >>> def unet(): return UNet2DModel(sample_size=8, in_channels=1, out_channels=1,
        ...     block_out_channels=(8, 16), layers_per_block=1, norm_num_groups=8,
        ...     down_block_types=("DownBlock2D",) * 2, up_block_types=("UpBlock2D",) * 2)
        >>> result = hybrid(unet(), unet(), base_scheduler=DDIMScheduler(), distilled_scheduler=DDIMScheduler(),
        ...                 switch_after=2, num_base_steps=8, num_distilled_steps=4, shape=(1, 1, 8, 8))
        >>> result.timesteps.tolist()
        [875.0, 750.0, 500.0, 250.0, 0.0]
        >>> result.models
        ['base', 'base', 'distilled', 'distilled', 'distilled']
    """
    base_steps = check_int(num_base_steps, "num_base_steps", minimum=1)
    distilled_steps = check_int(num_distilled_steps, "num_distilled_steps", minimum=1)
    switch = check_int(switch_after, "switch_after")
    if switch > base_steps:
        raise ValueError(f"switch_after={switch} is more than num_base_steps={base_steps}")
    if base_scheduler is distilled_scheduler:
        raise ValueError("base_scheduler and distilled_scheduler are one object: pass two (each keeps a schedule)")
    _check_compatible(base_scheduler, distilled_scheduler)
    device = _model_device(base, device)
    _set_timesteps(base_scheduler, base_steps, device)
    _set_timesteps(distilled_scheduler, distilled_steps, device)
    start = _distilled_start(base_scheduler.timesteps, distilled_scheduler.timesteps, switch)
    parts = [(base, base_scheduler, base_steps, 0, switch, base_guidance, "base")] if switch else []
    if start is not None:
        stop = len(distilled_scheduler.timesteps)
        parts.append((distilled, distilled_scheduler, distilled_steps, start, stop, distilled_guidance, "distilled"))
    return _hybrid_run(parts, seed=seed, shape=shape, class_labels=class_labels, null_class=null_class,
                       device=device, variant=f"hybrid (base for {switch} of {base_steps} steps)", progress=progress)


def _check_compatible(base_scheduler: Any, distilled_scheduler: Any) -> None:
    spaces = sample_space(base_scheduler), sample_space(distilled_scheduler)
    if spaces[0] != spaces[1]:
        raise ValueError(
            f"the base scheduler's samples are {spaces[0]} ({type(base_scheduler).__name__}), the distilled "
            f"one's {spaces[1]} ({type(distilled_scheduler).__name__}): x_t cannot pass between them as is"
        )
    trained = base_scheduler.config.num_train_timesteps, distilled_scheduler.config.num_train_timesteps
    if trained[0] != trained[1]:
        raise ValueError(f"num_train_timesteps differ ({trained[0]} vs {trained[1]}): timesteps cannot be matched")


def _distilled_start(base_timesteps: torch.Tensor, distilled_timesteps: torch.Tensor, switch: int) -> int | None:
    """Where the distilled schedule starts after ``switch`` base steps (None: the base ran to the end)."""
    if switch == len(base_timesteps):
        return None
    if switch == 0:
        return 0
    level = float(base_timesteps[switch])
    later = [index for index, value in enumerate(distilled_timesteps.tolist()) if value <= level]
    if not later:
        raise ValueError(
            f"after {switch} base steps the sample is at timestep {level:g}, below every distilled timestep "
            f"{distilled_timesteps.tolist()}: switch earlier or give the distilled model more steps"
        )
    return later[0]


@contextmanager
def _recording_steps(scheduler: Any, recorder: _Recorder, name: str) -> Iterator[None]:
    """``scheduler.step`` recorded for the block, then the original restored (also on errors)."""
    own = "step" in vars(scheduler)
    original = scheduler.step
    signature = inspect.signature(original)

    def recorded_step(*args, **kwargs):
        bound = signature.bind(*args, **kwargs)
        bound.apply_defaults()
        arguments = dict(bound.arguments)
        extra = {}
        for key, parameter in signature.parameters.items():
            if parameter.kind is inspect.Parameter.VAR_KEYWORD:
                extra = arguments.pop(key, {})
        wants_dict = arguments.pop("return_dict", True)
        model_output, timestep, sample = (arguments.pop(key) for key in ("model_output", "timestep", "sample"))
        output = recorder.step(scheduler, original, name, model_output, timestep, sample, **arguments, **extra)
        return output if wants_dict else output.to_tuple()

    scheduler.step = recorded_step
    try:
        yield
    finally:
        if own:
            scheduler.step = original
        else:
            del scheduler.step


@contextmanager
def _counting_evaluations(denoiser: nn.Module | None, recorder: _Recorder) -> Iterator[None]:
    """Counts the samples the denoiser is run on (a guided batch of 2n counts two evaluations each)."""
    if denoiser is None:
        yield
        return

    def count(module, args, kwargs):
        first = next((value for value in (*args, *kwargs.values()) if isinstance(value, torch.Tensor)), None)
        recorder.evaluations += 0 if first is None else first.shape[0]

    handle = denoiser.register_forward_pre_hook(count, with_kwargs=True)
    try:
        yield
    finally:
        handle.remove()


def _pipeline_trajectory(pipeline, steps: int, generator, name: str, progress: bool, kwargs: dict) -> DTTrajectory:
    _rule(pipeline.scheduler)
    for reserved in ("num_inference_steps", "generator"):
        if reserved in kwargs:
            raise ValueError(f"pass {reserved} to trajectory itself, not in pipeline_kwargs")
    denoiser = getattr(pipeline, "unet", None)
    denoiser = getattr(pipeline, "transformer", None) if denoiser is None else denoiser
    recorder, began = _Recorder(), time.perf_counter()
    pipeline.set_progress_bar_config(disable=not progress)
    with _recording_steps(pipeline.scheduler, recorder, name), _counting_evaluations(denoiser, recorder):
        pipeline(num_inference_steps=steps, generator=generator, **kwargs)
    extra = {"pipeline": type(pipeline).__name__, "scheduler": type(pipeline.scheduler).__name__,
             "num_inference_steps": steps}
    return recorder.result(labels=[], variant=name, seconds=time.perf_counter() - began, extra=extra)


def decode(result: DTTrajectory, vae: nn.Module, *, steps: Sequence[int] | None = None,
           device: str | torch.device | None = None) -> DTTrajectory:
    """A latent trajectory's x_t, x̂0 and final sample decoded to images through ``vae``.

    Each latent z is decoded as ``vae.decode(z / scaling_factor + shift_factor).sample`` (the shift is 0
    where the VAE's config has none, as for Stable Diffusion 1.x). ``steps`` picks the steps to decode
    (default: all); step 0 is always kept, its x_t being the strip's x_T.

    Example:
        >>> from diffusers import AutoencoderKL
        >>> vae = AutoencoderKL(block_out_channels=(8,), norm_num_groups=8, latent_channels=4)
        >>> latents = np.zeros((3, 1, 4, 2, 2))
        >>> result = DTTrajectory(np.array([2.0, 1.0, 0.0]), latents, latents, latents[0], ["s"] * 3, ["m"] * 3)
        >>> decode(result, vae, steps=[2]).x0_hat.shape
        (2, 1, 3, 2, 2)
    """
    chosen = sorted({0, *result._columns(steps)})
    device = _model_device(vae, device)
    scale = float(vae.config.scaling_factor)
    shift = float(getattr(vae.config, "shift_factor", None) or 0.0)

    def images(latents: np.ndarray) -> np.ndarray:
        z = torch.from_numpy(latents).to(device, _model_dtype(vae)) / scale + shift
        return _copy(vae.decode(z).sample).numpy()

    with eval_mode(vae), torch.no_grad():
        decoded = {name: np.stack([images(getattr(result, name)[step]) for step in chosen])
                   for name in ("x_t", "x0_hat")}
        final = images(result.final)
    return DTTrajectory(
        timesteps=result.timesteps[chosen], x_t=decoded["x_t"], x0_hat=decoded["x0_hat"], final=final,
        x0_sources=[result.x0_sources[step] for step in chosen], models=[result.models[step] for step in chosen],
        labels=result.labels, variant=f"{result.variant} (decoded)", network_evaluations=result.network_evaluations,
        seconds=result.seconds, extra={**result.extra, "decoded_steps": chosen},
    )


def _images(array: np.ndarray) -> np.ndarray:
    """``[..., c, h, w]`` in [-1, 1] as displayable ``[..., h, w]`` (1 channel, or the first) or ``[..., h, w, 3]``."""
    shown = np.clip(array / 2 + 0.5, 0.0, 1.0)
    if shown.shape[-3] == 3:
        return np.moveaxis(shown, -3, -1)
    return shown[..., 0, :, :]


@dataclass
class DTTrajectory(JsonResult):
    """x_t and x̂0 at every denoising step of a sampling run, with the final sample.

    ``x_t`` and ``x0_hat`` are ``[steps, n, c, h, w]`` (``x_t[k]`` is the sample step k's network saw,
    before ``scale_model_input``); ``final`` ``[n, c, h, w]`` is the last step's output; ``x0_sources``
    says per step where x̂0 came from; ``models`` which model ran it; ``network_evaluations`` counts
    per sample (a guided step counts two).

    Example:
        >>> import numpy as np
        >>> x = np.zeros((2, 3, 1, 2, 2)); final = np.ones((3, 1, 2, 2))
        >>> result = DTTrajectory(np.array([500.0, 0.0]), x, x, final, ["computed (epsilon)"] * 2, ["m"] * 2)
        >>> result.commitment()["distance"].tolist()
        [2.0, 2.0]
    """

    timesteps: np.ndarray
    x_t: np.ndarray
    x0_hat: np.ndarray
    final: np.ndarray
    x0_sources: list[str]
    models: list[str]
    labels: list[int] = field(default_factory=list)
    variant: str = "model"
    network_evaluations: int = 0
    seconds: float = 0.0
    extra: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        """Check every field; a file that fails is refused by ``load``."""
        self.timesteps = check_array(self.timesteps, "timesteps", ndim=1)
        self.x_t = check_array(self.x_t, "x_t", ndim=5)
        self.x0_hat = check_array(self.x0_hat, "x0_hat", ndim=5)
        self.final = check_array(self.final, "final", ndim=4)
        self.x0_sources = check_texts(self.x0_sources, "x0_sources")
        self.models = check_texts(self.models, "models")
        self.labels = [check_int(label, f"labels[{index}]") for index, label in enumerate(self.labels)]
        self.variant = check_text(self.variant, "variant")
        self.network_evaluations = check_int(self.network_evaluations, "network_evaluations")
        self.seconds = check_float(self.seconds, "seconds", low=0.0)
        self.extra = check_json_dict(self.extra, "extra")
        if self.x0_hat.shape != self.x_t.shape:
            raise ValueError(f"x0_hat has shape {list(self.x0_hat.shape)}, x_t {list(self.x_t.shape)}: they must match")
        if self.final.shape != self.x_t.shape[1:]:
            raise ValueError(f"final has shape {list(self.final.shape)}, one step of x_t {list(self.x_t.shape[1:])}")
        steps = self.x_t.shape[0]
        for name in ("timesteps", "x0_sources", "models"):
            if len(getattr(self, name)) != steps:
                raise ValueError(f"{name} has {len(getattr(self, name))} entries for {steps} steps")
        if self.labels and len(self.labels) != self.x_t.shape[1]:
            raise ValueError(f"{len(self.labels)} labels for {self.x_t.shape[1]} samples")

    @property
    def steps(self) -> int:
        """The number of recorded denoising steps."""
        return self.x_t.shape[0]

    def commitment(self) -> pd.DataFrame:
        """Per step: the mean over samples of ‖x̂0_k − final‖₂ (flattened), with the fraction k / (steps − 1).

        A distilled model's distance is small from the first step on: it has committed to its image.

        Example:
            >>> x0 = np.stack([np.zeros((1, 1, 1, 2)), np.ones((1, 1, 1, 2))])
            >>> result = DTTrajectory(np.array([1.0, 0.0]), x0, x0, x0[1], ["s", "s"], ["m", "m"])
            >>> result.commitment()["distance"].round(3).tolist()
            [1.414, 0.0]
        """
        n = self.x_t.shape[1]
        difference = (self.x0_hat - self.final[None]).reshape(self.steps, n, -1)
        return pd.DataFrame({
            "step": np.arange(self.steps),
            "timestep": self.timesteps,
            "fraction": np.arange(self.steps) / max(self.steps - 1, 1),
            "model": self.models,
            "distance": np.linalg.norm(difference, axis=2).mean(axis=1),
        })

    def _columns(self, steps: Sequence[int] | None) -> list[int]:
        if steps is None:
            spread = np.linspace(0, self.steps - 1, min(self.steps, IMAGE_LIMIT)).round().astype(int)
            return sorted(set(spread.tolist()))
        chosen = [check_int(step, "steps[i]") for step in steps]
        wrong = [step for step in chosen if step >= self.steps]
        if wrong:
            raise ValueError(f"step {wrong[0]} does not exist: the trajectory has steps 0 … {self.steps - 1}")
        return chosen

    def plot(self, steps: Sequence[int] | None = None):
        """A matplotlib DT strip; returns the ``Figure``.

        Rows: samples; columns: x_T, then x̂0 at ``steps`` (default: up to ten spread over the run).
        Values in [-1, 1] are shown as [0, 1]; one channel in grey, three as RGB, else the first channel.

        Example:
            >>> x = np.zeros((2, 1, 1, 2, 2))
            >>> DTTrajectory(np.array([1.0, 0.0]), x, x, x[0], ["s", "s"], ["m", "m"]).plot().axes[0].get_title()
            'x_T'
        """
        import matplotlib.pyplot as plt

        columns, n = self._columns(steps), self.x_t.shape[1]
        figure, axes = plt.subplots(n, len(columns) + 1, figsize=(1.2 * (len(columns) + 1), 1.2 * n + 0.5),
                                    squeeze=False, layout="constrained")
        for row in range(n):
            images = [self.x_t[0, row]] + [self.x0_hat[step, row] for step in columns]
            titles = ["x_T"] + [f"x̂0 step {step}\nt={self.timesteps[step]:g}" for step in columns]
            for ax, image, title in zip(axes[row], images, titles):
                ax.imshow(_images(image), cmap="gray", vmin=0, vmax=1)
                ax.set_xticks([]), ax.set_yticks([])
                if row == 0:
                    ax.set_title(title, fontsize=7)
        figure.suptitle(f"DT: {self.variant}", fontsize=9)
        return figure

    def figure(self):
        """A plotly figure: all samples side by side, a slider over x_T and each step's x̂0.

        Example:
            >>> x = np.zeros((2, 1, 1, 2, 2))
            >>> len(DTTrajectory(np.array([1.0, 0.0]), x, x, x[0], ["s", "s"], ["m", "m"]).figure().frames)
            3
        """
        import plotly.express as px

        frames = _images(np.concatenate([self.x_t[:1], self.x0_hat]))  # [steps + 1, n, h, w(, 3)]
        tiles = [np.concatenate([image, np.ones_like(image[:, :, :1])], axis=2) for image in np.moveaxis(frames, 1, 0)]
        colours = {} if frames.ndim == 5 else {"color_continuous_scale": "gray"}
        figure = px.imshow(np.concatenate(tiles, axis=2), animation_frame=0, zmin=0, zmax=1,
                           title=f"DT: {self.variant}", **colours)
        labels = ["x_T"] + [f"step {step} (t={value:g})" for step, value in enumerate(self.timesteps)]
        for step, label in zip(figure.layout.sliders[0].steps, labels):
            step.label = label
        return figure


def check_trajectories(trajectories: Mapping[str, DTTrajectory]) -> None:
    """Raise unless ``trajectories`` is a non-empty mapping of variant name → :class:`DTTrajectory` (what the
    multi-variant figures, the sample-quality table and the DT viewer take).

    Example:
        >>> check_trajectories({"base": "not a run"})
        Traceback (most recent call last):
        ...
        TypeError: trajectories['base'] is a str, not a DTTrajectory
    """
    if not trajectories:
        raise ValueError("trajectories is empty: pass variant name -> DTTrajectory")
    for name, run in trajectories.items():
        if not isinstance(run, DTTrajectory):
            raise TypeError(f"trajectories[{name!r}] is a {type(run).__name__}, not a DTTrajectory")


def first_step_diversity(result: DTTrajectory) -> float:
    """:func:`pairwise_distance` of the samples' x̂0 at the first step: how far apart the model starts.

    Example:
        >>> x0 = np.array([[[[[0.0, 0.0]]], [[[3.0, 4.0]]]]])
        >>> first_step_diversity(DTTrajectory(np.array([1.0]), x0, x0, x0[0], ["s"], ["m"]))
        5.0
    """
    return pairwise_distance(result.x0_hat[0])
