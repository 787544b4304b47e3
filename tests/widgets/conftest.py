"""Fixtures for the widget tests that drive a real JupyterLab in headless Chromium. When such a test
fails, the page is kept as ``reports/browser/<test>_failure.png`` and the server log's tail is printed."""
from __future__ import annotations

import pytest

from jupyter_harness import CHROMIUM, CHROMIUM_ARGS, REPO_ROOT, running_jupyterlab


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    """Keep each phase's report on the test item, so fixtures can tell whether the test failed."""
    outcome = yield
    report = outcome.get_result()
    setattr(item, f"report_{report.when}", report)


def _failed(request) -> bool:
    report = getattr(request.node, "report_call", None)
    return report is None or report.failed


@pytest.fixture
def jupyterlab(request, tmp_path):
    """A throwaway JupyterLab (see ``jupyter_harness``); its ``root`` is where a test writes notebooks."""
    if not CHROMIUM.exists():
        pytest.skip(f"{CHROMIUM} is missing: install Debian's chromium (apt-get install -y chromium)")
    with running_jupyterlab(tmp_path / "jupyter") as lab:
        yield lab
        if _failed(request):
            print(f"--- tail of {lab.log} ---\n{lab.log.read_text()[-4000:]}")


@pytest.fixture
def chromium_page(request):
    """A Playwright page in Debian's Chromium (never a browser downloaded by `playwright install`)."""
    if not CHROMIUM.exists():
        pytest.skip(f"{CHROMIUM} is missing: install Debian's chromium (apt-get install -y chromium)")
    sync_api = pytest.importorskip("playwright.sync_api", reason="playwright for Python is not installed")
    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 1700})
            page.set_default_timeout(60_000)
            console = []
            page.on("console", lambda message: console.append(f"{message.type}: {message.text}"))
            yield page
            if _failed(request):
                target = REPO_ROOT / "reports" / "browser" / f"{request.node.name}_failure.png"
                target.parent.mkdir(parents=True, exist_ok=True)
                page.screenshot(path=str(target))
                errors = [line for line in console if line.startswith(("error", "warning"))]
                print(f"failure screenshot: {target}\n--- browser console ---\n" + "\n".join(errors[-40:]))
        finally:
            browser.close()
