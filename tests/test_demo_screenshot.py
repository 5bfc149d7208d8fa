"""demo.screenshot: a real headless Chromium renders HTML to PNG (skipped without chromium/chromedriver)."""

import pytest
from PIL import Image

from demo import screenshot as shot


def browser_or_skip() -> None:
    try:
        shot.find_browser()
    except shot.BrowserUnavailable as error:
        pytest.skip(str(error))


def test_missing_browser_is_a_clear_error(monkeypatch, tmp_path):
    monkeypatch.setenv("TERAN_CHROMIUM", str(tmp_path / "no-chromium"))
    monkeypatch.setenv("TERAN_CHROMEDRIVER", str(tmp_path / "no-chromedriver"))
    page = tmp_path / "page.html"
    page.write_text("<p>hi</p>")
    with pytest.raises(shot.BrowserUnavailable, match=r"missing .*chromium .*chromedriver.*apt-get install -y chromium chromium-driver"):
        shot.screenshot(page, tmp_path / "page.png")
    assert shot.main([str(page), str(tmp_path / "page.png")]) == 2
    assert not (tmp_path / "page.png").exists()


def test_renders_the_full_page_height_to_png(tmp_path):
    browser_or_skip()
    page = tmp_path / "page.html"
    # Taller than the initial window: the screenshot must hold all of it, top to bottom.
    page.write_text(
        "<!doctype html><body style='margin:0;background:#fff'>"
        "<div style='height:1500px;background:linear-gradient(#ff0000,#0000ff)'></div>"
        "<p style='font:30px sans-serif;margin:0;height:100px'>the end</p></body>"
    )
    png = shot.screenshot(page, tmp_path / "out" / "page.png", width=640)
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with Image.open(png) as image:
        assert image.format == "PNG" and image.size == (640, 1600)
        assert image.mode == "P"  # re-encoded as a palette PNG (compact_png)
        rgb = image.convert("RGB")
        top, bottom = rgb.getpixel((10, 5)), rgb.getpixel((10, 1490))
        assert top[0] > 200 and top[2] < 60 and bottom[2] > 200 and bottom[0] < 60  # the gradient, top to bottom
        text = rgb.crop((0, 1500, 640, 1600))
        assert len(text.getcolors(maxcolors=100_000)) > 2  # the text was drawn, not a blank band
