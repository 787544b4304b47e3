"""Offline datasets (scikit-learn digits, animal silhouettes, procedural shapes) and adapters for the user's own data.

Everything here runs without a network: ``digits`` reads scikit-learn's bundled images, ``animals`` the
``animal-mnist`` wheel's files (installed with ``--no-deps``), and ``shapes`` draws images procedurally.
``as_loader`` / ``num_samples`` let every probe, loss and training loop accept tensors, arrays, datasets
or loaders alike; what a batch holds (inputs, masks, labels) is read by :mod:`workbench.batches`.
"""
from workbench.data.animals import ANIMAL_CLASSES, animals
from workbench.data.digits import digits
from workbench.data.loaders import as_loader, num_samples
from workbench.data.shapes import SHAPE_CLASSES, shapes

__all__ = [
    "digits", "animals", "ANIMAL_CLASSES", "shapes", "SHAPE_CLASSES",
    "as_loader", "num_samples",
]
