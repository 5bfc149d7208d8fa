"""Render an HTML file to a PNG with a real headless Chromium (selenium + Debian's chromium and chromedriver).

    python -m demo.screenshot artifacts/demo/index.html docs/demo-contact-sheet.png

Needs the PyPI package `selenium` (the `dev` extra) and, on Debian/Ubuntu,
`apt-get install -y chromium chromium-driver` (/usr/bin/chromium, /usr/bin/chromedriver).
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
from contextlib import contextmanager
from pathlib import Path

CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"
INSTALL_HINT = "apt-get update && apt-get install -y chromium chromium-driver"
# Headless flags that work as root in a container without a GPU or network.
FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-dev-shm-usage",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--hide-scrollbars",
    "--force-device-scale-factor=1",
]
MAX_HEIGHT = 16000  # Chromium renders taller screenshots unreliably


class BrowserUnavailable(RuntimeError):
    """No headless browser to render with; the message says what is missing and how to install it."""


def _binary(env: str, default: str, names: tuple[str, ...]) -> str | None:
    explicit = os.environ.get(env)
    if explicit:
        return explicit if Path(explicit).is_file() else None
    if Path(default).is_file():
        return default
    return next((found for name in names if (found := shutil.which(name))), None)


def find_browser() -> tuple[str, str]:
    """(chromium, chromedriver) paths ($TERAN_CHROMIUM / $TERAN_CHROMEDRIVER override the Debian ones),
    or BrowserUnavailable naming what is missing and how to install it."""
    missing = []
    try:
        import selenium  # noqa: F401
    except ImportError:
        missing.append("the Python package selenium (pip install -e '.[dev]')")
    chromium = _binary("TERAN_CHROMIUM", CHROMIUM, ("chromium", "chromium-browser"))
    driver = _binary("TERAN_CHROMEDRIVER", CHROMEDRIVER, ("chromedriver",))
    if chromium is None:
        missing.append(f"chromium ({os.environ.get('TERAN_CHROMIUM') or CHROMIUM})")
    if driver is None:
        missing.append(f"chromedriver ({os.environ.get('TERAN_CHROMEDRIVER') or CHROMEDRIVER})")
    if missing:
        hint = INSTALL_HINT if chromium is None or driver is None else "pip install selenium"
        raise BrowserUnavailable(f"cannot render a screenshot: missing {', '.join(missing)}; install with: {hint}")
    return chromium, driver


@contextmanager
def browser(width: int = 1400, height: int = 1000, timeout: float = 60.0):
    """A headless Chromium WebDriver on a throwaway profile, quit on exit. Raises BrowserUnavailable
    without a browser."""
    chromium, driver_path = find_browser()
    from selenium import webdriver
    from selenium.webdriver.chrome.options import Options
    from selenium.webdriver.chrome.service import Service

    os.environ.setdefault("SE_OFFLINE", "true")  # never let Selenium Manager look for downloads
    with tempfile.TemporaryDirectory(prefix="teran-chromium-") as profile:
        options = Options()
        options.binary_location = chromium
        for flag in [*FLAGS, f"--user-data-dir={profile}", f"--window-size={width},{height}"]:
            options.add_argument(flag)
        driver = webdriver.Chrome(options=options, service=Service(executable_path=driver_path))
        try:
            driver.set_page_load_timeout(timeout)
            yield driver
        finally:
            driver.quit()


def save_full_page(driver, png_path: Path | str, width: int) -> Path:
    """Write the page open in `driver`, its full scroll height (up to MAX_HEIGHT) at `width` CSS pixels,
    to png_path once every image is decoded; compacted (compact_png)."""
    png_path = Path(png_path)
    # Wait for every image to be decoded so that the page has its final height.
    driver.execute_async_script(
        "const done = arguments[arguments.length - 1];"
        "Promise.all(Array.from(document.images).map(i => i.decode().catch(() => null))).then(() => done(true));"
    )
    height = driver.execute_script(
        "return Math.max(document.documentElement.scrollHeight, document.body ? document.body.scrollHeight : 0);"
    )
    # The window size includes the browser chrome; size the viewport exactly via CDP.
    height = min(int(height), MAX_HEIGHT)
    metrics = {"width": width, "height": height, "deviceScaleFactor": 1, "mobile": False}
    driver.execute_cdp_cmd("Emulation.setDeviceMetricsOverride", metrics)
    png_path.parent.mkdir(parents=True, exist_ok=True)
    if not driver.save_screenshot(str(png_path)):
        raise RuntimeError(f"chromium could not write a screenshot of {driver.current_url}")
    compact_png(png_path)
    return png_path


def screenshot(html_path: Path | str, png_path: Path | str, width: int = 1400, timeout: float = 60.0) -> Path:
    """Render html_path in headless Chromium at `width` CSS pixels and write the whole page (its full
    scroll height, up to MAX_HEIGHT) to png_path. Raises BrowserUnavailable without a browser."""
    html_path = Path(html_path).resolve()
    find_browser()
    if not html_path.is_file():
        raise FileNotFoundError(html_path)
    with browser(width, timeout=timeout) as driver:
        driver.get(html_path.as_uri())
        return save_full_page(driver, png_path, width)


def compact_png(png_path: Path) -> None:
    """Re-encode as a 256-colour palette PNG (dithered): a third of the size of the browser's RGB
    screenshot, so the committed contact sheet stays small, and still legible."""
    from PIL import Image

    with Image.open(png_path) as image:
        palette = image.convert("RGB").quantize(colors=256, method=Image.Quantize.MEDIANCUT, dither=Image.Dither.FLOYDSTEINBERG)
    palette.save(png_path, optimize=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m demo.screenshot", description=__doc__.split("\n\n")[0])
    parser.add_argument("html", help="HTML file to render")
    parser.add_argument("png", help="PNG file to write")
    parser.add_argument("--width", type=int, default=1400, help="page width in CSS pixels (default 1400)")
    args = parser.parse_args(argv)
    try:
        path = screenshot(args.html, args.png, width=args.width)
    except BrowserUnavailable as error:
        print(error, file=sys.stderr)
        return 2
    print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
