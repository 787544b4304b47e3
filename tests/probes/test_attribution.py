"""Teacher/student attribution maps: Grad-CAM and integrated gradients against independent computations
(plain torch autograd for Grad-CAM on maps and on ViT / Mixer tokens, a direct captum call for IG), the
agreement numbers against scipy and hand counts, the models left as they were (in-place flags, hooks,
modules, modes, also after an error), the result's file, table and figures, and clear errors."""
from __future__ import annotations

import math
import warnings

import matplotlib
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from scipy import stats
from torch.utils.data import DataLoader, TensorDataset

from workbench import models
from workbench.probes import attribution
from workbench.probes.attribution import METHODS, AttributionResult, agreement, compare, normalize, resolve_layer

matplotlib.use("Agg")

pytestmark = [
    pytest.mark.usefixtures("one_thread"),  # tests/conftest.py: one torch thread
    # a random net's Grad-CAM is sometimes all zero: that sample's NaN warning is expected (pytest.warns still sees it)
    pytest.mark.filterwarnings("ignore:attribution maps of samples:RuntimeWarning"),
]


def cnn(widths=(8, 16), seed=0):
    torch.manual_seed(seed)
    return models.create("cnn", widths=widths, img_size=16)


def vit(seed=0):
    torch.manual_seed(seed)
    return models.create("vit", img_size=16, patch_size=4, dim=16, depth=2, heads=2)


def mixer(seed=0):
    """A tiny Mixer with a random head: timm starts its head at zero (every gradient, every map zero)."""
    torch.manual_seed(seed)
    model = models.create("mixer", img_size=16, patch_size=4, dim=16, depth=2)
    torch.nn.init.normal_(model.head.weight, std=0.5)
    return model


def batch(n=6, seed=1):
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(n, 1, 16, 16, generator=generator), torch.randint(0, 10, (n,), generator=generator)


def min_max(maps: torch.Tensor) -> np.ndarray:
    """Per-sample min-max to [0, 1], by hand; a constant map as zeros."""
    out = []
    for values in maps.detach().double():
        spread = values.max() - values.min()
        out.append(torch.zeros_like(values) if spread == 0 else (values - values.min()) / spread)
    return torch.stack(out).numpy()


def hand_gradcam(model, layer, x, targets, grid=(16, 16), prefix=0, patches=None):
    """Grad-CAM from plain autograd: A and dY_target/dA at ``layer`` (tokens: the first ``prefix`` dropped, or
    the ``patches`` slice kept; the patches on their square grid), ReLU(Σ_c mean_hw(dY/dA_c) · A_c), bilinear
    to ``grid``, min-max."""
    model.eval()
    seen = {}
    handle = model.get_submodule(layer).register_forward_hook(lambda _m, _i, output: seen.update(a=output))
    try:
        logits = model(x)
    finally:
        handle.remove()
    activation = seen["a"]
    (gradient,) = torch.autograd.grad(logits[torch.arange(len(x)), targets].sum(), activation)
    if activation.dim() == 3:
        keep = slice(prefix, None) if patches is None else patches
        n, tokens, width = activation[:, keep].shape
        side = math.isqrt(tokens)
        activation, gradient = ((value[:, keep].transpose(1, 2).reshape(n, width, side, side))
                                for value in (activation, gradient))
    cam = F.relu((gradient.mean(dim=(2, 3), keepdim=True) * activation).sum(dim=1))
    raw_shape = tuple(cam.shape[1:])
    if raw_shape != grid:
        cam = F.interpolate(cam[:, None], size=grid, mode="bilinear", align_corners=False)[:, 0]
    return min_max(cam), raw_shape


def defined(result) -> np.ndarray:
    """The samples whose maps both vary (a random net's Grad-CAM can be all zero: then NaN); most must."""
    varies = ~np.isnan(result.pearson)
    assert varies.sum() >= 0.6 * len(varies), "the test needs maps that are not constant"
    flat = (result.teacher_maps.max(axis=(1, 2)) == 0) | (result.student_maps.max(axis=(1, 2)) == 0)
    assert (flat == ~varies).all()  # NaN exactly where a map is all zero
    return varies


