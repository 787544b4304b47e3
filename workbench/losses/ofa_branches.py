"""OFA-KD's branches: small trainable heads that project one student stage into the logit space.

Two families, chosen from the stage's output shape (or forced with ``family=``):

- ``"cnn"``, maps ``[n, c, h, w]``: stage ``i`` of ``S`` gets ``S − i`` stride-2 depthwise-separable
  conv blocks (:class:`SepConv`) with doubling channels, the last producing ``width`` channels; the last
  stage gets a 1×1 conv to ``width``. Then global average pooling and a linear layer to the classes.
- ``"tokens"``, ViT / MLP-Mixer tokens ``[n, t, d]``: the patch tokens are merged 2×2
  (:class:`PatchMerging`, Swin's) until the grid side is at most ``target_grid`` — the number of merges
  comes from the actual grid (an odd side is zero-padded, so 7 → 4 and 5 → 3), not from a 224-pixel
  table; leading class tokens pass around the merges. Then ``max(S − i, 1)`` transformer blocks of
  ``width`` (timm's ``Block``, 4 heads or the most of 3, 2, 1 that divide the width), then the class
  token (or the mean of the tokens when there is none) and a linear layer.

A forced family converts the layout first: tokens become a ``√t × √t`` map for ``"cnn"``, a map becomes
``h·w`` tokens for ``"tokens"``. The authors' code (Hao et al. 2023, github.com/Hao840/OFAKD) has the
same blocks for four-stage, 224-pixel ImageNet models, with a final grid of 7.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

FAMILIES = ("cnn", "tokens")


def branch_family(shape: tuple[int, ...], family: str | None = None, layer: str = "stage") -> str:
    """The branch family for features of ``shape`` (batch included): ``"cnn"`` for maps, ``"tokens"`` for
    token sequences; ``family`` forces one. Any other shape is a ``ValueError`` naming ``layer``.

    Example:
        >>> branch_family((8, 32, 16, 16)), branch_family((8, 65, 96)), branch_family((8, 65, 96), "cnn")
        ('cnn', 'tokens', 'cnn')
    """
    if family is not None and family not in FAMILIES:
        raise ValueError(f"family must be one of {FAMILIES} or None (detect from the shape), got {family!r}")
    if len(shape) not in (3, 4):
        raise ValueError(
            f"OFA branch at {layer!r}: its output has shape {tuple(shape)}, neither a map [n, c, h, w] (CNN) nor "
            "tokens [n, t, d] (ViT, MLP-Mixer); choose stages that output one of those (stages=[...])"
        )
    return family or ("cnn" if len(shape) == 4 else "tokens")


def token_grid(tokens: int, prefix: int | None, layer: str = "stage") -> tuple[int, int]:
    """``(side, prefix)`` of ``tokens`` = ``prefix`` class tokens + a ``side × side`` patch grid.

    ``prefix=None`` tries 0, then 1 class token. A count that fits no square grid is a ``ValueError``.

    Example:
        >>> token_grid(65, None), token_grid(36, 0), token_grid(50, 1)
        ((8, 1), (6, 0), (7, 1))
    """
    for count in ((0, 1) if prefix is None else (prefix,)):
        side = math.isqrt(max(tokens - count, 0))
        if side > 0 and side * side == tokens - count:
            return side, count
    told = "0 or 1 class tokens" if prefix is None else f"{prefix} class token(s)"
    raise ValueError(f"OFA branch at {layer!r}: {tokens} tokens are not {told} plus a square patch grid; "
                     "give the model's num_prefix_tokens or choose another stage")


def merges_for(side: int, target_grid: int) -> int:
    """How many 2×2 merges (odd sides padded) bring a ``side × side`` grid to at most ``target_grid``.

    Example:
        >>> merges_for(8, 4), merges_for(14, 4), merges_for(7, 4), merges_for(4, 4), merges_for(5, 4)
        (1, 2, 1, 0, 1)
    """
    merges = 0
    while side > target_grid:
        side, merges = -(-side // 2), merges + 1
    return merges


def heads_for(width: int) -> int:
    """Attention heads of a branch block: 4, or the most of 3, 2, 1 that divide ``width``.

    Example:
        >>> heads_for(96), heads_for(30), heads_for(10), heads_for(7)
        (4, 3, 2, 1)
    """
    return next(heads for heads in (4, 3, 2, 1) if width % heads == 0)


class SepConv(nn.Sequential):
    """Depthwise-separable block that halves the map: dw 3×3 stride 2, 1×1, BN, ReLU, dw 3×3, 1×1, BN, ReLU.

    Example:
        >>> SepConv(8, 16)(torch.zeros(2, 8, 7, 7)).shape
        torch.Size([2, 16, 4, 4])
    """

    def __init__(self, channels_in: int, channels_out: int) -> None:
        super().__init__(
            nn.Conv2d(channels_in, channels_in, 3, stride=2, padding=1, groups=channels_in, bias=False),
            nn.Conv2d(channels_in, channels_in, 1, bias=False),
            nn.BatchNorm2d(channels_in),
            nn.ReLU(),
            nn.Conv2d(channels_in, channels_in, 3, padding=1, groups=channels_in, bias=False),
            nn.Conv2d(channels_in, channels_out, 1, bias=False),
            nn.BatchNorm2d(channels_out),
            nn.ReLU(),
        )


class PatchMerging(nn.Module):
    """Swin's patch merging: each 2×2 neighbourhood of a ``side × side`` grid of ``[n, side², d]`` tokens
    becomes one token (concatenated, LayerNorm, linear to ``width_out``); an odd side is zero-padded.

    Example:
        >>> PatchMerging(7, 16, 32)(torch.zeros(2, 49, 16)).shape
        torch.Size([2, 16, 32])
    """

    def __init__(self, side: int, width_in: int, width_out: int, activation: bool = True) -> None:
        super().__init__()
        self.side = side
        self.norm = nn.LayerNorm(4 * width_in)
        self.reduction = nn.Linear(4 * width_in, width_out, bias=False)
        self.act = nn.GELU() if activation else nn.Identity()

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        n, _, width = tokens.shape
        grid = tokens.reshape(n, self.side, self.side, width)
        if self.side % 2:
            grid = F.pad(grid, (0, 0, 0, 1, 0, 1))
        merged = torch.cat([grid[:, 0::2, 0::2], grid[:, 1::2, 0::2], grid[:, 0::2, 1::2], grid[:, 1::2, 1::2]], -1)
        return self.act(self.reduction(self.norm(merged.reshape(n, -1, 4 * width))))


class Branch(nn.Module):
    """A stage -> logits head; subclasses check the input against the shape they were built for."""

    def __init__(self, shape: tuple[int, ...], layer: str, family: str) -> None:
        super().__init__()
        self.shape, self.layer, self.family = tuple(shape[1:]), layer, family

    def check(self, features: torch.Tensor) -> None:
        """A ``ValueError`` naming the layer unless ``features`` has the shape the branch was built for."""
        if not isinstance(features, torch.Tensor) or tuple(features.shape[1:]) != self.shape:
            got = tuple(features.shape) if isinstance(features, torch.Tensor) else type(features).__name__
            raise ValueError(f"the OFA branch of {self.layer!r} was built for features [n, "
                             f"{', '.join(map(str, self.shape))}], got {got}")

    def extra_repr(self) -> str:
        return f"layer={self.layer!r}, family={self.family!r}, input=[n, {', '.join(map(str, self.shape))}]"


class MapBranch(Branch):
    """The CNN branch (see the module docstring); tokens in (a forced ``"cnn"``) become a square map first.

    Example:
        >>> branch = MapBranch((2, 16, 8, 8), blocks=2, width=64, num_classes=10)
        >>> branch(torch.zeros(2, 16, 8, 8)).shape
        torch.Size([2, 10])
    """

    def __init__(self, shape: tuple[int, ...], blocks: int, width: int, num_classes: int, *,
                 prefix: int | None = None, layer: str = "stage") -> None:
        super().__init__(shape, layer, "cnn")
        self.prefix = None
        if len(shape) == 3:
            side, self.prefix = token_grid(shape[1], prefix, layer)
            channels = shape[2]
        else:
            channels = shape[1]
        if blocks == 0:
            body: list[nn.Module] = [nn.Conv2d(channels, width, 1)]
        else:
            body = []
            for index in range(blocks):
                out = width if index == blocks - 1 else 2 * channels
                body.append(SepConv(channels, out))
                channels = out
        self.body = nn.Sequential(*body)
        self.head = nn.Linear(width, num_classes)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        self.check(features)
        if self.prefix is not None:  # tokens -> [n, d, side, side]
            patches = features[:, self.prefix:]
            side = math.isqrt(patches.shape[1])
            features = patches.transpose(1, 2).reshape(features.shape[0], features.shape[2], side, side)
        return self.head(self.body(features).mean(dim=(2, 3)))


class TokenBranch(Branch):
    """The token branch (see the module docstring); a map in (a forced ``"tokens"``) becomes ``h·w`` tokens.

    Example:
        >>> branch = TokenBranch((2, 65, 32), blocks=1, width=32, num_classes=10, prefix=1)  # cls + 8×8
        >>> branch(torch.zeros(2, 65, 32)).shape, len(branch.merges)
        (torch.Size([2, 10]), 1)
    """

    def __init__(self, shape: tuple[int, ...], blocks: int, width: int, num_classes: int, *,
                 prefix: int | None = None, target_grid: int = 4, layer: str = "stage") -> None:
        from timm.models.vision_transformer import Block

        super().__init__(shape, layer, "tokens")
        self.from_map = len(shape) == 4
        if self.from_map:
            if shape[2] != shape[3]:
                raise ValueError(f"OFA branch at {layer!r}: a {shape[2]}×{shape[3]} map is not a square grid of tokens")
            side, self.prefix, channels = shape[2], 0, shape[1]
        else:
            (side, self.prefix), channels = token_grid(shape[1], prefix, layer), shape[2]
        count = merges_for(side, target_grid)
        merges = []
        for index in range(count):
            merges.append(PatchMerging(side, channels if index == 0 else width, width, activation=index < count - 1))
            side = -(-side // 2)
        self.merges = nn.Sequential(*merges)
        self.grid = side
        # without merges the width still has to become the blocks' width; class tokens follow the patches'
        self.widen = nn.Linear(channels, width) if count == 0 and channels != width else nn.Identity()
        self.widen_prefix = nn.Linear(channels, width) if channels != width and self.prefix else nn.Identity()
        self.blocks = nn.Sequential(*[Block(width, heads_for(width)) for _ in range(blocks)])
        self.head = nn.Linear(width, num_classes)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        self.check(features)
        if self.from_map:
            features = features.flatten(2).transpose(1, 2)
        prefix, patches = features[:, :self.prefix], features[:, self.prefix:]
        tokens = torch.cat([self.widen_prefix(prefix), self.widen(self.merges(patches))], dim=1)
        tokens = self.blocks(tokens)
        pooled = tokens[:, 0] if self.prefix else tokens.mean(dim=1)
        return self.head(pooled)


def init_branch(branch: nn.Module) -> nn.Module:
    """The authors' initialisation: Kaiming (fan-out) convs, truncated-normal (std 0.02) linears with zero
    bias, BatchNorm at 1 and 0. Returns ``branch``.

    Example:
        >>> float(init_branch(nn.Linear(4, 2)).bias.detach().abs().sum())
        0.0
    """
    for module in branch.modules():
        if isinstance(module, nn.Conv2d):
            nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(module, nn.BatchNorm2d):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Linear):
            nn.init.trunc_normal_(module.weight, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
    return branch


def make_branch(
    shape: tuple[int, ...],
    stage: int,
    num_stages: int,
    num_classes: int,
    width: int,
    *,
    family: str | None = None,
    prefix: int | None = None,
    target_grid: int = 4,
    layer: str = "stage",
) -> Branch:
    """The branch for stage ``stage`` (1-based) of ``num_stages`` whose features have ``shape`` (batch
    included): ``width`` is the CNN branch's last channel count, ``max(d_student, d_teacher)`` in OFA-KD, and
    the token branch's block width (the student's). ``prefix``: leading class tokens (``None``: 0 or 1, from
    the count). Initialised as :func:`init_branch`.

    Example:
        >>> make_branch((2, 32, 16, 16), 1, 3, 10, 128)(torch.zeros(2, 32, 16, 16)).shape  # 2 SepConv blocks
        torch.Size([2, 10])
        >>> make_branch((2, 65, 96), 4, 4, 10, 96).blocks.__len__()  # the last stage: max(S − i, 1) = 1 block
        1
    """
    if not 1 <= stage <= num_stages:
        raise ValueError(f"stage must be in 1..{num_stages}, got {stage}")
    if not isinstance(target_grid, int) or target_grid < 1:
        raise ValueError(f"target_grid must be a positive int, got {target_grid!r}")
    chosen = branch_family(tuple(shape), family, layer)
    if chosen == "cnn":
        branch: Branch = MapBranch(shape, num_stages - stage, width, num_classes, prefix=prefix, layer=layer)
    else:
        branch = TokenBranch(shape, max(num_stages - stage, 1), width, num_classes, prefix=prefix,
                             target_grid=target_grid, layer=layer)
    return init_branch(branch)
