"""What a benchmark ran on (the CPU model) and how its tables under reports/results/ are written."""
from __future__ import annotations

import json
import os
import platform
from collections.abc import Callable

from workbench.files import write_atomic


def cpu_model() -> str:
    """The CPU's model name and logical CPU count, e.g. ``"AMD EPYC, 2 logical CPUs"``."""
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as handle:
            cpu = next(line.split(":", 1)[1].strip() for line in handle if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return f"{cpu}, {os.cpu_count()} logical CPUs"


def save_outputs(results: dict, render: Callable[[dict], str], *, json_path: str | None,
                 markdown_path: str | None) -> str:
    """Write ``results`` as JSON to ``json_path`` first (the raw numbers survive a failure to render them),
    then ``render(results)`` to ``markdown_path``, each atomically; returns the Markdown text.

    Example:
        >>> import tempfile, pathlib
        >>> folder = pathlib.Path(tempfile.mkdtemp())
        >>> save_outputs({"a": 1}, lambda r: f"a = {r['a']}", json_path=str(folder / "r.json"),
        ...              markdown_path=str(folder / "t" / "r.md"))
        'a = 1'
        >>> (folder / "t" / "r.md").read_text(), (folder / "r.json").read_text()
        ('a = 1', '{\\n "a": 1\\n}')
    """
    if json_path:
        write_atomic(json_path, json.dumps(results, indent=1))
    text = render(results)
    if markdown_path:
        os.makedirs(os.path.dirname(os.path.abspath(markdown_path)), exist_ok=True)
        write_atomic(markdown_path, text)
    return text


def serve_worker(job_text: str | None, out_path: str | None, worker: Callable[[dict], dict]) -> bool:
    """When this process was started as a benchmark worker (``--worker JOB --worker-out PATH``): run
    ``worker(job)`` and write its JSON result to ``out_path``; returns whether it did.

    Example:
        >>> serve_worker(None, None, lambda job: job)
        False
    """
    if not job_text:
        return False
    write_atomic(out_path, json.dumps(worker(json.loads(job_text))))
    return True
