"""The ``flex`` backend: ``torch.nn.attention.flex_attention``, compiled once per process.

FlexAttention takes exactly attnkit's descriptions: a mask description *is* a ``mask_mod``
and a score description a ``score_mod``. What this wrapper adds:

* the :class:`BlockMask` is built from the description's own block summaries
  (:meth:`attnkit.masks.MaskMod.blocks` at 128 x 128, ``BlockMask.from_kv_blocks``), so no
  ``T x S`` tensor is ever evaluated, and it is cached by description and shape;
* ``flex_attention`` is wrapped in ``torch.compile`` once per process (uncompiled it builds
  the whole score matrix) and compiles once per *shape class*: dtype, device, B, heads, head
  dim, the mask and score descriptions, the log-sum-exp flag, the thread count and the
  lengths rounded up to a power of two: q, k and v are padded there and the padding sits in
  empty tiles, so every length of a bucket shares one graph (``dynamic=True`` fails to
  lower or indexes out of bounds for flex on CPU in torch 2.13). Descriptions that read
  tensors shaped by the lengths or user functions compile per exact length. Each compile
  costs 15-30 s on a 2-core CPU; :func:`compile_count` counts them, and the cost rule
  charges one until the class has one;
* torch's recompile limit (8 per code object) is never hit silently: ``check`` refuses a
  new class when its compiles would not fit, and a call that hits the limit anyway (other
  code compiling flex in the process) raises instead of running torch's unfused fallback,
  which materialises the scores. Dynamo's and inductor's warnings are kept out of the
  user's log while flex compiles and runs;
* ``check`` refuses, with the reason, where it cannot run: no FlexAttention in this torch,
  no inductor or C++ compiler (CPU) / Triton (CUDA), and on CPU (torch 2.13) gradients and
  the log-sum-exp, which its compiled CPU kernel does not support, and float64.

Shape letters: ``B`` batch, ``H`` query heads, ``Hkv`` key/value heads, ``T`` queries,
``S`` keys, ``D`` head dim.
"""

from __future__ import annotations

import contextlib
import functools
import importlib.util
import logging
import os
import shutil
import warnings
from collections import OrderedDict

import torch

from ._edges import restore_nan_described
from .registry import BACKWARD_FACTOR, Backend, as_call, costs_changed

BLOCK = 128
FLEX_RATE = 22e9  # FLOP/s of one CPU thread on its 128-granular blocks (bench_masks)
FLEX_COMPILE_S = 30.0  # first compile in a process (measured 26 s on this CPU)
_CACHE_SIZE = 16
_compiled = None
_block_masks: OrderedDict = OrderedDict()
_score_mods: OrderedDict = OrderedDict()
_compiled_keys: set = set()  # shape classes compiled in this process
_compiles = [0]  # graphs dynamo compiled for flex in this process
COMPILES_PER_CLASS = 1
_QUIET = ("torch._dynamo", "torch._inductor", "torch.fx.experimental.symbolic_shapes",
          "torch._functorch", "torch._subclasses", "torch.utils._sympy")


@functools.cache
def _unavailable(device_type: str) -> str | None:
    """Why flex cannot run on this device type here, or None.

    Uses ``find_spec``, not ``import``: importing inductor costs ~2 s, paid only when flex
    actually runs.
    """
    if importlib.util.find_spec("torch.nn.attention.flex_attention") is None:
        return f"torch {torch.__version__} has no torch.nn.attention.flex_attention"
    if importlib.util.find_spec("torch._inductor") is None:  # pragma: no cover
        return "torch.compile's inductor backend is not installed"
    if device_type == "cpu":
        cxx = os.environ.get("CXX") or next(
            (c for c in ("g++", "c++", "clang++") if shutil.which(c)), None)
        if cxx is None or shutil.which(cxx) is None:
            return "no C++ compiler (g++, c++ or clang++) for torch.compile on CPU"
    elif device_type == "cuda":
        if importlib.util.find_spec("triton") is None:
            return "Triton is not installed, and flex on CUDA compiles to Triton"
    else:
        return f"flex attention is not supported on {device_type}"
    return None


def _recompile_limit() -> int:
    cfg = torch._dynamo.config
    return int(getattr(cfg, "recompile_limit", getattr(cfg, "cache_size_limit", 8)))


def _spec_key(call) -> tuple:
    """A hashable key for the call's description; the tensors themselves are kept in the
    cache entry, so their ids cannot be reused while it lives."""
    spec = call.spec
    fns = tuple(id(getattr(m, "fn", None)) for m in _walk(spec.mask_mod) + _walk(spec.score_mod))
    tensors = spec.tensors()
    return ((call.mask.describe() if call.mask else None),
            (call.score.describe() if call.score else None), fns,
            tuple((id(t), t._version) for t in tensors)), tensors


