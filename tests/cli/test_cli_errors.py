"""The report CLI under careless and hostile use: bad arguments exit 2 with a message (no traceback, no
"partial notebook" line, no files left), and a signal while a report runs stops its kernel and removes
the kernel's connection file (it holds the kernel's key)."""
from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import nbformat
import pytest

from fake_runner import executor  # noqa: F401 (a fixture)

from workbench import cli, reports
from workbench.reports import runner

KERNELSPEC = {"name": "python3", "display_name": "Python 3", "language": "python"}


def write_notebook(path: Path, parameters: str, *cells: str) -> Path:
    code = [nbformat.v4.new_code_cell(parameters, metadata={"tags": ["parameters"]})]
    code += [nbformat.v4.new_code_cell(cell) for cell in cells]
    nbformat.write(nbformat.v4.new_notebook(cells=code, metadata={"kernelspec": KERNELSPEC}), str(path))
    return path


def files_under(folder: Path) -> list[Path]:
    return sorted(path for path in folder.rglob("*") if path.is_file())


def assert_clean_usage_error(capsys, status: int, *needles: str) -> str:
    err = capsys.readouterr().err
    assert status == cli.EXIT_USAGE, err
    assert "Traceback" not in err and "partial notebook" not in err
    for needle in needles:
        assert needle in err, (needle, err)
    return err


@pytest.mark.parametrize("value", ['{1: 2}', '{"a": {3: [1]}}', "{(1, 2): 'x'}", "{None: 1}"])
def test_a_dict_with_a_non_string_key_exits_2(executor, tmp_path, capsys, value):
    status = cli.main(["report", "gap", "-p", "teacher_kwargs", value, "-o", str(tmp_path / "out")])
    assert_clean_usage_error(capsys, status, "teacher_kwargs")
    assert executor == [] and not (tmp_path / "out").exists()


@pytest.mark.parametrize("argv", [
    ["report", "gap", "-p", "student=vit\udcff"],  # what Python makes of the bytes b"vit\xff" in argv
    ["report", "gap", "-p", "student\udcfe", "vit"],
    ["report", "gap\udcff"],
    ["report", "gap", "-o", "out\udcff"],
])
def test_non_utf8_bytes_in_an_argument_exit_2(executor, tmp_path, capsys, monkeypatch, argv):
    monkeypatch.chdir(tmp_path)
    assert_clean_usage_error(capsys, cli.main(argv), "not valid UTF-8", "\\x")
    assert executor == [] and files_under(tmp_path) == []


def test_non_utf8_text_through_the_python_api_is_refused_before_anything_is_written(executor, tmp_path):
    with pytest.raises(reports.OutputError, match="UTF-8"):
        reports.run_report("gap", {}, tmp_path / "out\udcff")
    with pytest.raises(reports.ParameterError, match="UTF-8"):
        reports.run_report("gap", {"student": "vit\udcff"}, tmp_path)
    assert executor == [] and files_under(tmp_path) == []


def test_output_dir_that_is_a_file_or_below_one_exits_2(executor, tmp_path, capsys):
    existing = tmp_path / "existing.txt"
    existing.write_text("keep me")
    for output in (existing, existing / "sub"):
        status = cli.main(["report", "gap", "-o", str(output)])
        assert_clean_usage_error(capsys, status, "is a file, not a folder", str(existing))
    assert executor == [] and existing.read_text() == "keep me" and files_under(tmp_path) == [existing]


@pytest.mark.parametrize("failure", [PermissionError(13, "Permission denied"), OSError(28, "No space left on device")])
def test_output_dir_that_cannot_be_written_exits_2(executor, tmp_path, capsys, monkeypatch, failure):
    def refuse(path, data, **kwargs):  # root writes into read-only folders: simulate the refusal
        raise failure

    monkeypatch.setattr(runner, "write_atomic", refuse)
    status = cli.main(["report", "gap", "-o", str(tmp_path / "out")])
    assert_clean_usage_error(capsys, status, "cannot write the run folder", failure.strerror)
    assert executor == [] and files_under(tmp_path) == []
    assert list((tmp_path / "out" / "gap").iterdir()) == []  # the empty run folder is removed again


def test_output_dir_with_format_fields_is_used_literally(tmp_path):
    notebook = write_notebook(tmp_path / "tiny.ipynb", "count: int = 1", "print(count)")
    run = reports.run_report(str(notebook), {"count": 2}, tmp_path / "out{count}{pm}")
    assert run.notebook.is_file() and str(tmp_path / "out{count}{pm}") in str(run.notebook)
    assert nbformat.read(str(run.notebook), as_version=4).cells[2].outputs[0]["text"] == "2\n"


def test_parameters_json_and_html_are_written_atomically(tmp_path, monkeypatch):
    written = []
    real = runner.write_atomic

    def spy(path, data, **kwargs):
        written.append(Path(path).name)
        return real(path, data, **kwargs)

    monkeypatch.setattr(runner, "write_atomic", spy)
    notebook = write_notebook(tmp_path / "tiny.ipynb", "count: int = 1", "print(count)")
    run = reports.run_report(str(notebook), {"count": 3}, tmp_path / "out")
    assert written == ["parameters.json", "report.html"] and "<html" in run.html.read_text()
    assert [path.name for path in files_under(run.run_dir)] == ["parameters.json", "report.html", "report.ipynb"]


def _state(pid: int) -> str | None:
    """The process state letter (``Z`` for a zombie), or None when there is no such process."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError, IndexError):
        return None


@pytest.mark.skipif(not Path("/proc").is_dir(), reason="reads process states from /proc")
@pytest.mark.parametrize("sent", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_stops_the_kernel_and_removes_its_connection_file(tmp_path, sent):
    started = tmp_path / "kernel.pid"
    notebook = write_notebook(
        tmp_path / "sleepy.ipynb", f"started: str = {str(started)!r}",
        "import os, pathlib, time\npathlib.Path(started).write_text(str(os.getpid()))\ntime.sleep(120)",
    )
    runtime, temporary = tmp_path / "runtime", tmp_path / "tmp"
    temporary.mkdir()
    env = {**os.environ, "JUPYTER_RUNTIME_DIR": str(runtime), "TMPDIR": str(temporary)}
    process = subprocess.Popen(
        [sys.executable, "-m", "workbench.cli", "report", str(notebook), "-o", str(tmp_path / "out")],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),  # a background job may ignore SIGINT
    )
    try:
        deadline = time.monotonic() + 120
        while not started.exists() or not started.read_text():
            assert process.poll() is None and time.monotonic() < deadline, process.communicate()
            time.sleep(0.1)
        kernel = int(started.read_text())
        assert list(runtime.glob("kernel-*.json")), "the kernel's connection file lives in the runtime folder"
        process.send_signal(sent)
        out, err = process.communicate(timeout=60)
    finally:
        if process.poll() is None:
            process.kill()
    assert process.returncode == 128 + sent, err
    assert f"interrupted by {sent.name}" in err and "Traceback" not in err, err
    partial = re.search(r"partial notebook: (\S+)", err)[1]
    assert "time.sleep" in nbformat.read(partial, as_version=4).cells[-1].source
    assert list(runtime.glob("*.json")) == [] and list(temporary.glob("*.json")) == []
    deadline = time.monotonic() + 10
    while _state(kernel) not in (None, "Z") and time.monotonic() < deadline:
        time.sleep(0.1)
    assert _state(kernel) in (None, "Z"), f"kernel {kernel} still running"
