"""Shared helpers for the benchmark scripts: environment header, timing, FLOP rates, peak
memory, tables and JSON.

A script describes its measurements as a list of :class:`Case` objects, each with a ``setup``
that builds the inputs and returns the zero-argument callable to measure. Then
:func:`run_cases`

1. times every case in this process, interleaved round-robin within a group (one call of
   each implementation per round), so load from other processes falls on all peers alike;
2. re-runs the script in a fresh subprocess (``--memory-worker``) that measures each case's
   peak resident memory, and merges the numbers in.

Why a subprocess for memory: CPU tensors come from glibc ``malloc``, which keeps freed
blocks and raises its mmap threshold as it sees large frees, so resident memory in a
long-lived process says more about history than about the case. The worker pins
``MALLOC_MMAP_THRESHOLD_`` (every buffer over 64 KiB is its own mapping, returned to the OS
when freed) and reads the kernel's resident high-water mark (``VmHWM``, reset through
``/proc/self/clear_refs``) around one call. Timing stays in the normal process, because
pinned mmaps page-fault every large allocation and would slow the timed code.

Reported per case: median ms after warm-up, GFLOP/s from the case's FLOP count (a script
counts causal attention as half the dense FLOPs), peak MiB above the memory held before the
call (weights and inputs excluded; CUDA: ``torch.cuda.max_memory_allocated``).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from typing import Callable

import torch

_MEMORY_ENV = {"MALLOC_MMAP_THRESHOLD_": "65536"}


@dataclass
class Case:
    """One measurement.

    Attributes:
        group: cases with the same group are compared with each other (ratio to the fastest)
            and timed interleaved.
        name: the implementation's label inside its group.
        setup: builds modules and inputs, returns the callable to time (``fn()``).
        flops: floating-point operations of one ``fn()`` call (0 to leave GFLOP/s blank).
        info: extra columns copied into the result row (shape, dtype, mode, ...).
        peer: False for rows shown for reference but left out of the ratio's "fastest".
    """

    group: str
    name: str
    setup: Callable[[], Callable[[], object]]
    flops: float = 0.0
    info: dict = field(default_factory=dict)
    peer: bool = True


def add_common_args(parser: argparse.ArgumentParser) -> None:
    """``--quick``, ``--json``, ``--reps``, ``--warmup``, ``--threads``, ``--no-memory``."""
    parser.add_argument("--quick", action="store_true", help="tiny shapes, few reps: a smoke test")
    parser.add_argument("--json", metavar="PATH", help="also write the results as JSON")
    parser.add_argument("--reps", type=int, help="timed calls per case (median reported)")
    parser.add_argument("--warmup", type=int, help="untimed calls per case first")
    parser.add_argument("--threads", type=int,
                        help="torch.set_num_threads (default: torch's; 1 with --quick)")
    parser.add_argument("--no-memory", action="store_true", help="skip the peak-memory pass")
    parser.add_argument("--memory-worker", action="store_true", help=argparse.SUPPRESS)


def environment() -> dict:
    """Where the numbers come from: torch, device, threads, Python, OS."""
    if torch.cuda.is_available():
        device = torch.cuda.get_device_name()
    else:
        device = platform.processor() or platform.machine()
        try:
            with open("/proc/cpuinfo") as f:
                device = next(line.split(":", 1)[1].strip() for line in f
                              if line.startswith("model name"))
        except (OSError, StopIteration):
            pass
        device = f"CPU {device} ({os.cpu_count()} logical cores)"
    return {"torch": torch.__version__, "device": device, "threads": torch.get_num_threads(),
            "python": platform.python_version(), "platform": platform.platform()}


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def time_interleaved(fns: dict[str, Callable], *, warmup: int, reps: int) -> dict[str, list]:
    """Milliseconds of ``reps`` calls of each function, one call of each per round."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    times = {name: [] for name in fns}
    for _ in range(reps):
        for name, fn in fns.items():
            _sync()
            start = time.perf_counter()
            fn()
            _sync()
            times[name].append((time.perf_counter() - start) * 1e3)
    return times


def _status_mib(key: str) -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key):
                return int(line.split()[1]) / 1024  # the kernel reports kB
    raise OSError(f"{key} not in /proc/self/status")


def peak_memory_mib(fn: Callable) -> float | None:
    """Peak memory of one ``fn()`` above what was held before it, in MiB (None if unknown).

    CUDA: the allocator's peak. CPU (Linux): the resident high-water mark, reset first;
    meaningful in a process started with :data:`_MEMORY_ENV` (see the module docstring).
    """
    if torch.cuda.is_available():
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        fn()
        torch.cuda.synchronize()
        return (torch.cuda.max_memory_allocated() - before) / 2**20
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # "5" resets the peak resident set size (Linux >= 4.0)
        before = _status_mib("VmRSS:")
        fn()
        return _status_mib("VmHWM:") - before
    except OSError:
        return None


