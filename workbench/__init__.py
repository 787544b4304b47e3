"""KD Workbench: see, close and report the gap between a teacher and a student network.

Example:
    >>> import torch, workbench as wb
    >>> net = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.ReLU())
    >>> wb.layer_names(net)
    ['0', '1']
"""
from workbench import data, losses, models, similarity, train
from workbench.capture import capture, layer_names, resolve_layers, stage_names
from workbench.layer_table import layer_table
from workbench.probes import branch_accuracy
from workbench.train import Distiller

__all__ = ["Distiller", "branch_accuracy", "capture", "data", "layer_names", "layer_table", "losses", "models", "resolve_layers", "similarity", "stage_names", "train"]
__version__ = "0.1.0"
