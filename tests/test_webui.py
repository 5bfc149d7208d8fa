"""The search page's gateway (webui) against real encoder and search servers on loopback (milvus-lite,
synthetic model, real Flickr8k dev photos): the JSON API's results, limits and errors over real HTTP,
and the page itself driven by a real headless Chromium (required in CI: `CI` set fails instead of skipping)."""

from __future__ import annotations

import http.client
import json
import os
import socket
import ssl
import time
import urllib.error
import urllib.request

import pytest
from encoder_fixtures import build_synthetic_model_dir, make_config, self_signed_cert
from search_fixtures import search_config, unique_prefix

from encoder_service.server import ServerThread as EncoderThread
from search_service.server import ServerThread as SearchThread
from teran.data.flickr8k import load_split
from teran_api.search_client import SearchClient
from teran_api.types import IndexItem
from webui.config import WebConfig, from_args
from webui.server import WebServer

PHOTOS = 6
TOKEN = "page-secret"


@pytest.fixture(scope="module")
def services(tmp_path_factory):
    base = tmp_path_factory.mktemp("webui")
    data = load_split("dev", limit=PHOTOS)
    model_dir = build_synthetic_model_dir(base / "model", joint_dim=16)
    with EncoderThread(make_config(model_dir, max_items=32)) as encoder:
        config = search_config(str(base / "search.db"), encoder.target, collection_prefix=unique_prefix("web"), max_top_k=20)
        with SearchThread(config) as search, SearchClient(search.target, timeout=60) as client:
            client.index([IndexItem(name, data.image_path(i).read_bytes(), json.dumps({"caption": data.captions[i][0]}))
                          for i, name in enumerate(data.names)])  # fmt: skip
            client.index([IndexItem(f"{name}#{k}", text, json.dumps({"image": name, "text": text}))
                          for i, name in enumerate(data.names) for k, text in enumerate(data.captions[i][:2])])  # fmt: skip
            yield {"search": search, "data": data, "base": base}


def web_config(services, **overrides) -> WebConfig:
    values = dict(search_address=services["search"].target, host="127.0.0.1", port=0, images_dir=services["data"].image_path(0).parent,
                  shutdown_grace_s=1.0, search_timeout_s=30.0)  # fmt: skip
    values.update(overrides)
    return WebConfig(**values).validate()


@pytest.fixture(scope="module")
def web(services):
    server = WebServer(web_config(services))
    server.serve_background()
    yield server
    server.shutdown()


def call(url: str, body: bytes | dict | None = None, headers: dict | None = None, method: str | None = None, context=None):
    """(HTTP status, parsed JSON or raw bytes, headers) of one request."""
    data = json.dumps(body).encode() if isinstance(body, dict) else body
    request = urllib.request.Request(url, data=data, headers=headers or {}, method=method)
    if isinstance(body, dict):
        request.add_header("Content-Type", "application/json")
    try:
        with urllib.request.urlopen(request, timeout=60, context=context) as response:
            status, raw, got = response.status, response.read(), response.headers
    except urllib.error.HTTPError as error:
        status, raw, got = error.code, error.read(), error.headers
    return status, (json.loads(raw) if got.get("Content-Type") == "application/json" else raw), got


def test_caption_query_returns_served_photos_with_word_boxes(web, services):
    status, result, _ = call(web.url + "api/v1/search", {"text": "a dog runs on the grass", "top_k": 4})
    assert status == 200, result
    assert result["target"] == "image" and result["reranked"] and len(result["hits"]) == 4
    assert {hit["id"] for hit in result["hits"]} <= set(services["data"].names)
    assert [h["score"] for h in result["hits"]] == sorted((h["score"] for h in result["hits"]), reverse=True)
    hit = result["hits"][0]
    assert hit["photo_url"] == f"/photos/{hit['id']}" and hit["text"] == hit["metadata"]["caption"]
    assert [w["word"] for w in hit["words"]] == ["dog", "runs", "grass"]  # content words, each at its best region
    for word in hit["words"]:
        x1, y1, x2, y2 = word["box"]
        assert 0 <= x1 < x2 <= 1 and 0 <= y1 < y2 <= 1
    status, photo, headers = call(web.url + hit["photo_url"].lstrip("/"))
    assert status == 200 and headers["Content-Type"] == "image/jpeg"
    assert photo == (services["data"].image_path(0).parent / hit["id"]).read_bytes()


