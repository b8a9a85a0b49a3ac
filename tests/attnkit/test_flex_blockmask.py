"""attnkit's BlockMask is torch's BlockMask: never stretched, cropped exactly by _adjust,
indexed, moved and rebuilt as torch's is, taken by torch's own flex_attention, and the rest of
torch's FlexAttention surface (and_masks, or_masks, noop_mask, create_mask, AuxRequest, K/V
batch broadcast, mixed dtypes, torch's error texts). References: attnkit's float64 math path
and torch's eager flex_attention in float64 (whose math is the dense definition)."""

import math
import warnings

import pytest
import torch

import attnkit
import attnkit.flex_checks
from attnkit import flex_api as F
from attnkit import masks as M
from attnkit.block_mask import BlockGrid, kinds_of
from attnkit.summary import FULL, PARTIAL

TF = pytest.importorskip("torch.nn.attention.flex_attention",
                         reason="this torch has no FlexAttention")
# torch's eager flex (a reference here) warns that it is unfused, and about return_lse.
pytestmark = [pytest.mark.filterwarnings("ignore:flex_attention called without"),
              pytest.mark.filterwarnings("ignore:return_lse is deprecated")]


def qkv(B=1, H=2, T=64, S=None, D=8, Hkv=None, Bkv=None, dtype=torch.float64, seed=0,
        grad=False):
    g = torch.Generator().manual_seed(seed)
    S, Hkv, Bkv = S or T, Hkv or H, Bkv or B
    shapes = ((B, H, T, D), (Bkv, Hkv, S, D), (Bkv, Hkv, S, D))
    return [torch.randn(*s, generator=g, dtype=dtype).requires_grad_(grad) for s in shapes]


def causal(b, h, q_idx, kv_idx):
    return q_idx >= kv_idx


def math_ref(q, k, v, mask_mod=None, score_mod=None, scale=None):
    return attnkit.attention(q, k, v, mask_mod=mask_mod, score_mod=score_mod, scale=scale,
                             backend="math")


# --- never stretched -----------------------------------------------------------------------

def cut_at_250(b, h, q_idx, kv_idx):
    return (q_idx >= kv_idx) & (kv_idx < 250)


def window_to_220(b, h, q_idx, kv_idx):
    return (q_idx >= kv_idx) & (q_idx - kv_idx < 64) & (q_idx < 220)


@pytest.mark.parametrize("mask_mod", [cut_at_250, window_to_220])
@pytest.mark.parametrize("maker", ["torch", "attnkit"])
def test_a_block_mask_is_never_stretched(mask_mod, maker):
    """The issue's silent wrong answers (errors 0.19 and 1.4 at 300 with masks built at 200)
    are torch's errors now, for torch's BlockMask and for attnkit's; at its own length the
    mask is exact against its mask_mod."""
    cbm = TF.create_block_mask if maker == "torch" else attnkit.create_block_mask
    kw = {"device": "cpu"} if maker == "torch" else {}
    small = cbm(mask_mod, None, None, 200, 200, **kw)
    q, k, v = qkv(T=300)
    with pytest.raises(ValueError, match=r"block_mask was created for block_mask.shape=\(1, 1, "
                                         r"200, 200\) but got q_len=300 and kv_len=300\. As the "
                                         r"block mask was created for a smaller length"):
        attnkit.flex_attention(q, k, v, block_mask=small)
    with pytest.raises(ValueError, match="created for a smaller length"):
        attnkit.attention(q, k, v, block_mask=small)
    q2, k2, v2 = qkv(T=150)
    with pytest.raises(ValueError, match=r"created for a larger length .*block_mask\._adjust"):
        attnkit.flex_attention(q2, k2, v2, block_mask=small)
    q3, k3, v3 = qkv(T=200, S=150)  # shorter keys only
    with pytest.raises(ValueError, match="created for a larger length"):
        attnkit.flex_attention(q3, k3, v3, block_mask=small)
    big = cbm(mask_mod, None, None, 300, 300, **kw)
    torch.testing.assert_close(attnkit.flex_attention(q, k, v, block_mask=big),
                               math_ref(q, k, v, mask_mod))


