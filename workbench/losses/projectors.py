"""Student-side projectors that bring student features to the teacher's width, size and layout.

Three layouts: vectors ``[n, d]``, tokens ``[n, t, d]`` (ViT / transformer) and maps ``[n, c, h, w]``.

- vectors, or tokens with equal counts: a ``Linear(d_s, d_t)`` on the last dimension;
- maps (and tokens that must change count or become a map): a 1×1 conv (+ BatchNorm) from the student's
  to the teacher's channels, then a spatial resize to the teacher's grid (adaptive average pooling when
  the student grid is larger, bilinear interpolation otherwise);
- tokens <-> maps: ``t`` tokens are a ``√t × √t`` grid; a leading cls token (``t - 1`` a square) is
  dropped, from the student before projecting and from the teacher before comparing
  (:meth:`Projector.teacher_view`), because it has no place on a grid.

The same spirit as OFA-KD (Hao et al. 2023, https://arxiv.org/abs/2310.19444), kept to linear maps.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

LAYOUTS = {2: "vector", 3: "tokens", 4: "map"}


def layout_of(shape: tuple[int, ...]) -> str:
    """``"vector"``, ``"tokens"`` or ``"map"`` for a batch shape.

    Example:
        >>> layout_of((8, 197, 384)), layout_of((8, 64, 7, 7))
        ('tokens', 'map')
    """
    if len(shape) not in LAYOUTS:
        raise ValueError(
            f"features must be vectors [n, d], tokens [n, t, d] or maps [n, c, h, w]; got shape {tuple(shape)}"
        )
    return LAYOUTS[len(shape)]


def grid_of(tokens: int) -> tuple[int, int]:
    """``(side, prefix)``: ``tokens - prefix == side²`` with no prefix or one leading cls token.

    Example:
        >>> grid_of(196), grid_of(197)
        ((14, 0), (14, 1))
    """
    for prefix in (0, 1):
        side = math.isqrt(max(tokens - prefix, 0))
        if side > 0 and side * side == tokens - prefix:
            return side, prefix
    raise ValueError(f"cannot arrange {tokens} tokens on a square grid (with or without one leading cls token)")


def tokens_to_map(tokens: torch.Tensor) -> torch.Tensor:
    """``[n, t, d]`` -> ``[n, d, √t, √t]`` (a leading cls token dropped).

    Example:
        >>> tokens_to_map(torch.zeros(2, 17, 8)).shape
        torch.Size([2, 8, 4, 4])
    """
    side, prefix = grid_of(tokens.shape[1])
    patches = tokens[:, prefix:]
    return patches.transpose(1, 2).reshape(tokens.shape[0], tokens.shape[2], side, side)


def map_to_tokens(feature_map: torch.Tensor) -> torch.Tensor:
    """``[n, c, h, w]`` -> ``[n, h·w, c]`` (row-major positions, as ViT patch tokens).

    Example:
        >>> map_to_tokens(torch.zeros(2, 8, 4, 4)).shape
        torch.Size([2, 16, 8])
    """
    return feature_map.flatten(2).transpose(1, 2)


def resize(feature_map: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Resize ``[n, c, h, w]`` to ``size``: adaptive average pool when shrinking, bilinear otherwise.

    Example:
        >>> resize(torch.ones(1, 1, 4, 4), (2, 2)).shape
        torch.Size([1, 1, 2, 2])
    """
    height, width = feature_map.shape[-2:]
    if (height, width) == tuple(size):
        return feature_map
    if height >= size[0] and width >= size[1]:
        return F.adaptive_avg_pool2d(feature_map, size)
    return F.interpolate(feature_map, size=size, mode="bilinear", align_corners=False)


class Projector(nn.Module):
    """Maps student features of one shape to the teacher's; see the module docstring for the rules.

    Example:
        >>> projector = Projector((8, 16, 8, 8), (8, 32, 4, 4))
        >>> projector(torch.randn(8, 16, 8, 8)).shape
        torch.Size([8, 32, 4, 4])
    """

    def __init__(self, student_shape: tuple[int, ...], teacher_shape: tuple[int, ...]) -> None:
        super().__init__()
        student_layout, teacher_layout = layout_of(student_shape), layout_of(teacher_shape)
        self.student_shape, self.teacher_shape = tuple(student_shape[1:]), tuple(teacher_shape[1:])
        self.teacher_prefix, self.size = 0, None
        self.student_tokens = student_layout == "tokens"
        self.teacher_tokens = teacher_layout == "tokens"
        width_in, width_out = student_shape[-1], teacher_shape[-1]
        if "vector" in (student_layout, teacher_layout) and student_layout != teacher_layout:
            raise ValueError(
                f"cannot project {student_layout} {tuple(student_shape)} onto {teacher_layout} {tuple(teacher_shape)}: "
                "pool the map / tokens to a vector first, or give both sides as maps or tokens"
            )
        same_token_count = self.student_tokens and self.teacher_tokens and student_shape[1] == teacher_shape[1]
        self.linear = student_layout == "vector" or same_token_count
        if self.linear:
            self.body = nn.Linear(width_in, width_out) if width_in != width_out else nn.Identity()
            return
        if self.student_tokens:
            width_in = student_shape[2]
            grid_of(student_shape[1])  # fails early if the tokens are not a square grid
        else:
            width_in = student_shape[1]
        if self.teacher_tokens:
            side, self.teacher_prefix = grid_of(teacher_shape[1])
            width_out, self.size = teacher_shape[2], (side, side)
        else:
            width_out, self.size = teacher_shape[1], tuple(teacher_shape[2:])
        if self.student_tokens and self.teacher_tokens:  # a linear map per token, then a grid resize
            self.body = nn.Conv2d(width_in, width_out, 1) if width_in != width_out else nn.Identity()
        elif width_in != width_out:
            self.body = nn.Sequential(nn.Conv2d(width_in, width_out, 1, bias=False), nn.BatchNorm2d(width_out))
        else:
            self.body = nn.Identity()

    def forward(self, student: torch.Tensor) -> torch.Tensor:
        same_layout = student.dim() == len(self.student_shape) + 1
        if self.linear:
            fits = student.shape[-1] == self.student_shape[-1]
        else:
            fits = tuple(student.shape[1:]) == self.student_shape
        if not (same_layout and fits):
            raise ValueError(
                f"this projector was built for student features [n, {', '.join(map(str, self.student_shape))}], "
                f"got {tuple(student.shape)}; use one term per layer pair"
            )
        if self.linear:
            return self.body(student)
        features = tokens_to_map(student) if self.student_tokens else student
        features = resize(self.body(features), self.size)
        return map_to_tokens(features) if self.teacher_tokens else features

    def teacher_view(self, teacher: torch.Tensor) -> torch.Tensor:
        """The teacher as compared: without its cls token when the student side is a grid."""
        return teacher[:, self.teacher_prefix:] if self.teacher_prefix else teacher


def make_projector(student_shape: tuple[int, ...], teacher_shape: tuple[int, ...]) -> Projector:
    """A projector from student features of ``student_shape`` to the teacher's ``teacher_shape``.

    Shapes include the batch dimension. Equal shapes give a parameter-free identity.

    Example:
        >>> projector = make_projector((4, 64, 14, 14), (4, 197, 384))  # CNN student, ViT teacher
        >>> student_out = projector(torch.randn(4, 64, 14, 14))
        >>> student_out.shape, projector.teacher_view(torch.randn(4, 197, 384)).shape
        (torch.Size([4, 196, 384]), torch.Size([4, 196, 384]))
    """
    return Projector(tuple(student_shape), tuple(teacher_shape))
