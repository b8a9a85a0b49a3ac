"""The explorer's views as data: tutorial numbers, mask patterns and blocks, model views,
the offline export and the command line (no browser, no server)."""

import base64
import contextlib
import io
import re
import socket

import pytest
import torch

from attnkit import cli, explain, masks, tutorial
from attnkit.apps import walkthrough
from attnkit.apps.explore.mask_view import build_mask, mask_view
from attnkit.apps.explore.model_view import ModelMissing, Models, gpt_view, translate_view
from attnkit.apps.explore.server import export_html
from attnkit.apps.explore.tutorial_view import embed, tutorial_view
from attnkit.apps.translate.answer import translate
from attnkit.apps.translate.train import load_translator
from attnkit.backends import chunked
from attnkit.spec import Call, MaskSpec
from attnkit.summary import EMPTY, FULL, PARTIAL

from _explore_models import GPT_CONTEXT, save_tiny_models


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    translator_dir, gpt_path = save_tiny_models(tmp_path_factory.mktemp("explore-models"))
    return Models(translator_dir, gpt_path)


def _close(got, expected, atol=1e-6):
    torch.testing.assert_close(torch.tensor(got, dtype=torch.float64),
                               expected.detach().double(), atol=atol, rtol=0)


# --- tutorial view -------------------------------------------------------------------------

def test_default_sentence_reproduces_the_walkthrough_and_its_published_values():
    view = tutorial_view()
    assert view["tokens"] == walkthrough.TOKENS
    assert [c["name"] for c in view["checks"]] == list(walkthrough.PUBLISHED)
    assert all(c["ok"] for c in view["checks"]), view["checks"]
    inputs = torch.tensor(walkthrough.EMBEDDINGS)
    _close(view["inputs"], inputs)
    _close(view["simple"]["attn_weights"], tutorial.simple_self_attention(inputs)[1])
    assert view["causal"]["max_difference"] < 1e-6
    assert view["causal"]["masked_scores"][0][1:] == [None] * 5  # -inf above the diagonal


def test_other_sentence_matches_the_tutorial_modules():
    view = tutorial_view("the cat sat on the mat")
    inputs = embed(view["tokens"])
    assert view["checks"] == []
    assert torch.equal(inputs[0], inputs[4])  # the same word, the same vector
    torch.manual_seed(123)
    _close(view["trainable"]["context_vecs"], tutorial.SelfAttentionV1(3, 2)(inputs))
    torch.manual_seed(123)
    mha = tutorial.MultiHeadAttention(3, 2, 6, 0.0, num_heads=2)
    out, weights = mha(torch.stack((inputs, inputs)), return_weights=True)
    _close(view["heads"]["mha"], out[0])
    _close(view["heads"]["mha_weights"], weights[0])
    dropped = torch.tensor(view["causal"]["dropped"])
    assert set(dropped.flatten().tolist()) - {0.0} and (dropped.sum(-1) >= 0).all()


def test_seeded_steps_leave_the_global_generator_alone():
    torch.manual_seed(5)
    expected = torch.rand(3)
    torch.manual_seed(5)
    tutorial_view("one two three")
    assert torch.equal(torch.rand(3), expected)


@pytest.mark.parametrize("sentence, error, match", [
    ("   ", ValueError, "the sentence is empty"),
    (" ".join(["w"] * 17), ValueError, "17 words; at most 16"),
    ("a " + "x" * 30, ValueError, "30 characters; at most 24"),
    ("bad\x07word", ValueError, "unprintable character"),
    (42, TypeError, "sentence must be a str, got int"),
])
def test_tutorial_view_errors(sentence, error, match):
    with pytest.raises(error, match=match):
        tutorial_view(sentence)


# --- mask view ----------------------------------------------------------------------------

def test_causal_pattern_blocks_and_explain():
    view = mask_view({"T": 8, "S": 8, "causal": True, "block_q": 4, "block_k": 4})
    assert view["pattern"][0] == "10000000" and view["pattern"][7] == "1" * 8
    assert view["blocks"] == ["ps", "fp"]  # the block above the diagonal is never computed
    q = torch.zeros(1, 1, 8, 8)
    assert view["explain"]["chosen"] == explain(q, q, q, causal=True).chosen
    assert view["arguments"] == "attnkit.attention(q, k, v, mask_mod=masks.causal())"
    bottom_right = mask_view({"T": 2, "S": 6, "causal": True, "align": "bottom_right"})
    assert bottom_right["pattern"] == ["111110", "111111"]
    assert bottom_right["describe"] == "causal(offset=4)"