# ------------------------------------------------------------------------------------------ Grad-CAM
def test_gradcam_maps_equal_a_hand_computation_on_cnn_maps():
    teacher, student = cnn((8, 16, 32)), cnn((8, 16), seed=1)
    x, y = batch()
    result = compare(teacher, student, (x, y), teacher_layer="blocks.2", student_layer="blocks.1", progress=False)
    expected_teacher, teacher_raw = hand_gradcam(teacher, "blocks.2", x, y)
    expected_student, student_raw = hand_gradcam(student, "blocks.1", x, y)
    assert (teacher_raw, student_raw) == ((4, 4), (8, 8))  # both really were resized to the 16 × 16 grid
    assert result.teacher_maps.shape == result.student_maps.shape == (6, 16, 16)
    np.testing.assert_allclose(result.teacher_maps, expected_teacher, atol=1e-5)
    np.testing.assert_allclose(result.student_maps, expected_student, atol=1e-5)
    assert result.targets.tolist() == y.tolist()
    assert (result.teacher_maps.min(axis=(1, 2)) == 0).all()
    assert set(result.teacher_maps.max(axis=(1, 2)).round(6)) == {0.0, 1.0}  # [0, 1]; one map is all zero


def test_gradcam_on_its_own_grid_is_the_raw_map_normalised():
    student = cnn()
    x, y = batch()
    result = compare(student, student, (x, y), teacher_layer="blocks.1", student_layer="blocks.1", size=8,
                     progress=False)
    expected, raw_shape = hand_gradcam(student, "blocks.1", x, y, grid=(8, 8))
    assert raw_shape == (8, 8) and result.student_maps.shape == (6, 8, 8)
    np.testing.assert_allclose(result.student_maps, expected, atol=1e-5)


def test_vit_tokens_drop_the_class_token_and_lie_on_the_patch_grid():
    model, other = vit(), mixer()
    x, y = batch()
    result = compare(model, other, (x, y), teacher_layer="blocks.0", student_layer="blocks.1", size=4,
                     progress=False)
    expected_vit, raw_vit = hand_gradcam(model, "blocks.0", x, y, grid=(4, 4), prefix=1)
    expected_mixer, raw_mixer = hand_gradcam(other, "blocks.1", x, y, grid=(4, 4), prefix=0)
    assert model.num_prefix_tokens == 1 and not hasattr(other, "num_prefix_tokens")
    assert raw_vit == raw_mixer == (4, 4)  # (16 / 4)² patch positions: 16 tokens, the class token not among them
    np.testing.assert_allclose(result.teacher_maps, expected_vit, atol=1e-5)
    np.testing.assert_allclose(result.student_maps, expected_mixer, atol=1e-5)
    defined(result)
    last_dropped, _ = hand_gradcam(model, "blocks.0", x, y, grid=(4, 4), patches=slice(0, 16))
    assert not np.allclose(result.teacher_maps, last_dropped, atol=1e-3)  # the first token is the one left out

    resized = compare(model, model, (x, y), teacher_layer="blocks.0", student_layer="blocks.0", progress=False)
    np.testing.assert_allclose(resized.teacher_maps, hand_gradcam(model, "blocks.0", x, y, prefix=1)[0], atol=1e-5)


def test_the_last_block_of_a_class_token_vit_gives_nan_with_a_warning_not_a_number():
    model = vit()
    with pytest.warns(RuntimeWarning, match="constant"):
        result = compare(model, cnn(), batch(), progress=False)  # the head reads the class token only
    assert result.teacher_layer == "blocks.1"
    assert (result.teacher_maps == 0).all()
    assert np.isnan(result.pearson).all() and np.isnan(result.spearman).all() and np.isnan(result.iou).all()
    assert math.isnan(result.summary()["pearson"])


