"""CLI progress: kernel-side events (cells, training runs, epochs) reach the runner in order, and the
printer draws them as one updating line on a terminal or plain lines in a log, with a time-left estimate."""
from __future__ import annotations

import fcntl
import io
import os
import struct
import tempfile
import termios
from pathlib import Path

import nbformat
import pytest
import torch

from fake_runner import executor  # noqa: F401 (a fixture)

from workbench import cli, models, reports
from workbench.reports import progress
from workbench.reports.compare import run_comparison
from workbench.reports.progress_line import ProgressPrinter, ProgressState

KERNELSPEC = {"name": "python3", "display_name": "Python 3", "language": "python"}


class FakeTerminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def cell(index, cells, first_line, time, heading=""):
    return {"event": "cell", "index": index, "cells": cells, "heading": heading, "first_line": first_line,
            "time": time}


def training_events():
    """A plan of 2 runs × 2 epochs × 5 steps: the kd run's first epoch ends 10 s after the plan started."""
    return [
        cell(1, 3, "n = 1", 0.0),
        cell(2, 3, "comparison = reports.run_comparison(", 0.0, heading="Training"),
        {"event": "plan", "runs": 2, "epochs": 2, "time": 0.0},
        {"event": "run_start", "method": "kd", "seed": 0, "epoch": 1, "epochs": 2, "steps": 0, "time": 0.0},
        {"event": "step", "method": "kd", "seed": 0, "epoch": 1, "epochs": 2, "steps": 3, "time": 6.0},
        {"event": "epoch", "method": "kd", "seed": 0, "epoch": 1, "epochs": 2, "steps": 5, "steps_per_epoch": 5,
         "eval_accuracy": 0.5, "time": 10.0},
        {"event": "tick", "time": 12.0},
    ]


def test_the_time_left_is_the_remaining_steps_at_the_rate_so_far():
    state = ProgressState()
    events = [
        {"event": "plan", "runs": 3, "epochs": 4, "time": 100.0},
        {"event": "run_start", "method": "student", "seed": 0, "epochs": 4, "steps": 0, "time": 100.0},
        {"event": "epoch", "epoch": 1, "epochs": 4, "steps": 10, "steps_per_epoch": 10, "time": 105.0},
        {"event": "run_end", "steps": 40, "time": 120.0},
        {"event": "run_start", "method": "kd", "seed": 0, "epochs": 4, "steps": 0, "time": 120.0},
        {"event": "step", "epoch": 1, "epochs": 4, "steps": 10, "time": 125.0},
    ]
    for event in events:
        state.feed(event)
    between = ProgressState()
    for event in events[:4]:
        between.feed(event)
    # after the first run: 40 of 120 steps in 20 s -> 80 left at 2 steps/s
    assert between.line() == "1/3 runs done | about 40 s left"
    # 3 runs × 4 epochs × 10 steps = 120; done 40 + 10 = 50 in 25 s: 2 steps/s, 70 left -> 35 s
    assert state.seconds_left() == pytest.approx(70 / (50 / 25))
    assert "kd seed 0 | epoch 1/4 | run 2/3 | about 35 s left" in state.line()
    alone = ProgressState()  # no plan: within the run (5 epochs of 8 steps; 16 done in 8 s -> 24 left at 2/s)
    for event in [{"event": "run_start", "model": "cnn", "epochs": 5, "steps": 0, "time": 0.0},
                  {"event": "epoch", "epoch": 2, "epochs": 5, "steps": 16, "steps_per_epoch": 8, "time": 8.0}]:
        alone.feed(event)
    assert alone.seconds_left() == pytest.approx(12.0) and "cnn | epoch 2/5 | about 12 s left" in alone.line()


def test_without_training_the_line_shows_the_cells_time_so_far():
    state = ProgressState()
    state.feed(cell(4, 9, "cka = wb.similarity.cka_matrix(", 50.0, heading="Measurements"))
    state.feed({"event": "step", "time": 125.0})  # no run started: ignored, but the clock moves
    assert state.line() == "cell 4/9 | 1 min 15 s | Measurements: cka = wb.similarity.cka_matrix("
    assert state.seconds_left() is None


