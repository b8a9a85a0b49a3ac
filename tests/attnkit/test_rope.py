"""RoPE against a direct rotation formula, its relative-position property, and its errors."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from attnkit.rope import RoPE


def rotate_by_formula(x, positions, base=10000.0, scaling=1.0):
    """Pair (i, i + D/2) of position p rotated by p/scaling * base^(-2i/D), one pair at a time."""
    out = x.clone()
    D = x.shape[-1]
    half = D // 2
    for t, p in enumerate(positions.tolist()):
        for i in range(half):
            angle = p / scaling * base ** (-2 * i / D)
            a, b = x[..., t, i], x[..., t, i + half]
            out[..., t, i] = a * math.cos(angle) - b * math.sin(angle)
            out[..., t, i + half] = b * math.cos(angle) + a * math.sin(angle)
    return out


@pytest.mark.parametrize("D,base,scaling", [(8, 10000.0, 1.0), (6, 500.0, 1.0), (4, 10000.0, 4.0)])
def test_matches_rotation_formula(D, base, scaling):
    x = torch.randn(2, 3, 5, D, dtype=torch.float64)
    positions = torch.tensor([0, 1, 7, 30, 1000])
    out = RoPE(D, base, scaling=scaling)(x, positions)
    torch.testing.assert_close(out, rotate_by_formula(x, positions, base, scaling))


def test_position_zero_is_identity_and_norms_are_kept():
    x = torch.randn(1, 2, 4, 16, dtype=torch.float64)
    rope = RoPE(16)
    torch.testing.assert_close(rope(x, torch.zeros(4, dtype=torch.long)), x)
    rotated = rope(x, torch.arange(100, 104))
    assert not torch.allclose(rotated, x)
    torch.testing.assert_close(rotated.norm(dim=-1), x.norm(dim=-1))


@settings(max_examples=25, deadline=None)
@given(m=st.integers(0, 5000), n=st.integers(0, 5000), shift=st.integers(-5000, 5000))
def test_score_depends_only_on_relative_position(m, n, shift):
    shift = max(shift, -min(m, n))  # keep positions non-negative
    g = torch.Generator().manual_seed(m * 7919 + n)
    q, k = torch.randn(2, 1, 1, 1, 32, generator=g, dtype=torch.float64)
    rope = RoPE(32)

    def score(a, b):
        return (rope(q, torch.tensor([a])) * rope(k, torch.tensor([b]))).sum()

    torch.testing.assert_close(score(m + shift, n + shift), score(m, n))


def test_score_changes_with_relative_position():
    q = k = torch.ones(1, 1, 1, 8, dtype=torch.float64)
    rope = RoPE(8)
    scores = [(rope(q, torch.tensor([d])) * rope(k, torch.tensor([0]))).sum() for d in range(4)]
    assert len({round(float(s), 9) for s in scores}) == 4


def test_per_sample_positions_match_shared_positions():
    x = torch.randn(2, 3, 4, 8)
    rope = RoPE(8)
    per_sample = rope(x, torch.tensor([[0, 1, 2, 3], [5, 6, 7, 8]]))
    torch.testing.assert_close(per_sample[0], rope(x[:1], torch.arange(4))[0])
    torch.testing.assert_close(per_sample[1], rope(x[1:], torch.arange(5, 9))[0])


def test_scaling_divides_positions():
    x = torch.randn(1, 2, 3, 8, dtype=torch.float64)
    torch.testing.assert_close(RoPE(8, scaling=2.0)(x, torch.tensor([0, 4, 10])),
                               RoPE(8)(x, torch.tensor([0, 2, 5])))


def test_bfloat16_stays_bfloat16_and_rounds_once():
    x = torch.randn(1, 2, 64, 32).bfloat16()
    positions = torch.arange(3000, 3064)
    out = RoPE(32)(x, positions)
    assert out.dtype == torch.bfloat16
    exact = RoPE(32)(x.double(), positions)
    # One rounding to bfloat16 (relative 2^-8) of values of size |x|.
    assert (out.double() - exact).abs().max() <= 2 ** -8 * exact.abs().max()


def test_no_state_in_state_dict():
    assert RoPE(8).state_dict() == {}
    assert "head_dim=8" in repr(RoPE(8))


@pytest.mark.parametrize("kwargs,match", [
    ({"head_dim": 7}, "positive even int"),
    ({"head_dim": 0}, "positive even int"),
    ({"head_dim": 8, "base": 1.0}, "base must be > 1"),
    ({"head_dim": 8, "scaling": 0.0}, "scaling must be > 0"),
])
def test_constructor_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        RoPE(**kwargs)


def test_call_errors():
    rope = RoPE(8)
    with pytest.raises(ValueError, match=r"x must be \(B, H, T, head_dim=8\)"):
        rope(torch.randn(2, 5, 8), torch.arange(5))
    with pytest.raises(ValueError, match=r"x must be \(B, H, T, head_dim=8\)"):
        rope(torch.randn(1, 2, 5, 6), torch.arange(5))
    with pytest.raises(ValueError, match=r"positions must have shape \(T,\) = \(5,\)"):
        rope(torch.randn(1, 2, 5, 8), torch.arange(4))
