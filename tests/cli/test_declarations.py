"""Report parameter declarations: every parameter has one, and bad values stop the CLI, ``run_report`` and
the notebook's own check cell before anything trains, naming the parameter and what would be right."""
from __future__ import annotations

import json
import re

import pytest
import torch

from fake_runner import executor  # noqa: F401 (a fixture)

from workbench import cli, models, reports
from workbench.reports import declarations
from workbench.reports.kernel import execute_notebook


def defaults(report: str) -> dict:
    return {name: spec["default"] for name, spec in reports.report_parameters(report).items()}


@pytest.mark.parametrize("report", sorted(reports.REPORTS))
def test_every_notebook_parameter_has_a_rule_and_every_rule_names_a_parameter(report):
    rules = set(declarations.declaration(report).rules)
    parameters = set(reports.report_parameters(report))
    assert parameters - rules == set(), f"parameters of {report!r} without a rule in declarations.py"
    assert rules - parameters == set(), f"rules of {report!r} for parameters its notebook does not have"


@pytest.mark.parametrize("report", sorted(reports.REPORTS))
def test_the_defaults_and_every_example_are_allowed(report):
    values = defaults(report)
    declarations.check_values(report, values, models=True)  # the notebook's own defaults pass
    for name, rule in declarations.declaration(report).rules.items():
        if rule.example is not None and rule.check is not None and not name.endswith("_weights"):  # files
            declarations.check_values(report, {**values, name: json.loads(rule.example)})


def run_cli(capsys, tmp_path, report, *parameters):
    argv = ["report", report, "-o", str(tmp_path / "out")]
    for parameter in parameters:
        argv += ["-p", parameter]
    status = cli.main(argv)
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return status, err


@pytest.mark.parametrize("report, parameter, needles", [
    ("gap", "kernel=cosine", ["parameter kernel = 'cosine'", "'linear', 'rbf'"]),
    ("distill", 'methods=["student", "kd", "fitnett"]', ["parameter methods", "did you mean 'fitnet'"]),
    ("gap", 'teacher_layers=["blocks.0", "blocks.9"]', ["parameter teacher_layers", "blocks.9", "closest names",
                                                        "blocks.2"]),
    ("gap", 'student_kwargs={"widht": [4, 8]}', ["parameter student_kwargs", "widht", "for example"]),
    ("distill", "lr=0", ["parameter lr = 0.0", "> 0", "lr=0.01"]),
    ("distill", "seeds=[0, 1, 0]", ["parameter seeds = [0, 1, 0]", "seed 0 repeated", "distinct"]),
    ("distill", 'methods=["kd", "fitnet@blocks.7"]', ["parameter methods", "blocks.7", "closest names"]),
    ("gap", "dataset=digit", ["parameter dataset", "did you mean 'digits'"]),
    ("gap", "teacher=resnet19", ["parameter teacher", "resnet18"]),
    ("gap", "student=bert_tiny", ["parameter student", "cannot take the report's 1×32×32 images"]),
    ("gap", "temperature=-1", ["parameter temperature", "> 0"]),
    ("distill", "threads=-1", ["parameter threads", ">= 0"]),
    ("distill", 'weights={"at": 2.0}', ["parameter weights", "'at' is not one of the methods run"]),
    ("gap", "teacher_weights=missing.safetensors", ["parameter teacher_weights", "no such file"]),
    ("gap", "device=gpu", ["parameter device", "auto"]),
])
def test_a_bad_value_exits_2_before_anything_runs(executor, tmp_path, capsys, monkeypatch, report, parameter,
                                                  needles):
    monkeypatch.chdir(tmp_path)
    status, err = run_cli(capsys, tmp_path, report, parameter)
    assert status == cli.EXIT_USAGE, err
    for needle in needles:
        assert needle in err, (needle, err)
    assert executor == [] and not (tmp_path / "out").exists()  # no kernel, no run folder


def test_the_python_api_refuses_the_same_values_before_writing(executor, tmp_path):
    with pytest.raises(reports.ParameterError, match="parameter kernel"):
        reports.run_report("gap", {"kernel": "cosine"}, tmp_path / "out")
    with pytest.raises(reports.ParameterError, match="parameter student_layers.*closest names"):
        reports.run_report("gap", {"student": "cnn_small", "student_layers": "head.*x"}, tmp_path / "out")
    assert executor == [] and not (tmp_path / "out").exists()


