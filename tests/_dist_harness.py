"""Run a function on P local gloo processes and collect what every rank returned.

Processes are started with ``fork`` (about 0.1 s for 4 ranks, against seconds for ``spawn``,
which re-imports torch in each; Python 3.14 changes the Linux default, so it is named here).
Each rank uses one thread, talks over 127.0.0.1 and has a process-group timeout, and the
parent reads results with a deadline, so a hang fails in seconds instead of stalling the suite.

Results travel as plain Python/NumPy objects: torch tensors would go through shared-memory
file descriptors that die with the child.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import queue as queue_module
import socket
import time
import traceback
from datetime import timedelta

import torch
import torch.distributed as dist


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank_main(rank, fn, world_size, port, results, pg_timeout_s, args):
    torch.set_num_threads(1)  # P ranks share 2 cores; more threads only thrash
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    try:
        dist.init_process_group("gloo", rank=rank, world_size=world_size,
                                timeout=timedelta(seconds=pg_timeout_s))
        results.put((rank, "ok", fn(rank, world_size, *args)))
    except BaseException as err:  # report everything: the parent decides what was expected
        results.put((rank, "error", f"{type(err).__name__}: {err}\n{traceback.format_exc()}"))
    finally:
        # Closing our sockets is what tells the other ranks we are gone.
        if dist.is_initialized():
            dist.destroy_process_group()


def run_ranks(fn, world_size: int, *args, timeout_s: float = 40.0, pg_timeout_s: float = 30.0):
    """Run ``fn(rank, world_size, *args)`` on ``world_size`` forked gloo ranks.

    Returns:
        A list indexed by rank of ``("ok", return value)`` or ``("error", message)``.

    Raises:
        TimeoutError: some rank reported nothing within ``timeout_s`` (it is then killed).
    """
    ctx = mp.get_context("fork")
    results = ctx.Queue()
    procs = torch.multiprocessing.start_processes(
        _rank_main, args=(fn, world_size, free_port(), results, pg_timeout_s, args),
        nprocs=world_size, join=False, start_method="fork")
    outcome, deadline = {}, time.monotonic() + timeout_s
    try:
        while len(outcome) < world_size:
            try:
                rank, status, payload = results.get(timeout=max(0.1, deadline - time.monotonic()))
            except queue_module.Empty:
                missing = sorted(set(range(world_size)) - set(outcome))
                raise TimeoutError(f"ranks {missing} of {world_size} reported nothing within "
                                   f"{timeout_s} s (hung?); got {outcome}") from None
            outcome[rank] = (status, payload)
    finally:
        for proc in procs.processes:
            proc.join(timeout=5)
            if proc.is_alive():
                proc.kill()
                proc.join()
    return [outcome[r] for r in range(world_size)]


def values(outcome) -> list:
    """The return values of ``run_ranks``; fail with every rank's error if any raised."""
    errors = [f"rank {r}: {payload}" for r, (status, payload) in enumerate(outcome)
              if status != "ok"]
    if errors:
        raise AssertionError("\n".join(errors))
    return [payload for _, payload in outcome]
