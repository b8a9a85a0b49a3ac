"""FlexAttention's own gallery (the PyTorch blog "FlexAttention: The Flexibility of PyTorch
with the Performance of FlashAttention" and attention-gym), ported unchanged: each entry is
the torch ``mask_mod`` / ``score_mod`` as written there, run through
``attnkit.flex_attention`` with torch's ``create_block_mask`` and with attnkit's.

References: torch's eager ``flex_attention`` in float64 (forward; it has no CPU backward),
attnkit's float64 math path (forward and backward), and one compiled FlexAttention call
(float32 forward; one compile, skipped where flex cannot compile here)."""


import pytest
import torch

import attnkit

flex_mod = pytest.importorskip("torch.nn.attention.flex_attention",
                               reason="this torch has no FlexAttention")
torch_flex, torch_cbm = flex_mod.flex_attention, flex_mod.create_block_mask
# torch's eager flex (the reference here) warns that it is unfused, and about return_lse.
pytestmark = [pytest.mark.filterwarnings("ignore:flex_attention called without"),
              pytest.mark.filterwarnings("ignore:return_lse is deprecated")]

B, H, T, D = 2, 4, 200, 16
WINDOW, PREFIX = 48, 37
_g = torch.Generator().manual_seed(0)
DOCUMENT_ID = torch.repeat_interleave(torch.arange(5), torch.tensor([30, 70, 1, 60, 39]))
RANDOM_MASK = torch.rand(T, T, generator=_g) > 0.6
ALIBI = torch.tensor([2.0 ** (-8 * (i + 1) / H) for i in range(H)])


# --- mask_mods, as written in the FlexAttention blog / attention-gym --------------------------

def causal(b, h, q_idx, kv_idx):
    return q_idx >= kv_idx


def sliding_window_causal(b, h, q_idx, kv_idx):
    causal_mask = q_idx >= kv_idx
    window_mask = q_idx - kv_idx <= WINDOW
    return causal_mask & window_mask


def prefix_lm_causal(b, h, q_idx, kv_idx):
    return (kv_idx <= PREFIX) | (q_idx >= kv_idx)


def document_causal(b, h, q_idx, kv_idx):
    causal_mask = q_idx >= kv_idx
    document_mask = DOCUMENT_ID[q_idx] == DOCUMENT_ID[kv_idx]
    return causal_mask & document_mask


def random_mask(b, h, q_idx, kv_idx):
    return RANDOM_MASK[q_idx, kv_idx] | (q_idx == kv_idx)


def dilated_sliding_window(b, h, q_idx, kv_idx):
    diff = torch.abs(q_idx - kv_idx)
    in_window = diff <= WINDOW
    is_dilated = (diff % 3) == 0
    return in_window & is_dilated


# --- score_mods -------------------------------------------------------------------------------

def relative_positional(score, b, h, q_idx, kv_idx):
    return score + (q_idx - kv_idx) * 0.05


def alibi(score, b, h, q_idx, kv_idx):
    bias = ALIBI[h] * (kv_idx - q_idx)
    return score + bias


def soft_cap(score, b, h, q_idx, kv_idx):
    score = score / 2.0
    score = torch.tanh(score)
    return score * 2.0


def tanh(score, b, h, q_idx, kv_idx):
    return torch.tanh(score)


GALLERY = {
    "full": (None, None),
    "causal": (causal, None),
    "sliding_window": (sliding_window_causal, None),
    "prefix_lm": (prefix_lm_causal, None),
    "documents": (document_causal, None),
    "random": (random_mask, None),
    "dilated": (dilated_sliding_window, None),
    "alibi": (causal, alibi),
    "softcap": (causal, soft_cap),
    "relative_position": (None, relative_positional),
    "tanh": (None, tanh),
    "documents_alibi_softcap": (document_causal,
                                lambda s, b, h, q, k: soft_cap(alibi(s, b, h, q, k), b, h, q, k)),
}


