"""workbench.data.animals: the animal-mnist files read safely, deduplicated, split like digits, and harder."""
from __future__ import annotations

import gzip
import hashlib
import os
import pickle
import sys

import numpy as np
import pytest
import torch

from workbench.data import animals, digits
from workbench.data.animals import ANIMAL_CLASSES, IMAGES, LABELS, INSTALL_COMMAND, load_array, unique_images

animals_module = sys.modules["workbench.data.animals"]


def _raw() -> tuple[np.ndarray, np.ndarray]:
    folder = animals_module._data_folder()
    return load_array(folder / IMAGES[0], IMAGES[1]), load_array(folder / LABELS[0], LABELS[1])


def _rows(x: torch.Tensor) -> list[bytes]:
    return [row.tobytes() for row in x.flatten(1).numpy()]


def test_splits_shapes_types_and_train_statistics():
    train, test, everything = animals("train"), animals("test"), animals("all")
    assert len(train) + len(test) == len(everything) == 10_000 - 284
    assert len(test) == int(np.ceil(0.2 * len(everything)))
    x, y = train.tensors
    assert x.shape == (len(train), 1, 32, 32) and x.dtype == torch.float32 and y.dtype == torch.int64
    assert abs(float(x.mean())) < 1e-4 and abs(float(x.std()) - 1) < 1e-3
    assert abs(float(test.tensors[0].mean())) < 0.1  # normalised with the train statistics
    assert set(y.tolist()) == set(range(len(ANIMAL_CLASSES)))
    three = animals("test", size=28, channels=3).tensors[0]
    assert three.shape == (len(test), 3, 28, 28) and torch.equal(three[:, 0], three[:, 2])
    assert torch.equal(animals("test").tensors[0], test.tensors[0])  # fixed
    assert not torch.equal(animals("test", seed=1).tensors[1], test.tensors[1])


def test_duplicates_are_dropped_and_no_image_straddles_the_split():
    images, labels = _raw()
    assert images.shape == (10_000, 28, 28) and np.bincount(labels).tolist() == [1000] * 10
    distinct = {row.tobytes() for row in images.reshape(10_000, -1)}
    assert len(distinct) == 9_716  # independent count: 284 exact copies in the source
    train, test = animals("train", size=28).tensors[0], animals("test", size=28).tensors[0]
    train_rows, test_rows = _rows(train), _rows(test)
    assert len(set(train_rows)) == len(train_rows) and len(set(test_rows)) == len(test_rows)
    assert not set(train_rows) & set(test_rows)
    # every image kept is a source image with its source label: undo the normalisation (an affine map;
    # the source's darkest and brightest pixels are 0 and 255)
    everything, kept_labels = animals("all", size=28).tensors
    low, high = everything.min(), everything.max()
    restored = torch.round((everything - low) / (high - low) * 255).to(torch.uint8).squeeze(1).numpy()
    source = {row.tobytes(): label for row, label in zip(images.reshape(10_000, -1), labels)}
    assert [source[row.tobytes()] for row in restored.reshape(len(restored), -1)] == kept_labels.tolist()


def test_split_is_stratified():
    all_counts = torch.bincount(animals("all").tensors[1], minlength=10).numpy()
    test_counts = torch.bincount(animals("test").tensors[1], minlength=10).numpy()
    assert np.all(np.abs(test_counts - 0.2 * all_counts) <= 1), (test_counts, all_counts)


def test_unique_images_keeps_one_of_agreeing_copies_and_drops_conflicting_groups():
    images = np.array([[[1]], [[2]], [[1]], [[3]], [[3]], [[4]]], dtype=np.uint8)
    labels = np.array([0, 1, 0, 2, 5, 3])
    with pytest.warns(UserWarning, match="1 groups of identical images carry different labels"):
        kept, kept_labels = unique_images(images, labels)
    assert kept.ravel().tolist() == [1, 2, 4] and kept_labels.tolist() == [0, 1, 3]


