"""Every ```python block of docs/*.md runs: per page, the page's blocks in order in one fresh namespace.

A page is read the way a user reads it: block after block, each seeing what the earlier ones defined. The
blocks run in a temporary working folder (files an example writes land there) with the weights cache the
root conftest points ``KD_WORKBENCH_CACHE`` at. A block that cannot run in a test (it needs a GPU, a
terminal, several processes) is marked with ``<!-- not run -->`` on the line before; only a few may be.
Shell commands are ```bash blocks and are not run. docs/losses.md and docs/distiller.md are run here too,
whole: their worked examples are also run, alone, by tests/losses/test_logit_losses.py and
tests/train/test_distiller.py (cheap, so run twice rather than special-cased).
"""
from __future__ import annotations

import importlib
import re
from pathlib import Path

import matplotlib.pyplot as plt
import pytest

ROOT = Path(__file__).resolve().parents[2]
DOCS = ROOT / "docs"
PAGES = sorted(path.name for path in DOCS.glob("*.md"))
NOT_RUN = "<!-- not run -->"
MAX_NOT_RUN = 3  # across all pages: an example that is not run is an example that can rot

FENCE = re.compile(r"^```(\S*)\s*$")


def fenced_blocks(text: str) -> list[tuple[int, str, str, str]]:
    """``(first code line number, language, code, the non-blank line before the fence)`` per fenced block.

    Example:
        >>> fenced_blocks("text\\n<!-- not run -->\\n```python\\nx = 1\\n```\\n")
        [(4, 'python', 'x = 1\\n', '<!-- not run -->')]
    """
    lines = text.splitlines()
    blocks, index = [], 0
    while index < len(lines):
        match = FENCE.match(lines[index])
        if not match:
            index += 1
            continue
        start, end = index, index + 1
        while end < len(lines) and lines[end].strip() != "```":
            end += 1
        if end == len(lines):
            raise ValueError(f"the code fence opened on line {start + 1} is never closed")
        before = next((line.strip() for line in reversed(lines[:start]) if line.strip()), "")
        blocks.append((start + 2, match.group(1), "".join(line + "\n" for line in lines[start + 1 : end]), before))
        index = end + 1
    return blocks


def runnable_blocks(page: str) -> list[tuple[int, str]]:
    """The page's python blocks that run (line number, code), in page order."""
    return [
        (line, code) for line, language, code, before in fenced_blocks((DOCS / page).read_text(encoding="utf-8"))
        if language == "python" and before != NOT_RUN
    ]


ROOMS = ("capture", "similarity", "losses", "distiller", "train", "reports", "widgets", "models_and_data",
         "architecture", "README")
# The public names a user reaches for; every one is named on some page (notebook helpers are left out).
DOCUMENTED = {
    "workbench": None, "workbench.similarity": None, "workbench.models": None, "workbench.data": None,
    "workbench.train": None, "workbench.losses": None, "widgets": None,
    "workbench.reports": ("run_report", "report_parameters", "check_values", "check_notebook", "ReportRun",
                          "ParameterError", "OutputError", "ReportFailed", "ReportInterrupted"),
}


def test_every_room_has_a_page():
    assert set(ROOMS) <= {page.removesuffix(".md") for page in PAGES}


def test_every_public_name_is_documented():
    text = "\n".join((DOCS / page).read_text(encoding="utf-8") for page in PAGES)
    missing = []
    for module_name, names in DOCUMENTED.items():
        module = importlib.import_module(module_name)
        for name in names or module.__all__:
            assert hasattr(module, name), f"{module_name}.{name} does not exist"
            if not re.search(rf"\b{re.escape(name)}\b", text):
                missing.append(f"{module_name}.{name}")
    assert not missing, f"public names no page in docs/ mentions: {missing}"


def test_few_examples_are_not_run():
    marked = [
        (page, line) for page in PAGES
        for line, language, _, before in fenced_blocks((DOCS / page).read_text(encoding="utf-8"))
        if before == NOT_RUN
    ]
    assert len(marked) <= MAX_NOT_RUN, f"too many examples marked {NOT_RUN}: {marked}"
    for page, line in marked:
        language = next(lang for first, lang, _, _ in fenced_blocks((DOCS / page).read_text()) if first == line)
        assert language == "python", f"{page}:{line}: only python blocks run, so only they need {NOT_RUN}"


def test_code_fences_name_their_language():
    """A bare ``` fence hides code from this test; signatures and output use ```text."""
    bare = [(page, line) for page in PAGES
            for line, language, _, _ in fenced_blocks((DOCS / page).read_text(encoding="utf-8")) if not language]
    assert not bare, f"fences without a language (use python, bash or text): {bare}"


@pytest.mark.parametrize("page", PAGES)
def test_page_examples_run(page, tmp_path, monkeypatch):
    blocks = runnable_blocks(page)
    if not blocks:
        pytest.skip(f"docs/{page} has no python examples")
    monkeypatch.chdir(tmp_path)
    namespace: dict = {"__name__": f"docs_{page.removesuffix('.md')}"}
    try:
        for line, code in blocks:
            # padded so a traceback names the line of the Markdown file
            exec(compile("\n" * (line - 1) + code, str(DOCS / page), "exec"), namespace)
    finally:
        plt.close("all")
