"""docs/architecture.md's import table is what the code does: every ``import`` in workbench/ points where
the table allows, and no engine module pulls in Jupyter, papermill or ipywidgets when imported."""
from __future__ import annotations

import ast
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PAGE = ROOT / "docs" / "architecture.md"
ENGINE = ROOT / "workbench"
ANYTHING = "anything in `workbench`"
JUPYTER = ("ipywidgets", "papermill", "nbconvert", "nbformat", "jupyter_client", "ipykernel", "IPython", "widgets")


def allowed_imports(text: str) -> dict[str, set[str] | None]:
    """The table after ``<!-- imports -->``: package -> what it may import (None: anything).

    Example:
        >>> rules = allowed_imports("<!-- imports -->\\n| a | b |\\n|---|---|\\n| `x` | `y`, `z.w` |\\n| `r` | anything in `workbench` |\\n")
        >>> sorted(rules["x"]), rules["r"]
        (['y', 'z.w'], None)
    """
    table = text.split("<!-- imports -->", 1)[1].strip().split("\n\n", 1)[0]
    rules: dict[str, set[str] | None] = {}
    for row in table.splitlines()[2:]:
        cells = [cell.strip() for cell in row.strip().strip("|").split("|")]
        package = cells[0].strip("`")
        rules[package] = None if cells[1] == ANYTHING else set(re.findall(r"`([\w.]+)`", cells[1]))
    return rules


def engine_imports(path: Path) -> set[str]:
    """Dotted workbench names a file imports (``from workbench import x`` gives ``x``), lazy imports included."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names if alias.name.startswith("workbench.")}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            if node.module == "workbench":  # a subpackage, or a dunder such as __version__
                found |= {f"workbench.{alias.name}" for alias in node.names if not alias.name.startswith("__")}
            elif node.module.startswith("workbench."):
                found.add(node.module)
    return {name.removeprefix("workbench.") for name in found}


def package_of(path: Path) -> str:
    return path.relative_to(ENGINE).with_suffix("").parts[0]


def test_every_import_follows_the_table():
    rules = allowed_imports(PAGE.read_text(encoding="utf-8"))
    wrong = []
    for path in sorted(ENGINE.rglob("*.py")):
        if path == ENGINE / "__init__.py":  # the package root re-exports the public names
            continue
        package = package_of(path)
        assert package in rules, f"{package!r} ({path.relative_to(ROOT)}) is missing from the table in docs/architecture.md"
        allowed = rules[package]
        if allowed is None:
            continue
        for name in engine_imports(path):
            target = name.split(".")[0]
            if target == package or target in allowed or any(name == a or name.startswith(a + ".") for a in allowed):
                continue
            wrong.append(f"{path.relative_to(ROOT)} imports workbench.{name}")
    assert not wrong, "imports the table in docs/architecture.md does not allow:\n" + "\n".join(wrong)


def test_table_names_only_real_packages():
    rules = allowed_imports(PAGE.read_text(encoding="utf-8"))
    real = {package_of(path) for path in ENGINE.rglob("*.py") if path != ENGINE / "__init__.py"}
    assert set(rules) == real


def test_no_engine_module_imports_jupyter():
    code = (
        "import importlib, pkgutil, sys, workbench\n"
        "for module in pkgutil.walk_packages(workbench.__path__, 'workbench.'):\n"
        "    importlib.import_module(module.name)\n"
        f"heavy = sorted(m for m in sys.modules if m.split('.')[0] in {JUPYTER!r})\n"
        "assert not heavy, heavy\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT)
