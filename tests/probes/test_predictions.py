"""compare_predictions: agreement, KL at a temperature and accuracies against scipy / numpy references."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy.special import softmax
from scipy.stats import entropy

from workbench.similarity import PredictionResult, compare_predictions


def test_matches_a_numpy_reference(conv_pair, images, tmp_path):
    teacher, student = conv_pair
    labels = torch.arange(len(images)) % 5
    temperature = 3.0
    result = compare_predictions(teacher, student, (images, labels), temperature=temperature, batch_size=64,
                                 device="cpu", progress=False)
    with torch.no_grad():
        t, s = teacher(images).double().numpy(), student(images).double().numpy()
    p_t, p_s = softmax(t / temperature, axis=1), softmax(s / temperature, axis=1)
    assert result.kl == pytest.approx(np.mean([entropy(a, b) for a, b in zip(p_t, p_s)]), rel=1e-10)
    assert result.agreement == pytest.approx(np.mean(t.argmax(1) == s.argmax(1)))
    assert result.teacher_accuracy == pytest.approx(np.mean(t.argmax(1) == labels.numpy()))
    assert result.student_accuracy == pytest.approx(np.mean(s.argmax(1) == labels.numpy()))
    expected_counts = np.zeros((5, 5), dtype=int)
    np.add.at(expected_counts, (t.argmax(1), s.argmax(1)), 1)
    np.testing.assert_array_equal(result.values, expected_counts)
    assert result.to_frame().loc["agreement", "value"] == result.agreement
    loaded = PredictionResult.load(result.save(tmp_path / "p.json"))
    np.testing.assert_array_equal(loaded.values, result.values)
    assert (loaded.agreement, loaded.kl, loaded.student_accuracy) == (result.agreement, result.kl, result.student_accuracy)
    rows = result.figure().data[0].z
    np.testing.assert_allclose(np.asarray(rows).sum(1)[expected_counts.sum(1) > 0], 1.0)


def test_identical_models_agree_fully_and_unlabelled_data_has_no_accuracy(conv_pair, images):
    teacher, _ = conv_pair
    result = compare_predictions(teacher, teacher, images[:50], device="cpu", progress=False)
    assert result.agreement == 1.0 and result.kl == pytest.approx(0.0, abs=1e-12)
    assert result.teacher_accuracy is None and "teacher_accuracy" not in result.to_frame().index


def test_bad_inputs(conv_pair, images):
    teacher, student = conv_pair
    with pytest.raises(ValueError, match="temperature must be positive"):
        compare_predictions(teacher, student, images, temperature=0, device="cpu", progress=False)
    wider = torch.nn.Sequential(student, torch.nn.Linear(5, 7))
    with pytest.raises(ValueError, match="different class counts: 5 vs 7"):
        compare_predictions(teacher, wider, images[:10], device="cpu", progress=False)
