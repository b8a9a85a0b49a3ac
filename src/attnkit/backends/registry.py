"""A tiny registry of attention backends, each declaring what it can serve and what it costs.

Every backend module exports one :class:`Backend`: a name, a function, an optional check, its
capabilities and a cost rule. The function's contract::

    fn(q, k, v, call, *, dropout_p, scale, return_lse[, return_weights]) -> out | tuple

with q ``(B, H, T, D)``, k/v ``(B, Hkv, S, D)`` (``H % Hkv == 0``; the backend handles
grouped-query attention), ``call`` an :class:`attnkit.spec.Call` (the lowered mask
``call.mask`` or None, ``call.causal_offset`` when it is exactly causal, the resolved score
function ``call.score``, ``call.sinks``, and ``call.summary(block_q, block_k)``, the
:class:`attnkit.summary.BlockSummary` built once per call), ``scale`` a float. It returns
``out (B, H, T, D)`` in the input dtype, then, when asked, the weights ``(B, H, T, S)`` and
the log-sum-exp ``(B, H, T)`` in float32 (float64 for float64 inputs; ``-inf`` for rows that
saw no key), in that order. ``return_weights`` is passed only when it is True.

A backend declares:

* ``capabilities``: a subset of :data:`CAPABILITIES` (default: lse, dropout, grad); a call
  needing one the backend lacks is refused with that reason;
* ``check``: optional, same arguments as ``fn`` without ``scale``; ``None`` when it can
  serve the call, else a sentence saying why it cannot;
* ``cost``: optional ``cost(call) -> float``, the estimated seconds of the call; ``auto``
  runs the cheapest backend that can serve it (one second without a rule);
* ``implementation``: optional ``implementation(q, k, v, call) -> str``, a sentence saying
  how the backend would run the call (a compiled kernel, or a fallback and why), for
  ``explain()``.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Callable, Optional

__all__ = ["Backend", "CAPABILITIES", "as_call", "register", "register_backend", "get_backend",
           "available_backends", "BACKWARD_FACTOR", "costs_changed", "state_key",
           "watch_environment"]

CAPABILITIES = {
    "lse": "return the log-sum-exp",
    "weights": "return the attention weights",
    "dropout": "apply dropout to the attention weights",
    "grad": "compute gradients",
    "score_mod": "apply a score function (softcap, ALiBi, bias)",
    "sinks": "add attention sinks",
}
_DEFAULT_CAPABILITIES = frozenset({"lse", "dropout", "grad"})
BACKWARD_FACTOR = 3.5  # forward + backward over forward, for every backend's cost rule


_CALL_TYPE: list = []  # attnkit.spec.Call, imported on first use (spec imports the backends)


def as_call(q, k, v, call):
    """A :class:`~attnkit.spec.Call` from a call or a bare :class:`~attnkit.masks.MaskSpec`."""
    if not _CALL_TYPE:
        from ..spec import Call

        _CALL_TYPE.append(Call)
    if type(call) is _CALL_TYPE[0]:  # the engine's case: first, and cheap
        return call
    from ..spec import Call, MaskSpec

    if isinstance(call, MaskSpec):
        import torch

        grad = torch.is_grad_enabled() and any(t.requires_grad
                                               for t in (q, k, v, *call.tensors()))
        return Call.of(q, k, call, grad)
    return call


@dataclass(frozen=True)
class Backend:
    """A registered attention engine: name, function, capabilities, check and cost rule."""

    name: str
    fn: Callable
    check: Optional[Callable] = None
    capabilities: frozenset = _DEFAULT_CAPABILITIES
    cost: Optional[Callable] = None
    implementation: Optional[Callable] = None

    def why_not(self, q, k, v, call, *, dropout_p: float, return_lse: bool,
                return_weights: bool = False) -> Optional[str]:
        """None if this backend can serve the call (a ``Call`` or a ``MaskSpec``), else the
        reason it cannot."""
        call = as_call(q, k, v, call)
        needs = []
        if return_lse:
            needs.append("lse")
        if return_weights:
            needs.append("weights")
        if dropout_p > 0:
            needs.append("dropout")
        if call.grad:
            needs.append("grad")
        if call.score is not None:
            needs.append("score_mod")
        if call.sinks is not None:
            needs.append("sinks")
        if self.check is not None:  # first: its own words are more specific
            extra = {"return_weights": True} if return_weights else {}
            why = self.check(q, k, v, call, dropout_p=dropout_p, return_lse=return_lse, **extra)
            if why is not None:
                return why
        for need in needs:
            if need not in self.capabilities:
                return f"{self.name} cannot {CAPABILITIES[need]}"
        return None

    def estimate(self, call) -> float:
        """Estimated seconds for ``call``."""
        # No float(): under torch.compile the cost may be symbolic, and float() would
        # specialise on the lengths (a recompile per decoding step).
        return 1.0 if self.cost is None else self.cost(call)


_REGISTRY: dict[str, Backend] = {}

# What the engine's cache of choices (engine.py) depends on beyond a call itself: the
# registry's contents and any process state a check or cost rule reads.
_GENERATION = [0]
_WATCHED_ENV: list[str] = []
_WATCHED_ENV_BYTES: list[bytes] = []


def costs_changed() -> None:
    """Say that a backend's check or cost may now answer differently for a call it answered
    before (flex after compiling a new shape class): ``auto``'s cached choices are dropped."""
    _GENERATION[0] += 1


