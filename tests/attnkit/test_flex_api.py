"""attnkit.flex_attention and attnkit.create_block_mask: torch's signature and semantics, run
eagerly (nothing here compiles). References: torch's *eager* flex_attention in float64 (the
dense definition of FlexAttention's semantics, forward only on CPU) and attnkit's float64
math path (forward and backward)."""


import pytest
import torch

import attnkit
from attnkit import masks as M
from attnkit.flex_api import BlockGrid, TorchMaskFn
from attnkit.summary import EMPTY, FULL, PARTIAL

flex_mod = pytest.importorskip("torch.nn.attention.flex_attention",
                               reason="this torch has no FlexAttention")
torch_flex, torch_cbm = flex_mod.flex_attention, flex_mod.create_block_mask
# torch's eager flex (the reference here) warns that it is unfused, and about return_lse.
pytestmark = [pytest.mark.filterwarnings("ignore:flex_attention called without"),
              pytest.mark.filterwarnings("ignore:return_lse is deprecated")]


def qkv(B=2, H=4, Hkv=4, T=300, S=None, D=16, grad=False, seed=0):
    g = torch.Generator().manual_seed(seed)
    S = T if S is None else S
    out = [torch.randn(B, h, n, D, generator=g, dtype=torch.float64)
           for h, n in ((H, T), (Hkv, S), (Hkv, S))]
    return [t.requires_grad_(grad) for t in out]


def causal(b, h, q, kv):
    return q >= kv


def test_signature_matches_torch():
    import inspect
    ours = list(inspect.signature(attnkit.flex_attention).parameters)
    theirs = list(inspect.signature(torch_flex).parameters)
    assert ours == theirs


@pytest.mark.parametrize("block", [128, (128, 64), (32, 48)])
def test_torch_block_mask_matches_torch_eager(block):
    q, k, v = qkv()
    doc = torch.randint(0, 4, (300,), generator=torch.Generator().manual_seed(1)).sort().values

    def doc_causal(b, h, qi, ki):
        return (doc[qi] == doc[ki]) & (qi >= ki)

    def rel(score, b, h, qi, ki):
        return score + 0.05 * (qi - ki) / (h + 1)

    bm = torch_cbm(doc_causal, None, None, 300, 300, device="cpu", BLOCK_SIZE=block)
    ref, ref_lse = torch_flex(q, k, v, score_mod=rel, block_mask=bm, return_lse=True)
    out, lse = attnkit.flex_attention(q, k, v, score_mod=rel, block_mask=bm, return_lse=True)
    torch.testing.assert_close(out, ref)
    torch.testing.assert_close(lse, ref_lse)


def test_block_structure_is_authoritative_like_torch():
    """A hand-made BlockMask: unlisted tiles hidden, full tiles visible whatever mask_mod
    says, mask_mod only inside partial tiles (the compiled kernel's semantics; torch's eager
    path evaluates mask_mod everywhere instead); per-head sparsity (H=2) kept."""
    q, k, v = qkv(B=1, H=2, Hkv=2, T=256, S=256)
    # head 0: tile (0, 0) partial, tile (1, 1) full; head 1: tile (1, 0) full.
    kv_num = torch.tensor([[[1, 0], [0, 0]]], dtype=torch.int32)
    kv_idx = torch.tensor([[[[0, 0], [0, 0]], [[0, 0], [0, 0]]]], dtype=torch.int32)
    full_num = torch.tensor([[[0, 1], [0, 1]]], dtype=torch.int32)
    full_idx = torch.tensor([[[[0, 0], [1, 0]], [[0, 0], [0, 0]]]], dtype=torch.int32)
    bm = flex_mod.BlockMask.from_kv_blocks(kv_num, kv_idx, full_num, full_idx,
                                           mask_mod=lambda b, h, q, kv: q < kv)
    i = torch.arange(256)
    upper = i[:, None] < i[None, :]
    tile = torch.zeros(2, 256, 256, dtype=torch.bool)
    tile[0, :128, :128] = upper[:128, :128]
    tile[0, 128:, 128:] = True
    tile[1, 128:, :128] = True
    ref = attnkit.attention(q, k, v, mask=tile[None], backend="math")
    out = attnkit.flex_attention(q, k, v, block_mask=bm)
    torch.testing.assert_close(out, ref)
    assert out[0, 1, :128].abs().max() == 0  # head 1 sees nothing in its first rows


