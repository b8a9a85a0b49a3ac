"""Recognising attnkit's native mask kinds in a traced mask program.

The program (:class:`~attnkit.masks.probe.Program`) is read symbolically: integer values
as affine forms over ``b``, ``h``, ``q``, ``kv`` and opaque sub-results, comparisons
normalised to ``form >= 0``, ``form == 0`` or ``form != 0``, booleans as and/or/not trees
with negations pushed to the comparisons. Then:

====================================================  ===================================
expression (any spelling that normalises to it)       native kind
====================================================  ===================================
``kv - q <= c`` (``q >= kv``: c = 0)                  ``Causal(offset=c)``
``lo <= kv - q <= hi``, ``abs(q - kv) <= w``          ``Window``
``ids_q(q) == ids_k(kv)``, both non-decreasing        ``SameDocument`` (ids tabulated)
``kv >= start(q)`` with ``kv <= q``, start a valid     ``SameDocument`` of the runs, and the
document start for every query (attention-gym's       window
``offsets[doc[q]]``)
``kv < n`` or ``kv < L[b]`` (n, L ints)               ``KeyPrefix`` (prefix-LM, padding)
``(q + o) // C == kv // C``                           ``ChunkedLocal(C, offset=o)``
``&`` / ``|`` of the above                            ``And`` / ``Or``
a condition constant over the call's positions         dropped, or the whole term
====================================================  ===================================

Anything else is not recognised (the interval evaluator takes over). A match is a proof
on the normalised form, checked against the data where it depends on it (sortedness,
document starts) and then verified by :func:`verify`: the user's function and the native
kind agree on a grid of sampled positions (corners, diagonals, window edges, document
boundaries, random), so a bug here shows up as "not recognised", not as a wrong mask.

Shape letters as in :mod:`attnkit.masks`.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from .base import And, MaskMod, Or
from .data import SameDocument
from .probe import Program, index_args, refs, run
from .structural import Causal, ChunkedLocal, KeyPrefix, Window

__all__ = ["recognise", "verify"]

_POS = ("b", "h", "q", "kv")
_PASS = {"_to_copy", "clone", "alias", "detach", "lift_fresh_copy", "view", "reshape",
         "expand", "contiguous", "_unsafe_view", "squeeze", "unsqueeze", "to"}


class _NotNative(Exception):
    """The expression (or this part of it) has no native kind."""


def _add(x: dict, y: dict, k: int = 1) -> dict:
    out = dict(x)
    for a, c in y.items():
        out[a] = out.get(a, 0) + k * c
    return {a: c for a, c in out.items() if c != 0 or a is None}


class _Symbolic:
    """Affine forms, comparisons and boolean trees of a program's nodes."""

    def __init__(self, program: Program, captured):
        self.p, self.captured = program, captured
        self.support: list = []  # frozenset of input names each node depends on
        self.sym: list = []
        self.defs: dict = {}  # opaque integer atom -> (op name, argument symbols)
        for i, node in enumerate(program.nodes):
            sup = frozenset().union(*(self.support[j] for j in refs((node.args, node.kwargs))))
            if node.op == "input":
                sup = frozenset({_POS[node.arg]})
            self.support.append(sup)
            self.sym.append(self._node(i, node))

    def _of(self, a):
        if isinstance(a, tuple) and len(a) == 2 and a[0] == "n" and isinstance(a[1], int):
            return self.sym[a[1]]
        if isinstance(a, bool):
            return ("const", a)
        if isinstance(a, int):
            return {None: a}
        if isinstance(a, float):
            return ("float", a)
        return None

    def _node(self, i, node):
        dt = node.dtype
        integer = dt is not None and dt != torch.bool and not dt.is_floating_point
        if node.op == "input":
            return {_POS[node.arg]: 1}
        if not self.support[i] and node.shape == () and dt is not None:
            try:  # reads no index: its value, this call
                v = run(self.p, index_args(4), self.captured, upto=i)
            except Exception:  # noqa: BLE001
                return ("opaque", i)
            if dt == torch.bool:
                return ("const", bool(v))
            return {None: int(v)} if integer else ("opaque", i)
        if node.op in ("captured", "element"):
            return ("opaque", i)
        name = node.name
        args = [self._of(a) for a in node.cargs]
        lin = [a for a in args if isinstance(a, dict)]
        if integer and name in ("add", "sub", "rsub") and len(lin) == 2:
            alpha = dict(node.kwargs).get("alpha", 1)
            if not isinstance(alpha, int):
                return self._opaque_int(i, name, args, node)
            x, y = (args[1], args[0]) if name == "rsub" else (args[0], args[1])
            return _add(x, y, alpha if name == "add" else -alpha)
        if integer and name == "neg" and lin:
            return _add({}, args[0], -1)
        if integer and name == "mul" and len(lin) == 2:
            for x, y in ((args[0], args[1]), (args[1], args[0])):
                if set(y) == {None}:
                    return {a: c * y[None] for a, c in x.items()}
        if name in _PASS and args and args[0] is not None and (
                integer and isinstance(args[0], dict) or dt == torch.bool
                and isinstance(args[0], tuple) and args[0][0] != "opaque"):
            if not integer or dt.itemsize >= 4:
                return args[0]
        if dt == torch.bool:
            return self._bool(i, name, args, node)
        if integer:
            return self._opaque_int(i, name, args, node)
        return ("opaque", i)

    def _opaque_int(self, i, name, args, node):
        self.defs[i] = (name, args, dict(node.kwargs))
        return {("n", i): 1}

    def _bool(self, i, name, args, node):
        cmp = {"ge": "ge", "gt": "gt", "le": "le", "lt": "lt", "eq": "eq", "ne": "ne"}
        if name in cmp and len(args) == 2:
            x, y = args
            if isinstance(x, dict) and isinstance(y, dict):
                return _compare(name, _add(x, y, -1))
            if isinstance(x, dict) and isinstance(y, tuple) and y[0] == "float":
                return _compare_float(name, x, y[1])
            if isinstance(y, dict) and isinstance(x, tuple) and x[0] == "float":
                flip = {"ge": "le", "gt": "lt", "le": "ge", "lt": "gt"}.get(name, name)
                return _compare_float(flip, y, x[1])
            return ("opaque", i)
        parts = [a for a in args if isinstance(a, tuple) and a and a[0] != "float"]
        if name in ("bitwise_and", "logical_and", "__and__", "and") and len(parts) == 2:
            return ("and", parts)
        if name in ("bitwise_or", "logical_or", "__or__", "or") and len(parts) == 2:
            return ("or", parts)
        if name in ("bitwise_not", "logical_not") and len(parts) == 1:
            return ("not", parts[0])
        if name == "where" and len(parts) == 3:  # where(c, x, y) = c & x | ~c & y
            c, x, y = parts
            return ("or", [("and", [c, x]), ("and", [("not", c), y])])
        if name in ("new_ones", "ones_like", "full", "new_full", "full_like", "scalar_tensor",
                    "new_zeros", "zeros_like") and node.shape == ():
            value = {"new_ones": 1, "ones_like": 1, "new_zeros": 0, "zeros_like": 0}.get(name)
            if value is None:
                value = node.args[-1] if name != "scalar_tensor" else node.args[0]
            return ("const", bool(value)) if isinstance(value, (bool, int, float)) else \
                ("opaque", i)
        return ("opaque", i)