def watch_environment(name: str) -> None:
    """Say that a check or cost rule reads the environment variable ``name``: the engine's
    cached choices are keyed by its value."""
    if name not in _WATCHED_ENV:
        _WATCHED_ENV.append(name)
        _WATCHED_ENV_BYTES.append(os.fsencode(name))
        costs_changed()


# os.environ's own mapping of encoded names (POSIX): a lookup there costs a tenth of
# os.environ.get, which encodes the name on every call; it is what os.environ writes to.
_ENV_BYTES = getattr(os.environ, "_data", None) if os.name == "posix" else None


def state_key() -> tuple:
    """The state the cached choices are valid for (registry generation, watched variables)."""
    if not _WATCHED_ENV:
        return (_GENERATION[0],)
    if _ENV_BYTES is not None:
        return (_GENERATION[0], *(_ENV_BYTES.get(name) for name in _WATCHED_ENV_BYTES))
    return (_GENERATION[0], *(os.environ.get(name) for name in _WATCHED_ENV))


def register(backend: Backend, *, replace: bool = False) -> Backend:
    """Add a ready :class:`Backend` under its name (see :func:`register_backend`)."""
    name = backend.name
    if not isinstance(name, str) or not name or name == "auto":
        raise ValueError(f"backend name must be a non-empty string other than 'auto', got {name!r}")
    if name in _REGISTRY and not replace:
        raise ValueError(f"backend {name!r} is already registered; pass replace=True to override")
    if not callable(backend.fn) or any(c is not None and not callable(c)
                                       for c in (backend.check, backend.cost,
                                                 backend.implementation)):
        raise TypeError("a backend needs a callable fn (and check, cost and implementation, if "
                        "given)")
    unknown = sorted(set(backend.capabilities) - set(CAPABILITIES))
    if unknown:
        raise ValueError(f"unknown capabilities {unknown}; choose from {sorted(CAPABILITIES)}")
    _REGISTRY[name] = backend
    costs_changed()
    return backend


def register_backend(name: str, fn: Callable, *, check: Optional[Callable] = None,
                     capabilities=None, cost: Optional[Callable] = None,
                     replace: bool = False) -> Backend:
    """Add a backend under ``name`` (see the module docstring for the contract).

    Raises:
        ValueError: ``name`` is ``"auto"``, empty, or taken (pass ``replace=True``); an
            unknown capability.
        TypeError: ``fn``, ``check`` or ``cost`` is not callable.
    """
    caps = _DEFAULT_CAPABILITIES if capabilities is None else frozenset(capabilities)
    return register(Backend(name, fn, check, caps, cost), replace=replace)


def get_backend(name: str) -> Backend:
    """The backend registered as ``name``.

    Raises:
        ValueError: unknown name (the message lists the known ones).
    """
    try:
        return _REGISTRY[name]
    except (KeyError, TypeError):
        raise ValueError(f"unknown backend {name!r}; choose 'auto' or one of "
                         f"{available_backends()}") from None


def available_backends() -> list[str]:
    """Names of the registered backends, in registration order."""
    return list(_REGISTRY)
