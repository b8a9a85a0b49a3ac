"""A tiny registry of attention backends.

Every backend is one function with the same contract::

    fn(q, k, v, spec, *, dropout_p, scale, return_lse) -> out | (out, lse)

with q ``(B, H, T, D)``, k/v ``(B, Hkv, S, D)`` (``H % Hkv == 0``; the backend handles
grouped-query attention), ``spec`` a :class:`attnkit.masks.MaskSpec`, ``scale`` a float,
``out (B, H, T, D)`` in the input dtype and ``lse (B, H, T)`` in float32 (float64 for float64
inputs), ``-inf`` for rows that saw no key.

A backend may also give a ``check`` with the same arguments (no ``scale``) that returns
``None`` when it can serve the call, or a sentence saying why it cannot. ``attention`` calls it
before running a named backend (a clear error, never a silent fallback) and ``explain`` shows
every backend's answer.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

__all__ = ["Backend", "register_backend", "get_backend", "available_backends"]


@dataclass(frozen=True)
class Backend:
    """A registered attention engine: its name, its function and its capability check."""

    name: str
    fn: Callable
    check: Optional[Callable] = None

    def why_not(self, q, k, v, spec, *, dropout_p: float, return_lse: bool) -> Optional[str]:
        """None if this backend can serve the call, else the reason it cannot."""
        if self.check is None:
            return None
        return self.check(q, k, v, spec, dropout_p=dropout_p, return_lse=return_lse)


_REGISTRY: dict[str, Backend] = {}


def register_backend(name: str, fn: Callable, *, check: Optional[Callable] = None,
                     replace: bool = False) -> Backend:
    """Add a backend under ``name`` (see the module docstring for the contract).

    Raises:
        ValueError: ``name`` is ``"auto"``, empty, or taken (pass ``replace=True``).
        TypeError: ``fn`` or ``check`` is not callable.
    """
    if not isinstance(name, str) or not name or name == "auto":
        raise ValueError(f"backend name must be a non-empty string other than 'auto', got {name!r}")
    if name in _REGISTRY and not replace:
        raise ValueError(f"backend {name!r} is already registered; pass replace=True to override")
    if not callable(fn) or (check is not None and not callable(check)):
        raise TypeError("register_backend needs a callable fn (and check, if given)")
    backend = Backend(name, fn, check)
    _REGISTRY[name] = backend
    return backend


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