def _compare(op: str, d: dict):
    """``d op 0`` for an integer form ``d``, normalised to ``ge``/``eq``/``ne``."""
    if op == "gt":
        return ("cmp", "ge", _add(d, {None: -1}))
    if op == "le":
        return ("cmp", "ge", _add({}, d, -1))
    if op == "lt":
        return ("cmp", "ge", _add(_add({}, d, -1), {None: -1}))
    return ("cmp", op, d)


def _compare_float(op: str, x: dict, c: float):
    """``x op c`` with integer ``x`` and a float ``c``: the same on the integers."""
    if op == "eq" and not float(c).is_integer():
        return ("const", False)
    if op == "ne" and not float(c).is_integer():
        return ("const", True)
    k = {"ge": math.ceil(c), "gt": math.floor(c) + 1, "le": math.floor(c),
         "lt": math.ceil(c) - 1}.get(op, int(c))
    op = {"gt": "ge", "lt": "le"}.get(op, op)
    return _compare(op, _add(x, {None: -k}))


def _negate(e):
    kind = e[0]
    if kind == "const":
        return ("const", not e[1])
    if kind == "not":
        return e[1]
    if kind == "and":
        return ("or", [_negate(p) for p in e[1]])
    if kind == "or":
        return ("and", [_negate(p) for p in e[1]])
    if kind == "cmp":
        if e[1] == "ge":  # not (d >= 0)  <=>  -d - 1 >= 0
            return ("cmp", "ge", _add(_add({}, e[2], -1), {None: -1}))
        return ("cmp", "ne" if e[1] == "eq" else "eq", e[2])
    return ("not", e)


