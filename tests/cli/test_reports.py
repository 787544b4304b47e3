"""The report CLI without a kernel: parameter parsing and casting, validation before anything runs,
the run folder layout, ``--list`` / ``--help``, and the exit statuses."""
from __future__ import annotations

import json
import re
import subprocess
import sys

import nbformat
import pytest

from workbench import cli, reports
from workbench.reports import runner


@pytest.fixture
def executor(monkeypatch):
    """Replace papermill and nbconvert by recorders: each call is kept; the notebook is a stub."""
    calls = []

    def fake_execute(notebook, output, parameters, *, progress=False, on_event=None):
        calls.append({"notebook": notebook, "output": output, "parameters": parameters})
        nbformat.write(nbformat.v4.new_notebook(), str(output))

    def fake_export(notebook, html):
        html.write_text("<html></html>")
        return html

    monkeypatch.setattr(runner, "execute_notebook", fake_execute)
    monkeypatch.setattr(runner, "export_html", fake_export)
    return calls


def test_parse_parameters_accepts_both_forms():
    parsed = cli.parse_parameters([["n_samples=1000"], ["student", "vit"], ["teacher_layers=a=b"]])
    assert parsed == {"n_samples": "1000", "student": "vit", "teacher_layers": "a=b"}


@pytest.mark.parametrize(
    "items, message",
    [
        ([["student"]], "key=value or -p key value"),
        ([["a", "b", "c"]], "key=value or -p key value"),
        ([["student=vit", "gap"]], "key=value or -p key value"),
        ([["1x=3"]], "not a parameter name"),
        ([["seed=1"], ["seed", "2"]], "given twice"),
    ],
)
def test_parse_parameters_rejects_malformed(items, message):
    with pytest.raises(reports.ParameterError, match=message):
        cli.parse_parameters(items)


@pytest.mark.parametrize(
    "raw, type_name, default, expected",
    [
        ("1000", "int", 450, 1000),
        ("-3", "int", 0, -3),
        ("2.5", "float", 1.0, 2.5),
        ("3", "float", 1.0, 3.0),
        ("true", "bool", False, True),
        ("False", "bool", True, False),
        ("0", "bool", True, False),
        ("none", "Optional[str]", None, None),
        ("NULL", "Optional[str]", None, None),
        ("w.safetensors", "Optional[str]", None, "w.safetensors"),
        ("stages", "Union[str, list]", "stages", "stages"),
        ('["blocks.0", "blocks.2"]', "Union[str, list]", "stages", ["blocks.0", "blocks.2"]),
        ("['blocks.0']", "list", [], ["blocks.0"]),
        ('{"widths": [4, 8]}', "dict", {}, {"widths": [4, 8]}),
        ("none", "str", "cnn", "none"),  # a str that is not optional stays text
        ("12", "None", 3, 12),  # no annotation: the default's type decides
        ("yes", "None", True, True),
        ("[1, 2]", "None", None, [1, 2]),  # no annotation, default None: JSON when it parses
    ],
)
def test_cast_parameter(raw, type_name, default, expected):
    value = cli.cast_parameter("p", raw, type_name, default)
    assert value == expected and type(value) is type(expected)


@pytest.mark.parametrize(
    "raw, type_name, default",
    [("1000.5", "int", 450), ("abc", "int", 450), ("maybe", "bool", True), ("x", "float", 1.0),
     ("[1]", "dict", {}), ("none", "int", 0), ("{", "list", [])],
)
def test_cast_parameter_errors_name_parameter_type_and_value(raw, type_name, default):
    with pytest.raises(reports.ParameterError) as info:
        cli.cast_parameter("n_samples", raw, type_name, default)
    message = str(info.value)
    assert "'n_samples'" in message and type_name in message and repr(raw) in message


