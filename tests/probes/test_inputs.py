"""Inputs that used to be cast silently or fail with a raw torch error are refused with a clear message.

Every entry point for user arrays is tried: the pairwise probes, ``as_loader`` (probes and ``fit``) and
the result objects (tests/probes/test_result_files.py).
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

from workbench.data import as_loader
from workbench.similarity import linear_cka, mutual_knn, rbf_cka

X = np.random.default_rng(0).normal(size=(12, 3))

ENTRY_POINTS = [
    pytest.param(lambda bad: linear_cka(bad, X), id="linear_cka"),
    pytest.param(lambda bad: rbf_cka(X, bad), id="rbf_cka"),
    pytest.param(lambda bad: mutual_knn(bad, X, k=3), id="mutual_knn"),
    pytest.param(lambda bad: as_loader(bad), id="as_loader"),
    pytest.param(lambda bad: as_loader((bad, np.arange(len(bad)))), id="as_loader-pair"),
]

REFUSED = [
    pytest.param(X + 1j * X, TypeError, r"complex \(complex128\).*x\.real", id="complex-numpy"),
    pytest.param(torch.tensor(X + 1j * X), TypeError, r"complex \(torch\.complex128\).*x\.real", id="complex-torch"),
    pytest.param(np.ma.masked_array(X, mask=X > 1), TypeError, r"masked array.*\.filled\(", id="masked"),
    pytest.param(X.astype(object), TypeError, r"dtype object \(object\)", id="object"),
    pytest.param(X.astype(str), TypeError, r"dtype <U\d+ \(not numeric\)", id="strings"),
    pytest.param(np.zeros((0, 3)), ValueError, r"empty \(no samples\): shape \[0, 3\]", id="empty-numpy"),
    pytest.param(torch.zeros(0, 3), ValueError, r"empty \(no samples\): shape \[0, 3\]", id="empty-torch"),
    pytest.param(np.zeros((12, 0)), ValueError, r"empty \(no values per sample\): shape \[12, 0\]", id="no-features"),
    pytest.param(torch.zeros(12, 3, device="meta"), ValueError, r"has no data \(meta device, shape \[12, 3\]\)",
                 id="meta"),
]


@pytest.mark.parametrize("call", ENTRY_POINTS)
@pytest.mark.parametrize("bad, error, message", REFUSED)
def test_refused_with_a_clear_message(call, bad, error, message):
    with pytest.raises(error, match=message):
        call(bad)


def test_negative_strides_and_foreign_byte_order_are_copied_not_refused():
    reversed_rows, swapped = X[::-1], X.astype(">f8")
    assert linear_cka(reversed_rows, reversed_rows) == pytest.approx(1.0, abs=1e-12)
    assert linear_cka(X[:, ::-1], X) == pytest.approx(1.0, abs=1e-12)
    assert linear_cka(swapped, X) == pytest.approx(1.0, abs=1e-12)
    assert mutual_knn(reversed_rows, np.ascontiguousarray(reversed_rows), k=3) == 1.0
    batch = next(iter(as_loader(reversed_rows, batch_size=4)))
    np.testing.assert_array_equal(batch.numpy(), X[::-1][:4])
    inputs, labels = next(iter(as_loader((reversed_rows, np.arange(12)[::-1]), batch_size=4)))
    assert labels.tolist() == [11, 10, 9, 8]
    np.testing.assert_array_equal(next(iter(as_loader(swapped, batch_size=4))).numpy(), X[:4])