def test_window_padding_and_documents_are_descriptions_the_engine_skips():
    view = mask_view({"T": 12, "S": 12, "window": 3, "block_q": 4, "block_k": 4})
    assert view["pattern"][6] == "000011100000"
    assert view["blocks"][2] == "spp" and view["blocks"][0] == "pss"
    docs = mask_view({"T": 8, "documents": "4,4", "valid_keys": 7, "block_q": 4, "block_k": 4})
    assert docs["pattern"][0] == "11110000" and docs["pattern"][5] == "00001110"
    assert docs["blocks"] == ["fs", "sp"]  # other documents' blocks are skipped now
    assert docs["arguments"] == ("attnkit.attention(q, k, v, mask_mod=masks.documents("
                                 "cu_seqlens=[0, 4, 8], causal=False) & masks.key_padding("
                                 "torch.arange(8)[None] < 7))")
    assert docs["describe"] == "same_document(B=1) & key_padding"
    big = mask_view({"T": 4096, "window": 256})
    assert big["pattern"] is None and big["explain"]["chosen"] == "chunked"
    assert big["explain"]["reason"] and "sdpa" in big["explain"]["rejected"]
    assert big["tile_k"] == chunked.FINE and big["visited_fraction"] < 0.2


# Every kind of attnkit.masks, alone and combined, with the description it must build.
KIND_CASES = [
    ({"causal": True}, masks.causal()),
    ({"causal": True, "align": "bottom_right", "S": 24}, masks.causal(align="bottom_right")),
    ({"causal": True, "causal_offset": -3}, masks.causal(offset=-3)),
    ({"window_on": True, "window_left": 2, "window_right": 1}, masks.sliding_window(2, 1)),
    ({"window_on": True, "window_left": "", "window_right": 2}, masks.sliding_window(None, 2)),
    ({"valid_keys": 11}, masks.key_padding(torch.arange(16).unsqueeze(0) < 11)),
    ({"documents": "5,3,8"}, masks.documents(cu_seqlens=[0, 5, 8, 16], causal=False)),
    ({"prefix": 5}, masks.prefix_lm(5)),
    ({"chunk": 6}, masks.chunked_local(6, causal=False)),
    ({"causal": True, "documents": "5,3,8", "valid_keys": 14},
     masks.documents(cu_seqlens=[0, 5, 8, 16]) & masks.key_padding(torch.arange(16)[None] < 14)),
    ({"causal": True, "window_on": True, "window_left": 3, "chunk": 8, "combine": "or"},
     masks.causal() | masks.sliding_window(3, 0) | masks.chunked_local(8, causal=False)),
    ({"window_on": True, "window_left": 1, "window_right": 1, "prefix": 3, "combine": "or",
      "valid_keys": 15}, (masks.sliding_window(1, 1) | masks.prefix_lm(3))
     & masks.key_padding(torch.arange(16)[None] < 15)),
    ({"causal": True, "chunk": 4, "align": "bottom_right", "S": 20},
     masks.causal(align="bottom_right") & masks.chunked_local(4, causal=False,
                                                             align="bottom_right")),
]


