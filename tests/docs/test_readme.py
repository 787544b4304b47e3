"""What the README promises: two commands on a fresh machine, a picture a command regenerates, and a script
snippet whose models are the very files `make report` trained (the same cache entries)."""
from __future__ import annotations

import ast
import json
import re
import subprocess
from pathlib import Path

import pytest

from workbench.train import cache

ROOT = Path(__file__).resolve().parents[2]
README = (ROOT / "README.md").read_text(encoding="utf-8")
GAP_NOTEBOOK = ROOT / "notebooks" / "teacher_student_gap.ipynb"
REAL_CACHE_PATH = cache.cache_path


def section(title: str) -> str:
    """The README text under the heading ``title``, up to the next heading of any level."""
    match = re.search(rf"^#+ {re.escape(title)}\n(.*?)(?=^#)", README, flags=re.S | re.M)
    assert match, f"the README lost its {title!r} section"
    return match.group(1)


def test_two_commands_on_a_fresh_machine():
    block = re.search(r"```bash\n(.*?)```", section("Two commands on a fresh machine"), flags=re.S).group(1)
    commands = [line.split("#")[0].strip() for line in block.splitlines() if line.split("#")[0].strip()]
    assert commands == ["make report", "make test"]


def test_the_picture_names_the_command_that_makes_it():
    picture = re.search(r"!\[[^\]]*\]\((docs/[^)]+\.png)\)\n\n(.*?)\n\n", README, flags=re.S)
    assert picture and picture.group(1) == "docs/gap_report.png"
    assert "`make screenshot`" in picture.group(2)
    plan = subprocess.run(["make", "-n", "screenshot"], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    steps = [line for line in plan.splitlines() if "kd-workbench report" in line or "screenshot_report.py" in line]
    assert len(steps) == 2 and steps[0].endswith("kd-workbench report gap"), plan  # the default report, first
    assert "tools/screenshot_report.py" in steps[1] and steps[1].endswith("--output docs/gap_report.png")


class Requested(Exception):
    """Raised by the patched cache lookup: the path was recorded, nothing trains."""


def cache_files(monkeypatch, sources: list[str], namespace: dict) -> list[Path]:
    """Run ``sources`` statement by statement and return the cache files ``trained`` looked up.

    Each lookup stops its statement (nothing trains); a statement that needs a model that was therefore
    never made (a NameError) ends the run.
    """
    real, paths = REAL_CACHE_PATH, []

    def recording(name, settings):
        path = real(name, settings)
        if path not in paths:  # one model may look its file up more than once
            paths.append(path)
        raise Requested

    monkeypatch.setattr(cache, "cache_path", recording)
    for source in sources:
        for statement in ast.parse(source).body:
            try:
                exec(compile(ast.Module([statement], []), "<snippet>", "exec"), namespace)
            except Requested:
                continue
            except NameError:
                return paths
    return paths


def test_script_snippet_loads_the_models_make_report_trained(monkeypatch):
    """The snippet's ``trained("cnn")`` / ``trained("cnn_small")`` are the default gap report's teacher and
    student cache entries (they were two other models when the report trained 8 epochs and the snippet 6)."""
    snippet = re.search(r"```python\n(.*?)```", section("From a script"), flags=re.S).group(1)
    readme_files = cache_files(monkeypatch, [snippet], {})
    cells = [cell for cell in json.loads(GAP_NOTEBOOK.read_text())["cells"] if cell["cell_type"] == "code"]
    sources = ["".join(cell["source"]) for cell in cells]
    sources = [source for source in sources if "check_notebook(" not in source]  # tested with the reports
    first_model = next(index for index, source in enumerate(sources) if "report_model(" in source)
    report_files = cache_files(monkeypatch, sources[: first_model + 1], {})
    assert len(readme_files) == 2, "the snippet should load a trained teacher and a trained student"
    assert readme_files == report_files[:2], (
        "the README snippet and `make report` use different cache entries:\n"
        f"  snippet: {[path.name for path in readme_files]}\n  report:  {[path.name for path in report_files[:2]]}"
    )


@pytest.mark.parametrize("page", ["README.md"])
def test_readme_points_inside_the_repository_for_the_design(page):
    """The architecture is docs/architecture.md, not a file outside the repository."""
    assert "shared folder" not in README and "DESIGN.md" not in README
    assert "(docs/architecture.md)" in README