def qkv(dtype=torch.float64, grad=False):
    g = torch.Generator().manual_seed(1)
    return [torch.randn(B, H, T, D, generator=g, dtype=dtype).requires_grad_(grad)
            for _ in range(3)]


@pytest.mark.parametrize("maker", ["torch", "attnkit"])
@pytest.mark.parametrize("name", sorted(GALLERY))
def test_gallery_forward_matches_torch_eager(name, maker):
    mask_mod, score_mod = GALLERY[name]
    q, k, v = qkv()
    make = torch_cbm if maker == "torch" else attnkit.create_block_mask
    kwargs = {"device": "cpu"} if maker == "torch" else {}
    bm = None if mask_mod is None else make(mask_mod, None, None, T, T, **kwargs)
    torch_bm = None if mask_mod is None else torch_cbm(mask_mod, None, None, T, T,
                                                       device="cpu")
    ref, ref_lse = torch_flex(q, k, v, score_mod=score_mod, block_mask=torch_bm,
                              return_lse=True)
    out, lse = attnkit.flex_attention(q, k, v, score_mod=score_mod, block_mask=bm,
                                      return_lse=True)
    torch.testing.assert_close(out, ref)
    torch.testing.assert_close(lse, ref_lse)


@pytest.mark.parametrize("name", sorted(GALLERY))
def test_gallery_gradients_match_float64_math(name):
    mask_mod, score_mod = GALLERY[name]
    q, k, v = qkv(grad=True)
    bm = None if mask_mod is None else torch_cbm(mask_mod, None, None, T, T, device="cpu")
    out = attnkit.flex_attention(q, k, v, score_mod=score_mod, block_mask=bm)
    ref = attnkit.attention(q, k, v, mask_mod=mask_mod, score_mod=score_mod, backend="math")
    torch.testing.assert_close(out, ref)
    g = torch.randn_like(ref)
    for a, b in zip(torch.autograd.grad(out, (q, k, v), g),
                    torch.autograd.grad(ref, (q, k, v), g)):
        torch.testing.assert_close(a, b)


def test_gallery_block_masks_list_what_torch_lists():
    """attnkit's create_block_mask gives torch's listing, tensor for tensor (its tiles are
    exact for every gallery entry), and torch's flex_attention takes it."""
    for name, (mask_mod, _) in GALLERY.items():
        if mask_mod is None:
            continue
        ref = torch_cbm(mask_mod, None, None, T, T, device="cpu", BLOCK_SIZE=32)
        got = attnkit.create_block_mask(mask_mod, None, None, T, T, BLOCK_SIZE=32)
        for attr in ("kv_num_blocks", "kv_indices", "full_kv_num_blocks", "full_kv_indices",
                     "q_num_blocks", "q_indices", "full_q_num_blocks", "full_q_indices"):
            assert torch.equal(getattr(got, attr), getattr(ref, attr)), (name, attr)
        assert got.mask_mod is mask_mod and got.shape == ref.shape


def _flex_unavailable():
    from attnkit.backends import flex
    return flex._unavailable("cpu")


@pytest.mark.skipif(_flex_unavailable() is not None,
                    reason=f"compiled flex unavailable: {_flex_unavailable()}")
def test_gallery_entry_matches_compiled_flex():
    """One compile: documents + ALiBi + softcap, float32, against torch.compile(flex)."""
    mask_mod, score_mod = GALLERY["documents_alibi_softcap"]
    q, k, v = qkv(dtype=torch.float32)
    bm = torch_cbm(mask_mod, None, None, T, T, device="cpu")
    compiled = torch.compile(torch_flex, dynamic=False)
    with torch.no_grad():
        ref = compiled(q, k, v, score_mod=score_mod, block_mask=bm)
        out = attnkit.flex_attention(q, k, v, score_mod=score_mod, block_mask=bm)
        ours = attnkit.flex_attention(q, k, v, score_mod=score_mod,
                                      block_mask=attnkit.create_block_mask(mask_mod, None, None,
                                                                           T, T))
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=2e-5)
    torch.testing.assert_close(ours, ref, rtol=1e-4, atol=2e-5)