def test_photo_query_returns_caption_texts(web, services):
    data = services["data"]
    photo = data.image_path(1).read_bytes()
    status, result, _ = call(web.url + "api/v1/search/image?top_k=3&rerank=false", photo, {"Content-Type": "image/jpeg"})
    assert status == 200, result
    assert result["target"] == "caption" and not result["reranked"] and len(result["hits"]) == 3
    for hit in result["hits"]:
        name = hit["id"].split("#")[0]
        assert hit["text"] == data.captions[data.names.index(name)][int(hit["id"].split("#")[1])]
        assert hit["photo_url"] == f"/photos/{name}" and hit["words"]  # boxes on the query photo
        assert all(len(word["box"]) == 4 for word in hit["words"])


@pytest.mark.parametrize(
    "body, message",
    [
        ({"top_k": 3}, '"text" is required'),
        ({"text": "a dog", "topk": 3}, "unknown field(s) topk; allowed: explain, filter"),
        ({"text": "a dog", "top_k": "many"}, "top_k must be an integer"),
        ({"text": "a dog", "top_k": 500}, "top_k: 500; give 1..20 (--max-top-k)"),  # the search service's own limit
        ({"text": "a dog", "filter": 'metadata["caption"] ==='}, "filter"),
    ],
)
def test_refused_queries_say_what_is_allowed(web, body, message):
    status, result, _ = call(web.url + "api/v1/search", body)
    assert status == 400 and result["error"]["code"] == "INVALID_ARGUMENT"
    assert message in result["error"]["message"]


def test_protocol_refusals(web, services):
    host, port = "127.0.0.1", web.httpd.server_address[1]
    status, result, _ = call(web.url + "api/v1/search", b"{not json", {"Content-Type": "application/json"})
    assert status == 400 and "not valid JSON" in result["error"]["message"]
    status, result, _ = call(web.url + "api/v1/search", method="GET")
    assert status == 405 and "use POST" in result["error"]["message"]
    status, result, _ = call(web.url + "api/v2/search")
    assert status == 404 and "/api/v1/" in result["error"]["message"]
    for photo in ("..%2Fsecret.jpg", "%2Fetc%2Fpasswd", "missing.jpg", services["data"].names[0] + ".txt"):
        assert call(web.url + "photos/" + photo)[0] == 404
    status, result, _ = call(web.url + "api/v1/search/image", b"", {"Content-Type": "image/jpeg"})
    assert status == 400 and "body is empty" in result["error"]["message"]
    status, result, _ = call(web.url + "api/v1/search/image", b"not a photo at all", {"Content-Type": "image/jpeg"})
    assert status == 400 and result["error"]["code"] == "INVALID_ARGUMENT"

    # An oversized body is refused from its Content-Length alone: the server answers without reading it.
    connection = http.client.HTTPConnection(host, port, timeout=10)
    connection.putrequest("POST", "/api/v1/search/image")
    connection.putheader("Content-Length", str(web.config.max_upload_bytes + 1))
    connection.endheaders()
    response = connection.getresponse()
    assert response.status == 413 and f"at most {web.config.max_upload_bytes}" in json.loads(response.read())["error"]["message"]
    connection.close()
    connection = http.client.HTTPConnection(host, port, timeout=10)
    connection.request("POST", "/api/v1/search", body=iter([b'{"text": "a dog"}']), headers={"Transfer-Encoding": "chunked"})
    response = connection.getresponse()
    assert response.status == 411 and "Content-Length" in json.loads(response.read())["error"]["message"]
    connection.close()