# ------------------------------------------------------------------------------------------ integrated gradients
def test_integrated_gradients_are_captum_s_complete_attributions_normalised():
    from captum.attr import IntegratedGradients

    teacher, student = cnn((8, 16, 32)), cnn()
    x, y = batch()
    result = compare(teacher, student, (x, y), "ig", n_steps=16, internal_batch_size=12, progress=False)
    assert (result.method, result.teacher_layer, result.student_layer) == ("ig", "input", "input")
    for model, maps in ((teacher, result.teacher_maps), (student, result.student_maps)):
        model.eval()
        raw, delta = IntegratedGradients(model).attribute(x, baselines=torch.zeros_like(x), target=y, n_steps=16,
                                                          return_convergence_delta=True)
        with torch.no_grad():
            gain = (model(x) - model(torch.zeros_like(x)))[torch.arange(len(x)), y]
        assert torch.allclose(raw.sum(dim=(1, 2, 3)), gain, atol=1e-4)  # completeness
        assert delta.abs().max() < 1e-4
        np.testing.assert_allclose(maps, min_max(raw.abs().sum(dim=1)), atol=1e-5)
    defined(result)


# ------------------------------------------------------------------------------------------ agreement
def test_agreement_is_scipy_s_correlations_and_a_hand_counted_iou():
    generator = np.random.default_rng(0)
    a, b = generator.random((3, 4, 5)), generator.random((3, 4, 5))
    values = agreement(a, b, top_k=0.2)
    for index in range(3):
        assert values["pearson"][index] == pytest.approx(stats.pearsonr(a[index].ravel(), b[index].ravel())[0])
        assert values["spearman"][index] == pytest.approx(stats.spearmanr(a[index].ravel(), b[index].ravel())[0])
        top_a = set(np.argsort(a[index].ravel())[-4:])  # k = round(0.2 · 20) = 4
        top_b = set(np.argsort(b[index].ravel())[-4:])
        assert values["iou"][index] == pytest.approx(len(top_a & top_b) / len(top_a | top_b))

    first = np.array([[[5.0, 4.0, 3.0], [2.0, 1.0, 0.0]]])
    second = np.array([[[0.0, 5.0, 4.0], [3.0, 2.0, 1.0]]])
    # k = max(1, round(0.34 · 6)) = 2: the top pixels {0, 1} and {1, 2} share one of three
    assert agreement(first, second, top_k=0.34)["iou"][0] == pytest.approx(1 / 3)
    assert agreement(first, second, top_k=0.01)["iou"][0] == 0.0  # k = 1: pixel 0 against pixel 1
    assert agreement(first, second, top_k=1.0)["iou"][0] == 1.0


def test_identical_models_agree_perfectly():
    model = cnn((8, 16, 32))
    for method in METHODS:
        result = compare(model, model, batch(), method, n_steps=8, progress=False)
        varies = defined(result)
        np.testing.assert_array_equal(result.teacher_maps, result.student_maps)
        np.testing.assert_allclose(result.pearson[varies], 1.0)
        np.testing.assert_allclose(result.spearman[varies], 1.0)
        np.testing.assert_array_equal(result.iou[varies], 1.0)


def test_a_constant_map_has_nan_agreement_with_a_runtime_warning():
    maps = np.random.default_rng(1).random((3, 4, 4))
    flat = maps.copy()
    flat[1] = 0.0
    with pytest.warns(RuntimeWarning, match=r"samples \[1\]"):
        values = agreement(maps, flat)
    for name in ("pearson", "spearman", "iou"):
        assert np.isnan(values[name][1]) and not np.isnan(values[name][[0, 2]]).any()
    with pytest.warns(RuntimeWarning):
        assert np.isnan(agreement(np.full((1, 4, 4), 0.25), maps[:1])["pearson"][0])  # constant, not zero
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        agreement(maps, maps)  # no warning when every map varies


