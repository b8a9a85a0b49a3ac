"""A sound interval / tri-state evaluator of a traced mask program over whole tiles.

Every value of a :class:`~attnkit.masks.probe.Program` is abstracted over a grid of tiles
(``(Bn, Hn, nQ, nK)``, broadcast), all tiles at once:

* a number by an interval ``Num(lo, hi)`` that holds every value it takes on the tile (ints
  in float64, exact below 2**53; floats in their own dtype, so rounding matches), plus, for
  integers, an exact *affine form* over the index variables and opaque sub-results, so that
  ``(q - kv) + kv >= q`` or ``q >= kv`` on a diagonal tile compare exactly;
* a bool by a tri-state ``Tri(t, f)``: ``t`` = it may be True somewhere in the tile, ``f`` =
  it may be False. A tile is *full* when ``not f``, *empty* when ``not t``;
* a captured tensor by itself, ``Arr``, until it is indexed: ``doc[q]`` over a tile is the
  min/max of ``doc`` on the tile's query range (a sparse table answers any range in O(1)),
  so nested gathers (``offsets[doc[q]]``) compose.

Soundness is the contract (full => every element True, empty => every element False); an
operator outside the rules gives "anything" (an unbounded interval, or maybe True and maybe
False) and is reported, never guessed. An index that may fall outside its tensor gives
"anything" too, so that tile is evaluated and the function's own error surfaces.

Shape letters as in :mod:`attnkit.masks`; ``G`` is the broadcast tile grid.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from .probe import Program, refs, version

__all__ = ["Num", "Tri", "Arr", "Evaluator", "INF"]

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


class Evaluator:
    """Abstract evaluation of one mask program with its captured tensors.

    Args:
        program: the traced mask (inputs b, h, q_idx, kv_idx; a bool result).
        captured: the tensors its captured slots stand for, this call.
    """

    TABLE_LIMIT = 1 << 22  # sparse-table elements per tensor before it is coarsened

    def __init__(self, program: Program, captured):
        self.program, self.captured = program, captured
        self.tables: dict = {}
        # operators outside the rules on values computed from the indices (describe())
        reads = set()
        self.beyond = set()
        for i, node in enumerate(program.nodes):
            if node.op == "input" or reads.intersection(refs((node.args, node.kwargs))):
                reads.add(i)
                if node.op not in ("input", "captured") and \
                        getattr(self, "_op_" + node.name.strip("_"), None) is None:
                    self.beyond.add(node.name)

    # --- entry -----------------------------------------------------------------------------

    def run(self, env: dict) -> Num | Tri:
        """Evaluate on ``env`` (``{"b": Num, "h": Num, "q": Num, "kv": Num}`` whose ``lo``
        and ``hi`` broadcast to ``G``); returns the output's abstract value."""
        vals: list = []
        self.atoms: dict = {}
        self.env = {k: Num(v.lo, v.hi, {k: 1}) for k, v in env.items()}
        env = self.env
        for i, node in enumerate(self.program.nodes):
            vals.append(self._node(i, node, vals, env))
        return self._abstract(vals[self.program.output])


    # --- conversions -----------------------------------------------------------------------

    @staticmethod
    def _abstract(v):
        """A 0-d concrete tensor or a Python scalar as a Num/Tri; other values as they are."""
        if isinstance(v, Arr) and not v.idx and v.t.dim() == 0:
            if v.t.dtype == torch.bool:
                return _tri_const(bool(v.t))
            return _const_num(v.t.item(), not v.t.is_floating_point())
        if isinstance(v, bool):
            return _tri_const(v)
        if isinstance(v, (int, float)):
            return _const_num(v, isinstance(v, int))
        return v

    def _num(self, v) -> Num | None:
        v = self._abstract(v)
        if isinstance(v, Tri):  # a bool in arithmetic is 0 or 1
            return Num(torch.where(v.f, 0.0, 1.0).double(), torch.where(v.t, 1.0, 0.0).double())
        return v if isinstance(v, Num) else None

    def _tri(self, v) -> Tri | None:
        v = self._abstract(v)
        if isinstance(v, Num):  # a number in logic: nonzero
            return Tri(~((v.lo == 0) & (v.hi == 0)), (v.lo <= 0) & (v.hi >= 0))
        return v if isinstance(v, Tri) else None

    def _range(self, aff: dict, env) -> tuple[Tensor, Tensor]:
        """Exact bounds of an affine form whose atoms vary independently (sound always)."""
        lo = hi = torch.tensor(float(aff.get(None, 0)), dtype=torch.float64)
        for atom, c in aff.items():
            if atom is None or c == 0:
                continue
            a = env[atom] if isinstance(atom, str) else self.atoms[atom]
            lo = lo + _nan0(c * (a.lo if c > 0 else a.hi))
            hi = hi + _nan0(c * (a.hi if c > 0 else a.lo))
        return lo, hi

    # --- one node --------------------------------------------------------------------------

    def _node(self, i, node, vals, env):
        if node.op == "input":
            return env[_POS[node.arg]]
        if node.op == "captured":
            return Arr(self.captured[node.arg])
        if node.op == "element":
            self.beyond.add("tuple results")
            return _top(node.dtype)
        args = [_get(a, vals) for a in node.cargs]
        kwargs = {k: _get(v, vals) for k, v in node.kwargs}
        out = _fold(node, args, kwargs, vals)
        if out is None:
            rule = getattr(self, "_op_" + node.name.strip("_"), None)
            out = rule(node, *args, **kwargs) if rule is not None else None
        if out is None:
            self.beyond.add(node.name)
            return _top(node.dtype)
        integer = node.dtype is not None and node.dtype != torch.bool \
            and not node.dtype.is_floating_point
        if isinstance(out, Num):
            if not integer:
                out = Num(out.lo, out.hi)
            elif out.aff is None:  # an opaque integer: an atom of later affine forms
                self.atoms[("n", i)] = out
                out = Num(out.lo, out.hi, {("n", i): 1})
        return out

    # --- gathers ---------------------------------------------------------------------------

    def _op_index(self, node, base, indices):
        if not isinstance(base, Arr) or any(x is None for x in indices):
            return None
        idx = base.idx + tuple(self._num(x) for x in indices)
        if any(x is None for x in idx):
            return None
        if len(idx) < base.t.dim():
            return Arr(base.t, idx)
        return self._gather(base.t, idx)

    def _op_select(self, node, base, dim, index):
        if not isinstance(base, Arr) or dim != len(base.idx):
            return None
        idx = base.idx + (self._num(index),)
        return Arr(base.t, idx) if len(idx) < base.t.dim() else self._gather(base.t, idx)

    def _gather(self, t: Tensor, idx) -> Num | Tri:
        """Bounds of ``t[idx]`` over each tile: the min and max of ``t`` on the box of index
        ranges, exact for one ranging dim (sparse table), sound for more."""
        valid = torch.tensor(True)
        lows, highs, ranging = [], [], []
        for d, iv in enumerate(idx):
            n = t.shape[d]
            valid = valid & (iv.lo >= -n) & (iv.hi <= n - 1)
            wraps = iv.lo < 0  # a negative index reads from the end: the whole dim
            lo = torch.where(wraps, 0.0, iv.lo).clamp(0, n - 1)
            hi = torch.where(wraps, float(n - 1), iv.hi).clamp(0, n - 1)
            lows.append(lo.long())
            highs.append(hi.long())
            if not torch.equal(*torch.broadcast_tensors(lows[-1], highs[-1])):
                ranging.append(d)
        src = t.to(torch.int8) if t.dtype == torch.bool else t
        tiled = _tiles(lows[0], highs[0]) if t.dim() == 1 and ranging else None
        if tiled is not None:  # tile-aligned ranges (doc[q]): one reduction per tile
            mn, mx = _segments(src, lows[0], tiled)
        elif not ranging:
            v = src[tuple(lows)]
            mn = mx = v
        else:
            keep = max(ranging, key=lambda d: t.shape[d])
            mn, mx = self._range_query(src, keep, [d for d in ranging if d != keep],
                                       lows, highs)
        if t.dtype == torch.bool:
            return Tri(valid.logical_not() | (mx > 0), valid.logical_not() | (mn == 0))
        dtype = t.dtype if t.is_floating_point() else torch.float64
        lo = torch.where(valid, mn.to(dtype), -INF)
        hi = torch.where(valid, mx.to(dtype), INF)
        return Num(lo, hi)

    def _range_query(self, t, keep, reduce, lows, highs):
        """Min and max of ``t`` with dim ``keep`` over ``[lows, highs]``, dims ``reduce``
        over their whole extent, the other dims at ``lows``."""
        key = (id(t), version(t), keep, tuple(reduce))
        if key not in self.tables or key[1] is None:
            mn, mx = t, t
            for d in reduce:
                mn, mx = mn.amin(d, keepdim=True), mx.amax(d, keepdim=True)
            n = t.shape[keep]
            step = 1  # coarsen (blocks of `step`) so the tables stay small
            while mn.numel() // step * max(1, math.ceil(math.log2(max(n // step, 1))) + 1) \
                    > self.TABLE_LIMIT:
                step *= 2
            if step > 1:
                pad = -n % step
                mn = torch.nn.functional.pad(mn.movedim(keep, -1).double(), (0, pad),
                                             value=INF).unflatten(-1, (-1, step)).amin(-1)
                mx = torch.nn.functional.pad(mx.movedim(keep, -1).double(), (0, pad),
                                             value=-INF).unflatten(-1, (-1, step)).amax(-1)
                mn, mx = mn.movedim(-1, keep), mx.movedim(-1, keep)
            self.tables[key] = (step, _sparse(mn, keep, torch.minimum),
                                _sparse(mx, keep, torch.maximum))
        step, tmin, tmax = self.tables[key]
        lo, hi = lows[keep] // step, highs[keep] // step
        level = torch.floor(torch.log2((hi - lo + 1).double())).long()
        pos = [torch.zeros_like(lo) if d in reduce else lows[d] for d in range(t.dim())]

        def query(table, join):
            a, b = list(pos), list(pos)
            a[keep], b[keep] = lo, hi - 2 ** level + 1
            return join(table[(level, *a)], table[(level, *b)])
        return query(tmin, torch.minimum), query(tmax, torch.maximum)

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