def test_slow_body_holds_a_slot_then_times_out(services):
    """A client that stops sending its body keeps its in-flight slot until --read-timeout-s, then gets 408;
    meanwhile a request over --max-inflight-requests is refused with 429."""
    server = WebServer(web_config(services, max_inflight_requests=1, read_timeout_s=1.5))
    server.serve_background()
    port = server.httpd.server_address[1]
    try:
        slow = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
        slow.putrequest("POST", "/api/v1/search")
        slow.putheader("Content-Type", "application/json")
        slow.putheader("Content-Length", "100")
        slow.endheaders(b'{"text": ')
        time.sleep(0.3)  # the slow request now holds the only slot
        status, result, _ = call(server.url + "api/v1/search", {"text": "a dog"})
        assert status == 429 and "limit 1" in result["error"]["message"]
        response = slow.getresponse()
        assert response.status == 408 and "--read-timeout-s" in json.loads(response.read())["error"]["message"]
        slow.close()
        assert call(server.url + "api/v1/search", {"text": "a dog"})[0] == 200  # the slot is free again
    finally:
        server.shutdown()


def test_health_stats_and_the_page(web):
    assert call(web.url + "healthz")[:2] == (200, {"status": "ok"})
    assert call(web.url + "readyz")[:2] == (200, {"status": "ready"})
    status, stats, _ = call(web.url + "api/v1/stats")
    assert status == 200 and (stats["images"], stats["captions"]) == (PHOTOS, 2 * PHOTOS) and stats["limits"]["max_top_k"] == 20
    status, page, headers = call(web.url)
    assert status == 200 and b'id="caption-form"' in page and "default-src 'self'" in headers["Content-Security-Policy"]


def test_bearer_token_and_tls(services, tmp_path):
    cert, key = self_signed_cert(tmp_path)
    server = WebServer(web_config(services, auth_tokens=[TOKEN], tls_cert=cert, tls_key=key))
    url = server.serve_background()
    context = ssl.create_default_context(cafile=str(cert))
    try:
        assert url.startswith("https://")
        status, result, headers = call(url + "api/v1/search", {"text": "a dog"}, context=context)
        assert status == 401 and result["error"]["code"] == "UNAUTHENTICATED" and headers["WWW-Authenticate"].startswith("Bearer")
        assert call(url + "photos/" + services["data"].names[0], context=context)[0] == 401
        status, result, _ = call(url + "api/v1/search", {"text": "a dog"}, {"Authorization": f"Bearer {TOKEN}"}, context=context)
        assert status == 200 and result["hits"]
        assert call(url + "healthz", context=context)[0] == 200  # probes need no token
        assert call(url, context=context)[0] == 200  # nor the page, which asks for the token
    finally:
        server.shutdown()


def test_search_service_down_is_503_with_a_hint(services):
    server = WebServer(web_config(services, search_address="127.0.0.1:1", search_timeout_s=2.0))
    url = server.serve_background()
    try:
        status, result, _ = call(url + "api/v1/search", {"text": "a dog"})
        assert status == 503 and result["error"]["code"] == "UNAVAILABLE"
        message = result["error"]["message"]
        assert "search service at 127.0.0.1:1 is unavailable" in message and "is it running?" in message
        assert call(url + "readyz")[0] == 503
    finally:
        server.shutdown()


def scrape(port: int) -> dict[tuple[str, tuple], float]:
    """The samples of the gateway's /metrics page: {(name, sorted label pairs): value}."""
    from prometheus_client.parser import text_string_to_metric_families

    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    return {(s.name, tuple(sorted(s.labels.items()))): s.value for family in text_string_to_metric_families(text) for s in family.samples}


