"""DisWOT's terms against independent computations: each network's features, Grad-CAM maps and classifier
gradients are read here with plain torch hooks and autograd on a Gaussian-initialised copy made the same way
(same seed), and the published formulas are applied in numpy. Then the invariances: a network is at distance
0 from itself, the distances are symmetric, the models passed in are never changed, several batches average."""
from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from workbench import models
from workbench.probes import diswot

pytestmark = pytest.mark.usefixtures("one_thread")

SEED = 3


@pytest.fixture(scope="module")
def batch():
    generator = torch.Generator().manual_seed(0)
    return torch.randn(12, 1, 16, 16, generator=generator), torch.randint(0, 10, (12,), generator=generator)


def initialised(model, seed=SEED):
    clone = copy.deepcopy(model)
    diswot.gaussian_init(clone, torch.Generator().manual_seed(seed))
    return clone.train()


def by_hand(model, x, y, layer, cam_layer=None):
    """The layer's output, the Grad-CAM map at ``cam_layer`` (default ``layer``; labelled class, ReLU, bilinear
    to the input's size) and the classifier weight's cross-entropy gradient, with plain forward hooks and
    autograd."""
    cam_layer = cam_layer or layer
    seen = {}
    handles = [model.get_submodule(name).register_forward_hook(lambda m, i, o, name=name: seen.__setitem__(name, o))
               for name in {layer, cam_layer}]
    try:
        logits = model(x)
    finally:
        for handle in handles:
            handle.remove()
    activation = seen[cam_layer]
    chosen = logits.gather(1, y[:, None]).sum()
    grad, = torch.autograd.grad(chosen, [activation], retain_graph=True)
    if activation.dim() == 3:  # tokens [B, N, D] -> [B, D, h, w], the class token dropped
        prefix = getattr(model, "num_prefix_tokens", 0)
        side = int(round((activation.shape[1] - prefix) ** 0.5))
        grid_of = lambda t: t[:, prefix:].transpose(1, 2).reshape(t.shape[0], t.shape[2], side, side)  # noqa: E731
        activation, grad = grid_of(activation), grid_of(grad)
    cam = F.relu((grad.mean(dim=(2, 3), keepdim=True) * activation).sum(dim=1, keepdim=True))
    cam = F.interpolate(cam, size=x.shape[-2:], mode="bilinear", align_corners=False)[:, 0]
    weight = diswot.classifier_of(model).weight
    grad_w, = torch.autograd.grad(F.cross_entropy(logits, y), [weight])
    return seen[layer].detach().double().flatten(1).numpy(), cam.detach().double().flatten(1).numpy(), \
        grad_w.double().numpy()


def gram_rows(features):
    gram = features @ features.T
    return gram / np.maximum(np.linalg.norm(gram, axis=1, keepdims=True), 1e-12)


def released(grad):
    outer = grad[:, :, None] * grad[:, None, :]
    return outer / np.maximum(np.linalg.norm(outer, axis=2, keepdims=True), 1e-12)


@pytest.mark.parametrize("student_spec", [("cnn", {"widths": (8, 32)}, "blocks.1", None),
                                          ("vit", {"patch_size": 4, "dim": 32, "depth": 2, "heads": 2}, "blocks.1",
                                           "blocks.1.norm1"),
                                          ("mixer", {"patch_size": 4, "dim": 32, "depth": 2}, "blocks.1", None),
                                          ("resnet", {"widths": (8, 16, 32)}, "stages.2", None)])
def test_the_terms_follow_the_published_formulas(batch, student_spec):
    x, y = batch
    name, kwargs, layer, cam_layer = student_spec
    torch.manual_seed(1)
    teacher = models.create("cnn", widths=(8, 16, 32), img_size=16)
    student = models.create_sized(name, 16, **kwargs)
    got = diswot.score(teacher, student, (x, y), batch_size=12, seed=SEED, device="cpu")

    t_features, t_cam, t_grad = by_hand(initialised(teacher), x, y, "blocks.2")
    s_features, s_cam, s_grad = by_hand(initialised(student), x, y, layer, cam_layer)
    batch_size = len(x)
    relation = ((gram_rows(t_features) - gram_rows(s_features)) ** 2).sum() / batch_size ** 2
    semantic = ((gram_rows(t_cam) - gram_rows(s_cam)) ** 2).sum() / batch_size ** 2
    classes, channels = t_grad.shape
    assert got.relation == pytest.approx(relation, rel=1e-6, abs=1e-12)
    assert got.semantic_gradcam == pytest.approx(semantic, rel=1e-6, abs=1e-12)
    assert got.score == pytest.approx(-(relation + semantic), rel=1e-6)
    assert got.n_samples == 12 and got.n_batches == 1
    if s_grad.shape == t_grad.shape:  # the released term needs equal classifier widths
        expected = ((released(t_grad) - released(s_grad)) ** 2).sum() / (classes * channels)
        assert got.semantic_released == pytest.approx(expected, rel=1e-6)
        chosen = diswot.score(teacher, student, (x, y), batch_size=12, seed=SEED, device="cpu", semantic="released")
        assert chosen.score == pytest.approx(-(relation + expected), rel=1e-6)
    else:
        assert np.isnan(got.semantic_released)