def test_gqa_lse_scale_and_rows_that_see_nothing():
    q, k, v = qkv(H=4, Hkv=2, T=64, S=80)
    bm = torch_cbm(lambda b, h, qi, ki: ki < qi, None, None, 64, 80, device="cpu")
    ref, ref_lse = torch_flex(q, k, v, block_mask=bm, scale=0.3, enable_gqa=True,
                              return_lse=True)
    out, lse = attnkit.flex_attention(q, k, v, block_mask=bm, scale=0.3, enable_gqa=True,
                                      return_lse=True)
    torch.testing.assert_close(out, ref)
    assert torch.isinf(lse[..., 0]).all() and (out[..., 0, :] == 0).all()  # row 0 sees nothing
    torch.testing.assert_close(lse[..., 1:], ref_lse[..., 1:])
    aux = flex_mod.AuxRequest(lse=True)
    _, got = attnkit.flex_attention(q, k, v, block_mask=bm, scale=0.3, enable_gqa=True,
                                    return_aux=aux)
    torch.testing.assert_close(got.lse, lse)


def test_no_mask_no_score_is_plain_attention():
    q, k, v = qkv(T=20)
    ref = torch.softmax(q @ k.transpose(-1, -2) / 4.0, -1) @ v
    torch.testing.assert_close(attnkit.flex_attention(q, k, v), ref)


def test_gradients_through_captured_bias_table():
    """A learnable relative-position bias captured by the score_mod gets its gradient
    (torch's compiled flex has no CPU backward at all)."""
    q, k, v = qkv(B=1, H=2, Hkv=2, T=40, grad=True)
    table = torch.randn(2, 79, dtype=torch.float64, requires_grad=True)

    def bias(score, b, h, qi, ki):
        return score + table[h, qi - ki + 39]

    bm = attnkit.create_block_mask(causal, None, None, 40, 40, BLOCK_SIZE=16)
    out = attnkit.flex_attention(q, k, v, score_mod=bias, block_mask=bm)
    ref = attnkit.attention(q, k, v, causal=True, score_mod=bias, backend="math")
    torch.testing.assert_close(out, ref)
    g = torch.randn_like(out)
    got = torch.autograd.grad(out, (q, k, v, table), g)
    want = torch.autograd.grad(ref, (q, k, v, table), g)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b)


def test_scalar_only_functions_run_under_vmap():
    """mask_mod / score_mod written for scalars (torch.where on 0-d tensors, .item()-free
    indexing) still work: the broadcast call fails, vmap takes over."""
    def scalar_mask(b, h, qi, kv):
        return torch.where(qi >= kv, torch.tensor(True), torch.tensor(False)).view(())

    def scalar_score(score, b, h, qi, kv):
        return score * torch.tensor(1.0, dtype=score.dtype).view(())

    q, k, v = qkv(B=1, H=2, Hkv=2, T=50)
    bm = torch_cbm(scalar_mask, None, None, 50, 50, device="cpu", BLOCK_SIZE=16)
    out = attnkit.flex_attention(q, k, v, score_mod=scalar_score, block_mask=bm)
    ref = attnkit.attention(q, k, v, causal=True, backend="math")
    torch.testing.assert_close(out, ref)


# --- create_block_mask -----------------------------------------------------------------------

def _torch_kind(bm):
    """torch BlockMask -> (B, H, nQ, nK) kind grid, for comparison."""
    from attnkit.block_mask import kinds_of
    return kinds_of(bm)