def test_on_a_terminal_one_line_is_updated_in_place_and_cut_to_the_width():
    out = FakeTerminal()
    printer = ProgressPrinter(out, width=48)
    seen = []
    for event in training_events():
        printer(event)
        seen.append(out.getvalue())
    text = out.getvalue()
    assert "\n" not in text and text.count("\r") == len(training_events())  # every event redraws, no new line
    drawn = text.split("\r")[1:]
    assert all(len(frame.rstrip()) <= 47 for frame in drawn)
    state = ProgressState()
    for event in training_events()[:-1]:
        state.feed(event)
    state.now = 12.0
    assert drawn[-1].rstrip() == state.line()[:47]  # the last frame is the current state, cut to the width
    assert all(len(later) >= len(earlier.rstrip()) for earlier, later in zip(drawn, drawn[1:]))  # old text covered
    printer.close()
    assert out.getvalue().endswith("\n") and out.getvalue().count("\n") == 1


def test_a_real_pty_gives_the_terminal_width():
    leader, follower = os.openpty()
    try:
        fcntl.ioctl(follower, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 30, 0, 0))
        with os.fdopen(follower, "w", closefd=False) as stream:
            printer = ProgressPrinter(stream)
            assert printer.tty and printer._columns() == 30
            for event in training_events():
                printer(event)
            printer.close()
        written = os.read(leader, 65536).decode()
    finally:
        os.close(leader)
        os.close(follower)
    frames = written.replace("\r\n", "\n").rstrip("\n").split("\r")[1:]
    assert frames and all(len(frame.rstrip()) <= 29 for frame in frames)


def test_without_a_terminal_plain_lines_one_per_event_not_per_step():
    out = io.StringIO()
    printer = ProgressPrinter(out)
    for event in training_events() + [{"event": "run_end", "method": "kd", "seed": 0, "steps": 10, "time": 20.0}]:
        printer(event)
    printer.close()
    lines = out.getvalue().splitlines()
    assert "\r" not in out.getvalue()
    assert lines == [
        "cell 1/3 n = 1",
        "cell 2/3 Training: comparison = reports.run_comparison(",
        "  training kd seed 0 for 2 epochs | run 1/2",
        "  kd seed 0 | epoch 1/2 | run 1/2 | test accuracy 50.00 % | about 30 s left",
        "  kd done",
    ]


def test_a_tiny_distill_run_emits_its_events_in_order(tmp_path, monkeypatch):
    events = tmp_path / "events.jsonl"
    monkeypatch.setenv(progress.PROGRESS_ENV, str(events))
    torch.manual_seed(0)
    x, y = torch.randn(48, 1, 16, 16), torch.randint(0, 10, (48,))
    teacher = models.create("cnn", widths=(4, 8), img_size=16).eval()
    run_comparison(teacher, lambda seed: models.create("cnn", widths=(4, 8), img_size=16), (x, y), (x, y),
                   ["student", "kd"], [0, 3], epochs=2, batch_size=16, device="cpu")
    seen = [event for event in progress.read_events(events) if event["event"] != "step"]
    expected = [("plan", None, None, None)]
    for method in ("student", "kd"):
        for seed in (0, 3):
            expected += [("run_start", method, seed, 1), ("epoch", method, seed, 1), ("epoch", method, seed, 2),
                         ("run_end", method, seed, 2)]
    expected.append(("plan_end", None, None, None))
    assert [(e["event"], e.get("method"), e.get("seed"), e.get("epoch")) for e in seen] == expected
    assert seen[0]["runs"] == 4 and seen[0]["epochs"] == 2
    epochs = [e for e in seen if e["event"] == "epoch"]
    assert all(e["steps_per_epoch"] == 3 and e["steps"] == 3 * e["epoch"] and e["epochs"] == 2 for e in epochs)
    assert all(0.0 <= e["eval_accuracy"] <= 1.0 for e in epochs)
    times = [e["time"] for e in seen]
    assert times == sorted(times)


def test_nothing_is_emitted_when_no_runner_listens(tmp_path, monkeypatch):
    monkeypatch.delenv(progress.PROGRESS_ENV, raising=False)
    monkeypatch.chdir(tmp_path)
    progress.emit("plan", runs=1, epochs=1)
    assert progress.fit_callbacks(method="kd") == [] and list(tmp_path.iterdir()) == []


