"""Result files: standard JSON with NaN / Inf, atomic saves, and damaged or hostile files refused by name.

Each damaged file is a valid file with one field changed; loading it must be a ``ValueError`` that names
the file and the field, never a result holding a wrong number.
"""
from __future__ import annotations

import errno
import json
import math
import os
import re

import numpy as np
import pytest

from workbench.files import DiskFullError
from workbench.similarity import CKAResult, PredictionResult


def _refuse_constant(token: str):
    raise AssertionError(f"non-standard JSON token {token}")


def cka_result(**changes) -> CKAResult:
    fields = dict(values=np.array([[0.9, np.nan, 0.1], [0.3, 0.8, -0.05]]), teacher_layers=["t1", "t2"],
                  student_layers=["s1", "s2", "s3"], n_samples=64, debiased=True, extra={"step": 3})
    return CKAResult(**{**fields, **changes})


def prediction_result(**changes) -> PredictionResult:
    fields = dict(values=np.array([[3, 1], [0, 4]]), agreement=0.875, kl=math.inf, temperature=2.0,
                  n_samples=8, teacher_accuracy=0.75, student_accuracy=None)
    return PredictionResult(**{**fields, **changes})


def test_non_finite_numbers_are_standard_json_and_round_trip(tmp_path):
    cka = cka_result()
    text = cka.save(tmp_path / "cka.json").read_text()
    record = json.loads(text, parse_constant=_refuse_constant)
    assert record["values"][0][1] == "NaN"
    loaded = CKAResult.load(tmp_path / "cka.json")
    np.testing.assert_array_equal(loaded.values, cka.values)  # NaN in the same place
    assert (loaded.teacher_layers, loaded.n_samples, loaded.extra) == (["t1", "t2"], 64, {"step": 3})

    predictions = prediction_result(kl=math.inf)
    text = predictions.save(tmp_path / "p.json").read_text()
    assert json.loads(text, parse_constant=_refuse_constant)["kl"] == "Infinity"
    loaded = PredictionResult.load(tmp_path / "p.json")
    assert loaded.kl == math.inf and loaded.student_accuracy is None and loaded.values.dtype == np.int64
    assert PredictionResult.load(prediction_result(kl=math.nan).save(tmp_path / "p.json")).kl != 0  # NaN


def test_files_written_by_the_old_format_still_load(tmp_path):
    path = tmp_path / "old.json"
    path.write_text('{"type": "CKAResult", "values": [[NaN, 0.5]], "teacher_layers": ["t"], '
                    '"student_layers": ["a", "b"], "n_samples": 10}')
    assert np.isnan(CKAResult.load(path).values[0, 0])


def test_save_is_atomic(tmp_path, monkeypatch):
    path = cka_result().save(tmp_path / "cka.json")
    before = path.read_bytes()

    def full_disk(_):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "fsync", full_disk)
    with pytest.raises(DiskFullError, match="No space left on device"):
        cka_result(n_samples=99).save(path)
    monkeypatch.undo()
    assert path.read_bytes() == before and CKAResult.load(path).n_samples == 64
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cka.json"]


def _damaged(tmp_path, text: str):
    path = tmp_path / "damaged.json"
    path.write_bytes(text.encode() if isinstance(text, str) else text)
    return path


@pytest.mark.parametrize("content, message", [
    pytest.param(None, r"not valid JSON \(truncated or damaged\?\)", id="truncated"),
    pytest.param(b'{"type": "CKAResult", "values": "\xff\xfe"}', "not a UTF-8 JSON file", id="not-utf8"),
    pytest.param("[" * 100_000 + "]" * 100_000, "too deeply", id="deep-nesting"),
    pytest.param("[1, 2]", r"holds a list", id="not-an-object"),
    pytest.param('{"type": "PredictionResult"}', r"does not hold a CKAResult \(its type field is 'PredictionResult'\)",
                 id="other-type"),
    pytest.param('{"values": [[0.5]]}', r"does not hold a CKAResult \(its type field is None\)", id="no-type"),
    pytest.param('{"type": "CKAResult", "n_samples": 1, "n_samples": 2}', "'n_samples' appears more than once",
                 id="repeated-field"),
    pytest.param('{"type": "CKAResult", "values": [[1' + "0" * 5000 + "]]}", "not a valid result file",
                 id="huge-integer"),
])
def test_unreadable_files_name_the_file(tmp_path, content, message):
    if content is None:
        content = cka_result().save(tmp_path / "full.json").read_text()[:-40]
    path = _damaged(tmp_path, content)
    with pytest.raises(ValueError, match=re.escape(str(path)) + ".*" + message):
        CKAResult.load(path)


def _with_field(tmp_path, result, name, value, drop=False):
    record = json.loads(result.save(tmp_path / "valid.json").read_text())
    if drop:
        del record[name]
    else:
        record[name] = value
    return _damaged(tmp_path, json.dumps(record))


