"""attnkit.widgets in Python: the views' data, the kernel's side of the widget protocol
(requests, errors, PNG export), the static HTML copy, and heads() on any weights.
The JavaScript side runs in chromium in test_widgets_browser.py."""

import base64
import re

import pytest
import torch

from attnkit import widgets
from attnkit.apps import walkthrough
from attnkit.apps.explore import scripts
from attnkit.apps.explore.model_view import MAX_HEAD_CELLS, heads_view
from attnkit.apps.explore.mask_view import mask_view

from _explore_models import save_tiny_models

pytest.importorskip("anywidget", reason="the notebook extra: pip install -e '.[notebook]'")

PNG = b"\x89PNG\r\n\x1a\n" + b"\0" * 32


def causal_weights(L=2, H=3, T=7, seed=0):
    torch.manual_seed(seed)
    scores = torch.randn(L, H, T, T).masked_fill(torch.ones(T, T).triu(1).bool(), -torch.inf)
    return torch.softmax(scores, dim=-1)  # (L, H, T, T)


class Sent(list):
    """What a widget sends to its front end."""


@pytest.fixture
def sent(monkeypatch):
    messages = Sent()
    monkeypatch.setattr(widgets.Widget, "send", lambda self, msg, buffers=None:
                        messages.append(msg))
    return messages


def test_tutorial_widget_holds_the_views_data():
    w = widgets.tutorial()
    assert isinstance(w, widgets.Widget) and w.views == ["tutorial"] and w.view == "tutorial"
    checks = w.data["tutorial"]["checks"]
    assert len(checks) == len(walkthrough.PUBLISHED) and all(c["ok"] for c in checks)
    assert w.params == {"tutorial": {"sentence": walkthrough.SENTENCE}}
    assert "export default { render };" in w._esm and "function attnkitExplorer" in w._esm


def test_a_request_from_the_front_end_is_answered_and_kept(sent):
    w = widgets.tutorial(language="zh")
    w._on_message(w, {"type": "request", "id": 7, "view": "tutorial",
                      "params": {"sentence": "attention is all you need"}, "lang": "zh"}, [])
    assert sent == [{"type": "response", "id": 7, "view": "tutorial"}]
    assert w.data["tutorial"]["tokens"] == "attention is all you need".split()
    assert w.params["tutorial"] == {"sentence": "attention is all you need"}
    w._on_message(w, {"type": "request", "id": 8, "view": "tutorial",
                      "params": {"sentence": " "}, "lang": "zh"}, [])
    assert sent[-1]["id"] == 8 and "句子" in sent[-1]["error"]  # in the widget's language
    assert w.data["tutorial"]["tokens"] == "attention is all you need".split()  # unchanged


def test_requests_over_the_cost_caps_and_bad_views_are_refused(sent):
    w = widgets.mask(32)
    w._on_message(w, {"type": "request", "id": 1, "view": "mask",
                      "params": {"T": 4096, "S": 8192}, "lang": "en"}, [])
    assert "cells" in sent[-1]["error"] and w.data["mask"]["T"] == 32
    w._on_message(w, {"type": "request", "id": 2, "view": "nope", "params": {}}, [])
    assert sent[-1]["error"] == ("view must be one of tutorial, mask, translate, gpt; "
                                 "got 'nope'")
    w._on_message(w, {"type": "request", "id": 3, "view": "mask", "params": [1]}, [])
    assert sent[-1]["error"] == "the request's params must be a JSON object"


def test_save_png_writes_what_the_front_end_sends(sent, tmp_path, capsys):
    w = widgets.mask(16)
    target = w.save_png(tmp_path / "sub" / "mask.png")
    assert sent[-1] == {"type": "export", "id": 1, "view": "mask"}
    data = "data:image/png;base64," + base64.b64encode(PNG).decode()
    w._on_message(w, {"type": "png", "id": 1, "view": "mask", "data": data}, [])
    assert target.read_bytes() == PNG and w.saved == [target]
    w.save_png(tmp_path / "bad.png")
    w._on_message(w, {"type": "png", "id": 2, "data": "data:image/png;base64,!!"}, [])
    w.save_png(tmp_path / "err.png")
    w._on_message(w, {"type": "png", "id": 3, "error": "nothing to save yet"}, [])
    err = capsys.readouterr().err
    assert "the front end sent no PNG" in err and "no PNG: nothing to save yet" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["sub"]


def test_mask_widget_takes_the_explorers_choices():
    w = widgets.mask(40, window=(7, 0), documents=[16, 24], block_q=8, block_k=8)
    params = w.params["mask"]
    assert params["window_on"] and params["window_left"] == 7 and params["documents"] == "16,24"
    assert w.data["mask"] == mask_view(params)
    assert "masks.sliding_window(left=7, right=0)" in w.data["mask"]["arguments"]
    assert widgets.mask(10, window=4).data["mask"]["arguments"] == \
        "attnkit.attention(q, k, v, mask_mod=masks.causal() & " \
        "masks.sliding_window(left=3, right=0))"
    with pytest.raises(ValueError, match="T must be an integer in"):
        widgets.mask(0)
    with pytest.raises(ValueError, match="cells"):
        widgets.mask(4096, 8192)
    with pytest.raises(ValueError, match=r"language must be one of \['en', 'zh'\], got 'fr'"):
        widgets.mask(8, language="fr")


def test_update_recomputes_from_python():
    w = widgets.tutorial()
    w.update(sentence="one two")
    assert w.data["tutorial"]["tokens"] == ["one", "two"]
    assert w.params["tutorial"] == {"sentence": "one two"}


