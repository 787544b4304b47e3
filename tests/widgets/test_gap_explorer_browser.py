"""GapExplorer in a real JupyterLab, in headless Chromium: run the notebook, see the widget render,
press Compute, make a computation fail inside the kernel (the error shows, the heatmap stays), switch
the kernel to RBF and compute again, click a heatmap cell, and keep a screenshot."""
from __future__ import annotations

import re

import pytest

from jupyter_harness import REPO_ROOT, write_notebook

pytestmark = [pytest.mark.browser, pytest.mark.timeout(240)]

SCREENSHOT = REPO_ROOT / "reports" / "browser" / "gap_explorer.png"
CELLS = [
    """\
import torch
from torch import nn
from widgets import GapExplorer

def conv_net(widths):
    layers, previous = [], 1
    for index, width in enumerate(widths):
        layers.append(nn.Sequential(nn.Conv2d(previous, width, 3, 1 if index == 0 else 2, 1), nn.ReLU()))
        previous = width
    return nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(previous, 10))

torch.manual_seed(0)
teacher, student = conv_net((16, 32, 64)).eval(), conv_net((8, 16)).eval()
images = torch.randn(192, 1, 16, 16)
explorer = GapExplorer(teacher, student, images, batch_size=64, device="cpu")""",
    "explorer",
]
STATUS = "document.querySelector('.kd-gap-explorer .widget-html').textContent"
HEATMAP_TITLE = "document.querySelector('.kd-gap-explorer .js-plotly-plot .gtitle').textContent"
ROW_TITLE = "document.querySelectorAll('.kd-gap-explorer .js-plotly-plot')[1].querySelector('.gtitle').textContent"


def assert_widgets_all_rendered(page):
    for text in ("Loading widget", "Error displaying widget"):
        assert page.get_by_text(text).count() == 0, f"{text!r} is on the page"


def test_gap_explorer_renders_and_recomputes_in_jupyterlab(jupyterlab, chromium_page):
    write_notebook(jupyterlab.root / "gap_explorer.ipynb", CELLS)
    page = chromium_page
    page.goto(jupyterlab.url("lab/tree/gap_explorer.ipynb"))
    # the settings start the kernel by themselves: no "Select Kernel" dialog may stand in the way
    page.get_by_text(re.compile(r"Python 3 \(ipykernel\) \| Idle")).wait_for()
    assert page.locator(".jp-Dialog").count() == 0

    page.locator(".lm-MenuBar-itemLabel", has_text=re.compile("^Run$")).click()
    page.locator(".lm-Menu-itemLabel", has_text=re.compile("^Run All Cells$")).click()

    explorer = page.locator(".kd-gap-explorer")
    compute = explorer.locator("button", has_text="Compute")
    compute.wait_for()
    page.wait_for_function("() => document.querySelectorAll('.kd-gap-explorer .js-plotly-plot').length === 2")
    page.wait_for_function(f"() => {STATUS}.includes('press Compute')")
    assert_widgets_all_rendered(page)

    compute.click()  # the default: linear CKA between the stages
    page.wait_for_function(f"() => /Done in .* linear CKA/.test({STATUS})")
    page.wait_for_function(f"() => {HEATMAP_TITLE}.includes('linear CKA (debiased)')")
    # each figure renders on its own schedule: wait for the row plot too, do not just read it
    page.wait_for_function(f"() => {ROW_TITLE}.startsWith('teacher layer 0: linear CKA')")
    assert explorer.locator(".js-plotly-plot").first.locator("g.hm image").count() == 1

    # a computation that raises inside the kernel: the error is shown, the last heatmap stays
    n_samples = explorer.locator(".widget-inline-hbox", has_text="n_samples").locator("input")
    n_samples.fill("3")
    n_samples.press("Enter")
    compute.click()
    page.wait_for_function(f"() => {STATUS}.includes('Error')")
    assert "last batch of 3" in page.evaluate(STATUS)
    assert "linear CKA" in page.evaluate(HEATMAP_TITLE)

    n_samples.fill("192")
    n_samples.press("Enter")
    explorer.locator(".widget-dropdown select").select_option("rbf")
    compute.click()
    page.wait_for_function(f"() => /Done in .* rbf CKA/.test({STATUS})")
    page.wait_for_function(f"() => {HEATMAP_TITLE}.includes('rbf CKA (debiased)')")

    # click the middle of the bottom row (teacher layer "5"): the row plot follows, from result.values
    drag = explorer.locator(".js-plotly-plot").first.locator(".nsewdrag").first
    box = drag.bounding_box()
    drag.click(position={"x": box["width"] / 2, "y": box["height"] * 0.95})
    page.wait_for_function(f"() => {ROW_TITLE}.startsWith('teacher layer 5: rbf CKA')")
    assert "Error" not in page.evaluate(STATUS)
    assert_widgets_all_rendered(page)

    SCREENSHOT.parent.mkdir(parents=True, exist_ok=True)
    explorer.scroll_into_view_if_needed()
    page.screenshot(path=str(SCREENSHOT))
