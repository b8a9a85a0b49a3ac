"""Mask functions understood, not just evaluated: what ``MaskFn.resolve`` returns.

A user's ``mask_mod(b, h, q_idx, kv_idx)`` is read once per call (:mod:`.probe`: one eager
run on 0-d indices, and a ``make_fx`` trace cached by what that run showed) and becomes:

1. a native kind (:mod:`.recognise`) when the expression is one: ``q >= kv`` *is*
   ``causal``, so it reaches SDPA's ``is_causal``; windows and documents get the chunked
   backend's plans. Every match is a proof on the normalised expression, checked on the
   data and verified against the function on sampled positions;
2. otherwise a :class:`TracedMask`: the function itself for evaluation, with block
   summaries from the sound interval evaluator (:mod:`.intervals`); tiles it leaves
   undecided are settled by sampling the traced program (a True and a False seen: partial)
   and, for the rest, by evaluating the function on those tiles only, a row of tiles at a
   time. ``describe()`` says so, and names operators outside the rules;
3. or the plain function (``MaskFn``: every tile evaluated) when it cannot be read, with
   the reason in ``describe()``.

Results are cached by the run's key, the captured tensors' identities and versions, and
the lengths: an in-place update of a captured tensor, or a closure variable rebound to
another tensor, is a new key.

Shape letters as in :mod:`attnkit.masks`; ``Bn``/``Hn`` are the batch indices and heads a
summary is computed for (1 when the function ignores them).
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field, replace

import torch
from torch import Tensor

from .base import MaskFn, MaskMod
from .intervals import Evaluator, Num, Tri
from .probe import Program, index_args, probe, run, version
from .recognise import recognise, verify

__all__ = ["TracedMask", "PerBatch", "analyse"]

_RESOLVED: OrderedDict = OrderedDict()
_VERIFIED: OrderedDict = OrderedDict()  # (function and data, kind's structure) verified once
_MAX_RESOLVED = 32
_ENUMERATE = 64  # batch indices / heads enumerated one by one up to this many
_CELLS = 1 << 22  # tiles x (b, h) evaluated at once


@dataclass(eq=False)
class _State:
    """What a traced mask knows at one ``(T, S)``: shared by the copies that rebind it to
    a newer wrapper of the same computation."""

    program: Program
    captured: tuple
    T: int
    S: int
    caps: tuple  # (bcap, hcap): how many b / h the indexed tensors allow, or None
    evaluator: Evaluator
    summaries: dict = field(default_factory=dict)


def _caps(program: Program) -> tuple:
    """For b and h: the smallest size of a tensor dim they index directly (an index past it
    would fail), or None when they are never used as an index."""
    caps = [None, None]
    for node in program.live():
        if node.name != "index" or len(node.cargs) != 2:
            continue
        base = node.cargs[0]
        base = program.nodes[base[1]] if isinstance(base, tuple) and base[0] == "n" else None
        if base is None:
            continue
        for d, a in enumerate(node.cargs[1]):
            ref = program.nodes[a[1]] if isinstance(a, tuple) and a[0] == "n" else None
            if ref is not None and ref.op == "input" and ref.arg in (0, 1) and d < len(base.shape):
                n = base.shape[d]
                caps[ref.arg] = n if caps[ref.arg] is None else min(caps[ref.arg], n)
    return tuple(caps)


def analyse(mfn: MaskFn, T: int, S: int) -> MaskMod:
    """``mfn`` at ``T`` queries and ``S`` keys: a native kind, a :class:`TracedMask`, or
    ``mfn`` itself with the reason it stays opaque (see the module docstring)."""
    if T < 1 or S < 1 or torch.compiler.is_compiling():  # no recording inside a graph
        return mfn
    pr = probe(mfn.fn, index_args(4))
    mfn._seen["probe"] = pr  # grid() runs a function of scalars under vmap
    why = None
    if pr.key is None:
        why = f"{pr.error[:100]} on 0-d index tensors"
    elif pr.data_dependent:
        why = "its Python control flow reads index values"
    elif pr.out != (torch.bool, ()):
        why = f"it returns {pr.out} on 0-d indices, not a 0-d bool tensor"
    if why is not None:
        return replace(mfn, why=why)
    versions = tuple(version(t) for t in pr.captured)
    same = (type(mfn), pr.key, tuple(map(id, pr.captured)), versions)  # at any lengths
    if None in versions:  # an inference tensor: no version counter, no cache
        return _resolve(mfn, pr.program, pr.captured, T, S, None)
    hit = _RESOLVED.get(same + (T, S))
    if hit is not None:
        _RESOLVED.move_to_end(same + (T, S))
        return replace(hit, source=mfn) if isinstance(hit, TracedMask) else hit
    got = _resolve(mfn, pr.program, pr.captured, T, S, same)
    _RESOLVED[same + (T, S)] = got  # holds the captured tensors: their ids stay unique
    while len(_RESOLVED) > _MAX_RESOLVED:
        _RESOLVED.popitem(last=False)
    return got


def _resolve(mfn, program, captured, T, S, same) -> MaskMod:
    """Recognise and verify (:mod:`.recognise`), else trace. A structure verified once for
    this function and data is not sampled again at other lengths (a decode step is a new
    length every time): the match is a proof, the samples a guard against its bugs."""
    caps = _caps(program)
    state = _State(program, captured, T, S, caps, Evaluator(program, captured))
    traced = TracedMask(mfn, state)
    try:
        native = recognise(program, captured, T, S, caps[0])
        known = native is not None and same is not None and \
            (same, _shape(native)) in _VERIFIED
        ok = native is not None and (known or verify(
            native, mfn.grid, T, S, caps[0], traced._device()) and
            _consistent(native, traced, T, S))
    except Exception:  # noqa: BLE001 - reading a function must never break running it
        ok = False
    if ok and same is not None:
        _VERIFIED[(same, _shape(native))] = True
        while len(_VERIFIED) > 4 * _MAX_RESOLVED:
            _VERIFIED.popitem(last=False)
    if ok and caps[0] is not None and caps[0] > 1 and program.uses(0):
        return PerBatch(native, caps[0], mfn.describe())  # tables have one row per b
    return native if ok else traced


def _shape(mod: MaskMod) -> str:
    """A kind's structure without its numbers (``causal(offset=?)``, ``window(...)``)."""
    return "".join("?" if c.isdigit() else c for c in mod.describe())


