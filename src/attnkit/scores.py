"""Score functions: described changes to the scaled scores before the softmax.

A score description is FlexAttention's ``score_mod(score, b, h, q_idx, kv_idx) -> score``
with a readable name. The kinds: :class:`Softcap` (Gemma-2's ``c * tanh(s / c)``),
:class:`Alibi` (a per-head linear distance penalty), :class:`Bias` (an additive float tensor:
T5-style position bias, float masks) and :class:`ScoreFn` (any callable). :func:`chain`
applies several in order. Attention sinks are not a score function but an extra logit in the
softmax denominator: pass ``sinks=`` to :func:`attnkit.attention`.

Gradients: ``math`` differentiates through them with autograd; ``chunked`` recomputes each
block in its backward and differentiates the block with autograd, so every kind (and the
tensors it holds, such as a learnable bias or slopes) gets an exact gradient.

Shape letters: ``B`` batch, ``H`` heads, ``T`` queries, ``S`` keys; ``score`` is
``(B, H, T, S)`` (or one block of it) and the index tensors broadcast against it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from typing import Callable

import torch
from torch import Tensor

from .masks.base import (_index, broadcast_shape, call_user_fn, check_align,
                         check_broadcasts, check_user_result, offset_of, reads_scalars)

__all__ = ["ScoreMod", "Softcap", "Alibi", "Bias", "ScoreFn", "ScoreShift", "Chain", "chain",
           "alibi_slopes", "as_score_mod", "at_positions"]


class ScoreMod:
    """Base of every score description."""

    def __call__(self, score, b, h, q_idx, kv_idx):
        return self.apply(score, b, h, q_idx, kv_idx)

    def apply(self, score, b, h, q, k) -> Tensor:
        raise NotImplementedError

    def tile(self, score: Tensor, q0: int, q1: int, k0: int, k1: int) -> Tensor:
        """``apply`` on the block ``score (B, H, nq, nk)`` of rows q0:q1, keys k0:k1."""
        B, H = score.shape[:2]
        return self.apply(score, *_index(B, H, q0, q1, k0, k1, score.device))

    def resolve(self, T: int, S: int) -> "ScoreMod":
        return self

    def validate(self, B: int, H: int, T: int, S: int) -> None:
        return None

    def describe(self) -> str:
        return type(self).__name__.lower()

    def tensors(self) -> tuple:
        return ()

    @property
    def reads_known(self) -> bool:
        """Whether :meth:`tensors` is exactly what the score function reads (a function
        that could not be traced reports every tensor it can reach instead)."""
        return all(getattr(p, "reads_known", True) for p in
                   (getattr(self, "parts", None) or (getattr(self, "mod", None),)) if p)


def as_score_mod(mod) -> ScoreMod:
    """A description as is; a callable ``fn(score, b, h, q_idx, kv_idx)`` wrapped.

    Raises:
        TypeError: neither.
    """
    if isinstance(mod, ScoreMod):
        return mod
    if callable(mod):
        return ScoreFn(mod)
    raise TypeError(f"score_mod must be a score description from attnkit.scores or a callable "
                    f"fn(score, b, h, q_idx, kv_idx) -> score, got {type(mod).__name__}")


def vmap_scores(fn, score, b, h, q, k) -> Tensor:
    """``fn(score, b, h, q, k)`` per element under ``torch.vmap`` (FlexAttention's way) on
    a score block ``(B, H, nq, nk)`` and broadcast index tensors."""
    from torch.nn.attention.flex_attention import _vmap_for_bhqkv

    B, H, nq, nk = score.shape
    idx = [t.reshape(1).expand(n).contiguous() if t.numel() == 1 else t.reshape(-1)
           for t, n in zip((b, h, q, k), (B, H, nq, nk))]
    return _vmap_for_bhqkv(fn, prefix=(0,))(score, *idx)


@dataclass(frozen=True, eq=False)
class ScoreFn(ScoreMod):
    """A user's ``fn(score, b, h, q_idx, kv_idx)`` written with broadcasting tensor ops
    (one written for scalars, such as ``bias[b][q_idx]``, runs under ``torch.vmap``).

    The tensors it reads are found by running it once per call on 0-d arguments
    (:func:`attnkit.masks.probe.probe`: closures, ``self.bias``, lists, dicts,
    ``ParameterList``, nested functions, globals, by identity): :meth:`tensors` returns
    them, so backends with their own autograd (chunked) give the learnable ones their
    gradients. When the function cannot be run that way, or branches in Python on its
    index arguments, every tensor it can reach stands in and :attr:`reads_known` is False.
    """

    fn: Callable
    _seen: dict = field(default_factory=dict, repr=False, compare=False)

    def _probe(self):
        from .masks.probe import Probe, index_args, probe

        if torch.compiler.is_compiling():  # no recording mode inside a compiled graph
            pr = Probe(None, (), error="under torch.compile")
        else:
            pr = probe(self.fn, [torch.zeros(()), *index_args(4)])
        self._seen["probe"] = pr
        return pr

    def apply(self, score, b, h, q, k):
        if reads_scalars(self._seen):
            return vmap_scores(self.fn, score, b, h, q, k)
        return self.fn(score, b, h, q, k)

    def validate(self, B, H, T, S):
        """Read the function (its tensors, this call) and evaluate it once on a small
        score grid, before any backend runs.

        Raises:
            TypeError: it does not return a float tensor broadcastable to the scores.
        """
        self._probe()
        index = _index(min(B, 2), min(H, 2), 0, min(T, 3), 0, min(S, 3), None)
        score = torch.zeros(broadcast_shape(*(t.shape for t in index)))
        # Through apply(): a subclass may adapt the function (e.g. run it under vmap).
        out = call_user_fn("score_mod", self.apply, (score, *index), self.fn)
        check_user_result("score_mod", self.fn, out, score.shape, want="float")

    @property
    def reads_known(self) -> bool:
        """Whether every learnable tensor the function reads is in :meth:`tensors`: found by
        running it, or, when it cannot be run that way, because no tensor it can reach
        requires grad (unknown under ``torch.compile``, where nothing is run)."""
        pr = self._seen.get("probe") or self._probe()
        if pr.key is not None and not pr.data_dependent:
            return True
        if torch.compiler.is_compiling():
            return False
        from .masks.probe import reachable_tensors

        return not any(t.requires_grad for t in reachable_tensors(self.fn))

    def tensors(self):
        pr = self._seen.get("probe") or self._probe()
        if pr.key is None or pr.data_dependent:
            if torch.compiler.is_compiling():
                return ()
            from .masks.probe import reachable_tensors

            return tuple(t for t in reachable_tensors(self.fn) if t.requires_grad)
        # 0-d CPU constants travel with any device (as torch allows); the rest is checked
        return tuple(t for t in pr.captured if t.dim() > 0 or t.requires_grad
                     or t.device.type != "cpu")

    def describe(self):
        return getattr(self.fn, "__name__", "score_fn")


@dataclass(frozen=True, eq=False)
class Softcap(ScoreMod):
    """``cap * tanh(score / cap)``: scores squashed into ``(-cap, cap)`` (Gemma-2)."""

    cap: float

    def __post_init__(self):
        ok = isinstance(self.cap, (int, float)) and not isinstance(self.cap, bool)
        if not ok or not math.isfinite(self.cap) or self.cap <= 0:
            raise ValueError(f"softcap must be a finite positive number, got {self.cap!r}")

    def apply(self, score, b, h, q, k):
        return torch.tanh(score / self.cap) * self.cap

    def tile(self, score, q0, q1, k0, k1):
        return torch.tanh(score / self.cap) * self.cap

    def describe(self):
        return f"softcap({self.cap:g})"


def alibi_slopes(num_heads: int) -> Tensor:
    """The ALiBi paper's slopes ``2^(-8 i / H)``, ``i = 1..H`` (float32, ``(H,)``)."""
    return torch.pow(2.0, -8.0 * torch.arange(1, num_heads + 1, dtype=torch.float32) / num_heads)


@dataclass(frozen=True, eq=False)
class Alibi(ScoreMod):
    """``score - slopes[h] * |p - j|`` with query position ``p = i + offset`` (ALiBi).

    For causal attention this is the paper's ``slope * (j - p)`` on every visible key; the
    absolute distance also serves encoders. ``align`` is resolved like causal's.
    """

    slopes: Tensor
    align: object = "top_left"
    offset: int | None = None

    def __post_init__(self):
        check_align(self.align)
        if not isinstance(self.slopes, Tensor) or not self.slopes.is_floating_point() \
                or self.slopes.dim() != 1:
            got = (f"{self.slopes.dtype} {tuple(self.slopes.shape)}"
                   if isinstance(self.slopes, Tensor) else type(self.slopes).__name__)
            raise TypeError(f"alibi_slopes must be a 1-D float tensor (H,), got {got}; "
                            f"attnkit.scores.alibi_slopes(H) gives the paper's")

    def resolve(self, T, S):
        return self if self.offset is not None else replace(self, offset=offset_of(T, S, self.align))

    def apply(self, score, b, h, q, k):
        dist = (q + (self.offset or 0) - k).abs()
        return score - self.slopes[h].to(score.dtype) * dist.to(score.dtype)

    def validate(self, B, H, T, S):
        if self.slopes.shape[0] != H:
            raise ValueError(f"alibi_slopes must have one slope per query head, shape (H,) = "
                             f"({H},), got {tuple(self.slopes.shape)}")

    def describe(self):
        return "alibi"

    def tensors(self):
        return (self.slopes,)


@dataclass(frozen=True, eq=False)
class Bias(ScoreMod):
    """``score + bias`` with a float ``bias`` broadcastable to ``(B, H, T, S)``; ``-inf``
    entries mask (a float mask)."""

    bias: Tensor

    def __post_init__(self):
        if not isinstance(self.bias, Tensor) or not self.bias.is_floating_point():
            got = self.bias.dtype if isinstance(self.bias, Tensor) else type(self.bias).__name__
            raise TypeError(f"bias must be a float tensor broadcastable to (B, H, T, S), got "
                            f"{got}; for a bool mask use mask=")

    def _b4(self):
        b = self.bias
        return b.reshape((1,) * (4 - b.dim()) + tuple(b.shape)) if b.dim() <= 4 else b

    def apply(self, score, b, h, q, k):
        m = self._b4()
        pick = [i if m.shape[d] > 1 else i * 0 for d, i in enumerate((b, h, q, k))]
        return score + m[pick[0], pick[1], pick[2], pick[3]].to(score.dtype)

    def tile(self, score, q0, q1, k0, k1):
        m = self._b4()
        m = m[..., slice(q0, q1) if m.shape[2] > 1 else slice(None),
               slice(k0, k1) if m.shape[3] > 1 else slice(None)]
        return score + m.to(score.dtype)

    def validate(self, B, H, T, S):
        check_broadcasts("bias", self.bias, B, H, T, S)

    def describe(self):
        return f"bias{tuple(self.bias.shape)}"

    def tensors(self):
        return (self.bias,)


@dataclass(frozen=True, eq=False)
class ScoreShift(ScoreMod):
    """``mod`` at global positions: local query ``i`` is ``i + q_offset``, key ``j`` is
    ``j + kv_offset`` (the score twin of :func:`attnkit.masks.at_positions`)."""

    mod: ScoreMod
    q_offset: int = 0
    kv_offset: int = 0

    def apply(self, score, b, h, q, k):
        return self.mod.apply(score, b, h, q + self.q_offset, k + self.kv_offset)

    def tile(self, score, q0, q1, k0, k1):
        qo, ko = self.q_offset, self.kv_offset
        return self.mod.tile(score, q0 + qo, q1 + qo, k0 + ko, k1 + ko)

    def resolve(self, T, S):
        return replace(self, mod=self.mod.resolve(T + self.q_offset, S + self.kv_offset))

    def validate(self, B, H, T, S):
        self.mod.validate(B, H, T + self.q_offset, S + self.kv_offset)

    def describe(self):
        return f"at_positions({self.mod.describe()}, q+{self.q_offset}, kv+{self.kv_offset})"

    def tensors(self):
        return self.mod.tensors()


def at_positions(mod, q_offset: int = 0, kv_offset: int = 0) -> ScoreMod:
    """A score description evaluated at global positions (see :class:`ScoreShift`)."""
    return ScoreShift(as_score_mod(mod), int(q_offset), int(kv_offset))


@dataclass(frozen=True, eq=False)
class Chain(ScoreMod):
    """Apply ``parts`` in order."""

    parts: tuple

    def apply(self, score, b, h, q, k):
        for p in self.parts:
            score = p.apply(score, b, h, q, k)
        return score

    def tile(self, score, q0, q1, k0, k1):
        for p in self.parts:
            score = p.tile(score, q0, q1, k0, k1)
        return score

    def resolve(self, T, S):
        return Chain(tuple(p.resolve(T, S) for p in self.parts))

    def validate(self, B, H, T, S):
        for p in self.parts:
            p.validate(B, H, T, S)

    def describe(self):
        return " -> ".join(p.describe() for p in self.parts)

    def tensors(self):
        return tuple(t for p in self.parts for t in p.tensors())


def chain(*mods) -> ScoreMod | None:
    """Several score functions applied in order (``None`` entries skipped)."""
    present = [as_score_mod(m) for m in mods if m is not None]
    if not present:
        return None
    return present[0] if len(present) == 1 else Chain(tuple(present))
