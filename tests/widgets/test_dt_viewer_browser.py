"""DTViewer in a real JupyterLab, in headless Chromium, on base / distilled / hybrid trajectories of tiny
UNets: the strip renders a row of images per variant beside the commitment curves; typing the last step into
the slider's readout moves every variant to its last step; switching a variant off removes its row and its
curve; another seed redraws the images; everything fits the notebook cell."""
from __future__ import annotations

import pytest

from jupyter_harness import REPO_ROOT, open_and_run_all
from test_training_monitor_browser import assert_fits_the_cell

pytestmark = [pytest.mark.browser, pytest.mark.timeout(180)]
pytest.importorskip("diffusers")

SCREENSHOT = REPO_ROOT / "reports" / "browser" / "dt_viewer.png"
CELLS = [
    """\
import diffusers
import torch
from workbench.probes.dt import hybrid, trajectory
from widgets import DTViewer

torch.set_num_threads(1)
torch.manual_seed(0)
unets = [diffusers.UNet2DModel(sample_size=8, in_channels=1, out_channels=1, block_out_channels=(8, 16),
                               layers_per_block=1, norm_num_groups=8, down_block_types=("DownBlock2D",) * 2,
                               up_block_types=("UpBlock2D",) * 2).eval() for _ in range(2)]
shape = (4, 1, 8, 8)
runs = {"base": trajectory(unets[0], diffusers.DDIMScheduler(), num_inference_steps=8, shape=shape, seed=3),
        "distilled": trajectory(unets[1], diffusers.DDIMScheduler(), num_inference_steps=2, shape=shape, seed=3),
        "hybrid": hybrid(unets[0], unets[1], switch_after=1, base_scheduler=diffusers.DDIMScheduler(),
                         distilled_scheduler=diffusers.DDIMScheduler(), num_base_steps=8, num_distilled_steps=2,
                         shape=shape, seed=3)}
viewer = DTViewer(runs, title="DT viewer: tiny UNets")
display(viewer)""",
]
VIEWER = ".kd-dt-viewer"
STATUS = f"document.querySelector('{VIEWER} .kd-dt-status').textContent"
IMAGES = f"document.querySelectorAll('{VIEWER} .kd-dt-images svg image').length"
CURVES = f"[...document.querySelectorAll('{VIEWER} .kd-dt-commitment .legend text')].map(text => text.textContent)"
PIXELS = f"[...document.querySelectorAll('{VIEWER} .kd-dt-images svg image')].map(image => image.getAttribute('href'))"


def test_the_strip_and_curves_follow_the_slider_toggles_and_seed(jupyterlab, chromium_page):
    page = chromium_page
    open_and_run_all(page, jupyterlab, "dt_viewer.ipynb", CELLS)

    viewer = page.locator(VIEWER)
    viewer.wait_for(timeout=120_000)  # the first cell imports torch and diffusers: slow on a busy machine
    page.wait_for_function(f"() => {IMAGES} === 9")  # x_T, x̂0 now, final for each of the three variants
    assert page.evaluate(CURVES) == ["base", "distilled", "hybrid"]
    assert page.evaluate(STATUS).startswith("base step 0 of 8 (t=")

    readout = viewer.locator(".widget-readout").first  # the step slider's editable readout
    readout.click()
    page.keyboard.press("Control+A")
    page.keyboard.type("7")
    page.keyboard.press("Enter")
    page.wait_for_function(f"() => {STATUS}.startsWith('base step 7 of 8 (t=')")
    assert "distilled step 1 of 2" in page.evaluate(STATUS)

    before = page.evaluate(PIXELS)
    viewer.locator("select").select_option(label="seed 2")
    page.wait_for_function(f"before => JSON.stringify({PIXELS}) !== JSON.stringify(before)", arg=before)

    viewer.locator("button", has_text="base").click()
    page.wait_for_function(f"() => {IMAGES} === 6")
    page.wait_for_function(f"() => JSON.stringify({CURVES}) === JSON.stringify(['distilled', 'hybrid'])")
    assert page.evaluate(STATUS).startswith("distilled step 1 of 2")

    assert_fits_the_cell(page, ".kd-dt-viewer")
    for text in ("Loading widget", "Error displaying widget", "Error:"):
        assert page.get_by_text(text).count() == 0, f"{text!r} is on the page"
    SCREENSHOT.parent.mkdir(parents=True, exist_ok=True)
    viewer.scroll_into_view_if_needed()
    page.screenshot(path=str(SCREENSHOT), full_page=True)
