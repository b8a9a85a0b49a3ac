"""Build and load the decode backend's C++ kernel (``_decode_kernel.cpp``), one build per CPU
target.

The kernel is written on torch's ``at::vec::Vectorized`` types, which are only SIMD code when
``CPU_CAPABILITY`` names the target (an extension gets the scalar fallback otherwise). So the
one source is compiled per target, each a separate module whose name carries the target:

* ``avx512``: ``-mavx512f -mavx512bw -mavx512vl -mavx512dq -mfma -mf16c``;
* ``avx2``: ``-mavx2 -mfma -mf16c`` (bfloat16 widened by a shift, half by F16C);
* ``default``: no instruction-set flags (SSE2 on x86-64, the baseline elsewhere).

Never ``-march=native``: a build runs on every CPU of its target. :func:`target` picks the
build this process loads the way torch picks its own kernels: from
``torch.backends.cpu.get_cpu_capability()``, which honours ``ATEN_CPU_CAPABILITY``
(``default``, ``avx2``, ``avx512``); ``ATTNKIT_DECODE_TARGET`` overrides it for attnkit alone
(``ATTNKIT_DECODE_MARCH=haswell`` / ``x86-64``, the older spelling, still means ``avx2`` /
``default``).

``make`` runs ``python -m attnkit.backends._decode_ext`` after installing the package: it
compiles this machine's target through ``torch.utils.cpp_extension.load`` (ninja) into
``_build/`` beside this file (gitignored). The library itself never compiles: :func:`load`
imports a finished build or returns ``None``, and the decode backend then runs its
pure-PyTorch implementation; :func:`implementation` says which runs and why. A build's name
carries a hash of the source, the flags, torch's and Python's versions, so an edited source
is never loaded stale: it is rebuilt by the next ``make``.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import platform
import sys
from pathlib import Path

import torch

__all__ = ["load", "build", "library_path", "implementation", "target", "TARGETS"]

_HERE = Path(__file__).resolve().parent
SOURCE = _HERE / "_decode_kernel.cpp"
BUILD_DIR = Path(os.environ.get("ATTNKIT_BUILD_DIR", _HERE / "_build"))
_COMMON = ["-O3", "-fno-math-errno", "-ffp-contract=fast"]
#: Compiler flags per target (added to _COMMON).
TARGETS = {
    "avx512": ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mfma", "-mf16c",
               "-DCPU_CAPABILITY=AVX512", "-DCPU_CAPABILITY_AVX512"],
    "avx2": ["-mavx2", "-mfma", "-mf16c", "-DCPU_CAPABILITY=AVX2", "-DCPU_CAPABILITY_AVX2"],
    "default": ["-DCPU_CAPABILITY=DEFAULT", "-DCPU_CAPABILITY_DEFAULT"],
}
_MARCH = {"haswell": "avx2", "x86-64": "default", "native": None}  # ATTNKIT_DECODE_MARCH
_loaded: dict = {}


def _x86() -> bool:
    return platform.machine().lower() in ("x86_64", "amd64", "i686", "i386")


def target() -> str:
    """The build this process loads: ``ATTNKIT_DECODE_TARGET`` (or the older
    ``ATTNKIT_DECODE_MARCH``) when set, else torch's CPU capability (``ATEN_CPU_CAPABILITY``
    honoured); ``default`` off x86.

    Raises:
        ValueError: an unknown ``ATTNKIT_DECODE_TARGET`` / ``ATTNKIT_DECODE_MARCH``.
    """
    forced = os.environ.get("ATTNKIT_DECODE_TARGET", "")
    march = os.environ.get("ATTNKIT_DECODE_MARCH", "")
    if not forced and march:
        if march not in _MARCH:
            raise ValueError(f"ATTNKIT_DECODE_MARCH must be one of {sorted(_MARCH)}, got "
                             f"{march!r} (or set ATTNKIT_DECODE_TARGET to one of "
                             f"{sorted(TARGETS)})")
        forced = _MARCH[march] or ""
    if forced:
        if forced not in TARGETS:
            raise ValueError(f"ATTNKIT_DECODE_TARGET must be one of {sorted(TARGETS)}, got "
                             f"{forced!r}")
        return forced
    if not _x86():
        return "default"
    capability = torch.backends.cpu.get_cpu_capability().lower()
    return capability if capability in ("avx512", "avx2") else "default"


def _name(which: str) -> str:
    """``attnkit_decode_<target>_<hash>``: changes with the source, flags, torch, Python."""
    h = hashlib.sha1()
    h.update(SOURCE.read_bytes())
    h.update(" ".join(_COMMON + TARGETS[which]).encode())
    h.update(torch.__version__.encode())
    h.update(sys.version.encode())
    return f"attnkit_decode_{which}_{h.hexdigest()[:12]}"


def library_path(which: str | None = None) -> Path:
    """Where the build of the current source for ``which`` (default :func:`target`) lives;
    it may not exist."""
    name = _name(which or target())
    return BUILD_DIR / name / f"{name}.so"


def load():
    """The compiled module for :func:`target` (``decode_fused``, ``decode_scores``,
    ``decode_softmax_pv``, ``capability``), or ``None`` when it is not built, does not load,
    or ``ATTNKIT_DECODE_IMPL=torch``. Never compiles."""
    which = target()
    if which in _loaded:
        return _loaded[which][0]
    module, why = None, None
    path = library_path(which) if SOURCE.exists() else None
    if os.environ.get("ATTNKIT_DECODE_IMPL", "") == "torch":
        why = "ATTNKIT_DECODE_IMPL=torch"
    elif path is None or not path.exists():
        why = (f"no {which} build of the decode kernel (make builds it, or "
               f"python -m attnkit.backends._decode_ext)")
    else:
        try:
            spec = importlib.util.spec_from_file_location(path.stem, path)
            module = importlib.util.module_from_spec(spec)
            spec.loader.exec_module(module)
            if module.capability() != which:
                raise ImportError(f"it was built for {module.capability()}, not {which}")
        except (ImportError, OSError) as e:  # a broken build: fall back, say why
            why = f"the {which} build at {path} did not load ({e})"
            print(f"attnkit: {why}; using the pure-PyTorch decode path", file=sys.stderr)
            module = None
    _loaded[which] = (module, why)
    return module


def implementation() -> str:
    """Which decode implementation runs on CPU tensors, and why, in one line."""
    module = load()
    if module is None:
        return f"pure PyTorch ({_loaded[target()][1]})"
    return (f"C++ kernel, {target()} build ({module.lanes()} float lanes; "
            f"{_why_target()})")


def _why_target() -> str:
    if os.environ.get("ATTNKIT_DECODE_TARGET") or os.environ.get("ATTNKIT_DECODE_MARCH"):
        return "forced by ATTNKIT_DECODE_TARGET"
    if not _x86():
        return "not an x86 CPU"
    env = os.environ.get("ATEN_CPU_CAPABILITY")
    cap = torch.backends.cpu.get_cpu_capability()
    return f"torch reports CPU capability {cap}" + (f", ATEN_CPU_CAPABILITY={env}" if env else "")


def build(verbose: bool = False, which: str | None = None):
    """Compile the kernel for ``which`` (default :func:`target`); a no-op when current.

    Returns the loaded module. Raises whatever the compiler or ninja raises.
    """
    from torch.utils import cpp_extension

    which = which or target()
    name = _name(which)
    out = BUILD_DIR / name
    out.mkdir(parents=True, exist_ok=True)
    module = cpp_extension.load(name=name, sources=[str(SOURCE)], build_directory=str(out),
                                extra_cflags=_COMMON + TARGETS[which], verbose=verbose)
    if which == target():
        _loaded[which] = (module, None)
    return module


def main(argv=None) -> int:
    """Build for ``make`` (this machine's target, or ``--target NAME`` / ``--all``); never
    fails: prints what happened and returns 0."""
    import argparse

    parser = argparse.ArgumentParser(description="build the decode kernel")
    parser.add_argument("--target", choices=sorted(TARGETS), help="default: this machine's")
    parser.add_argument("--all", action="store_true", help="every target this CPU can run")
    args = parser.parse_args(argv)
    wanted = [args.target or target()]
    if args.all:
        wanted = ["default", "avx2", "avx512"][: ["default", "avx2", "avx512"].index(target()) + 1]
    for which in wanted:
        if library_path(which).exists():
            print(f"decode kernel: up to date ({library_path(which).parent.name})")
            continue
        try:
            build(which=which)
        except Exception as e:  # noqa: BLE001 - no compiler, no ninja, a compile error: say it
            reason = str(e).strip().splitlines()[-1] if str(e).strip() else type(e).__name__
            print(f"decode kernel: {which} not built ({type(e).__name__}: {reason}); the "
                  f"decode backend uses its pure-PyTorch implementation")
            continue
        print(f"decode kernel: built {library_path(which)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
