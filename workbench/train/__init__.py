"""Training: a small seeded supervised loop, accuracy, and cached trained tiny teachers/students.

Distillation itself (the ``Distiller``) builds on these; ``fit`` trains plain cross-entropy baselines
and ``trained`` returns a ready teacher or student from the on-disk cache.
"""
from workbench.train.cache import cache_dir, trained
from workbench.train.fit import accuracy, fit, logits_of

__all__ = ["fit", "accuracy", "logits_of", "trained", "cache_dir"]