@pytest.mark.parametrize(
    "raw, type_name, default, message",
    [
        ("nan", "float", 1.0, "finite"),
        ("inf", "float", 1.0, "finite"),
        ("1e999", "float", 1.0, "finite"),
        ("[1, NaN]", "list", [], r"p\[1\] = nan is not a finite number"),
        ("[('blocks.0',)]", "Union[str, list]", "stages", r"p\[0\] = \('blocks.0',\) is a tuple"),  # not text
        ("{'a': {1, 2}}", "dict", {}, r"p\['a'\] = \{1, 2\} is a set"),
        ("{1: 'a'}", "dict", {}, "has the key 1 of type int: dict keys must be strings"),
        ("[b'x']", "list", [], r"p\[0\] = b'x' is a bytes"),
        ("[1j]", "list", [], r"p\[0\] = 1j is a complex"),
        ("[Infinity]", "None", None, r"p\[0\] = inf is not a finite number"),  # no annotation: JSON
    ],
)
def test_cast_parameter_refuses_what_is_not_json_data(raw, type_name, default, message):
    with pytest.raises(reports.ParameterError, match=message):
        cli.cast_parameter("p", raw, type_name, default)


def test_deeply_nested_text_is_refused_without_a_traceback(executor, tmp_path, capsys):
    status = cli.main(["report", "gap", "-p", "teacher_kwargs", '{"a": ' * 100 + "1" + "}" * 100, "-o", str(tmp_path)])
    err = capsys.readouterr().err
    assert status == cli.EXIT_USAGE and "nested deeper than" in err and "Traceback" not in err
    assert executor == [] and list(tmp_path.iterdir()) == []


def test_unknown_name_exits_nonzero_suggests_and_runs_nothing(executor, tmp_path, capsys):
    status = cli.main(["report", "gap", "-p", "n_sample=10", "--output-dir", str(tmp_path)])
    err = capsys.readouterr().err
    assert status == cli.EXIT_USAGE
    assert "unknown parameter 'n_sample'" in err and "Did you mean 'n_samples'" in err
    assert executor == [] and list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    "parameter, expected_text",
    [("n_samples=1e3", "expects int"), ("debiased=maybe", "expects bool"), ("teacher_kwargs=[1]", "expects dict"),
     ("temperature=warm", "expects float")],
)
def test_wrong_type_exits_nonzero_and_runs_nothing(executor, tmp_path, capsys, parameter, expected_text):
    status = cli.main(["report", "gap", "-p", parameter, "-o", str(tmp_path)])
    err = capsys.readouterr().err
    assert status == cli.EXIT_USAGE and expected_text in err and parameter.split("=")[0] in err
    assert executor == [] and list(tmp_path.iterdir()) == []


def test_unknown_report_exits_nonzero(executor, tmp_path, capsys):
    assert cli.main(["report", "gapp", "-o", str(tmp_path)]) == cli.EXIT_USAGE
    assert "Did you mean 'gap'" in capsys.readouterr().err and executor == []


def test_valid_parameters_reach_the_executor_cast(executor, tmp_path, capsys):
    status = cli.main([
        "report", "gap", "-p", "n_samples=64", "-p", "debiased", "false", "-p", "teacher_weights=none",
        "-p", "teacher_layers", '["blocks.0", "blocks.2"]', "-p", "student_kwargs={\"widths\": [4, 8]}",
        "-p", "student", "cnn", "-o", str(tmp_path),
    ])
    assert status == cli.EXIT_OK, capsys.readouterr().err
    (call,) = executor
    assert call["parameters"] == {
        "n_samples": 64, "debiased": False, "teacher_weights": None, "teacher_layers": ["blocks.0", "blocks.2"],
        "student_kwargs": {"widths": [4, 8]}, "student": "cnn",
    }
    assert call["notebook"] == reports.REPORTS["gap"].notebook
    run_dir = call["output"].parent
    assert run_dir.parent == tmp_path / "gap" and call["output"].name == "report.ipynb"
    assert re.fullmatch(r"\d{8}-\d{6}-[0-9a-f]{8}", run_dir.name)
    assert json.loads((run_dir / "parameters.json").read_text())["n_samples"] == 64
    out = capsys.readouterr().out
    assert str(run_dir / "report.ipynb") in out and str(run_dir / "report.html") in out