def test_the_methods_type_error_suggests_a_method_list_not_layers(executor, tmp_path, capsys):
    status, err = run_cli(capsys, tmp_path, "distill", "methods=kd")
    assert status == cli.EXIT_USAGE
    assert "expects list" in err and '["student", "kd", "kd+fitnet@blocks.1"]' in err, err
    assert "blocks.0" not in err
    status, err = run_cli(capsys, tmp_path, "gap", "teacher_kwargs=[1]")  # a dict parameter: a dict example
    assert status == cli.EXIT_USAGE and '{"widths": [16, 32, 64]}' in err, err


def test_list_and_help_show_the_allowed_values(capsys):
    assert cli.main(["report", "--list"]) == cli.EXIT_OK
    out = capsys.readouterr().out
    assert re.search(r"^\s+kernel\s+str\s+'linear'\s+linear \| rbf\s", out, re.M), out
    assert re.search(r"^\s+dataset\s+str\s+'digits'\s+digits \| animals \| shapes\s", out, re.M)
    assert re.search(r"^\s+lr\s+float\s+0.01\s+number > 0\s", out, re.M)
    assert re.search(r"^\s+seeds\s+list\s+\[0, 1, 2\]\s+list of distinct ints >= 0\s", out, re.M)
    assert cli.main(["report", "gap", "--help"]) == cli.EXIT_OK
    assert "auto | cpu | cuda | cuda:N | mps" in capsys.readouterr().out


def test_a_weights_file_must_fit_the_built_model(tmp_path):
    path = models.save_weights(models.create_sized("cnn_small", 32, num_classes=10, in_chans=1),
                               tmp_path / "small.safetensors")
    values = defaults("gap")
    declarations.check_values("gap", {**values, "student_weights": str(path)}, models=True)  # it fits the student
    with pytest.raises(reports.ParameterError, match="parameter teacher_weights .* does not fit the teacher"):
        declarations.check_values("gap", {**values, "teacher_weights": str(path)}, models=True)
    (tmp_path / "w.ckpt").write_bytes(b"")
    with pytest.raises(reports.ParameterError, match=r"must end in \.safetensors"):
        declarations.check_values("gap", {**values, "teacher_weights": str(tmp_path / "w.ckpt")})


def test_a_cuda_device_this_machine_lacks_is_refused():
    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    with pytest.raises(reports.ParameterError, match=f"this machine has {count} CUDA device"):
        declarations.check_values("gap", {"device": f"cuda:{count}"})
    declarations.check_values("gap", {"device": "cpu"})


def test_check_notebook_needs_every_parameter_and_checks_the_models():
    namespace = defaults("gap")
    reports.check_notebook("gap", {**namespace, "unrelated": 1})
    with pytest.raises(reports.ParameterError, match="does not set kernel"):
        reports.check_notebook("gap", {key: value for key, value in namespace.items() if key != "kernel"})
    with pytest.raises(reports.ParameterError, match="parameter student_layers"):
        reports.check_notebook("gap", {**namespace, "student_layers": ["nope"]})


@pytest.mark.parametrize("report", sorted(reports.REPORTS))
def test_the_notebooks_check_cell_stops_a_bad_value_before_training(tmp_path, monkeypatch, report):
    """A person editing the parameters cell gets the error from the cell right after it: executed without
    run_report's pre-check, the notebook fails in that cell, and nothing after it ran."""
    monkeypatch.setenv("KD_WORKBENCH_CACHE", str(tmp_path / "cache"))
    output = tmp_path / "out.ipynb"
    bad = {"gap": {"kernel": "cosine"}, "distill": {"lr": 0.0}, "ofa": {"lr": 0.0}, "diswot": {"lr": 0.0}, "dt": {"epochs": 0}}[report]
    with pytest.raises(Exception, match="ParameterError") as failure:
        execute_notebook(reports.REPORTS[report].notebook, output, bad)
    assert "check_notebook" in str(getattr(failure.value, "source", failure.value))
    assert not (tmp_path / "cache").exists()  # nothing was trained or cached


def test_a_notebook_given_by_path_is_not_held_to_a_reports_rules(executor, tmp_path):
    """Only the registered notebooks have declarations: another gap.ipynb keeps its own parameters."""
    import nbformat

    notebook = tmp_path / "gap.ipynb"
    cell = nbformat.v4.new_code_cell('kernel: str = "cosine"', metadata={"tags": ["parameters"]})
    kernelspec = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nbformat.write(nbformat.v4.new_notebook(cells=[cell], metadata={"kernelspec": kernelspec}), str(notebook))
    reports.run_report(str(notebook), {"kernel": "cosine"}, tmp_path / "out")
    assert executor == [{"kernel": "cosine"}]
    assert declarations.declaration(reports.get_report("gap")) is declarations.DECLARATIONS["gap"]
