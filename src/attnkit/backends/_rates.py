"""This machine's measured rates, for the backends' cost rules.

A cost rule turns a call into estimated seconds from rates: bytes per second a kernel reads a
cache at, FLOP/s of its arithmetic. Constants measured on one CPU mislead ``auto`` on another
(a bfloat16 decode step priced at 17 ms took 104 ms on an AVX2 CPU without native bfloat16),
so the rates are measured here, once, by a short calibration (about a second of one thread's
CPU time; the best of a few calls each):

* ``read``: bytes/s of a plain ``sum`` over a buffer larger than the last-level cache (the
  machine's read roof);
* ``mm_fp32``, ``mm_bf16``: FLOP/s of a 512 x 512 (bfloat16: 128 x 128) ``torch.mm``;
* ``decode_{cpp,torch}_read_{fp32,half}``: K/V bytes/s of one decode step (GQA 32/8, head dim
  128) over a cache larger than the last-level cache, through the decode kernel and through
  its PyTorch implementation; ``decode_{cpp,torch}_flops``: FLOP/s of a 64-row verify block
  over a cache in cache (compute-bound);
* ``sdpa_read_{fp32,half}``: the K/V bytes per query head per second SDPA reads a decode step
  at (its CPU kernel reads a GQA head once per query head); ``chunked_read_{fp32,half}``:
  the K/V bytes per second chunked reads one at (its C++ kernel when built).

``make`` runs the calibration after building the kernels (``python -m
attnkit.backends._rates``); without it the first :func:`rate` call runs it (a one-line notice
on stderr). The result is a JSON file keyed by the CPU (model, instruction-set flags), torch's
version and the decode kernel's build, in the build directory beside the kernels
(``ATTNKIT_BUILD_DIR``) when it is writable, else in ``~/.cache/attnkit``
(``XDG_CACHE_HOME``). ``ATTNKIT_RATES=default`` uses the rules' own defaults instead (never
measures); under ``torch.compile`` nothing is measured either.

Interface: ``rate(name, default) -> float``; :func:`rates` (everything measured),
:func:`calibrate`, :func:`path`.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import time
from pathlib import Path

import torch

__all__ = ["rate", "rates", "calibrate", "path"]

_state: dict = {}


def _cpu_key() -> str:
    """What the rates depend on: the CPU, torch, the decode kernel's build."""
    from . import _decode_ext, _ext

    model, flags = "", ""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name") and not model:
                    model = line.split(":", 1)[1].strip()
                elif line.startswith("flags") and not flags:
                    flags = line
    except OSError:
        import platform
        model = platform.processor() or platform.machine()
    h = hashlib.sha1()
    # the kernels' builds (never building them): chunked's rates are its kernel's when built
    built = [f"{k.name}:{_ext.status(k).state in ('loaded', 'built')}" for k in _ext.KERNELS]
    for part in (model, flags, torch.__version__, _decode_ext.library_path().name, *built):
        h.update(part.encode())
    return h.hexdigest()[:12]


def path() -> Path:
    """The JSON file this machine's rates live in (it may not exist yet)."""
    from . import _ext

    name = f"rates-{_cpu_key()}.json"
    build = _ext.build_dir()
    if os.access(build, os.W_OK) or (not build.exists() and os.access(build.parent, os.W_OK)):
        return build / name
    cache = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "attnkit"
    return cache / name


def rate(name: str, default: float) -> float:
    """This machine's measured rate ``name``, or ``default`` when it is not measured (or
    ``ATTNKIT_RATES=default``). Measures once per machine on first use."""
    measured = _state.get("rates")
    if measured is None:
        measured = _load()
    value = measured.get(name)
    return float(value) if value else default


def rates() -> dict:
    """Every measured rate (empty with ``ATTNKIT_RATES=default``)."""
    return dict(_state["rates"] if "rates" in _state else _load())


def _load() -> dict:
    if os.environ.get("ATTNKIT_RATES", "") == "default":
        return {}  # not stored: the variable may be unset later
    if torch.compiler.is_compiling():
        return {}
    file = path()
    try:
        found = json.loads(file.read_text())["rates"]
    except (OSError, ValueError, KeyError, TypeError):
        print(f"attnkit: measuring this machine's rates for the cost rules (once, ~1 s); "
              f"saved to {file}", file=sys.stderr)
        found = calibrate(save=True)
    _state["rates"] = found
    return found


