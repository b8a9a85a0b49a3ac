"""Algebra on descriptions that keeps them small: AND with windows merged, the causal bound on
the keys a description can ever show, and whether a description depends on ``i - j`` only.

Part of :mod:`attnkit.masks` (import from there). Used by the transformers mask reader (a
``sliding_window_overlay`` AND ``causal_mask_function`` becomes one window) and usable by the
engine's lowering (a merged window wider than ``S`` is plain causal). Shape letters as in
:mod:`attnkit.masks`.
"""

from __future__ import annotations

from .base import And, MaskMod, Or
from .structural import Causal, Window

__all__ = ["merge_and", "visible_key_bound", "depends_on_difference_only"]


def _windows_and_rest(parts):
    flat = []
    for p in parts:
        if p is None:
            continue
        flat.extend(p.parts if isinstance(p, And) else (p,))
    windows = [p for p in flat if isinstance(p, Window)]  # Causal is a Window
    return windows, [p for p in flat if not isinstance(p, Window)]


def merge_and(*mods) -> MaskMod | None:
    """AND of descriptions (``None`` = every key), simplified.

    Nested ``And`` are flattened, ``None`` parts dropped, and windows resolved at one
    offset merged into one (the narrower bound on each side): ``Window(left=3) & Causal()``
    becomes ``Window(left=3, right=0)``, ``Causal() & Causal()`` stays ``Causal()``. Windows at
    different offsets are kept apart.

    Returns:
        ``None`` when nothing is left, the single part, or an ``And`` (windows first).
    """
    windows, others = _windows_and_rest(mods)
    if windows and len({w.offset for w in windows}) == 1 and \
            len({w.align for w in windows}) == 1:
        lefts = [w.left for w in windows if w.left is not None]
        rights = [w.right for w in windows if w.right is not None]
        left = min(lefts) if lefts else None
        right = min(rights) if rights else None
        first = windows[0]
        if left is None and right == 0:
            windows = [Causal(align=first.align, offset=first.offset)]
        else:
            windows = [Window(left=left, right=right, align=first.align, offset=first.offset)]
    flat = windows + others
    if not flat:
        return None
    return flat[0] if len(flat) == 1 else And(tuple(flat))


def visible_key_bound(mod: MaskMod | None, T: int) -> int | None:
    """How many leading keys can be visible at all to ``T`` queries (from a causal or
    right-bounded window with a resolved int offset, through ``And``), ``None`` if unbounded.

    A decode step of ``T`` queries at offset ``o`` sees at most keys ``0 .. T - 1 + o``: the
    bound is ``T + o``, so a static cache's unfilled tail can be sliced off before the call.
    """
    if isinstance(mod, Window):
        if mod.right is None or not isinstance(mod.offset, int):
            return None
        return max(0, T - 1 + mod.offset + mod.right + 1)
    if isinstance(mod, And):
        bounds = [b for b in (visible_key_bound(p, T) for p in mod.parts) if b is not None]
        return min(bounds) if bounds else None
    if isinstance(mod, Or):
        bounds = [visible_key_bound(p, T) for p in mod.parts]
        return None if any(b is None for b in bounds) else max(bounds)
    return None


def depends_on_difference_only(mod: MaskMod | None) -> bool:
    """Visibility depends only on ``i - j`` (windows, causal, and ANDs/ORs of them), so the
    description is the same at remapped positions that step by 1 (inside a packed
    document). ``None`` (every key) counts."""
    if mod is None or isinstance(mod, Window):
        return True
    if isinstance(mod, (And, Or)):
        return all(depends_on_difference_only(p) for p in mod.parts)
    return False