def test_the_tail_waits_for_whole_lines(tmp_path):
    path, seen = tmp_path / "events.jsonl", []
    tail = progress.EventTail(path, seen.append, tick_seconds=3600)
    assert tail._read() == 0  # no file yet
    with open(path, "w") as stream:
        stream.write('{"event": "cell", "ind')
        stream.flush()
        assert tail._read() == 0 and seen == []  # half a line is kept back
        stream.write('ex": 1}\n{"event": "plan"}\n')
    tail.start().stop()  # the thread reads the rest before it ends
    assert seen == [{"event": "cell", "index": 1}, {"event": "plan"}]


def write_notebook(path: Path, *cells: str) -> Path:
    code = [nbformat.v4.new_code_cell("epochs: int = 2", metadata={"tags": ["parameters"]}),
            nbformat.v4.new_markdown_cell("## Fitting")]
    code += [nbformat.v4.new_code_cell(source) for source in cells]
    nbformat.write(nbformat.v4.new_notebook(cells=code, metadata={"kernelspec": KERNELSPEC}), str(path))
    return path


FIT_CELL = """import torch
from workbench.reports import progress
from workbench.train import fit
x, y = torch.randn(32, 4), torch.randint(0, 2, (32,))
fit(torch.nn.Linear(4, 2), (x, y), (x, y), epochs=epochs, batch_size=8, device="cpu", progress=False,
    callbacks=progress.fit_callbacks(model="linear"))"""


def test_a_report_run_hands_cell_and_training_events_over_and_leaves_no_event_file(tmp_path, monkeypatch):
    temporary = tmp_path / "tmp"
    temporary.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(temporary))
    notebook = write_notebook(tmp_path / "fits.ipynb", FIT_CELL, "raise RuntimeError('late failure')")
    seen = []
    with pytest.raises(reports.ReportFailed, match="late failure"):
        reports.run_report(str(notebook), {"epochs": 3}, tmp_path / "out", on_event=seen.append)
    kinds = [event["event"] for event in seen if event["event"] not in ("step", "tick")]
    assert kinds == ["cell", "cell", "cell", "run_start", "epoch", "epoch", "epoch", "run_end", "cell"]
    cells = [event for event in seen if event["event"] == "cell"]
    assert [(c["index"], c["cells"]) for c in cells] == [(1, 4), (2, 4), (3, 4), (4, 4)]  # injected cell included
    assert cells[2]["heading"] == "Fitting" and cells[2]["first_line"] == "import torch"
    assert [e["epoch"] for e in seen if e["event"] == "epoch"] == [1, 2, 3]
    assert list(temporary.iterdir()) == []  # the event folder is gone, also after a failure
    run_dir = next((tmp_path / "out" / "fits").iterdir())
    assert sorted(path.name for path in run_dir.iterdir()) == ["parameters.json", "report.html", "report.ipynb"]


@pytest.mark.parametrize("flags, draws", [([], True), (["--quiet"], False), (["-q"], False), (["--progress"], False)])
def test_the_cli_draws_progress_unless_quiet(executor, tmp_path, monkeypatch, flags, draws):
    given = []
    monkeypatch.setattr(reports, "run_report", lambda *args, **kwargs: given.append(kwargs["on_event"]) or
                        reports.ReportRun(tmp_path, tmp_path / "r.ipynb", tmp_path / "r.html"))
    assert cli.main(["report", "gap", "-o", str(tmp_path), *flags]) == cli.EXIT_OK
    assert isinstance(given[0], ProgressPrinter) is draws and (given[0] is None) is not draws


def test_a_report_model_that_trains_emits_its_epochs_and_a_cached_one_nothing(tmp_path, monkeypatch):
    events = tmp_path / "events.jsonl"
    monkeypatch.setenv(progress.PROGRESS_ENV, str(events))
    monkeypatch.setenv("KD_WORKBENCH_CACHE", str(tmp_path / "cache"))
    reports.report_model("mlp", "digits", epochs=2, progress=False, hidden=[8])
    seen = [(e["event"], e.get("model"), e.get("epoch"), e.get("epochs")) for e in progress.read_events(events)
            if e["event"] != "step"]
    assert seen == [("run_start", "mlp", 1, 2), ("epoch", "mlp", 1, 2), ("epoch", "mlp", 2, 2),
                    ("run_end", "mlp", 2, 2)]
    events.unlink()
    reports.report_model("mlp", "digits", epochs=2, progress=False, hidden=[8])  # from the cache
    assert progress.read_events(events) == []
