"""workbench.models.create: built-in tiny nets, timm names, transformers from config, refusals."""
from __future__ import annotations

import pytest
import torch

from workbench import models


def _stage_outputs(model, x):
    """Output shape of every feature_info module, via forward hooks."""
    named = dict(model.named_modules())
    shapes, handles = {}, []

    def record(key):
        def hook(module, inputs, output):
            shapes.setdefault(key, tuple(output.shape))  # returns None: the output is left alone

        return hook

    for info in model.feature_info:
        handles.append(named[info["module"]].register_forward_hook(record(info["module"])))
    try:
        with torch.no_grad():
            model.eval()(x)
    finally:
        for handle in handles:
            handle.remove()
    return shapes


@pytest.mark.parametrize(
    "name, kwargs, x_shape",
    [
        ("cnn", {}, (2, 1, 32, 32)),
        ("cnn_small", {}, (2, 1, 32, 32)),
        ("bench_cnn", {}, (2, 3, 32, 32)),
        ("bench_cnn", {"width_mult": 0.5}, (2, 3, 32, 32)),
        ("vit", {"depth": 2}, (2, 1, 32, 32)),
        ("mlp", {}, (2, 1, 32, 32)),
        ("mlp", {"in_chans": 3, "img_size": 16, "num_classes": 4}, (2, 3, 16, 16)),
    ],
)
def test_builtin_forward_and_feature_info(name, kwargs, x_shape):
    model = models.create(name, **kwargs)
    logits = model.eval()(torch.randn(*x_shape))
    assert logits.shape == (2, kwargs.get("num_classes", 10))
    names = dict(model.named_modules())
    assert model.feature_info, "feature_info must list the stages"
    for info in model.feature_info:
        assert set(info) >= {"module", "num_chs", "reduction"}
        assert info["module"] in names
    # num_chs and reduction agree with what the stage actually outputs
    shapes = _stage_outputs(model, torch.randn(*x_shape))
    for info in model.feature_info:
        shape = shapes[info["module"]]
        if len(shape) == 4:
            assert shape[1] == info["num_chs"]
            assert shape[-1] == x_shape[-1] // info["reduction"]
        else:
            assert shape[-1] == info["num_chs"]


def test_cnn_structure():
    model = models.create("cnn")
    assert [d["module"] for d in model.feature_info] == ["blocks.0", "blocks.1", "blocks.2"]
    assert [d["num_chs"] for d in model.feature_info] == [32, 64, 128]
    small = models.create("cnn_small")
    assert [d["num_chs"] for d in small.feature_info] == [8, 16, 32]
    assert sum(p.numel() for p in small.parameters()) < sum(p.numel() for p in model.parameters()) / 10
    names = dict(model.named_modules())
    assert "pool" in names and isinstance(names["head"], torch.nn.Linear)


def test_bench_cnn_is_workload_w1():
    model = models.create("bench_cnn")
    assert [d["module"] for d in model.feature_info] == [f"blocks.{i}" for i in range(6)]
    assert [d["num_chs"] for d in model.feature_info] == [32, 32, 64, 64, 128, 128]
    shapes = _stage_outputs(model, torch.randn(2, 3, 32, 32))
    # pre-pool maps: blocks 0-1 at 32x32, 2-3 at 16x16, 4-5 at 8x8
    assert [shapes[f"blocks.{i}"][-1] for i in range(6)] == [32, 32, 16, 16, 8, 8]
    student = models.create("bench_cnn", width_mult=0.5)
    assert [d["num_chs"] for d in student.feature_info] == [16, 16, 32, 32, 64, 64]
    conv_count = sum(isinstance(m, torch.nn.Conv2d) for m in model.modules())
    assert conv_count == 6


