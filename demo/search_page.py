"""The demo's search page: the webui gateway in-process beside the demo's services, and a screenshot
of a real query on it taken by headless Chromium."""

from __future__ import annotations

from pathlib import Path

from demo.screenshot import browser, save_full_page
from demo.steps import log

PAGE_SHOT_WIDTH = 1280


def start_page(search_address: str, images_dir: Path, port: int):
    """The gateway serving the page on loopback (`port` 0: any free port; a taken port: any free one,
    said in the log); call .shutdown() to stop it."""
    import errno

    from webui.config import WebConfig
    from webui.server import WebServer

    config = WebConfig(search_address=search_address, host="127.0.0.1", port=port, images_dir=images_dir, shutdown_grace_s=2.0)
    server = WebServer(config.validate())
    try:
        server.serve_background()
    except OSError as error:
        if error.errno != errno.EADDRINUSE or port == 0:
            raise
        log(f"search page: port {port} is taken, using a free one (--web-port to choose)")
        server.config.port = 0
        server.serve_background()
    return server


def page_screenshot(url: str, caption: str, png_path: Path, top_k: int = 8, timeout: float = 120.0) -> Path:
    """Type `caption` into the page at `url`, wait for its photos, point at the first hit's best word
    (its box lights up) and save the page as png_path. Raises BrowserUnavailable without a browser."""
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    with browser(PAGE_SHOT_WIDTH, 1000, timeout) as driver:
        wait = WebDriverWait(driver, timeout)
        driver.get(url)
        driver.find_element(By.ID, "caption").send_keys(caption)
        driver.find_element(By.CSS_SELECTOR, "#options summary").click()
        driver.find_element(By.ID, "top-k").clear()
        driver.find_element(By.ID, "top-k").send_keys(str(top_k))
        driver.find_element(By.ID, "caption-search").click()
        wait.until(lambda d: d.find_element(By.TAG_NAME, "body").get_attribute("data-state") in ("done", "error"))
        if driver.find_element(By.TAG_NAME, "body").get_attribute("data-state") == "error":
            raise RuntimeError(f"the page refused the query: {driver.find_element(By.ID, 'error').text}")
        chips = driver.find_elements(By.CSS_SELECTOR, "article.image-hit .word")
        if chips:
            ActionChains(driver).move_to_element(chips[0]).perform()
        return save_full_page(driver, png_path, PAGE_SHOT_WIDTH)