def test_run_id_hashes_the_parameters(executor, tmp_path):
    def digest(run):
        return run.run_dir.name.split("-")[2].split(".")[0]

    first = reports.run_report("gap", {"n_samples": 64}, tmp_path)
    second = reports.run_report("gap", {"n_samples": 64}, tmp_path)
    other = reports.run_report("gap", {"n_samples": 65}, tmp_path)
    assert first.run_dir != second.run_dir  # the same parameters in the same second never overwrite
    assert digest(first) == digest(second) != digest(other)


def test_python_api_checks_names_before_running(executor, tmp_path):
    with pytest.raises(reports.ParameterError, match="Did you mean 'student'"):
        reports.run_report("gap", {"studnet": "vit"}, tmp_path)
    assert executor == [] and list(tmp_path.iterdir()) == []


def test_any_notebook_path_is_a_report(executor, tmp_path):
    notebook = tmp_path / "mine.ipynb"
    cell = nbformat.v4.new_code_cell("alpha: int = 1  # a number\nflag = False", metadata={"tags": ["parameters"]})
    kernelspec = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nbformat.write(nbformat.v4.new_notebook(cells=[cell], metadata={"kernelspec": kernelspec}), str(notebook))
    assert cli.validate_parameters(str(notebook), {"alpha": "2", "flag": "true"}) == {"alpha": 2, "flag": True}
    assert cli.main(["report", str(notebook), "-p", "beta=1", "-o", str(tmp_path / "out")]) == cli.EXIT_USAGE
    assert cli.main(["report", str(notebook), "-p", "alpha", "3", "-o", str(tmp_path / "out")]) == cli.EXIT_OK
    assert executor[0]["parameters"] == {"alpha": 3}
    assert executor[0]["output"].parent.parent == tmp_path / "out" / "mine"


def test_failing_cell_exits_1_and_prints_the_partial_notebook(monkeypatch, tmp_path, capsys):
    def failing_execute(notebook, output, parameters, *, progress=False, on_event=None):
        nbformat.write(nbformat.v4.new_notebook(), str(output))
        raise RuntimeError("a cell failed")

    monkeypatch.setattr(runner, "execute_notebook", failing_execute)
    status = cli.main(["report", "gap", "-o", str(tmp_path)])
    err = capsys.readouterr().err
    assert status == cli.EXIT_FAILED and "a cell failed" in err
    path = re.search(r"partial notebook: (\S+)", err)[1]
    assert path.endswith("report.ipynb") and nbformat.read(path, as_version=4)


def test_list_shows_each_parameter_with_type_and_default(capsys):
    assert cli.main(["report", "--list"]) == cli.EXIT_OK
    out = capsys.readouterr().out
    assert out.startswith("gap: ")
    for name, spec in reports.report_parameters("gap").items():
        row = rf"^\s+{name}\s+{re.escape(spec['type'])}\s+{re.escape(repr(spec['default']))}\s"
        assert re.search(row, out, re.M), name
    assert re.search(r"^\s+n_samples\s+int\s+\d+\s", out, re.M)
    assert re.search(r"^\s+debiased\s+bool\s+True\s", out, re.M)
    assert re.search(r"^\s+teacher_weights\s+Optional\[str\]\s+None\s", out, re.M)


def test_report_help_lists_options_and_the_reports_parameters(capsys):
    assert cli.main(["report", "gap", "--help"]) == cli.EXIT_OK
    out = capsys.readouterr().out
    assert "-p KEY[=VALUE] [VALUE]" in out and "--output-dir" in out and "--list" in out
    assert "parameters of 'gap'" in out and "n_samples" in out and "teacher_kwargs" in out


def test_top_level_help_and_no_command(capsys):
    with pytest.raises(SystemExit) as info:
        cli.main(["--help"])
    assert info.value.code == 0 and "report" in capsys.readouterr().out
    assert cli.main([]) == cli.EXIT_USAGE


def test_engine_imports_without_jupyter():
    code = (
        "import sys, workbench.reports, workbench.cli\n"
        "jupyter = ('papermill', 'nbconvert', 'jupyter_client', 'ipywidgets', 'ipykernel')\n"
        "heavy = [m for m in jupyter if m in sys.modules]\n"
        "assert not heavy, heavy\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
