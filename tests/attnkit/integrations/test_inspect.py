"""attnkit.inspect on tiny random transformers models (built from configs, no downloads).

The weights of the chosen layers and heads equal the ``eager`` model's
``output_attentions`` (same weights): Llama (GQA 4 query heads on 2 key/value heads),
Mistral (sliding window 4, shorter than the input) and gpt-oss (sinks, a window on
alternating layers), on one sequence, a left-padded batch and packed documents.

Two references, because eager itself is not exact: Llama's and Mistral's eager run their
softmax in float32 even for a float64 model (so they agree to float32 round-off only), and
a float64 left-padded batch makes eager NaN (``finfo(float64).min`` becomes ``-inf`` in
that float32 softmax; the NaN of the padded rows then reaches every row of the next
layer). So: eager in float32 with padding (to float32 round-off) and in float64 without;
and the attnkit model's own ``output_attentions`` (its ``math`` backend, the spec) in
float64 with padding, to 1e-12.
"""

import copy
from types import SimpleNamespace

import pytest
import torch

transformers = pytest.importorskip("transformers", minversion="5.0",
                                   reason="needs the hf extra: pip install \"attnkit[hf]\"")
hf = pytest.importorskip("attnkit.integrations.transformers")

import attnkit  # noqa: E402
from attnkit.integrations import transformers_inspect as ti  # noqa: E402
from transformers import (AutoModelForCausalLM, BertConfig, BertForMaskedLM,  # noqa: E402
                          Gemma2Config, GPT2Config, GptOssConfig, LlamaConfig, MistralConfig,
                          Qwen2Config)

COMMON = dict(vocab_size=100, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
              num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)
CONFIGS = {
    "llama": lambda: LlamaConfig(**COMMON),  # GQA: 4 query heads on 2 key/value heads
    "mistral": lambda: MistralConfig(**COMMON, sliding_window=4),
    "gpt_oss": lambda: GptOssConfig(**{**COMMON, "intermediate_size": 32}, head_dim=8,
                                    sliding_window=4, num_local_experts=2,
                                    num_experts_per_tok=1),  # sinks + window
}
# more architectures for the padded batch: softcap, a window on one layer only, GPT-2's own
# attention module, a bidirectional encoder padded on the right
MORE = {
    "gemma2": lambda: Gemma2Config(**COMMON, head_dim=8, sliding_window=4,
                                   attn_logit_softcapping=5.0, query_pre_attn_scalar=8),
    "qwen2": lambda: Qwen2Config(**COMMON, use_sliding_window=True, sliding_window=4,
                                 max_window_layers=1),
    "gpt2": lambda: GPT2Config(vocab_size=100, n_embd=32, n_layer=2, n_head=4, n_positions=128),
    "bert": lambda: BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2,
                               num_attention_heads=4, intermediate_size=64),
}
HEADS = [1, 2]  # one query head on each key/value head (GQA groups of 2)
_CACHE = {}


def models(name, dtype=torch.float32):
    """(eager, attnkit) models with the same random weights, in eval mode."""
    key = (name, dtype)
    if key not in _CACHE:
        torch.manual_seed(0)
        config = {**CONFIGS, **MORE}[name]()
        # gpt-oss' default experts use torch._grouped_mm, which has no float64
        kw = dict(experts_implementation="eager") if name == "gpt_oss" else {}
        build = BertForMaskedLM._from_config if name == "bert" else \
            AutoModelForCausalLM.from_config
        ref = build(copy.deepcopy(config), attn_implementation="eager", **kw).to(dtype).eval()
        ours = build(copy.deepcopy(config), attn_implementation="attnkit", **kw
                     ).to(dtype).eval()
        ours.load_state_dict(ref.state_dict())
        _CACHE[key] = ref, ours
    return _CACHE[key]


def _inputs(B=2, T=12, pad=4):
    ids = torch.randint(0, 100, (B, T), generator=torch.Generator().manual_seed(1))
    attention_mask = torch.ones(B, T, dtype=torch.long)
    attention_mask[B - 1, :pad] = 0  # left padding in the last row
    return ids, attention_mask


