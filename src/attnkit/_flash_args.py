"""Argument translation shared by :mod:`attnkit.flash_attn`'s functions: flash-attn's
window, softcap, ALiBi and return conventions as attnkit's, with flash-attn's rules."""

from __future__ import annotations

import math

import torch
from torch import Tensor


class FlashAttnArgumentError(ValueError, RuntimeError):
    """A bad argument. flash-attn's C++ checks raise ``RuntimeError``; attnkit's rule is
    ``ValueError``: this is both, so code catching either keeps working."""


# --- argument translation -------------------------------------------------------------------

def int_arg(name: str, value) -> int:
    if isinstance(value, Tensor) and value.numel() == 1 and not value.is_floating_point():
        value = int(value)  # flash-attn's tests pass torch.randint(...) elements
    if isinstance(value, bool) or not isinstance(value, int):
        raise FlashAttnArgumentError(f"{name} must be an int, got {type(value).__name__} "
                                     f"{value!r}")
    return value


def window_sides(window_size, causal: bool, seqlen_k: int) -> tuple[int | None, int | None]:
    """flash-attn's ``(left, right)`` as attnkit's sides (None = unbounded), with flash-attn's
    rules: a negative side, or one ``>= seqlen_k``, is unbounded; ``causal`` makes the right
    side 0; a bounded left side with an unbounded right one bounds it at ``seqlen_k`` (which
    hides keys only from queries more than ``seqlen_k`` positions before the first key)."""
    if not isinstance(window_size, (tuple, list, Tensor)) or len(window_size) != 2:
        raise FlashAttnArgumentError(f"window_size must be a (left, right) pair (-1 = "
                                     f"unbounded), got {window_size!r}")
    left, right = (int_arg("window_size", side) for side in window_size)
    left = None if left < 0 or left >= seqlen_k else left
    right = 0 if causal else None if right < 0 or right >= seqlen_k else right
    if left is not None and right is None:
        right = seqlen_k
    return left, right


def engine_window(left, right):
    """attnkit's ``window=`` for the sides (None when neither binds)."""
    if left is None and right is None:
        return None
    return (-1 if left is None else left, -1 if right is None else right)


def softcap_arg(softcap) -> float | None:
    if isinstance(softcap, bool) or not isinstance(softcap, (int, float)) \
            or not math.isfinite(softcap):
        raise FlashAttnArgumentError(f"softcap must be a finite float (0.0 = off), got "
                                     f"{softcap!r}")
    return float(softcap) if softcap > 0 else None


def check_options(dropout_p, return_attn_probs, deterministic) -> None:
    if return_attn_probs and dropout_p > 0:
        raise FlashAttnArgumentError(
            "return_attn_probs=True with dropout_p > 0 asks for flash-attn's S_dmask (the "
            "probabilities with the dropout pattern in their sign bits), which attnkit does not "
            "produce; pass return_attn_probs=False, or call attnkit.attention(..., "
            "return_weights=True) for the attention weights")
    if not isinstance(deterministic, bool):
        raise FlashAttnArgumentError(f"deterministic must be a bool, got {deterministic!r}")


def check_alibi(alibi_slopes, B: int, H: int) -> None:
    if alibi_slopes is None:
        return
    if not isinstance(alibi_slopes, Tensor) or not alibi_slopes.is_floating_point():
        raise FlashAttnArgumentError(f"alibi_slopes must be a float tensor (nheads,) or "
                                     f"(batch_size, nheads), got {alibi_slopes!r}")
    if tuple(alibi_slopes.shape) not in ((H,), (B, H)):
        raise FlashAttnArgumentError(f"alibi_slopes must have shape (nheads,) = ({H},) or "
                                     f"(batch_size, nheads) = ({B}, {H}), got "
                                     f"{tuple(alibi_slopes.shape)}")


def check_4d(**tensors) -> None:
    for name, t in tensors.items():
        if not isinstance(t, Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != 4:
            raise FlashAttnArgumentError(f"{name} must be (batch_size, seqlen, nheads, "
                                         f"headdim), got shape {tuple(t.shape)}")


def flash_lse(lse: Tensor) -> Tensor:
    """flash-attn marks rows that saw no key with ``+inf`` (attnkit: ``-inf``)."""
    return lse.masked_fill(torch.isneginf(lse), float("inf"))


def returns(out: Tensor, lse: Tensor | None, return_attn_probs: bool):
    if not return_attn_probs:
        return out
    # flash-attn returns an empty S_dmask unless dropout_p > 0 (refused above).
    return out, flash_lse(lse), torch.empty(0, dtype=out.dtype, device=out.device)


def shape_of(t) -> str:
    return f"shape {tuple(t.shape)}" if isinstance(t, Tensor) else type(t).__name__