def _get(a, vals):
    """A node reference resolved to its value; lists recursively; constants as they are."""
    if isinstance(a, tuple) and len(a) == 2 and a[0] == "n" and isinstance(a[1], int):
        return vals[a[1]]
    if isinstance(a, (list, tuple)):
        return type(a)(_get(x, vals) for x in a)
    if isinstance(a, dict):
        return {k: _get(v, vals) for k, v in a.items()}
    return a


def _abstract_in(a) -> bool:
    """Whether a (nested) argument holds an abstract value or a partly indexed tensor."""
    if isinstance(a, (Num, Tri)):
        return True
    if isinstance(a, Arr):
        return bool(a.idx)
    if isinstance(a, (list, tuple)):
        return any(_abstract_in(x) for x in a)
    if isinstance(a, dict):
        return any(_abstract_in(x) for x in a.values())
    return False


def _real(a):
    if isinstance(a, Arr):
        return a.t
    if isinstance(a, (list, tuple)):
        return type(a)(_real(x) for x in a)
    if isinstance(a, dict):
        return {k: _real(v) for k, v in a.items()}
    return a


_ELEMENTWISE = {"add", "sub", "rsub", "mul", "neg", "abs", "to", "clone", "div",
                "floor_divide", "remainder", "bitwise_and", "bitwise_or", "bitwise_not",
                "logical_not", "eq", "ne", "ge", "gt", "le", "lt", "minimum", "maximum"}