def _attentions(model, ids, **kw):
    with torch.no_grad():
        return model(ids, output_attentions=True, **kw).attentions


@pytest.mark.parametrize("name", list(CONFIGS))
def test_float64_equals_eager_output_attentions(name):
    ref, ours = models(name, torch.float64)
    ids, _ = _inputs(pad=0)
    maps = attnkit.inspect(ours, ids, layers=[0, 1], heads=HEADS, dtype=torch.float64)
    expected = _attentions(ref, ids)
    assert maps.layers == (0, 1) and maps.heads == tuple(HEADS)
    for layer in (0, 1):
        for h in HEADS:
            assert maps[layer, h].dtype == torch.float64 and maps[layer, h].shape == (2, 12, 12)
            # eager's float32 softmax (Llama, Mistral) bounds the agreement
            torch.testing.assert_close(maps[layer, h], expected[layer][:, h], rtol=0,
                                       atol=1e-6 if name != "gpt_oss" else 1e-12)


@pytest.mark.parametrize("name", list(CONFIGS) + list(MORE))
def test_padded_batch_equals_eager_on_real_rows(name):
    ref, ours = models(name)
    ids, attention_mask = _inputs()
    if name == "bert":
        attention_mask = attention_mask.flip(1)  # BERT pads on the right
    maps = attnkit.inspect(ours, ids, attention_mask=attention_mask, heads=HEADS)
    expected = _attentions(ref, ids, attention_mask=attention_mask)
    real = attention_mask.bool()
    for layer in (0, 1):
        for h in HEADS:
            got = maps[layer, h]
            torch.testing.assert_close(got[real], expected[layer][:, h][real], rtol=0,
                                       atol=1e-6)
            assert not got[~real.unsqueeze(1).expand_as(got)].any()  # nothing on padding
            if name != "bert":  # a decoder's padded row sees no key: zeros
                assert not got[~real].any()


@pytest.mark.parametrize("name", list(CONFIGS))
def test_float64_left_padded_equals_the_models_own_math_path(name):
    _, ours = models(name, torch.float64)
    ids, attention_mask = _inputs()
    maps = attnkit.inspect(ours, ids, attention_mask=attention_mask, layers=1, heads=HEADS,
                           dtype=torch.float64)
    expected = _attentions(ours, ids, attention_mask=attention_mask)  # attnkit's math backend
    for h in HEADS:
        torch.testing.assert_close(maps[1, h], expected[1][:, h], rtol=1e-12, atol=1e-12)


def test_packed_documents_equal_eager():
    ref, ours = models("mistral")
    ids, _ = _inputs(B=1, pad=0)
    position_ids = torch.tensor([[0, 1, 2, 3, 4, 5, 0, 1, 2, 0, 1, 2]])  # 3 documents
    # transformers reads packed documents from position_ids only without a cache
    kw = dict(position_ids=position_ids, use_cache=False)
    maps = attnkit.inspect(ours, ids, heads=HEADS, **kw)
    expected = _attentions(ref, ids, **kw)
    for layer in (0, 1):
        for h in HEADS:
            torch.testing.assert_close(maps[layer, h], expected[layer][:, h], rtol=0,
                                       atol=1e-6)
    assert not maps[0, 1][0, 6:, :6].any()  # no weight across documents
    assert "document" in maps.layer_info[0]


def test_runs_the_fast_path_once_without_weights(monkeypatch):
    """One forward; the engine is never asked for weights (no math fallback)."""
    _, ours = models("llama")
    calls = []
    real = hf._engine.attention

    def spy(q, k, v, **kw):
        calls.append((kw.get("return_weights"), kw.get("backend")))
        return real(q, k, v, **kw)

    monkeypatch.setattr(hf._engine, "attention", spy)
    ids, attention_mask = _inputs()
    attnkit.inspect(ours, ids, attention_mask=attention_mask, layers=[1], heads=[3])
    assert calls == [(False, "auto")] * 2


