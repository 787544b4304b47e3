"""A pytest fixture for the CLI tests: a report runner whose papermill and nbconvert are replaced by recorders
(a module, not a conftest.py: a second conftest.py clashes with tests/conftest.py under --doctest-modules)."""
from __future__ import annotations

import nbformat
import pytest

from workbench.reports import runner


@pytest.fixture
def executor(monkeypatch):
    """papermill and nbconvert replaced by recorders (no kernel); yields the parameters each run got."""
    calls = []

    def fake_execute(notebook, output, parameters, *, progress=False, on_event=None):
        calls.append(parameters)
        nbformat.write(nbformat.v4.new_notebook(), str(output))

    monkeypatch.setattr(runner, "execute_notebook", fake_execute)
    monkeypatch.setattr(runner, "export_html", lambda notebook, html: html.write_text("<html></html>") and html)
    return calls
