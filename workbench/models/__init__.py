"""Offline model factory and safe weight files.

``create(name, **kwargs)`` builds built-in tiny nets, any timm model or a transformers model from a
config, never downloading; ``load_weights`` / ``save_weights`` move weights to and from disk with
safetensors or ``torch.load(weights_only=True)``; ``count_parameters`` / ``count_flops`` say how big a
model is (parameters, forward FLOPs per sample).
"""
from workbench.models.factory import available, create, create_sized
from workbench.models.stats import count_flops, count_parameters
from workbench.models.tiny import BenchCNN, TinyCNN, TinyMLP, TinyResNet, tiny_mixer, tiny_vit
from workbench.models.weights import load_weights, read_state_dict, save_weights

__all__ = [
    "available",
    "count_flops",
    "count_parameters",
    "create",
    "create_sized",
    "load_weights",
    "save_weights",
    "read_state_dict",
    "TinyCNN",
    "BenchCNN",
    "TinyMLP",
    "tiny_vit",
    "tiny_mixer",
    "TinyResNet",
]