def _walk(mod) -> list:
    if mod is None:
        return []
    parts = getattr(mod, "parts", None)
    inner = getattr(mod, "mod", None)
    if parts:
        return [x for p in parts for x in _walk(p)]
    return _walk(inner) + [mod] if inner is not None else [mod]


def _lru(cache: OrderedDict, key, make):
    if key in cache:
        cache.move_to_end(key)
        return cache[key][0]
    value = make()
    cache[key] = value
    while len(cache) > _CACHE_SIZE:
        cache.popitem(last=False)
    return value[0]


def _bucket(n: int) -> int:
    return max(BLOCK, 1 << (n - 1).bit_length())


def _bucketable(call) -> bool:
    """Whether the description reads no tensor shaped by the lengths and no user function
    (which may index tensors of its own), so that padded positions are safe to evaluate."""
    from ..masks.base import MaskFn
    from ..scores import ScoreFn

    spec = call.spec
    leaves = _walk(spec.mask_mod) + _walk(spec.score_mod)
    return not any(isinstance(m, (MaskFn, ScoreFn)) for m in leaves) and not any(
        n in t.shape for t in spec.tensors() for n in (call.T, call.S))


def _lengths(call) -> tuple[int, int]:
    """``(T, S)`` the graph is compiled for: the next power of two (at least one block) when
    :func:`_bucketable`, so that every length up to it shares one graph; else exact."""
    if _bucketable(call):
        return _bucket(call.T), _bucket(call.S)
    return call.T, call.S


