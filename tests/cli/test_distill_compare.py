"""The distill report: the notebook committed clean, the method registry, the results table, and a tiny
end-to-end run through the CLI under papermill (slow)."""
from __future__ import annotations

import os
import subprocess
import sys

import nbformat
import numpy as np
import pandas as pd
import pytest
import torch

from workbench import reports
from workbench.losses import KD, FitNet
from workbench.reports.compare import METHODS, Comparison, command_line, method_distiller, run_comparison
from workbench.train import Distiller

# 3 methods (one a composite), 1 seed, 1 epoch, 128 training images, tiny models: under a minute with the kernel
SMALL = ["-p", "methods=[\"student\", \"kd\", \"kd*0.5+fitnet@blocks.1\"]", "-p", "seeds=[0]", "-p", "epochs=1",
         "-p", "n_train=128", "-p", "n_probe=64", "-p", "teacher=cnn_small", "-p", "teacher_epochs=1", "-p", 'student_kwargs={"widths": [4, 8]}',
         "-p", "batch_size=32"]


def test_notebook_parameters():
    parameters = reports.report_parameters("distill")
    assert {"teacher", "student", "methods", "epochs", "seeds", "dataset", "device", "n_probe", "lr",
            "batch_size", "results_table"} <= set(parameters)
    assert parameters["methods"]["default"] == ["student", "kd", "dkd", "fitnet", "rkd", "cka"]


def test_every_method_builds_a_distiller_on_the_stages(conv_pair, images):
    teacher, student = conv_pair
    data = (images[:16], torch.arange(16) % 5)  # OFA-KD sizes its branches on a batch of the data
    for name in METHODS:
        model = method_distiller(name, teacher, student, data=data)
        if name == "student":
            assert model is student
            continue
        assert isinstance(model, Distiller) and [column.split("@")[0] for column in model.terms] == [name] * len(
            model.terms)
        # at: one term per stage pair; ofa: its final-logit term and a branch per student stage
        assert len(model.terms) == {"at": 3, "ofa": 4}.get(name, 1)
        assert model.ce_weight == 1.0
    assert method_distiller("fitnet", teacher, student).layers == {"fitnet": ("blocks.1", "blocks.1")}
    assert method_distiller("cka", teacher, student).layers == {"cka": ("blocks.2", "blocks.2")}
    assert isinstance(method_distiller("kd", teacher, student, weight=0.5).terms["kd"], KD)
    assert method_distiller("kd", teacher, student, weight=0.5).weights == {"kd": 0.5}
    assert isinstance(method_distiller("fitnet", teacher, student).terms["fitnet"], FitNet)
    with pytest.raises(ValueError, match="unknown term 'kdd'; did you mean 'kd'"):
        method_distiller("kdd", teacher, student)


def test_table_is_mean_and_sample_std_over_seeds(tmp_path):
    runs = pd.DataFrame({
        "method": ["student", "student", "kd", "kd", "dkd", "dkd", "dkd"], "seed": [0, 1, 0, 1, 0, 1, 2],
        "accuracy": [0.80, 0.90, 0.90, 0.94, 0.85, 0.85, 0.99], "matched_cka": [0.5, 0.7, 0.6, 0.6, 0.1, 0.2, 0.3],
        "seconds": [1.0] * 7,
    })
    comparison = Comparison(runs, teacher_accuracy=0.98, settings={"epochs": 2})
    table = comparison.table()
    np.testing.assert_allclose(table["accuracy_mean"], [85.0, 92.0, 89.666666666])
    np.testing.assert_allclose(table["accuracy_std"], [np.std([80, 90], ddof=1), np.std([90, 94], ddof=1),
                                                       np.std([85, 85, 99], ddof=1)])
    np.testing.assert_allclose(table["vs_student"], [0.0, 7.0, 89.666666666 - 85.0])
    # paired by seed: dkd beats 0.80 on seed 0, loses to 0.90 on seed 1; its seed 2 has no student run
    assert table["wins"].tolist() == [0, 2, 1] and table["paired_seeds"].tolist() == [2, 2, 2]
    text = comparison.to_markdown()
    assert "| student | 85.00 ± 7.07 | — | — | 0.600 | 2 |" in text
    assert "| kd | 92.00 ± 2.83 | +7.00 | 2/2 | 0.600 | 2 |" in text and "| dkd | 89.67 ± 8.08 | +4.67 | 1/2 |" in text
    assert "| *teacher* | 98.00 |" in text
    path = comparison.save_markdown(tmp_path / "t.md", command="kd-workbench report distill -p epochs=2")
    assert "Made by `kd-workbench report distill -p epochs=2`" in path.read_text()


def test_command_line_lists_only_the_changed_parameters():
    defaults = {"epochs": 5, "seeds": [0, 1, 2], "student_kwargs": {"widths": [8, 16, 32]}}
    assert command_line("distill", {"epochs": 5, "seeds": [0], "student_kwargs": {"widths": [4]}}, defaults) == (
        "kd-workbench report distill -p 'seeds=[0]' -p 'student_kwargs={\"widths\": [4]}'"
    )


