"""attnkit.widgets in real chromium (conftest.driver).

1. The live widget: its ES module loaded the way anywidget loads it (a Blob URL import),
   rendered with a stand-in for anywidget's model whose messages reach the real Python
   handler (Widget._on_message) and come back: typing, errors, PNG export.
2. The static copy: a notebook with widgets, executed in a real kernel (nbclient) and
   exported to HTML (nbconvert), opened offline: no console errors, every view drawn.
"""

import base64
import functools
import http.server
import json
import threading

import pytest
import torch

from attnkit import widgets
from attnkit.apps import walkthrough

from _browser import severe
from _kernel import started_kernel

pytest.importorskip("anywidget", reason="the notebook extra: pip install -e '.[notebook]'")
nbformat = pytest.importorskip("nbformat", reason="the notebook extra")
nbclient = pytest.importorskip("nbclient", reason="the notebook extra")
nbconvert = pytest.importorskip("nbconvert", reason="the notebook extra")
pytest.importorskip("selenium.webdriver", reason="selenium is not installed")
from selenium.webdriver.support.ui import WebDriverWait  # noqa: E402

HOST = """<!DOCTYPE html><html><head><meta charset="utf-8"><title>anywidget host</title>
<link rel="icon" href="data:,"></head>
<body><div id="cell"></div><script type="module">
// A stand-in for anywidget's model: get/on/off/send, and the test's hooks.
const state = %(state)s, listeners = {};
window.sent = [];
const model = {
  get: (name) => state[name],
  on: (event, fn) => { (listeners[event] = listeners[event] || []).push(fn); },
  off: (event, fn) => { listeners[event] = (listeners[event] || []).filter((f) => f !== fn); },
  send: (msg) => { window.sent.push(msg); },
};
// What the kernel's answer does: new traits first, then the custom message.
window.deliver = (traits, msg) => {
  Object.assign(state, traits);
  if ("data" in traits) for (const fn of listeners["change:data"] || []) fn();
  if (msg) for (const fn of listeners["msg:custom"] || []) fn(msg);
};
const url = URL.createObjectURL(new Blob([%(esm)s], { type: "text/javascript" }));
const module = await import(url);  // as anywidget imports a widget's _esm
module.default.render({ model, el: document.getElementById("cell") });
window.ready = true;
</script></body></html>"""

# Counts the canvases and svgs of every attnkit widget on the page (shadow roots included),
# and how many canvases have a pixel that is not white (something was drawn).
DRAWN = """
const hosts = [...document.querySelectorAll(".attnkit-widget")];
return hosts.map((host) => {
  const root = host.shadowRoot, canvases = [...root.querySelectorAll("canvas")];
  const inked = canvases.filter((c) => {
    const px = c.getContext("2d").getImageData(0, 0, c.width, c.height).data;
    for (let i = 0; i < px.length; i += 4) if (px[i] < 240 || px[i + 1] < 240) return true;
    return false;
  }).length;
  const shown = [...root.querySelectorAll(".view")].filter((v) => !v.hidden).map((v) => v.id);
  return { canvases: canvases.length, inked, shown,
           errors: [...root.querySelectorAll(".error")].filter((e) => !e.hidden)
                     .map((e) => e.textContent) };
});"""