def test_the_package_is_never_imported():
    animals("test")
    assert "animal_mnist" not in sys.modules and not [name for name in sys.modules if name.startswith("tensorflow")]


def test_locating_a_package_does_not_run_it(tmp_path, monkeypatch):
    marker = tmp_path / "ran"
    package = tmp_path / "site" / "fake_animals"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text(f"open({str(marker)!r}, 'w').close()\n")
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    monkeypatch.setattr(animals_module, "_PACKAGE", "fake_animals")
    with pytest.raises(ModuleNotFoundError, match="looked in"):  # found, but it holds no data files
        animals("test")
    assert not marker.exists() and "fake_animals" not in sys.modules


def test_missing_package_names_the_install_command(monkeypatch):
    monkeypatch.setattr(animals_module, "_PACKAGE", "no_such_animal_package")
    with pytest.raises(ModuleNotFoundError, match="pip install --no-deps animal-mnist==0.4"):
        animals("train")
    assert INSTALL_COMMAND == "pip install --no-deps animal-mnist==0.4"


class _Hostile:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def _fake_package(tmp_path, monkeypatch, images_blob: bytes, record_its_hash: bool):
    folder = tmp_path / "Animal_MNIST"
    folder.mkdir()
    (folder / IMAGES[0]).write_bytes(images_blob)
    (folder / LABELS[0]).write_bytes((animals_module._data_folder() / LABELS[0]).read_bytes())
    monkeypatch.setattr(animals_module, "_data_folder", lambda: folder)
    if record_its_hash:
        monkeypatch.setattr(animals_module, "IMAGES", (IMAGES[0], hashlib.sha256(images_blob).hexdigest()))


@pytest.mark.parametrize("record_its_hash", [True, False])
def test_a_hostile_pickle_is_refused_and_never_runs(tmp_path, monkeypatch, record_its_hash):
    marker = tmp_path / "pwned"
    blob = gzip.compress(pickle.dumps(_Hostile(marker)))
    _fake_package(tmp_path, monkeypatch, blob, record_its_hash)
    message = "refusing to load posix.system" if record_its_hash else "sha256 is"
    with pytest.raises(ValueError, match=message):
        animals("train")
    assert not marker.exists()


def test_a_file_with_another_hash_is_refused(tmp_path, monkeypatch):
    blob = bytearray((animals_module._data_folder() / IMAGES[0]).read_bytes())
    blob[-100] ^= 1
    _fake_package(tmp_path, monkeypatch, bytes(blob), record_its_hash=False)
    with pytest.raises(ValueError, match=f"sha256 is {hashlib.sha256(blob).hexdigest()}, expected {IMAGES[1]}"):
        animals("train")


def test_an_object_array_is_refused(tmp_path):
    path = tmp_path / "objects.gz"
    path.write_bytes(gzip.compress(pickle.dumps(np.array([1, "a"], dtype=object))))
    with pytest.raises(ValueError, match="expected a numeric numpy array"):
        load_array(path, hashlib.sha256(path.read_bytes()).hexdigest())


def test_harder_than_digits_by_independent_classifiers():
    from sklearn.neighbors import KNeighborsClassifier, NearestCentroid

    def scores(make):
        (train_x, train_y), (test_x, test_y) = make("train").tensors, make("test").tensors
        train_x, test_x = train_x.flatten(1).numpy(), test_x.flatten(1).numpy()
        centroid = NearestCentroid().fit(train_x, train_y.numpy()).score(test_x, test_y.numpy())
        nearest = KNeighborsClassifier(1).fit(train_x, train_y.numpy()).score(test_x, test_y.numpy())
        return centroid, nearest

    centroid, nearest = scores(lambda split: animals(split, size=28))
    assert 0.50 <= centroid <= 0.66 and 0.85 <= nearest <= 0.95, (centroid, nearest)
    digits_centroid, _ = scores(lambda split: digits(split, size=8))
    assert digits_centroid > 0.85 and digits_centroid - centroid > 0.2, (digits_centroid, centroid)