@pytest.mark.slow
@pytest.mark.parametrize("dataset", ["digits", "animals"])
def test_distill_report_runs_end_to_end(tmp_path, dataset):
    table = tmp_path / "table.md"
    env = {**os.environ, "KD_WORKBENCH_CACHE": str(tmp_path / "cache"), "OMP_NUM_THREADS": "1"}
    done = subprocess.run(
        [sys.executable, "-m", "workbench.cli", "report", "distill", *SMALL, "-p", f"dataset={dataset}",
         "-p", f"results_table={table}", "--output-dir", str(tmp_path / "out")],
        capture_output=True, text=True, env=env, timeout=300,
    )
    assert done.returncode == 0, done.stderr
    (run_dir,) = (tmp_path / "out" / "distill").iterdir()
    notebook, html = run_dir / "report.ipynb", run_dir / "report.html"
    assert notebook.is_file() and html.is_file()
    nb = nbformat.read(str(notebook), as_version=4)
    outputs = [o for cell in nb.cells if cell.cell_type == "code" for o in cell.outputs]
    assert not [o for o in outputs if o.output_type == "error"]
    assert not [o for o in outputs if o.output_type == "stream" and o.name == "stderr" and "Traceback" in o.text]
    markdown = "\n".join(o.data["text/markdown"] for o in outputs if "text/markdown" in o.get("data", {}))
    # one epoch: every method is flagged as not converged and marked so; one seed: no spread
    assert "| student (*not converged*)" in markdown and "| kd (*not converged*)" in markdown
    assert "| kd\\*0.5+fitnet@blocks.1 (*not converged*)" in markdown
    assert " ± n/a |" in markdown and "± 0.00" not in markdown and "**Not conclusive" in markdown
    box = next(cell for cell in nb.cells if cell.get("id") == "sanity-box").outputs[0].data["text/markdown"]
    assert box.startswith("**Sanity checks: ") and "- **method `kd`**: trained a single epoch" in box
    assert "- **teacher `cnn_small`** (warning): trained a single epoch" in box  # all methods share it
    assert "Train longer: -p epochs=" in box and "| teacher | `cnn_small` | 6,274 |" in box
    mimes = {mime for o in outputs for mime in o.get("data", {})}
    assert {"application/vnd.plotly.v1+json", "image/png"} <= mimes
    page = html.read_text(encoding="utf-8")
    assert "<td>kd (<em>not converged</em>)" in page  # the table, rendered
    assert "<td>kd*0.5+fitnet@blocks.1 (<em>not converged</em>)" in page
    written = table.read_text()
    assert "| kd (*not converged*)" in written and "kd-workbench report distill" in written and "'seeds=[0]'" in written
    assert "- `kd*0.5+fitnet@blocks.1`: CE + 0.5 × KD(T=4) on the logits" in written


def test_run_comparison_refuses_bad_method_and_seed_lists_before_training(conv_pair):
    teacher, student = conv_pair
    data = (torch.zeros(8, 3, 16, 16), torch.zeros(8, dtype=torch.long))
    calls = []
    make = lambda seed: calls.append(seed) or student  # noqa: E731
    for methods, seeds, message in [(["student", "kdd"], [0], "methods: method 'kdd': unknown term 'kdd'"),
                                    (["student"], [], "at least one method and one seed"),
                                    (["student", "kd"], [0, 0], "must not repeat"),
                                    (["kd", "kd"], [0], "must not repeat")]:
        with pytest.raises(ValueError, match=message):
            run_comparison(teacher, make, data, data, methods, seeds, device="cpu")
    assert calls == []  # nothing was built or trained


def test_animals_reach_every_report_helper():
    from workbench.data import animals

    assert reports.seeded_model("cnn_small", "animals").head.out_features == 10
    assert reports.seeded_model("cnn_small", "shapes").head.out_features == 4
    train, test = reports.training_set("animals"), reports.evaluation_data("animals")
    assert torch.equal(train.tensors[0], animals("train").tensors[0])
    assert len(reports.training_set("animals", 300)) == 300
    assert torch.equal(test.tensors[1], animals("test").tensors[1]) and tuple(test.tensors[0].shape[1:]) == (1, 32, 32)


def test_an_unknown_dataset_fails_before_anything_trains_and_lists_the_names(monkeypatch, tmp_path):
    import workbench.train.cache as cache

    monkeypatch.setattr(cache, "fit", lambda *args, **kwargs: pytest.fail("trained on an unknown dataset"))
    message = r"dataset must be one of \('digits', 'animals', 'shapes'\), got 'cifar'"
    for call in (lambda: reports.evaluation_data("cifar"), lambda: reports.training_set("cifar"),
                 lambda: reports.seeded_model("cnn", "cifar"), lambda: reports.report_model("cnn", "cifar"),
                 lambda: reports.report_model("cnn", "cifar", weights=tmp_path / "teacher.safetensors")):
        with pytest.raises(ValueError, match=message):
            call()
