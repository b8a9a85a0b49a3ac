"""The decode backend's C++ kernel (``_decode_kernel.cpp``), built and loaded by
:mod:`attnkit.backends._ext` like the attention kernel.

The kernel is written on torch's ``at::vec::Vectorized`` types, which are only SIMD code when
``CPU_CAPABILITY`` names the target, so each build gets torch's defines for its target's level
(``_ext.Kernel.vec``): ``avx512bf16`` / ``avx512`` (``-mavx512f -mavx512bw -mavx512vl
-mavx512dq -mfma -mf16c``), ``avx2`` (``-mavx2 -mfma -mf16c``: bfloat16 widened by a shift,
half by F16C) and ``default`` (SSE2 on x86-64, the baseline elsewhere). Never
``-march=native``.

The target is the best one this CPU runs within ``ATEN_CPU_CAPABILITY`` (as torch picks its
own kernels); ``ATTNKIT_DECODE_TARGET`` (or ``ATTNKIT_KERNEL_TARGET``) names one. ``make``
builds it into ``src/attnkit/backends/_build``; installed with pip, the first decode step
that needs it compiles it once into ``~/.cache/attnkit/kernels`` with a one-line notice
(``ATTNKIT_KERNEL_BUILD=0`` forbids that). ``ATTNKIT_DECODE_IMPL=torch`` keeps the
pure-PyTorch implementation; :func:`implementation` says which runs and why.
"""

from __future__ import annotations

import os
import platform
from pathlib import Path

from . import _ext

__all__ = ["load", "library_path", "implementation", "target"]

KERNEL = _ext.DECODE


def _x86() -> bool:
    return platform.machine().lower() in ("x86_64", "amd64", "i686", "i386")


def target() -> str:
    """The target this process loads (``default`` when none can run).

    Raises:
        ValueError: an ``ATTNKIT_DECODE_TARGET`` that is not a target, or that this CPU
            cannot run.
    """
    chosen, why = _ext.choose_target(KERNEL)
    if chosen is None:
        raise ValueError(why)
    return chosen.name


def library_path(which: str | None = None, root: Path | None = None) -> Path:
    """Where the build of the current source for ``which`` (default :func:`target`) lives
    under ``root`` (default: the development build directory); it may not exist."""
    return _ext.library_path(KERNEL, _ext.TARGETS[which or target()], root)


def load():
    """The compiled module (``decode_fused``, ``decode_scores``, ``decode_softmax_pv``,
    ``capability``, ``lanes``), or None: ``ATTNKIT_DECODE_IMPL=torch``, or it could not be
    found, built or loaded (:func:`implementation` says which). Built on first use when
    missing (once, with a notice)."""
    if os.environ.get("ATTNKIT_DECODE_IMPL", "") == "torch":
        return None
    return _ext.load(KERNEL)


def implementation() -> str:
    """Which decode implementation runs on CPU tensors, and why, in one line (never
    compiles: a kernel still to be built says so)."""
    if os.environ.get("ATTNKIT_DECODE_IMPL", "") == "torch":
        return "pure PyTorch (ATTNKIT_DECODE_IMPL=torch)"
    st = _ext.status(KERNEL)
    if st.state == "pending":
        return st.reason
    module = load()
    st = _ext.status(KERNEL)
    if module is None:
        return st.reason.replace("pure-PyTorch implementation", "pure PyTorch", 1)
    cap = os.environ.get("ATEN_CPU_CAPABILITY")
    return (f"C++ kernel, {st.target} build ({module.lanes()} float lanes"
            f"{f'; ATEN_CPU_CAPABILITY={cap}' if cap else ''})")