def test_prometheus_metrics_on_their_own_port(services, web):
    """Requests by route and status code, their latency, refusals by reason: scraped over real HTTP from the
    metrics port, which opens and closes with the server (and is off with the default --metrics-port -1)."""
    assert web.metrics_port is None  # the default: no metrics listener
    server = WebServer(web_config(services, metrics_port=0))
    server.serve_background()
    port = server.metrics_port
    try:
        assert port and port != server.httpd.server_address[1]
        assert call(server.url + "api/v1/search", {"text": "a dog", "top_k": 2})[0] == 200
        assert call(server.url + "api/v1/search", {"text": "a cat", "top_k": 2})[0] == 200
        assert call(server.url + "no/such/page?x=1")[0] == 404
        assert call(server.url + "healthz")[0] == 200
        connection = http.client.HTTPConnection("127.0.0.1", server.httpd.server_address[1], timeout=10)
        connection.putrequest("POST", "/api/v1/search/image")
        connection.putheader("Content-Length", str(server.config.max_upload_bytes + 1))
        connection.endheaders()
        assert connection.getresponse().status == 413
        connection.close()
        with socket.create_connection(("127.0.0.1", server.httpd.server_address[1]), timeout=10) as raw:
            raw.sendall(b"GET /a b HTTP/1.1\r\n\r\n")  # a space in the path: refused by http.server's parsing, before any route
            assert raw.makefile("rb").read().startswith(b"HTTP/1.1 400")  # to the end: the server closes the connection
        # a request is counted once its response is written, which may be just after the client has read it
        deadline = time.monotonic() + 10
        samples = scrape(port)
        while sum(v for (name, _), v in samples.items() if name == "teran_web_requests_total") < 6:
            assert time.monotonic() < deadline, samples
            time.sleep(0.05)
            samples = scrape(port)

        def requests(route, code):
            return samples.get(("teran_web_requests_total", (("code", code), ("route", route))), 0)

        assert requests("search", "200") == 2 and requests("other", "404") == 1 and requests("healthz", "200") == 1
        assert requests("search_image", "413") == 1 and requests("other", "400") == 1
        assert not any(dict(labels).get("route") == "no/such/page" for _, labels in samples)  # routes, never raw paths
        assert samples[("teran_web_request_seconds_count", (("route", "search"),))] == 2
        assert samples[("teran_web_request_seconds_bucket", (("le", "+Inf"), ("route", "search")))] == 2
        assert samples[("teran_web_request_seconds_count", (("route", "stats"),))] == 0  # every route's series from the start
        assert samples[("teran_web_refused_requests_total", (("reason", "too_large"),))] == 1
        assert samples[("teran_web_refused_requests_total", (("reason", "busy"),))] == 0
        assert samples[("teran_web_inflight_requests", ())] == 0
    finally:
        server.shutdown()
    with pytest.raises(OSError):
        scrape(port)  # closed with the server


def test_config_flags_and_variables(services, tmp_path):
    config = from_args(["--search-address", "search:50052", "--port", "0"], {"TERAN_WEB_MAX_UPLOAD_BYTES": "1000"})
    assert (config.search_address, config.max_upload_bytes, config.port) == ("search:50052", 1000, 0)
    with pytest.raises(Exception, match="--search-address .*required"):
        from_args([], {})
    with pytest.raises(Exception, match="--images-dir .*not a folder"):
        from_args(["--search-address", "x:1", "--images-dir", str(tmp_path / "none")], {})
    # metrics: the services' settings (serving.settings.EndpointSettings), off unless a port is given
    assert (config.metrics_host, config.metrics_port) == ("127.0.0.1", -1)
    config = from_args(["--search-address", "x:1", "--metrics-port", "9092"], {"TERAN_WEB_METRICS_HOST": "0.0.0.0"})
    assert (config.metrics_host, config.metrics_port) == ("0.0.0.0", 9092)
    assert from_args(["--search-address", "x:1"], {"TERAN_WEB_METRICS_PORT": "-1"}).metrics_port == -1
    with pytest.raises(Exception, match=r"--metrics-port \(TERAN_WEB_METRICS_PORT\): -2 is not a TCP port"):
        from_args(["--search-address", "x:1", "--metrics-port", "-2"], {})


# --- the page in a real browser


@pytest.fixture(scope="module")
def browser():
    from demo.screenshot import BrowserUnavailable, find_browser
    from demo.screenshot import browser as open_browser

    try:
        find_browser()
    except BrowserUnavailable as error:
        if os.environ.get("CI"):
            pytest.fail(f"CI must run the browser test: {error}")
        pytest.skip(str(error))
    with open_browser(width=1280, height=1600) as driver:
        yield driver


