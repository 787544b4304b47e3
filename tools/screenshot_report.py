"""Screenshot the top of a rendered report (down to the interactive CKA heatmap) for the README.

Usage:
    .venv/bin/kd-workbench report gap                       # the default report
    .venv/bin/python tools/screenshot_report.py             # newest reports/gap/*/report.html -> docs/gap_report.png
    .venv/bin/python tools/screenshot_report.py path/to/report.html --output docs/gap_report.png --width 1200

Uses Debian's /usr/bin/chromium through playwright (never `playwright install`), headless, offline, with
a fresh profile. The page is opened from disk, so this also checks that the report renders without a
network: the script fails if the plotly heatmap does not draw.
"""
from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--disable-dev-shm-usage", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
]
ROOT = Path(__file__).resolve().parent.parent


def newest_report(reports_dir: Path = ROOT / "reports", name: str = "gap") -> Path:
    """The most recently written ``report.html`` of report ``name``."""
    found = sorted((reports_dir / name).glob("*/report.html"), key=lambda path: path.stat().st_mtime)
    if not found:
        raise SystemExit(f"no {reports_dir / name}/*/report.html: run `kd-workbench report {name}` first")
    return found[-1]


def screenshot(html: Path, output: Path, width: int = 1200, margin: int = 24, scale: float = 1.0) -> Path:
    """Save a PNG of ``html`` from the page top to just below its first plotly figure."""
    from playwright.sync_api import sync_playwright

    with tempfile.TemporaryDirectory(prefix="kd-chromium-") as profile, sync_playwright() as playwright:
        context = playwright.chromium.launch_persistent_context(
            profile, executable_path=str(CHROMIUM), args=CHROMIUM_ARGS, headless=True,
            viewport={"width": width, "height": 900}, device_scale_factor=scale, offline=True,
        )
        try:
            page = context.new_page()
            page.goto(html.resolve().as_uri(), wait_until="load")
            figure = page.wait_for_selector(".js-plotly-plot .main-svg", timeout=30_000)
            page.wait_for_timeout(500)  # let plotly finish its first layout pass
            box = page.locator(".js-plotly-plot").first.bounding_box()
            if figure is None or box is None:
                raise RuntimeError(f"the plotly figure did not render in {html}")
            bottom = box["y"] + box["height"] + margin
            output.parent.mkdir(parents=True, exist_ok=True)
            page.screenshot(path=str(output), full_page=True, clip={"x": 0, "y": 0, "width": width, "height": bottom})
        finally:
            context.close()
    return output


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("html", nargs="?", type=Path, help="a report.html (default: the newest reports/gap run)")
    parser.add_argument("--output", type=Path, default=ROOT / "docs" / "gap_report.png")
    parser.add_argument("--width", type=int, default=1200, help="viewport width in CSS pixels")
    args = parser.parse_args(argv)
    if not CHROMIUM.exists():
        raise SystemExit(f"{CHROMIUM} is missing: apt-get install -y chromium")
    path = screenshot(args.html or newest_report(), args.output, args.width)
    print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
