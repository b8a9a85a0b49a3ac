"""transformers models on attnkit: tiny random models (built from configs, no downloads)
against ``attn_implementation="eager"`` with the same weights.

Logits on a single sequence, a left-padded batch (real rows only: attnkit gives padded rows
that see no key zeros, eager the mean of the values) and packed sequences; greedy generate
with dynamic and static caches token for token; gradients within 1e-5 relative in float32.
Each model runs on ``backend="auto"`` and on ``"chunked"`` (the block-skipping path).
"""

import copy

import pytest
import torch

transformers = pytest.importorskip("transformers", minversion="5.0",
                                   reason="needs the hf extra: pip install \"attnkit[hf]\"")
hf = pytest.importorskip("attnkit.integrations.transformers")

from transformers import (AutoModelForCausalLM, BertConfig, BertForMaskedLM,  # noqa: E402
                          Gemma2Config, GPT2Config, GptOssConfig, LlamaConfig, MistralConfig,
                          Qwen2Config)

IMPLS = {"auto": "attnkit", "chunked": "attnkit_chunked"}
COMMON = dict(vocab_size=100, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
              num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)
CONFIGS = {
    "llama": lambda: LlamaConfig(**COMMON),  # GQA: 4 query heads on 2 key/value heads
    "mistral": lambda: MistralConfig(**COMMON, sliding_window=4),
    "qwen2": lambda: Qwen2Config(**COMMON, use_sliding_window=True, sliding_window=4,
                                 max_window_layers=1),  # full layer 0, window on layer 1
    "gemma2": lambda: Gemma2Config(**COMMON, head_dim=8, sliding_window=4,
                                   attn_logit_softcapping=5.0, query_pre_attn_scalar=8),
    "gpt_oss": lambda: GptOssConfig(**{**COMMON, "intermediate_size": 32}, head_dim=8,
                                    sliding_window=4, num_local_experts=2,
                                    num_experts_per_tok=1),  # sinks + window
    "gpt2": lambda: GPT2Config(vocab_size=100, n_embd=32, n_layer=2, n_head=4, n_positions=128,
                               resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0),
}
DECODERS = list(CONFIGS)


@pytest.fixture(scope="module", autouse=True)
def registered():
    # "attnkit" (backend auto) is registered by importing the integration
    hf.register(IMPLS["chunked"], backend="chunked")
    yield
    hf.unregister(IMPLS["chunked"])


def _pair(config, impl, cls=AutoModelForCausalLM):
    """(eager, attnkit) models with the same random weights; each gets its own config
    (from_config records the implementation on the config object it is given)."""
    build = cls.from_config if cls is AutoModelForCausalLM else cls._from_config
    torch.manual_seed(0)
    ref = build(copy.deepcopy(config), attn_implementation="eager").eval()
    ours = build(copy.deepcopy(config), attn_implementation=impl).eval()
    ours.load_state_dict(ref.state_dict())
    assert ref.config._attn_implementation == "eager"
    assert ours.config._attn_implementation == impl
    return ref, ours


_CACHE = {}


def models(name, backend):
    key = (name, backend)
    if key not in _CACHE:
        cls = BertForMaskedLM if name == "bert" else AutoModelForCausalLM
        config = BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2,
                            num_attention_heads=4, intermediate_size=64,
                            hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0) \
            if name == "bert" else CONFIGS[name]()
        _CACHE[key] = _pair(config, IMPLS[backend], cls)
    return _CACHE[key]


def _inputs(B=2, T=12, pad=4):
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 100, (B, T), generator=g)
    attention_mask = torch.ones(B, T, dtype=torch.long)
    attention_mask[B - 1, :pad] = 0  # left padding in the last row
    return ids, attention_mask


def _close(a, b, what):
    err = (a - b).abs().max().item()
    assert err <= 1e-5 * max(1.0, b.abs().max().item()), f"{what}: max error {err}"


