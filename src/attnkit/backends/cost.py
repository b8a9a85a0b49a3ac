"""What a call costs on each built-in backend: the rules ``auto`` ranks by.

A :class:`Call` describes one ``attention()`` call (sizes, dtype, device, whether gradients
are needed, the :class:`~attnkit.masks.MaskSpec`) and can say which fraction of the ``T x S``
pairs lie in key blocks a block-sparse backend must visit (:meth:`Call.visited`, from the
mask description's block summaries, never a ``T x S`` tensor).

Each rule returns estimated seconds = FLOPs actually computed / a throughput + a per-call or
per-block overhead. The throughputs are relative figures for one CPU thread in float32,
read off ``benchmarks/bench_masks.py`` and ``bench_attention.py`` (docs/engine.md); what
matters for ``auto`` is their ratios, which hold roughly across thread counts:

* SDPA's fused kernel is the fastest per FLOP but computes every pair unless ``is_causal``
  applies, and a dense mask costs a ``T x S`` tensor plus a slower kernel path;
* chunked computes only the visited blocks: through its fused tiles (CPU, no score
  function) at about 0.75x SDPA's speed per FLOP plus a call per tile, otherwise through its
  block loop at about 0.4x plus Python overhead per block;
* flex (compiled) visits 128 x 128 blocks at about 1.6x SDPA's cost per FLOP, and its
  first call for a new shape or description compiles (seconds to tens of seconds);
* math materialises the scores: slowest per FLOP and ``B*H*T*S`` memory.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..masks import MaskSpec
from . import _fused_tiles

# FLOP/s of one CPU thread (float32), and fixed overheads in seconds.
SDPA_RATE = 40e9
SDPA_MASKED_SLOWDOWN = 1.3  # the masked kernel path, plus reading the mask
MASK_BUILD_S_PER_ELEMENT = 2e-9  # building a bool T x S mask and SDPA's float copy of it
CHUNKED_RATE = 16e9
CHUNKED_BLOCK_S = 4e-5  # Python and dispatch overhead per visited 512-key block
CHUNKED_FUSED_RATE = 30e9  # chunked's fused tiles: torch's CPU flash kernel per tile
FUSED_TILE_S = 1e-4
MATH_RATE = 8e9
FLEX_RATE = 22e9  # measured 22 GFLOP/s on its 128-granular blocks (bench_masks)
FLEX_COMPILE_S = 30.0  # first compile in a process (measured 26 s on this CPU)
BACKWARD_FACTOR = 3.5  # forward + backward over forward, for every backend
_SMALL = 1 << 20  # below this many T x S pairs, the block summary is not worth computing


@dataclass
class Call:
    """One ``attention()`` call, as the cost rules see it."""

    B: int
    H: int
    Hkv: int
    T: int
    S: int
    D: int
    dtype: torch.dtype
    device: torch.device
    grad: bool
    spec: MaskSpec
    _visited: dict = field(default_factory=dict, repr=False)

    def flops(self) -> float:
        """Dense forward FLOPs: ``q kᵀ`` and ``P v``."""
        return 4.0 * self.B * self.H * self.T * self.S * self.D

    def passes(self) -> float:
        return BACKWARD_FACTOR if self.grad else 1.0

    def visited(self, block_q: int, block_k: int) -> tuple[float, int]:
        """``(fraction of pairs in non-empty blocks, number of non-empty blocks)``."""
        key = (block_q, block_k)
        if key not in self._visited:
            self._visited[key] = self._summarise(block_q, block_k)
        return self._visited[key]

    def _summarise(self, block_q: int, block_k: int) -> tuple[float, int]:
        T, S = self.T, self.S
        n_blocks = -(-T // block_q) * -(-S // block_k)
        mod = self.spec.mask_mod_for(T, S)
        if mod is None or T * S == 0:
            return 1.0, n_blocks
        if self.spec.plain_causal(T, S) or torch.compiler.is_compiling() or T * S < _SMALL:
            frac = 0.5 if self.spec.plain_causal(T, S) else 1.0
            return frac, max(1, int(n_blocks * frac))
        some = mod.summary(T, S, block_q, block_k)[0].cpu()  # (nQ, nK)
        rows = (torch.arange(0, T, block_q) + block_q).clamp(max=T) - torch.arange(0, T, block_q)
        cols = (torch.arange(0, S, block_k) + block_k).clamp(max=S) - torch.arange(0, S, block_k)
        pairs = rows.view(-1, 1) * cols.view(1, -1)  # (nQ, nK) query-key pairs per block
        visited = float((pairs * some).sum()) / (T * S)
        return visited, int(some.sum())


def math_cost(call: Call) -> float:
    return call.flops() * call.passes() / MATH_RATE + 3e-5


def sdpa_cost(call: Call) -> float:
    T, S = call.T, call.S
    if call.spec.plain_causal(T, S) and call.spec.score_mod is None:
        return 0.5 * call.flops() * call.passes() / SDPA_RATE + 2e-5
    if call.spec.mask_mod_for(T, S) is None and call.spec.score_mod is None:
        return call.flops() * call.passes() / SDPA_RATE + 2e-5
    build = MASK_BUILD_S_PER_ELEMENT * T * S * max(1, call.B if call.spec.tensors() else 1)
    return call.flops() * call.passes() * SDPA_MASKED_SLOWDOWN / SDPA_RATE + build + 2e-5


def chunked_cost(call: Call, block_q: int = 256, block_k: int = 64) -> float:
    frac, blocks = call.visited(block_q, block_k)  # the plan's own granularity
    tiles = -(-call.T // block_q)
    per_call = 5e-5
    if _fused_tiles.usable_for(call.device, call.dtype, call.spec):
        # One fused kernel call per tile over its visible span (backward: two per tile).
        return (frac * call.flops() * call.passes() / CHUNKED_FUSED_RATE
                + tiles * FUSED_TILE_S * (2.0 if call.grad else 1.0) + per_call)
    scored = 1.3 if call.spec.score_mod is not None else 1.0
    per_block = CHUNKED_BLOCK_S * (2.0 if call.grad else 1.0) * max(1.0, 64 / block_k)
    return (frac * call.flops() * call.passes() * scored / CHUNKED_RATE
            + blocks * per_block / 8 + per_call)


def flex_cost(call: Call, compiled: bool) -> float:
    frac, _ = call.visited(128, 128)
    run = frac * call.flops() * call.passes() / FLEX_RATE + 2e-4
    return run if compiled else run + FLEX_COMPILE_S
