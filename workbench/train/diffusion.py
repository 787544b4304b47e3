"""A tiny offline diffusion model: a class-conditional pixel-space DDPM (``diffusers.UNet2DModel`` from a
config) trained on the digits, cached on disk by its settings like :func:`workbench.train.trained`.

The model predicts v (Salimans & Ho 2022) on a cosine noise schedule of ``NUM_TRAIN_TIMESTEPS`` = 1024
steps, so that every power-of-two DDIM schedule with ``"trailing"`` spacing lands on whole timesteps and
two steps of an ``N``-step schedule are exactly one step of the ``N/2``-step one — what progressive
distillation (:mod:`workbench.train.progressive`) needs. Classes ``0 … 9`` are the digits, class 10 is
"no class" (labels are dropped to it with probability ``label_dropout`` in training), so the model can
be sampled with classifier-free guidance. Images are the digits' intensities mapped to [-1, 1].

diffusers is imported inside the functions, so ``workbench.train`` imports without it.
"""
from __future__ import annotations

import copy
import json
import math
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from torch import nn

from workbench import data as wb_data
from workbench import models
from workbench.devices import resolve_device
from workbench.files import write_atomic
from workbench.train.cache import cache_path, record_path

__all__ = [
    "DiffusionConfig", "DiffusionRecord", "NULL_CLASS", "NUM_TRAIN_TIMESTEPS", "classifier_input", "digit_images",
    "scheduler", "trained_ddpm", "unet",
]

NUM_TRAIN_TIMESTEPS = 1024
NUM_CLASSES = 10
NULL_CLASS = NUM_CLASSES  # the label read as "no class" (classifier-free guidance)
# Bump when what a cache entry means changes (the training loops), so old entries are not reused.
DIFFUSION_VERSION = 1
DIGIT_MAX = 16.0  # scikit-learn's digits are intensities 0 … 16


