"""Start a throwaway JupyterLab and drive it with Debian's Chromium through Playwright, for widget tests.

JupyterLab runs from this interpreter on 127.0.0.1 with a random port and token, ``--allow-root``, in a
fresh root folder, with fresh settings and workspace folders: the settings start the notebook's kernel
without the "Select Kernel" dialog (``@jupyterlab/notebook-extension:tracker`` ``autoStartDefaultKernel``)
and turn off the news prompt and update checks (``@jupyterlab/apputils-extension:notification``).
Config, data, runtime and IPython folders are fresh too, so nothing of the user's leaks in. The server
runs in its own process group, stopped (kernels included) when the ``with`` block ends.
"""
from __future__ import annotations

import json
import re
import os
import secrets
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import nbformat

REPO_ROOT = Path(__file__).resolve().parents[2]
CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--disable-dev-shm-usage",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
# user settings, one file per plugin, as JupyterLab itself writes them
LAB_SETTINGS = {
    "@jupyterlab/notebook-extension/tracker.jupyterlab-settings": {"autoStartDefaultKernel": True},
    "@jupyterlab/apputils-extension/notification.jupyterlab-settings": {
        "fetchNews": "false",
        "checkForUpdates": False,
    },
}


@dataclass
class JupyterLab:
    """A running server: ``url(path)`` gives an address with the token; ``log`` is its output file."""

    port: int
    token: str
    root: Path
    log: Path
    process: subprocess.Popen

    def url(self, path: str = "lab") -> str:
        return f"http://127.0.0.1:{self.port}/{path.lstrip('/')}?token={self.token}"


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def write_notebook(path: Path, cells: list[str]) -> Path:
    """A notebook of code cells with the ``python3`` kernelspec (so the kernel starts by itself)."""
    notebook = nbformat.v4.new_notebook(
        cells=[nbformat.v4.new_code_cell(source) for source in cells],
        metadata={
            "kernelspec": {"name": "python3", "display_name": "Python 3 (ipykernel)", "language": "python"},
            "language_info": {"name": "python"},
        },
    )
    nbformat.write(notebook, path)
    return path


def open_and_run_all(page, lab: "JupyterLab", name: str, cells: list[str]) -> None:
    """Write ``cells`` as notebook ``name`` in the lab's root, open it in ``page``, wait for the kernel (the
    kernelspec starts it: no "Select Kernel" dialog may stand in the way) and run every cell from the menu."""
    write_notebook(lab.root / name, cells)
    page.goto(lab.url(f"lab/tree/{name}"))
    page.get_by_text(re.compile(r"Python 3 \(ipykernel\) \| Idle")).wait_for()
    assert page.locator(".jp-Dialog").count() == 0
    page.locator(".lm-MenuBar-itemLabel", has_text=re.compile("^Run$")).click()
    page.locator(".lm-Menu-itemLabel", has_text=re.compile("^Run All Cells$")).click()


@contextmanager
def running_jupyterlab(workdir: Path, *, startup_seconds: float = 60) -> Iterator[JupyterLab]:
    """Start JupyterLab with everything under ``workdir`` (its ``root`` holds the notebooks)."""
    names = ("root", "settings", "workspaces", "config", "data", "runtime", "ipython")
    folders = {name: workdir / name for name in names}
    for folder in folders.values():
        folder.mkdir(parents=True, exist_ok=True)
    for relative, values in LAB_SETTINGS.items():
        target = folders["settings"] / relative
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(json.dumps(values))
    port, token = free_port(), secrets.token_hex(16)
    env = {
        key: value
        for key, value in os.environ.items()
        if key not in ("MPLBACKEND", "JUPYTER_TOKEN", "PYTHONSTARTUP", "TQDM_DISABLE")
    }
    env.update(
        PYTHONPATH=os.pathsep.join(filter(None, [str(REPO_ROOT), env.get("PYTHONPATH")])),
        JUPYTER_CONFIG_DIR=str(folders["config"]),
        JUPYTER_DATA_DIR=str(folders["data"]),
        JUPYTER_RUNTIME_DIR=str(folders["runtime"]),
        IPYTHONDIR=str(folders["ipython"]),
    )
    command = [
        sys.executable, "-m", "jupyter", "lab",
        "--allow-root", "--no-browser", "--ip=127.0.0.1", f"--port={port}", "--port-retries=0",
        f"--IdentityProvider.token={token}",
        f"--ServerApp.root_dir={folders['root']}",
        f"--LabApp.user_settings_dir={folders['settings']}",
        f"--LabApp.workspaces_dir={folders['workspaces']}",
        "--ServerApp.terminals_enabled=False",
        # a safety net should a test process die without its teardown
        "--MappingKernelManager.cull_idle_timeout=600",
        "--ServerApp.shutdown_no_activity_timeout=900",
    ]
    log = workdir / "jupyterlab.log"
    with open(log, "wb") as log_file:
        process = subprocess.Popen(
            command, cwd=folders["root"], env=env, stdout=log_file, stderr=subprocess.STDOUT, start_new_session=True
        )
    lab = JupyterLab(port, token, folders["root"], log, process)
    try:
        _wait_until_up(lab, startup_seconds)
        yield lab
    finally:
        stop(process)


def _wait_until_up(lab: JupyterLab, seconds: float) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if lab.process.poll() is not None:
            raise RuntimeError(f"JupyterLab exited with {lab.process.returncode}:\n{lab.log.read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(lab.url("api/status"), timeout=2) as response:
                if response.status == 200:
                    return
        except OSError:
            time.sleep(0.3)
    raise TimeoutError(f"JupyterLab did not answer within {seconds} s:\n{lab.log.read_text()[-3000:]}")


def stop(process: subprocess.Popen, grace_seconds: float = 10) -> None:
    """SIGTERM the server's process group (the server shuts its kernels down), SIGKILL what is left."""
    if process.poll() is None:
        try:
            os.killpg(process.pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
        try:
            process.wait(grace_seconds)
        except subprocess.TimeoutExpired:
            pass
    try:
        os.killpg(process.pid, signal.SIGKILL)  # kernels left in the group, if any
    except ProcessLookupError:
        pass
    process.wait(5)
