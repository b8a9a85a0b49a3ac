"""Rotary position embedding (RoPE), applied with explicit positions.

RoPE (Su et al., 2021, "RoFormer") encodes position ``m`` by rotating pairs of features of a
query or key by the angles ``m * theta_i``, ``theta_i = base ** (-2i / D)``. Rotations
compose, so the score between a query rotated to ``m`` and a key rotated to ``n`` depends on
the positions only through ``m - n``: relative positions, with no learned table.

Positions are always explicit. A module decoding with a KV cache passes the cache's offset,
so the token written at slot ``p`` is rotated by ``p`` whether it arrived in the prompt or
one step at a time.

Pairing convention: feature ``i`` is paired with feature ``i + D/2`` ("rotate half", as in
GPT-NeoX and Hugging Face Llama), not with ``i + 1`` (the interleaved layout of the original
Meta Llama code). The two differ by a fixed permutation of the projection weights.

Shape letters: ``B`` batch, ``H`` heads, ``T`` positions, ``D`` head dim.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

__all__ = ["RoPE"]


class RoPE(nn.Module):
    """Rotates queries and keys by their positions.

    The cos/sin tables are computed on each call from the positions (``T x D/2`` values,
    negligible next to attention), so there is no maximum length, nothing to move between
    devices, and casting the model to bfloat16 cannot coarsen the frequencies.

    Args:
        head_dim: ``D``, the feature size of one head; must be even (features rotate in pairs).
        base: the wavelength base ``theta``; larger bases suit longer contexts.
        scaling: linear position interpolation: positions are divided by this factor, so a
            model trained at length ``L`` can be run at ``L * scaling`` (Chen et al., 2023).

    Raises:
        ValueError: odd or non-positive ``head_dim``, ``base <= 1`` or ``scaling <= 0``.
    """

    def __init__(self, head_dim: int, base: float = 10000.0, *, scaling: float = 1.0):
        super().__init__()
        if not isinstance(head_dim, int) or head_dim < 2 or head_dim % 2:
            raise ValueError(f"head_dim must be a positive even int (RoPE rotates feature "
                             f"pairs), got {head_dim!r}")
        if not base > 1.0:
            raise ValueError(f"base must be > 1, got {base!r}")
        if not scaling > 0.0:
            raise ValueError(f"scaling must be > 0, got {scaling!r}")
        self.head_dim, self.base, self.scaling = head_dim, float(base), float(scaling)

    def extra_repr(self) -> str:
        return f"head_dim={self.head_dim}, base={self.base:g}, scaling={self.scaling:g}"

    def angles(self, positions: Tensor,
               dtype: torch.dtype = torch.float32) -> tuple[Tensor, Tensor]:
        """cos and sin of ``position * theta_i`` for every position and pair.

        Args:
            positions: integer or float positions, shape ``(T,)`` or ``(B, T)``.
            dtype: dtype of the tables (float32, or float64 for exact tests).

        Returns:
            ``(cos, sin)``, each ``positions.shape + (D/2,)``.
        """
        half = self.head_dim // 2
        exponent = torch.arange(half, dtype=dtype, device=positions.device) / half
        inv_freq = self.base ** -exponent  # (D/2,): theta_i = base^(-2i/D)
        angle = (positions.to(dtype) / self.scaling).unsqueeze(-1) * inv_freq  # (..., T, D/2)
        return angle.cos(), angle.sin()

    def forward(self, x: Tensor, positions: Tensor) -> Tensor:
        """Rotate ``x`` by ``positions``.

        Args:
            x: queries or keys ``(B, H, T, D)``.
            positions: ``(T,)`` shared by the batch, or ``(B, T)`` per sample (left-padded
                batches); integer positions, e.g. ``torch.arange(offset, offset + T)``.

        Returns:
            The rotated tensor, same shape and dtype as ``x`` (rotation runs in at least
            float32, so bfloat16 inputs are rounded once).

        Raises:
            ValueError: ``x`` not 4-D, its last dim not ``head_dim``, or ``positions`` not
                ``(T,)`` / ``(B, T)``.
        """
        if x.dim() != 4 or x.shape[-1] != self.head_dim:
            raise ValueError(f"x must be (B, H, T, head_dim={self.head_dim}), got shape "
                             f"{tuple(x.shape)}")
        B, _, T, _ = x.shape
        if tuple(positions.shape) not in ((T,), (B, T)):
            raise ValueError(f"positions must have shape (T,) = ({T},) or (B, T) = ({B}, {T}), "
                             f"got {tuple(positions.shape)}")
        compute = torch.promote_types(x.dtype, torch.float32)
        cos, sin = self.angles(positions, compute)  # (T, D/2) or (B, T, D/2)
        if positions.dim() == 2:
            cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)  # (B, 1, T, D/2): shared by heads
        x1, x2 = x.to(compute).chunk(2, dim=-1)  # (B, H, T, D/2) each: the pairs (i, i + D/2)
        rotated = torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)  # (B, H, T, D)
        return rotated.to(x.dtype)