class _Quiet(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


@pytest.fixture(scope="module")
def web(tmp_path_factory):
    """A static file server on 127.0.0.1 for the pages these tests write."""
    folder = tmp_path_factory.mktemp("widget-pages")
    (folder / "favicon.ico").write_bytes(b"")  # what a browser asks for on its own
    handler = functools.partial(_Quiet, directory=str(folder))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield folder, f"http://127.0.0.1:{server.server_address[1]}/"
    server.shutdown()
    server.server_close()


def _host(driver, web, widget, name):
    folder, url = web
    state = {key: getattr(widget, key) for key in ("data", "params", "views", "view", "language")}
    (folder / name).write_text(HOST % {"state": json.dumps(state), "esm": json.dumps(widget._esm)},
                               encoding="utf-8")
    driver.get(url + name)
    WebDriverWait(driver, 30).until(lambda d: d.execute_script("return window.ready === true"))
    return driver.execute_script(DRAWN)


def _shadow(driver, script):
    return driver.execute_script(
        "const root = document.querySelector('.attnkit-widget').shadowRoot;" + script)


def _round_trip(driver, widget, monkeypatch):
    """Hand the front end's messages to the Python widget and its answers back."""
    answers = []
    monkeypatch.setattr(widget, "send", lambda msg, buffers=None: answers.append(msg))
    WebDriverWait(driver, 10).until(lambda d: d.execute_script("return window.sent.length > 0"))
    for msg in driver.execute_script("const s = window.sent; window.sent = []; return s;"):
        widget._on_message(widget, msg, [])
    for answer in answers:
        driver.execute_script("window.deliver(arguments[0], arguments[1])",
                              {"data": widget.data, "params": widget.params}, answer)
    return answers


def test_live_widget_draws_and_asks_the_kernel(driver, web, monkeypatch):
    widget = widgets.tutorial()
    [drawn] = _host(driver, web, widget, "tutorial.html")
    assert drawn["shown"] == ["view-tutorial"] and drawn["errors"] == []
    assert drawn["canvases"] >= 20 and drawn["inked"] == drawn["canvases"]
    assert _shadow(driver, "return root.querySelector('nav').hidden") is True  # one view
    row = _shadow(driver, "return root.querySelector('[data-key=\"simple.attn_weights.q\"]')"
                          ".textContent")
    assert "[" + ", ".join(f"{v:.4f}" for v in walkthrough.PUBLISHED["attn_weights_2"]) + "]" \
        in row
    # the learner types a sentence: the kernel computes it, the widget draws it
    _shadow(driver, "root.getElementById('sentence').value = 'attention is all you need';"
                    "root.querySelector('#tutorial-form button[type=submit]').click();")
    answers = _round_trip(driver, widget, monkeypatch)
    assert answers == [{"type": "response", "id": 1, "view": "tutorial"}]
    WebDriverWait(driver, 10).until(lambda d: _shadow(d, "return root.host.attnkit.pending") == 0)
    tokens = _shadow(driver, "return [...root.querySelectorAll('.tokens button')]"
                             ".map((b) => b.textContent)")
    assert tokens == "attention is all you need".split()
    # a sentence the view refuses: the kernel's message, shown where the page shows errors
    _shadow(driver, "root.getElementById('sentence').value = '';"
                    "root.querySelector('#tutorial-form button[type=submit]').click();")
    _round_trip(driver, widget, monkeypatch)
    WebDriverWait(driver, 10).until(lambda d: _shadow(
        d, "return !root.getElementById('tutorial-error').hidden"))
    assert "sentence" in _shadow(driver, "return root.getElementById('tutorial-error').textContent")
    assert severe(driver) == []


def test_live_widget_exports_a_png_to_python(driver, web, monkeypatch, tmp_path):
    torch.manual_seed(0)
    weights = torch.softmax(torch.randn(2, 4, 24, 24), dim=-1)  # (L, H, T, T), not causal
    widget = widgets.heads(weights, [f"t{i}" for i in range(24)], layer_labels=[5, 11])
    [drawn] = _host(driver, web, widget, "heads.html")
    assert drawn["shown"] == ["view-gpt"] and drawn["canvases"] == 2 == drawn["inked"]
    hidden = _shadow(driver, "return [...root.querySelectorAll('#gpt-form label, "
                             "#gpt-form button')].map((n) => n.hidden)")
    assert hidden == [True, True, False]  # no prompt for weights; the PNG button stays
    assert _shadow(driver, "return root.getElementById('gpt-layer').options[1].textContent") \
        == "11"
    monkeypatch.setattr(widget, "send", lambda msg, buffers=None: None)
    target = widget.save_png(tmp_path / "heads.png")
    driver.execute_script("window.deliver({}, arguments[0])",
                          {"type": "export", "id": 1, "view": "gpt"})
    [reply] = driver.execute_script("return window.sent")
    widget._on_message(widget, reply, [])
    png = target.read_bytes()
    assert png.startswith(b"\x89PNG") and len(png) > 5_000 and widget.saved == [target]
    assert severe(driver) == []


def test_exported_notebook_shows_every_widget_offline(driver, web, tmp_path_factory):
    """The static copy in a widget's display data is what nbconvert's HTML shows."""
    nb = nbformat.v4.new_notebook()
    nb.cells = [nbformat.v4.new_code_cell(source) for source in (
        "import torch\nfrom attnkit import widgets",
        "widgets.tutorial('attention is all you need')",
        "widgets.mask(48, window=(7, 0), prefix_lm=4, block_q=8, block_k=8)",
        "torch.manual_seed(0)\n"
        "weights = torch.softmax(torch.randn(2, 3, 9, 9).masked_fill(\n"
        "    torch.ones(9, 9).triu(1).bool(), -torch.inf), dim=-1)  # (L, H, T, T)\n"
        "widgets.heads(weights, 'the cat sat on the mat and then slept'.split())",
    )]
    with started_kernel(tmp_path_factory.mktemp("kernels")) as km:
        # No saved widget state: with it, nbconvert would load the widget manager from a
        # CDN (online) instead of the static copy.
        nbclient.NotebookClient(nb, km=km, timeout=120, store_widget_state=False).execute()
    outputs = [o for c in nb.cells for o in c.outputs if o["output_type"] == "execute_result"]
    assert len(outputs) == 3
    assert all("application/vnd.jupyter.widget-view+json" in o["data"] and
               "text/html" in o["data"] for o in outputs)
    # nbconvert's page would fetch MathJax and require.js from a CDN: none here (offline).
    exporter = nbconvert.HTMLExporter(mathjax_url="data:text/javascript,",
                                      require_js_url="data:text/javascript,")
    body, _ = exporter.from_notebook_node(nb)
    folder, url = web
    (folder / "exported.html").write_text(body, encoding="utf-8")
    driver.get(url + "exported.html")
    WebDriverWait(driver, 30).until(lambda d: d.execute_script(
        "return document.querySelectorAll('.attnkit-widget').length") == 3)
    drawn = driver.execute_script(DRAWN)
    assert [d["shown"] for d in drawn] == [["view-tutorial"], ["view-mask"], ["view-gpt"]]
    for d in drawn:
        assert d["errors"] == [] and d["canvases"] >= 2 and d["inked"] == d["canvases"], d
    explain = driver.execute_script("return document.querySelectorAll('.attnkit-widget')[1]"
                                    ".shadowRoot.getElementById('explain-text').textContent")
    assert "masks.prefix_lm(4)" in explain and "auto -> " in explain
    assert severe(driver) == []
    png = driver.execute_script("return document.querySelectorAll('.attnkit-widget')[2]"
                                ".attnkit.exportPNG('gpt')")
    assert base64.b64decode(png.split(",", 1)[1]).startswith(b"\x89PNG")
