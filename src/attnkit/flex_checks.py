"""torch's rules for ``flex_attention``'s arguments and outputs, with torch's texts.

:func:`attnkit.flex_attention` checks its arguments here in torch's order and raises torch's
errors with torch's messages (torch's own tests match them), so code written against torch
sees the same failures; and it shapes its outputs as torch does: the output in the query's
memory layout, ``max_scores`` for ``AuxRequest(max_scores=True)``, the ``return_lse``
deprecation once per process.

Shape letters: ``B`` batch, ``H`` query heads, ``T`` queries, ``S`` keys, ``D`` head dim,
``Dv`` value head dim.
"""

from __future__ import annotations

import warnings

import torch
from torch import Tensor

from .block_mask import is_block_mask

__all__ = ["aux_wanted", "check_batch", "check_inputs", "check_kernel_options",
           "in_query_layout", "max_scores"]

_warned: set = set()


def check_inputs(query, key, value, enable_gqa: bool) -> None:
    """torch's input checks, in torch's order, with torch's texts.

    Raises:
        TypeError: a non-tensor.
        NotImplementedError: nested tensors, or tensors that are not 4-D.
        ValueError: mismatched devices, fewer than 2 dims, different q/k head dims, heads
            that differ without ``enable_gqa`` or do not divide with it.
    """
    for name, t in (("query", query), ("key", key), ("value", value)):
        if not isinstance(t, Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if query.is_nested or key.is_nested or value.is_nested:
        raise NotImplementedError(
            "flex_attention does not support NestedTensor inputs, including "
            "torch.compile(flex_attention) with jagged NestedTensor inputs. "
            "Convert inputs to dense tensors before calling flex_attention.")
    if query.device != key.device or query.device != value.device:
        raise ValueError(
            f"Expected query, key, and value to have the same device type, "
            f"but got query.device: {query.device}, key.device: {key.device}, "
            f"and value.device: {value.device} instead.")
    if query.dim() < 2 or key.dim() < 2 or value.dim() < 2:
        raise ValueError(
            f"Expected query, key, and value to all be  at least 2 dimensional, but got "
            f"query.dim: {query.dim()}, key.dim: {key.dim()} and value.dim: {value.dim()} "
            f"instead.")
    if query.size(-1) != key.size(-1):
        raise ValueError(
            f"Expect query and key/value to have the same embedding dimension "
            f"but got E={query.size(-1)} and E={key.size(-1)}.")
    if query.dim() != 4 or key.dim() != 4 or value.dim() != 4:
        raise NotImplementedError("NYI: query, key, and value must be 4D tensors")
    if not enable_gqa and query.size(-3) != key.size(-3):
        raise ValueError(
            f"Expect query and key/value to have the same number of heads "
            f"but got Hq={query.size(-3)} and Hkv={key.size(-3)}. "
            f"Try setting enable_gqa=True for GQA.")
    if enable_gqa and query.size(1) % key.size(1) != 0:
        raise ValueError(
            f"Expect number of query heads to be a multiple of kv heads for GQA "
            f"but got Hq={query.size(1)} and Hkv={key.size(1)}.")


def check_batch(query, key, value, block_mask) -> None:
    """torch's rule for a key/value batch that differs from the query's: only with a block
    mask of the query's batch, and only a batch of 1 (broadcast).

    Raises:
        ValueError: key and value batches differ, or a differing batch without a block
            mask of the query's batch (torch's texts).
        RuntimeError: a key/value batch that is neither the query's nor 1 (torch's text).
    """
    Bq, Bkv = query.size(0), key.size(0)
    if value.size(0) != Bkv:
        raise ValueError(f"key and value must have the same batch size, got key {Bkv} and "
                         f"value {value.size(0)}")
    if Bq == Bkv:
        return
    if block_mask is None:
        raise ValueError(
            f"Expect query and key/value to have the same batch size, "
            f"or non-none block_mask, "
            f"but got block_mask=None, Bq={Bq}, and Bkv={Bkv}.")
    if is_block_mask(block_mask) and block_mask.kv_num_blocks.size(0) != Bq:
        raise ValueError(
            f"Expect query and key/value to have the same batch size, "
            f"or block_mask and query to have the same batch size, "
            f"but got Bq={Bq}, Bkv={Bkv}, B_block_mask={block_mask.kv_num_blocks.size(0)}.")
    if Bkv != 1:
        raise RuntimeError(f"Bq and Bkv must broadcast. Got Bq={Bq} and Bkv={Bkv}")


def check_kernel_options(kernel_options) -> None:
    """The options torch itself refuses before any kernel runs (the rest are ignored).

    Raises:
        RuntimeError: ``BACKEND`` with the legacy ``FORCE_USE_FLEX_ATTENTION``.
        ValueError: an unknown ``BACKEND``.
    """
    if not kernel_options:
        return
    if "BACKEND" in kernel_options and kernel_options.get("FORCE_USE_FLEX_ATTENTION", False):
        raise RuntimeError(
            "BACKEND cannot be combined with legacy FORCE_USE_FLEX_ATTENTION. "
            "BACKEND supersedes the legacy knob; please drop FORCE_USE_FLEX_ATTENTION "
            "and only specify the desired BACKEND.")
    valid = ("AUTO", "TRITON", "FLASH", "TRITON_DECODE")
    if "BACKEND" in kernel_options and kernel_options["BACKEND"] not in valid:
        raise ValueError(f"Invalid BACKEND value '{kernel_options['BACKEND']}'. "
                         f"Must be one of {valid}")


def aux_wanted(return_lse: bool, return_aux) -> tuple[bool, bool]:
    """``(lse, max_scores)`` to compute, with torch's rules for the two spellings (and its
    FutureWarning for ``return_lse``, once per process).

    Raises:
        ValueError: both ``return_lse`` and ``return_aux``.
    """
    if return_lse and return_aux is not None:
        raise ValueError(
            "Cannot specify both return_lse and return_aux. "
            "return_lse is deprecated, please use return_aux=AuxRequest(lse=True) instead.")
    if return_lse and "return_lse" not in _warned:
        _warned.add("return_lse")
        if not torch.compiler.is_compiling():
            warnings.warn("return_lse is deprecated and will be removed in v2.10. "
                          "Please use return_aux=AuxRequest(lse=True) instead.",
                          FutureWarning, stacklevel=3)
    if return_aux is None:
        return bool(return_lse), False
    return bool(return_aux.lse), bool(return_aux.max_scores)


def max_scores(query, key, mask, score, scale: float) -> Tensor:
    """``(B, H, T)``: the largest score (after ``score_mod``, natural units) each query row
    sees, ``-inf`` where it sees none (torch's ``AuxOutput.max_scores``); 256 rows at a
    time, float32 (float64 for float64 queries), no gradient, as in torch."""
    B, H, T, _ = query.shape
    S, G = key.shape[2], query.shape[1] // key.shape[1]
    work = torch.float64 if query.dtype == torch.float64 else torch.float32
    with torch.no_grad():
        k = key.repeat_interleave(G, dim=1).to(work)  # (B, H, S, D)
        rows = []
        for q0 in range(0, T, 256):
            q1 = min(q0 + 256, T)
            s = query[:, :, q0:q1].to(work) @ k.transpose(-1, -2) * scale  # (B, H, nq, S)
            if score is not None:
                s = score.resolve(T, S).tile(s, q0, q1, 0, S)
            if mask is not None:
                s = s.masked_fill(~mask.tile(B, H, q0, q1, 0, S, query.device), float("-inf"))
            rows.append(s.amax(-1))
    return torch.cat(rows, -1)  # (B, H, T)


def in_query_layout(out: Tensor, query: Tensor) -> Tensor:
    """``out`` laid out in memory as ``query`` is (torch's rule, ``_permute_strides``: dims
    filled in the order of the query's strides, ties innermost by index, the head dim
    innermost); a copy only when the strides differ."""
    fill: list[int] = []  # innermost first; an insertion sort (no sort key: symbolic strides)
    for d in range(4):
        i = 0
        while i < len(fill) and not query.stride(d) < query.stride(fill[i]):
            i += 1
        fill.insert(i, d)
    if fill[0] != 3:  # the head dim is always innermost
        fill.remove(3)
        fill.insert(0, 3)
    strides, step = [0, 0, 0, 0], 1
    for d in fill:
        strides[d] = step
        step *= out.size(d)
    if all(out.stride(d) == strides[d] for d in range(4) if out.size(d) > 1):
        return out  # the same layout (a size-1 dim's stride places nothing)
    return out.new_empty_strided(out.shape, strides).copy_(out)  # (B, H, T, Dv)