def test_normalize_maps_each_sample_to_unit_range_and_a_constant_to_zero():
    maps = np.array([[[2.0, 4.0], [3.0, 6.0]], [[7.0, 7.0], [7.0, 7.0]], [[0.0, 0.0], [0.0, 0.0]]])
    np.testing.assert_array_equal(normalize(maps), [[[0, 0.5], [0.25, 1]], np.zeros((2, 2)), np.zeros((2, 2))])
    rounding = np.array([[[1.0, 1.0 + 1e-9], [1.0, 1.0]]])  # float rounding noise, not a map
    np.testing.assert_array_equal(normalize(rounding), np.zeros((1, 2, 2)))


# ------------------------------------------------------------------------------------------ the models after
def inplace_flags(model):
    return {name: module.inplace for name, module in model.named_modules() if hasattr(module, "inplace")}


def hooks(model):
    return sum(len(module._forward_hooks) + len(module._forward_pre_hooks) + len(module._backward_hooks)
               for module in model.modules())


def module_list(model):
    return [(name, id(module)) for name, module in model.named_modules()]


def test_in_place_flags_hooks_and_modules_are_as_before():
    teacher, student = cnn((8, 16, 32)), vit()
    flags = inplace_flags(teacher)
    assert flags and all(flags.values())  # TinyCNN's ReLUs are in place
    before = module_list(teacher), module_list(student)
    for method in METHODS:
        compare(teacher, student, batch(), method, student_layer="blocks.0", n_steps=4, progress=False)
        assert inplace_flags(teacher) == flags
        assert hooks(teacher) == hooks(student) == 0
        assert (module_list(teacher), module_list(student)) == before


def test_an_error_midway_leaves_the_models_as_they_were(monkeypatch):
    from captum.attr import LayerGradCam

    teacher, student = cnn((8, 16, 32)), vit()
    flags, before = inplace_flags(teacher), (module_list(teacher), module_list(student))
    student.num_prefix_tokens = 0  # 17 tokens are no square grid: the hook raises inside captum's forward
    with pytest.raises(ValueError, match="17 tokens"):
        compare(teacher, student, batch(), student_layer="blocks.0", progress=False)
    assert inplace_flags(teacher) == flags and hooks(teacher) == hooks(student) == 0
    assert (module_list(teacher), module_list(student)) == before

    inside = {}

    def fail(self, *args, **kwargs):
        inside.update(flags=inplace_flags(teacher), hooks=hooks(teacher))
        raise RuntimeError("boom")

    monkeypatch.setattr(LayerGradCam, "attribute", fail)
    with pytest.raises(RuntimeError, match="boom"):
        compare(teacher, teacher, batch(), progress=False)
    assert not any(inside["flags"].values()) and inside["hooks"] == 1  # switched off, hooked while it ran
    assert inplace_flags(teacher) == flags and hooks(teacher) == 0 and module_list(teacher) == before[0]


def test_modes_are_restored_and_the_maps_are_eval_mode_maps():
    teacher, student = cnn((8, 16, 32)), cnn()
    x, y = batch()
    expected = compare(teacher.eval(), student.eval(), (x, y), progress=False)
    teacher.train()
    student.train()
    student.blocks[0].eval()
    modes = [[module.training for module in model.modules()] for model in (teacher, student)]
    result = compare(teacher, student, (x, y), progress=False)
    assert [[module.training for module in model.modules()] for model in (teacher, student)] == modes
    np.testing.assert_allclose(result.teacher_maps, expected.teacher_maps, atol=1e-6)
    np.testing.assert_allclose(result.student_maps, expected.student_maps, atol=1e-6)


