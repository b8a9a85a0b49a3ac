"""Sequence-parallel attention: step time and per-rank peak memory against one process.

For one total length ``T``, causal attention forward + backward runs on ``P`` local gloo
processes (forked from this script) for every method and ``P`` asked for, next to the
single-process peers ``attnkit.attention`` with the ``chunked`` and ``sdpa`` backends::

    python benchmarks/bench_distributed.py                 # T=4096, H=4, D=128, P=1,2,4
    python benchmarks/bench_distributed.py --quick         # a seconds-long smoke test
    python benchmarks/bench_distributed.py --weak --seq-len 2048   # T/P fixed, T grows
    python benchmarks/bench_distributed.py --json out/bench_distributed.json

Columns:

* ``median ms``: one forward + backward step as the *slowest* rank saw it (a lock-step ring
  moves at its slowest rank's pace), median over ``--repeats`` after ``--warmup`` steps.
* ``GFLOP/s``: ``3.5 * 4 * B * H * T^2 * D`` per step (backward counted as 2.5 forwards),
  halved for causal, over the median time: work done by all ranks together.
* ``peak MiB/rank``: growth of each rank's anonymous resident memory (heap and tensors,
  sampled every millisecond) from just before its inputs are made: inputs, outputs,
  gradients, ring buffers and temporaries as the OS sees them; the largest over ranks.
  Blocks of 128 KiB and up are returned to the OS when freed (see
  :func:`_return_freed_memory`; ``--malloc-default`` turns that off).

Every rank runs ``--threads-per-rank`` threads (default 1) and all ranks share this machine's
cores, so on one machine the time cannot improve much with P (P=4 on 2 cores is
oversubscribed); the memory column is what carries over to a cluster.

Shape letters: ``B`` batch, ``H`` heads, ``T`` full length, ``D`` head dim, ``P`` processes.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import multiprocessing as mp
import os
import queue as queue_module
import socket
import statistics
import threading
import time
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist

import attnkit
from attnkit.distributed import ring_attention, ulysses_attention

METHODS = ("attention[chunked]", "attention[sdpa]", "ring[zigzag]", "ring[contiguous]",
           "ulysses")


def _anon_mib() -> float:
    """Anonymous resident memory (heap, tensors), without code pages (Linux)."""
    with open("/proc/self/statm") as f:  # pages: size resident shared(file-backed) ...
        _, resident, shared = (int(x) for x in f.read().split()[:3])
    return (resident - shared) * os.sysconf("SC_PAGE_SIZE") / 2**20


class _PeakMemory:
    """Peak of :func:`_anon_mib` above its value at start, sampled every millisecond.

    Why not ``ru_maxrss``: a forked rank faults in libtorch's code pages as it first runs a
    kernel, tens of MiB that have nothing to do with T; only anonymous memory scales with it.
    """

    def __init__(self):
        self.base = self.peak = _anon_mib()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()

    def _sample(self):
        while not self._stop.wait(0.001):
            self.peak = max(self.peak, _anon_mib())

    def stop(self) -> float:
        self._stop.set()
        self._thread.join()
        return max(self.peak, _anon_mib()) - self.base


def _return_freed_memory() -> None:
    """Have glibc's malloc serve blocks of 128 KiB and up with mmap, so frees go to the OS.

    By default glibc raises that threshold as large blocks are freed and then keeps freed
    tensors in its heap: resident memory drifts up with the number of ring steps (P) and
    measures the allocator, not the algorithm. Fixing it costs page faults in every row.
    """
    try:
        ctypes.CDLL("libc.so.6").mallopt(-3, 128 * 1024)  # -3 is M_MMAP_THRESHOLD
    except (OSError, AttributeError):
        pass  # not glibc: measure with the allocator as it is


def _step_fn(method: str):
    """``f(q, k, v) -> out`` for one method (the process group is already up)."""
    if method.startswith("attention["):
        backend = method[len("attention["):-1]
        return lambda q, k, v: attnkit.attention(q, k, v, causal=True, backend=backend)
    if method.startswith("ring["):
        layout = method[len("ring["):-1]
        return lambda q, k, v: ring_attention(q, k, v, causal=True, layout=layout)
    return lambda q, k, v: ulysses_attention(q, k, v, causal=True, layout="zigzag")


def _rank_main(rank, P, port, cfg, results):
    # First, before any parallel op: an OpenMP pool inherited through fork can deadlock.
    torch.set_num_threads(cfg["threads"])
    if not cfg["malloc_default"]:
        _return_freed_memory()
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    try:
        dist.init_process_group("gloo", rank=rank, world_size=P,
                                timeout=timedelta(seconds=300))
        step = _step_fn(cfg["method"])
        B, H, T, D = cfg["shape"]
        dtype = getattr(torch, cfg["dtype"])

        def make(n):  # this rank's shard only: nobody ever holds the full sequence
            g = torch.Generator().manual_seed(rank)
            return [torch.randn(B, H, n, D, generator=g, dtype=dtype).requires_grad_()
                    for _ in range(3)]

        # One-off allocations first (gloo, autograd, and a 30+ MiB first-use buffer in the
        # matmul libraries), with the same calls as the measured steps.
        warm = make(4 * P)
        step(*warm).backward(torch.randn_like(warm[0]))
        memory = _PeakMemory()
        q, k, v = make(T // P)
        grad_out = torch.randn_like(q)
        times = []
        for _ in range(cfg["warmup"] + cfg["repeats"]):
            q.grad = k.grad = v.grad = None
            dist.barrier()
            start = time.perf_counter()
            step(q, k, v).backward(grad_out)
            times.append(time.perf_counter() - start)
        results.put((rank, times[cfg["warmup"]:], memory.stop(), None))
    except BaseException as err:
        results.put((rank, None, None, f"{type(err).__name__}: {err}"))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def measure(method: str, P: int, cfg: dict, timeout_s: float = 600) -> dict:
    """Run one method on P forked ranks; the slowest rank's median time and the top peak."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cfg = dict(cfg, method=method)
    results = mp.get_context("fork").Queue()
    procs = torch.multiprocessing.start_processes(
        _rank_main, args=(P, port, cfg, results), nprocs=P, join=False, start_method="fork")
    per_rank = {}
    try:
        for _ in range(P):
            rank, times, peak, error = results.get(timeout=timeout_s)
            if error:
                raise RuntimeError(f"{method} P={P} rank {rank}: {error}")
            per_rank[rank] = (times, peak)
    except queue_module.Empty:
        raise TimeoutError(f"{method} P={P}: no result within {timeout_s} s") from None
    finally:
        for proc in procs.processes:
            proc.join(timeout=10)
            if proc.is_alive():
                proc.kill()
    slowest = [max(step) for step in zip(*(t for t, _ in per_rank.values()))]
    B, H, T, D = cfg["shape"]
    median_s = statistics.median(slowest)
    flops = 3.5 * 4 * B * H * T * T * D / 2  # causal: half the score matrix
    return {"method": method, "P": P, "median_ms": 1000 * median_s,
            "gflops": flops / median_s / 1e9,
            "peak_mib_per_rank": max(p for _, p in per_rank.values())}


