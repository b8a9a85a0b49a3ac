"""The abstract domain of :mod:`attnkit.masks.intervals` and the transfer rule of each
operator on it: a number is an interval ``Num(lo, hi)`` (with an exact affine form for
integers), a bool a tri-state ``Tri(t, f)`` (may be True, may be False), a captured tensor
``Arr`` until it is indexed. Each ``_op_<name>`` rule maps abstract operands to a sound
abstract result, or returns None (then the evaluator says "anything").

Rules, and why each is sound over a tile (every value the operand takes lies in its
interval):

* ``+``, ``-``, scaling: exact on affine forms (the index variables vary independently over
  a tile, so ``q - kv`` ranges over exactly ``[q_lo - kv_hi, q_hi - kv_lo]``);
* products and quotients by a divisor of one sign: monotone in each argument, so the
  extremes are at the corners (and rounding to nearest is monotone too);
* ``//``, ``>>`` (floor), ``%`` by a constant: exact when no wrap, else the remainder's
  range; ``&``, ``|``, ``^`` on non-negative integers: bounded by the operands' bit length;
* comparisons: from the ends of the intervals (or the exact range of the affine
  difference); ``&``, ``|``, ``~``, ``where`` on tri-states;
* dtype conversions: monotone, so the ends bound the results (a narrowing integer cast
  that may wrap gives "anything").
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = ["Num", "Tri", "Arr", "Rules", "INF"]

INF = float("inf")
_POS = ("b", "h", "q", "kv")


@dataclass
class Num:
    """Every value lies in ``[lo, hi]`` (tensors broadcastable to ``G``). ``aff`` maps atoms
    (``"q"``, ``("n", i)``, ...) to integer coefficients, ``None`` to the constant."""

    lo: Tensor
    hi: Tensor
    aff: dict | None = None


@dataclass
class Tri:
    """``t``: may be True; ``f``: may be False (bool tensors broadcastable to ``G``)."""

    t: Tensor
    f: Tensor


@dataclass
class Arr:
    """A concrete tensor, its leading dims already indexed by the intervals ``idx``."""

    t: Tensor
    idx: tuple = ()


def _const_num(v, integer: bool) -> Num:
    x = torch.tensor(float(v), dtype=torch.float64)
    return Num(x, x, {None: int(v)} if integer and float(v).is_integer() else None)


def _tri_const(v: bool) -> Tri:
    return Tri(torch.tensor(bool(v)), torch.tensor(not v))


def _top(dtype) -> Num | Tri:
    if dtype == torch.bool:
        return Tri(torch.tensor(True), torch.tensor(True))
    d = dtype if dtype is not None and dtype.is_floating_point else torch.float64
    return Num(torch.tensor(-INF, dtype=d), torch.tensor(INF, dtype=d))


def _nan0(x: Tensor) -> Tensor:
    """0 * unbounded is 0: corner products of an interval with an infinite end."""
    return torch.nan_to_num(x, nan=0.0, posinf=INF, neginf=-INF)


def _ifloor(x: Tensor, d) -> Tensor:
    """``floor(x / d)`` exactly for finite integer-valued float64 ``x``; infinities kept."""
    fin = torch.isfinite(x)
    q = torch.div(torch.where(fin, x, 0).long(), d, rounding_mode="floor").double()
    return torch.where(fin, q, x * math.copysign(1.0, d))


def _bits(m: Tensor) -> Tensor:
    """``2**bitlength(m) - 1`` for non-negative ``m``: the largest OR of numbers <= m."""
    return torch.exp2(torch.ceil(torch.log2(m + 1))) - 1


class Rules:
    """The ``_op_<name>`` transfer rules, mixed into :class:`~attnkit.masks.intervals.
    Evaluator` (which provides ``_num``, ``_tri``, ``_abstract``, ``_range`` and ``env``)."""

    # --- arithmetic ------------------------------------------------------------------------

    def _linear(self, node, a, b, sign, alpha=1):
        a, b = self._num(a), self._num(b)
        if a is None or b is None:
            return None
        c = sign * alpha
        if node.dtype.is_floating_point:
            dt = node.dtype
            if c > 0:
                return Num(a.lo.to(dt) + c * b.lo.to(dt), a.hi.to(dt) + c * b.hi.to(dt))
            return Num(a.lo.to(dt) + c * b.hi.to(dt), a.hi.to(dt) + c * b.lo.to(dt))
        if a.aff is None or b.aff is None or not float(alpha).is_integer():
            return None
        aff = dict(a.aff)
        for k, v in b.aff.items():
            aff[k] = aff.get(k, 0) + int(c) * v
        lo, hi = self._range(aff, self.env)
        return Num(lo, hi, aff)

    def _op_add(self, node, a, b, alpha=1):
        return self._linear(node, a, b, 1, alpha)

    def _op_sub(self, node, a, b, alpha=1):
        return self._linear(node, a, b, -1, alpha)

    def _op_rsub(self, node, a, b, alpha=1):
        return self._linear(node, b, a, -1, alpha)

    def _op_neg(self, node, a):
        return self._linear(node, 0, a, -1)

    def _op_mul(self, node, a, b):
        a, b = self._num(a), self._num(b)
        if a is None or b is None:
            return None
        for x, y in ((a, b), (b, a)):  # a constant factor keeps the affine form
            k = y.aff.get(None) if y.aff is not None and len(y.aff) == 1 else None
            if k is not None and x.aff is not None and not node.dtype.is_floating_point:
                aff = {atom: k * v for atom, v in x.aff.items()}
                return Num(*self._range(aff, self.env), aff)
        return self._corners(node, a, b, torch.mul)

    def _corners(self, node, a, b, fn):
        """``fn`` monotone in each argument on the box (products, quotients with a divisor
        of one sign): the extremes are at the corners."""
        dt = node.dtype if node.dtype.is_floating_point else torch.float64
        vals = [_nan0(fn(x.to(dt), y.to(dt))) for x in (a.lo, a.hi) for y in (b.lo, b.hi)]
        vals = torch.broadcast_tensors(*vals)
        return Num(torch.stack(vals).amin(0), torch.stack(vals).amax(0))

    def _op_abs(self, node, a):
        a = self._num(a)
        if a is None:
            return None
        lo = torch.where(a.lo >= 0, a.lo, torch.where(a.hi <= 0, -a.hi, 0 * a.lo))
        hi = torch.maximum(a.hi.abs(), a.lo.abs())
        return Num(lo, hi)

    def _op_div(self, node, a, b, rounding_mode=None):
        a, b = self._num(a), self._num(b)
        if a is None or b is None:
            return None
        one_sign = bool(((b.lo > 0) | (b.hi < 0)).all())
        if not one_sign:
            return None
        if rounding_mode is None:
            return self._corners(node, a, b, torch.div)
        if not node.dtype.is_floating_point and bool((b.lo == b.hi).all()) and b.lo.dim() == 0:
            d = int(b.lo)
            if rounding_mode == "floor":
                lo, hi = _ifloor(a.lo, d), _ifloor(a.hi, d)
                return Num(torch.minimum(lo, hi), torch.maximum(lo, hi))
        return self._corners(node, a, b, lambda x, y: torch.div(x, y,
                                                               rounding_mode=rounding_mode))

    def _op_floor_divide(self, node, a, b):
        return self._op_div(node, a, b, rounding_mode="floor")

    def _op_remainder(self, node, a, b):
        a, b = self._num(a), self._num(b)
        if a is None or b is None:
            return None
        if b.lo.dim() == 0 and bool(b.lo == b.hi) and float(b.lo) != 0:
            d = float(b.lo)
            if node.dtype.is_floating_point:  # the sign of the divisor, up to |d|
                return Num(torch.tensor(min(d, 0.0), dtype=node.dtype),
                           torch.tensor(max(d, 0.0), dtype=node.dtype))
            d = int(d)
            same = _ifloor(a.lo, d) == _ifloor(a.hi, d)
            base = _ifloor(a.lo, d) * d
            lo = torch.where(same, a.lo - base, float(min(d + 1, 0)))
            hi = torch.where(same, a.hi - base, float(max(d - 1, 0)))
            return Num(lo, hi)
        if not node.dtype.is_floating_point and bool((b.lo > 0).all()):
            hi = b.hi - 1
            hi = torch.where(a.lo >= 0, torch.minimum(hi, a.hi), hi)
            return Num(torch.zeros_like(hi), hi)
        return None

    def _op_fmod(self, node, a, b):
        a, b = self._num(a), self._num(b)
        if a is None or b is None or node.dtype.is_floating_point or b.lo.dim() or \
                not bool(b.lo == b.hi) or float(b.lo) == 0:
            return None
        m = abs(int(b.lo)) - 1  # |fmod| < |d|, with the dividend's sign
        lo = torch.where(a.lo >= 0, 0.0, torch.maximum(a.lo, torch.tensor(-float(m))))
        hi = torch.where(a.hi <= 0, 0.0, torch.minimum(a.hi, torch.tensor(float(m))))
        return Num(lo, hi)

    def _op_minimum(self, node, a, b):
        a, b = self._num(a), self._num(b)
        return None if a is None or b is None else Num(torch.minimum(a.lo, b.lo),
                                                       torch.minimum(a.hi, b.hi))

    def _op_maximum(self, node, a, b):
        a, b = self._num(a), self._num(b)
        return None if a is None or b is None else Num(torch.maximum(a.lo, b.lo),
                                                       torch.maximum(a.hi, b.hi))

    def _op_clamp(self, node, a, min=None, max=None):  # noqa: A002 - torch's names
        lo, hi = min, max
        out = self._num(a)
        if out is None:
            return None
        if lo is not None:
            out = self._op_maximum(node, out, lo)
        if hi is not None and out is not None:
            out = self._op_minimum(node, out, hi)
        return out

    def _op_clamp_min(self, node, a, lo):
        return self._op_maximum(node, a, lo)

    def _op_clamp_max(self, node, a, hi):
        return self._op_minimum(node, a, hi)

    # --- bits (integers) and logic (bools) -------------------------------------------------

    def _bitwise(self, node, a, b, kind):
        if node.dtype == torch.bool:
            x, y = self._tri(a), self._tri(b)
            if x is None or y is None:
                return None
            if kind == "and":
                return Tri(x.t & y.t, x.f | y.f)
            if kind == "or":
                return Tri(x.t | y.t, x.f & y.f)
            return Tri((x.t & y.f) | (x.f & y.t), (x.t & y.t) | (x.f & y.f))
        x, y = self._num(a), self._num(b)
        if x is None or y is None:
            return None
        xp, yp = x.lo >= 0, y.lo >= 0
        if kind == "and":  # x & c lies in [0, c] for c >= 0, whatever x
            cap = torch.where(xp & yp, torch.minimum(x.hi, y.hi),
                              torch.where(xp, x.hi, torch.where(yp, y.hi, INF)))
            return Num(torch.where(xp | yp, 0.0, -INF), cap)
        both = xp & yp
        top = _bits(torch.maximum(x.hi, y.hi))
        lo = torch.maximum(x.lo, y.lo) if kind == "or" else torch.zeros_like(top)
        return Num(torch.where(both, lo, -INF), torch.where(both, top, INF))

    def _op_bitwise_and(self, node, a, b):
        return self._bitwise(node, a, b, "and")

    def _op_bitwise_or(self, node, a, b):
        return self._bitwise(node, a, b, "or")

    def _op_bitwise_xor(self, node, a, b):
        return self._bitwise(node, a, b, "xor")

    _op_and = _op_bitwise_and
    _op_or = _op_bitwise_or
    _op_xor = _op_bitwise_xor

    def _op_logical_and(self, node, a, b):
        return self._bitwise(node, self._tri(a), self._tri(b), "and")

    def _op_logical_or(self, node, a, b):
        return self._bitwise(node, self._tri(a), self._tri(b), "or")

    def _op_logical_xor(self, node, a, b):
        return self._bitwise(node, self._tri(a), self._tri(b), "xor")

    def _op_bitwise_not(self, node, a):
        if node.dtype == torch.bool:
            x = self._tri(a)
            return None if x is None else Tri(x.f, x.t)
        x = self._num(a)
        return None if x is None else Num(-x.hi - 1, -x.lo - 1)

    def _op_logical_not(self, node, a):
        x = self._tri(a)
        return None if x is None else Tri(x.f, x.t)

    def _shift(self, node, a, b, left):
        x, k = self._num(a), self._num(b)
        if x is None or k is None or k.lo.dim() or not bool(k.lo == k.hi) or float(k.lo) < 0:
            return None
        k = int(k.lo)
        if left:
            return Num(x.lo * (1 << k), x.hi * (1 << k))
        return Num(_ifloor(x.lo, 1 << k), _ifloor(x.hi, 1 << k))

    def _op_lshift(self, node, a, b):
        return self._shift(node, a, b, True)

    def _op_rshift(self, node, a, b):
        return self._shift(node, a, b, False)

    _op_bitwise_left_shift = _op_lshift
    _op_bitwise_right_shift = _op_rshift

    # --- comparisons and choices -----------------------------------------------------------

    def _compare(self, a, b, op):
        """Tri-state of ``a op b``: on the exact affine difference when both are integer
        affine forms, else on the ends of the intervals."""
        x, y = self._num(a), self._num(b)
        if x is None or y is None:
            return None
        if x.aff is not None and y.aff is not None:
            aff = dict(x.aff)
            for k, v in y.aff.items():
                aff[k] = aff.get(k, 0) - v
            lo, hi = self._range(aff, self.env)
            x = Num(lo, hi)
            y = _const_num(0, True)
        xl, xh, yl, yh = x.lo, x.hi, y.lo, y.hi
        if op == "ge":
            return Tri(xh >= yl, xl < yh)
        if op == "gt":
            return Tri(xh > yl, xl <= yh)
        if op == "le":
            return Tri(xl <= yh, xh > yl)
        if op == "lt":
            return Tri(xl < yh, xh >= yl)
        meet = (xl <= yh) & (yl <= xh)
        single = (xl == xh) & (yl == yh) & (xl == yl)
        return Tri(meet, ~single) if op == "eq" else Tri(~single, meet)

    def _cmp_bool(self, a, b, op):
        x, y = self._tri(a), self._tri(b)
        if x is None or y is None or op not in ("eq", "ne"):
            return None
        same = Tri((x.t & y.t) | (x.f & y.f), (x.t & y.f) | (x.f & y.t))
        return same if op == "eq" else Tri(same.f, same.t)

    def _cmp(self, a, b, op):
        if isinstance(self._abstract(a), Tri) and isinstance(self._abstract(b), Tri):
            return self._cmp_bool(a, b, op)
        return self._compare(a, b, op)

    def _op_ge(self, node, a, b):
        return self._cmp(a, b, "ge")

    def _op_gt(self, node, a, b):
        return self._cmp(a, b, "gt")

    def _op_le(self, node, a, b):
        return self._cmp(a, b, "le")

    def _op_lt(self, node, a, b):
        return self._cmp(a, b, "lt")

    def _op_eq(self, node, a, b):
        return self._cmp(a, b, "eq")

    def _op_ne(self, node, a, b):
        return self._cmp(a, b, "ne")

    def _op_where(self, node, c, a, b):
        c = self._tri(c)
        if c is None:
            return None
        if node.dtype == torch.bool:
            x, y = self._tri(a), self._tri(b)
            if x is None or y is None:
                return None
            return Tri((c.t & x.t) | (c.f & y.t), (c.t & x.f) | (c.f & y.f))
        x, y = self._num(a), self._num(b)
        if x is None or y is None:
            return None
        dt = node.dtype if node.dtype.is_floating_point else torch.float64
        lo = torch.minimum(torch.where(c.t, x.lo.to(dt), INF), torch.where(c.f, y.lo.to(dt), INF))
        hi = torch.maximum(torch.where(c.t, x.hi.to(dt), -INF),
                           torch.where(c.f, y.hi.to(dt), -INF))
        return Num(lo, hi)

    # --- dtype conversions, copies and constants -------------------------------------------

    def _convert(self, node, a):
        dt = node.dtype
        if dt == torch.bool:
            return self._tri(a)
        x = self._num(a)
        if x is None:
            return None
        if dt.is_floating_point:  # rounding to nearest is monotone: the ends bound it
            return Num(x.lo.to(dt), x.hi.to(dt))
        lo, hi = (x.lo.trunc(), x.hi.trunc()) if x.lo.is_floating_point() else (x.lo, x.hi)
        info = torch.iinfo(dt)
        fits = (lo >= info.min) & (hi <= info.max)  # a narrower int may wrap around
        lo, hi = torch.where(fits, lo.double(), -INF), torch.where(fits, hi.double(), INF)
        keep = x.aff if x.aff is not None and bool(fits.all()) else None
        return Num(lo, hi, keep)

    def _op_to_copy(self, node, a, **_):
        return self._convert(node, a)

    _op_to = _op_to_copy
    _op_type_as = _op_to_copy

    def _same(self, node, a, *_, **__):
        v = self._abstract(a)
        return v if isinstance(v, (Num, Tri)) else None

    _op_clone = _op_alias = _op_detach = _op_lift_fresh_copy = _op_contiguous = _same
    _op_view = _op_reshape = _op_expand = _op_squeeze = _op_unsqueeze = _same
    _op_unsafe_view = _op_expand_copy = _op_view_copy = _same

    def _fill(self, node, value):
        if node.shape != ():
            return None
        v = torch.tensor(value).to(node.dtype)
        return self._abstract(Arr(v))

    def _op_new_ones(self, node, *_, **__):
        return self._fill(node, 1)

    def _op_new_zeros(self, node, *_, **__):
        return self._fill(node, 0)

    def _op_new_full(self, node, _a, _size, value, **__):
        return self._fill(node, value)

    def _op_full(self, node, _size, value, **__):
        return self._fill(node, value)

    def _op_ones_like(self, node, *_, **__):
        return self._fill(node, 1)

    def _op_zeros_like(self, node, *_, **__):
        return self._fill(node, 0)

    def _op_full_like(self, node, _a, value, **__):
        return self._fill(node, value)

    def _op_scalar_tensor(self, node, value, **__):
        return self._fill(node, value)