def test_the_same_text_as_torchs_own_check():
    q, k, v = qkv(T=96)
    bm = TF.create_block_mask(causal, None, None, 64, 64, device="cpu")
    with pytest.raises(ValueError) as ours:
        attnkit.flex_attention(q, k, v, block_mask=bm)
    with pytest.raises(ValueError) as theirs:
        TF.flex_attention(q, k, v, block_mask=bm)
    assert str(ours.value) == str(theirs.value)


def window(b, h, q_idx, kv_idx):
    return (q_idx >= kv_idx) & (q_idx - kv_idx < 40)


@pytest.mark.parametrize("lengths", [(128, 128), (256, 100), (97, 256), (1, 200), (256, 256)])
def test_adjust_crops_exactly(lengths):
    """``_adjust`` is the explicit way: the crop equals the mask made at the new lengths,
    also where torch's own recount is wrong (a window cropped to fewer keys)."""
    bm = attnkit.create_block_mask(window, None, None, 256, 256, BLOCK_SIZE=32)
    T, S = lengths
    adj = bm._adjust(T, S)
    assert isinstance(adj, F.BlockMask) and adj.seq_lengths == (T, S)
    q, k, v = qkv(T=T, S=S)
    torch.testing.assert_close(attnkit.flex_attention(q, k, v, block_mask=adj),
                               math_ref(q, k, v, window))
    fresh = kinds_of(attnkit.create_block_mask(window, None, None, T, S, BLOCK_SIZE=32))
    got = kinds_of(adj)
    assert ((got != 0) | (fresh == 0)).all()  # every tile the new mask visits is listed
    assert ((got == FULL) | (fresh != FULL)).all()  # a full tile stays full, as in torch


def test_adjust_of_a_torch_mask_and_its_refusals():
    tbm = TF.create_block_mask(window, None, None, 256, 256, device="cpu", BLOCK_SIZE=32)
    adj = attnkit.create_block_mask(window, None, None, 256, 256, BLOCK_SIZE=32)._adjust(
        128, 128)
    ref = tbm._adjust(128, 128)  # square crops of a window are where torch's is right
    for attr in ("kv_num_blocks", "kv_indices", "full_kv_num_blocks", "full_kv_indices"):
        assert torch.equal(getattr(adj, attr), getattr(ref, attr)), attr
    q, k, v = qkv(T=128)
    torch.testing.assert_close(attnkit.flex_attention(q, k, v, block_mask=ref),
                               math_ref(q, k, v, window))
    with pytest.raises(ValueError, match=r"new_q_len must be an int in \[1, 128\].*got 300"):
        adj._adjust(300, 128)
    with pytest.raises(ValueError, match=r"new_kv_len must be an int in \[1, 128\].*got 0"):
        adj._adjust(10, 0)


def test_a_described_mask_cropped_keeps_its_description():
    """A description with tensors of the original length (documents) still serves the
    crop: it is evaluated at the cropped positions."""
    ids = torch.arange(256) // 50
    bm = attnkit.create_block_mask(M.documents(ids[None]) & M.causal(), None, None, 256, 256,
                                   BLOCK_SIZE=64)
    q, k, v = qkv(T=200)
    ref = math_ref(q, k, v, M.documents(ids[None, :200]) & M.causal())
    torch.testing.assert_close(attnkit.flex_attention(q, k, v, block_mask=bm._adjust(200, 200)),
                               ref)


# --- it is torch's BlockMask ----------------------------------------------------------------

