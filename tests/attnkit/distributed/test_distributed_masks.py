"""Ring and Ulysses attention with a mask description at global positions: a packed-document
mask gives the single-process result across ranks (forward and gradients, float64)."""

import pytest
import torch
from _dist_harness import run_ranks, values

import attnkit
import attnkit.distributed.ring as ring_module
from attnkit import masks as M
from attnkit.distributed import ring_attention, shard, ulysses_attention, unshard

B, H, HKV, D, T = 2, 4, 2, 3, 24
IDS = torch.tensor([[0] * 5 + [1] * 11 + [2] * 8, [0] * 13 + [1] * 11])  # (B, T)
MODS = {"documents": lambda: M.documents(IDS),
        "prefix_window": lambda: M.or_masks(M.prefix_lm(5), M.sliding_window(3, 2))}


def _inputs():
    g = torch.Generator().manual_seed(0)
    return [torch.randn(s, generator=g, dtype=torch.float64)
            for s in ((B, H, T, D), (B, HKV, T, D), (B, HKV, T, D), (B, H, T, D))]


def _rank(rank, P):
    ring_module._BLOCK_Q = ring_module._BLOCK_K = 4
    results = {}
    for name, make in MODS.items():
        methods = [("ring", ring_attention)] + ([("ulysses", ulysses_attention)] if H % P == 0 else [])
        for method, fn in methods:
            for layout in ("zigzag", "contiguous"):
                q, k, v, g = _inputs()
                q, k, v = (shard(t, layout=layout).requires_grad_() for t in (q, k, v))
                out = fn(q, k, v, layout=layout, mask_mod=make())
                out.backward(shard(g, layout=layout))
                results[(name, method, layout)] = [  # NumPy: tensors do not cross processes
                    unshard(t, layout=layout).numpy() for t in (out, q.grad, k.grad, v.grad)]
    return results


@pytest.mark.timeout(120)
@pytest.mark.parametrize("P", [2, 3])
def test_described_mask_across_ranks_matches_single_process(P):
    got = values(run_ranks(_rank, P))[0]
    for name, make in MODS.items():
        q, k, v, g = _inputs()
        q, k, v = (t.requires_grad_() for t in (q, k, v))
        ref = attnkit.attention(q, k, v, mask_mod=make(), backend="math")
        want = [ref.detach(), *torch.autograd.grad(ref, (q, k, v), g)]
        for key in [key for key in got if key[0] == name]:
            for a, b in zip(got[key], want):
                torch.testing.assert_close(torch.from_numpy(a), b, rtol=1e-10, atol=1e-12, msg=str(key))
