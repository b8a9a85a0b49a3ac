"""Who may drive the explorer (Host, Origin) and how much one request may cost, checked on a
real server with raw HTTP requests; the cross-site browser test is in
``test_explore_browser_security.py``."""

import http.client
import json

import pytest

from attnkit.apps.explore import guard
from attnkit.apps.explore.server import HOST, make_server, serve_in_thread


@pytest.fixture(scope="module")
def server():
    srv = make_server(0)  # no models needed: the refusals come first
    serve_in_thread(srv)
    yield srv
    srv.shutdown()
    srv.server_close()


def request(srv, method, path, body=None, headers=None):
    """``(status, json body)``; ``Host`` is sent exactly as given (or left out when None)."""
    conn = http.client.HTTPConnection(HOST, srv.server_address[1], timeout=30)
    headers = dict(headers or {})
    skip = "Host" in headers
    try:
        conn.putrequest(method, path, skip_host=skip, skip_accept_encoding=True)
        if skip and headers["Host"] is not None:
            conn.putheader("Host", headers["Host"])
        headers.pop("Host", None)
        body = body if body is not None else b""
        if method == "POST":
            headers.setdefault("Content-Length", str(len(body)))
        for name, value in headers.items():
            conn.putheader(name, value)
        conn.endheaders(body or None)
        response = conn.getresponse()
        return response.status, json.loads(response.read() or b"null")
    finally:
        conn.close()


def test_own_hosts_are_served(server):
    port = server.server_address[1]
    for host in (f"127.0.0.1:{port}", f"localhost:{port}", f"LocalHost:{port}"):
        status, data = request(server, "POST", "/api/mask", b'{"T": 4}', {"Host": host})
        assert status == 200 and data["T"] == 4, host


@pytest.mark.parametrize("host", ["attacker.example", "attacker.example:{port}",
                                  "127.0.0.1", "localhost:1", "127.0.0.1:{port}.evil.test",
                                  "[::1]:{port}", "0.0.0.0:{port}", None])
@pytest.mark.parametrize("method", ["GET", "POST"])
def test_foreign_host_gets_403_with_one_line(server, host, method):
    port = server.server_address[1]
    value = None if host is None else host.format(port=port)
    path = "/" if method == "GET" else "/api/mask"
    status, data = request(server, method, path, b"{}" if method == "POST" else None,
                           {"Host": value})
    assert status == 403
    assert data["error"].startswith("refused: ") and "\n" not in data["error"]
    assert f"127.0.0.1:{port} or localhost:{port}" in data["error"]
    assert server.refusals[-1][:2] == (403, method)


@pytest.mark.parametrize("origin", ["http://attacker.example", "null",
                                    "http://127.0.0.1:1", "https://127.0.0.1:{port}",
                                    "http://localhost:{port}.attacker.example"])
def test_post_from_a_foreign_origin_is_refused(server, origin):
    port = server.server_address[1]
    status, data = request(server, "POST", "/api/mask", b"{}",
                           {"Origin": origin.format(port=port)})
    assert status == 403 and "refused: a POST from origin" in data["error"]


def test_post_from_its_own_origin_or_without_origin_is_served(server):
    port = server.server_address[1]
    for headers in ({"Origin": f"http://127.0.0.1:{port}"},
                    {"Origin": f"http://localhost:{port}"}, {}):
        status, _ = request(server, "POST", "/api/mask", b"{}", headers)
        assert status == 200, headers


@pytest.mark.parametrize("payload, message", [
    ({"T": 4096, "S": 4097}, "too large: T x S = 4096 x 4097"),
    ({"T": "4097", "S": 4096}, "too large"),
    ({"T": 4096, "block_q": 1, "block_k": 64}, "too many blocks: 4096/1 x 4096/64"),
    ({"T": 4096, "block_q": 8, "block_k": 4096}, "4096/8 x 4096/64 gives 32768 tiles"),
    ({"T": 256, "block_q": 1, "block_k": 1}, "at most 16384 (128 x 128)"),
])
def test_oversized_mask_requests_get_400(server, payload, message):
    status, data = request(server, "POST", "/api/mask", json.dumps(payload).encode())
    assert status == 400 and message in data["error"]
    assert server.refusals[-1][0] == 400


def test_oversized_gpt_prompt_gets_400_before_any_model_loads(server):
    prompt = "x" * (guard.MAX_GPT_TOKENS + 1)
    status, data = request(server, "POST", "/api/gpt", json.dumps({"prompt": prompt}).encode())
    assert status == 400
    assert data["error"] == (f"too long: the prompt has {guard.MAX_GPT_TOKENS + 1} characters "
                             f"(tokens); one request may ask for at most {guard.MAX_GPT_TOKENS}")


def test_the_largest_allowed_mask_is_served(server):
    status, data = request(server, "POST", "/api/mask",
                           b'{"T": 4096, "S": 4096, "causal": true}')
    assert status == 200 and data["pattern"] is None and data["blocks"]


def test_guard_functions_directly():
    assert guard.host_refusal("127.0.0.1:80", 80) is None
    assert guard.host_refusal("localhost:8080", 80).startswith("refused: Host 'localhost:8080'")
    assert guard.origin_refusal(None, 80) is None
    assert guard.origin_refusal("http://localhost:80", 80) is None
    assert guard.cost_refusal("/api/mask", {"T": "bad"}) is None  # the view names bad values
    assert guard.cost_refusal("/api/tutorial", {"sentence": "x" * 10_000}) is None
