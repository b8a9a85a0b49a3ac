"""Causal ring attention over one sequence split across processes, checked against one process.

Local processes (gloo on CPU, no launcher needed)::

    python examples/ring_attention_torchrun.py --nproc 4

torchrun, one machine or several (the script reads RANK/WORLD_SIZE/MASTER_ADDR from the
environment; gloo on CPU, nccl when every rank has a GPU)::

    torchrun --nproc-per-node 4 examples/ring_attention_torchrun.py
    torchrun --nnodes 2 --node-rank 0 --master-addr HOST0 --master-port 29500 \\
        --nproc-per-node 8 examples/ring_attention_torchrun.py --seq-len 65536 --no-check

Every rank draws the same seeded full q/k/v and keeps its zigzag shard (a real model would
embed only its shard's tokens and use ``position_ids`` for RoPE). Ring attention runs forward
and backward; with ``--check`` rank 0 gathers output and gradients and compares them with
single-process attention on the whole sequence, and with Ulysses attention.

Shape letters: ``B`` batch, ``H`` heads, ``T`` full length, ``P`` world size, ``D`` head dim.
"""

from __future__ import annotations

import argparse
import os
import time
from datetime import timedelta

import torch
import torch.distributed as dist

import attnkit
from attnkit.distributed import (position_ids, ring_attention, shard, ulysses_attention,
                                 unshard)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--nproc", type=int, default=2,
                   help="local processes to start when not run under torchrun (default 2)")
    p.add_argument("--seq-len", type=int, default=2048, help="full sequence length T")
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--head-dim", type=int, default=32)
    p.add_argument("--dtype", choices=["float32", "float64", "bfloat16"], default="float32")
    p.add_argument("--backend", choices=["auto", "gloo", "nccl"], default="auto",
                   help="torch.distributed backend (auto: nccl with GPUs, else gloo)")
    p.add_argument("--check", action=argparse.BooleanOptionalAction, default=True,
                   help="compare with single-process attention on rank 0 (needs the full "
                        "sequence in memory there)")
    return p.parse_args(argv)


def run(rank: int, world_size: int, args) -> None:
    """One rank's work; the process group is already initialised."""
    device = torch.device("cpu")
    if dist.get_backend() == "nccl":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", rank)))
        torch.cuda.set_device(device)
    dtype = getattr(torch, args.dtype)
    T, H, D = args.seq_len, args.heads, args.head_dim
    g = torch.Generator().manual_seed(0)  # same draw on every rank
    q, k, v, grad_out = (torch.randn(1, H, T, D, generator=g).to(device, dtype) for _ in "qkvg")

    q_s, k_s, v_s = (shard(t).requires_grad_() for t in (q, k, v))  # (1, H, T/P, D) zigzag
    if rank == 0:
        (a, b), (c, d) = position_ids(T).view(2, -1)[:, [0, -1]].tolist()  # the two chunks
        print(f"P={world_size} backend={dist.get_backend()} device={device} {args.dtype} "
              f"T={T} H={H} D={D}; zigzag: rank 0 holds positions {a}-{b} and {c}-{d}")
    for _ in range(2):  # the first step pays one-off start-up costs; time the second
        q_s.grad = k_s.grad = v_s.grad = None
        dist.barrier()
        start = time.perf_counter()
        out = ring_attention(q_s, k_s, v_s, causal=True)  # (1, H, T/P, D)
        out.backward(shard(grad_out))
    elapsed = torch.tensor([time.perf_counter() - start])
    dist.all_reduce(elapsed, op=dist.ReduceOp.MAX)  # a step lasts as long as the slowest rank
    if rank == 0:
        print(f"ring attention forward+backward: {1000 * elapsed.item():.1f} ms")
    if not args.check:
        return

    got = [unshard(t) for t in (out, q_s.grad, k_s.grad, v_s.grad)]  # full (1, H, T, D)
    ulysses_out = None
    if H % world_size == 0:
        ulysses_out = unshard(ulysses_attention(q_s.detach(), k_s.detach(), v_s.detach(),
                                                causal=True))
    if rank != 0:
        return
    q, k, v = (t.requires_grad_() for t in (q, k, v))
    ref = attnkit.attention(q, k, v, causal=True)
    ref.backward(grad_out)
    for name, a, b in zip(("out", "dq", "dk", "dv"), got, (ref, q.grad, k.grad, v.grad)):
        print(f"  {name}: max |ring - single process| = {(a - b).abs().max().item():.2e}")
    if ulysses_out is None:
        print(f"  (Ulysses skipped: {H} heads do not split over {world_size} ranks)")
    else:
        diff = (ulysses_out - got[0]).abs().max().item()
        print(f"  out: max |ulysses - ring| = {diff:.2e}")


def _local_rank(rank: int, world_size: int, port: int, args) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // world_size))
    dist.init_process_group("gloo", rank=rank, world_size=world_size,
                            timeout=timedelta(seconds=60))
    try:
        run(rank, world_size, args)
    finally:
        dist.destroy_process_group()


def main(argv=None) -> None:
    args = parse_args(argv)
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:  # launched by torchrun
        backend = args.backend
        if backend == "auto":
            backend = "nccl" if torch.cuda.is_available() else "gloo"
        dist.init_process_group(backend, timeout=timedelta(seconds=120))
        try:
            run(dist.get_rank(), dist.get_world_size(), args)
        finally:
            dist.destroy_process_group()
        return
    import socket

    with socket.socket() as s:  # let the OS pick a free port for the rendezvous
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    # spawn, not fork: portable (macOS, notebooks); costs a torch import per process.
    torch.multiprocessing.start_processes(_local_rank, args=(args.nproc, port, args),
                                          nprocs=args.nproc, start_method="spawn")


if __name__ == "__main__":
    main()
