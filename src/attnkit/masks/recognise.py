"""Recognising attnkit's native mask kinds in a traced mask program.

The program (:class:`~attnkit.masks.probe.Program`) is read in the normal form of
:mod:`attnkit.masks.normal_form` (integer values as affine forms over ``b``, ``h``, ``q``,
``kv`` and opaque sub-results, comparisons as ``form >= 0``, ``form == 0`` or ``form != 0``,
booleans as and/or trees with negations pushed to the comparisons). Then:

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
from .normal_form import Symbolic, add, expand_abs, normal
from .probe import Program, run
from .structural import Causal, ChunkedLocal, KeyPrefix, Window

__all__ = ["recognise", "verify"]

_POS = ("b", "h", "q", "kv")


class _NotNative(Exception):
    """The expression (or this part of it) has no native kind."""


# --- from normal form to kinds -------------------------------------------------------------

class _Builder:
    """Native kinds for a normalised expression at ``T`` queries and ``S`` keys."""

    def __init__(self, sym: Symbolic, captured, T: int, S: int, bcap: int | None):
        self.sym, self.captured, self.T, self.S, self.bcap = sym, captured, T, S, bcap
        self.device = _device(captured)

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
        dev = self.device
        zero = torch.zeros((), dtype=torch.long, device=dev)
        b = torch.arange(self.bcap, device=dev).view(-1, 1) if "b" in sup else zero
        inputs = {"b": b, "h": zero, var: torch.arange(n, device=dev)}
        out = torch.full((), form.get(None, 0), dtype=torch.long, device=dev)
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
                rest = add(d, {"kv": 1}, -1)  # kv >= -rest
                if self.support(rest) <= {"q"} and "q" in self.support(rest):
                    starts.append(add({}, rest, -1))
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
            rest = add(d, {"kv": d["kv"]}, -1)  # kv <= rest / g
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
        x = torch.arange(self.T, device=s.device)
        prev = torch.cat([s[:1], s[:-1]])
        ok = bool((s <= x).all()) and int(s[0]) == 0 and bool(((s == prev) | (s == x)).all())
        if not ok:
            raise _NotNative
        kv = torch.full((self.S,), self.T, dtype=torch.long, device=s.device)  # past T: no run
        kv[:min(self.S, self.T)] = s[:self.S]
        return SameDocument(s[None], None if self.S == self.T else kv[None])


def _device(tensors):
    """Where the function's tensors live (its indices must be there too)."""
    return next((t.device for t in tensors), torch.device("cpu"))


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

def recognise(program: Program, captured, T: int, S: int, bcap: int | None):
    """The native kind equal to ``program`` at ``T`` queries and ``S`` keys, or None.

    Args:
        bcap: how many batch indices ``b`` can take (from the tensors it indexes), or None.
    """
    if program.nodes[program.output].dtype != torch.bool or \
            program.nodes[program.output].shape != ():
        return None
    sym = Symbolic(program, captured)
    out = sym.sym[program.output]
    if not isinstance(out, tuple) or out[0] in ("opaque", "float"):
        return None
    try:
        return _Builder(sym, captured, T, S, bcap).build(normal(expand_abs(normal(out), sym)))
    except _NotNative:
        return None


# --- verification --------------------------------------------------------------------------

def _samples(n: int, extra, g: torch.Generator, k: int = 24) -> Tensor:
    pts = [0, n - 1, n // 2, *extra, *torch.randint(0, n, (k,), generator=g).tolist()]
    return torch.tensor(sorted({int(p) for p in pts if 0 <= p < n}), dtype=torch.long)


def verify(native: MaskMod, grid, T: int, S: int, bcap: int | None, device=None) -> bool:
    """Whether ``grid(b, h, q, kv)`` (the user's function as attnkit evaluates it) equals
    ``native.grid`` on sampled positions: both ends, diagonals and window edges, document
    and chunk boundaries, random ones."""
    g = torch.Generator().manual_seed(T * 31 + S)
    edges = []
    for t in native.tensors():
        if t.dim() >= 1 and t.shape[-1] > 1 and not t.dtype == torch.bool:
            change = (t.reshape(-1, t.shape[-1]).diff(dim=-1) != 0).any(0).nonzero().flatten()
            change = change.cpu()
            change = change[torch.randperm(change.numel(), generator=g)[:16]]
            edges += [int(c) + d for c in change for d in (0, 1, 2)]
        elif t.dim() == 1:
            edges += t.reshape(-1)[:8].tolist()
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
    bs = torch.arange(min(bcap or 1, 4), device=device).view(-1, 1, 1, 1)
    h = torch.zeros(1, 1, 1, 1, dtype=torch.long, device=device)
    q, kv = qs.to(device).view(1, 1, -1, 1), ks.to(device).view(1, 1, 1, -1)
    try:
        want = grid(bs, h, q, kv)
        got = native.grid(bs, h, q, kv)
    except Exception:  # noqa: BLE001 - the function cannot run on these positions
        return False
    shape = (bs.shape[0], 1, qs.numel(), ks.numel())
    return isinstance(want, Tensor) and want.dtype == torch.bool and torch.equal(
        torch.broadcast_to(want, shape), torch.broadcast_to(got, shape))
