"""The built-in MLP-Mixer ("mixer"): timm's MlpMixer sized for small images, its stages, its recipe family."""
from __future__ import annotations

import pytest
import torch

from workbench import models
from workbench.capture import capture, stage_names
from workbench.models.stats import count_parameters
from workbench.train.recipes import RECIPES, default_recipe, recipe_family


def mixer_parameters(in_chans: int, img: int, patch: int, dim: int, depth: int, classes: int,
                     ratios: tuple[float, float] = (0.5, 4.0)) -> int:
    """Parameters of an MLP-Mixer counted by hand (Tolstikhin et al. 2021): patch stem, per block two
    LayerNorms, a token-mixing and a channel-mixing MLP (two linear layers each), a final norm, a head."""
    tokens = (img // patch) ** 2
    token_hidden, channel_hidden = int(ratios[0] * dim), int(ratios[1] * dim)
    stem = in_chans * patch * patch * dim + dim
    block = (2 * 2 * dim + tokens * token_hidden + token_hidden + token_hidden * tokens + tokens
             + dim * channel_hidden + channel_hidden + channel_hidden * dim + dim)
    return stem + depth * block + 2 * dim + dim * classes + classes


@pytest.mark.parametrize("kwargs, img, tokens", [({}, 32, 64), ({"dim": 48, "depth": 2}, 32, 64),
                                                ({"patch_size": 8}, 32, 16), ({"img_size": 24, "dim": 16}, 24, 36)])
def test_mixer_stages_are_token_sequences_of_its_width(kwargs, img, tokens):
    model = models.create("mixer", **kwargs).eval()
    dim, depth = kwargs.get("dim", 64), kwargs.get("depth", 4)
    x = torch.randn(3, 1, img, img)
    assert stage_names(model) == [f"blocks.{i}" for i in range(depth)]
    with torch.no_grad(), capture(model, "stages") as activations:
        logits = model(x)
    assert logits.shape == (3, 10)
    assert {name: tuple(value.shape) for name, value in activations.items()} == {
        f"blocks.{i}": (3, tokens, dim) for i in range(depth)}
    assert [info["num_chs"] for info in model.feature_info] == [dim] * depth
    assert count_parameters(model) == mixer_parameters(1, img, kwargs.get("patch_size", 4), dim, depth, 10)


def test_mixer_takes_the_size_channels_and_classes_of_the_data():
    model = models.create_sized("mixer", 16, in_chans=3, num_classes=4, dim=8, depth=1)
    assert model.img_size == 16 and model(torch.zeros(2, 3, 16, 16)).shape == (2, 4)
    assert count_parameters(model) == mixer_parameters(3, 16, 4, 8, 1, 4)
    assert "mixer" in models.available()


def test_mixer_refuses_a_size_its_patches_do_not_tile():
    with pytest.raises(ValueError, match="img_size 30 is not a multiple of patch_size 4"):
        models.create("mixer", img_size=30)


def test_mixer_has_its_own_recipe_family():
    assert recipe_family("mixer") == "mixer" and default_recipe("mixer") is RECIPES["mixer"]
    assert (default_recipe("mixer").epochs, default_recipe("mixer").lr) == (20, 1e-3)
    assert recipe_family("mixer_s16_224") == "timm"  # timm's registered mixers stay timm models


def test_mixer_student_gets_token_branches_from_ofa_terms():
    from workbench.losses import ofa_terms
    from workbench.train import Distiller

    teacher, student = models.create("cnn", widths=(8, 16)).eval(), models.create("mixer", dim=16, depth=2)
    batch = (torch.randn(4, 1, 32, 32), torch.randint(0, 10, (4,)))
    setup = ofa_terms(teacher, student, batch)
    assert setup.stages == ["blocks.0", "blocks.1"]
    total, parts = Distiller(teacher, student, **setup).step(batch)
    assert sorted(parts) == ["ce", "ofa", "ofa@blocks_0", "ofa@blocks_1"] and torch.isfinite(total)
