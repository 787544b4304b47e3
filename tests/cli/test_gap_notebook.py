"""The gap report notebook: committed clean, and run end to end by the CLI under papermill (slow)."""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import nbformat
import pytest
import torch

from workbench import reports

NOTEBOOK = reports.REPORTS["gap"].notebook
# Tiny models and few samples: the whole run, training included, takes well under a minute.
SMALL = ["-p", "n_samples=64", "-p", "batch_size=32", "-p", "teacher_epochs=1", "-p", "student_epochs=1",
         "-p", "teacher=cnn_small", "-p", "student=cnn_small", "-p", 'student_kwargs={"widths": [4, 8]}']
# The acceptance run: a ViT student on a small budget (one epoch) must be flagged, its conclusions withheld.
VIT_SMALL = [*SMALL[:-4], "-p", "student=vit"]


def test_notebook_holds_the_report():
    code_cells = [cell for cell in nbformat.read(str(NOTEBOOK), as_version=4).cells if cell.cell_type == "code"]
    source = "\n".join(cell.source for cell in code_cells)
    assert "setup_notebook()" in source and "cka.figure()" in source and "cka.plot()" in source


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    """One weight cache for the module, so the failing run reuses the models the first run trained."""
    return tmp_path_factory.mktemp("kd-cache")


def _cli(args, cache, output_dir):
    env = {**os.environ, "KD_WORKBENCH_CACHE": str(cache)}
    return subprocess.run(
        [sys.executable, "-m", "workbench.cli", "report", "gap", *args, "--output-dir", str(output_dir)],
        capture_output=True, text=True, env=env, timeout=300,
    )


def _outputs(nb):
    return [output for cell in nb.cells if cell.cell_type == "code" for output in cell.outputs]


@pytest.mark.slow
def test_gap_report_runs_end_to_end(cache, tmp_path):
    from plotly.offline import get_plotlyjs

    done = _cli(VIT_SMALL, cache, tmp_path)
    assert done.returncode == 0, done.stderr
    (run_dir,) = (tmp_path / "gap").iterdir()
    notebook, html = run_dir / "report.ipynb", run_dir / "report.html"
    assert notebook.is_file() and html.is_file()
    assert str(html) in done.stdout

    nb = nbformat.read(str(notebook), as_version=4)
    outputs = _outputs(nb)
    assert not [o for o in outputs if o.output_type == "error"]
    assert not [o for o in outputs if o.output_type == "stream" and o.name == "stderr" and "Traceback" in o.text]
    injected = [cell.source for cell in nb.cells if "injected-parameters" in cell.metadata.get("tags", [])]
    assert injected and "n_samples = 64" in injected[0]
    mimes = {mime for o in outputs for mime in o.get("data", {})}
    assert {"application/vnd.plotly.v1+json", "image/png", "text/markdown"} <= mimes
    box, summary = [o.data["text/markdown"] for o in outputs if "text/markdown" in o.get("data", {})][:2]
    assert "agrees with the teacher" in summary and "of 64 samples" in summary

    # the sanity box is the first output, after the title and the parameters, updated once the models were measured
    first_output = next(cell for cell in nb.cells if cell.cell_type == "code" and cell.outputs)
    assert first_output.id == "sanity-box" and first_output.outputs[0].data["text/markdown"] == box
    assert box.startswith("**Sanity checks: ") and "withheld" in box
    assert "- **student `vit`**: trained a single epoch" in box and "for the vit recipe's 30 epochs" in box
    from workbench.models import count_flops, count_parameters, create_sized

    vit = create_sized("vit", 32, in_chans=1, num_classes=10)
    flops = count_flops(vit, torch.zeros(1, 1, 32, 32)) / 1e6
    assert f"| student | `vit` | {count_parameters(vit):,} | {flops:.2f} M |" in box
    # a ViT after one epoch either is sound or its conclusions are withheld: here, withheld
    assert "Unreliable while the sanity checks above flag a problem" in summary
    assert "The matches keep" not in summary and "The matches do not keep" not in summary
    assert "first candidate" not in summary

    page = html.read_text(encoding="utf-8")
    bundle = get_plotlyjs()
    header = bundle.splitlines()[1]  # "* plotly.js vX.Y.Z"
    assert page.count(header) == 1 and bundle[:5000] in page  # plotly.js embedded, once
    script_sources = re.findall(r"<script[^>]*\bsrc\s*=\s*['\"]?([^'\" >]+)", page)
    assert not [src for src in script_sources if "://" in src or src.startswith("//")], script_sources
    assert "cdn.plot.ly" not in " ".join(script_sources)
    assert '"type":"heatmap"' in page and "Plotly.newPlot" in page  # the interactive heatmap
    assert page.count("data:image/png;base64") >= 2  # static heatmap and prediction plot
    assert "agrees with the teacher" in page
    assert page.index("Sanity checks: ") < page.index("agrees with the teacher")
    assert json.loads((run_dir / "parameters.json").read_text())["n_samples"] == 64


@pytest.mark.slow
def test_failing_report_exits_nonzero_and_keeps_the_partial_notebook(cache, tmp_path):
    refused = _cli([*SMALL, "-p", "teacher_layers", '["blocks.9"]'], cache, tmp_path)  # checked before the run
    assert refused.returncode == 2 and "blocks.9" in refused.stderr and not (tmp_path / "gap").exists()
    done = _cli(["-p", "n_samples=34", *SMALL[2:]], cache, tmp_path)  # batches of 32: CKA gets a last batch of 2
    assert done.returncode == 1
    assert "last batch of 2" in done.stderr
    path = Path(re.search(r"partial notebook: (\S+)", done.stderr)[1])
    assert path.is_file() and path.parent.parent == tmp_path / "gap"
    nb = nbformat.read(str(path), as_version=4)
    errors = [o for o in _outputs(nb) if o.output_type == "error"]
    assert errors and errors[0].ename == "ValueError"