@pytest.mark.parametrize("name", ["causal", "window", "documents", "prefix", "dilated", "fn"])
def test_create_block_mask_matches_torch(name):
    T, S = 768, 640
    cu = [0, 100, 101, 420, 640]
    ids = torch.searchsorted(torch.tensor(cu[1:]), torch.arange(T), right=True).clamp(max=3)
    torch_mods = {
        "causal": causal,
        "window": lambda b, h, q, kv: (q >= kv) & (q - kv <= 200),
        "documents": lambda b, h, q, kv: (ids[q] == ids[kv]) & (q >= kv),
        "prefix": lambda b, h, q, kv: (kv < 300) | (q >= kv),
        "dilated": lambda b, h, q, kv: ((q - kv) % 3 == 0) & (q >= kv) & (q - kv <= 300),
        "fn": lambda b, h, q, kv: (q // 200) == (kv // 150),
    }
    ours_mods = {
        "causal": M.causal(), "window": M.sliding_window(200),
        "documents": M.documents(ids[None, :T], kv_document_ids=ids[None, :S]),
        "prefix": M.prefix_lm(300), "dilated": M.dilated(3, window=300),
        "fn": torch_mods["fn"],
    }
    ref = torch_cbm(torch_mods[name], None, None, T, S, device="cpu", BLOCK_SIZE=(128, 64))
    got = attnkit.create_block_mask(ours_mods[name], None, None, T, S, BLOCK_SIZE=(128, 64))
    assert got.BLOCK_SIZE == (128, 64) and got.seq_lengths == (T, S)
    assert torch.equal(got.summary.kind, _torch_kind(ref)[0, 0]), name
    # And it round-trips into torch's BlockMask with the same listing.
    back = _torch_kind(got.to_torch())
    assert torch.equal(back[0, 0], got.summary.kind)
    # At ragged lengths torch calls the edge tiles partial; ours may be finer, never coarser.
    ref = _torch_kind(torch_cbm(torch_mods[name], None, None, 700, 650, device="cpu",
                                BLOCK_SIZE=(128, 64)))[0, 0]
    mod = ours_mods[name]
    if name == "documents":
        mod = M.documents(ids[None, :700], kv_document_ids=ids[None, :650])
    got = attnkit.create_block_mask(mod, None, None, 700, 650, BLOCK_SIZE=(128, 64))
    kind = got.summary.kind
    assert torch.equal(kind == EMPTY, ref == EMPTY)
    assert ((kind == FULL) | (ref != FULL)).all()


def test_create_block_mask_evaluates_per_batch_and_head():
    """A mask_mod of b and h is decided over every (b, h) asked for: a tile is full only if
    it is full for all of them."""
    def per_head(b, h, q, kv):
        return (kv <= q) | (h == 1)

    got = attnkit.create_block_mask(per_head, None, 2, 256, 256, BLOCK_SIZE=64)
    assert (got.summary.kind.triu() == PARTIAL).sum() == 10  # diagonal and head 1's tiles
    below = torch.ones(4, 4, dtype=torch.bool).tril(-1)
    assert (got.summary.kind[below] == FULL).all()


def test_create_block_mask_builds_no_dense_mask_for_described_kinds():
    """64 documents at T=64k: interval arithmetic only (the mask function is never called)."""
    T = 65536
    cu = torch.linspace(0, T, 65).long().tolist()
    bm = attnkit.create_block_mask(M.documents(cu_seqlens=cu), None, None, T, T)
    c = bm.summary.counts()
    assert c["empty"] + c["partial"] + c["full"] == 512 * 512
    assert bm.sparsity() > 98


def test_errors():
    q, k, v = qkv(H=4, Hkv=2, T=10)
    with pytest.raises(ValueError, match="enable_gqa=True"):
        attnkit.flex_attention(q, k, v)
    with pytest.raises(TypeError, match="block_mask must be"):
        attnkit.flex_attention(q, k, v, block_mask=torch.ones(10, 10), enable_gqa=True)
    bm = attnkit.create_block_mask(causal, None, None, 12, 12)
    with pytest.raises(ValueError, match=r"block_mask was created for block_mask.shape=\(1, 1, "
                                         r"12, 12\) but got q_len=10 and kv_len=10"):
        attnkit.flex_attention(q, k, v, block_mask=bm, enable_gqa=True)
    with pytest.raises(ValueError, match="Q_LEN must be a positive int"):
        attnkit.create_block_mask(causal, None, None, 0, 12)
    with pytest.raises(ValueError, match="stride must be a positive int"):
        M.dilated(0)


# --- the dilated kind ------------------------------------------------------------------------

def test_dilated_truth_table_and_describe():
    grid = M.MaskSpec.from_args(mask_mod=M.dilated(2)).dense(5, 5)[0, 0]
    expected = torch.tensor([[c == "1" for c in r]
                             for r in ["10000", "01000", "10100", "01010", "10101"]])
    assert torch.equal(grid, expected)
    assert M.dilated(4, window=64).describe() == \
        "dilated(4) & window(left=64, right=None) & causal"


def test_dilated_plan_skips_off_lattice_tiles():
    """Tiles of 1 x 1 off the lattice are empty; wide tiles partial; stride 1 full."""
    bm = attnkit.create_block_mask(M.Dilated(3), None, None, 9, 9, BLOCK_SIZE=1)
    expected = M.MaskSpec.from_args(mask_mod=M.Dilated(3)).dense(9, 9)[0, 0]
    assert torch.equal(bm.summary.kind == FULL, expected)
    assert not (bm.summary.kind == PARTIAL).any()
    assert (attnkit.create_block_mask(M.Dilated(1), None, None, 9, 9).summary.kind == FULL).all()
    assert (attnkit.create_block_mask(M.Dilated(3), None, None, 9, 9, BLOCK_SIZE=4)
            .summary.kind != EMPTY).all()


@pytest.mark.parametrize("name, expected", [
    ("causal", "causal"), ("window", "window(left=63, right=0)"),
    ("two_sided", "window(left=20, right=5)"), ("documents", "causal & same_document(B=1)"),
    ("causal_b", None)])
def test_torch_block_masks_of_known_kinds_run_as_those_kinds(name, expected):
    """Causal, windows and documents are recognised (their mask_mod read, the block
    structure checked against the kind's), so plain causal reaches SDPA's is_causal;
    anything else stays the exact opaque grid."""
    from attnkit.flex_api import _from_torch
    doc = torch.arange(300) // 100
    mods = {
        "causal": causal,
        "window": lambda b, h, q, kv: (q >= kv) & (q - kv < 64),
        "two_sided": lambda b, h, q, kv: (kv - q <= 5) & (q - kv <= 20),
        "documents": lambda b, h, q, kv: (doc[q] == doc[kv]) & (q >= kv),
        "causal_b": lambda b, h, q, kv: (q >= kv) & ((b == 0) | (kv > 0)),  # differs for b=1
    }
    bm = torch_cbm(mods[name], None, None, 300, 300, device="cpu", BLOCK_SIZE=64)
    got = _from_torch(bm, 2, 4)
    if expected is None:
        assert isinstance(got, BlockGrid)
    else:
        assert got.describe() == expected
    if name == "causal_b":  # per-sample structure, so torch's eager path agrees with the kernel
        bm = torch_cbm(mods[name], 2, None, 300, 300, device="cpu", BLOCK_SIZE=64)
    q, k, v = qkv(T=300)
    torch.testing.assert_close(attnkit.flex_attention(q, k, v, block_mask=bm),
                               torch_flex(q, k, v, block_mask=bm))
    if name == "causal":
        assert attnkit.spec.lower(got, 300, 300)[1] == 0  # SDPA's is_causal


def test_a_mask_mod_returning_floats_is_a_type_error():
    q, k, v = qkv(B=1, H=2, Hkv=2, T=40)
    bm = attnkit.create_block_mask(M.causal(), None, None, 40, 40)
    bm.mask_mod = lambda b, h, qi, ki: (qi >= ki).float()  # a new mask_mod: read as torch does
    with pytest.raises(TypeError, match="bool"):
        attnkit.flex_attention(q, k, v, block_mask=bm)
    with pytest.raises(TypeError, match="bool"):
        attnkit.flex_attention(q, k, v, block_mask=M.MaskFn(lambda b, h, qi, ki: (qi >= ki).float()))