@pytest.fixture(autouse=True)
def no_dense_fallback():
    before = sum(hf.dense_fallbacks.values())
    yield
    assert sum(hf.dense_fallbacks.values()) == before, dict(hf.dense_fallbacks)


@pytest.mark.parametrize("backend", list(IMPLS))
@pytest.mark.parametrize("name", DECODERS + ["bert"])
def test_logits_single_and_left_padded(name, backend):
    ref, ours = models(name, backend)
    ids, attention_mask = _inputs()
    if name == "bert":
        attention_mask = attention_mask.flip(1)  # BERT pads on the right
    with torch.no_grad():
        _close(ours(ids[:1]).logits, ref(ids[:1]).logits, "single sequence")
        real = attention_mask.bool()
        a = ours(ids, attention_mask=attention_mask).logits
        b = ref(ids, attention_mask=attention_mask).logits
    _close(a[real], b[real], "padded batch, real rows")


@pytest.mark.parametrize("backend", list(IMPLS))
@pytest.mark.parametrize("name", DECODERS)
def test_logits_packed_sequences(name, backend):
    ref, ours = models(name, backend)
    ids, _ = _inputs(B=1, pad=0)
    position_ids = torch.tensor([[0, 1, 2, 3, 4, 0, 1, 2, 0, 1, 2, 3]])  # 3 documents
    with torch.no_grad():
        a = ours(ids, position_ids=position_ids).logits
        b = ref(ids, position_ids=position_ids).logits
    _close(a, b, "packed sequences")


@pytest.mark.parametrize("cache", ["dynamic", "static"])
@pytest.mark.parametrize("name", DECODERS)
def test_greedy_generate_token_for_token(name, cache):
    ref, ours = models(name, "auto")
    ids, attention_mask = _inputs(T=6, pad=2)  # 6 + 5 tokens: past the window of 4
    kw = dict(attention_mask=attention_mask, max_new_tokens=5, do_sample=False,
              cache_implementation=cache, pad_token_id=0)
    assert torch.equal(ours.generate(ids, **kw), ref.generate(ids, **kw))


@pytest.mark.parametrize("cache", ["dynamic", "static"])
@pytest.mark.parametrize("name", DECODERS)
def test_greedy_generate_on_the_decode_backend(name, cache):
    """#16: the decode backend (every step, the prompt included: T <= 128) under generate,
    with windows, sinks, softcap and a left-padded batch: tokens equal eager's."""
    hf.register("attnkit_decode", backend="decode")
    try:
        ref, _ = models(name, "auto")
        config = copy.deepcopy(ref.config)
        ours = AutoModelForCausalLM.from_config(config, attn_implementation="attnkit_decode")
        ours.load_state_dict(ref.state_dict())
        ours.eval()
        ids, attention_mask = _inputs(T=6, pad=2)
        kw = dict(attention_mask=attention_mask, max_new_tokens=5, do_sample=False,
                  cache_implementation=cache, pad_token_id=0)
        assert torch.equal(ours.generate(ids, **kw), ref.generate(ids, **kw))
    finally:
        hf.unregister("attnkit_decode")


@pytest.mark.parametrize("backend", list(IMPLS))
@pytest.mark.parametrize("name", DECODERS + ["bert"])
def test_gradients_match_eager(name, backend):
    ref, ours = models(name, backend)
    ids, attention_mask = _inputs()
    if name == "bert":
        attention_mask = attention_mask.flip(1)
    real = attention_mask.bool()
    grads = []
    for model in (ref, ours):
        model.zero_grad()
        logits = model(ids, attention_mask=attention_mask).logits
        logits[real].pow(2).mean().backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters()
                      if p.grad is not None})
    assert grads[0].keys() == grads[1].keys()
    # A few gradients are zero in exact arithmetic (a key bias shifts every score of a row
    # equally; softmax ignores it), so they are pure round-off: measured against 1e-4 of the
    # largest gradient instead of their own norm.
    floor = 1e-4 * max(g.norm().item() for g in grads[0].values())
    for n, g_ref in grads[0].items():
        rel = (grads[1][n] - g_ref).norm().item() / max(g_ref.norm().item(), floor)
        assert rel <= 1e-5, f"{n}: relative error {rel:.2e}"