KINDS = {
    "causal": M.causal(),
    "bottom_right": M.causal(align="bottom_right"),
    "two_sided": M.sliding_window(5, 7),
    "documents": M.documents((torch.arange(100) // 37)[None].expand(2, 100),
                             kv_document_ids=(torch.arange(80) // 29)[None].expand(2, 80)),
    "prefix": M.prefix_lm(33),
    "dilated": M.dilated(3, window=40),
    "chunked": M.chunked_local(24),
    "padding": M.key_padding(torch.arange(80)[None] < torch.tensor([[80], [50]])),
    "fn_and_kind": F.and_masks(causal, M.sliding_window(30)),
}


@pytest.mark.parametrize("name", list(KINDS))
def test_torchs_flex_attention_takes_attnkits_block_mask(name):
    """It is a torch BlockMask: torch's eager flex_attention (which traces the mask_mod with
    dynamo) gives the description's answer, and attnkit gives the same."""
    mod = KINDS[name]
    bm = attnkit.create_block_mask(mod, 2, None, 100, 80, BLOCK_SIZE=32)
    assert isinstance(bm, TF.BlockMask)
    q, k, v = qkv(B=2, T=100, S=80)
    ref = math_ref(q, k, v, mod)
    torch.testing.assert_close(TF.flex_attention(q, k, v, block_mask=bm), ref)
    torch.testing.assert_close(attnkit.flex_attention(q, k, v, block_mask=bm), ref)
    plain = bm.to_torch()
    assert type(plain) is TF.BlockMask and plain.mask_mod is bm.mask_mod
    torch.testing.assert_close(TF.flex_attention(q, k, v, block_mask=plain), ref)


def test_compiled_torch_flex_takes_it():
    """Dynamo traces torch's flex_attention with it (the 'eager' compiler: the graph is
    captured as for inductor, fullgraph, then run op by op)."""
    bm = attnkit.create_block_mask(M.documents((torch.arange(64) // 20)[None]), None, None,
                                   64, 64, BLOCK_SIZE=16)
    q, k, v = qkv(T=64)
    compiled = torch.compile(TF.flex_attention, backend="eager", fullgraph=True)
    torch.testing.assert_close(compiled(q, k, v, block_mask=bm),
                               attnkit.flex_attention(q, k, v, block_mask=bm))


def test_listing_attributes_and_methods_equal_torchs():
    def offset_causal(b, h, q_idx, kv_idx):
        return q_idx + b * 32 >= kv_idx

    ours = attnkit.create_block_mask(offset_causal, 2, 3, 128, 96, BLOCK_SIZE=32)
    ref = TF.create_block_mask(offset_causal, 2, 3, 128, 96, device="cpu", BLOCK_SIZE=32)
    for attr in ("kv_num_blocks", "kv_indices", "full_kv_num_blocks", "full_kv_indices",
                 "q_num_blocks", "q_indices", "full_q_num_blocks", "full_q_indices"):
        assert torch.equal(getattr(ours, attr), getattr(ref, attr)), attr
    assert ours.shape == ref.shape == (2, 3, 128, 96) and ours.BLOCK_SIZE == (32, 32)
    assert ours.sparsity() == ref.sparsity() and ours.numel() == ref.numel()
    assert torch.equal(ours.to_dense(), ref.to_dense())
    assert ours.to_string() == ref.to_string() and str(ours) == str(ref)
    assert repr(ours) == repr(ref)
    for a, b in zip(ours.as_tuple(), ref.as_tuple()):
        assert torch.equal(a, b) if isinstance(a, torch.Tensor) else a == b
    assert ours.mask_mod is offset_causal
    # per-batch sparsity is kept: batch 1 sees more than batch 0
    assert ours[1].sparsity() < ours[0].sparsity()


def test_indexing_to_and_from_kv_blocks_stay_attnkit_block_masks():
    def per_batch(b, h, q_idx, kv_idx):
        return (q_idx >= kv_idx) | (b == 1)

    bm = attnkit.create_block_mask(per_batch, 2, 2, 128, 128, BLOCK_SIZE=32)
    ref = TF.create_block_mask(per_batch, 2, 2, 128, 128, device="cpu", BLOCK_SIZE=32)
    one = bm[1]
    assert isinstance(one, F.BlockMask)
    for index in (1, (0, 1), (slice(0, 2), slice(1, 2)), (0, 1, torch.tensor([2]))):
        assert torch.equal(bm[index].kv_indices, ref[index].kv_indices), index
        assert torch.equal(bm[index].full_kv_num_blocks, ref[index].full_kv_num_blocks), index
    q, k, v = qkv(B=1, T=128)
    with pytest.raises(RuntimeError, match="Cannot use mask_mod from a sliced BlockMask"):
        attnkit.flex_attention(q, k, v, block_mask=one)
    with pytest.raises(RuntimeError, match="Cannot use mask_mod from a sliced BlockMask"):
        TF.flex_attention(q, k, v, block_mask=one)
    one.mask_mod = bm.mask_mod  # torch's way back: the original's mask_mod
    # batch 1's listing (every tile full: it sees every key), as torch's kernels read it
    # (torch's eager path ignores listings and would evaluate mask_mod at b = 0 everywhere)
    sub = bm[1:2]
    sub.mask_mod = bm.mask_mod
    torch.testing.assert_close(attnkit.flex_attention(q, k, v, block_mask=sub),
                               math_ref(q, k, v))
    moved = bm.to("cpu")
    assert isinstance(moved, F.BlockMask) and moved.mask_mod is per_batch
    made = F.BlockMask.from_kv_blocks(torch.tensor([[[1, 1]]], dtype=torch.int32),
                                      torch.tensor([[[[0, 1], [1, 0]]]], dtype=torch.int32),
                                      BLOCK_SIZE=64, mask_mod=causal)
    assert isinstance(made, F.BlockMask) and made.shape == (1, 1, 128, 128)
    q, k, v = qkv(T=128)
    diag = torch.zeros(128, 128, dtype=torch.bool)
    diag[:64, :64] = diag[64:, 64:] = True
    ref = attnkit.attention(q, k, v, mask=diag & torch.ones(128, 128, dtype=torch.bool).tril(),
                            backend="math")
    torch.testing.assert_close(attnkit.flex_attention(q, k, v, block_mask=made), ref)


def test_a_replaced_listing_or_mask_mod_is_read_again():
    """torch code mutates BlockMasks (indexing resets mask_mod, paged attention rewrites
    the listing): the description is used only while it still describes the listing."""
    bm = attnkit.create_block_mask(M.causal(), None, None, 64, 64, BLOCK_SIZE=16)
    q, k, v = qkv(T=64)
    bm.mask_mod = lambda b, h, q_idx, kv_idx: q_idx <= kv_idx  # partial tiles: upper now
    got = attnkit.flex_attention(q, k, v, block_mask=bm)
    # the same answer as for its plain torch copy, which attnkit reads as a listing
    torch.testing.assert_close(got, attnkit.flex_attention(q, k, v, block_mask=bm.to_torch()))
    diag = (torch.arange(64)[:, None] // 16 == torch.arange(64)[None] // 16)
    below = (torch.arange(64)[:, None] // 16 > torch.arange(64)[None] // 16)
    i = torch.arange(64)
    want = below | (diag & (i[:, None] <= i[None]))  # listing decides, mask_mod in partials
    torch.testing.assert_close(got, attnkit.attention(q, k, v, mask=want, backend="math"))
    bm2 = attnkit.create_block_mask(M.causal(), None, None, 64, 64, BLOCK_SIZE=16)
    bm2.full_kv_num_blocks.zero_()  # in place: the full tiles are dropped
    want2 = diag & (i[:, None] >= i[None])
    torch.testing.assert_close(attnkit.flex_attention(q, k, v, block_mask=bm2),
                               attnkit.attention(q, k, v, mask=want2, backend="math"))


# --- and_masks, or_masks, noop_mask, create_mask ---------------------------------------------

def test_mask_combiners_match_torchs():
    def wide(b, h, q_idx, kv_idx):
        return q_idx - kv_idx <= 20

    def upper(b, h, q_idx, kv_idx):
        return q_idx < kv_idx

    for ours, theirs in ((F.and_masks(causal, wide), TF.and_masks(causal, wide)),
                         (F.or_masks(causal, upper), TF.or_masks(causal, upper)),
                         (F.and_masks(), TF.and_masks()), (F.or_masks(), TF.or_masks()),
                         (F.and_masks(causal, F.noop_mask), TF.and_masks(causal, TF.noop_mask))):
        want = TF.create_mask(theirs, 2, 1, 50, 60, device="cpu")
        assert torch.equal(F.create_mask(ours, 2, 1, 50, 60), want)
        assert torch.equal(TF.create_mask(ours, 2, 1, 50, 60, device="cpu"), want)
        a = attnkit.create_block_mask(ours, None, None, 50, 60, BLOCK_SIZE=16)
        b = TF.create_block_mask(theirs, None, None, 50, 60, device="cpu", BLOCK_SIZE=16)
        assert torch.equal(a.to_dense(), b.to_dense())
    assert F.noop_mask is TF.noop_mask
    with pytest.raises(RuntimeError, match="All inputs should be callable mask_mods"):
        F.and_masks(causal, 3)
    with pytest.raises(RuntimeError, match="All inputs should be callable mask_mods"):
        F.or_masks("causal")


def test_and_masks_of_descriptions_keep_interval_arithmetic():
    both = F.and_masks(M.causal(), M.sliding_window(16))
    assert isinstance(both, M.And)
    bm = attnkit.create_block_mask(both, None, None, 4096, 4096)  # nothing evaluated
    assert bm.as_mask() is not None and not isinstance(bm.as_mask(), BlockGrid)


def test_create_mask_of_every_spelling():
    def soft(score, b, h, q_idx, kv_idx):
        return torch.where(q_idx >= kv_idx, score, float("-inf"))

    want = TF.create_mask(causal, 2, 3, 7, 9, device="cpu")
    assert want.shape == (2, 3, 7, 9)
    for spelling in (causal, soft, M.causal(), F.and_masks(causal)):
        assert torch.equal(F.create_mask(spelling, 2, 3, 7, 9, device="cpu"), want)
    assert torch.equal(F.create_mask(F.noop_mask, None, None, 3, 4),
                       torch.ones(1, 1, 3, 4, dtype=torch.bool))
    with pytest.raises(AssertionError, match="Expected 4 or 5 positional args, got 3"):
        F.create_mask(lambda b, h, q: q, 1, 1, 2, 2)
    with pytest.raises(AssertionError, match="create-block_mask requires a mask_mod function"):
        attnkit.create_block_mask(soft, 1, 1, 8, 8)


def test_create_block_mask_options():
    bm = attnkit.create_block_mask(causal, None, None, 256, 256, BLOCK_SIZE=(64, 32),
                                   separate_full_blocks=False)
    ref = TF.create_block_mask(causal, None, None, 256, 256, device="cpu", BLOCK_SIZE=(64, 32),
                               separate_full_blocks=False)
    assert bm.full_kv_num_blocks is None and torch.equal(bm.kv_indices, ref.kv_indices)
    assert torch.equal(bm.kv_num_blocks, ref.kv_num_blocks)
    q, k, v = qkv(T=256)
    torch.testing.assert_close(attnkit.flex_attention(q, k, v, block_mask=bm),
                               math_ref(q, k, v, causal))
    with pytest.raises(ValueError, match="dq_kv_order must be a bool when using "
                                         "create_block_mask"):
        attnkit.create_block_mask(causal, None, None, 64, 64, dq_kv_order=None)
    with pytest.raises(ValueError, match="BLOCK_SIZE must be a positive int, got 0"):
        attnkit.create_block_mask(causal, None, None, 64, 64, BLOCK_SIZE=0)


# --- flex_attention's arguments ----------------------------------------------------------------

@pytest.mark.parametrize("Bq, Hq, Hkv", [(3, 2, 2), (4, 4, 1)])
def test_a_kv_batch_of_one_serves_every_query(Bq, Hq, Hkv):
    """torch allows it with a block mask of the query batch; gradients reach the shared
    keys and values (summed over the query batch)."""
    q, k, v = qkv(B=Bq, H=Hq, Hkv=Hkv, Bkv=1, T=40, grad=True)
    bm = attnkit.create_block_mask(causal, Bq, None, 40, 40, BLOCK_SIZE=16)
    out = attnkit.flex_attention(q, k, v, block_mask=bm, enable_gqa=Hq != Hkv)
    torch.testing.assert_close(out.detach(), TF.flex_attention(
        q.detach(), k.detach(), v.detach(), block_mask=bm, enable_gqa=Hq != Hkv))
    kb, vb = (t.expand(Bq, -1, -1, -1) for t in (k, v))
    ref = attnkit.attention(q, kb, vb, mask_mod=causal, backend="math")
    g = torch.randn_like(out)
    for a, b in zip(torch.autograd.grad(out, (q, k, v), g),
                    torch.autograd.grad(ref, (q, k, v), g)):
        torch.testing.assert_close(a, b)


def test_batch_errors_are_torchs():
    q, k, v = qkv(B=3, Bkv=1, T=16)
    with pytest.raises(ValueError, match=r"or non-none block_mask, but got block_mask=None, "
                                         r"Bq=3, and Bkv=1\."):
        attnkit.flex_attention(q, k, v)
    bm = attnkit.create_block_mask(causal, 2, None, 16, 16)
    with pytest.raises(ValueError, match=r"or block_mask and query to have the same batch "
                                         r"size, but got Bq=3, Bkv=1, B_block_mask=2\."):
        attnkit.flex_attention(q, k, v, block_mask=bm)
    q, k, v = qkv(B=4, Bkv=2, T=16)
    with pytest.raises(RuntimeError, match="Bq and Bkv must broadcast. Got Bq=4 and Bkv=2"):
        attnkit.flex_attention(q, k, v, block_mask=attnkit.create_block_mask(causal, 4, None,
                                                                              16, 16))


@pytest.mark.parametrize("kv_dtype", [torch.bfloat16, torch.float16, torch.float64])
def test_keys_and_values_of_another_dtype_are_read_in_the_querys(kv_dtype):
    """torch's eager rule: computed, output in the query's dtype (no TypeError)."""
    q, k, v = qkv(T=48, dtype=torch.float32)
    k, v = k.to(kv_dtype), v.to(kv_dtype)
    out = attnkit.flex_attention(q, k, v, block_mask=attnkit.create_block_mask(
        causal, None, None, 48, 48, BLOCK_SIZE=16))
    assert out.dtype == torch.float32
    ref = math_ref(q.double(), k.to(torch.float32).double(), v.to(torch.float32).double(), causal)
    torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out, TF.flex_attention(q, k, v, block_mask=TF.create_block_mask(
        causal, None, None, 48, 48, device="cpu", BLOCK_SIZE=16)), rtol=1e-5, atol=1e-6)


def test_aux_outputs_lse_and_max_scores():
    """return_aux serves lse and max_scores (torch's CPU build refuses max_scores; its math
    definition is the reference), return_lse still works, with torch's deprecation."""
    from torch._higher_order_ops.flex_attention import math_attention

    def rel(score, b, h, q_idx, kv_idx):
        return score * 0.5 + 0.01 * (q_idx - kv_idx)

    q, k, v = qkv(B=2, T=70, S=90)
    bm = attnkit.create_block_mask(lambda b, h, qi, ki: (ki <= qi + 5) & (qi > 3), None, None,
                                   70, 90, BLOCK_SIZE=32)
    out, aux = attnkit.flex_attention(q, k, v, score_mod=rel, block_mask=bm,
                                      return_aux=F.AuxRequest(lse=True, max_scores=True))
    ref, lse2, max2 = math_attention(q, k, v, rel, bm.as_tuple(), 8 ** -0.5, {})
    torch.testing.assert_close(out, ref)
    torch.testing.assert_close(aux.lse, lse2 * math.log(2))
    torch.testing.assert_close(aux.max_scores, max2 * math.log(2))
    assert torch.isneginf(aux.max_scores[..., :4]).all()  # rows that see nothing
    _, only = attnkit.flex_attention(q, k, v, block_mask=bm,
                                     return_aux=F.AuxRequest(max_scores=True))
    assert only.lse is None and only.max_scores.shape == (2, 2, 70)
    attnkit.flex_checks._warned.discard("return_lse")
    with pytest.warns(FutureWarning, match="return_lse is deprecated"):
        _, lse = attnkit.flex_attention(q, k, v, score_mod=rel, block_mask=bm, return_lse=True)
    torch.testing.assert_close(lse, aux.lse)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # once per process, as torch
        attnkit.flex_attention(q, k, v, block_mask=bm, return_lse=True)
    with pytest.raises(ValueError, match="Cannot specify both return_lse and return_aux"):
        attnkit.flex_attention(q, k, v, return_lse=True, return_aux=F.AuxRequest(lse=True))


def test_input_errors_are_torchs():
    q, k, v = qkv(T=8)
    cases = [
        ((q, k[..., :4], v), {}, ValueError,
         r"Expect query and key/value to have the same embedding dimension but got E=8 and E=4"),
        ((q[0], k[0], v[0]), {}, NotImplementedError, "NYI: query, key, and value must be 4D"),
        ((q, k[:, :1], v[:, :1]), {}, ValueError,
         r"same number of heads but got Hq=2 and Hkv=1\. Try setting enable_gqa=True"),
        ((q, k[:, :1].expand(1, 3, 8, 8), v[:, :1].expand(1, 3, 8, 8)), {"enable_gqa": True},
         ValueError, r"multiple of kv heads for GQA but got Hq=2 and Hkv=3"),
        ((q, k, v), {"kernel_options": {"BACKEND": "FAST"}}, ValueError,
         "Invalid BACKEND value 'FAST'"),
        ((q, k, v), {"kernel_options": {"BACKEND": "AUTO", "FORCE_USE_FLEX_ATTENTION": True}},
         RuntimeError, "BACKEND cannot be combined with legacy FORCE_USE_FLEX_ATTENTION"),
        ((q, k, v), {"block_mask": torch.ones(8, 8)}, TypeError, "block_mask must be a BlockMask"),
        ((q, k, v), {"score_mod": 3}, TypeError, "score_mod must be a callable"),
    ]
    for args, kwargs, error, match in cases:
        with pytest.raises(error, match=match):
            attnkit.flex_attention(*args, **kwargs)
        if error is not TypeError:  # torch raises the same
            with pytest.raises(error, match=match):
                TF.flex_attention(*args, **kwargs)
    with pytest.raises(TypeError, match="block_mask must be a BlockMask"):
        attnkit.attention(q, k, v, block_mask="causal")


# --- attention() and explain() take block_mask= ------------------------------------------------

def test_attention_and_explain_take_a_block_mask():
    """attnkit.flex_attention(q, k, v, score_mod, block_mask) is attention(q, k, v,
    block_mask=..., score_mod=...), and explain() with the same arguments says which
    backend runs it; the block mask joins the other mask arguments."""
    def rel(score, b, h, q_idx, kv_idx):
        return score - 0.02 * (q_idx - kv_idx).abs()

    q, k, v = qkv(T=300)
    bm = TF.create_block_mask(causal, None, None, 300, 300, device="cpu")
    got = attnkit.attention(q, k, v, block_mask=bm, score_mod=rel)
    torch.testing.assert_close(got, attnkit.flex_attention(q, k, v, score_mod=rel,
                                                           block_mask=bm))
    torch.testing.assert_close(got, math_ref(q, k, v, causal, rel))
    ex = attnkit.explain(q, k, v, block_mask=bm, score_mod=rel)
    assert ex.chosen in ex.estimates and ex.description.startswith("causal")
    ex = attnkit.explain(q, k, v, block_mask=attnkit.create_block_mask(
        M.sliding_window(32), None, None, 300, 300))
    assert "window(left=32, right=0)" in str(ex)
    both = attnkit.attention(q, k, v, block_mask=bm, window=17)  # ANDed
    torch.testing.assert_close(both, math_ref(q, k, v, M.sliding_window(16)))
    with pytest.raises(ValueError, match="pass either spec= or the mask/score arguments"):
        attnkit.attention(q, k, v, block_mask=bm, spec=M.MaskSpec())
    with pytest.raises(ValueError, match="created for a smaller length"):
        attnkit.explain(*qkv(T=301), block_mask=bm)
