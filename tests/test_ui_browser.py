"""The dashboard in a real headless browser (Debian's chromium through
selenium) against a real ``nimbus up``: sign in, watch counts move, see a
failing function's error, redrive a dead letter from the page, see why a
rollout rolled back; and over
plain HTTP, that nothing of ``/ui`` answers without the session cookie.

``NIMBUS_SCREENSHOTS=docs/screenshots`` saves a PNG of each page there."""

from __future__ import annotations

import math
import os
import shutil
import socket
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.conftest import HOST_FILES, Nimbus
from tests.region import wait_until

pytestmark = pytest.mark.e2e

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
CHROMEDRIVER = shutil.which("chromedriver") or "/usr/bin/chromedriver"
WAIT_S = 20.0
SHOTS = os.environ.get("NIMBUS_SCREENSHOTS")
SHOTS_LOAD_S = 75.0

MANIFEST = """\
name: shop
functions:
  hello:
    handler: h.hello
    http: [{method: GET, path: /hello}]
  boom:
    handler: h.boom
    http: [{method: GET, path: /boom}]
  once:
    handler: h.once
    env: {OUT: %s}
    retries: 0
"""

HANDLERS = '''\
import os

def hello(event, context):
    print("hello served", context.aws_request_id)
    return {"statusCode": 200, "body": "hi"}

def boom(event, context):
    raise ValueError("kaboom from boom")

def once(event, context):
    """Fails the first time it ever runs, works from then on."""
    marker = os.path.join(os.environ["OUT"], "once-ran")
    if not os.path.exists(marker):
        open(marker, "w").close()
        raise RuntimeError("first try fails")
    return {"ok": True}
'''


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


@pytest.fixture(scope="module")
def up(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Nimbus]:
    root = tmp_path_factory.mktemp("ui")
    out = root / "out"
    out.mkdir()
    app = root / "shop"
    app.mkdir()
    (app / "app.yaml").write_text(MANIFEST % out)
    (app / "h.py").write_text(HANDLERS)
    # The edge's view: this gateway as region "home", a port nobody serves as "away".
    port, dead = free_port(), free_port()
    (root / "region.token").write_text("t" * 40)
    cluster = root / "nimbus.cluster.yaml"
    cluster.write_text(
        "regions:\n"
        f"  home: {{control: 'http://127.0.0.1:1', token_file: region.token,"
        f" gateways: ['http://127.0.0.1:{port}']}}\n"
        f"  away: {{control: 'http://127.0.0.1:1', token_file: region.token,"
        f" gateways: ['http://127.0.0.1:{dead}']}}\n")
    # (Nimbus passes --port 0 first: the later --port wins)
    n = Nimbus(app, root / "state", root / "up.out", *HOST_FILES, "--port", str(port),
               "--cluster", str(cluster))
    yield n
    n.stop()