def _block_mask(call, Tb: int, Sb: int, device, bucketed: bool):
    """torch's BlockMask for the call at ``(Tb, Sb)`` >= its lengths: the summary at
    ``BLOCK x BLOCK`` padded with empty tiles; keys past ``S`` hidden by a tensor bound (a
    graph input, so lengths in one bucket share the graph)."""
    from ..summary import EMPTY, FULL, PARTIAL, BlockSummary

    T, S, mod = call.T, call.S, call.mask
    summary = call.summary(BLOCK, BLOCK) if mod is not None else \
        BlockSummary.build(None, T, S, BLOCK, BLOCK)
    if not bucketed:
        return summary.to_block_mask(mod, device)
    nq, nk = summary.kind.shape
    kind = torch.full((-(-Tb // BLOCK), -(-Sb // BLOCK)), EMPTY, dtype=torch.int8)
    kind[:nq, :nk] = summary.kind
    if S % BLOCK:  # the last key tile holds padding: evaluate it
        kind[:nq, nk - 1][kind[:nq, nk - 1] == FULL] = PARTIAL
    bound = torch.tensor(S, device=device)

    def mask_mod(b, h, q_idx, kv_idx):
        inside = kv_idx < bound
        return inside if mod is None else inside & mod(b, h, q_idx, kv_idx)

    return BlockSummary(Tb, Sb, BLOCK, BLOCK, kind).to_block_mask(mask_mod, device)


def _compile_key(call, return_lse: bool = False) -> tuple:
    """The shape class: what a compiled graph is specialised on (lengths only by bucket)."""
    key = _spec_key(call)[0]
    return (call.device.type, call.dtype, call.B, call.H, call.Hkv, call.D, _lengths(call),
            key[0], key[1], key[2], bool(return_lse), torch.get_num_threads())


def compile_count() -> int:
    """How many graphs the flex backend has compiled in this process."""
    return _compiles[0]


@contextlib.contextmanager
def _quiet():
    """Keep dynamo's and inductor's warnings and log lines out of the user's stderr."""
    loggers = [logging.getLogger(name) for name in _QUIET]
    levels = [lg.level for lg in loggers]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for lg in loggers:
            lg.setLevel(logging.CRITICAL)
        try:
            yield
        finally:
            for lg, level in zip(loggers, levels):
                lg.setLevel(level)


def is_compiled(q, k, call) -> bool:
    """Whether a call of this shape and description has already been compiled here."""
    from ..spec import Call, MaskSpec

    if isinstance(call, MaskSpec):
        call = Call.of(q, k, call, grad=False)
    return _compile_key(call) in _compiled_keys


def flex_check(q, k, v, call, *, dropout_p: float, return_lse: bool,
               return_weights: bool = False):
    if torch.compiler.is_compiling():
        return "flex compiles itself and is not run inside another torch.compile region"
    reason = _unavailable(q.device.type)
    if reason:
        return reason
    if dropout_p > 0:
        return "flex attention has no dropout on the attention weights"
    if return_weights:
        return "flex attention never builds the T x S weights it would have to return"
    if q.device.type == "cpu":
        if call.grad:
            return (f"FlexAttention has no backward on CPU in torch {torch.__version__} "
                    f"(inference only); call it under torch.no_grad() or use chunked")
        if return_lse:
            return (f"compiled FlexAttention on CPU does not return the log-sum-exp in torch "
                    f"{torch.__version__}")
        if q.dtype == torch.float64:
            return "FlexAttention's CPU kernel runs float32, bfloat16 and float16, not float64"
    # (Only once something compiled: reading the limit imports dynamo, ~2 s.)
    if _compiled_keys and _compile_key(call, return_lse) not in _compiled_keys \
            and _compiles[0] + COMPILES_PER_CLASS > _recompile_limit():
        return (f"flex has compiled {_compiles[0]} graphs in this process and torch.compile's "
                f"recompile limit is {_recompile_limit()}: a new shape class (dtype, head "
                f"dims, mask or score description, threads) would run FlexAttention "
                f"uncompiled, materialising the scores; use chunked")
    return None


def flex_cost(call) -> float:
    """Estimated seconds: the visited 128 x 128 blocks at flex's rate, plus the compile until
    this shape and description have been compiled in this process."""
    passes = BACKWARD_FACTOR if call.grad else 1.0
    frac, _ = call.visited(BLOCK, BLOCK)
    run = frac * call.flops() * passes / FLEX_RATE + 2e-4
    return run if _compile_key(call) in _compiled_keys else run + FLEX_COMPILE_S


def flex_attention(q, k, v, call, *, dropout_p: float = 0.0, scale: float,
                   return_lse: bool = False, return_weights: bool = False):
    """Attention through compiled FlexAttention; contract in :mod:`.registry`.

    Raises:
        ValueError: the call is one ``flex_check`` refuses (the message says why).
    """
    call = as_call(q, k, v, call)  # a bare MaskSpec works too
    global _compiled
    reason = flex_check(q, k, v, call, dropout_p=dropout_p, return_lse=return_lse,
                        return_weights=return_weights)
    if reason:
        raise ValueError(reason)
    from torch.nn.attention.flex_attention import flex_attention as _flex

    if _compiled is None:
        with _quiet():
            _compiled = torch.compile(_flex, dynamic=False)
    H, T, S = q.shape[1], q.shape[2], k.shape[2]
    Tb, Sb = _lengths(call)
    key, tensors = _spec_key(call)
    mod = call.mask
    block_mask = None
    bucketed = _bucketable(call)
    if mod is not None or bucketed:
        block_mask = _lru(_block_masks, key + (T, S, q.device),
                          lambda: (_block_mask(call, Tb, Sb, q.device, bucketed), tensors))
    score = None
    if call.score is not None:
        score = _lru(_score_mods, key + (T, S), lambda: (call.score, tensors))
    qp, kp, vp = q, k, v
    if (Tb, Sb) != (T, S):  # one graph per bucket: padded rows and keys sit in empty tiles
        qp = torch.nn.functional.pad(q, (0, 0, 0, Tb - T))
        kp, vp = (torch.nn.functional.pad(t, (0, 0, 0, Sb - S)) for t in (k, v))
    with _quiet():  # importing dynamo warns too
        from torch._dynamo.utils import counters
    before = counters["stats"]["unique_graphs"]
    try:
        with _quiet(), torch._dynamo.config.patch(fail_on_recompile_limit_hit=True):
            result = _compiled(qp, kp, vp, score_mod=score, block_mask=block_mask, scale=scale,
                               enable_gqa=k.shape[1] != H, return_lse=return_lse)
    except Exception as err:
        if "RecompileLimit" not in type(err).__name__ and "CacheLimit" not in type(err).__name__:
            raise
        raise RuntimeError(f"flex: torch.compile's recompile limit ({_recompile_limit()}) for "
                           f"flex_attention is reached in this process (flex compiled "
                           f"{_compiles[0]} of them); rather than run FlexAttention uncompiled "
                           f"(dense scores) this call is refused: use backend='chunked' or "
                           f"attnkit.flex_attention") from err
    finally:
        compiled = counters["stats"]["unique_graphs"] - before
        _compiles[0] += compiled
        if compiled:
            costs_changed()  # flex's check and cost may now answer otherwise (engine.py)
    new_key = _compile_key(call, return_lse)
    if new_key not in _compiled_keys:
        _compiled_keys.add(new_key)
        costs_changed()
    if (Tb, Sb) != (T, S):
        result = tuple(t[:, :, :T] for t in result) if return_lse else result[:, :, :T]
    out, lse = result if return_lse else (result, None)
    # Compiled flex on CPU loses NaN scores (_edges): every row that sees one is set here.
    if lse is None:
        out = restore_nan_described(out, q, k, v, mod)
    else:
        out, lse = restore_nan_described(out, q, k, v, mod, lse)
    return (out, lse.float() if lse.dtype != torch.float64 else lse) if return_lse else out


BACKEND = Backend("flex", flex_attention, flex_check,
                  frozenset({"lse", "grad", "score_mod"}), flex_cost)
