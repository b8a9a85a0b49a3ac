"""A corpus of FlexAttention mask_mods as people write them (after the patterns in
meta-pytorch/attention-gym's ``attn_gym/masks``, written here from their descriptions):
attnkit's create_block_mask gives torch's block structure exactly, its flex_attention gives
torch's eager output, and the ones that are native kinds are recognised as such."""

import pytest
import torch

import attnkit
from attnkit.block_mask import grid_of
from attnkit.masks.traced import TracedMask
from attnkit.summary import EMPTY, FULL, PARTIAL

flex_mod = pytest.importorskip("torch.nn.attention.flex_attention",
                               reason="this torch has no FlexAttention")
pytestmark = [pytest.mark.filterwarnings("ignore:flex_attention called without"),
              pytest.mark.filterwarnings("ignore:return_lse is deprecated")]


def _doc_ids(lengths):
    return torch.repeat_interleave(torch.arange(len(lengths)), torch.tensor(lengths))


def corpus(T):
    """``name -> (mask_mod, how attnkit should describe it at T, or None = traced)``."""
    third = T // 3
    lengths = [third - 5, 9, T - 2 * third - 4, third]
    doc = _doc_ids(lengths)
    offsets = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()])
    prefix_of = torch.tensor([0, 0, 2, 2])  # documents 1 and 3 continue 0 and 2
    is_global = torch.zeros(T, dtype=torch.bool)
    is_global[[0, T // 2]] = True
    side = int(T ** 0.5)

    def causal(b, h, q, kv):
        return q >= kv

    def sliding_window(b, h, q, kv):
        return (q >= kv) & (q - kv <= 24)

    def prefix_lm(b, h, q, kv):
        return (kv < 40) | causal(b, h, q, kv)

    def document(b, h, q, kv):
        return doc[q] == doc[kv]

    def packed_doc_causal(b, h, q, kv):  # one contiguous key interval per query
        return (kv >= offsets[doc[q]]) & causal(b, h, q, kv)

    def shared_prefix(b, h, q, kv):
        own = (kv >= offsets[doc[q]]) & (q >= kv)
        p = prefix_of[doc[q]]
        return own | ((doc[q] != p) & (kv >= offsets[p]) & (kv < offsets[p + 1]))

    def batchify(b, h, q, kv):  # groups of 16 around any inner mask (here: all visible)
        return (q // 16 == kv // 16) & b.new_ones((), dtype=torch.bool)

    def block_diffusion(b, h, q, kv):  # noised half, clean half, blocks of 8
        n = T // 2
        qn, kn = q < n, kv < n
        qb, kb = (q % n) // 8, (kv % n) // 8
        return ((qb == kb) & (qn == kn)) | ((qb > kb) & qn & ~kn) | ((qb >= kb) & ~qn & ~kn)

    def global_sliding(b, h, q, kv):
        return ((q - kv).abs() <= 6) | is_global[q] | is_global[kv]

    def neighbourhood_2d(b, h, q, kv):  # a 5 x 5 neighbourhood on a side x side canvas
        qx, qy, kx, ky = q // side, q % side, kv // side, kv % side
        cx, cy = qx.clamp(2, side - 3), qy.clamp(2, side - 3)
        return ((cx - kx).abs() <= 2) & ((cy - ky).abs() <= 2)

    def dilated_window(b, h, q, kv):
        return ((q - kv) % 3 == 0) & (q >= kv) & (q - kv <= 40)

    def per_sample_padding(b, h, q, kv):
        return kv < torch.tensor([T, T - 30])[b]

    return {
        "causal": (causal, "causal"),
        "sliding_window": (sliding_window, "window(left=24, right=0)"),
        "prefix_lm": (prefix_lm, "prefix(40) | causal"),
        "document": (document, "same_document(B=1)"),
        "packed_doc_causal": (packed_doc_causal, "causal & same_document(B=1)"),
        "shared_prefix": (shared_prefix, None),
        "batchify": (batchify, "chunked_local(16)"),
        "block_diffusion": (block_diffusion, None),
        "global_sliding": (global_sliding, None),
        "neighbourhood_2d": (neighbourhood_2d, None),
        "dilated_window": (dilated_window, None),
        "per_sample_padding": (per_sample_padding, "prefix(per-sample)"),
    }


NAMES = sorted(corpus(96))


def torch_kind(fn, T, block, B=2):
    bm = flex_mod.create_block_mask(fn, B, None, T, T, device="cpu", BLOCK_SIZE=block)
    return grid_of(bm).kind


def union(kind):
    """Per-sample tiles as one summary for every sample: full only where full for all,
    empty only where empty for all (what attnkit's one summary per call must say)."""
    some, every = (kind != EMPTY).any(0).any(0), (kind == FULL).all(0).all(0)
    return torch.where(every, FULL, torch.where(some, PARTIAL, EMPTY)).to(torch.int8)


def as_torch_counts(kind, T, block):
    """attnkit's summary in torch's convention: a ragged last tile is never full."""
    kind = kind.clone()
    if T % block:
        kind[-1][kind[-1] == FULL] = PARTIAL
        kind[:, -1][kind[:, -1] == FULL] = PARTIAL
    return kind


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("T, block", [(256, 32), (225, 16)])
def test_block_structure_matches_torch_exactly(name, T, block):
    fn, _ = corpus(T)[name]
    ours = attnkit.create_block_mask(fn, None, None, T, T, BLOCK_SIZE=block)
    theirs = union(torch_kind(fn, T, block))
    if name == "per_sample_padding":  # a key prefix summarises its samples by their extremes
        ours_kind = as_torch_counts(ours.summary.kind, T, block)
        assert not ((ours_kind == FULL) & (theirs != FULL)).any()
        assert not ((ours_kind == EMPTY) & (theirs != EMPTY)).any()
        return
    assert torch.equal(as_torch_counts(ours.summary.kind, T, block), theirs), \
        ours.as_mask().describe()


@pytest.mark.parametrize("name", NAMES)
def test_recognised_as_expected(name):
    fn, expected = corpus(225)[name]
    mod = attnkit.create_block_mask(fn, None, None, 225, 225).as_mask()
    if expected is None:
        assert "[traced;" in mod.describe()
    else:
        assert sorted(mod.describe().split(" & ")) == sorted(expected.split(" & "))


@pytest.mark.parametrize("name", NAMES)
def test_outputs_match_torch_eager(name):
    T = 81
    fn, _ = corpus(T)[name]
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 1, T, 8, generator=g, dtype=torch.float64) for _ in range(3))
    bm = flex_mod.create_block_mask(fn, 2, None, T, T, device="cpu", BLOCK_SIZE=32)
    ref = flex_mod.flex_attention(q, k, v, block_mask=bm)
    ours = attnkit.create_block_mask(fn, 2, None, T, T, BLOCK_SIZE=32)
    torch.testing.assert_close(attnkit.flex_attention(q, k, v, block_mask=ours), ref)
    torch.testing.assert_close(attnkit.flex_attention(q, k, v, block_mask=bm), ref)


def test_per_sample_structure_by_batch_index():
    """A b-dependent function classified per batch index equals torch's per-sample
    BlockMask (what create_block_mask(B=2) computes), without evaluating decided tiles."""
    lengths = torch.tensor([96, 51])
    fn = lambda b, h, q, kv: (kv < lengths[b]) & ((q * 3 + kv) % 7 != 0)  # noqa: E731
    mod = attnkit.masks.MaskFn(fn).resolve(96, 96)
    assert isinstance(mod, TracedMask)
    ours = mod.classify(2, 4, 16, 16)
    assert ours.shape == (2, 1, 6, 6)  # the function ignores h
    assert torch.equal(ours, torch_kind(fn, 96, 16))
