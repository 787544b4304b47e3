"""TrainingMonitor in a real JupyterLab, in headless Chromium: one short run, then a long one trained through
``await monitor.run(fit, ...)`` that the Stop button ends while it trains. The cell finishes, the status
says "interrupted at epoch e, step s (stop button)", the next cell reads a history shorter than the full
run, and every element of the monitor fits inside the notebook cell, at the default width and at 1000 px."""
from __future__ import annotations

import importlib.util
import re

import pytest

from jupyter_harness import REPO_ROOT, open_and_run_all

pytestmark = [pytest.mark.browser, pytest.mark.timeout(240)]

SCREENSHOT = REPO_ROOT / "reports" / "browser" / "training_monitor.png"
TOTAL_STEPS = 60 * 8  # 60 epochs of 8 batches: about 30 s of sleeps, far longer than the test waits
CELLS = [
    """\
import time
import torch
from torch import nn
from workbench.losses import KD
from workbench.train import Distiller, fit
from workbench.train.callbacks import Callback
from widgets import TrainingMonitor

class Slow(Callback):  # makes the long run last long enough to be stopped by hand
    def on_step_end(self, state):
        time.sleep(0.06)

torch.manual_seed(0)
x, y = torch.randn(512, 6), torch.randint(0, 3, (512,))
teacher = nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 3)).eval()
student = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 3))
monitor = TrainingMonitor(every=2, title="overlay and stop")
display(monitor)
monitor.start_run("short run")
first = fit(Distiller(teacher, student, {"kd": KD()}), (x, y), (x, y), epochs=2, batch_size=64,
            callbacks=[monitor], device="cpu", progress=False)""",
    f"""\
monitor.start_run("long run")
history = await monitor.run(fit, Distiller(teacher, student, {{"kd": KD()}}), (x, y), (x, y), epochs=60,
                            batch_size=64, callbacks=[monitor, Slow()], device="cpu", progress=False)
print("long run ended after", len(history), "steps")""",
    f"""\
mark = history.attrs.get("interrupted")
print(f"next cell: {{len(history)}} of {TOTAL_STEPS} steps, mark {{mark}}")""",
]
STATUS = "document.querySelector('.kd-training-monitor .kd-training-status').textContent"
LEGEND = "[...document.querySelectorAll('.kd-training-monitor .legend text')].map(text => text.textContent)"
# every element of the monitor against the output area that holds it: [widest element, its overhang in px]
OVERHANG = """selector => {
    const monitor = document.querySelector(selector);
    const cell = monitor.closest('.jp-OutputArea-output').getBoundingClientRect();
    let worst = ['', -1e9];
    for (const element of [monitor, ...monitor.querySelectorAll('*')]) {
        const box = element.getBoundingClientRect();
        if (box.width === 0 && box.height === 0) continue;
        const over = Math.max(box.right - cell.right, cell.left - box.left, box.width - cell.width);
        if (over > worst[1]) worst = [element.tagName + '.' + (element.getAttribute('class') || ''), over];
    }
    return [worst[0], worst[1], cell.width];
}"""


def assert_fits_the_cell(page, selector=".kd-training-monitor"):
    # plotly sizes a figure after it renders: give the layout a moment to settle, then measure
    try:
        page.wait_for_function(f"selector => ({OVERHANG})(selector)[1] <= 1", arg=selector, timeout=10_000)
    except Exception:  # noqa: BLE001 - the assertion below says what is too wide
        pass
    element, overhang, cell_width = page.evaluate(OVERHANG, selector)
    assert overhang <= 1, f"{element} is {overhang:.0f} px wider than the {cell_width:.0f} px cell"
    return cell_width


def test_stop_button_ends_a_run_and_the_monitor_fits_the_cell(jupyterlab, chromium_page):
    page = chromium_page
    open_and_run_all(page, jupyterlab, "training_monitor.ipynb", CELLS)

    monitor = page.locator(".kd-training-monitor")
    monitor.wait_for()
    # the long run trains: two runs overlaid (a legend group each), and the button is live
    page.wait_for_function(f"() => {STATUS}.startsWith('long run · epoch')")
    stop = monitor.locator("button", has_text="Stop")
    assert stop.is_enabled()
    page.wait_for_function(f"() => ['short run', 'long run'].every(name => {LEGEND}.includes(name))")
    default_width = assert_fits_the_cell(page)

    stop.click()
    page.wait_for_function(f"() => /interrupted at epoch \\d+, step \\d+ \\(stop button\\)/.test({STATUS})")
    ended = page.locator(".jp-OutputArea-output", has_text="next cell:")
    ended.wait_for()
    steps, total = map(int, re.search(r"next cell: (\d+) of (\d+) steps", ended.inner_text()).groups())
    assert 0 < steps < total == TOTAL_STEPS
    status = page.evaluate(STATUS)
    assert f"step {steps} (stop button)" in status, status
    if importlib.util.find_spec("workbench.train.interrupt") is not None:  # fit marks an interrupted history
        assert f"'step': {steps}, 'reason': 'stop button'" in ended.inner_text()
    assert stop.is_disabled()  # no run under way

    page.set_viewport_size({"width": 1000, "height": 1700})
    page.wait_for_function(f"() => document.querySelector('.kd-training-monitor')"
                           f".closest('.jp-OutputArea-output').getBoundingClientRect().width < {default_width}")
    page.wait_for_timeout(500)  # plotly redraws on the window's resize event
    assert_fits_the_cell(page)
    for text in ("Loading widget", "Error displaying widget"):
        assert page.get_by_text(text).count() == 0, f"{text!r} is on the page"
    SCREENSHOT.parent.mkdir(parents=True, exist_ok=True)
    monitor.scroll_into_view_if_needed()
    page.screenshot(path=str(SCREENSHOT))
