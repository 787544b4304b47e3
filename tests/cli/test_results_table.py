"""``results_table`` (the distill report's Markdown table): it must end in .md, and an existing file is
replaced only when asked (``--force``, ``-p overwrite_results=true`` or ``overwrite=True``) — checked
before the run starts (training takes minutes) and again when the table is saved (atomically)."""
from __future__ import annotations

import pandas as pd
import pytest

from fake_runner import executor  # noqa: F401 (a fixture)

from workbench import cli, reports
from workbench.reports import compare


@pytest.fixture
def existing(tmp_path):
    table = tmp_path / "results" / "distill.md"
    table.parent.mkdir()
    table.write_text("the previous result\n")
    return table


def test_an_existing_table_stops_the_run_before_it_starts(executor, existing, tmp_path, capsys):
    status = cli.main(["report", "distill", "-p", f"results_table={existing}", "-o", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert status == cli.EXIT_USAGE and "exists" in err and "--force" in err and str(existing) in err
    assert "Traceback" not in err and executor == [] and not (tmp_path / "out").exists()
    assert existing.read_text() == "the previous result\n"
    with pytest.raises(reports.OutputError, match="exists"):
        reports.run_report("distill", {"results_table": str(existing)}, tmp_path / "out")
    assert executor == []


@pytest.mark.parametrize("how", [["--force"], ["-f"], ["-p", "overwrite_results=true"]])
def test_force_or_the_parameter_lets_the_report_replace_the_table(executor, existing, tmp_path, how):
    argv = ["report", "distill", "-p", f"results_table={existing}", "-o", str(tmp_path / "out"), *how]
    assert cli.main(argv) == cli.EXIT_OK
    assert executor[0]["results_table"] == str(existing) and executor[0]["overwrite_results"] is True


def test_the_python_api_overwrite_flag_reaches_the_notebook(executor, existing, tmp_path):
    reports.run_report("distill", {"results_table": str(existing)}, tmp_path / "out", overwrite=True)
    assert executor == [{"results_table": str(existing), "overwrite_results": True}]


def test_a_new_table_path_needs_no_force(executor, tmp_path):
    table = tmp_path / "new" / "table.md"
    assert cli.main(["report", "distill", "-p", f"results_table={table}", "-o", str(tmp_path / "out")]) == 0
    assert executor == [{"results_table": str(table)}]


@pytest.mark.parametrize("name", ["table.txt", "table", "table.md.bak", "table.MD.txt"])
def test_a_table_not_ending_in_md_is_refused_before_the_run(executor, tmp_path, capsys, name):
    status = cli.main(["report", "distill", "-p", f"results_table={tmp_path / name}", "-o", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert status == cli.EXIT_USAGE and "must be a Markdown file ending in .md" in err and name in err
    assert executor == [] and not (tmp_path / "o").exists()


def test_a_table_inside_a_file_or_at_a_folder_is_refused_before_the_run(executor, existing, tmp_path):
    for path in (existing / "t.md", tmp_path / "folder.md"):
        (tmp_path / "folder.md").mkdir(exist_ok=True)
        with pytest.raises(reports.OutputError, match="file, not a folder|is a folder"):
            reports.run_report("distill", {"results_table": str(path)}, tmp_path / "out")
    assert executor == []


def test_the_force_option_is_documented_in_the_help(capsys):
    assert cli.main(["report", "--help"]) == cli.EXIT_OK
    out = capsys.readouterr().out
    assert "--force" in out and "results_table" in out and ".md" in out


def small_comparison() -> compare.Comparison:
    runs = pd.DataFrame({"method": ["student", "student", "kd", "kd"], "seed": [0, 1, 0, 1],
                         "accuracy": [0.5, 0.6, 0.7, 0.65], "matched_cka": [0.1, 0.2, 0.3, 0.4],
                         "seconds": [1.0, 1.0, 2.0, 2.0]})
    return compare.Comparison(runs, settings={"epochs": 1})


def test_save_markdown_refuses_to_replace_unless_asked_and_writes_atomically(existing, monkeypatch):
    comparison, written = small_comparison(), []
    real = compare.write_atomic
    monkeypatch.setattr(compare, "write_atomic", lambda path, data: written.append(path) or real(path, data))
    with pytest.raises(FileExistsError, match="overwrite=True"):
        comparison.save_markdown(existing, "kd-workbench report distill")
    assert existing.read_text() == "the previous result\n" and written == []
    assert comparison.save_markdown(existing, "kd-workbench report distill", overwrite=True) == existing
    assert written == [existing] and "| kd | 67.50 ± 3.54 | +12.50 | 2/2 |" in existing.read_text()
    assert list(existing.parent.iterdir()) == [existing]  # no temporary file left beside it


def test_save_markdown_wants_an_md_file(tmp_path):
    with pytest.raises(ValueError, match="ending in .md"):
        small_comparison().save_markdown(tmp_path / "table.txt")
    assert list(tmp_path.iterdir()) == []