@pytest.mark.parametrize("name", ["llama", "bert"])
def test_output_attentions_returns_weights(name):
    ref, ours = models(name, "auto")
    ids, attention_mask = _inputs()
    with torch.no_grad():
        a = ours(ids[:1], output_attentions=True).attentions
        b = ref(ids[:1], output_attentions=True).attentions
    assert len(a) == len(b) == 2
    for wa, wb in zip(a, b):
        assert wa is not None and wa.shape == wb.shape
        _close(wa, wb, "attention weights")


def test_output_attentions_on_a_backend_without_weights_says_so():
    _, ours = models("llama", "chunked")
    ids, _ = _inputs()
    with pytest.raises(ValueError, match="backend 'chunked' cannot serve this call"):
        ours(ids[:1], output_attentions=True)


def test_dropout_in_training_is_applied():
    config = CONFIGS["llama"]()
    config.attention_dropout = 0.5
    _, ours = _pair(config, "attnkit")
    ids, _ = _inputs()
    with torch.no_grad():
        eval_logits = ours(ids[:1]).logits
        ours.train()
        torch.manual_seed(0)
        train_a = ours(ids[:1]).logits
        torch.manual_seed(1)
        train_b = ours(ids[:1]).logits
        ours.eval()
        assert torch.equal(ours(ids[:1]).logits, eval_logits)
    assert torch.isfinite(train_a).all()
    assert not torch.allclose(train_a, eval_logits) and not torch.allclose(train_a, train_b)


def test_static_cache_reads_only_the_filled_part_as_views(monkeypatch):
    """Prefill then one decode step into a StaticCache of 32: attnkit gets views of the
    cache's own storage cut to the filled length (8, then 9 keys), plain causal at prefill
    and no mask at the decode step; logits equal eager's."""
    from transformers import StaticCache

    ref, ours = models("llama", "chunked")
    calls = []
    real = hf._engine.attention

    def spy(q, k, v, **kw):
        mod = kw.get("mask_mod")
        calls.append((k.data_ptr(), k.shape[2], mod and mod.describe(), kw.get("mask")))
        return real(q, k, v, **kw)

    monkeypatch.setattr(hf._engine, "attention", spy)
    ids, _ = _inputs(B=1, pad=0)
    logits = []
    for model in (ref, ours):
        cache = StaticCache(config=model.config, max_cache_len=32)
        with torch.no_grad():
            model(ids[:, :8], cache=cache, use_cache=True)
            logits.append(model(ids[:, 8:9], cache=cache, use_cache=True).logits)
    _close(logits[1], logits[0], "decode step")
    keys = [layer.keys.data_ptr() for layer in cache.layers]
    assert [c[0] for c in calls] == keys * 2  # the cache's storage, prefill and decode
    assert [c[1] for c in calls] == [8, 8, 9, 9]  # the filled part only
    assert [c[2] for c in calls] == ["causal"] * 2 + [None] * 2
    assert [c[3] for c in calls] == [None] * 4


def test_weights_from_a_static_cache_cover_the_whole_cache():
    """Only the filled part is read, but the weights come back (B, H, T, max_cache_len) with
    zeros on the unfilled tail, as eager's."""
    from transformers import StaticCache

    ref, ours = models("llama", "auto")
    ids, _ = _inputs(B=1, pad=0)
    weights = []
    for model in (ref, ours):
        cache = StaticCache(config=model.config, max_cache_len=16)
        with torch.no_grad():
            model(ids[:, :6], cache=cache, use_cache=True)
            weights.append(model(ids[:, 6:8], cache=cache, use_cache=True,
                                 output_attentions=True).attentions)
    for wa, wb in zip(weights[1], weights[0]):
        assert wa.shape == wb.shape == (1, 4, 2, 16)
        assert not wa[..., 8:].any()
        _close(wa, wb, "attention weights")
