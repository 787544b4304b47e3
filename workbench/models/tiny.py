"""Built-in tiny networks that train in seconds on a laptop CPU.

Every network carries a timm-style ``feature_info`` list (``{"module", "num_chs", "reduction"}`` per
stage) so that the ``"stages"`` layer selector treats them like any timm model.
"""
from __future__ import annotations

from typing import Any, Sequence

import torch
from torch import nn

__all__ = ["TinyCNN", "BenchCNN", "TinyMLP", "GlobalAvgPool", "tiny_vit", "tiny_mixer", "TinyResNet"]


class GlobalAvgPool(nn.Module):
    """Average over the spatial dimensions: ``[n, c, h, w] -> [n, c]`` (one hookable module)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.mean(dim=(2, 3))


def _conv_bn_relu(in_chs: int, out_chs: int) -> list[nn.Module]:
    return [
        nn.Conv2d(in_chs, out_chs, kernel_size=3, padding=1, bias=False),
        nn.BatchNorm2d(out_chs),
        nn.ReLU(inplace=True),
    ]


class TinyCNN(nn.Module):
    """Conv-BN-ReLU blocks, a 2x2 max-pool at the start of every block after the first, GAP, linear head.

    Modules: ``blocks.0 .. blocks.{k-1}``, ``pool``, ``head``. Block ``i`` outputs
    ``[n, widths[i], img_size / 2**i, img_size / 2**i]``.

    Example:
        >>> import torch
        >>> from workbench.models.tiny import TinyCNN
        >>> TinyCNN(widths=(8, 16))(torch.zeros(2, 1, 32, 32)).shape
        torch.Size([2, 10])
    """

    def __init__(
        self,
        widths: Sequence[int] = (32, 64, 128),
        in_chans: int = 1,
        num_classes: int = 10,
        img_size: int = 32,
    ) -> None:
        super().__init__()
        if not widths:
            raise ValueError("TinyCNN needs at least one width, e.g. widths=(32, 64, 128)")
        self.img_size = img_size
        blocks: list[nn.Module] = []
        in_chs = in_chans
        for index, width in enumerate(widths):
            layers = [nn.MaxPool2d(2)] if index > 0 else []
            blocks.append(nn.Sequential(*layers, *_conv_bn_relu(in_chs, int(width))))
            in_chs = int(width)
        self.blocks = nn.Sequential(*blocks)
        self.pool = GlobalAvgPool()
        self.head = nn.Linear(in_chs, num_classes)
        self.num_classes = num_classes
        self.feature_info = [
            {"module": f"blocks.{i}", "num_chs": int(w), "reduction": 2**i} for i, w in enumerate(widths)
        ]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.pool(self.blocks(x)))


class BenchCNN(nn.Module):
    """Benchmark workload W1: six conv3x3-BN-ReLU blocks, max-pool after blocks 1 and 3 (0-based).

    Widths ``(32, 32, 64, 64, 128, 128) * width_mult``; the pools sit *between* blocks (not inside
    them), so hooking ``blocks.1`` gives the pre-pool 32x32 map. Modules: ``blocks.0 .. blocks.5``,
    ``pool``, ``head``.

    Example:
        >>> import torch
        >>> from workbench.models.tiny import BenchCNN
        >>> BenchCNN(width_mult=0.5)(torch.zeros(2, 3, 32, 32)).shape
        torch.Size([2, 10])
    """

    base_widths = (32, 32, 64, 64, 128, 128)
    pool_after = (1, 3)

    def __init__(
        self, width_mult: float = 1.0, in_chans: int = 3, num_classes: int = 10, img_size: int = 32
    ) -> None:
        super().__init__()
        widths = [max(1, int(round(w * width_mult))) for w in self.base_widths]
        self.img_size = img_size
        self.num_classes = num_classes
        in_chs = in_chans
        blocks = []
        for width in widths:
            blocks.append(nn.Sequential(*_conv_bn_relu(in_chs, width)))
            in_chs = width
        self.blocks = nn.ModuleList(blocks)
        # One max-pool module per use, so a hook on ``downsample.0`` fires once per forward.
        self.downsample = nn.ModuleList(nn.MaxPool2d(2) for _ in self.pool_after)
        self.pool = GlobalAvgPool()
        self.head = nn.Linear(in_chs, num_classes)
        reductions, reduction = [], 1
        for index in range(len(widths)):
            reductions.append(reduction)
            if index in self.pool_after:
                reduction *= 2
        self.feature_info = [
            {"module": f"blocks.{i}", "num_chs": w, "reduction": r}
            for i, (w, r) in enumerate(zip(widths, reductions))
        ]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for index, block in enumerate(self.blocks):
            x = block(x)
            if index in self.pool_after:
                x = self.downsample[self.pool_after.index(index)](x)
        return self.head(self.pool(x))


class TinyMLP(nn.Module):
    """Flatten, Linear-ReLU layers ``layers.0 ..``, then a linear ``head``.

    ``in_features`` defaults to ``in_chans * img_size * img_size``.

    Example:
        >>> import torch
        >>> from workbench.models.tiny import TinyMLP
        >>> TinyMLP(hidden=(16,))(torch.zeros(2, 1, 32, 32)).shape
        torch.Size([2, 10])
    """

    def __init__(
        self,
        in_features: int | None = None,
        hidden: Sequence[int] = (256, 128),
        num_classes: int = 10,
        in_chans: int = 1,
        img_size: int = 32,
    ) -> None:
        super().__init__()
        in_features = int(in_features or in_chans * img_size * img_size)
        self.flatten = nn.Flatten()
        layers = []
        width = in_features
        for out in hidden:
            layers.append(nn.Sequential(nn.Linear(width, int(out)), nn.ReLU(inplace=True)))
            width = int(out)
        self.layers = nn.Sequential(*layers)
        self.head = nn.Linear(width, num_classes)
        self.num_classes = num_classes
        self.feature_info = [
            {"module": f"layers.{i}", "num_chs": int(w), "reduction": 1} for i, w in enumerate(hidden)
        ]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.layers(self.flatten(x)))


def tiny_vit(
    img_size: int = 32,
    patch_size: int = 4,
    in_chans: int = 1,
    dim: int = 64,
    depth: int = 4,
    heads: int = 4,
    num_classes: int = 10,
    **kwargs: Any,
) -> nn.Module:
    """A tiny timm ``VisionTransformer``; blocks ``blocks.0 ..`` output ``[n, tokens, dim]``.

    Extra keyword arguments go to ``timm.models.vision_transformer.VisionTransformer``.

    Example:
        >>> import torch
        >>> from workbench.models.tiny import tiny_vit
        >>> tiny_vit(depth=2)(torch.zeros(2, 1, 32, 32)).shape
        torch.Size([2, 10])
    """
    from timm.models.vision_transformer import VisionTransformer

    model = VisionTransformer(
        img_size=img_size,
        patch_size=patch_size,
        in_chans=in_chans,
        embed_dim=dim,
        depth=depth,
        num_heads=heads,
        num_classes=num_classes,
        **kwargs,
    )
    if not getattr(model, "feature_info", None):
        model.feature_info = _block_stages(depth, dim, patch_size)
    return model


def tiny_mixer(
    img_size: int = 32,
    patch_size: int = 4,
    in_chans: int = 1,
    dim: int = 64,
    depth: int = 4,
    num_classes: int = 10,
    mlp_ratio: float | tuple[float, float] = (0.5, 4.0),
    **kwargs: Any,
) -> nn.Module:
    """A tiny timm ``MlpMixer`` (Tolstikhin et al. 2021) sized for small images: ``depth`` mixer blocks
    ``blocks.0 ..`` of width ``dim`` over ``(img_size / patch_size)²`` tokens, each giving
    ``[n, tokens, dim]``; then a LayerNorm, the token mean and a linear ``head``.

    timm's registered names (``mixer_s16_224``, ...) fix their patch size, so a mixer for 32-pixel images
    is built here from the class itself. ``mlp_ratio``: the token-mixing and channel-mixing MLPs' widths
    as multiples of ``dim`` (timm's default ``(0.5, 4.0)``); extra keyword arguments go to
    ``timm.models.mlp_mixer.MlpMixer``. ``img_size`` must be a multiple of ``patch_size``.

    Example:
        >>> import torch
        >>> from workbench.models.tiny import tiny_mixer
        >>> model = tiny_mixer(depth=2, dim=32)
        >>> model(torch.zeros(2, 1, 32, 32)).shape
        torch.Size([2, 10])
        >>> [info["module"] for info in model.feature_info], model.feature_info[0]["num_chs"]
        (['blocks.0', 'blocks.1'], 32)
    """
    from timm.models.mlp_mixer import MlpMixer

    if img_size % patch_size:
        raise ValueError(f"tiny_mixer: img_size {img_size} is not a multiple of patch_size {patch_size}")
    model = MlpMixer(
        img_size=img_size,
        patch_size=patch_size,
        in_chans=in_chans,
        embed_dim=dim,
        num_blocks=depth,
        num_classes=num_classes,
        mlp_ratio=mlp_ratio,
        **kwargs,
    )
    model.img_size = img_size
    model.feature_info = _block_stages(depth, dim, patch_size)  # timm's own, as a plain list (any timm version)
    return model


def _block_stages(depth: int, dim: int, patch_size: int) -> list[dict[str, Any]]:
    """A timm-style ``feature_info``: each of the ``depth`` token blocks ``blocks.i`` is a stage of width ``dim``."""
    return [{"module": f"blocks.{i}", "num_chs": dim, "reduction": patch_size} for i in range(depth)]


class TinyResNet(nn.Module):
    """A small ResNet of timm ``BasicBlock``s for small images: a 3x3 conv-BN-ReLU ``stem`` (no max-pool),
    stages ``stages.0 ..`` of ``blocks`` blocks each (stride 2 at the start of every stage after the
    first, a 1x1 conv-BN shortcut where the shape changes), GAP ``pool``, linear ``head``.

    timm's ``ResNet`` class always runs four stages behind a stride-4 stem, so the blocks are assembled here.
    Stage ``i`` outputs ``[n, widths[i], img_size / 2**i, img_size / 2**i]``.

    Example:
        >>> import torch
        >>> model = TinyResNet(widths=(8, 16))
        >>> model(torch.zeros(2, 1, 32, 32)).shape, [d["module"] for d in model.feature_info]
        (torch.Size([2, 10]), ['stages.0', 'stages.1'])
    """

    def __init__(self, widths: Sequence[int] = (16, 32, 64), blocks: int = 1, in_chans: int = 1,
                 num_classes: int = 10, img_size: int = 32) -> None:
        super().__init__()
        from timm.models.resnet import BasicBlock

        widths = [int(w) for w in widths]
        if not widths or min(widths) < 1 or int(blocks) < 1:
            raise ValueError(f"TinyResNet needs widths >= 1 and blocks >= 1, got widths={widths}, blocks={blocks}; "
                             "e.g. widths=(16, 32, 64), blocks=1")
        self.img_size, self.num_classes = img_size, num_classes
        self.stem = nn.Sequential(*_conv_bn_relu(in_chans, widths[0]))
        stages, in_chs = [], widths[0]
        for index, width in enumerate(widths):
            stride = 1 if index == 0 else 2
            layers = []
            for block in range(int(blocks)):
                shortcut = None
                if block == 0 and (stride != 1 or in_chs != width):
                    shortcut = nn.Sequential(nn.Conv2d(in_chs, width, 1, stride, bias=False), nn.BatchNorm2d(width))
                layers.append(BasicBlock(in_chs, width, stride if block == 0 else 1, shortcut))
                in_chs = width
            stages.append(nn.Sequential(*layers))
        self.stages = nn.Sequential(*stages)
        self.pool = GlobalAvgPool()
        self.head = nn.Linear(in_chs, num_classes)
        self.feature_info = [{"module": f"stages.{i}", "num_chs": w, "reduction": 2**i} for i, w in enumerate(widths)]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.pool(self.stages(self.stem(x))))
