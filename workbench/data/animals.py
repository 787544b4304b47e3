"""Animal silhouettes from the ``animal-mnist`` 0.4 wheel: 10 classes, deduplicated, split — fully offline.

The wheel ships 10,000 28×28 greyscale images (1,000 per class) as two gzipped numpy pickles. Its
metadata requires tensorflow and its loader module imports it, so it is installed without its
dependencies and none of its modules is ever imported here: the files are located with
``importlib.util.find_spec`` (which finds a top-level package without running it), checked against
the sha256 recorded below, and decoded by an unpickler that knows only numpy's array reconstruction.
"""
from __future__ import annotations

import gzip
import hashlib
import importlib.util
import io
import pickle
import warnings
from functools import cache
from pathlib import Path

import numpy as np
from torch.utils.data import TensorDataset

from workbench.data.splits import split_images

__all__ = ["animals", "ANIMAL_CLASSES", "INSTALL_COMMAND", "load_array", "unique_images"]

INSTALL_COMMAND = "pip install --no-deps animal-mnist==0.4"
# Label i is ANIMAL_CLASSES[i] (the package's alphabetical list; checked by eye on sample images).
ANIMAL_CLASSES = ("bear", "bird", "cat", "cow", "dog", "elephant", "giraffe", "horse", "sheep", "zebra")
_PACKAGE = "animal_mnist"
_FOLDER = ("data", "Animal_MNIST")
# file name and sha256 of the animal-mnist 0.4 wheel's files
IMAGES = ("animal_data_version_3.gz", "68a30346781a0984f839463a4615d2decb899d1ce65091bb92586311754a34ce")
LABELS = ("animal_label_version_3.gz", "dec8dba7c469830989fbab46825021a08a38470753a512f27ada847eced97b57")
_N_IMAGES, _IMAGE_SHAPE = 10_000, (28, 28)


def _reconstruct() -> object:
    try:
        from numpy._core.multiarray import _reconstruct
    except ImportError:  # numpy < 2
        from numpy.core.multiarray import _reconstruct
    return _reconstruct


_ALLOWED = {
    ("numpy.core.multiarray", "_reconstruct"): _reconstruct,
    ("numpy._core.multiarray", "_reconstruct"): _reconstruct,
    ("numpy", "ndarray"): lambda: np.ndarray,
    ("numpy", "dtype"): lambda: np.dtype,
}


class _ArrayUnpickler(pickle.Unpickler):
    """An unpickler that resolves only numpy's array reconstruction names; anything else is refused."""

    def find_class(self, module: str, name: str) -> object:
        if (module, name) not in _ALLOWED:
            raise pickle.UnpicklingError(
                f"refusing to load {module}.{name}: a numpy array pickle needs only "
                f"{sorted(f'{m}.{n}' for m, n in _ALLOWED)}"
            )
        return _ALLOWED[(module, name)]()


def load_array(path: str | Path, sha256: str) -> np.ndarray:
    """The numpy array in the gzipped pickle ``path``, after checking the file's ``sha256``.

    Only numpy's array reconstruction is unpickled (no other global, so no code runs); a file with
    another hash, or one that does not hold a plain (non-object) array, is a ``ValueError``.

    Example:
        >>> import gzip, pickle, tempfile, hashlib, numpy as np
        >>> path = Path(tempfile.mkdtemp()) / "a.gz"
        >>> _ = path.write_bytes(gzip.compress(pickle.dumps(np.arange(3))))
        >>> load_array(path, hashlib.sha256(path.read_bytes()).hexdigest()).tolist()
        [0, 1, 2]
    """
    path = Path(path)
    blob = path.read_bytes()
    digest = hashlib.sha256(blob).hexdigest()
    if digest != sha256:
        raise ValueError(f"{path}: sha256 is {digest}, expected {sha256} (animal-mnist 0.4): the file is "
                         f"damaged or from another version; reinstall with `{INSTALL_COMMAND}`")
    try:
        with gzip.GzipFile(fileobj=io.BytesIO(blob)) as stream:
            array = _ArrayUnpickler(stream).load()
    except (pickle.UnpicklingError, OSError, EOFError) as error:
        raise ValueError(f"{path}: not a numpy array pickle: {error}") from error
    if not isinstance(array, np.ndarray) or array.dtype.hasobject:
        raise ValueError(f"{path}: expected a numeric numpy array, got {type(array).__name__}")
    return array