CKA_DAMAGE = [
    ("teacher_layers", "t1t2", r"teacher_layers must be a list of strings"),
    ("teacher_layers", ["t1", 2], r"teacher_layers\[1\] must be a string"),
    ("n_samples", "64", r"n_samples must be a whole number"),
    ("n_samples", 64.5, r"n_samples must be a whole number"),
    ("n_samples", True, r"n_samples must be a whole number"),
    ("n_samples", 3, r"n_samples must be at least 4"),
    ("debiased", 1, r"debiased must be true or false"),
    ("kernel", "cosine", r"kernel must be one of \('linear', 'rbf'\)"),
    ("teacher_name", None, r"teacher_name must be a string"),
    ("values", "0.5", r"values must be an array \(a numpy array, a tensor or nested lists\), got .0.5."),
    ("values", [0.5, 0.1, 0.2], r"values must be 2-dimensional, got shape \[3\]"),
    ("values", [[0.5, 0.1, 0.2], [0.3]], r"values must be a rectangular array"),
    ("values", [[[0.5]]], r"values must be 2-dimensional"),
    ("values", [[0.5, 0.1], [0.3, 0.2]], r"values has shape \[2, 2\], the layer lists imply \[2, 3\]"),
    ("values", [[0.5, "high", 0.1], [0.3, 0.8, 0.1]], r"values must hold numbers only, found 'high'"),
    ("values", [[0.5, True, 0.1], [0.3, 0.8, 0.1]], r"values must hold numbers only, found True"),
    ("values", [[0.5, None, 0.1], [0.3, 0.8, 0.1]], r"values must hold numbers only, found None"),
    ("values", [[0.5, 1.5, 0.1], [0.3, 0.8, 0.1]], r"values\[0, 1\] = 1.5 is outside \[-1, 1\]"),
    ("values", [[0.5, "Infinity", 0.1], [0.3, 0.8, 0.1]], r"values\[0, 1\] = inf is outside \[-1, 1\]"),
    ("extra", [1], r"extra must be a dict"),
    ("extra", {"a": {"b": json.loads("[" * 33 + "1" + "]" * 33)}},
     r"extra\['a'\]\['b'\].* is nested more than 32 levels deep"),
    ("surprise", 1, r"unknown field\(s\) \['surprise'\]"),
]


@pytest.mark.parametrize("name, value, message", CKA_DAMAGE, ids=[f"{n}-{i}" for i, (n, _, _) in enumerate(CKA_DAMAGE)])
def test_damaged_cka_files_name_the_file_and_field(tmp_path, name, value, message):
    path = _with_field(tmp_path, cka_result(), name, value)
    with pytest.raises(ValueError, match=re.escape(str(path)) + ".*" + message):
        CKAResult.load(path)


def test_missing_fields_are_named(tmp_path):
    path = _with_field(tmp_path, cka_result(), "student_layers", None, drop=True)
    with pytest.raises(ValueError, match=r"missing field\(s\) \['student_layers'\]"):
        CKAResult.load(path)


def test_cka_range_depends_on_the_estimator():
    # biased CKA is ⟨HKH, HLH⟩ of two PSD matrices over their norms: in [0, 1]; the debiased one is a
    # Frobenius inner product of U-centred matrices over their norms: in [-1, 1] (Cauchy–Schwarz)
    assert cka_result(debiased=True).values[1, 2] == -0.05
    with pytest.raises(ValueError, match=r"values\[1, 2\] = -0.05 is outside \[0, 1\]"):
        cka_result(debiased=False)
    assert cka_result(values=np.full((2, 3), 1 + 1e-9), debiased=False).values.max() > 1  # rounding passes


PREDICTION_DAMAGE = [
    ("values", [[3, 1, 0], [0, 4, 0]], r"values must be a square \[classes, classes\] matrix, got shape \[2, 3\]"),
    ("values", [[3, -1], [2, 4]], r"values must hold whole counts ≥ 0, found -1"),
    ("values", [[3, 1.5], [0, 3.5]], r"values must hold whole counts ≥ 0, found 1.5"),
    ("values", [[3, "NaN"], [0, 4]], r"values must hold whole counts ≥ 0, found nan"),
    ("n_samples", 9, r"n_samples is 9 but the counts in values sum to 8"),
    ("agreement", 0.9, r"agreement is 0.9 but the counts in values give 7 / 8 = 0.875"),
    ("agreement", "NaN", r"agreement must be a number in \[0.0, 1.0\], got NaN"),
    ("kl", -0.5, r"kl must be in \[-1e-09, inf\], got -0.5"),
    ("kl", "-Infinity", r"kl must be in \[-1e-09, inf\], got -inf"),
    ("temperature", 0, r"temperature must be a positive finite number, got 0"),
    ("temperature", "Infinity", r"temperature must be a positive finite number, got inf"),
    ("teacher_accuracy", 1.25, r"teacher_accuracy must be in \[0.0, 1.0\], got 1.25"),
    ("student_accuracy", "0.5", r"student_accuracy must be a number, got '0.5'"),
    ("confusion", [[1]], r"unknown field\(s\) \['confusion'\]"),
]


@pytest.mark.parametrize("name, value, message", PREDICTION_DAMAGE,
                         ids=[f"{n}-{i}" for i, (n, _, _) in enumerate(PREDICTION_DAMAGE)])
def test_damaged_prediction_files_name_the_file_and_field(tmp_path, name, value, message):
    path = _with_field(tmp_path, prediction_result(), name, value)
    with pytest.raises(ValueError, match=re.escape(str(path)) + ".*" + message):
        PredictionResult.load(path)


def test_constructors_refuse_silent_casts():
    with pytest.raises(TypeError, match="values is complex"):
        cka_result(values=np.ones((2, 3)) * (0.5 + 0.5j))
    with pytest.raises(TypeError, match="values is a numpy masked array"):
        cka_result(values=np.ma.masked_array(np.full((2, 3), 0.5), mask=np.eye(2, 3)))
    with pytest.raises(ValueError, match=r"values must hold whole counts ≥ 0, found 0.5"):
        prediction_result(values=np.array([[0.5, 2.5], [0.0, 5.0]]))
