"""workbench.layer_table: one row per named module, shapes from one forward checked against a hand
computation (conv arithmetic), parameter counts against the layer formulas, no hooks left behind."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from workbench import layer_names, layer_table, stage_names
from workbench.layer_table import LAYER_TABLE_COLUMNS, first_sample


def conv_out(size: int, kernel: int, stride: int, padding: int) -> int:
    """The output size of a convolution or pooling window (PyTorch's floor formula)."""
    return (size + 2 * padding - kernel) // stride + 1


def hooks_left(model: nn.Module) -> int:
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


def test_a_tiny_cnn_row_by_row(conv_pair, images):
    teacher, _ = conv_pair  # blocks.0..2 (conv, bn, relu), pool (avgpool, flatten), head
    teacher.train()
    table = layer_table(teacher, images[:5])
    assert tuple(table.columns) == LAYER_TABLE_COLUMNS
    assert table["name"].tolist() == [name for name, _ in teacher.named_modules()][1:]
    rows = table.set_index("name")
    sizes, channels = [16], [3]
    for width, stride in zip((16, 32, 64), (1, 2, 2)):
        sizes.append(conv_out(sizes[-1], 3, stride, 1))
        channels.append(width)
    for index in range(3):
        expected = (channels[index + 1], sizes[index + 1], sizes[index + 1])
        for part in ("", ".0", ".1", ".2"):
            assert rows.loc[f"blocks.{index}{part}", "output_shape"] == expected
        conv = channels[index + 1] * channels[index] * 9 + channels[index + 1]
        assert rows.loc[f"blocks.{index}.0", "parameters"] == conv
        assert rows.loc[f"blocks.{index}.1", "parameters"] == 2 * channels[index + 1]  # BN weight + bias
        assert rows.loc[f"blocks.{index}", "parameters"] == conv + 2 * channels[index + 1]
    assert rows.loc["pool.0", "output_shape"] == (64, 1, 1) and rows.loc["pool", "output_shape"] == (64,)
    assert rows.loc["head", "output_shape"] == (5,) and rows.loc["head", "parameters"] == 64 * 5 + 5
    assert rows.loc["blocks.1.2", "type"] == "ReLU" and rows.loc["blocks", "type"] == "Sequential"
    assert table.loc[table["leaf"], "name"].tolist() == [
        name for name, module in teacher.named_modules() if name and not list(module.children())
    ]
    assert table.loc[table["stage"], "name"].tolist() == stage_names(teacher)
    assert rows.loc["blocks.2.1", "depth"] == 3 and rows.loc["head", "depth"] == 1
    # the batch size does not change the per-sample shapes; the model's flags and hooks are as before
    assert layer_table(teacher, images[:1])["output_shape"].tolist() == table["output_shape"].tolist()
    assert teacher.training and all(module.training for module in teacher.modules())
    assert hooks_left(teacher) == 0


def test_without_an_example_the_shapes_are_empty(conv_pair):
    teacher, _ = conv_pair
    table = layer_table(teacher)
    assert len(table) == len(layer_names(teacher))
    assert table["output_shape"].isna().all() and table["parameters"].iloc[0] > 0


def test_timm_resnet18_at_32_pixels():
    timm = pytest.importorskip("timm")
    model = timm.create_model("resnet18", pretrained=False, num_classes=10)
    table = layer_table(model, torch.randn(2, 3, 32, 32))
    assert len(table) == len(list(model.named_modules())) - 1 == 93  # every module but the root
    rows = table.set_index("name")
    stem = conv_out(32, 7, 2, 3)  # 16
    pooled = conv_out(stem, 3, 2, 1)  # 8
    assert rows.loc["conv1", "output_shape"] == (64, stem, stem)
    assert rows.loc["maxpool", "output_shape"] == (64, pooled, pooled)
    size = pooled
    for stage, width in zip(("layer1", "layer2", "layer3", "layer4"), (64, 128, 256, 512)):
        if stage != "layer1":
            size = conv_out(size, 3, 2, 1)
        assert rows.loc[stage, "output_shape"] == (width, size, size), stage
        assert rows.loc[f"{stage}.0.conv1", "type"] == "Conv2d"
    assert size == 1 and rows.loc["fc", "output_shape"] == (10,)
    assert rows.loc["global_pool", "output_shape"] == (512,)
    assert rows.loc["layer1", "type"] == "Sequential" and not rows.loc["layer1", "leaf"]
    assert rows.loc["fc", "parameters"] == 512 * 10 + 10
    assert table["parameters"][table["depth"] == 1].sum() == sum(p.numel() for p in model.parameters())
    assert table.loc[table["stage"], "name"].tolist() == stage_names(model)
    assert table["output_shape"].notna().all()  # every module of a ResNet runs
    assert hooks_left(model) == 0


def test_a_vit_gives_token_shapes():
    timm = pytest.importorskip("timm")
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=8, num_classes=10)
    rows = layer_table(model, torch.randn(1, 3, 32, 32)).set_index("name")
    tokens = (32 // 8) ** 2 + 1  # patches plus the class token
    assert rows.loc["patch_embed.proj", "output_shape"] == (192, 4, 4)
    assert rows.loc["blocks.0", "output_shape"] == (tokens, 192)
    assert rows.loc["blocks.0.attn.qkv", "output_shape"] == (tokens, 3 * 192)
    assert rows.loc["head", "output_shape"] == (10,)


def test_first_sample_and_bad_input(conv_pair, images):
    teacher, _ = conv_pair
    assert torch.equal(first_sample((images, torch.zeros(len(images)))), images[:1])
    loader = torch.utils.data.DataLoader(images, batch_size=7)
    assert torch.equal(first_sample(loader), images[:1])
    with pytest.raises(ValueError, match="no samples"):
        first_sample(images[:0])
    with pytest.raises(ValueError, match="holds no samples: pass at least one"):
        first_sample(torch.utils.data.TensorDataset(images[:0]))
    with pytest.raises(TypeError, match="takes a torch.nn.Module"):
        layer_table("resnet18")
    with pytest.raises(RuntimeError, match="failed on the example batch.*batch dimension"):
        layer_table(teacher, images[0])  # one sample without its batch dimension
    assert hooks_left(teacher) == 0
