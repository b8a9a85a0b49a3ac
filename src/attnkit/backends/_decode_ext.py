"""Build and load the decode backend's C++ kernel (``_decode_kernel.cpp``).

``make`` runs ``python -m attnkit.backends._decode_ext`` after installing the package: it
compiles the kernel with the machine's C++ compiler through
``torch.utils.cpp_extension.load`` (ninja) into ``_build/`` beside this file (gitignored).
The library itself never compiles: :func:`load` imports a finished build or returns ``None``,
and the decode backend then runs its pure-PyTorch implementation (``decode.implementation()``
says which one runs). The build's name carries a hash of the source, the compiler flags,
torch's version and the CPU's instruction-set flags, so an edited source or another machine
never picks up a stale or foreign library; it is simply rebuilt by the next ``make``.

The source is portable C++ (fixed-width loops for the auto-vectoriser and GCC/Clang vector
extensions, no intrinsics), so ``-march=native`` gives AVX-512 code here and AVX2 or scalar
code elsewhere; ``ATTNKIT_DECODE_MARCH`` builds another target (tests/attnkit/backends/test_decode.py checks
the AVX2 and SSE2 builds on this machine).
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import sys
from pathlib import Path

import torch

__all__ = ["load", "build", "library_path"]

_HERE = Path(__file__).resolve().parent
SOURCE = _HERE / "_decode_kernel.cpp"
BUILD_DIR = Path(os.environ.get("ATTNKIT_BUILD_DIR", _HERE / "_build"))
# ATTNKIT_DECODE_MARCH=haswell (AVX2) or x86-64 (SSE2) builds the code another CPU would run,
# beside the native build (the name's hash differs): the tests then check it on this machine.
MARCH = os.environ.get("ATTNKIT_DECODE_MARCH", "native")
CFLAGS = ["-O3", f"-march={MARCH}", "-fopenmp-simd", "-fno-math-errno", "-ffp-contract=fast"]
_loaded = {}


def _cpu_flags() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return next((line for line in f if line.startswith("flags")), "")
    except OSError:
        return os.uname().machine if hasattr(os, "uname") else ""


def _name() -> str:
    """``attnkit_decode_<hash>``: changes with the source, flags, torch and CPU."""
    h = hashlib.sha1()
    h.update(SOURCE.read_bytes())
    h.update(" ".join(CFLAGS).encode())
    h.update(torch.__version__.encode())
    h.update(sys.version.encode())
    h.update(_cpu_flags().encode())
    return f"attnkit_decode_{h.hexdigest()[:12]}"


def library_path() -> Path:
    """Where this machine's build of the current source lives (it may not exist)."""
    name = _name()
    return BUILD_DIR / name / f"{name}.so"


def load():
    """The compiled module (``decode_scores``, ``decode_softmax_pv``), or ``None`` when no
    build of the current source exists for this machine. Never compiles."""
    if "module" in _loaded:
        return _loaded["module"]
    module = None
    if os.environ.get("ATTNKIT_DECODE_IMPL", "") != "torch" and SOURCE.exists():
        path = library_path()  # (an install without the source has no build either)
        if path.exists():
            try:
                spec = importlib.util.spec_from_file_location(path.stem, path)
                module = importlib.util.module_from_spec(spec)
                spec.loader.exec_module(module)
            except (ImportError, OSError) as e:  # a broken build: fall back, say why
                print(f"attnkit: decode kernel at {path} did not load ({e}); using the "
                      f"pure-PyTorch decode path", file=sys.stderr)
                module = None
    _loaded["module"] = module
    return module


def build(verbose: bool = False):
    """Compile the kernel for this machine (a no-op when the build is current).

    Returns the loaded module. Raises whatever the compiler or ninja raises.
    """
    from torch.utils import cpp_extension

    name = _name()
    out = BUILD_DIR / name
    out.mkdir(parents=True, exist_ok=True)
    module = cpp_extension.load(name=name, sources=[str(SOURCE)], build_directory=str(out),
                                extra_cflags=CFLAGS, verbose=verbose)
    _loaded["module"] = module
    return module


def main() -> int:
    """Build for ``make``; never fails: prints what happened and returns 0."""
    if library_path().exists():
        print(f"decode kernel: up to date ({library_path().parent.name})")
        return 0
    try:
        build()
    except Exception as e:  # noqa: BLE001 - no compiler, no ninja, a compile error: say it
        reason = str(e).strip().splitlines()[-1] if str(e).strip() else type(e).__name__
        print(f"decode kernel: not built ({type(e).__name__}: {reason}); the decode backend "
              f"uses its pure-PyTorch implementation")
        return 0
    print(f"decode kernel: built {library_path()}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