@pytest.mark.parametrize("choices, expected", KIND_CASES)
@pytest.mark.parametrize("block_q, block_k", [(4, 4), (3, 5), (8, 128)])
def test_every_kind_matches_the_engine_pattern_and_block_summary(choices, expected, block_q,
                                                                 block_k):
    params = {"T": 16, **choices, "block_q": block_q, "block_k": block_k}
    view = mask_view(params)
    T, S = view["T"], view["S"]
    spec = MaskSpec(mask_mod=expected)
    truth = spec.dense(T, S).expand(1, 1, T, S)[0, 0]  # (T, S)
    assert view["pattern"] == ["".join("1" if c else "0" for c in row) for row in truth.tolist()]
    q, k = torch.zeros(1, 1, T, 8), torch.zeros(1, 1, S, 8)
    tile_k = min(chunked.FINE, block_k)
    summary = Call.of(q, k, spec, False).summary(block_q, tile_k)  # what chunked plans
    codes = {EMPTY: "s", PARTIAL: "p", FULL: "f"}
    assert ["".join(codes[c] for c in row) for row in summary.kind.tolist()] == \
        [row.replace("e", "p") for row in view["blocks"]]
    assert view["counts"] == summary.counts()
    for i, row in enumerate(view["blocks"]):  # the map never claims what the cells deny
        for j, code in enumerate(row):
            cells = truth[i * block_q:(i + 1) * block_q, j * tile_k:(j + 1) * tile_k]
            assert {"s": not cells.any(), "e": not cells.any(), "f": cells.all(),
                    "p": True}[code], (i, j, code)
    assert view["explain"]["chosen"] == explain(q, k, k, mask_mod=expected).chosen


@pytest.mark.parametrize("params, error, match", [
    ({"T": 0}, ValueError, r"T must be an integer in \[1, 4096\], got 0"),
    ({"T": "lots"}, ValueError, "T must be an integer"),
    ({"align": "middle"}, ValueError, "align must be 'top_left' or 'bottom_right'"),
    ({"combine": "xor"}, ValueError, "combine must be 'and' or 'or', got 'xor'"),
    ({"T": 8, "documents": "4,3"}, ValueError, "add up to S=8"),
    ({"T": 8, "documents": "4,x"}, ValueError, "lengths separated by commas"),
    ({"T": 4, "S": 8, "documents": "8"}, ValueError, "documents need T == S"),
    ({"T": 4, "valid_keys": 9}, ValueError, "valid_keys must be an integer in"),
    ({"window_on": True, "window_left": -2}, ValueError, "window_left must be an integer"),
    ({"causal": True, "causal_offset": "x"}, ValueError, "causal_offset must be an integer"),
    ({"T": 8, "prefix": 9}, ValueError, r"prefix must be an integer in \[0, 8\]"),
    ({"chunk": -1}, ValueError, "chunk must be an integer"),
])
def test_mask_errors(params, error, match):
    with pytest.raises(error, match=match):
        mask_view(params)


def test_build_mask_needs_a_dict():
    with pytest.raises(TypeError, match="must be a JSON object, got list"):
        build_mask([])


# --- model views --------------------------------------------------------------------------

def test_translate_view_refuses_a_wrong_answer_but_shows_the_attention(models):
    view = translate_view(models, " June 25, 2009 ")
    model = load_translator(models.translator_dir)
    with pytest.raises(ValueError, match="the model answered") as refusal:
        translate(model, " June 25, 2009 ")  # the tiny untrained model is wrong
    assert view["answer"] is None and view["refused"] == str(refusal.value)
    weights = torch.tensor(view["weights"])  # (L, H, 10, S)
    assert weights.shape == (2, 2, 10, len("june 25, 2009"))
    torch.testing.assert_close(weights.sum(-1), torch.ones(2, 2, 10), atol=1e-3, rtol=0)
    assert view["source"][4] == "\u2423"  # spaces made visible


def test_translate_view_gives_a_right_answer(models, monkeypatch):
    model = load_translator(models.translator_dir)
    monkeypatch.setattr(model, "greedy_decode", _decoding_to("2009-06-25", model.greedy_decode))
    monkeypatch.setattr(models, "translator", lambda: model)
    view = translate_view(models, "june 25 2009")
    assert view["answer"] == "2009-06-25" and view["refused"] is None


def _decoding_to(answer, greedy_decode):
    """greedy_decode whose tokens spell ``answer`` (the attention weights stay the model's)."""
    from attnkit.apps.translate.train import TARGET_VOCAB

    def decode(src, *args, **kwargs):
        tokens, *rest = greedy_decode(src, *args, **kwargs)
        return (torch.tensor([TARGET_VOCAB.encode(answer)] * src.shape[0]), *rest)
    return decode


