"""capture(): selectors, output normalisation, error messages, and hooks that are always removed."""
from __future__ import annotations

import pytest
import timm
import torch
from torch import nn
from transformers import BertConfig, BertModel

import workbench as wb
from workbench.capture import as_tensor, flatten_per_sample


def test_exact_names_and_globs_in_model_order(conv_pair):
    teacher, _ = conv_pair
    assert wb.resolve_layers(teacher, ["head", "blocks.0"]) == ["blocks.0", "head"]
    assert wb.resolve_layers(teacher, "blocks.?") == ["blocks.0", "blocks.1", "blocks.2"]
    assert wb.resolve_layers(teacher, "blocks.*") == ["blocks.0", "blocks.1", "blocks.2"]
    assert wb.resolve_layers(teacher, "**.2") == ["blocks.0.2", "blocks.1.2", "blocks.2", "blocks.2.2"]
    assert wb.resolve_layers(teacher, "blocks.[02]") == ["blocks.0", "blocks.2"]
    assert wb.resolve_layers(teacher, ["blocks.*.0", "blocks.0.0"]) == ["blocks.0.0", "blocks.1.0", "blocks.2.0"]


def test_captured_values_equal_a_manual_forward(conv_pair, images):
    teacher, _ = conv_pair
    x = images[:4]
    with wb.capture(teacher, ["blocks.1", "head"]) as acts:
        logits = teacher(x)
    assert torch.equal(acts["head"], logits)
    assert torch.equal(acts["blocks.1"], teacher.blocks[1](teacher.blocks[0](x)))
    assert acts.flat()["blocks.1"].shape == (4, 16 * 8 * 8 * 2)
    assert not acts["head"].requires_grad


def test_detach_false_keeps_the_graph(conv_pair, images):
    teacher, _ = conv_pair
    with wb.capture(teacher, ["head"], detach=False) as acts:
        teacher(images[:4])
    acts["head"].sum().backward()
    assert teacher.head.weight.grad is not None


def test_stages_from_timm_feature_info():
    model = timm.create_model("resnet18", pretrained=False, num_classes=10)
    assert wb.stage_names(model) == ["act1", "layer1", "layer2", "layer3", "layer4"]
    with wb.capture(model, "stages") as acts:
        model(torch.randn(2, 3, 32, 32))
    assert [acts[name].shape[1] for name in acts] == [64, 64, 128, 256, 512]


def test_stages_heuristic_takes_the_longest_container():
    config = BertConfig(hidden_size=32, num_hidden_layers=3, num_attention_heads=2, intermediate_size=64,
                        vocab_size=100)
    bert = BertModel(config).eval()
    assert wb.stage_names(bert) == ["encoder.layer.0", "encoder.layer.1", "encoder.layer.2"]
    tokens = torch.randint(0, 100, (2, 7))
    with wb.capture(bert, "stages") as acts:
        output = bert(tokens)
    # tuple outputs give their first element: the hidden states [n, t, d]
    assert torch.equal(acts["encoder.layer.2"], output.last_hidden_state)
    assert acts.flat()["encoder.layer.0"].shape == (2, 7 * 32)


def test_output_normalisation():
    hidden = torch.ones(2, 3)
    assert as_tensor({"logits": torch.zeros(1), "last_hidden_state": hidden}) is hidden
    assert as_tensor([(hidden, 1)]) is hidden
    assert flatten_per_sample(torch.zeros(5)).shape == (5, 1)
    with pytest.raises(TypeError, match="cannot read a tensor"):
        as_tensor("text")


def test_unknown_layer_lists_the_closest_names(conv_pair, hook_count):
    teacher, _ = conv_pair
    with pytest.raises(KeyError, match=r"no layer matching 'block.1'.*'blocks.1'"):
        with wb.capture(teacher, ["head", "block.1"]):
            pass
    with pytest.raises(KeyError, match="no layer matching 'layer\\*'"):
        wb.resolve_layers(teacher, "layer*")
    assert hook_count(teacher) == 0


def test_hooks_removed_on_exception_and_on_exit(conv_pair, images, hook_count):
    teacher, _ = conv_pair
    with pytest.raises(RuntimeError, match="boom"):
        with wb.capture(teacher, "blocks.*"):
            assert hook_count(teacher) == 3 + 1  # the three blocks, and the root's end-of-forward marker
            teacher(images[:2])
            raise RuntimeError("boom")
    assert hook_count(teacher) == 0
    with wb.capture(teacher, "stages"):
        pass
    assert hook_count(teacher) == 0


def test_reading_a_layer_before_the_forward_says_so(conv_pair):
    teacher, _ = conv_pair
    with wb.capture(teacher, ["head"]) as acts:
        with pytest.raises(KeyError, match="has not run yet"):
            acts["head"]
        with pytest.raises(KeyError, match="not captured"):
            acts["pool"]


def test_layer_names_lists_every_submodule():
    net = nn.Sequential(nn.Linear(2, 2), nn.Sequential(nn.ReLU(), nn.Linear(2, 1)))
    assert wb.layer_names(net) == ["0", "1", "1.0", "1.1"]
