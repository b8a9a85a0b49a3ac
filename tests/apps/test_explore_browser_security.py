"""Another site in a real browser cannot drive the explorer.

A second local server on another port serves a page that ``fetch``es the explorer's API the
ways a hostile page would (a "simple" text/plain POST that needs no preflight, a JSON POST
that does, a no-cors POST); and a DNS-rebinding page (a foreign name that chromium resolves
to 127.0.0.1) loads the explorer under its own name. Each is refused by the explorer itself
(``server.refusals``), not only by the browser's same-origin rule.
"""

import http.server
import threading

import pytest

from attnkit.apps.explore.server import make_server, serve_in_thread

from _explore_models import REBIND_HOST

pytest.importorskip("selenium.webdriver", reason="selenium is not installed")
from selenium.webdriver.support.ui import WebDriverWait  # noqa: E402

ATTACK = """<!DOCTYPE html><html><head><meta charset="utf-8"><title>attacker</title></head>
<body><script>
window.results = {};
const target = "%(target)sapi/mask", body = '{"T": 4096, "S": 4096}';
const tries = {
  simple: () => fetch(target, {method: "POST", headers: {"Content-Type": "text/plain"}, body}),
  json: () => fetch(target, {method: "POST", headers: {"Content-Type": "application/json"}, body}),
  nocors: () => fetch(target, {method: "POST", mode: "no-cors", body}),
};
(async () => {
  for (const [name, go] of Object.entries(tries)) {
    try { const r = await go(); window.results[name] = "status " + r.status + " " + r.type; }
    catch (err) { window.results[name] = "failed: " + err; }
  }
  window.done = true;
})();
</script></body></html>"""


@pytest.fixture(scope="module")
def explorer():
    srv = make_server(0)
    serve_in_thread(srv)
    yield srv
    srv.shutdown()
    srv.server_close()


@pytest.fixture(scope="module")
def attacker(explorer):
    """A plain local web server on another port serving :data:`ATTACK`."""
    page = (ATTACK % {"target": explorer.url}).encode()

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802
            self.send_response(200)
            self.send_header("Content-Type", "text/html; charset=utf-8")
            self.send_header("Content-Length", str(len(page)))
            self.end_headers()
            self.wfile.write(page)

        def log_message(self, *args):
            pass

    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    yield srv
    srv.shutdown()
    srv.server_close()


def test_a_page_on_another_port_cannot_use_the_api(driver, explorer, attacker):
    port = attacker.server_address[1]
    assert port != explorer.server_address[1]
    explorer.refusals.clear()
    driver.get(f"http://127.0.0.1:{port}/")
    WebDriverWait(driver, 30).until(lambda d: d.execute_script("return window.done === true"))
    results = driver.execute_script("return window.results")
    assert results["simple"].startswith("failed: TypeError"), results  # unreadable: no CORS
    assert results["json"].startswith("failed: TypeError"), results  # preflight refused
    assert results["nocors"] == "status 0 opaque", results
    refused = list(explorer.refusals)
    origin = f"'http://127.0.0.1:{port}'"
    posts = [r for r in refused if r[1] == "POST"]
    assert len(posts) == 2 and all(r[0] == 403 and origin in r[3] for r in posts), refused
    assert [r[:2] for r in refused if r[1] == "OPTIONS"] == [(403, "OPTIONS")], refused
    driver.get_log("browser")  # the failed fetches are logged; they are the point here


def test_a_dns_rebinding_page_gets_403(driver, explorer):
    port = explorer.server_address[1]
    driver.get(f"http://{REBIND_HOST}:{port}/")
    text = driver.find_element("tag name", "body").text
    assert f"refused: Host '{REBIND_HOST}:{port}'" in text
    assert driver.execute_script("return typeof window.attnkit") == "undefined"  # no page
    status = driver.execute_script(
        "return fetch('/api/mask', {method: 'POST', body: '{}'}).then(r => r.status)")
    assert status == 403
    driver.get_log("browser")


def test_its_own_page_still_works(driver, explorer):
    driver.get(explorer.url)
    status = driver.execute_script(
        "return fetch('api/mask', {method: 'POST', headers: {'Content-Type': "
        "'application/json'}, body: '{\"T\": 8}'}).then(r => r.status)")
    assert status == 200