def _data_folder() -> Path:
    """The installed package's data folder, found without importing the package."""
    spec = importlib.util.find_spec(_PACKAGE)  # top-level name: locates, does not execute
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    folders = [Path(location).joinpath(*_FOLDER) for location in locations]
    found = [folder for folder in folders if (folder / IMAGES[0]).is_file() and (folder / LABELS[0]).is_file()]
    if not found:
        where = f" (looked in {[str(folder) for folder in folders]})" if folders else ""
        raise ModuleNotFoundError(
            f"workbench.data.animals needs the animal-mnist 0.4 data files{where}; install them with "
            f"`{INSTALL_COMMAND}` (without dependencies: its metadata would pull in tensorflow)"
        )
    return found[0]


def unique_images(images: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``images`` and ``labels`` with exact duplicate images removed: the first copy is kept when every
    copy has the same label; a group whose copies disagree is dropped entirely (with a warning), since
    it has no single true label.

    Example:
        >>> images = np.array([[[0]], [[1]], [[0]]], dtype=np.uint8)
        >>> kept, kept_labels = unique_images(images, np.array([5, 6, 5]))
        >>> kept.shape, kept_labels.tolist()
        ((2, 1, 1), [5, 6])
    """
    flat = images.reshape(len(images), -1)
    _, first, inverse = np.unique(flat, axis=0, return_index=True, return_inverse=True)
    inverse = inverse.ravel()
    lowest = np.full(len(first), labels.max(), dtype=labels.dtype)
    highest = np.full(len(first), labels.min(), dtype=labels.dtype)
    np.minimum.at(lowest, inverse, labels)
    np.maximum.at(highest, inverse, labels)
    conflicting = lowest != highest
    if conflicting.any():
        warnings.warn(f"workbench.data.animals: {int(conflicting.sum())} groups of identical images carry "
                      "different labels; dropped entirely", stacklevel=2)
    keep = np.sort(first[~conflicting])
    return images[keep], labels[keep]


@cache
def _decoded(folder: Path) -> tuple[np.ndarray, np.ndarray]:
    images = load_array(folder / IMAGES[0], IMAGES[1])
    labels = load_array(folder / LABELS[0], LABELS[1])
    if images.shape != (_N_IMAGES, *_IMAGE_SHAPE) or labels.shape != (_N_IMAGES,):
        raise ValueError(f"{folder}: expected {_N_IMAGES} images of {_IMAGE_SHAPE} and as many labels, got "
                         f"{images.shape} and {labels.shape}")
    images, labels = unique_images(images, labels.astype(np.int64))
    images.setflags(write=False)
    labels.setflags(write=False)
    return images, labels


def animals(
    split: str = "train",
    size: int = 32,
    channels: int = 1,
    test_fraction: float = 0.2,
    seed: int = 0,
) -> TensorDataset:
    """The animal silhouettes as ``(x, y)``: x float32 ``[n, channels, size, size]``, y int64 (label i is
    ``ANIMAL_CLASSES[i]``).

    Of the 10,000 images, 284 are exact copies of another (same label each time): they are dropped
    before the split, leaving 9,716, so no image is in both splits. The split is stratified and fixed
    by ``seed`` (``split`` is ``"train"``, ``"test"`` or ``"all"``); images are resized bilinearly from
    28×28, repeated over ``channels`` and normalised with the mean and std of the *train* split, as in
    :func:`~workbench.data.digits`. Much harder than digits: nearest-centroid reaches about 58 % and
    1-NN about 91 % on the test split. Needs the ``animal-mnist`` files: ``pip install --no-deps
    animal-mnist==0.4`` (``make install`` does it); the decoded arrays are kept in memory.

    Example:
        >>> from workbench.data import animals
        >>> x, y = animals("test").tensors
        >>> tuple(x.shape), len(animals("train")), int(y.max())
        ((1944, 1, 32, 32), 7772, 9)
    """
    images, labels = _decoded(_data_folder())
    return split_images(images, labels, split, size, channels, test_fraction, seed)