# ------------------------------------------------------------------------------------------ data and targets
def test_the_first_n_samples_of_any_data_form_and_teacher_targets():
    teacher, student = cnn((8, 16, 32)), cnn()
    x, y = batch(10)
    from_tuple = compare(teacher, student, (x, y), n_samples=7, progress=False)
    for data in (DataLoader(TensorDataset(x, y), batch_size=3), [(x[:4], y[:4]), (x[4:], y[4:])],
                 TensorDataset(x, y)):
        other = compare(teacher, student, data, n_samples=7, progress=False)
        np.testing.assert_array_equal(other.inputs, x[:7].numpy())
        np.testing.assert_array_equal(other.targets, y[:7].numpy())
        np.testing.assert_allclose(other.teacher_maps, from_tuple.teacher_maps, atol=1e-6)
    assert len(compare(teacher, student, (x, y), n_samples=50, progress=False).targets) == 10  # all there are

    predicted = compare(teacher, student, x, n_samples=4, targets="teacher", progress=False)
    with torch.no_grad():
        assert predicted.targets.tolist() == teacher.eval()(x[:4]).argmax(dim=1).tolist()
    chosen = compare(teacher, student, x, n_samples=3, targets=[9, 0, 4], progress=False)
    assert chosen.targets.tolist() == [9, 0, 4]
    np.testing.assert_allclose(chosen.teacher_maps, hand_gradcam(teacher, "blocks.2", x[:3],
                                                                 torch.tensor([9, 0, 4]))[0], atol=1e-5)


def test_resolve_layer():
    model = cnn((8, 16, 32))
    assert [resolve_layer(model, name) for name in ("first", "last", "blocks.1", "blocks.1.2")] == [
        "blocks.0", "blocks.2", "blocks.1", "blocks.1.2"]
    assert resolve_layer(vit(), "last") == "blocks.1"
    with pytest.raises(ValueError, match=r"no module 'block.1'.*closest names: \['blocks.1'"):
        resolve_layer(model, "block.1")
    with pytest.raises(ValueError, match="blocks.0"):  # a parameter, not a module: the stages are listed
        resolve_layer(model, "blocks.0.0.weight")
    with pytest.raises(ValueError, match="no module ''"):
        resolve_layer(model, "")
    with pytest.raises(TypeError, match="module name"):
        resolve_layer(model, 2)


# ------------------------------------------------------------------------------------------ the result
@pytest.fixture(scope="module")
def result():
    torch.manual_seed(0)
    teacher, student = cnn((8, 16, 32)), cnn()
    return compare(teacher, student, batch(5), progress=False)


def test_save_and_load_round_trip_nan_included(result, tmp_path):
    loaded = AttributionResult.load(result.save(tmp_path / "maps.json"))
    marked = AttributionResult(**{**vars(result), "iou": np.array([np.nan, *result.iou[1:]])})
    again = AttributionResult.load(marked.save(tmp_path / "nan.json"))
    for original, back in ((result, loaded), (marked, again)):
        for name, value in vars(original).items():
            if isinstance(value, np.ndarray):
                np.testing.assert_array_equal(getattr(back, name), value)
                assert getattr(back, name).dtype == value.dtype
            else:
                assert getattr(back, name) == value
    assert np.isnan(again.iou[0])


def test_the_file_is_checked(result, tmp_path):
    with pytest.raises(ValueError, match="teacher_maps"):
        AttributionResult(**{**vars(result), "teacher_maps": result.teacher_maps * 2})
    with pytest.raises(ValueError, match="method"):
        AttributionResult(**{**vars(result), "method": "saliency"})
    with pytest.raises(ValueError, match="targets"):
        AttributionResult(**{**vars(result), "targets": np.array([0.5] * 5)})


def test_table_and_summary(result):
    frame = result.to_frame()
    assert list(frame.columns) == ["sample", "target", "pearson", "spearman", "iou"]
    assert frame["sample"].tolist() == list(range(5)) and frame["target"].tolist() == result.targets.tolist()
    for name in ("pearson", "spearman", "iou"):
        np.testing.assert_array_equal(frame[name].to_numpy(), getattr(result, name))
        assert frame.iloc[3][name] == getattr(result, name)[3]
    summary = result.summary()
    assert summary["n_samples"] == 5
    for name in ("pearson", "spearman", "iou"):
        assert summary[name] == pytest.approx(np.nanmean(getattr(result, name)))
    with_nan = AttributionResult(**{**vars(result), "pearson": np.array([np.nan, 0.5, 0.25, np.nan, 0.0])})
    assert with_nan.summary()["pearson"] == pytest.approx(0.25)


