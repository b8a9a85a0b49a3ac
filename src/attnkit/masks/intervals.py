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

import torch
from torch import Tensor

from .interval_rules import INF, Arr, Num, Rules, Tri, _const_num, _nan0, _top, _tri_const
from .probe import Program, refs, version

__all__ = ["Num", "Tri", "Arr", "Evaluator", "INF"]

_POS = ("b", "h", "q", "kv")


class Evaluator(Rules):
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