def test_keeps_only_the_chosen_layers_and_heads(monkeypatch):
    _, ours = models("llama")
    kept = []
    real = ti._head_weights

    def spy(layer, j, dtype):
        kept.append((tuple(layer.q.shape), tuple(layer.k.shape), layer.kv_of[j]))
        return real(layer, j, dtype)

    monkeypatch.setattr(ti, "_head_weights", spy)
    ids, _ = _inputs()
    maps = attnkit.inspect(ours, ids, layers=1, heads=[3])
    # one chosen head of layer 1 and the one key/value head it reads (3 // 2 = 1)
    assert kept == [((2, 1, 12, 8), (2, 1, 12, 8), 0)]
    assert list(maps._weights) == [(1, 3)]
    assert maps.layer_names[1] == "model.layers.1.self_attn"


@pytest.mark.parametrize("T", [1, 97])
def test_awkward_lengths_and_row_blocks(monkeypatch, T):
    ref, ours = models("gpt_oss")
    ids = torch.randint(0, 100, (1, T), generator=torch.Generator().manual_seed(2))
    whole = attnkit.inspect(ours, ids, heads=HEADS, dtype=torch.float64)
    monkeypatch.setattr(ti, "_BLOCK_BYTES", 8 * 7 * T)  # blocks of 7 rows
    blocked = attnkit.inspect(ours, ids, heads=HEADS, dtype=torch.float64)
    expected = _attentions(ref, ids)
    for layer in (0, 1):
        for h in HEADS:
            torch.testing.assert_close(blocked[layer, h], whole[layer, h], rtol=1e-13,
                                       atol=1e-15)
            torch.testing.assert_close(whole[layer, h].float(), expected[layer][:, h],
                                       rtol=0, atol=1e-6)
            # sinks take a share: every row sums to less than 1
            assert (whole[layer, h].sum(-1) < 1).all()


def test_tokens_from_a_tokenizer_and_figures(tmp_path):
    pytest.importorskip("matplotlib")
    _, ours = models("mistral")
    tokenizer = SimpleNamespace(decode=lambda ids: f"<{ids[0]}>")
    ids, attention_mask = _inputs()
    maps = attnkit.inspect(ours, ids, attention_mask=attention_mask, tokenizer=tokenizer,
                           heads=1)
    assert maps.query_tokens[0][:2] == (f"<{ids[0, 0]}>", f"<{ids[0, 1]}>")
    assert maps.sample(1).query_tokens[0][0] == f"<{ids[1, 4]}>"  # padding dropped
    assert "window(left=3" in maps.layer_info[0]
    path = maps.save(tmp_path / "model.png", sample=1, annotate=False)
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


# --- errors -------------------------------------------------------------------------------

def test_a_model_not_on_attnkit_is_refused():
    ref, _ = models("llama")
    with pytest.raises(ValueError, match="attn_implementation='eager'.*not attnkit's"):
        attnkit.inspect(ref, _inputs()[0])


def test_a_flash_convention_model_is_refused():
    config = CONFIGS["llama"]()
    model = AutoModelForCausalLM.from_config(config, attn_implementation="attnkit_flash")
    with pytest.raises(ValueError, match="flash convention's packed calls"):
        attnkit.inspect(model, _inputs()[0])


def test_not_a_model_is_a_type_error():
    with pytest.raises(TypeError, match="model must be a transformers model"):
        attnkit.inspect(torch.nn.Linear(2, 2), _inputs()[0])


