"""Progressive distillation (Salimans & Ho 2022, arXiv 2202.00512) of the digits DDPM down to a few steps.

Each round trains a student, initialised as its teacher, to do in one DDIM step what the teacher does
in two: from x_t at a student timestep t the teacher takes two deterministic DDIM steps to x_s; the
student's target x̃ is the clean image whose single DDIM step from t lands on x_s,

    x̃ = (x_s − (σ_s / σ_t)·x_t) / (α_s − (σ_s / σ_t)·α_t),

learned in x-space with the truncated-SNR weight max(α_t² / σ_t², 1). The first round's teacher is the
base model run with classifier-free guidance at ``guidance`` (so the student bakes guidance in, as
released few-step models do); later rounds' teachers are the previous student, unguided. With
``guidance=0`` the same recipe gives the *unguided student*, the control that separates what guidance
does to diversity from what step distillation does.
"""
from __future__ import annotations

import copy
from dataclasses import replace
from typing import Any

import torch
from torch import nn

from workbench.devices import resolve_device
from workbench.train.diffusion import (
    EMA, NULL_CLASS, NUM_TRAIN_TIMESTEPS, DiffusionConfig, alphas, cached, check_finite, digit_images,
    scheduler, trained_ddpm,
)

__all__ = ["ddim_step", "distilled_ddpm", "student_target"]


def _v(model: nn.Module, x: torch.Tensor, t: torch.Tensor, labels: torch.Tensor, guidance: float) -> torch.Tensor:
    """The model's v, with classifier-free guidance uncond + s·(cond − uncond) when ``guidance`` > 1."""
    if guidance <= 1:
        return model(x, t, class_labels=labels).sample
    null = torch.full_like(labels, NULL_CLASS)
    uncond, cond = model(torch.cat([x, x]), torch.cat([t, t]), class_labels=torch.cat([null, labels])).sample.chunk(2)
    return uncond + guidance * (cond - uncond)


