"""The mask protocol and its algebra (``&``, ``|``, shifts) behind :mod:`attnkit.masks`
(import them from there); the kinds are in :mod:`.structural` (positions only) and
:mod:`.data` (kinds holding tensors).

Every kind answers four questions, each in the form one backend needs:

* ``grid(b, h, q, k)``: bool on broadcast index tensors (math, flex's ``mask_mod``);
* ``tile(b, h, q0, q1, k0, k1)``: the same on one block, by slicing where it can (chunked);
* ``blocks(q_lo, q_hi, k_lo, k_hi)``: ``(some, every)`` for whole blocks at once, from interval
  arithmetic: ``some`` False means no pair in the block is visible (skip it), ``every`` True
  means all are (no mask needed). Both may err only on the safe side (some=True, every=False);
* ``intervals(B, H, q0, q1)``: per query row, the one or two key ranges ``[lo, hi)`` it sees
  (:mod:`.intervals`), or None when the kind cannot say (the fused kernel then evaluates
  ``tile`` on the partial blocks only);
* ``describe()``: a short readable name for ``explain()``.

``resolve(T, S)`` fixes what depends on the call's lengths (the bottom-right offset);
``validate(B, H, T, S)`` checks tensors against them. Shape letters as in :mod:`attnkit.masks`.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Callable

import torch
from torch import Tensor

from .. import _display
from .row_ranges import intersect, unite

ALIGNMENTS = ("top_left", "bottom_right")


def broadcast_shape(*shapes) -> torch.Size:
    """``torch.broadcast_shapes`` without its first-call cost (it imports sympy, seconds on a
    busy machine).

    Raises:
        RuntimeError: the shapes do not broadcast (torch's message).
    """
    out = []
    for dims in zip(*(((1,) * (max(map(len, shapes)) - len(s)) + tuple(s)) for s in shapes)):
        sizes = {d for d in dims if d != 1}
        if len(sizes) > 1:
            raise RuntimeError(f"shapes {[tuple(s) for s in shapes]} do not broadcast")
        out.append(sizes.pop() if sizes else 1)
    return torch.Size(out)


def check_broadcasts(name: str, t: Tensor, B: int, H: int, T: int, S: int) -> None:
    """Check that tensor argument ``name`` broadcasts to ``(B, H, T, S)``.

    Raises:
        ValueError: more than 4 dims, or a shape that does not broadcast (named in the message).
    """
    ok = t.dim() <= 4
    if ok:
        try:
            ok = broadcast_shape(t.shape, (B, H, T, S)) == torch.Size((B, H, T, S))
        except RuntimeError:
            ok = False
    if not ok:
        raise ValueError(f"{name} of shape {tuple(t.shape)} does not broadcast to "
                         f"(B, H, T, S) = {(B, H, T, S)}")


def check_align(align) -> None:
    """``align`` is a name from :data:`ALIGNMENTS` or an explicit int offset."""
    if isinstance(align, bool) or not (align in ALIGNMENTS or isinstance(align, int)):
        raise ValueError(f"causal_align must be one of {ALIGNMENTS} or an int offset "
                         f"(query i sees key j <= i + offset), got {align!r}")


def offset_of(T: int, S: int, align) -> int:
    """How many keys precede query 0's own position: 0 top-left, S - T bottom-right."""
    if isinstance(align, int):
        return align
    return 0 if align == "top_left" else S - T


def _index(B: int, H: int, q0: int, q1: int, k0: int, k1: int, device):
    """Broadcast index tensors ``b (B,1,1,1)``, ``h (1,H,1,1)``, ``q (1,1,nq,1)``, ``k``."""
    b = torch.arange(B, device=device).view(B, 1, 1, 1)
    h = torch.arange(H, device=device).view(1, H, 1, 1)
    q = torch.arange(q0, q1, device=device).view(1, 1, -1, 1)  # (1, 1, nq, 1)
    k = torch.arange(k0, k1, device=device).view(1, 1, 1, -1)  # (1, 1, 1, nk)
    return b, h, q, k


class MaskMod:
    """Base of every mask description; subclasses override ``grid`` and, to let chunked
    skip work, ``blocks``. ``&`` and ``|`` compose."""

    def __call__(self, b, h, q_idx, kv_idx):
        return self.grid(b, h, q_idx, kv_idx)

    def grid(self, b, h, q, k) -> Tensor:
        raise NotImplementedError

    def tile(self, B: int, H: int, q0: int, q1: int, k0: int, k1: int, device) -> Tensor:
        """Bool broadcastable to ``(B, H, q1 - q0, k1 - k0)`` for one block."""
        return self.grid(*_index(B, H, q0, q1, k0, k1, device))

    def blocks(self, q_lo, q_hi, k_lo, k_hi):
        shape = (q_lo.shape[0], k_lo.shape[-1])  # (nQ, 1) with (1, nK)
        return (torch.ones(shape, dtype=torch.bool, device=q_lo.device),
                torch.zeros(shape, dtype=torch.bool, device=q_lo.device))

    def summary(self, T: int, S: int, block_q: int, block_k: int) -> tuple[Tensor, Tensor]:
        """``(some, every)``, bool ``(nQ, nK)``: whether some / every key of each block of
        ``block_q`` queries x ``block_k`` keys is visible, from :meth:`blocks` (interval
        arithmetic, never a ``T x S`` tensor), on the device of the description's tensors."""
        tensors = self.tensors()
        device = tensors[0].device if tensors else None
        q_lo = torch.arange(0, T, block_q, device=device).view(-1, 1)  # (nQ, 1)
        q_hi = (q_lo + block_q).clamp(max=T) - 1
        k_lo = torch.arange(0, S, block_k, device=device).view(1, -1)  # (1, nK)
        k_hi = (k_lo + block_k).clamp(max=S) - 1
        some, every = self.blocks(q_lo, q_hi, k_lo, k_hi)
        shape = (q_lo.shape[0], k_lo.shape[1])
        return torch.broadcast_to(some, shape), torch.broadcast_to(every, shape)

    def resolve(self, T: int, S: int) -> "MaskMod":
        return self

    def validate(self, B: int, H: int, T: int, S: int) -> None:
        return None

    def intervals(self, B: int, H: int, q0: int, q1: int) -> Tensor | None:
        """Rows ``q0 .. q1 - 1``: int64 ``(B|1, H|1, nq|1, 2k)``, ``k <= 2`` key ranges
        ``[lo, hi)`` per row whose union is what the row sees (:mod:`attnkit.masks.row_ranges`),
        or None when this kind cannot describe its rows so (the default)."""
        return None

    def describe(self) -> str:
        return type(self).__name__.lower()

    def tensors(self) -> tuple:
        """Tensors the description holds (device checks, cache keys)."""
        return ()

    # In a notebook: a picture (attnkit._display); str() stays the text everywhere else.
    _repr_html_ = _display.mask_html
    _repr_png_ = _display.mask_png

    def __and__(self, other):
        return And((self, as_mask_mod(other)))

    def __or__(self, other):
        return Or((self, as_mask_mod(other)))


def as_mask_mod(mod) -> MaskMod:
    """A description as is; a callable ``fn(b, h, q_idx, kv_idx)`` wrapped in :class:`MaskFn`.

    Raises:
        TypeError: neither.
    """
    if isinstance(mod, MaskMod):
        return mod
    if callable(mod):
        return MaskFn(mod)
    raise TypeError(f"mask_mod must be a mask description from attnkit.masks or a callable "
                    f"fn(b, h, q_idx, kv_idx) -> bool tensor, got {type(mod).__name__}")


def vmap_grid(fn, b, h, q, k) -> Tensor:
    """``fn`` called per element under ``torch.vmap``, as FlexAttention does, on broadcast
    index tensors ``b (B,1,1,1)``, ``h (1,H,1,1)``, ``q (1,1,nq,1)``, ``k (1,1,1,nk)``: for
    functions written for scalars (chained indexing such as ``doc[b][q]``)."""
    from torch.nn.attention.flex_attention import _vmap_for_bhqkv

    flat = [t.reshape(-1) for t in (b, h, q, k)]
    out = _vmap_for_bhqkv(fn, prefix=())(*flat)
    if not isinstance(out, Tensor) or out.dim() != 4:
        return out
    return out.view(b.shape[0], h.shape[1], q.shape[2], k.shape[3])


def reads_scalars(seen: dict) -> bool:
    """Whether the probe of a user function (kept in ``seen``) showed a function of
    scalars that broadcasting would get wrong: a 0-d result through non-0-d intermediate
    values (``bias[b][q]`` indexes a row, then an element)."""
    pr = seen.get("probe")
    return pr is not None and not pr.elementwise and isinstance(pr.out, tuple) \
        and pr.out[1] == () and not pr.data_dependent


@dataclass(frozen=True, eq=False)
class MaskFn(MaskMod):
    """A user's ``fn(b, h, q_idx, kv_idx) -> bool`` written with broadcasting tensor ops
    (one written for scalars, such as ``doc[b][q_idx]``, runs under ``torch.vmap``).

    Resolved for a call (:meth:`resolve`), it is read rather than only evaluated
    (:mod:`attnkit.masks.traced`): a native kind when the expression is one (``q >= kv`` is
    causal), else the function with block summaries from its traced program, or, when it
    cannot be read, the function alone (``why`` says why; every tile is evaluated).
    """

    fn: Callable
    why: str | None = field(default=None, repr=False)
    _seen: dict = field(default_factory=dict, repr=False, compare=False)

    def grid(self, b, h, q, k):
        if reads_scalars(self._seen):
            return vmap_grid(self.fn, b, h, q, k)
        return self.fn(b, h, q, k)

    def resolve(self, T, S):
        from .traced import analyse

        return analyse(self, T, S)

    def validate(self, B, H, T, S):
        """Evaluate the function once on a small index grid, before any backend runs.

        Raises:
            TypeError: it does not return a bool tensor broadcastable to the grid (the
                message says what it returned and how to write it).
        """
        index = _index(min(B, 2), min(H, 2), 0, min(T, 3), 0, min(S, 3), None)
        # Through grid(): a subclass may adapt the function (e.g. run it under vmap).
        out = call_user_fn("mask_mod", self.grid, index, self.fn)
        check_user_result("mask_mod", self.fn, out, broadcast_shape(
            *(t.shape for t in index)), want="bool")

    def describe(self):
        name = getattr(self.fn, "__name__", "mask_fn")
        return name if self.why is None else f"{name} [opaque: {self.why}; every tile evaluated]"


_HOW = ("write it with tensor operations on its index arguments: & | ~ for and/or/not, "
        "torch.where(cond, a, b) for a choice, no Python if/and/or on them")


def call_user_fn(name: str, fn, args, user_fn=None):
    """``fn(*args)`` with the torch errors of a Python ``if`` turned into advice about
    ``user_fn`` (default ``fn``), the function the user wrote.

    Raises:
        TypeError: the function used a tensor where Python wanted one bool.
    """
    try:
        return fn(*args)
    except RuntimeError as err:
        if "Boolean value of Tensor" not in str(err):
            raise
        raise TypeError(f"{name} {_fn_name(user_fn or fn)} used a tensor as a Python bool "
                        f"({err}); it "
                        f"is called with index tensors, not ints: {_HOW}") from None


def _fn_name(fn) -> str:
    return getattr(fn, "__name__", type(fn).__name__)


def check_user_result(name: str, fn, out, shape, *, want: str) -> None:
    """Check a user function's result on an index grid of ``shape``.

    Raises:
        TypeError: not a tensor, the wrong dtype kind (``want`` is "bool" or "float"), or a
            shape that does not broadcast to ``shape``.
    """
    if not isinstance(out, Tensor):
        raise TypeError(f"{name} {_fn_name(fn)} returned {type(out).__name__} {out!r}, not a "
                        f"tensor: it must return a {want} tensor computed from its index "
                        f"arguments (e.g. q_idx >= kv_idx; for every key, kv_idx >= 0); {_HOW}")
    if want == "bool" and out.dtype != torch.bool:
        raise TypeError(f"{name} {_fn_name(fn)} returned a {out.dtype} tensor; a mask "
                        f"function returns bool (True = may attend): compare, do not "
                        f"convert (q_idx >= kv_idx, not (q_idx >= kv_idx).float()); for an "
                        f"additive score use score_mod= or bias=")
    if want == "float" and not out.is_floating_point():
        raise TypeError(f"{name} {_fn_name(fn)} returned a {out.dtype} tensor; a score "
                        f"function returns the (float) score, e.g. score - (q_idx - kv_idx)")
    try:
        ok = broadcast_shape(out.shape, shape) == torch.Size(shape)
    except RuntimeError:
        ok = False
    if not ok:
        raise TypeError(f"{name} {_fn_name(fn)} returned shape {tuple(out.shape)}, which does "
                        f"not broadcast to its index grid {tuple(shape)}: {_HOW}")


class _Combination(MaskMod):
    """A combination of descriptions: ``And`` and ``Or`` differ only in the operator that
    joins the parts' grids and block summaries (siblings, not one a subclass of the other)."""

    parts: tuple
    _symbol = "?"

    @staticmethod
    def _join(a, b):
        raise NotImplementedError

    @staticmethod
    def _join_summary(a, b):
        raise NotImplementedError

    def grid(self, b, h, q, k):
        out = self.parts[0].grid(b, h, q, k)
        for p in self.parts[1:]:
            out = self._join(out, p.grid(b, h, q, k))
        return out

    def tile(self, B, H, q0, q1, k0, k1, device):
        out = self.parts[0].tile(B, H, q0, q1, k0, k1, device)
        for p in self.parts[1:]:
            out = self._join(out, p.tile(B, H, q0, q1, k0, k1, device))
        return out

    def blocks(self, q_lo, q_hi, k_lo, k_hi):
        some, every = self.parts[0].blocks(q_lo, q_hi, k_lo, k_hi)
        for p in self.parts[1:]:
            s, e = p.blocks(q_lo, q_hi, k_lo, k_hi)
            some, every = self._join(some, s), self._join_summary(every, e)
        return some, every

    def intervals(self, B, H, q0, q1):
        out = self.parts[0].intervals(B, H, q0, q1)
        for p in self.parts[1:]:
            if out is None:
                return None
            out = self._join_ranges(out, p.intervals(B, H, q0, q1))
        return out

    def resolve(self, T, S):
        return type(self)(tuple(p.resolve(T, S) for p in self.parts))

    def validate(self, B, H, T, S):
        for p in self.parts:
            p.validate(B, H, T, S)

    def describe(self):
        def name(p):  # parenthesise the other operator
            return f"({p.describe()})" if isinstance(p, _Combination) and \
                type(p) is not type(self) else p.describe()
        return f" {self._symbol} ".join(name(p) for p in self.parts)

    def tensors(self):
        return tuple(t for p in self.parts for t in p.tensors())


@dataclass(frozen=True, eq=False)
class And(_Combination):
    """Visible iff every part allows it (block summaries: some AND some, every AND every)."""

    parts: tuple
    _symbol = "&"

    @staticmethod
    def _join(a, b):
        return a & b

    _join_summary = _join
    _join_ranges = staticmethod(intersect)


@dataclass(frozen=True, eq=False)
class Or(_Combination):
    """Visible iff some part allows it (some OR some; every OR every: one full part fills
    the block)."""

    parts: tuple
    _symbol = "|"

    @staticmethod
    def _join(a, b):
        return a | b

    _join_summary = _join
    _join_ranges = staticmethod(unite)


@dataclass(frozen=True, eq=False)
class Shift(MaskMod):
    """``mod`` at global positions: local query ``i`` is ``i + q_offset``, key ``j`` is
    ``j + kv_offset`` (ring attention shards, cached decoding)."""

    mod: MaskMod
    q_offset: int = 0
    kv_offset: int = 0

    def grid(self, b, h, q, k):
        return self.mod.grid(b, h, q + self.q_offset, k + self.kv_offset)

    def tile(self, B, H, q0, q1, k0, k1, device):
        qo, ko = self.q_offset, self.kv_offset
        return self.mod.tile(B, H, q0 + qo, q1 + qo, k0 + ko, k1 + ko, device)

    def blocks(self, q_lo, q_hi, k_lo, k_hi):
        qo, ko = self.q_offset, self.kv_offset
        return self.mod.blocks(q_lo + qo, q_hi + qo, k_lo + ko, k_hi + ko)

    def intervals(self, B, H, q0, q1):
        inner = self.mod.intervals(B, H, q0 + self.q_offset, q1 + self.q_offset)
        return None if inner is None else inner - self.kv_offset

    def resolve(self, T, S):
        # Alignment-dependent parts are resolved against the global lengths they describe.
        return replace(self, mod=self.mod.resolve(T + self.q_offset, S + self.kv_offset))

    def validate(self, B, H, T, S):
        """The description may cover more positions than this piece, not fewer: its last
        query row and key column must exist.

        Raises:
            ValueError: the shifted piece reaches past what the description holds.
        """
        if T == 0 or S == 0:
            return
        try:
            corner = self.tile(B, H, T - 1, T, S - 1, S, None)
            reached = corner.numel() > 0  # a slice past the end of a tensor is empty
        except IndexError:
            reached = False
        if not reached:
            raise ValueError(f"{self.mod.describe()} at positions q+{self.q_offset}, "
                             f"kv+{self.kv_offset} does not reach query {self.q_offset + T - 1}"
                             f" or key {self.kv_offset + S - 1}: describe the whole sequence")

    def describe(self):
        return f"at_positions({self.mod.describe()}, q+{self.q_offset}, kv+{self.kv_offset})"

    def tensors(self):
        return self.mod.tensors()