def _memory_worker(cases: list[Case]) -> None:
    torch.ones(256, 256) @ torch.ones(256, 256)  # start the thread pool outside any case
    results = {}
    for case in cases:
        fn = case.setup()
        results[f"{case.group}|{case.name}"] = peak_memory_mib(fn)
        del fn  # frees the case's modules and inputs (refcounting; gc.collect costs 0.2 s)
    print(json.dumps(results))


def _memory_in_subprocess(argv: list[str]) -> dict:
    env = {**os.environ, **_MEMORY_ENV}
    proc = subprocess.run([sys.executable, *argv, "--memory-worker"], env=env,
                          capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        print(f"peak-memory pass failed; memory left blank:\n{proc.stderr[-2000:]}",
              file=sys.stderr)
        return {}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def set_threads(args: argparse.Namespace) -> None:
    """Apply ``--threads``; ``--quick`` defaults to one thread."""
    threads = args.threads or (1 if args.quick else None)
    if threads:
        # Tiny shapes gain nothing from more threads, and on a busy machine OpenMP barriers
        # waiting for a descheduled thread dominate tiny ops.
        torch.set_num_threads(threads)


def run_cases(cases: list[Case], args: argparse.Namespace, *, warmup: int, reps: int,
              progress: bool = True) -> list[dict] | None:
    """Time every case (and measure its memory in a subprocess); return one row per case.

    In the ``--memory-worker`` subprocess this prints the memory results and returns None.
    """
    set_threads(args)
    if args.memory_worker:
        _memory_worker(cases)
        return None
    warmup = args.warmup if args.warmup is not None else warmup
    reps = args.reps if args.reps is not None else reps
    rows = []
    groups = list(dict.fromkeys(case.group for case in cases))
    for group in groups:
        members = [case for case in cases if case.group == group]
        fns = {case.name: case.setup() for case in members}
        times = time_interleaved(fns, warmup=warmup, reps=reps)
        del fns
        for case in members:
            ms = statistics.median(times[case.name])
            rows.append({**case.info, "group": group, "impl": case.name, "peer": case.peer,
                         "median_ms": ms, "min_ms": min(times[case.name]),
                         "times_ms": times[case.name], "reps": reps,
                         "gflops": case.flops / ms / 1e6 if case.flops else None,
                         "peak_mib": None})
        if progress:
            print(f"  timed {group}", file=sys.stderr, flush=True)
    add_ratios(rows)
    if not args.no_memory:
        memory = _memory_in_subprocess(sys.argv)
        for row in rows:
            row["peak_mib"] = memory.get(f"{row['group']}|{row['impl']}")
    return rows


def add_ratios(rows: list[dict]) -> None:
    """Each row's time over the fastest peer's (by median) in its group, three ways.

    ``ratio``: median over median; ``ratio_min``: minimum over minimum; ``ratio_paired``:
    the median over rounds of the two calls' ratio within the same round. On a shared machine
    contention only ever adds time, so the minimum estimates the uncontended cost, and the
    paired ratio cancels load that drifts slower than one round.
    """
    for group in {row["group"] for row in rows}:
        members = [r for r in rows if r["group"] == group]
        fastest = min((r for r in members if r["peer"]), key=lambda r: r["median_ms"],
                      default=None) or min(members, key=lambda r: r["median_ms"])
        best_min = min(r["min_ms"] for r in members if r["peer"] or r is fastest)
        for row in members:
            row["ratio"] = row["median_ms"] / fastest["median_ms"]
            row["ratio_min"] = row["min_ms"] / best_min
            row["ratio_paired"] = statistics.median(
                a / b for a, b in zip(row["times_ms"], fastest["times_ms"]))


def _fmt(value, spec: str) -> str:
    if value is None:
        return "-"
    return format(value, spec) if spec else str(value)


def format_table(rows: list[dict], columns: list[tuple[str, str, str]]) -> str:
    """A Markdown table; ``columns`` are ``(header, row key, format spec)``. Numbers are
    right-aligned, text left-aligned."""
    headers = [header for header, _, _ in columns]
    cells = [[_fmt(row.get(key), spec) for _, key, spec in columns] for row in rows]
    numeric = [all(isinstance(row.get(key), (int, float)) or row.get(key) is None
                   for row in rows) for _, key, _ in columns]
    widths = [max([len(h)] + [len(c[i]) for c in cells]) for i, h in enumerate(headers)]

    def line(values):
        return "| " + " | ".join(v.rjust(w) if num else v.ljust(w)
                                 for v, w, num in zip(values, widths, numeric)) + " |"

    rule = "|" + "|".join("-" * (w + 1) + (":" if num else "-")
                          for w, num in zip(widths, numeric)) + "|"
    return "\n".join([line(headers), rule] + [line(c) for c in cells])


def header_text(env: dict) -> str:
    return (f"torch {env['torch']} | {env['device']} | {env['threads']} threads | "
            f"Python {env['python']}")


def write_json(path: str, env: dict, config: dict, rows: list[dict]) -> None:
    """Write ``{"environment", "config", "results"}`` to ``path``."""
    with open(path, "w") as f:
        json.dump({"environment": env, "config": config, "results": rows}, f, indent=2)
    print(f"wrote {path}", file=sys.stderr)