def _plan(methods, sizes):
    """``(method, P)`` runs: the single-process peers at P=1 only, the sequence-parallel
    methods at every P except ``ring[contiguous]`` at P=1 (one rank: the same as zigzag)."""
    for method in methods:
        for P in sizes:
            if method.startswith("attention[") and P != 1:
                continue
            if method == "ring[contiguous]" and P == 1:
                continue
            yield method, P


def _parse(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--seq-len", type=int, default=4096, help="full length T (at P=1 with --weak)")
    p.add_argument("--weak", action="store_true",
                   help="weak scaling: T = seq-len * P, so every rank holds seq-len tokens")
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--dtype", default="float32", choices=["float32", "float64", "bfloat16"])
    p.add_argument("--world-sizes", default="1,2,4", help="comma-separated P values")
    p.add_argument("--methods", default=",".join(METHODS),
                   help=f"comma-separated subset of {', '.join(METHODS)}")
    p.add_argument("--threads-per-rank", type=int, default=1,
                   help="torch threads in each rank (default 1: OpenMP's spinning barriers "
                        "collapse when the cores are shared with other processes)")
    p.add_argument("--malloc-default", action="store_true",
                   help="keep glibc's adaptive mmap threshold (peak memory then includes "
                        "freed blocks the allocator keeps)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--quick", action="store_true", help="tiny sizes: a seconds-long smoke test")
    p.add_argument("--json", type=Path, help="also write the rows and settings here")
    args = p.parse_args(argv)
    if args.quick:
        args.seq_len, args.heads, args.head_dim, args.repeats = 256, 4, 32, 2
        args.world_sizes = "1,2"
    args.methods = args.methods.split(",")
    for m in args.methods:
        if m not in METHODS:
            p.error(f"unknown method {m!r}; choose from {', '.join(METHODS)}")
    return args


def main(argv=None) -> None:
    args = _parse(argv)
    cfg = {"dtype": args.dtype, "repeats": args.repeats, "warmup": args.warmup,
           "threads": args.threads_per_rank, "malloc_default": args.malloc_default}
    plan = sorted(_plan(args.methods, [int(x) for x in args.world_sizes.split(",")]),
                  key=lambda run: (run[1], METHODS.index(run[0])))
    meta = {"torch": torch.__version__, "device": f"cpu ({os.cpu_count()} cores, shared)",
            "dtype": args.dtype, "causal": True, "scaling": "weak" if args.weak else "strong",
            "threads/rank": args.threads_per_rank,
            "malloc": "glibc default" if args.malloc_default else "mmap >= 128 KiB",
            "repeats": args.repeats,
            "warmup": args.warmup}
    print(", ".join(f"{k}: {v}" for k, v in meta.items()))
    header = (f"{'shape (B,H,T,D)':<18} {'P':>2} {'method':<19} {'median ms':>10} "
              f"{'GFLOP/s':>8} {'peak MiB/rank':>14}")
    print(header + "\n" + "-" * len(header))
    rows = []
    for method, P in plan:
        T = args.seq_len * P if args.weak else args.seq_len
        shape = (args.batch, args.heads, T, args.head_dim)
        row = dict(measure(method, P, dict(cfg, shape=shape)), shape=shape)
        rows.append(row)
        print(f"{str(shape):<18} {P:>2} {method:<19} {row['median_ms']:>10.1f} "
              f"{row['gflops']:>8.1f} {row['peak_mib_per_rank']:>14.1f}", flush=True)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        results = [dict(row, impl=row.get("method"), peak_mib=row["peak_mib_per_rank"])
                   for row in rows]  # the column names every benchmark's JSON shares
        args.json.write_text(json.dumps({"environment": meta, "config": cfg,
                                         "results": results}, indent=2))
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
