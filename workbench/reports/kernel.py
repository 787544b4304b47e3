"""Running a report notebook on a kernel of this interpreter with papermill, safely.

papermill writes the parameters cell with the translator registered for the kernel name; ours emits JSON
text decoded in the cell (:func:`~workbench.reports.values.parameters_source`), never a value's Python
source. The kernel's connection file (it holds the kernel's key) lives in Jupyter's runtime folder, and
the kernel is stopped and that file removed whatever happens, a ``KeyboardInterrupt`` included.
papermill and jupyter_client are imported only inside the functions.

Progress: with ``on_event``, the kernel gets :data:`~workbench.reports.progress.PROGRESS_ENV` naming an event
file in a fresh temporary folder; papermill's engine is wrapped so that each code cell's start is written
there too (``cell`` events), a thread follows the file and hands every event to ``on_event``, and the folder
is removed when the run ends, however it ends.
"""
from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import signal
import sys
import tempfile
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from workbench.reports import progress as progress_module
from workbench.reports.values import check_parameters, parameters_source

__all__ = ["REPORT_ENV", "execute_notebook"]

REPORT_ENV = "KD_WORKBENCH_REPORT"  # set in the report kernel: notebooks turn progress bars off
_KERNEL_ENV = {
    REPORT_ENV: "1",
    "TQDM_DISABLE": "1",
    # an inherited MPLBACKEND=Agg would make every notebook plot vanish
    "MPLBACKEND": "module://matplotlib_inline.backend_inline",
    "PYDEVD_DISABLE_FILE_VALIDATION": "1",
}
_KERNEL_NAME = "kd-workbench-python3"  # papermill finds our JSON translator under this kernel name
_REPLY_SECONDS = 0.25  # between interrupting the kernel and asking it to shut down