def _consistent(native: MaskMod, traced: "TracedMask", T: int, S: int) -> bool:
    """A coarse cross-check: the interval evaluator never calls a tile full where the
    native kind calls it empty, nor the reverse."""
    bq, bk = max(64, -(-T // 64)), max(64, -(-S // 64))
    dev = traced._device()
    q_lo = torch.arange(0, T, bq, device=dev).view(-1, 1)
    k_lo = torch.arange(0, S, bk, device=dev).view(1, -1)
    q_hi, k_hi = (q_lo + bq).clamp(max=T) - 1, (k_lo + bk).clamp(max=S) - 1
    some, every = (x.cpu() for x in native.blocks(q_lo, q_hi, k_lo, k_hi))
    t, f = traced._abstract(q_lo, q_hi, k_lo, k_hi, *traced._indices(None, None))
    t, f = t.any(0).any(0), f.any(0).any(0)
    return not bool((every & ~t).any()) and not bool((~some & ~f).any())


@dataclass(frozen=True, eq=False)
class PerBatch(MaskMod):
    """A recognised kind whose tables have one row per batch index ``b`` the function can
    index (``kv < L[b]``: ``L``'s length): a call may use fewer, as the function allows;
    more is the function's own ``IndexError``. Everything else is the kind's."""

    mod: MaskMod
    rows: int
    name: str

    def grid(self, b, h, q, k):
        return self.mod.grid(b, h, q, k)

    def tile(self, B, H, q0, q1, k0, k1, device):
        out = self.mod.tile(self.rows, H, q0, q1, k0, k1, device)
        return out[:B] if out.dim() == 4 and out.shape[0] == self.rows else out

    def blocks(self, q_lo, q_hi, k_lo, k_hi):
        return self.mod.blocks(q_lo, q_hi, k_lo, k_hi)

    def validate(self, B, H, T, S):
        """
        Raises:
            IndexError: the call has more samples than the tensors ``b`` indexes.
        """
        if B > self.rows:
            raise IndexError(f"mask_mod {self.name} indexes a tensor of {self.rows} rows by "
                             f"its batch index b, but the call has B={B} samples")
        self.mod.validate(self.rows, H, T, S)

    def describe(self):
        return self.mod.describe()

    def tensors(self):
        return self.mod.tensors()


@dataclass(frozen=True, eq=False)
class TracedMask(MaskMod):
    """A mask function with block summaries from its traced program (see the module
    docstring). Evaluation, validation and errors are the wrapped function's own."""

    source: MaskFn
    state: _State

    def grid(self, b, h, q, k):
        return self.source.grid(b, h, q, k)

    def validate(self, B, H, T, S):
        self.source.validate(B, H, T, S)

    def resolve(self, T, S):
        if (T, S) == (self.state.T, self.state.S):
            return self
        return self.source.resolve(T, S)

    def tensors(self):
        return tuple(t for t in self.state.captured if t.dim() > 0 or t.requires_grad)

    def describe(self):
        name = self.source.describe()
        beyond = sorted(self.state.evaluator.beyond)
        if beyond:
            return (f"{name} [traced; outside the interval rules: {', '.join(beyond)}; "
                    f"tiles they leave open are evaluated]")
        return f"{name} [traced; tiles classified by interval rules, undecided ones evaluated]"

    # --- block summaries -------------------------------------------------------------------

    def blocks(self, q_lo, q_hi, k_lo, k_hi):
        """``(some, every)`` per tile, exact wherever the function can be evaluated for
        every batch index and head it may see (it is evaluated on the undecided tiles)."""
        key = tuple(x.cpu().numpy().tobytes() for x in (q_lo, q_hi, k_lo, k_hi))
        hit = self.state.summaries.get(key)
        if hit is None:
            t, f = self._classified(q_lo, q_hi, k_lo, k_hi, None, None)
            hit = (t.any(0).any(0), ~f.any(0).any(0))
            self.state.summaries[key] = hit
            while len(self.state.summaries) > 8:
                self.state.summaries.pop(next(iter(self.state.summaries)))
        return hit

    def classify(self, B: int, H: int, block_q: int, block_k: int) -> Tensor:
        """Per batch index and head: ``(Bn, Hn, nQ, nK)`` int8 of EMPTY (0), PARTIAL (1),
        FULL (2) at ``block_q x block_k``, ``Bn = B`` when the function reads ``b`` (else
        1), ``Hn`` likewise: what torch's ``create_block_mask(mask_mod, B, H, ...)``
        computes, without evaluating the decided tiles."""
        T, S = self.state.T, self.state.S
        dev = self._device()
        q_lo = torch.arange(0, T, block_q, device=dev).view(-1, 1)
        k_lo = torch.arange(0, S, block_k, device=dev).view(1, -1)
        t, f = self._classified(q_lo, (q_lo + block_q).clamp(max=T) - 1, k_lo,
                                (k_lo + block_k).clamp(max=S) - 1, B, H)
        return (t.to(torch.int8) + (t & ~f).to(torch.int8)).cpu()

    def _device(self):
        return next((t.device for t in self.state.captured), None)

    def _indices(self, B, H):
        """Batch indices and heads to evaluate: points, or one interval when there are too
        many (or, for a summary, no bound is known)."""
        out = []
        for pos, n in ((0, B), (1, H)):
            if not self.state.program.uses(pos):
                out.append(torch.zeros(1, dtype=torch.long))
                continue
            n = n if n is not None else self.state.caps[pos]
            out.append(torch.arange(n) if n is not None and n <= _ENUMERATE else
                       (0, (n or 1 << 31) - 1))
        return out

    def _abstract(self, q_lo, q_hi, k_lo, k_hi, bs, hs):
        """Interval evaluation: ``(t, f)`` bool ``(Bn, Hn, nQ, nK)``."""
        dev = self._device()

        def iv(x, shape):
            if isinstance(x, tuple):
                lo, hi = (torch.tensor(float(v), dtype=torch.float64, device=dev) for v in x)
                return Num(lo.view(shape), hi.view(shape))
            x = x.to(dev, torch.float64).view(shape)
            return Num(x, x)
        env = {"b": iv(bs, (-1, 1, 1, 1)), "h": iv(hs, (1, -1, 1, 1)),
               "q": Num(q_lo.to(dev, torch.float64).view(1, 1, -1, 1),
                        q_hi.to(dev, torch.float64).view(1, 1, -1, 1)),
               "kv": Num(k_lo.to(dev, torch.float64).view(1, 1, 1, -1),
                         k_hi.to(dev, torch.float64).view(1, 1, 1, -1))}
        try:
            out = self.state.evaluator.run(env)
        except Exception:  # noqa: BLE001 - never break a working function: "anything"
            out = None
        shape = (len(bs) if not isinstance(bs, tuple) else 1,
                 len(hs) if not isinstance(hs, tuple) else 1, q_lo.numel(), k_lo.numel())
        if not isinstance(out, Tri):
            out = Tri(torch.tensor(True), torch.tensor(True))
        # the tile grid is small: its bookkeeping stays on the CPU
        return (torch.broadcast_to(out.t.cpu(), shape).clone(),
                torch.broadcast_to(out.f.cpu(), shape).clone())

    def _classified(self, q_lo, q_hi, k_lo, k_hi, B, H):
        bs, hs = self._indices(B, H)
        if isinstance(bs, Tensor) and len(bs) * len(hs) * q_lo.numel() * k_lo.numel() > _CELLS \
                and len(bs) > 1:
            parts = [self._classified_for(q_lo, q_hi, k_lo, k_hi, bs[i:i + 1], hs)
                     for i in range(len(bs))]
            return torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])
        return self._classified_for(q_lo, q_hi, k_lo, k_hi, bs, hs)

    def _classified_for(self, q_lo, q_hi, k_lo, k_hi, bs, hs):
        t, f = self._abstract(q_lo, q_hi, k_lo, k_hi, bs, hs)
        open_ = t & f
        if not bool(open_.any()):
            return t, f
        bounds = [x.reshape(-1).cpu() for x in (q_lo, q_hi, k_lo, k_hi)]
        certain = self._sampled(open_, bounds, bs, hs)
        open_ &= ~certain
        if bool(open_.any()) and not isinstance(bs, tuple) and not isinstance(hs, tuple):
            for i in range(len(bs)):  # one batch index at a time: Hn x block_q x keys
                self._evaluated(t[i:i + 1], f[i:i + 1], open_[i:i + 1], bounds, bs[i:i + 1], hs)
        return t, f

    def _sampled(self, open_, bounds, bs, hs) -> Tensor:
        """Open tiles where the traced program, run on a few points of the tile, already
        gave both True and False: certainly partial."""
        where = open_.nonzero()  # (N, 4): b, h, i, j
        q_lo, q_hi, k_lo, k_hi = bounds
        i, j = where[:, 2], where[:, 3]
        qa, qb, ka, kb = q_lo[i], q_hi[i], k_lo[j], k_hi[j]
        # corners, middles, and where the tile meets the diagonal (every point inside it)
        x = torch.maximum(qa, ka)
        qd = torch.minimum(torch.maximum(x, qa), qb)
        kd = torch.minimum(torch.maximum(x, ka), kb)
        kd1 = torch.maximum(kd - 1, ka)
        qs = torch.stack([qa, qa, qa, (qa + qb) // 2, qb, qb, qb, qd, qd], 1)  # (N, 9)
        ks = torch.stack([ka, (ka + kb) // 2, kb, (ka + kb) // 2, ka, (ka + kb) // 2, kb, kd,
                          kd1], 1)  # (N, 9)
        pick = [bs[where[:, 0]] if isinstance(bs, Tensor) else torch.zeros_like(i),
                hs[where[:, 1]] if isinstance(hs, Tensor) else torch.zeros_like(i)]
        args = [p[:, None].expand_as(qs).reshape(-1) for p in pick] + \
            [qs.reshape(-1), ks.reshape(-1)]  # b, h, q, kv: (N * 9,) aligned
        dev = self._device()
        try:
            out = run(self.state.program, [a.to(dev) for a in args], self.state.captured)
            out = torch.broadcast_to(out, args[2].shape).view(qs.shape).cpu()  # (N, 9)
        except Exception:  # noqa: BLE001 - e.g. chained indexing: no shortcut
            return torch.zeros_like(open_)
        both = out.any(1) & ~out.all(1)
        certain = torch.zeros_like(open_)
        certain[tuple(where.T)] = both
        return certain

    def _evaluated(self, t, f, open_, bounds, bs, hs):
        """Settle the open tiles by evaluating the function on them, a row of tiles at a
        time, on those tiles' keys only (``Bn x Hn x block_q x keys`` bools at most)."""
        q_lo, q_hi, k_lo, k_hi = bounds
        dev = self._device()
        b = bs.to(dev).view(-1, 1, 1, 1)
        h = hs.to(dev).view(1, -1, 1, 1)
        rows = open_.any(0).any(0)  # (nQ, nK)
        for i in rows.any(1).nonzero().flatten().tolist():
            cols = rows[i].nonzero().flatten()
            widths = (k_hi[cols] - k_lo[cols] + 1)
            keys = torch.cat([torch.arange(int(a), int(z) + 1)
                              for a, z in zip(k_lo[cols], k_hi[cols])])  # (nkeys,)
            q = torch.arange(int(q_lo[i]), int(q_hi[i]) + 1, device=dev).view(1, 1, -1, 1)
            m = self.source.grid(b, h, q, keys.to(dev).view(1, 1, 1, -1))
            m = torch.broadcast_to(m, (b.shape[0], h.shape[1], q.shape[2], keys.numel()))
            # (Bn, Hn, nq, nkeys) -> visible pairs per open tile (Bn, Hn, len(cols))
            seg = torch.repeat_interleave(torch.arange(len(cols)), widths).to(dev)
            hits = torch.zeros(b.shape[0], h.shape[1], len(cols), dtype=torch.long, device=dev)
            hits.index_add_(2, seg, m.sum(2))
            hits = hits.cpu()
            total = (widths * q.shape[2]).view(1, 1, -1)
            sel = open_[:, :, i, cols]
            t[:, :, i, cols] = torch.where(sel, hits > 0, t[:, :, i, cols])
            f[:, :, i, cols] = torch.where(sel, hits < total, f[:, :, i, cols])