def test_model_widgets_and_the_explorer(tmp_path):
    translator_dir, gpt_path = save_tiny_models(tmp_path)
    t = widgets.translate("25th of June, 2009", translator_dir=translator_dir)
    assert t.data["translate"]["source"][:4] == ["2", "5", "t", "h"]
    g = widgets.gpt("def f(", checkpoint=gpt_path)
    assert g.data["gpt"]["tokens"] == ["d", "e", "f", "\u2423", "f", "("]
    every = widgets.explorer(translator_dir=translator_dir, checkpoint=tmp_path / "none.pt")
    assert every.views == ["tutorial", "mask", "translate", "gpt"]
    assert "attnkit gpt train" in every.data["gpt"]["error"]  # missing: says how to train
    assert every.data["gpt"]["errors"]["zh"]
    with pytest.raises(Exception, match="attnkit translate train"):
        widgets.translate(translator_dir=tmp_path / "none")


def test_display_data_carries_a_static_copy():
    w = widgets.heads(causal_weights(), list("abcdefg"))
    data, metadata = w._repr_mimebundle_()
    assert "application/vnd.jupyter.widget-view+json" in data
    page = data["text/html"]
    assert page.count("</script") == 1  # no embedded JSON or code closes the element
    assert '<script type="module">' in page and "mount(document.getElementById(" in page
    assert "http://" not in page and "https://" not in page  # works offline
    static = widgets.heads(causal_weights(), list("abcdefg"), static=True)
    assert isinstance(static, widgets.StaticView) and "StaticView of gpt" in repr(static)
    assert static._repr_html_().startswith('<div id="attnkit-')


def test_without_anywidget_the_widgets_are_static(monkeypatch, tmp_path):
    from attnkit.apps.explore import widget as module
    monkeypatch.setattr(module, "HAS_ANYWIDGET", False)
    view = widgets.tutorial("a b")
    assert isinstance(view, widgets.StaticView)
    with pytest.raises(ImportError, match=r'pip install "attnkit\[notebook\]"'):
        widgets.tutorial(static=False)
    path = view.save_html(tmp_path / "t.html")
    text = path.read_text(encoding="utf-8")
    assert text.startswith("<!DOCTYPE html>") and '"sentence": "a b"' in text


def test_heads_view_of_any_weights():
    w = causal_weights(L=2, H=3, T=7)
    data = heads_view(w, list("abcdefg"), layer_labels=[4, 9])
    assert (data["layers"], data["heads"], data["causal"]) == (2, 3, True)
    assert data["layer_labels"] == ["4", "9"] and data["head_labels"] == ["0", "1", "2"]
    stored = torch.frombuffer(bytearray(base64.b64decode(data["weights_u8"])), dtype=torch.uint8)
    torch.testing.assert_close(stored.view(2, 3, 7, 7).float() / 255, w, atol=0.5 / 255, rtol=0)
    # per-layer tuples as transformers returns them, and non-causal weights
    full = torch.softmax(torch.randn(3, 7, 7), dim=-1)
    data = heads_view((full[None], full[None]), list("abcdefg"))
    assert data["layers"] == 2 and data["causal"] is False
    assert heads_view(w[0], list("abcdefg"))["layers"] == 1  # (H, T, T)
    assert heads_view(w[0], [" ", "\n", "ab", "c\nd", "e", "f", "g"])["tokens"][:4] == \
        ["\u2423", "\\n", "ab", "c\\nd"]


@pytest.mark.parametrize("weights, tokens, kwargs, error, match", [
    (torch.rand(2, 4, 5), list("abcd"), {}, ValueError, r"square self-attention .* T = 4 "
                                                         r"queries and S = 5 keys"),
    (torch.rand(2, 4, 4), list("abc"), {}, ValueError, r"one entry per position \(T = 4\), "
                                                       r"got 3"),
    (torch.rand(2, 2, 2, 4, 4), list("abcd"), {}, ValueError, r"pick one sample first"),
    (torch.rand(2, 4, 4) * 3, list("abcd"), {}, ValueError, r"probabilities in \[0, 1\]"),
    (torch.full((2, 4, 4), float("nan")), list("abcd"), {}, ValueError, r"in \[0, 1\]"),
    ("weights", list("abcd"), {}, TypeError, r"weights must be a tensor \(H, T, T\)"),
    ([], list("abcd"), {}, TypeError, r"a non-empty sequence of tensors"),
    (torch.rand(2, 4, 4), "abcd", {}, TypeError, r"tokens must be a sequence of str"),
    (torch.rand(2, 4, 4), list("abcd"), {"head_labels": [1]}, ValueError,
     r"head_labels must have one label per head \(2\), got 1"),
    (torch.rand(1, 1, 0, 0), [], {}, ValueError, r"at least one token"),
])
def test_heads_view_refuses_what_it_cannot_draw(weights, tokens, kwargs, error, match):
    with pytest.raises(error, match=match):
        heads_view(weights, tokens, **kwargs)


def test_heads_view_caps_its_size():
    T = int((MAX_HEAD_CELLS // 2) ** 0.5) + 1
    big = torch.zeros(2, 1, T, T).expand(2, 1, T, T)  # no memory for the values themselves
    with pytest.raises(ValueError, match=rf"2 layers x 1 heads x {T} x {T} tokens = .* "
                                         r"too many to draw \(at most 16,777,216\)"):
        heads_view(big, ["x"] * T)


def test_the_scripts_are_one_function_for_page_and_widget():
    body = scripts.explorer_script()
    assert body.count("function attnkitExplorer(root, options)") == 1
    for name in scripts.SOURCES:
        assert scripts.asset(name).decode() in body
    assert scripts.page_script().startswith(body)
    assert body in scripts.widget_module()
    markup = scripts.markup()
    assert markup.startswith("<header>") and markup.endswith('<div id="tip" hidden></div>')
    assert not re.search(r"<script", markup)