def test_translate_view_shows_translate_errors(models):
    with pytest.raises(ValueError, match="not a real date"):
        translate_view(models, "february 30 2020")
    with pytest.raises(ValueError, match="the input is empty"):
        translate_view(models, "  ")
    with pytest.raises(ValueError, match="not in the vocabulary"):
        translate_view(models, "june 25 2009 \u20ac")
    with pytest.raises(TypeError, match="text must be a str"):
        translate_view(models, None)


def test_gpt_view_weights_round_trip(models):
    prompt = "attention is all you need. " * 8  # 216 characters
    view = gpt_view(models, prompt)
    model, vocab = models.gpt()
    _, weights = model(torch.tensor([vocab.encode(prompt)]), need_weights=True)
    expected = torch.stack([w[0] for w in weights])  # (L, H, T, T)
    raw = torch.tensor(list(base64.b64decode(view["weights_u8"])), dtype=torch.float32)
    got = raw.view(view["layers"], view["heads"], len(prompt), len(prompt)) / 255
    torch.testing.assert_close(got, expected, atol=0.5 / 255 + 1e-6, rtol=0)
    assert view["context"] == GPT_CONTEXT and len(view["tokens"]) == 216


@pytest.mark.parametrize("prompt, match", [
    ("", "the prompt is empty"),
    ("caf\u00e9 \u2603", r"2 character\(s\) the model never saw in training: '\u00e9', '\u2603'"),
    ("a" * (GPT_CONTEXT + 1), f"{GPT_CONTEXT + 1} characters but the model's context is "
                              f"{GPT_CONTEXT}"),
])
def test_gpt_view_errors(models, prompt, match):
    with pytest.raises(ValueError, match=match):
        gpt_view(models, prompt)


def test_missing_checkpoints_say_how_to_train(tmp_path):
    models = Models(tmp_path / "none", tmp_path / "none" / "gpt.pt")
    with pytest.raises(ModelMissing, match="attnkit translate train --out"):
        translate_view(models, "june 25 2009")
    with pytest.raises(ModelMissing, match="attnkit gpt train --out"):
        gpt_view(models, "abc")
    (tmp_path / "bad.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(ModelMissing, match="cannot load"):
        gpt_view(Models(tmp_path, tmp_path / "bad.pt"), "abc")


# --- export and command line --------------------------------------------------------------

def test_export_is_self_contained(models, tmp_path):
    path = tmp_path / "explore.html"
    assert export_html(path, models) == {"tutorial": None, "mask": None, "translate": None,
                                         "gpt": None}
    page = path.read_text(encoding="utf-8")
    assert not re.search(r"<(script|link)[^>]+(src|href)=\"(?!data:)", page)  # all inlined
    assert "http://" not in page and "https://" not in page
    assert "window.ATTNKIT_OFFLINE" in page and "Your journey starts" in page
    assert "window.ATTNKIT_I18N" in page
    assert "没有可训练权重的简单自注意力机制" in page  # the zh catalogue
    assert page.count("</script>") == 3  # words + data + explorer.js: no JSON closes its element


def _run(*argv):
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = cli.main(["explore", *argv])
    return code, out.getvalue(), err.getvalue()


def test_cli_export_and_usage_errors(tmp_path):
    code, out, _ = _run("--export", str(tmp_path / "e.html"), "--translator",
                        str(tmp_path / "none"), "--gpt", str(tmp_path / "none.pt"))
    assert code == 0 and out.startswith(f"wrote {tmp_path / 'e.html'}; without the views of")
    assert "attnkit translate train" in out and (tmp_path / "e.html").stat().st_size > 10_000
    code, _, err = _run("--export", str(tmp_path / "missing" / "e.html"))
    assert code == 2 and err.count("\n") == 1 and "does not exist" in err
    code, _, err = _run("--port", "70000")
    assert code == 2 and "--port must be in [0, 65535], got 70000" in err
    code, _, err = _run("--port", "x")
    assert code == 2 and "invalid int value" in err


def test_cli_busy_port_is_one_line(tmp_path):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        code, _, err = _run("--port", str(busy.getsockname()[1]))
    assert code == 1 and err.count("\n") == 1
    assert "cannot listen on 127.0.0.1:" in err and "--port 0" in err
