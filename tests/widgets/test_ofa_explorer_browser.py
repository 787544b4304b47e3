"""OFAExplorer in a real JupyterLab, in headless Chromium: an OFA-KD run (a CNN teacher, a ViT student with two
token branches) trained through ``await explorer.run(fit, ...)``. While it trains, the branch row renders —
one branch-loss curve per stage and the head's, branch-accuracy points per epoch with the head's — and the
branch status line gives the held-out accuracies; then Stop ends the run, the status says so, the next cell
reads a shorter history, and every element fits the notebook cell."""
from __future__ import annotations

import re

import pytest

from jupyter_harness import REPO_ROOT, open_and_run_all
from test_training_monitor_browser import assert_fits_the_cell

pytestmark = [pytest.mark.browser, pytest.mark.timeout(240)]

SCREENSHOT = REPO_ROOT / "reports" / "browser" / "ofa_explorer.png"
EPOCHS = 200  # 2 steps an epoch, with sleeps: far longer than the test waits
CELLS = [
    """\
import time
import torch
from workbench import models
from workbench.losses import ofa_terms
from workbench.train import Distiller, fit
from workbench.train.callbacks import Callback
from widgets import OFAExplorer

torch.set_num_threads(1)

class Slow(Callback):  # makes the run last long enough to be stopped by hand
    def on_step_end(self, state):
        time.sleep(0.15)

torch.manual_seed(0)
x, y = torch.randn(96, 1, 16, 16), torch.randint(0, 10, (96,))
teacher = models.create("cnn", widths=(8, 16), img_size=16).eval()
student = models.create("vit", img_size=16, patch_size=4, dim=16, depth=2, heads=2)
distiller = Distiller(teacher, student, **ofa_terms(teacher, student, (x[:64], y[:64])))
explorer = OFAExplorer((x[64:], y[64:]), every=2, title="OFA-KD: cnn → vit")
display(explorer)""",
    f"""\
history = await explorer.run(fit, distiller, (x[:64], y[:64]), (x[64:], y[64:]), epochs={EPOCHS}, batch_size=32,
                             callbacks=[explorer, Slow()], device="cpu", progress=False)
print("run ended after", len(history), "steps")""",
    f"""\
print(f"next cell: {{len(history)}} of {2 * EPOCHS} steps, {{len(explorer.results)}} epochs measured")""",
]
STATUS = "document.querySelector('.kd-ofa-explorer .kd-training-status').textContent"
BRANCHES = "document.querySelector('.kd-ofa-explorer .kd-ofa-status').textContent"
# the legend entries of the explorer's figures, in page order: the branch row's two plots come first
LEGENDS = """[...document.querySelectorAll('.kd-ofa-explorer .js-plotly-plot')].map(
    plot => [...plot.querySelectorAll('.legend text')].map(text => text.textContent))"""
# the number of points each trace of the branch-accuracy plot draws
ACCURACY_POINTS = """[...document.querySelectorAll('.kd-ofa-explorer .js-plotly-plot')][1]
    .querySelectorAll('.scatterlayer .trace .points path').length"""


def test_branch_row_fills_in_while_training_and_stop_ends_the_run(jupyterlab, chromium_page):
    page = chromium_page
    open_and_run_all(page, jupyterlab, "ofa_explorer.ipynb", CELLS)

    explorer = page.locator(".kd-ofa-explorer")
    explorer.wait_for(timeout=120_000)  # the first cell imports torch, timm and plotly: slow on a busy machine
    # two epochs measured while the run trains: the branch status gives the held-out accuracies
    page.wait_for_function(f"() => /^2 branches at blocks\\.0, blocks\\.1 · epoch [2-9]\\d*, held-out accuracy "
                           f"\\(32 samples\\): blocks\\.0 [\\d.]+% · blocks\\.1 [\\d.]+% · head [\\d.]+%$/"
                           f".test({BRANCHES})")
    page.wait_for_function(f"() => {STATUS}.startsWith('epoch ')")
    legends = page.evaluate(LEGENDS)
    assert legends[0] == ["blocks.0", "blocks.1", "head: ofa"], legends
    assert legends[1] == ["blocks.0", "blocks.1", "head"], legends
    assert page.evaluate(ACCURACY_POINTS) >= 2 * 3  # a marker per epoch and trace
    stop = explorer.locator("button", has_text="Stop")
    assert stop.is_enabled()
    default_width = assert_fits_the_cell(page)  # it measures the .kd-training-monitor: the explorer is one

    stop.click()
    page.wait_for_function(f"() => /interrupted at epoch \\d+, step \\d+ \\(stop button\\)/.test({STATUS})")
    ended = page.locator(".jp-OutputArea-output", has_text="next cell:")
    ended.wait_for()
    steps, total, measured = map(int, re.search(r"next cell: (\d+) of (\d+) steps, (\d+) epochs measured",
                                                ended.inner_text()).groups())
    assert 0 < steps < total == 2 * EPOCHS and 2 <= measured <= steps // 2
    assert f"step {steps} (stop button)" in page.evaluate(STATUS) and stop.is_disabled()

    page.set_viewport_size({"width": 1000, "height": 1700})
    page.wait_for_function("() => document.querySelector('.kd-ofa-explorer')"
                           f".closest('.jp-OutputArea-output').getBoundingClientRect().width < {default_width}")
    page.wait_for_timeout(500)  # plotly redraws on the window's resize event
    assert_fits_the_cell(page)
    for text in ("Loading widget", "Error displaying widget"):
        assert page.get_by_text(text).count() == 0, f"{text!r} is on the page"
    SCREENSHOT.parent.mkdir(parents=True, exist_ok=True)
    explorer.scroll_into_view_if_needed()
    page.screenshot(path=str(SCREENSHOT))