def test_a_network_is_at_distance_zero_from_itself_and_distances_are_symmetric(batch):
    torch.manual_seed(0)
    a = models.create("cnn", widths=(8, 16), img_size=16)
    b = models.create("mixer", img_size=16, patch_size=4, dim=16, depth=2)
    same = diswot.score(a, a, batch, batch_size=12, device="cpu")
    assert (same.score, same.relation, same.semantic_gradcam, same.semantic_released) == (0.0, 0.0, 0.0, 0.0)
    ab, ba = (diswot.score(p, q, batch, batch_size=12, device="cpu") for p, q in ((a, b), (b, a)))
    assert ab.relation == pytest.approx(ba.relation, rel=1e-12) and ab.relation > 0
    assert ab.semantic_gradcam == pytest.approx(ba.semantic_gradcam, rel=1e-12)


def test_the_models_passed_in_are_not_changed(batch):
    torch.manual_seed(0)
    teacher = models.create("cnn", widths=(8, 16), img_size=16).eval().requires_grad_(False)  # frozen, as trained
    student = models.create("resnet", widths=(8, 16), img_size=16)
    before = [{k: v.clone() for k, v in m.state_dict().items()} for m in (teacher, student)]
    diswot.score(teacher, student, batch, batch_size=12, device="cpu")
    for model, state in zip((teacher, student), before):
        assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())
        assert all(p.grad is None for p in model.parameters())
        assert not any(module._forward_hooks for module in model.modules())
    assert not teacher.training and student.training
    assert not any(p.requires_grad for p in teacher.parameters()) and all(p.requires_grad for p in student.parameters())


def test_several_batches_average_each_term(batch):
    x, y = batch
    torch.manual_seed(0)
    teacher = models.create("cnn", widths=(8, 16), img_size=16)
    student = models.create("cnn", widths=(4, 16), img_size=16)
    both = diswot.score(teacher, student, (x, y), batch_size=6, batches=2, device="cpu")
    halves = [diswot.score(teacher, student, (x[i:i + 6], y[i:i + 6]), batch_size=6, device="cpu") for i in (0, 6)]
    for name in ("relation", "semantic_gradcam", "semantic_released", "score"):
        assert getattr(both, name) == pytest.approx(np.mean([getattr(h, name) for h in halves]), rel=1e-12)
    assert both.n_batches == 2 and both.n_samples == 12


def test_the_trained_teacher_keeps_its_weights_and_runs_in_eval_mode(batch):
    x, y = batch
    torch.manual_seed(0)
    teacher = models.create("cnn", widths=(8, 16), img_size=16)
    student = models.create("cnn", widths=(8, 16), img_size=16)
    got = diswot.score(teacher, student, (x, y), batch_size=12, trained_teacher=True, seed=SEED, device="cpu")
    t_features, _, _ = by_hand(copy.deepcopy(teacher).eval(), x, y, "blocks.1")
    s_features, _, _ = by_hand(initialised(student), x, y, "blocks.1")
    expected = ((gram_rows(t_features) - gram_rows(s_features)) ** 2).sum() / len(x) ** 2
    assert got.relation == pytest.approx(expected, rel=1e-6)
    assert got.relation != pytest.approx(diswot.score(teacher, student, (x, y), batch_size=12, seed=SEED,
                                                      device="cpu").relation)


def test_gaussian_init_draws_the_paper_s_initialisation():
    model = models.create("resnet", widths=(32, 64), img_size=16)
    diswot.gaussian_init(model, torch.Generator().manual_seed(0))
    weighted = [m for m in model.modules() if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear))]
    weights = torch.cat([m.weight.flatten() for m in weighted])
    assert abs(weights.mean().item()) < 0.01 and weights.std().item() == pytest.approx(1.0, abs=0.01)
    for module in model.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            assert torch.equal(module.weight, torch.ones_like(module.weight))
            assert torch.equal(module.bias, torch.zeros_like(module.bias))
        if isinstance(module, torch.nn.Linear):
            assert torch.equal(module.bias, torch.zeros_like(module.bias))
    again = diswot.gaussian_init(models.create("resnet", widths=(32, 64), img_size=16),
                                 torch.Generator().manual_seed(0))
    assert torch.equal(again.head.weight, model.head.weight)  # seeded: the same draw


def test_clear_errors(batch):
    teacher = models.create("cnn", widths=(8, 16), img_size=16)
    narrow = models.create("cnn", widths=(8,), img_size=16)
    with pytest.raises(ValueError, match="equal classifier input widths.*semantic='gradcam'"):
        diswot.score(teacher, narrow, batch, semantic="released", device="cpu")
    with pytest.raises(ValueError, match="semantic must be one of"):
        diswot.score(teacher, narrow, batch, semantic="cam", device="cpu")
    with pytest.raises(TypeError, match="labelled"):
        diswot.score(teacher, narrow, batch[0], device="cpu")
