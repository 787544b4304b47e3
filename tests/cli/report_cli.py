"""Running a report end to end through the CLI, as the end-to-end report tests do: a subprocess with its own
model cache and one thread per op, the run directory's notebook read back, its outputs and sanity box."""
from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import nbformat


@dataclass
class ReportRun:
    """One finished CLI report run: its run directory, every code cell output, the sanity box's Markdown and
    the MIME types the outputs hold."""

    run_dir: Path
    outputs: list
    box: str
    mimes: set


def run_report_cli(report: str, parameters: list[str], tmp_path: Path, timeout: int) -> ReportRun:
    """``kd-workbench report <report> <parameters> --output-dir tmp_path/out`` in a subprocess (cache under
    ``tmp_path``); fails the test on a non-zero exit or an error output."""
    env = {**os.environ, "KD_WORKBENCH_CACHE": str(tmp_path / "cache"), "OMP_NUM_THREADS": "1"}
    done = subprocess.run(
        [sys.executable, "-m", "workbench.cli", "report", report, *parameters, "--output-dir", str(tmp_path / "out")],
        capture_output=True, text=True, env=env, timeout=timeout,
    )
    assert done.returncode == 0, done.stderr
    (run_dir,) = (tmp_path / "out" / report).iterdir()
    nb = nbformat.read(str(run_dir / "report.ipynb"), as_version=4)
    outputs = [o for cell in nb.cells if cell.cell_type == "code" for o in cell.outputs]
    assert not [o for o in outputs if o.output_type == "error"]
    box = next(cell for cell in nb.cells if cell.get("id") == "sanity-box").outputs[0].data["text/markdown"]
    return ReportRun(run_dir, outputs, box, {mime for o in outputs for mime in o.get("data", {})})