@pytest.mark.parametrize("kw, error, match", [
    (dict(layers=[0, 5]), ValueError, r"layers=\[0, 5\] has \[5\] out of range: the model "
                                      r"has 2 layers \(0..1\)"),
    (dict(layers=-1), ValueError, r"layers=-1 has negative entries \[-1\]"),
    (dict(heads=[4]), ValueError, r"heads=\[4\] has \[4\] out of range: the model has 4 heads"),
    (dict(heads=[]), TypeError, "heads must be a non-empty sequence of ints"),
    (dict(layers="0"), TypeError, "layers must be a non-empty sequence of ints"),
    (dict(layers=1.0), TypeError, "layers must be an int, a sequence of ints or None"),
    (dict(heads=[True]), TypeError, "heads must be a non-empty sequence of ints"),
    (dict(dtype=torch.float16), ValueError, "dtype must be torch.float32 or torch.float64"),
    (dict(dtype="float32"), TypeError, "dtype must be a torch.dtype"),
    (dict(attention_mask=torch.ones(2, 5)), ValueError,
     r"attention_mask must be \(B, T\) = \(2, 12\)"),
])
def test_bad_arguments(kw, error, match):
    _, ours = models("llama")
    with pytest.raises(error, match=match):
        attnkit.inspect(ours, _inputs()[0], **kw)


def test_bad_input_ids():
    _, ours = models("llama")
    with pytest.raises(TypeError, match="input_ids must be an integer tensor"):
        attnkit.inspect(ours, torch.zeros(1, 4))
    with pytest.raises(TypeError, match="input_ids must be an integer tensor"):
        attnkit.inspect(ours, [1, 2, 3])
    with pytest.raises(ValueError, match=r"input_ids must be \(B, T\) or \(T,\)"):
        attnkit.inspect(ours, torch.zeros(1, 2, 3, dtype=torch.long))
    with pytest.raises(ValueError, match=r"input_ids must be \(B, T\) or \(T,\)"):
        attnkit.inspect(ours, torch.zeros(1, 0, dtype=torch.long))


@pytest.mark.parametrize("name", ["cache", "past_key_values"])
def test_a_cache_is_refused(name):
    from transformers import DynamicCache

    _, ours = models("llama")
    with pytest.raises(ValueError, match=f"from the first token, got {name}=; pass the whole"):
        attnkit.inspect(ours, _inputs()[0], **{name: DynamicCache(config=ours.config)})


def test_input_too_long():
    _, ours = models("llama")
    with pytest.raises(ValueError, match="has 129 tokens but the model's "
                                         "max_position_embeddings is 128"):
        attnkit.inspect(ours, torch.zeros(129, dtype=torch.long))


class _OneCall(torch.nn.Module):
    """A stand-in model on attnkit whose forward makes ``calls`` attention calls."""

    def __init__(self, calls):
        super().__init__()
        self.config = SimpleNamespace(_attn_implementation="attnkit", is_encoder_decoder=True)
        self.calls = calls
        self.is_causal = True

    def forward(self, input_ids, attention_mask=None):
        x = torch.randn(1, 2, input_ids.shape[1], 4)
        for _ in range(self.calls):
            hf.attention_forward(self, x, x, x, None)


def test_a_layer_past_the_calls_made_is_named():
    with pytest.raises(ValueError, match=r"layers=\[3\] but the forward made 1 attention "
                                         r"calls \(layers 0..0\)"):
        attnkit.inspect(_OneCall(1), torch.zeros(1, 3, dtype=torch.long), layers=[3])
    maps = attnkit.inspect(_OneCall(1), torch.zeros(1, 3, dtype=torch.long))
    assert maps.layers == (0,) and maps.heads == (0, 1)
    assert maps.layer_info[0].startswith("causal; scale 0.5")


def test_no_attention_call_is_a_runtime_error():
    with pytest.raises(RuntimeError, match="made no attention call through attnkit"):
        attnkit.inspect(_OneCall(0), torch.zeros(1, 3, dtype=torch.long))


def test_a_head_past_the_layers_heads_is_named_and_the_recorder_removed():
    with pytest.raises(ValueError, match=r"heads=\[5\] but layer 0 has 2 query heads"):
        attnkit.inspect(_OneCall(1), torch.zeros(1, 3, dtype=torch.long), heads=[5])
    assert hf.INSPECTOR.get() is None
