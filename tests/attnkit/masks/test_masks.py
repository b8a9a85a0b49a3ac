"""Tier 1: mask builders and MaskSpec truth tables and errors."""

import pytest
import torch

import attnkit
import attnkit.spec
from attnkit import masks as M

from attnkit.masks import (
    MaskSpec,
    causal_mask,
    combine_masks,
    padding_mask_from_lengths,
    sliding_window_mask,
)


def _grid(rows):
    return torch.tensor([[c == "1" for c in r] for r in rows])


def test_causal_top_left_truth_table():
    expected = _grid(["10000", "11000", "11100"])
    torch.testing.assert_close(causal_mask(3, 5), expected)


def test_causal_bottom_right_truth_table():
    expected = _grid(["11100", "11110", "11111"])
    torch.testing.assert_close(causal_mask(3, 5, align="bottom_right"), expected)


def test_alignments_agree_when_square():
    torch.testing.assert_close(causal_mask(6), causal_mask(6, 6, align="bottom_right"))


def test_sliding_window_truth_table():
    expected = _grid(["10000", "11000", "01100", "00110", "00011"])
    torch.testing.assert_close(sliding_window_mask(5, 5, 2), expected)


def test_sliding_window_bottom_right_counts():
    m = sliding_window_mask(2, 6, 3, align="bottom_right")
    torch.testing.assert_close(m, _grid(["001110", "000111"]))


def test_window_one_is_diagonal():
    torch.testing.assert_close(sliding_window_mask(4, 4, 1), torch.eye(4, dtype=torch.bool))


def test_padding_from_lengths():
    expected = _grid(["1110", "1000"])
    torch.testing.assert_close(padding_mask_from_lengths(torch.tensor([3, 1]), 4), expected)


def test_combine_masks_and_none():
    a, b = _grid(["10", "11"]), _grid(["11", "01"])
    torch.testing.assert_close(combine_masks(a, None, b), _grid(["10", "01"]))
    assert combine_masks(None, None) is None


def test_spec_dense_combines_everything():
    kpm = _grid(["1110", "1111"])
    spec = MaskSpec.from_args(causal=True, key_padding_mask=kpm)
    dense = spec.dense(4, 4)
    assert dense.shape == (2, 1, 4, 4)
    torch.testing.assert_close(dense[0, 0], causal_mask(4) & kpm[0])
    torch.testing.assert_close(dense[1, 0], causal_mask(4))


def test_window_has_one_definition():
    """An int w is (w - 1, 0): the w most recent keys; a pair is flash-attn's (left, right)."""
    for spelling in (3, (2, 0), [2, 0]):
        mod = MaskSpec.from_args(window=spelling).mask_mod
        assert (mod.left, mod.right) == (2, 0)
    assert MaskSpec.from_args(window=(None, 4)).mask_mod.left is None
    assert MaskSpec.from_args(window=(-1, 4)).mask_mod.left is None
    torch.testing.assert_close(MaskSpec.from_args(window=3).dense(6, 6)[0, 0],
                               sliding_window_mask(6, window=3))
    assert MaskSpec.from_args().mask_mod is None and MaskSpec.from_args().dense(3, 3) is None


def test_lowering_recognises_causal_whatever_the_spelling():
    lower = attnkit.spec.lower
    for mod in (M.causal(), M.causal(align="bottom_right"), M.sliding_window(None, 0),
                M.sliding_window(100, 0), M.causal() & M.sliding_window(50),
                M.at_positions(M.causal(), 3, 3), M.causal(offset=0)):
        assert lower(mod, 8, 8)[1] == 0, mod.describe()
    assert lower(M.causal(align="bottom_right"), 3, 8)[1] == 5
    assert lower(M.causal(offset=7), 3, 8)[0] is None  # every query past the last key
    assert lower(M.sliding_window(None, None), 5, 5)[0] is None
    assert lower(M.key_padding(torch.ones(2, 5, dtype=torch.bool)), 5, 5)[0] is None
    assert lower(M.sliding_window(2), 8, 8)[1] is None  # a real window stays one


@pytest.mark.parametrize("window", [0, -2, 1.5, True])
def test_bad_window(window):
    with pytest.raises(ValueError, match="window must be a positive int"):
        MaskSpec.from_args(window=window)


def test_bad_window_builder():
    with pytest.raises(ValueError, match="window must be a positive int"):
        sliding_window_mask(3, 3, 0)


def test_bad_alignment():
    with pytest.raises(ValueError, match="causal_align must be one of"):
        MaskSpec.from_args(causal=True, causal_align="top_right")
    with pytest.raises(ValueError, match="causal_align must be one of"):
        causal_mask(3, 3, align="middle")