def _kernel_manager_class(extra_env: dict[str, str] | None = None) -> type:
    """An ``AsyncKernelManager`` whose kernel is ``sys.executable -m ipykernel_launcher``: no kernelspec.

    Its connection file (it holds the kernel's key) lives in Jupyter's runtime folder (private to the
    user, ``JUPYTER_RUNTIME_DIR``); the class keeps its instances in ``started`` for :func:`_stop_kernels`.
    ``extra_env`` joins the kernel's environment (the progress event file).
    """
    kernel_env = {**_KERNEL_ENV, **(extra_env or {})}
    import zmq
    from jupyter_client.kernelspec import KernelSpec
    from jupyter_client.manager import AsyncKernelManager
    from jupyter_core.paths import jupyter_runtime_dir
    from jupyter_core.utils import ensure_dir_exists

    class CurrentInterpreterKernelManager(AsyncKernelManager):
        started: list[CurrentInterpreterKernelManager] = []

        def __init__(self, **kwargs: Any) -> None:
            super().__init__(**kwargs)
            if zmq.has("curve"):  # encrypt the local sockets (and silence ipykernel's warning)
                self.transport_encryption = "auto"
            if not self.connection_file:
                runtime = jupyter_runtime_dir()
                ensure_dir_exists(runtime, mode=0o700)
                self.connection_file = os.path.join(runtime, f"kernel-{uuid.uuid4()}.json")
            self.kernel_process: Any = None
            self.started.append(self)

        async def start_kernel(self, **kwargs: Any) -> None:
            await super().start_kernel(**kwargs)
            self.kernel_process = getattr(self.provisioner, "process", None)

        async def _async_request_shutdown(self, restart: bool = False) -> None:
            # jupyter_client interrupts the kernel and at once asks it to shut down: a cell still running
            # (an interrupted run) would then reply on a closed socket and the kernel log a traceback.
            # Give it a moment; the orphaned cell task then fails with the interrupt, already reported.
            for task in asyncio.all_tasks():
                if getattr(task.get_coro(), "__qualname__", "").startswith("NotebookClient."):
                    task.add_done_callback(_retrieve)
            await asyncio.sleep(_REPLY_SECONDS)
            await super()._async_request_shutdown(restart=restart)

        @property
        def kernel_spec(self) -> KernelSpec:
            return KernelSpec(
                argv=[sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
                name="python3", display_name="Python 3 (ipykernel)", language="python", env=dict(kernel_env),
                metadata={"supported_encryption": ["curve"]},
            )

    return CurrentInterpreterKernelManager


def _retrieve(task: asyncio.Task) -> None:
    if not task.cancelled():
        task.exception()  # marks it retrieved: asyncio logs no "exception was never retrieved"


def _stop_kernels(managers: list[Any], wait_seconds: float = 5.0) -> None:
    """Make sure each kernel process (and its process group) is gone and its connection file removed.

    nbclient shuts kernels down itself on success, failure and ``KeyboardInterrupt``; this covers an
    interrupt that lands in the middle of that shutdown."""
    for manager in managers:
        process = manager.kernel_process
        if process is not None and process.poll() is None:
            for sent in (signal.SIGTERM, signal.SIGKILL):
                with contextlib.suppress(OSError):
                    os.killpg(process.pid, sent)  # the kernel runs in its own session: its children too
                with contextlib.suppress(Exception):
                    process.wait(wait_seconds)
                if process.poll() is not None:
                    break
        with contextlib.suppress(OSError):
            Path(manager.connection_file).unlink(missing_ok=True)


def _register_translator() -> None:
    """papermill writes the parameters cell with the translator of the kernel name: ours emits JSON text."""
    from papermill.translators import PythonTranslator, papermill_translators

    class JSONParametersTranslator(PythonTranslator):
        @classmethod
        def codify(cls, parameters: dict[str, Any], comment: str = "Parameters") -> str:
            return parameters_source(parameters, comment)

    papermill_translators.register(_KERNEL_NAME, JSONParametersTranslator)


_ENGINE_NAME = "kd-workbench-progress"


def _heading(source: str) -> str:
    """The text of the last Markdown heading in ``source`` ("" if none)."""
    headings = [line.lstrip("#").strip() for line in source.splitlines() if line.startswith("#")]
    return headings[-1] if headings else ""


def _first_line(source: str) -> str:
    """The first line of code that is not blank or a comment."""
    return next((line.strip() for line in source.splitlines() if line.strip() and not line.lstrip().startswith("#")),
                "")


def _register_progress_engine(events: Path) -> str:
    """papermill's nbclient engine, writing a ``cell`` event to ``events`` as each code cell starts:
    ``index``/``cells`` count code cells (the injected parameters cell included), ``heading`` is the
    Markdown heading above it, ``first_line`` its first line of code."""
    from papermill.engines import NBClientEngine, papermill_engines

    class ProgressEngine(NBClientEngine):
        @classmethod
        def execute_managed_notebook(cls, nb_man: Any, kernel_name: str, **kwargs: Any) -> Any:
            cells, heading, titles = nb_man.nb.cells, "", {}
            for index, cell in enumerate(cells):
                if cell.cell_type == "markdown":
                    heading = _heading(cell.source) or heading
                elif cell.cell_type == "code":
                    titles[index] = (len(titles) + 1, heading, _first_line(cell.source))
            started = nb_man.cell_start

            def cell_start(cell: Any, cell_index: int | None = None, **more: Any) -> None:
                started(cell, cell_index, **more)
                if cell_index in titles:
                    number, heading, first = titles[cell_index]
                    progress_module.emit_to(events, "cell", index=number, cells=len(titles), heading=heading,
                                     first_line=first)

            nb_man.cell_start = cell_start
            return super().execute_managed_notebook(nb_man, kernel_name, **kwargs)

    papermill_engines.register(_ENGINE_NAME, ProgressEngine)
    return _ENGINE_NAME


@contextlib.contextmanager
def _progress_events(on_event: Callable[[dict[str, Any]], None] | None) -> Iterator[Path | None]:
    """A fresh event file followed by a thread calling ``on_event`` (None: no file, no thread); the file and
    its folder are removed afterwards."""
    if on_event is None:
        yield None
        return
    folder = Path(tempfile.mkdtemp(prefix="kd-workbench-progress-"))
    events = folder / "events.jsonl"
    tail = progress_module.EventTail(events, on_event).start()
    try:
        yield events
    finally:
        tail.stop()
        shutil.rmtree(folder, ignore_errors=True)


def execute_notebook(
    notebook: Path, output: Path, parameters: dict[str, Any], *, progress: bool = False,
    on_event: Callable[[dict[str, Any]], None] | None = None,
) -> None:
    """Run ``notebook`` with papermill on the current interpreter, writing ``output`` (also on failure).

    The parameters cell is injected as JSON text (:func:`~workbench.reports.values.parameters_source`);
    the kernel is stopped and its connection file removed whatever happens, Ctrl-C included. ``progress``
    shows papermill's bar; ``on_event`` is called (from another thread) with each progress event: cell
    starts, training runs and epochs (see :mod:`workbench.reports.progress`).

    Example:
        >>> from pathlib import Path
        >>> from workbench.reports.kernel import execute_notebook
        >>> execute_notebook(Path("notebooks/teacher_student_gap.ipynb"), Path("/tmp/gap.ipynb"),
        ...                  {"n_samples": 64})  # doctest: +SKIP
    """
    import papermill

    values = check_parameters(parameters)
    _register_translator()

    def literal(path: Path) -> str:  # papermill formats paths with the parameters: {name} must stay text
        return str(path).replace("{", "{{").replace("}", "}}")

    with _progress_events(on_event) as events:
        manager_class = _kernel_manager_class({progress_module.PROGRESS_ENV: str(events)} if events else None)
        engine = _register_progress_engine(events) if events else None
        try:
            papermill.execute_notebook(
                literal(notebook), literal(output), parameters=values, kernel_name=_KERNEL_NAME, language="python",
                progress_bar=progress, kernel_manager_class=manager_class, engine_name=engine,
            )
        finally:
            _stop_kernels(manager_class.started)