def start_browser() -> Any:
    """Headless chromium through its driver, at a fixed window size."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--window-size=1400,1000",
                "--disable-gpu", "--disable-dev-shm-usage"):
        options.add_argument(arg)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    driver.set_page_load_timeout(WAIT_S)
    return driver


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    driver = start_browser()
    try:
        yield driver
    finally:
        driver.quit()


def text_of(driver: Any, css: str) -> str:
    from selenium.common.exceptions import NoSuchElementException, StaleElementReferenceException

    try:
        return str(driver.find_element("css selector", css).text)
    except (NoSuchElementException, StaleElementReferenceException):
        return ""


def wait_text(driver: Any, css: str, want: Any, what: str) -> str:
    """Wait (deadline WAIT_S) until ``want(text of css)`` is true."""
    return str(wait_until(lambda: (t := text_of(driver, css)) and want(t) and t,
                          WAIT_S, what, step_s=0.2))


def shot(driver: Any, name: str, scroll_to: str | None = None) -> None:
    if SHOTS:
        Path(SHOTS).mkdir(parents=True, exist_ok=True)
        if scroll_to is not None:
            driver.execute_script(f"document.getElementById('{scroll_to}').scrollIntoView()")
        time.sleep(2.5)  # a refresh or two: the last samples painted
        driver.save_screenshot(str(Path(SHOTS) / f"{name}.png"))


def gateway(up: Nimbus) -> httpx.Client:
    assert up.http is not None
    return up.http


def traffic(up: Nimbus, seconds: float) -> None:
    """Requests to hello at a rate swinging between about 5 and 60 a second,
    and an error from boom every 2 s."""
    start = time.monotonic()
    last_boom = 0.0
    while (elapsed := time.monotonic() - start) < seconds:
        rate = 32 + 27 * math.sin(elapsed / 8)
        gateway(up).get("/hello")
        if elapsed - last_boom >= 2:
            gateway(up).get("/boom")
            last_boom = elapsed
        time.sleep(1 / rate)


def sign_in(driver: Any, up: Any, token: str) -> None:
    driver.get(up.control_url + "/ui/login")
    box = driver.find_element("id", "token")
    box.clear()
    box.send_keys(token)
    driver.find_element("id", "login-submit").click()


def test_no_access_without_the_cookie(up: Nimbus) -> None:
    def call(method: str, path: str, sid: str | None = None, csrf: bool = False,
             **kw: Any) -> httpx.Response:
        headers = {}
        if sid is not None:
            headers["cookie"] = f"nimbus_session={sid}"
        if csrf:
            headers["x-nimbus-csrf"] = "1"
        # a fresh client each time: no cookie jar carries a session along
        with httpx.Client(base_url=up.control_url, timeout=10.0) as c:
            return c.request(method, path, headers=headers, **kw)

    r = call("GET", "/ui")
    assert r.status_code == 303 and r.headers["location"] == "/ui/login"
    for path in ("/ui/api/overview", "/ui/api/functions/hello", "/ui/api/edge",
                 "/ui/static/app.js"):
        assert call("GET", path).status_code == 401, path
    assert call("GET", "/ui/login").status_code == 200
    wrong = call("POST", "/ui/login", data={"token": up.token[:-1] + "x"})
    assert wrong.status_code == 401 and "set-cookie" not in wrong.headers
    assert "Wrong token" in wrong.text
    assert call("POST", "/ui/login", data={"token": ""}).status_code == 401
    assert call("GET", "/ui/api/overview", sid="forged").status_code == 401
    assert call("GET", "/v1/functions", sid="forged", csrf=True).status_code == 401
    ok = call("POST", "/ui/login", data={"token": up.token})
    assert ok.status_code == 303
    cookie = ok.headers["set-cookie"]
    assert up.token not in cookie
    for part in ("HttpOnly", "SameSite=Strict", "Path=/"):
        assert part in cookie
    assert "Secure" not in cookie, "plain http: a Secure cookie would never come back"
    sid = ok.cookies["nimbus_session"]
    assert call("GET", "/ui/api/overview", sid=sid).status_code == 200
    assert call("GET", "/ui/static/app.js", sid=sid).status_code == 200
    bad = call("GET", "/ui/api/functions/a%25b", sid=sid)
    assert bad.status_code == 400 and "path parameter name" in bad.json()["errorMessage"]
    # the control API with the cookie: only with the CSRF header
    assert call("GET", "/v1/functions", sid=sid).status_code == 401
    assert call("POST", "/v1/functions/once/dlq/redrive", sid=sid).status_code == 401
    assert call("GET", "/v1/functions", sid=sid, csrf=True).status_code == 200
    # signing out needs the header too; then the session is gone
    assert call("POST", "/ui/logout", sid=sid).status_code == 403
    assert call("POST", "/ui/logout", sid=sid, csrf=True).status_code == 204
    assert call("GET", "/ui/api/overview", sid=sid).status_code == 401
    assert call("GET", "/v1/functions", sid=sid, csrf=True).status_code == 401


def test_sign_in_watch_counts_and_errors(up: Nimbus, browser: Any) -> None:
    driver = browser
    driver.get(up.control_url + "/ui")
    assert driver.current_url.endswith("/ui/login")
    shot(driver, "login")
    sign_in(driver, up, "not-the-token-" + "x" * 30)
    assert "Wrong token" in wait_text(driver, "#login-error", bool, "the refusal")
    assert driver.get_cookie("nimbus_session") is None
    sign_in(driver, up, up.token)
    wait_text(driver, "#fn-hello td[data-k=name]", lambda t: t == "hello", "the overview")
    assert driver.get_cookie("nimbus_session")["httpOnly"] is True
    assert text_of(driver, "#fn-hello td[data-k=invocations]") == "0"
    for _ in range(7):
        assert gateway(up).get("/hello").status_code == 200
    for _ in range(3):
        assert gateway(up).get("/boom").status_code == 500
    wait_text(driver, "#fn-hello td[data-k=invocations]", lambda t: t == "7",
              "hello's 7 invocations on the page")
    wait_text(driver, "#fn-boom td[data-k=errors]", lambda t: t == "3", "boom's 3 errors")
    assert text_of(driver, "#fn-boom td[data-k=invocations]") == "3"
    assert text_of(driver, "#fn-hello td[data-k=errors]") == "0"
    # the failing function's page: its error count and the error in its logs
    driver.find_element("css selector", "#fn-boom td[data-k=name] a").click()
    wait_text(driver, "#tiles [data-k=errors] b", lambda t: t == "3", "boom's page")
    wait_text(driver, "#logs", lambda t: "kaboom from boom" in t, "the error in boom's logs")
    assert len(driver.find_elements("css selector", "#charts svg.chart")) == 4
    if SHOTS:  # a minute of changing load, so that the charts have a shape
        traffic(up, SHOTS_LOAD_S)
        driver.get(up.control_url + "/ui#/")
        wait_text(driver, "#fn-hello td[data-k=name]", bool, "the overview")
        shot(driver, "overview")  # hello's page is shot with its rollout, at the end


def test_redrive_a_dead_letter_from_the_page(up: Nimbus, browser: Any) -> None:
    driver = browser
    ctl = httpx.Client(base_url=up.control_url, timeout=10.0,
                       headers={"authorization": f"Bearer {up.token}"})
    with ctl:
        r = ctl.post("/v1/functions/once/invoke", content=b"{}",
                     headers={"x-nimbus-invocation-type": "Event"})
        assert r.status_code == 202
        iid = r.json()["invocationId"]
        wait_until(lambda: ctl.get(f"/v1/invocations/{iid}").json()["status"] == "dead",
                   WAIT_S, "the first try to fail into the dead letters")
        driver.get(up.control_url + "/ui#/fn/once")
        row = f'#dead-table tr[data-id="{iid}"]'
        wait_text(driver, row, lambda t: "RuntimeError" in t, "the dead letter on the page")
        shot(driver, "dead-letters", scroll_to="records")
        driver.find_element("css selector", row + " button.redrive").click()
        wait_text(driver, f'#records-table tr[data-id="{iid}"] td[data-k=status]',
                  lambda t: t == "succeeded", "the redriven record to run and succeed")
        wait_text(driver, "#dead", lambda t: "No dead letters" in t, "an empty dead letter list")
        assert ctl.get(f"/v1/invocations/{iid}").json()["status"] == "succeeded"


def test_regions_and_edge_pages(up: Nimbus, browser: Any) -> None:
    driver = browser
    driver.get(up.control_url + "/ui#/regions")
    wait_text(driver, "#nodes", lambda t: "up" in t, "the nodes table")
    shot(driver, "regions")
    driver.get(up.control_url + "/ui#/edge")
    home = '#edge-regions tr[data-region="home"]'
    away = '#edge-regions tr[data-region="away"]'
    wait_text(driver, home, lambda t: " up " in f" {t} ", "region home up")
    wait_text(driver, away, lambda t: " down " in f" {t} ", "region away down")
    shot(driver, "edge")
    # sign out: the pages are gone again
    driver.find_element("id", "logout").click()
    wait_until(lambda: driver.current_url.endswith("/ui/login"), WAIT_S, "the login page")
    driver.get(up.control_url + "/ui")
    assert driver.current_url.endswith("/ui/login")


def test_scraping_a_metrics_port_and_its_failures(up: Nimbus) -> None:
    """What a region's controller does for each node, here against this
    nimbus up's own /metrics: the right token reads it, a wrong one and a
    port nobody serves are left out and reported."""
    import asyncio

    from nimbus.ui.collector import Scraper
    from nimbus.ui.history import Frame, frame_from

    dead = f"http://127.0.0.1:{free_port()}"

    async def scrape() -> tuple[Frame, dict[str, Any], dict[str, Any]]:
        good = Scraper(lambda: [up.control_url], up.token, clock=lambda: 42.0)
        bad = Scraper(lambda: [up.control_url, dead], "w" * 43)
        try:
            frame = Frame(42.0, {})
            for families in (await good.read())[1:]:  # [0] is this test process's own
                frame_from(families, 42.0, frame)
            assert len(await bad.read()) == 1, "only this process's own figures"
            return frame, good.last, bad.last
        finally:
            await good.aclose()
            await bad.aclose()

    frame, good, bad = asyncio.run(scrape())
    assert set(frame.functions) == {"hello", "boom", "once"}
    assert frame.functions["hello"].versions == {"1"}
    assert good == {up.control_url: {"ok": True, "error": None, "at": 42.0}}
    assert bad[up.control_url]["error"] == "answered 401"
    assert not bad[dead]["ok"] and "Connect" in bad[dead]["error"]


def test_a_rolled_back_rollout_on_the_function_page(up: Nimbus, browser: Any) -> None:
    """A canary of hello that fails every request: rolled back by the rule,
    and the function page says so, with the reason and the traffic shares."""
    app = up.state.parent / "shop"
    (app / "h.py").write_text(HANDLERS.replace(
        'return {"statusCode": 200, "body": "hi"}', 'raise RuntimeError("bad release")'))
    out = up.cli("deploy", str(app), "--strategy", "canary:50%:10m",
                 "--rollback-on", "error_rate > 2%", "--min-requests", "5")
    assert out.returncode == 0, out.stderr
    ctl = httpx.Client(base_url=up.control_url, timeout=10.0,
                       headers={"authorization": f"Bearer {up.token}"})

    def rolled_back() -> bool:
        gateway(up).get("/hello")
        return bool(ctl.get("/v1/functions/hello/rollout").json()["state"] == "rolled_back")

    with ctl:
        wait_until(rolled_back, WAIT_S, "the bad canary to roll back", step_s=0.05)
        rollout = ctl.get("/v1/functions/hello/rollout").json()
    assert rollout["reason"].startswith("error_rate 100.0% > 2% over ")
    assert [r.status_code for r in (gateway(up).get("/hello") for _ in range(5))] == [200] * 5
    driver = browser
    sign_in(driver, up, up.token)
    # signed in (the overview shows) before going on: a navigation started
    # while the sign-in's answer is on its way would cancel it
    wait_text(driver, "#fn-hello td[data-k=name]", lambda t: t == "hello", "the overview")
    driver.get(up.control_url + "/ui#/fn/hello")
    try:
        wait_text(driver, "#rollout-reason", lambda t: t == "Rolled back: " + rollout["reason"],
                  "the rollback's reason on hello's page")
    except AssertionError as exc:  # say what the page showed instead
        raise AssertionError(f"{exc}; the page's rollout: {text_of(driver, '#rollout')!r}; "
                             f"the API's reason: {rollout['reason']!r}") from None
    assert text_of(driver, "#rollout [data-k=rollout-state]") == "rolled back"
    history = text_of(driver, "#rollout-history")
    assert "rollback" in history and "100.0% errors" in history
    assert text_of(driver, '#versions-table tr[data-version="1"] td[data-k=traffic]') \
        == "live 100%"
    shot(driver, "function")