def test_figure_draws_the_input_and_both_maps(result):
    for sample in (0, 4):
        figure = result.figure(sample)
        heatmaps = [trace for trace in figure.data if trace.type == "heatmap"]
        assert len(heatmaps) == 3
        np.testing.assert_allclose(np.asarray(heatmaps[0].z), result.inputs[sample].mean(axis=0))
        np.testing.assert_allclose(np.asarray(heatmaps[1].z), result.teacher_maps[sample])
        np.testing.assert_allclose(np.asarray(heatmaps[2].z), result.student_maps[sample])
        title = figure.layout.title.text
        assert f"sample {sample} (target {result.targets[sample]})" in title
        assert f"Pearson {result.pearson[sample]:.3f}" in title and f"IoU {result.iou[sample]:.3f}" in title
    with pytest.raises(IndexError, match="0..4"):
        result.figure(5)


def test_plot_is_a_matplotlib_grid(result):
    import matplotlib.pyplot as plt
    from matplotlib.figure import Figure

    figure = result.plot(samples=[0, 2])
    try:
        assert isinstance(figure, Figure) and len(figure.axes) == 6
        assert "gradcam" in figure._suptitle.get_text() and "blocks.2" in figure._suptitle.get_text()
        np.testing.assert_allclose(figure.axes[4].images[0].get_array(), result.teacher_maps[2])
    finally:
        plt.close(figure)


# ------------------------------------------------------------------------------------------ errors
def test_clear_errors():
    teacher, student = cnn((8, 16, 32)), cnn()
    x, y = batch()
    with pytest.raises(ValueError, match=r"method.*\('gradcam', 'ig'\)"):
        compare(teacher, student, (x, y), "saliency")
    with pytest.raises(ValueError, match="no module 'blocks.7'"):
        compare(teacher, student, (x, y), student_layer="blocks.7")
    with pytest.raises(ValueError, match="7 entries for 6 samples"):
        compare(teacher, student, (x, y), targets=[1] * 7, progress=False)
    with pytest.raises(ValueError, match="10 classes"):
        compare(teacher, student, (x, y), targets=[10] * 6, progress=False)
    with pytest.raises(ValueError, match="class indices"):
        compare(teacher, student, (x, y), targets=[1.0] * 6, progress=False)
    with pytest.raises(ValueError, match="'teacher'"):
        compare(teacher, student, (x, y), targets="student", progress=False)
    with pytest.raises(ValueError, match="no labels"):
        compare(teacher, student, x, progress=False)
    with pytest.raises(ValueError, match="no samples"):
        compare(teacher, student, (x[:0], y[:0]), progress=False)
    with pytest.raises(ValueError, match="no samples"):
        compare(teacher, student, [], progress=False)
    with pytest.raises(ValueError, match="n_samples"):
        compare(teacher, student, (x, y), n_samples=0)
    for top_k in (0, 1.5):
        with pytest.raises(ValueError, match=r"top_k must be in \(0, 1\]"):
            compare(teacher, student, (x, y), top_k=top_k)
    for size in ((0, 4), 2.5, (4, 4, 4)):
        with pytest.raises(ValueError, match="size"):
            compare(teacher, student, (x, y), size=size, progress=False)
    with pytest.raises(ValueError, match=r"\[n, c, h, w\]"):
        compare(teacher, student, (x[:, 0], y), progress=False)
    with pytest.raises(ValueError, match="Grad-CAM at 'pool'"):
        compare(teacher, student, (x, y), student_layer="pool", progress=False)
    unused = cnn()
    unused.spare = torch.nn.Conv2d(1, 1, 1)  # a module the forward never calls
    with pytest.raises(ValueError, match="'spare' of TinyCNN does not run"):
        compare(unused, student, (x, y), teacher_layer="spare", progress=False)
    assert hooks(student) == hooks(unused) == 0 and all(inplace_flags(student).values())
    assert attribution.METHODS == ("gradcam", "ig")
