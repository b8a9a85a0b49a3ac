"""Build and load attnkit's C++ kernels for the CPU at hand: once, for ``make`` and ``pip``
users alike, never ``-march=native``.

A :class:`Kernel` is a name and its sources (shipped as package data beside this file). It
is compiled per *target*, an instruction-set level with explicit flags (``avx512bf16``,
``avx512``, ``avx2``, ``default`` = the x86-64 baseline, SSE2), each into its own library
named ``attnkit_<kernel>_<target>_<hash>`` (the hash covers the sources, the flags, torch's
and Python's versions), so an edited source or another torch never loads a stale build.

:func:`load` picks the best target this CPU runs (capped by ``ATEN_CPU_CAPABILITY=default|
avx2|avx512``, as torch's own kernels are; ``ATTNKIT_KERNEL_TARGET`` names one) and looks
for its library in the development build directory (``make`` writes there:
``src/attnkit/backends/_build`` or ``ATTNKIT_BUILD_DIR``) and in the user cache
(``ATTNKIT_CACHE_DIR``, default ``~/.cache/attnkit/kernels``). Missing, it is built into the
cache on first use with a one-line notice on stderr (a minute or so, once per machine, torch
and source); ``ATTNKIT_KERNEL_BUILD=0`` forbids that and ``ATTNKIT_KERNEL_IMPL=torch``
disables the kernel. Whatever happens is recorded in a :class:`Status` that ``explain()``
reports: a fallback to pure PyTorch is never silent.

The build calls the C++ compiler directly (``$CXX``, else ``c++``): no ninja needed, the
sources compiled in parallel into a temporary directory, the library moved into place
atomically, a lock file keeping two processes from building the same library at once.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import shutil
import subprocess
import sys
import sysconfig
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import torch

__all__ = ["Kernel", "Target", "TARGETS", "ATTN", "DECODE", "Status", "load", "status", "build",
           "choose_target", "library_path", "main"]

HERE = Path(__file__).resolve().parent
COMMON_FLAGS = ("-O3", "-fPIC", "-std=c++20", "-ffp-contract=fast", "-fno-math-errno",
                "-fno-trapping-math", "-fvisibility=hidden", "-w")


@dataclass(frozen=True)
class Kernel:
    """A C++ extension: its name and its files in this directory (sources, then headers).
    ``vec``: written on torch's ``at::vec`` types, which are SIMD code only when
    ``CPU_CAPABILITY`` names the target (so each build gets torch's defines for its level)."""

    name: str
    sources: tuple
    headers: tuple = ()
    vec: bool = False

    def defines(self, target: "Target") -> tuple:
        if not self.vec:
            return ()
        level = target.level.upper()
        return (f"-DCPU_CAPABILITY={level}", f"-DCPU_CAPABILITY_{level}")


@dataclass(frozen=True)
class Target:
    """An instruction-set level: compiler flags, the CPU flags it needs (as /proc/cpuinfo
    spells them) and the ``ATEN_CPU_CAPABILITY`` level it belongs to."""

    name: str
    flags: tuple
    needs: frozenset
    level: str


_AVX512 = ("-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mfma", "-mf16c")
_AVX512_NEEDS = frozenset({"avx512f", "avx512bw", "avx512vl", "avx512dq", "fma", "f16c"})
TARGETS = {t.name: t for t in (  # best first
    Target("avx512bf16", _AVX512 + ("-mavx512bf16",), _AVX512_NEEDS | {"avx512_bf16"}, "avx512"),
    Target("avx512", _AVX512, _AVX512_NEEDS, "avx512"),
    Target("avx2", ("-mavx2", "-mfma", "-mf16c"), frozenset({"avx2", "fma", "f16c"}), "avx2"),
    Target("default", (), frozenset(), "default"),
)}
_LEVELS = ("default", "avx2", "avx512")

ATTN = Kernel("attn", ("_attn_kernel.cpp", "_attn_kernel_fwd.cpp", "_attn_kernel_bwd.cpp"),
              ("_attn_kernel.h", "_attn_plan.h"))
DECODE = Kernel("decode", ("_decode_kernel.cpp",), vec=True)
KERNELS = (ATTN, DECODE)


@dataclass
class Status:
    """What :func:`load` did for a kernel.

    Attributes:
        impl: ``"cpp"`` when the library is loaded (or will be built on first use),
            ``"torch"`` when the pure-PyTorch implementation runs instead.
        state: ``loaded`` (found built), ``built`` (compiled by this process), ``pending``
            (not built yet; the first call builds it), ``disabled``, ``failed``,
            ``unsupported``.
        target: the instruction-set target, or None.
        path: the library's path, or None.
        reason: one sentence for explain().
    """

    impl: str
    state: str
    target: str | None
    path: Path | None
    reason: str

    def describe(self) -> str:
        return self.reason


def build_dir() -> Path:
    """Where ``make`` puts its builds (the development tree)."""
    return Path(os.environ.get("ATTNKIT_BUILD_DIR", HERE / "_build"))


def cache_dir() -> Path:
    """Where builds made on first use go (per user)."""
    if os.environ.get("ATTNKIT_CACHE_DIR"):
        return Path(os.environ["ATTNKIT_CACHE_DIR"])
    root = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(root) / "attnkit" / "kernels"


def _cpu_flags() -> set[str]:
    """The CPU's instruction-set flags as /proc/cpuinfo spells them; elsewhere, what torch's
    own dispatch found (its AVX2 level implies FMA and F16C, its AVX-512 level the rest)."""
    try:
        with open("/proc/cpuinfo") as f:
            line = next((ln for ln in f if ln.startswith("flags")), "")
        return set(line.split(":", 1)[-1].split())
    except OSError:
        cap = torch.backends.cpu.get_cpu_capability().lower()
        flags = {"avx2", "fma", "f16c"} if cap in ("avx2", "avx512") else set()
        return flags | (set(_AVX512_NEEDS) if cap == "avx512" else set())


def choose_target(kernel: Kernel = ATTN) -> tuple[Target | None, str]:
    """``(target, why)``: the best target this CPU runs, within ``ATEN_CPU_CAPABILITY`` and
    as ``ATTNKIT_<KERNEL>_TARGET`` (e.g. ``ATTNKIT_DECODE_TARGET``) or else
    ``ATTNKIT_KERNEL_TARGET`` asks; None (and why) when the asked target cannot run."""
    x86 = sysconfig.get_platform().endswith(("x86_64", "amd64")) or os.uname().machine in (
        "x86_64", "AMD64")
    flags = _cpu_flags() if x86 else set()
    cap = os.environ.get("ATEN_CPU_CAPABILITY", "").lower()
    top = _LEVELS.index(cap) if cap in _LEVELS else len(_LEVELS) - 1
    runs = [t for t in TARGETS.values() if t.needs <= flags and _LEVELS.index(t.level) <= top
            and (x86 or not t.flags)]
    var = f"ATTNKIT_{kernel.name.upper()}_TARGET"
    if not os.environ.get(var):
        var = "ATTNKIT_KERNEL_TARGET"
    asked = os.environ.get(var, "")
    if asked:
        if asked not in TARGETS:
            return None, (f"{var}={asked!r} is not a target; choose one of {list(TARGETS)}")
        if TARGETS[asked] not in runs:
            return None, (f"{var}={asked} cannot run on this CPU (or within "
                          f"ATEN_CPU_CAPABILITY={cap or 'unset'})")
        return TARGETS[asked], f"{asked} ({var})"
    why = f" (ATEN_CPU_CAPABILITY={cap})" if cap in _LEVELS else ""
    return runs[0], f"{runs[0].name}{why}"


def _digest(kernel: Kernel, target: Target) -> str:
    h = hashlib.sha1()
    for name in kernel.sources + kernel.headers:
        h.update((HERE / name).read_bytes())
    h.update(" ".join(COMMON_FLAGS + target.flags + kernel.defines(target)).encode())
    h.update(torch.__version__.encode())
    h.update(sys.version.encode())
    return h.hexdigest()[:12]


def library_name(kernel: Kernel, target: Target) -> str:
    return f"attnkit_{kernel.name}_{target.name}_{_digest(kernel, target)}"


def library_path(kernel: Kernel, target: Target, root: Path | None = None) -> Path:
    """Where the library of ``kernel`` for ``target`` lives under ``root`` (default: the
    development build directory); it may not exist."""
    name = library_name(kernel, target)
    return (root or build_dir()) / name / f"{name}.so"


def _compile_commands(kernel: Kernel, target: Target, name: str, work: Path):
    cxx = os.environ.get("CXX") or shutil.which("c++") or shutil.which("g++")
    if cxx is None:
        raise RuntimeError("no C++ compiler found (install g++ or set CXX)")
    from torch.utils import cpp_extension

    defines = [f"-DTORCH_EXTENSION_NAME={name}", "-DTORCH_API_INCLUDE_EXTENSION_H"]
    abi = getattr(torch._C, "_GLIBCXX_USE_CXX11_ABI", None)
    if abi is not None:
        defines.append(f"-D_GLIBCXX_USE_CXX11_ABI={int(abi)}")
    includes = [f"-isystem{p}" for p in cpp_extension.include_paths()]
    includes.append(f"-isystem{sysconfig.get_paths()['include']}")
    compiles = [[cxx, *COMMON_FLAGS, *target.flags, *kernel.defines(target), *defines, *includes, "-c",
                 str(HERE / src), "-o", str(work / (Path(src).stem + ".o"))]
                for src in kernel.sources]
    libs = [f"-L{p}" for p in cpp_extension.library_paths()]
    link = [cxx, "-shared", *[c[-1] for c in compiles], "-o", str(work / f"{name}.so"), *libs,
            "-lc10", "-ltorch", "-ltorch_cpu", "-ltorch_python"]
    return compiles, link


def _run(cmd) -> None:
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        err = (proc.stderr or proc.stdout).strip().splitlines()
        first = next((ln for ln in err if "error" in ln), err[0] if err else "failed")
        raise RuntimeError(f"{Path(cmd[0]).name} failed: {first.strip()}")


def build(kernel: Kernel, target: Target, root: Path | None = None) -> Path:
    """Compile ``kernel`` for ``target`` into ``root`` (default: the development build
    directory) and return the library's path; a no-op when it exists.

    Raises:
        RuntimeError: no compiler, or a compile or link error (its first line).
    """
    path = library_path(kernel, target, root)
    if path.exists():
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    with _FileLock(path.parent / ".lock"):
        if path.exists():  # another process built it while we waited
            return path
        work = Path(tempfile.mkdtemp(prefix=".build-", dir=path.parent))
        try:
            compiles, link = _compile_commands(kernel, target, path.stem, work)
            with ThreadPoolExecutor(max_workers=max(1, min(len(compiles), os.cpu_count() or 1))) as ex:
                list(ex.map(_run, compiles))
            _run(link)
            os.replace(work / path.name, path)
        finally:
            shutil.rmtree(work, ignore_errors=True)
    return path


class _FileLock:
    """An exclusive lock on a file (POSIX ``flock``; elsewhere no lock: the atomic rename
    still keeps the library whole)."""

    def __init__(self, path: Path):
        self.path, self.fd = path, None

    def __enter__(self):
        try:
            import fcntl
        except ImportError:
            return self
        self.fd = os.open(self.path, os.O_CREAT | os.O_RDWR)
        fcntl.flock(self.fd, fcntl.LOCK_EX)
        return self

    def __exit__(self, *exc):
        if self.fd is not None:
            os.close(self.fd)


def _import(path: Path):
    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


_lock = threading.Lock()
_loaded: dict[str, tuple] = {}


def status(kernel: Kernel = ATTN) -> Status:
    """What :func:`load` did or will do, without building anything."""
    if kernel.name in _loaded:
        return _loaded[kernel.name][1]
    return _find(kernel)[1]


def _find(kernel: Kernel):
    """``(path or None, Status)`` before any build."""
    for var in (f"ATTNKIT_{kernel.name.upper()}_IMPL", "ATTNKIT_KERNEL_IMPL"):
        if os.environ.get(var, "").lower() == "torch":
            return None, Status("torch", "disabled", None, None,
                                f"pure-PyTorch implementation ({var}=torch)")
    if not all((HERE / f).exists() for f in kernel.sources + kernel.headers):
        return None, Status("torch", "unsupported", None, None,
                            "pure-PyTorch implementation (the kernel's sources are missing "
                            "from this installation)")
    target, why = choose_target(kernel)
    if target is None:
        return None, Status("torch", "unsupported", None, None,
                            f"pure-PyTorch implementation ({why})")
    for root in (build_dir(), cache_dir()):
        path = library_path(kernel, target, root)
        if path.exists():
            return path, Status("cpp", "loaded", target.name, path,
                                f"C++ kernel built for {why} ({path})")
    if os.environ.get("ATTNKIT_KERNEL_BUILD", "1") == "0":
        return None, Status("torch", "disabled", target.name, None,
                            f"pure-PyTorch implementation (the {target.name} kernel is not "
                            f"built and ATTNKIT_KERNEL_BUILD=0)")
    path = library_path(kernel, target, cache_dir())
    return None, Status("cpp", "pending", target.name, path,
                        f"C++ kernel for {why}, built into {path.parent} on first use")


def load(kernel: Kernel = ATTN):
    """The kernel's module, or None (see :func:`status` for why). Builds it on first use
    when it is missing (one line on stderr), once per process."""
    with _lock:
        if kernel.name in _loaded:
            return _loaded[kernel.name][0]
        path, st = _find(kernel)
        module = None
        if st.state == "pending":
            target = TARGETS[st.target]
            print(f"attnkit: compiling the {kernel.name} kernel for this CPU ({target.name}) "
                  f"into {st.path.parent}; once, about a minute", file=sys.stderr, flush=True)
            start = time.perf_counter()
            try:
                path = build(kernel, target, cache_dir())
                st = Status("cpp", "built", target.name, path,
                            f"C++ kernel for {target.name}, built in "
                            f"{time.perf_counter() - start:.0f} s ({path})")
            except Exception as err:  # noqa: BLE001 - no compiler, a compile error: say it
                st = Status("torch", "failed", target.name, None,
                            f"pure-PyTorch implementation (building the {target.name} kernel "
                            f"failed: {err})")
                print(f"attnkit: {st.reason}", file=sys.stderr, flush=True)
        if path is not None and st.impl == "cpp":
            try:
                module = _import(path)
            except (ImportError, OSError) as err:
                st = Status("torch", "failed", st.target, path,
                            f"pure-PyTorch implementation (the kernel at {path} did not load: "
                            f"{err})")
                print(f"attnkit: {st.reason}", file=sys.stderr, flush=True)
        _loaded[kernel.name] = (module, st)
        return module


def main(argv=None) -> int:
    """``python -m attnkit.backends._ext [build|status] [--kernel K] [--target T] [--dir D]``:
    build attnkit's kernels (for ``make``; default: every kernel, this CPU's best target);
    never fails: prints what happened and returns 0."""
    import argparse

    parser = argparse.ArgumentParser(prog="python -m attnkit.backends._ext")
    parser.add_argument("command", nargs="?", default="build", choices=["build", "status"])
    parser.add_argument("--kernel", choices=[k.name for k in KERNELS], help="default: all")
    parser.add_argument("--target", choices=list(TARGETS), help="default: this CPU's best")
    parser.add_argument("--dir", type=Path, help="default: the development build directory")
    args = parser.parse_args(argv)
    kernels = [k for k in KERNELS if args.kernel in (None, k.name)]
    with ThreadPoolExecutor(max_workers=len(kernels)) as ex:  # compiles in parallel
        for line in ex.map(lambda k: _build_one(k, args), kernels):
            print(line)
    return 0


def _build_one(kernel: Kernel, args) -> str:
    target = TARGETS[args.target] if args.target else choose_target(kernel)[0]
    if args.command == "status" or target is None:
        return f"{kernel.name} kernel: {status(kernel).describe()}"
    path = library_path(kernel, target, args.dir)
    if path.exists():
        return f"{kernel.name} kernel: up to date ({path.parent.name})"
    start = time.perf_counter()
    try:
        path = build(kernel, target, args.dir)
    except Exception as err:  # noqa: BLE001
        return (f"{kernel.name} kernel: not built ({err}); its backend uses its pure-PyTorch "
                f"implementation")
    return f"{kernel.name} kernel: built {path} ({time.perf_counter() - start:.0f} s)"


if __name__ == "__main__":
    raise SystemExit(main())