def _normal(e):
    """Negations pushed down; nested and/or flattened; constants folded."""
    if e[0] == "not":
        inner = _normal(e[1])
        return _normal(_negate(inner)) if inner[0] != "opaque" else ("not", inner)
    if e[0] in ("and", "or"):
        absorbing = e[0] == "or"  # True absorbs an or, False an and
        flat = []
        for p in (_normal(x) for x in e[1]):
            if p[0] == "const":
                if p[1] == absorbing:
                    return p
                continue
            flat += p[1] if p[0] == e[0] else [p]
        if not flat:
            return ("const", not absorbing)
        return flat[0] if len(flat) == 1 else (e[0], flat)
    return e


# --- from normal form to kinds -------------------------------------------------------------

class _Builder:
    """Native kinds for a normalised expression at ``T`` queries and ``S`` keys."""

    def __init__(self, sym: _Symbolic, captured, T: int, S: int, bcap: int | None):
        self.sym, self.captured, self.T, self.S, self.bcap = sym, captured, T, S, bcap

    def support(self, form: dict) -> set:
        out = set()
        for a in form:
            if isinstance(a, str):
                out.add(a)
            elif a is not None:
                out |= self.sym.support[a[1]]
        return out

    def table(self, form: dict, var: str, n: int) -> Tensor:
        """``form`` evaluated at ``var = 0..n-1`` (and ``b = 0..bcap-1`` when it reads
        ``b``): ``(n,)`` or ``(bcap, n)`` int64."""
        sup = self.support(form) - {var}
        if sup - {"b"} or "b" in sup and self.bcap is None:
            raise _NotNative
        zero = torch.zeros((), dtype=torch.long)
        b = torch.arange(self.bcap).view(-1, 1) if "b" in sup else zero
        inputs = {"b": b, "h": zero, var: torch.arange(n)}
        out = torch.full((), form.get(None, 0), dtype=torch.long)
        for a, c in form.items():
            if a is None:
                continue
            if isinstance(a, str):
                val = inputs.get(a, zero)
            else:
                args = [inputs.get(p, zero) for p in _POS]
                try:
                    val = run(self.sym.p, args, self.captured, upto=a[1])
                except Exception as err:  # noqa: BLE001 - e.g. an index past the tensor
                    raise _NotNative from err
            out = out + c * val.long()
        return out.expand(*out.shape[:-1], n) if out.dim() else out.expand(n)

    def build(self, e) -> MaskMod:
        kind = e[0]
        if kind == "or":
            return Or(tuple(self.build(p) for p in e[1]))
        if kind == "const":
            if not e[1]:
                raise _NotNative  # "never" has no native kind: intervals say it
            return Window(left=None, right=None)
        return self.conjunction(e[1] if kind == "and" else [e])

    def conjunction(self, atoms) -> MaskMod:
        lo, hi, parts, starts = -math.inf, math.inf, [], []
        for e in atoms:
            if e[0] == "or":
                parts.append(self.build(e))
                continue
            if e[0] == "const":
                if not e[1]:
                    raise _NotNative
                continue
            if e[0] != "cmp":
                raise _NotNative
            _, op, d = e
            got = self.window(op, d)
            if got is not None:
                lo, hi = max(lo, got[0]), min(hi, got[1])
                continue
            if self.constant(op, d):
                continue
            if op == "ge" and d.get("kv") == 1:
                rest = _add(d, {"kv": 1}, -1)  # kv >= -rest
                if self.support(rest) <= {"q"} and "q" in self.support(rest):
                    starts.append(_add({}, rest, -1))
                    continue
            parts.append(self.atom(op, d))
        if lo > hi:
            raise _NotNative
        for start in starts:
            if hi > 0:
                raise _NotNative  # kv >= start(q) is a document only up to the query
            parts.append(self.document_starts(start))
        window = _window(lo, hi)
        out = ([window] if window is not None else []) + parts
        if not out:
            return Window(left=None, right=None)
        return out[0] if len(out) == 1 else And(tuple(out))

    def window(self, op, d):
        """``(lo, hi)`` bounds on ``kv - q`` when ``d`` is ``g*(q - kv) + c``."""
        g = d.get("q", 0)
        if set(d) - {"q", "kv", None} or g == 0 or d.get("kv", 0) != -g:
            return None
        c = d.get(None, 0)
        if op == "ge":
            return (-math.inf, c // g) if g > 0 else (-(c // -g), math.inf)
        if op == "eq":
            if c % g:
                raise _NotNative
            return (c // g, c // g)
        raise _NotNative

    def constant(self, op, d) -> bool:
        """True when a condition on one index (or none) holds at every position of the
        call; raises when it holds at none, or at some queries only (no native kind)."""
        sup = self.support(d)
        if sup - {"q", "kv"} or len(sup) > 1:
            return False
        if not sup:
            v = torch.tensor(d.get(None, 0))
        else:
            var = next(iter(sup))
            v = self.table(d, var, self.T if var == "q" else self.S)
        ok = v >= 0 if op == "ge" else v == 0 if op == "eq" else v != 0
        if bool(ok.all()):
            return True
        if sup == {"kv"}:
            return False  # maybe a key prefix: atom() decides
        raise _NotNative

    def atom(self, op, d) -> MaskMod:
        sup = self.support(d)
        if op == "ge" and d.get("kv", 0) < 0 and sup <= {"kv", "b"}:
            g = -d["kv"]
            rest = _add(d, {"kv": d["kv"]}, -1)  # kv <= rest / g
            if "b" not in self.support(rest):
                return KeyPrefix(rest.get(None, 0) // g + 1)
            if self.bcap is None:
                raise _NotNative
            return KeyPrefix(torch.div(self.table(rest, "b", self.bcap), g,
                                       rounding_mode="floor") + 1)
        if op == "eq":
            return self.same(d)
        raise _NotNative

    def same(self, d) -> MaskMod:
        """``A(q) == B(kv)``: chunks or documents."""
        qside = {a: c for a, c in d.items() if a is not None and "kv" not in self.support({a: 1})}
        kside = {a: -c for a, c in d.items() if a is not None and a not in qside}
        if not qside or not kside or "q" not in self.support(qside) \
                or self.support(kside) - {"kv", "b"} or self.support(qside) - {"q", "b"}:
            raise _NotNative
        qside[None] = d.get(None, 0)
        chunk = self.chunks(qside, kside)
        if chunk is not None:
            return chunk
        ids, kv_ids = self.table(qside, "q", self.T), self.table(kside, "kv", self.S)
        ids, kv_ids = ids.view(-1, self.T), kv_ids.view(-1, self.S)
        if bool((ids.diff(dim=1) < 0).any()) or bool((kv_ids.diff(dim=1) < 0).any()):
            raise _NotNative  # unsorted ids: the interval evaluator does better
        rows = max(ids.shape[0], kv_ids.shape[0])  # one of them may not read b
        ids, kv_ids = ids.expand(rows, -1), kv_ids.expand(rows, -1)
        same_keys = self.T == self.S and torch.equal(ids, kv_ids)
        return SameDocument(ids.contiguous(), None if same_keys else kv_ids.contiguous())

    def chunks(self, qside, kside):
        """``(q + o) // C == kv // C`` as :class:`ChunkedLocal`, else None."""
        if len(kside) != 1 or set(qside) - {None} and len(set(qside) - {None}) != 1:
            return None
        (ka, kc), = kside.items()
        qa = next(a for a in qside if a is not None)
        if kc != 1 or qside[qa] != 1 or qside[None] or not isinstance(ka, tuple) \
                or not isinstance(qa, tuple):
            return None
        kd, qd = self.sym.defs.get(ka[1]), self.sym.defs.get(qa[1])
        parts = []
        for name, args, kw in (kd, qd):
            floor = name == "floor_divide" or name == "div" and kw.get("rounding_mode") == "floor"
            if not floor or len(args) != 2 or not isinstance(args[0], dict) \
                    or not isinstance(args[1], dict) or set(args[1]) != {None}:
                return None
            parts.append((args[0], args[1][None]))
        (kform, kc_), (qform, qc_) = parts
        if kc_ != qc_ or kc_ < 1 or kform != {"kv": 1} or set(qform) - {"q", None} \
                or qform.get("q") != 1:
            return None
        return ChunkedLocal(int(kc_), offset=int(qform.get(None, 0)))

    def document_starts(self, start: dict) -> MaskMod:
        """``kv >= start(q)`` (with ``kv <= q``) is "same document" when ``start`` is, for
        every query, the first position of its run."""
        s = self.table(start, "q", self.T).clamp(min=0)
        x = torch.arange(self.T)
        prev = torch.cat([s[:1], s[:-1]])
        ok = bool((s <= x).all()) and int(s[0]) == 0 and bool(((s == prev) | (s == x)).all())
        if not ok:
            raise _NotNative
        kv = torch.full((self.S,), self.T, dtype=torch.long)  # keys past T: no query's run
        kv[:min(self.S, self.T)] = s[:self.S]
        return SameDocument(s[None], None if self.S == self.T else kv[None])


def _window(lo, hi) -> MaskMod | None:
    """The window ``lo <= kv - q <= hi`` in attnkit's parameters (None: no bound)."""
    if lo == -math.inf and hi == math.inf:
        return None
    if lo == -math.inf:
        return Causal(offset=int(hi))
    if hi == math.inf:
        return Window(left=int(-lo), right=None) if lo <= 0 else \
            Window(left=0, right=None, offset=int(lo))
    lo, hi = int(lo), int(hi)
    if lo <= 0 <= hi:
        return Window(left=-lo, right=hi)
    if hi < 0:
        return Window(left=hi - lo, right=0, offset=hi)
    return Window(left=0, right=hi - lo, offset=lo)


def _expand_abs(e, sym: _Symbolic):
    """``c - |A| >= 0`` as ``A <= c & -A <= c``; ``|A| - c >= 0`` as an or."""
    if e[0] in ("and", "or"):
        return (e[0], [_expand_abs(p, sym) for p in e[1]])
    if e[0] != "cmp" or e[1] != "ge":
        return e
    d = e[2]
    atoms = [a for a in d if a is not None]
    if len(atoms) != 1 or not isinstance(atoms[0], tuple):
        return e
    a, c = atoms[0], d[atoms[0]]
    name, args, _ = sym.defs.get(a[1], (None, None, None))
    if name != "abs" or not isinstance(args[0], dict) or abs(c) != 1:
        return e
    inner, k = args[0], d.get(None, 0)
    pos = ("cmp", "ge", _add({None: k}, inner, c))
    neg = ("cmp", "ge", _add({None: k}, inner, -c))
    return ("and", [pos, neg]) if c < 0 else ("or", [pos, neg])


def recognise(program: Program, captured, T: int, S: int, bcap: int | None):
    """The native kind equal to ``program`` at ``T`` queries and ``S`` keys, or None.

    Args:
        bcap: how many batch indices ``b`` can take (from the tensors it indexes), or None.
    """
    if program.nodes[program.output].dtype != torch.bool or \
            program.nodes[program.output].shape != ():
        return None
    sym = _Symbolic(program, captured)
    out = sym.sym[program.output]
    if not isinstance(out, tuple) or out[0] in ("opaque", "float"):
        return None
    try:
        return _Builder(sym, captured, T, S, bcap).build(_normal(_expand_abs(_normal(out), sym)))
    except _NotNative:
        return None


# --- verification --------------------------------------------------------------------------

def _samples(n: int, extra, g: torch.Generator, k: int = 24) -> Tensor:
    pts = [0, n - 1, n // 2, *extra, *torch.randint(0, n, (k,), generator=g).tolist()]
    return torch.tensor(sorted({int(p) for p in pts if 0 <= p < n}), dtype=torch.long)


def verify(native: MaskMod, grid, T: int, S: int, bcap: int | None) -> bool:
    """Whether ``grid(b, h, q, kv)`` (the user's function as attnkit evaluates it) equals
    ``native.grid`` on sampled positions: both ends, diagonals and window edges, document
    and chunk boundaries, random ones."""
    g = torch.Generator().manual_seed(T * 31 + S)
    edges = []
    for t in native.tensors():
        if t.dim() >= 1 and t.shape[-1] > 1 and not t.dtype == torch.bool:
            change = (t.reshape(-1, t.shape[-1]).diff(dim=-1) != 0).any(0).nonzero().flatten()
            change = change[torch.randperm(change.numel(), generator=g)[:16]]
            edges += [int(c) + d for c in change for d in (0, 1, 2)]
        elif t.dim() == 1:
            edges += t.reshape(-1).tolist()[:8]
    offsets = [0, 1, -1]
    for part in (native.parts if isinstance(native, (And, Or)) else (native,)):
        for side in (getattr(part, "left", None), getattr(part, "right", None)):
            if isinstance(side, int):
                offsets += [side, side + 1, -side, -side - 1]
        o = getattr(part, "offset", None) or 0
        offsets += [o, o + 1, o - 1]
        if isinstance(getattr(part, "n", None), int):
            edges += [part.n - 1, part.n]
        if isinstance(part, ChunkedLocal):
            edges += [part.size * i + d for i in range(4) for d in (-1, 0)]
    qs = _samples(T, edges, g)
    diag = [int(q) + o for q in qs[:12] for o in offsets]
    ks = _samples(S, edges + diag, g)
    bs = torch.arange(min(bcap or 1, 4)).view(-1, 1, 1, 1)
    h = torch.zeros(1, 1, 1, 1, dtype=torch.long)
    q, kv = qs.view(1, 1, -1, 1), ks.view(1, 1, 1, -1)
    try:
        want = grid(bs, h, q, kv)
        got = native.grid(bs, h, q, kv)
    except Exception:  # noqa: BLE001 - the function cannot run on these positions
        return False
    shape = (bs.shape[0], 1, qs.numel(), ks.numel())
    return isinstance(want, Tensor) and want.dtype == torch.bool and torch.equal(
        torch.broadcast_to(want, shape), torch.broadcast_to(got, shape))
