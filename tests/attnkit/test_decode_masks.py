"""Cached decoding with a mask description at global positions equals the full forward."""

import pytest
import torch

import attnkit
from attnkit import KVCache
from attnkit import masks as M


# flex compiles once per shape (each step here is one): tests/attnkit/backends/test_flex.py.
@pytest.mark.parametrize("backend", [b for b in attnkit.available_backends() if b != "flex"])
def test_documents_decode_step_by_step_equals_full(backend):
    g = torch.Generator().manual_seed(0)
    T = 12
    q, k, v = (torch.randn(1, h, T, 4, generator=g) for h in (2, 1, 1))
    ids = torch.tensor([[0] * 5 + [1] * 4 + [2] * 3])
    mod = M.documents(ids) | M.prefix_lm(2) & M.causal()
    full = attnkit.attention(q, k, v, mask_mod=mod, backend="math")
    cache = KVCache(1, 1, T, 4)
    steps, t = [], 0
    for n in (4, 1, 3, 1, 1, 2):  # a prefill, then single tokens and chunks
        ks, vs = cache.update(k[:, :, t:t + n], v[:, :, t:t + n])
        steps.append(attnkit.attention(q[:, :, t:t + n], ks, vs, backend=backend,
                                       mask_mod=cache.at_positions(mod, n)))
        t += n
    torch.testing.assert_close(torch.cat(steps, 2), full)


def test_at_positions_checks_num_new():
    cache = KVCache(1, 1, 4, 2)
    with pytest.raises(ValueError, match=r"num_new must be the positions just written, 1..pos=0"):
        cache.at_positions(M.causal(), 1)