def test_vit_blocks_output_tokens():
    model = models.create("vit")
    assert [d["module"] for d in model.feature_info] == [f"blocks.{i}" for i in range(4)]
    shapes = _stage_outputs(model, torch.randn(2, 1, 32, 32))
    tokens = (32 // 4) ** 2 + 1
    assert shapes["blocks.0"] == (2, tokens, 64)
    assert {"norm", "head"} <= set(dict(model.named_modules()))


def test_timm_resnet18_one_channel():
    model = models.create("resnet18", in_chans=1, num_classes=10)
    assert model.eval()(torch.randn(2, 1, 32, 32)).shape == (2, 10)
    names = dict(model.named_modules())
    assert [d["module"] for d in model.feature_info][-1] == "layer4"
    assert all(d["module"] in names for d in model.feature_info)


def test_bert_tiny_runs_on_token_ids():
    model = models.create("bert_tiny").eval()
    ids = torch.randint(0, 1000, (2, 7))
    hidden = model(input_ids=ids).last_hidden_state
    assert hidden.shape == (2, 7, 64)
    assert [d["module"] for d in model.feature_info] == ["encoder.layer.0", "encoder.layer.1"]
    assert all(d["num_chs"] == 64 for d in model.feature_info)
    assert model.config._attn_implementation == "eager"


def test_gpt2_tiny_and_config_override():
    model = models.create("gpt2_tiny", n_layer=3).eval()
    assert model(torch.randint(0, 1000, (2, 5))).last_hidden_state.shape == (2, 5, 64)
    assert [d["module"] for d in model.feature_info] == ["h.0", "h.1", "h.2"]
    assert all(d["module"] in dict(model.named_modules()) for d in model.feature_info)


def test_hf_model_type_from_config():
    model = models.create(
        "hf:bert", hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64, vocab_size=50
    )
    assert [d["module"] for d in model.feature_info] == ["encoder.layer.0"]
    assert model.feature_info[0]["num_chs"] == 32
    with pytest.raises(ValueError, match="bert"):
        models.create("hf:bertt")


@pytest.mark.parametrize("name", ["cnn", "resnet18", "bert_tiny"])
def test_pretrained_true_is_refused(name):
    with pytest.raises(ValueError, match="load_weights"):
        models.create(name, pretrained=True)


def test_checkpoint_path_is_refused(tmp_path):
    with pytest.raises(ValueError, match="load_weights"):
        models.create("resnet18", checkpoint_path=str(tmp_path / "x.pth"))


def test_unknown_name_lists_close_names():
    with pytest.raises(ValueError) as error:
        models.create("cnn_smal")
    assert "cnn_small" in str(error.value)
    with pytest.raises(ValueError) as error:
        models.create("resnet_18")
    assert "resnet18" in str(error.value)


def test_available_lists_builtins():
    names = models.available()
    assert {"cnn", "cnn_small", "bench_cnn", "vit", "mlp", "bert_tiny", "gpt2_tiny"} <= set(names)
    for name in names:
        assert isinstance(models.create(name), torch.nn.Module)


def test_create_sized_passes_img_size_only_where_the_model_takes_it():
    assert models.create_sized("cnn", 16, widths=(4,)).img_size == 16
    assert models.create_sized("bench_cnn", 24, width_mult=0.25).img_size == 24
    assert models.create_sized("vit_tiny_patch16_224", 32, patch_size=8).patch_embed.img_size == (32, 32)  # timm
    assert models.create_sized("mlp", 8)(torch.zeros(2, 1, 8, 8)).shape == (2, 10)  # its inputs sized by img_size
    resnet = models.create_sized("resnet18", 32, num_classes=4)  # timm resnet: any size, no img_size
    assert resnet(torch.zeros(2, 3, 32, 32)).shape == (2, 4)
    assert models.create_sized("cnn", 16, img_size=8).img_size == 8  # the caller's img_size wins
    with pytest.raises(TypeError, match="widthz"):  # other bad arguments are not swallowed by the retry
        models.create_sized("resnet18", 32, widthz=3)


def test_create_sized_retry_leaves_the_seeded_initialisation_alone():
    # the first try (with img_size) fails at argument binding, before any weight is drawn
    torch.manual_seed(3)
    sized = models.create_sized("resnet18", 32, num_classes=4)
    torch.manual_seed(3)
    plain = models.create("resnet18", num_classes=4)
    assert all(torch.equal(a, b) for a, b in zip(sized.state_dict().values(), plain.state_dict().values()))