def test_non_bool_masks():
    with pytest.raises(TypeError, match="key_padding_mask must be a bool tensor"):
        MaskSpec.from_args(key_padding_mask=torch.ones(2, 3))
    with pytest.raises(TypeError, match="mask must be a bool tensor"):
        MaskSpec.from_args(mask=torch.ones(3, 3, dtype=torch.int64))


def test_validate_shapes():
    with pytest.raises(ValueError, match=r"key_padding_mask must have shape \(B, S\)"):
        MaskSpec.from_args(key_padding_mask=torch.ones(2, 5, dtype=torch.bool)).validate(2, 4, 3, 6)
    with pytest.raises(ValueError, match="does not broadcast to"):
        MaskSpec.from_args(mask=torch.ones(3, 5, dtype=torch.bool)).validate(2, 4, 3, 6)
    with pytest.raises(ValueError, match="does not broadcast to"):
        MaskSpec.from_args(mask=torch.ones(1, 1, 1, 3, 6, dtype=torch.bool)).validate(2, 4, 3, 6)
    MaskSpec.from_args(mask=torch.ones(4, 1, 6, dtype=torch.bool)).validate(2, 4, 3, 6)  # broadcasts


# --- #23: MaskSpec's old keywords (before the one-description change) still work --------------

def _same(a, b, T=6, S=9, B=2, H=3):
    """Two specs describe the same call: same description, same dense mask, same scores."""
    assert type(a.mask_mod) is type(b.mask_mod) and type(a.score_mod) is type(b.score_mod)
    if a.mask_mod is not None:
        assert a.mask_mod.describe() == b.mask_mod.describe()
    assert a.sinks is b.sinks
    da, db = a.dense(T, S, B=B, H=H), b.dense(T, S, B=B, H=H)
    assert (da is None) == (db is None)
    if da is not None:
        assert torch.equal(da, db)
    assert (a.score_mod is None) == (b.score_mod is None)
    if a.score_mod is not None:
        s = torch.randn(B, H, T, S, generator=torch.Generator().manual_seed(0))
        torch.testing.assert_close(a.score_mod.resolve(T, S).tile(s, 0, T, 0, S),
                                   b.score_mod.resolve(T, S).tile(s, 0, T, 0, S))


@pytest.mark.parametrize("kwargs", [
    dict(causal=True, causal_align="bottom_right"),
    dict(causal=True),
    dict(window=3, causal_align=2),
    dict(window=(2, 1)),
    dict(key_padding_mask=torch.tensor([[True] * 7 + [False] * 2, [True] * 9])),
    dict(mask=torch.rand(6, 9, generator=torch.Generator().manual_seed(1)) > 0.3, causal=True),
    dict(softcap=5.0, alibi_slopes=torch.tensor([0.5, 0.25, 0.125]), causal=True),
    dict(bias=torch.randn(1, 3, 6, 9, generator=torch.Generator().manual_seed(2))),
])
def test_old_constructor_keywords_warn_and_equal_from_args(kwargs):
    sinks = torch.tensor([0.1, 0.2, 0.3])
    with pytest.warns(DeprecationWarning, match=r"is deprecated: MaskSpec holds \(mask_mod, "
                                                r"score_mod, sinks\); build it from these "
                                                r"arguments with MaskSpec.from_args\("):
        old = MaskSpec(sinks=sinks, **kwargs)
    _same(old, MaskSpec.from_args(sinks=sinks, **kwargs))
    with pytest.warns(DeprecationWarning):  # and together with the new ones
        both = MaskSpec(mask_mod=M.prefix_lm(2), **kwargs)
    _same(both, MaskSpec.from_args(mask_mod=M.prefix_lm(2), **kwargs))


def test_old_constructor_errors_and_no_warning_for_the_new_form():
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        MaskSpec(mask_mod=M.causal(), score_mod=None, sinks=None)
        MaskSpec(M.causal())
    with pytest.raises(TypeError, match=r"unexpected keyword argument\(s\) \['casual'\]; it "
                                        r"takes mask_mod, score_mod, sinks \(or, deprecated, "
                                        r"causal, causal_align"):
        MaskSpec(casual=True)
    with pytest.raises(TypeError, match=r"first argument is mask_mod .* got the bool True: the "
                                        r"old positional causal; write "
                                        r"MaskSpec.from_args\(causal=True, ...\)"):
        MaskSpec(True)
    with pytest.warns(DeprecationWarning), pytest.raises(TypeError, match="causal must be a bool"):
        MaskSpec(causal=1)
    # the result is an ordinary spec: attention takes it
    q = torch.randn(1, 2, 5, 4, dtype=torch.float64)
    k = v = torch.randn(1, 2, 8, 4, dtype=torch.float64)
    with pytest.warns(DeprecationWarning):
        spec = MaskSpec(causal=True, causal_align="bottom_right")
    torch.testing.assert_close(attnkit.attention(q, k, v, spec=spec),
                               attnkit.attention(q, k, v, causal=True,
                                                 causal_align="bottom_right"))