@dataclass(frozen=True)
class DiffusionConfig:
    """The settings of the tiny digits DDPM and of the students distilled from it (every one is hashed).

    ``widths``: the UNet's channels per level (the last level has self-attention); ``epochs`` of the
    digits' 1,347 training images in batches of ``batch_size`` at AdamW ``lr`` (cosine schedule), with an
    exponential moving average of the weights (``ema``) as the model; ``base_steps``: the base model's
    DDIM sampling steps, halved by each progressive-distillation round down to ``student_steps``, each
    round ``distill_iterations`` steps at ``distill_lr``; ``guidance``: the classifier-free guidance
    scale of the base run the guided student learns from.

    Example:
        >>> DiffusionConfig().rounds
        3
        >>> DiffusionConfig(base_steps=16, student_steps=4).rounds
        2
    """

    size: int = 8
    widths: tuple[int, ...] = (32, 64)
    epochs: int = 150
    batch_size: int = 128
    lr: float = 2e-3
    label_dropout: float = 0.1
    ema: float = 0.999
    base_steps: int = 32
    student_steps: int = 4
    distill_iterations: int = 400
    distill_lr: float = 3e-4
    guidance: float = 3.0
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("size", "epochs", "batch_size", "base_steps", "student_steps", "distill_iterations"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if not self.widths or any(isinstance(w, bool) or not isinstance(w, int) or w < 8 or w % 8 for w in self.widths):
            raise ValueError(f"widths must be channel counts that are multiples of 8, got {self.widths!r}")
        for name in ("lr", "distill_lr"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
                raise ValueError(f"{name} must be a finite positive number, got {value!r}")
        for name in ("label_dropout", "ema"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ValueError(f"{name} must lie in [0, 1), got {getattr(self, name)!r}")
        if not isinstance(self.guidance, (int, float)) or not math.isfinite(self.guidance) or (
                self.guidance < 0 or 0 < self.guidance < 1):
            raise ValueError(f"guidance must be 0 (or 1): no guidance, or a finite scale > 1, got {self.guidance!r}")
        for name in ("base_steps", "student_steps"):
            steps = getattr(self, name)
            if steps & (steps - 1) or NUM_TRAIN_TIMESTEPS % steps:
                raise ValueError(f"{name} must be a power of two dividing {NUM_TRAIN_TIMESTEPS}, got {steps}")
        if self.student_steps > self.base_steps:
            raise ValueError(f"student_steps={self.student_steps} is more than base_steps={self.base_steps}")
        if self.size < 2 ** (len(self.widths) - 1):
            raise ValueError(f"size {self.size} is too small for {len(self.widths)} UNet levels")
        object.__setattr__(self, "widths", tuple(self.widths))

    @property
    def rounds(self) -> int:
        """Progressive-distillation rounds from ``base_steps`` to ``student_steps`` (each halves the steps)."""
        return int(math.log2(self.base_steps // self.student_steps))

    def base_settings(self) -> dict[str, Any]:
        """What the base model's cache entry depends on (not the distillation's settings)."""
        distillation = ("base_steps", "student_steps", "distill_iterations", "distill_lr", "guidance")
        return {key: value for key, value in asdict(self).items() if key not in distillation}


@dataclass(frozen=True)
class DiffusionRecord:
    """How a cached diffusion model was trained: its kind (``"base"`` or a student's), its settings, the
    mean training loss of each tenth of the run (``losses``), and the seconds it took."""

    kind: str
    settings: dict
    losses: tuple[float, ...]
    seconds: float
    extra: dict = field(default_factory=dict)

    def to_json(self) -> str:
        """The record as JSON text (what the sidecar file holds)."""
        return json.dumps({**asdict(self), "losses": list(self.losses)}, indent=1) + "\n"

    @classmethod
    def from_json(cls, text: str) -> DiffusionRecord:
        """A record read back from :meth:`to_json` text."""
        fields = json.loads(text)
        return cls(**{**fields, "losses": tuple(float(value) for value in fields["losses"])})

    @property
    def learned(self) -> bool:
        """Whether the loss fell: the last tenth's mean below 90 % of the first's."""
        return len(self.losses) >= 2 and self.losses[-1] < 0.9 * self.losses[0]


def unet(config: DiffusionConfig | None = None) -> nn.Module:
    """The digits DDPM's network: a class-conditional ``UNet2DModel`` (11 class embeddings, the last
    one "no class") for 1-channel ``size`` × ``size`` images, self-attention at the lowest level.

    Example:
        >>> net = unet(DiffusionConfig(widths=(8, 16)))
        >>> net.config.num_class_embeds, net.config.sample_size
        (11, 8)
    """
    from diffusers import UNet2DModel

    config = config or DiffusionConfig()
    levels = len(config.widths)
    return UNet2DModel(
        sample_size=config.size, in_channels=1, out_channels=1, block_out_channels=config.widths,
        layers_per_block=1, norm_num_groups=8, num_class_embeds=NUM_CLASSES + 1,
        down_block_types=("DownBlock2D",) * (levels - 1) + ("AttnDownBlock2D",),
        up_block_types=("AttnUpBlock2D",) + ("UpBlock2D",) * (levels - 1),
    )


def scheduler(**overrides: Any):
    """A fresh ``DDIMScheduler`` for the digits DDPM: cosine schedule of 1024 steps, v-prediction,
    ``"trailing"`` spacing (the first step is at the last timestep, pure noise), no clipping.

    Example:
        >>> sampler = scheduler()
        >>> sampler.set_timesteps(4)
        >>> sampler.timesteps.tolist()
        [1023, 767, 511, 255]
    """
    from diffusers import DDIMScheduler

    settings = dict(num_train_timesteps=NUM_TRAIN_TIMESTEPS, beta_schedule="squaredcos_cap_v2",
                    prediction_type="v_prediction", clip_sample=False, set_alpha_to_one=True,
                    timestep_spacing="trailing")
    return DDIMScheduler(**{**settings, **overrides})


def digit_images(split: str = "train", size: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    """The digits of ``split`` as images in [-1, 1] ``[n, 1, size, size]`` (intensity / 8 − 1) and labels.

    The split is :func:`workbench.data.digits`'s (stratified, fixed).

    Example:
        >>> x, y = digit_images("test")
        >>> tuple(x.shape), float(x.min()), float(x.max())
        ((450, 1, 8, 8), -1.0, 1.0)
    """
    x, y = wb_data.digits(split, size=size, channels=1, normalise=False).tensors
    return x / (DIGIT_MAX / 2) - 1.0, y


def classifier_input(size: int = 8):
    """A function taking the DDPM's [-1, 1] images to the normalisation of :func:`workbench.data.digits`
    (the train split's mean and std), so a classifier :func:`workbench.train.trained` on the digits reads
    the samples as it read its training images.

    Example:
        >>> from workbench.data import digits
        >>> to_input = classifier_input(8)
        >>> torch.allclose(to_input(digit_images("test")[0]), digits("test", size=8).tensors[0], atol=1e-5)
        True
    """
    intensities = wb_data.digits("train", size=size, channels=1, normalise=False).tensors[0]
    mean, std = intensities.mean(), intensities.std()

    def to_input(images: torch.Tensor) -> torch.Tensor:
        return ((images + 1.0) * (DIGIT_MAX / 2) - mean) / std

    return to_input


def alphas(schedule: Any, timesteps: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(α_t, σ_t) = (√ᾱ_t, √(1 − ᾱ_t))`` at integer ``timesteps`` ([n, 1, 1, 1]; timestep −1 is the
    clean image, α = 1, σ = 0).

    Example:
        >>> a, s = alphas(scheduler(), torch.tensor([-1, 0]))
        >>> a.flatten().tolist()[0], s.flatten().tolist()[0]
        (1.0, 0.0)
    """
    cumulative = torch.cat([torch.ones(1, dtype=torch.float64), schedule.alphas_cumprod.double()])
    alpha_bar = cumulative[timesteps.long().cpu() + 1].float().to(timesteps.device)
    return alpha_bar.sqrt().view(-1, 1, 1, 1), (1 - alpha_bar).clamp(min=0).sqrt().view(-1, 1, 1, 1)


class EMA:
    """An exponential moving average of a model's weights (the model that is kept), with warm-up:
    decay min(ema, (1 + step) / (10 + step))."""

    def __init__(self, model: nn.Module, decay: float) -> None:
        self.model, self.decay, self.steps = copy.deepcopy(model).eval().requires_grad_(False), decay, 0

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        self.steps += 1
        decay = min(self.decay, (1 + self.steps) / (10 + self.steps))
        for average, current in zip(self.model.parameters(), model.parameters()):
            average.lerp_(current.detach(), 1 - decay)


def loss_summary(losses: list[float], parts: int = 10) -> tuple[float, ...]:
    """The mean of each of ``parts`` consecutive slices of a loss history.

    Example:
        >>> loss_summary([4.0, 2.0, 1.0, 1.0], parts=2)
        (3.0, 1.0)
    """
    if not losses:
        raise ValueError("no training step ran")
    parts = min(parts, len(losses))
    bounds = [round(index * len(losses) / parts) for index in range(parts + 1)]
    return tuple(float(sum(losses[a:b]) / (b - a)) for a, b in zip(bounds, bounds[1:]))


def check_finite(loss: torch.Tensor, kind: str, step: int) -> float:
    """``loss`` as a float, or a ``FloatingPointError`` naming the run and the step."""
    value = float(loss.detach())
    if not math.isfinite(value):
        raise FloatingPointError(f"{kind}: the loss is {value} at step {step}; nothing was cached")
    return value


def _train_base(config: DiffusionConfig, device: torch.device, progress: bool) -> tuple[nn.Module, list[float]]:
    from tqdm.auto import tqdm

    images, labels = digit_images("train", config.size)
    schedule = scheduler()
    generator = torch.Generator().manual_seed(config.seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.seed)
        model = unet(config).to(device)
    ema = EMA(model, config.ema)
    batches = math.ceil(len(images) / config.batch_size)
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.lr)
    cosine = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, config.epochs * batches)
    losses: list[float] = []
    model.train()
    with tqdm(total=config.epochs * batches, desc="DDPM base", disable=not progress, leave=False) as bar:
        for _ in range(config.epochs):
            order = torch.randperm(len(images), generator=generator)
            for index in order.split(config.batch_size):
                x0, y = images[index], labels[index].clone()
                y[torch.rand(len(y), generator=generator) < config.label_dropout] = NULL_CLASS
                t = torch.randint(0, NUM_TRAIN_TIMESTEPS, (len(x0),), generator=generator)
                noise = torch.randn(x0.shape, generator=generator)
                alpha, sigma = alphas(schedule, t)
                x_t, v = alpha * x0 + sigma * noise, alpha * noise - sigma * x0
                prediction = model(x_t.to(device), t.to(device), class_labels=y.to(device)).sample
                loss = (prediction - v.to(device)).pow(2).mean()
                losses.append(check_finite(loss, "DDPM base training", len(losses) + 1))
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                cosine.step()
                ema.update(model)
                bar.update()
    return ema.model, losses


def entry_path(kind: str, settings: dict[str, Any]) -> Path:
    """The cache file of a diffusion model of ``kind`` with ``settings`` (hashed with the torch version).

    Example:
        >>> entry_path("base", DiffusionConfig().base_settings()).name.startswith("ddpm_base-digits-")
        True
    """
    return cache_path(f"ddpm_{kind}", {**settings, "dataset": "digits", "kind": kind,
                                       "torch": torch.__version__, "version": DIFFUSION_VERSION})


def cached(kind: str, settings: dict[str, Any], config: DiffusionConfig, train) -> nn.Module:
    """The model of ``kind`` from the cache, or ``train()`` → ``(model, losses, extra)`` run and cached
    (weights as safetensors and a :class:`DiffusionRecord` beside them, both written atomically).
    The model comes back on the CPU in eval mode, its record as ``model.diffusion_record``."""
    path = entry_path(kind, settings)
    sidecar = record_path(path)
    model = unet(config)
    if path.is_file() and sidecar.is_file():
        models.load_weights(model, path)
        model.diffusion_record = DiffusionRecord.from_json(sidecar.read_text(encoding="utf-8"))
        return model.eval()
    began = time.perf_counter()
    trained_model, losses, extra = train()
    record = DiffusionRecord(kind, settings, loss_summary(losses), time.perf_counter() - began, extra)
    model.load_state_dict(trained_model.state_dict())
    path.parent.mkdir(parents=True, exist_ok=True)
    models.save_weights(model, path)
    write_atomic(sidecar, record.to_json())
    model.diffusion_record = record
    return model.eval()


def trained_ddpm(config: DiffusionConfig | None = None, *, device: str | torch.device = "auto",
                 progress: bool = True, **overrides: Any) -> nn.Module:
    """The base digits DDPM (:func:`unet`, v-prediction) trained with ``config`` (its fields can also be
    given as keywords), from the cache when present. Returns it on the CPU in eval mode; its
    :class:`DiffusionRecord` is ``model.diffusion_record``. Sample it with :func:`scheduler` and
    :func:`workbench.probes.dt.trajectory` (``null_class=NULL_CLASS`` for guidance).

    Example:
        >>> model = trained_ddpm(widths=(8, 16), epochs=1, progress=False)
        >>> model.diffusion_record.kind, len(model.diffusion_record.losses)
        ('base', 10)
    """
    config = replace(config or DiffusionConfig(), **overrides)
    device = resolve_device(device)

    def train():
        model, losses = _train_base(config, device, progress)
        return model, losses, {}

    return cached("base", config.base_settings(), config, train)
