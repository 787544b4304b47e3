"""The built-in tiny ResNet ("resnet"): stage shapes, feature_info, parameters counted by hand, recipe family."""
from __future__ import annotations

import pytest
import torch

from workbench import models
from workbench.capture import capture, stage_names
from workbench.train.recipes import recipe_family

pytestmark = pytest.mark.usefixtures("one_thread")


def resnet_parameters(in_chans, widths, blocks, classes):
    """Stem conv+BN, per BasicBlock two 3x3 convs + two BNs, a 1x1 conv+BN shortcut where the shape changes, head."""
    total, previous = 9 * in_chans * widths[0] + 2 * widths[0], widths[0]
    for index, width in enumerate(widths):
        for block in range(blocks):
            total += 9 * previous * width + 9 * width * width + 4 * width
            if block == 0 and (index > 0 or previous != width):
                total += previous * width + 2 * width
            previous = width
    return total + previous * classes + classes


@pytest.mark.parametrize("widths, blocks", [((8, 16, 32), 1), ((8, 16), 2), ((4,), 1)])
def test_resnet_stages_shapes_and_parameters(widths, blocks):
    model = models.create_sized("resnet", 16, widths=widths, blocks=blocks, in_chans=3, num_classes=4).eval()
    assert stage_names(model) == [f"stages.{i}" for i in range(len(widths))]
    with torch.no_grad(), capture(model, "stages") as activations:
        logits = model(torch.randn(2, 3, 16, 16))
    assert logits.shape == (2, 4)
    assert {k: tuple(v.shape) for k, v in activations.items()} == {
        f"stages.{i}": (2, w, 16 // 2**i, 16 // 2**i) for i, w in enumerate(widths)}
    assert [d["reduction"] for d in model.feature_info] == [2**i for i in range(len(widths))]
    assert models.count_parameters(model) == resnet_parameters(3, widths, blocks, 4)


def test_resnet_is_a_builtin_in_the_cnn_recipe_family():
    assert "resnet" in models.available() and recipe_family("resnet") == "cnn"
    with pytest.raises(ValueError, match="widths >= 1"):
        models.create("resnet", widths=())
