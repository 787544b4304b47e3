"""Every registered report notebook is committed clean: valid, no outputs, a first cell tagged `parameters`;
so is every example notebook (notebooks/examples/)."""
from __future__ import annotations

from pathlib import Path

import nbformat
import pytest

from workbench import reports

EXAMPLES = sorted((Path(__file__).resolve().parents[2] / "notebooks" / "examples").glob("*.ipynb"))


@pytest.mark.parametrize("name", sorted(reports.REPORTS))
def test_report_notebook_is_committed_clean_with_a_parameters_cell(name):
    nb = nbformat.read(str(reports.REPORTS[name].notebook), as_version=4)
    nbformat.validate(nb)
    code_cells = [cell for cell in nb.cells if cell.cell_type == "code"]
    assert "parameters" in code_cells[0].metadata.get("tags", [])
    assert all(cell.outputs == [] and cell.execution_count is None for cell in code_cells)


@pytest.mark.parametrize("path", EXAMPLES, ids=[path.name for path in EXAMPLES])
def test_example_notebook_is_committed_clean(path):
    nb = nbformat.read(str(path), as_version=4)
    nbformat.validate(nb)
    code_cells = [cell for cell in nb.cells if cell.cell_type == "code"]
    assert code_cells and all(cell.outputs == [] and cell.execution_count is None for cell in code_cells)
    assert "widgets" not in nb.metadata  # no saved widget state either


def test_the_examples_are_found():
    assert "widgets.ipynb" in [path.name for path in EXAMPLES]