def _best(fn, reps: int = 3) -> float:
    """The fastest of up to ``reps`` calls after one warm-up, in seconds of this thread's CPU
    time (one thread: time spent descheduled by other processes on a shared machine does
    not count; memory contention still does). Slow calls are repeated less."""
    start = time.thread_time()
    fn()
    first = time.thread_time() - start
    best = float("inf")
    for _ in range(max(1, min(reps, int(0.1 / max(first, 1e-9))))):
        start = time.thread_time()
        fn()
        best = min(best, time.thread_time() - start)
    return max(best, 1e-9)


def calibrate(save: bool = True) -> dict:
    """Measure every rate on one thread (about a second on a quiet machine); write the JSON
    (atomically) when ``save``. Returns the rates."""
    from .. import _atomic
    from . import decode as dec

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    out: dict = {}
    try:
        with torch.no_grad():
            buf = torch.full((16 * 2**20,), 0.5)  # 64 MiB: past the last-level cache
            out["read"] = buf.numel() * 4 / _best(buf.sum)
            del buf
            # (bfloat16 matmuls are ~100x slower than float32 on CPUs without native bfloat16)
            for dtype, name, n in ((torch.float32, "fp32", 512), (torch.bfloat16, "bf16", 128)):
                a = torch.full((n, n), 0.01, dtype=dtype)
                out[f"mm_{name}"] = 2 * n**3 / _best(lambda a=a: torch.mm(a, a))
            out.update(_decode_rates(dec))
    finally:
        torch.set_num_threads(threads)
    if save:
        file = path()
        file.parent.mkdir(parents=True, exist_ok=True)
        record = {"key": _cpu_key(), "torch": torch.__version__, "threads": 1,
                  "measured_at": time.strftime("%Y-%m-%d %H:%M:%S"),
                  "load_average": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
                  "rates": out}
        text = json.dumps(record, indent=1).encode()
        _atomic.atomic_write(file, lambda f: f.write(text))
    _state["rates"] = out
    return out


def _decode_rates(dec) -> dict:
    """Decode steps (T = 1, GQA 32/8, D = 128) over caches past the last-level cache, and
    a verify block of 64 rows per kv head (T = 16) over one in cache."""
    import torch.nn.functional as F

    from ..spec import MaskSpec
    from . import chunked

    out = {}
    H, Hkv, D = 32, 8, 128
    spec = MaskSpec.from_args(causal=True, causal_align="bottom_right")
    impls = ["cpp", "torch"] if dec.kernel_built() else ["torch"]
    for dtype, name, S in ((torch.float32, "fp32", 8192), (torch.bfloat16, "half", 16384)):
        q = torch.full((1, H, 1, D), 0.01, dtype=dtype)
        k = torch.full((1, Hkv, S, D), 0.01, dtype=dtype)
        v = torch.full((1, Hkv, S, D), 0.01, dtype=dtype)
        kv_bytes = 2 * k.numel() * k.element_size()
        for impl in impls:
            out[f"decode_{impl}_read_{name}"] = kv_bytes / _best(lambda: _step(dec, q, k, v, impl))
        out[f"chunked_read_{name}"] = kv_bytes / _best(lambda: chunked.chunked_attention(
            q, k, v, spec, scale=0.1))
        s = 4096 if dtype == torch.float32 else 2048  # SDPA reads K/V once per query head
        ks, vs = k[:, :, :s], v[:, :, :s]
        out[f"sdpa_read_{name}"] = 2 * H * s * D * k.element_size() / _best(
            lambda: F.scaled_dot_product_attention(q, ks, vs, enable_gqa=True), reps=2)
        del q, k, v, ks, vs
    T, S = 16, 2048
    q = torch.full((1, H, T, D), 0.01)
    k = torch.full((1, Hkv, S, D), 0.01)
    for impl in impls:
        out[f"decode_{impl}_flops"] = 4.0 * H * T * S * D / _best(
            lambda: _step(dec, q, k, k, impl))
    return out


def _step(dec, q, k, v, impl):
    T, S = q.shape[2], k.shape[2]
    if impl == "cpp":
        return dec.decode_spans(q, k, v, scale=0.1, lo=[0] * T, hi=[S] * T)
    return dec.decode_rows(q, k, v, scale=0.1, impl="torch")


def main() -> int:
    """``make``: measure (again) and print the rates."""
    if os.environ.get("ATTNKIT_RATES", "") == "default":
        print("rates: ATTNKIT_RATES=default, nothing measured")
        return 0
    start = time.perf_counter()
    found = calibrate(save=True)
    shown = ", ".join(f"{n} {v / 1e9:.3g}G" for n, v in found.items())
    print(f"rates: measured in {time.perf_counter() - start:.1f} s ({shown}); saved to {path()}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