def _fold(node, args, kwargs, vals):
    """Constant folding: a call that reads no index (``torch.tensor(True)``,
    ``doc.long()``, ``offsets[1:]``) runs for real on the concrete tensors; an elementwise
    one between a partly indexed tensor and constants (``bias[h] * 2``) is applied to the
    tensor, since it commutes with the indexing still to come. None when neither applies."""
    raw = _get(list(node.args), vals)
    rawkw = {k: _get(v, vals) for k, v in node.kwargs}
    if not _abstract_in(raw) and not _abstract_in(rawkw):
        try:
            out = node.op(*_real(raw), **_real(rawkw))
        except Exception:  # noqa: BLE001 - folding is only a shortcut
            return None
        return Arr(out) if isinstance(out, Tensor) else None
    pending = [a for a in raw if isinstance(a, Arr) and a.idx]
    if node.name not in _ELEMENTWISE or len(pending) != 1 or rawkw or any(
            isinstance(a, (Num, Tri)) or isinstance(a, Arr) and a is not pending[0]
            and a.t.dim() > 0 for a in raw):
        return None
    p = pending[0]
    try:
        return Arr(node.op(*[p.t if a is p else _real(a) for a in raw]), p.idx)
    except Exception:  # noqa: BLE001
        return None


def _tiles(lo: Tensor, hi: Tensor) -> int | None:
    """The common length when ``[lo, hi]`` (along one axis) cut a range into consecutive
    pieces of equal length, the last maybe shorter: the tiles themselves."""
    lo, hi = torch.broadcast_tensors(lo, hi)
    axes = [d for d in range(lo.dim()) if lo.shape[d] > 1]
    if len(axes) != 1 or lo.numel() < 2:
        return None
    a, b = lo.reshape(-1), hi.reshape(-1)
    width = int(b[0] - a[0]) + 1
    n = b - a + 1
    if bool((a[1:] != b[:-1] + 1).any()) or bool((n[:-1] != width).any()) or int(n[-1]) > width:
        return None
    return width


def _segments(x: Tensor, lo: Tensor, width: int) -> tuple[Tensor, Tensor]:
    """Min and max of 1-D ``x`` over consecutive tiles of ``width`` starting at ``lo``'s
    first value, shaped like ``lo``."""
    shape = lo.shape
    start = int(lo.reshape(-1)[0])
    n = lo.numel()
    seg = x[start:start + n * width].double()
    pad = n * width - seg.numel()
    mn = torch.nn.functional.pad(seg, (0, pad), value=INF).view(n, width).amin(1)
    mx = torch.nn.functional.pad(seg, (0, pad), value=-INF).view(n, width).amax(1)
    return mn.view(shape), mx.view(shape)


def _sparse(x: Tensor, dim: int, join) -> Tensor:
    """Sparse table along ``dim``: ``out[k, ..., i, ...]`` joins ``x`` over ``[i, i + 2**k)``
    (clipped at the end), ``(levels, *x.shape)``."""
    levels = [x]
    n, k = x.shape[dim], 1
    while (1 << k) <= n:
        prev = levels[-1]
        half = 1 << (k - 1)
        shifted = torch.cat([prev.narrow(dim, half, n - half), prev.narrow(dim, n - half, half)],
                            dim)
        levels.append(join(prev, shifted))
        k += 1
    return torch.stack(levels)
