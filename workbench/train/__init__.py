"""Training: the Distiller, one seeded/resumable/distributed loop, callbacks, checkpoints, cached models.

``Distiller`` holds a frozen teacher, a student and weighted loss terms; ``fit`` trains it (or a plain
model with cross-entropy), with callbacks such as ``workbench.similarity.CKATrajectory``, checkpoints and DDP under
``torchrun``; ``trained`` returns a ready teacher or student from the on-disk cache, trained by its family's
recipe (``default_recipe``), with the held-out accuracy of every epoch (``training_record``).
"""
from workbench.train.cache import TrainingRecord, cache_dir, trained, training_record
from workbench.train.callbacks import Callback, TrainState
from workbench.train.checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint
from workbench.train.distiller import Distiller
from workbench.train.fit import History, accuracy, fit, logits_of  # logits_of: re-exported from workbench.batches
from workbench.train.recipes import Recipe, default_recipe

__all__ = [
    "Callback",
    "Distiller",
    "History",
    "Recipe",
    "TrainState",
    "TrainingRecord",
    "accuracy",
    "cache_dir",
    "default_recipe",
    "fit",
    "latest_checkpoint",
    "load_checkpoint",
    "logits_of",
    "save_checkpoint",
    "trained",
    "training_record",
]
