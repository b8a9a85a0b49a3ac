"""MultiHeadAttention on the engine: described masks, score functions, sinks and block masks,
the same description working unchanged while decoding with a KV cache."""

import pytest
import torch

import attnkit
from attnkit import masks as M
from attnkit.multihead import MultiHeadAttention

F64 = torch.float64
BACKENDS = [b for b in attnkit.available_backends() if b != "flex"] + ["auto"]


def _module(backend="auto", causal=True, **kw):
    torch.manual_seed(0)
    return MultiHeadAttention(24, 4, num_kv_heads=2, causal=causal, backend=backend, rope=True,
                              **kw).to(F64).eval()


def _x(T=13, seed=1):
    return torch.randn(2, T, 24, generator=torch.Generator().manual_seed(seed), dtype=F64)


def _decode(mha, x, steps, **kw):
    """Prefill the first ``steps[0]`` tokens, then the rest in chunks; outputs concatenated."""
    cache = mha.init_cache(x.shape[0], x.shape[1], dtype=F64)
    outs, start = [], 0
    for n in steps:
        outs.append(mha(x[:, start:start + n], cache=cache, **kw))
        start += n
    return torch.cat(outs, dim=1)


CASES = {
    "documents": lambda T: {"mask_mod": M.documents(cu_seqlens=[0, 5, 9, T], causal=False)},
    "prefix_lm": lambda T: {"mask_mod": M.prefix_lm(4)},
    "callable": lambda T: {"mask_mod": lambda b, h, q, kv: (q - kv) % 3 != 2},
    "softcap_sinks": lambda T: {"score_mod": attnkit.scores.Softcap(0.7),
                                "sinks": torch.linspace(-1, 1, 4, dtype=F64)},
    "relative_bias": lambda T: {"score_mod": lambda s, b, h, q, kv: s - 0.1 * (q - kv).abs()},
}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", list(CASES))
def test_described_call_while_decoding_equals_one_forward(case, backend):
    if backend == "sdpa" and case in ("softcap_sinks", "relative_bias"):
        pytest.skip("sdpa takes no score function or sinks (its refusal is tested elsewhere)")
    mha, x = _module(backend), _x()
    kw = CASES[case](x.shape[1])
    with torch.no_grad():
        full = mha(x, **kw)
        stepped = _decode(mha, x, [6, 1, 3, 1, 2], **kw)
    torch.testing.assert_close(stepped, full)


def test_described_mask_matches_the_engine_directly():
    mha, x = _module("math", causal=False), _x()
    mod = M.documents(cu_seqlens=[0, 5, 9, 13]) & M.sliding_window(3)
    ref_mha = _module("math", causal=False)
    dense = M.MaskSpec.from_args(mask_mod=mod).dense(13, 13)
    with torch.no_grad():
        torch.testing.assert_close(mha(x, mask_mod=mod), ref_mha(x, mask=dense))


def test_block_mask_from_torch_joins_the_mask():
    flex = pytest.importorskip("torch.nn.attention.flex_attention")
    mha, x = _module("chunked", causal=False), _x(T=16)

    def causal_doc(b, h, q, kv):
        return (q >= kv) & (q // 8 == kv // 8)

    block = flex.create_block_mask(causal_doc, None, None, 16, 16, device="cpu",
                                   BLOCK_SIZE=8)
    with torch.no_grad():
        torch.testing.assert_close(mha(x, block_mask=block), mha(x, mask_mod=causal_doc))


def test_description_shorter_than_the_sequence_is_refused():
    mha, x = _module(), _x()
    with pytest.raises(ValueError, match="does not reach query 12"):
        with torch.no_grad():
            _decode(mha, x, [10, 3], mask_mod=M.documents(cu_seqlens=[0, 5, 10]))


def test_sinks_must_match_the_heads():
    mha, x = _module(), _x()
    with pytest.raises(ValueError, match=r"sinks must have shape \(H,\) = \(4,\)"):
        mha(x, sinks=torch.zeros(3, dtype=F64))