def ddim_step(x: torch.Tensor, v: torch.Tensor, at: tuple[torch.Tensor, torch.Tensor],
              to: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    """One deterministic DDIM step of a v-prediction model from noise level ``at = (α_t, σ_t)`` to ``to``:
    x̂0 = α_t·x − σ_t·v, ε̂ = σ_t·x + α_t·v, x_s = α_s·x̂0 + σ_s·ε̂ (diffusers' DDIM step with eta 0).

    Example:
        >>> x, v = torch.ones(1), torch.zeros(1)
        >>> round(ddim_step(x, v, (torch.tensor(0.6), torch.tensor(0.8)), (torch.tensor(1.0), torch.tensor(0.0))).item(), 6)
        0.6
    """
    (alpha_t, sigma_t), (alpha_s, sigma_s) = at, to
    x0, noise = alpha_t * x - sigma_t * v, sigma_t * x + alpha_t * v
    return alpha_s * x0 + sigma_s * noise


def student_target(x_t: torch.Tensor, x_s: torch.Tensor, at: tuple[torch.Tensor, torch.Tensor],
                   to: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    """The clean image x̃ whose DDIM step from ``at`` lands on ``x_s`` at ``to``:
    x̃ = (x_s − (σ_s/σ_t)·x_t) / (α_s − (σ_s/σ_t)·α_t).

    Example:
        >>> at, to = (torch.tensor(0.6), torch.tensor(0.8)), (torch.tensor(0.8), torch.tensor(0.6))
        >>> x0, noise = torch.tensor([0.5]), torch.tensor([-1.0])
        >>> x_t, x_s = 0.6 * x0 + 0.8 * noise, 0.8 * x0 + 0.6 * noise
        >>> round(student_target(x_t, x_s, at, to).item(), 6)
        0.5
    """
    (alpha_t, sigma_t), (alpha_s, sigma_s) = at, to
    ratio = sigma_s / sigma_t
    return (x_s - ratio * x_t) / (alpha_s - ratio * alpha_t)


def _distill_round(teacher: nn.Module, teacher_steps: int, guidance: float, config: DiffusionConfig,
                   round_index: int, device: torch.device, progress: bool) -> tuple[nn.Module, list[float]]:
    """One round: a student of ``teacher_steps // 2`` steps learns two teacher steps per step."""
    from tqdm.auto import tqdm

    images, labels = digit_images("train", config.size)
    schedule = scheduler()
    stride = NUM_TRAIN_TIMESTEPS // teacher_steps  # a teacher step's length; the student's is twice it
    student_levels = torch.arange(NUM_TRAIN_TIMESTEPS - 1, -1, -2 * stride)  # trailing timesteps
    generator = torch.Generator().manual_seed(config.seed + 1000 * (round_index + 1))
    teacher = teacher.to(device).eval().requires_grad_(False)
    student = copy.deepcopy(teacher).requires_grad_(True).train()
    ema = EMA(student, config.ema)
    optimizer = torch.optim.AdamW(student.parameters(), lr=config.distill_lr)
    cosine = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, config.distill_iterations)
    losses: list[float] = []
    desc = f"distil {teacher_steps}→{teacher_steps // 2} steps"
    for step in tqdm(range(config.distill_iterations), desc=desc, disable=not progress, leave=False):
        index = torch.randint(0, len(images), (config.batch_size,), generator=generator)
        x0, y = images[index].to(device), labels[index].to(device)
        t = student_levels[torch.randint(0, len(student_levels), (len(x0),), generator=generator)]
        noise = torch.randn(x0.shape, generator=generator).to(device)
        at, middle, to = (tuple(part.to(device) for part in alphas(schedule, level))
                          for level in (t, t - stride, t - 2 * stride))
        x_t = at[0] * x0 + at[1] * noise
        with torch.no_grad():
            x_mid = ddim_step(x_t, _v(teacher, x_t, t.to(device), y, guidance), at, middle)
            x_s = ddim_step(x_mid, _v(teacher, x_mid, (t - stride).to(device), y, guidance), middle, to)
            target = student_target(x_t, x_s, at, to)
        x0_student = at[0] * x_t - at[1] * student(x_t, t.to(device), class_labels=y).sample
        weight = (at[0] ** 2 / at[1] ** 2).clamp(min=1.0)
        loss = (weight * (x0_student - target).pow(2)).mean()
        losses.append(check_finite(loss, desc, step + 1))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        cosine.step()
        ema.update(student)
    return ema.model, losses


def distilled_ddpm(config: DiffusionConfig | None = None, *, guided: bool = True,
                   device: str | torch.device = "auto", progress: bool = True, **overrides: Any) -> nn.Module:
    """The digits DDPM (:func:`workbench.train.diffusion.trained_ddpm`) progressively distilled from
    ``base_steps`` to ``student_steps`` DDIM steps, from the cache when present.

    ``guided=True``: the first round learns from the base run with classifier-free guidance at
    ``config.guidance``; ``guided=False``: the unguided-student control (guidance 0 throughout). Sample
    the student with :func:`workbench.train.diffusion.scheduler` at ``student_steps`` steps and no
    guidance. Returns it on the CPU in eval mode with its record as ``model.diffusion_record``
    (``extra["rounds"]``: each round's teacher and student steps and mean loss per tenth).

    Example:
        >>> student = distilled_ddpm(widths=(8, 16), epochs=1, base_steps=8, distill_iterations=2,
        ...                          progress=False)
        >>> [entry["steps"] for entry in student.diffusion_record.extra["rounds"]]
        [[8, 4]]
    """
    from workbench.train.diffusion import loss_summary

    config = replace(config or DiffusionConfig(), **overrides)
    if config.rounds == 0:
        raise ValueError(f"student_steps={config.student_steps} equals base_steps: there is nothing to distil")
    guidance = config.guidance if guided else 0.0
    device = resolve_device(device)
    kind = "student_guided" if guided else "student_unguided"
    settings = {**config.base_settings(), "base_steps": config.base_steps, "student_steps": config.student_steps,
                "distill_iterations": config.distill_iterations, "distill_lr": config.distill_lr,
                "guidance": guidance}

    def train():
        model = trained_ddpm(config, device=device, progress=progress)
        losses_all, rounds = [], []
        for round_index in range(config.rounds):
            steps = config.base_steps // 2**round_index
            model, losses = _distill_round(model, steps, guidance if round_index == 0 else 0.0, config,
                                           round_index, device, progress)
            rounds.append({"steps": [steps, steps // 2], "losses": list(loss_summary(losses))})
            losses_all += losses
        return model, losses_all, {"rounds": rounds, "guidance": guidance}

    return cached(kind, settings, config, train)
