"""transformers models on attnkit under ``torch.compile``: the whole model is one graph
(``fullgraph=True``, no graph break) for a left-padded batch and for decoding with a static
cache, and the logits equal the uncompiled model's.

Tiny Llama (2 layers, GQA 4/2); dynamo's ``"eager"`` compiler backend keeps the tests fast
(the graph is captured exactly as for inductor, then run op by op).
"""

import copy

import pytest
import torch

transformers = pytest.importorskip("transformers", minversion="5.0",
                                   reason="needs the hf extra: pip install \"attnkit[hf]\"")
hf = pytest.importorskip("attnkit.integrations.transformers")

from torch._dynamo.testing import CompileCounter  # noqa: E402
from transformers import AutoModelForCausalLM, LlamaConfig, StaticCache  # noqa: E402

CONFIG = LlamaConfig(vocab_size=100, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                     num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(copy.deepcopy(CONFIG),
                                            attn_implementation="attnkit").eval()


@pytest.fixture(autouse=True)
def fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def _padded(B=2, T=12, pad=4):
    ids = torch.randint(0, 100, (B, T), generator=torch.Generator().manual_seed(1))
    attention_mask = torch.ones(B, T, dtype=torch.long)
    attention_mask[B - 1, :pad] = 0  # left padding in the last row
    return ids, attention_mask


def test_a_padded_batch_is_one_graph_with_the_same_logits(model):
    ids, attention_mask = _padded()
    with torch.no_grad():
        # fullgraph=True: a graph break is an error (torch._dynamo.exc.Unsupported)
        compiled = torch.compile(model, fullgraph=True, backend="eager")
        got = compiled(ids, attention_mask=attention_mask).logits
        want = model(ids, attention_mask=attention_mask).logits
    real = attention_mask.bool()
    torch.testing.assert_close(got[real], want[real], rtol=1e-5, atol=1e-5)


def test_static_cache_decoding_is_one_graph_with_the_same_logits(model):
    """Three decode steps into a StaticCache of 24 after an 8-token left-padded prefill; the
    2-D mask spans the whole cache (zeros past the filled part), so every step has the same
    shapes and reuses the one graph."""
    ids, attention_mask = _padded(T=8, pad=3)
    positions = attention_mask.cumsum(-1) - 1  # (B, T); pads at -1 are never seen
    logits = {}
    counter = CompileCounter()  # dynamo's "eager" backend, counting the graphs it gets
    for name in ("eager", "compiled"):
        cache = StaticCache(config=model.config, max_cache_len=24)
        mask = torch.zeros(2, 24, dtype=attention_mask.dtype)
        mask[:, :8] = attention_mask
        step = model if name == "eager" else torch.compile(model, fullgraph=True,
                                                           backend=counter)
        out = []
        with torch.no_grad():
            model(ids, attention_mask=mask[:, :8], cache=cache, use_cache=True,
                  position_ids=positions.clamp(min=0))  # prefill, not compiled
            token, pos = ids[:, -1:].contiguous(), positions[:, -1:]
            for i in range(3):
                mask[:, 8 + i] = 1
                pos = pos + 1
                logit = step(token, attention_mask=mask, cache=cache, use_cache=True,
                             position_ids=pos).logits
                out.append(logit)
                token = logit[:, -1:].argmax(-1)
        logits[name] = torch.cat(out, 1)
    torch.testing.assert_close(logits["compiled"], logits["eager"], rtol=1e-5, atol=1e-5)
    assert counter.frame_count == 1, counter.frame_count  # one graph for every step
