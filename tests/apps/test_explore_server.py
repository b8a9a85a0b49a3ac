"""The explorer's HTTP server, for real: a server on 127.0.0.1:<ephemeral> in a thread."""

import concurrent.futures
import http.client
import json
import time

import pytest

from attnkit.apps.explore.model_view import Models
from attnkit.apps.explore.server import ASSETS, HOST, MAX_BODY, asset, make_server, page, \
    serve_in_thread

from _explore_models import running_server


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    with running_server(tmp_path_factory.mktemp("explore-server")) as srv:
        yield srv


def request(srv, method, path, body=None, headers=None, timeout=30):
    """``(status, headers, body bytes)`` of one raw request (the path is sent unchanged)."""
    conn = http.client.HTTPConnection(HOST, srv.server_address[1], timeout=timeout)
    try:
        conn.request(method, path, body=body, headers=headers or {})
        response = conn.getresponse()
        return response.status, dict(response.getheaders()), response.read()
    finally:
        conn.close()


def post(srv, path, payload):
    status, _, body = request(srv, "POST", path, json.dumps(payload).encode(),
                              {"Content-Type": "application/json"})
    return status, json.loads(body)


def test_binds_loopback_only(server):
    assert server.server_address[0] == "127.0.0.1"
    assert server.url == f"http://127.0.0.1:{server.server_address[1]}/"


@pytest.mark.parametrize("path", sorted(ASSETS))
def test_serves_the_allow_listed_assets(server, path):
    status, headers, body = request(server, "GET", path)
    name = ASSETS[path][0]
    assert status == 200 and body == (page().encode() if name == "index.html" else asset(name))
    assert headers["Content-Type"] == ASSETS[path][1]


@pytest.mark.parametrize("path", [
    "/../../../../etc/passwd", "/%2e%2e/%2e%2e/etc/passwd", "/..%2f..%2fetc%2fpasswd",
    "/assets/../server.py", "/server.py", "/assets/app.js", "//etc/passwd", "/app.js/../x",
    "/style.css%00.html", "/C:\\Windows\\win.ini", "/~root/.bashrc", "/api/tutorial",
])
def test_path_traversal_and_unknown_paths_are_refused(server, path):
    status, _, body = request(server, "GET", path)
    assert status == 404
    assert b"root:" not in body and b"import" not in body
    assert json.loads(body)["error"].startswith("not found")


def test_bad_json_is_refused_with_400(server):
    for raw in (b"{not json", b"\xff\xfe", b"[1, 2]", b"\"text\""):
        status, _, body = request(server, "POST", "/api/tutorial", raw,
                                  {"Content-Type": "application/json"})
        assert status == 400, raw
        assert "JSON" in json.loads(body)["error"]


def test_bad_requests_get_clear_errors_and_the_server_keeps_going(server):
    status, data = post(server, "/api/tutorial", {"sentence": ""})
    assert status == 400 and "the sentence is empty" in data["error"]
    status, data = post(server, "/api/gpt", {"prompt": "x" * 300})
    assert status == 400 and "300 characters but the model's context is 256" in data["error"]
    status, data = post(server, "/api/nothing", {})
    assert status == 404 and "/api/tutorial" in data["error"]
    status, _, body = request(server, "POST", "/api/tutorial", b"x" * (MAX_BODY + 1))
    assert status == 413
    status, _, body = request(server, "POST", "/api/tutorial", b"{}",
                              {"Content-Length": "nope"})
    assert status == 400
    status, data = post(server, "/api/tutorial", {})  # still serving, default sentence
    assert status == 200 and data["tokens"][0] == "Your"


def test_missing_checkpoint_is_a_message(tmp_path):
    srv = make_server(0, models=Models(tmp_path / "none", tmp_path / "none.pt"))
    serve_in_thread(srv)
    try:
        status, data = post(srv, "/api/translate", {"text": "june 25 2009"})
        assert status == 404 and "no trained translator" in data["error"]
    finally:
        srv.shutdown()
        srv.server_close()


def test_make_server_checks_the_port():
    with pytest.raises(ValueError, match="port must be an int in"):
        make_server(70000)


def test_100_concurrent_requests(server):
    jobs = [("GET", "/explorer.js", None)] * 40 + [("GET", "/", None)] * 20 + \
        [("POST", "/api/tutorial", b'{"sentence": "one two three"}')] * 20 + \
        [("POST", "/api/mask", b'{"T": 64, "window": 8}')] * 20
    started = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(max_workers=100) as pool:
        results = list(pool.map(lambda job: request(server, *job), jobs))
    seconds = time.perf_counter() - started
    assert [status for status, _, _ in results] == [200] * 100
    assert seconds < 60, f"100 requests took {seconds:.1f} s"


def test_input_errors_follow_the_pages_language(server):
    for language, start in (("zh", "句子是空的"), ("en", "the sentence is empty"),
                            ("fr", "the sentence is empty")):
        status, _, body = request(server, "POST", "/api/tutorial", b'{"sentence": ""}',
                                  {"X-Attnkit-Language": language})
        assert status == 400 and json.loads(body)["error"].startswith(start), language
