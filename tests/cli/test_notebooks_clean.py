"""Every registered report notebook is committed clean: valid, no outputs, a first cell tagged `parameters`."""
from __future__ import annotations

import nbformat
import pytest

from workbench import reports


@pytest.mark.parametrize("name", sorted(reports.REPORTS))
def test_report_notebook_is_committed_clean_with_a_parameters_cell(name):
    nb = nbformat.read(str(reports.REPORTS[name].notebook), as_version=4)
    nbformat.validate(nb)
    code_cells = [cell for cell in nb.cells if cell.cell_type == "code"]
    assert "parameters" in code_cells[0].metadata.get("tags", [])
    assert all(cell.outputs == [] and cell.execution_count is None for cell in code_cells)