@pytest.mark.slow
def test_page_in_headless_chromium(web, browser, services):
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    wait = WebDriverWait(browser, 60)
    browser.get(web.url)
    wait.until(lambda d: "photos and" in d.find_element(By.ID, "stats").text)
    assert d_text(browser, "stats").startswith(f"{PHOTOS} photos and {2 * PHOTOS} captions indexed")

    # a caption query: photo cards, each photo loaded, word boxes drawn on it
    browser.find_element(By.ID, "caption").send_keys("a dog runs on the grass")
    browser.find_element(By.CSS_SELECTOR, "#options summary").click()
    browser.find_element(By.ID, "top-k").clear()
    browser.find_element(By.ID, "top-k").send_keys("4")
    browser.find_element(By.ID, "caption-search").click()
    wait.until(lambda d: d.find_element(By.TAG_NAME, "body").get_attribute("data-state") == "done")
    cards = browser.find_elements(By.CSS_SELECTOR, "article.image-hit")
    assert len(cards) == 4
    wait.until(lambda d: all(d.execute_script("return arguments[0].complete && arguments[0].naturalWidth > 0", img)
                             for img in d.find_elements(By.CSS_SELECTOR, "article.image-hit img")))  # fmt: skip
    first = cards[0]
    boxes = first.find_elements(By.CSS_SELECTOR, ".box")
    assert [b.get_attribute("data-word") for b in boxes] == ["dog", "runs", "grass"]
    shown = [b for b in boxes if b.is_displayed()]
    assert shown and all(b.size["width"] > 0 and b.size["height"] > 0 for b in shown)
    chip = first.find_elements(By.CSS_SELECTOR, ".word")[0]
    ActionChains(browser).move_to_element(chip).perform()
    assert "on" in boxes[0].get_attribute("class").split() and boxes[0].is_displayed()

    # a photo query: caption cards with their text; hovering a word draws its box on the query photo
    browser.find_element(By.ID, "photo").send_keys(str(services["data"].image_path(2)))
    browser.find_element(By.ID, "photo-search").click()
    wait.until(lambda d: d.find_element(By.TAG_NAME, "body").get_attribute("data-state") == "done"
               and d.find_elements(By.CSS_SELECTOR, "article.caption-hit"))  # fmt: skip
    captions = browser.find_elements(By.CSS_SELECTOR, "article.caption-hit")
    every_caption = {text for caption_list in services["data"].captions for text in caption_list[:2]}
    assert len(captions) == 4 and all(c.find_element(By.CSS_SELECTOR, ".text").text in every_caption for c in captions)
    ActionChains(browser).move_to_element(captions[0].find_elements(By.CSS_SELECTOR, ".word")[0]).perform()
    assert browser.find_elements(By.CSS_SELECTOR, "#query-photo .box.on")

    # a long result list: the query photo stays in view (sticky beside the results on a wide screen), so the
    # box of a word pointed at far down is seen; on a narrow screen it stays above the results, full width
    browser.set_window_size(1280, 480)
    try:
        ActionChains(browser).move_to_element(captions[-1].find_elements(By.CSS_SELECTOR, ".word")[0]).perform()
        photo = browser.execute_script(
            "const r = document.getElementById('query-photo').getBoundingClientRect();"
            "return {top: r.top, bottom: r.bottom, right: r.right, height: innerHeight, scrolled: scrollY};"
        )
        results_left = browser.find_element(By.ID, "results").rect["x"]
        assert photo["scrolled"] > 0, "the page should scroll at this size"
        assert 0 <= photo["top"] and photo["bottom"] <= photo["height"] and photo["right"] <= results_left, photo
        assert [b for b in browser.find_elements(By.CSS_SELECTOR, "#query-photo .box.on") if b.is_displayed()]
        browser.set_window_size(600, 900)
        browser.execute_script("scrollTo(0, 0)")
        query_photo, results = browser.find_element(By.ID, "query-photo").rect, browser.find_element(By.ID, "results").rect
        assert query_photo["y"] + query_photo["height"] <= results["y"] and results["width"] > 500  # stacked, each full width
    finally:
        browser.set_window_size(1280, 1600)

    # an error path: a filter the search service refuses is shown, and no stale results remain
    browser.find_element(By.ID, "filter").send_keys('metadata["caption"] ===')
    browser.find_element(By.ID, "caption-search").click()
    wait.until(lambda d: d.find_element(By.TAG_NAME, "body").get_attribute("data-state") == "error")
    assert d_text(browser, "error").startswith("INVALID_ARGUMENT:") and not browser.find_elements(By.CSS_SELECTOR, "article.hit")


def d_text(driver, element_id: str) -> str:
    from selenium.webdriver.common.by import By

    return driver.find_element(By.ID, element_id).text
