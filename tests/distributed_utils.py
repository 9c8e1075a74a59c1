"""Run a test body in N spawned processes, one rank each, over a localhost process group.

In: a top-level (picklable) function ``fn(rank, world_size, *args)``. Out: the list of its return
values, index = rank. A child's exception is re-raised in the test with the child's traceback text;
a hang is cut at ``timeout_s`` and every child is killed.

Example:
    >>> def _rank_sum(rank, world_size):
    ...     t = torch.tensor([rank + 1.0]); torch.distributed.all_reduce(t); return t.item()
    >>> run_distributed(_rank_sum, 2)
    [3.0, 3.0]

Note: ``fn`` must live at module top level (the "spawn" start method pickles it by name), and its
results must be picklable (plain tensors, numbers, dicts). Children start a fresh interpreter, so
pytest fixtures do not run there: reset Dynamo or stats inside ``fn`` if it matters.
"""
from __future__ import annotations

import os
import pickle
import queue
import socket
import time
import traceback
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

__all__ = ["free_port", "run_distributed"]


def free_port() -> int:
    """A localhost TCP port that was free a moment ago (bound to port 0, then released)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _child(rank: int, world_size: int, backend: str, port: int, results: Any, fn: Callable, args: tuple) -> None:
    """One rank: join the group, run fn, put (rank, ok, value-or-traceback) on the queue."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    try:
        if backend == "nccl":
            torch.cuda.set_device(rank)  # one GPU per rank; NCCL needs the device before the group
        dist.init_process_group(backend, rank=rank, world_size=world_size)
        # Plain pickle bytes: torch's queue pickler would share tensors through the child's shared
        # memory, which is gone once the child exits before the test reads the result.
        results.put((rank, True, pickle.dumps(fn(rank, world_size, *args))))
    except BaseException:  # noqa: BLE001 - every failure, even SystemExit, must reach the test
        results.put((rank, False, traceback.format_exc()))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def run_distributed(fn: Callable, world_size: int, *args: Any, backend: str = "gloo", timeout_s: float = 240) -> list:
    """Run ``fn(rank, world_size, *args)`` in ``world_size`` spawned processes; results by rank.

    Raises RuntimeError with the failing ranks' tracebacks, or TimeoutError after ``timeout_s``
    seconds (children are killed either way before it returns or raises).
    """
    ctx = mp.get_context("spawn")
    results = ctx.Queue()  # a Queue, not a SimpleQueue: get() takes a timeout
    port = free_port()
    procs = [ctx.Process(target=_child, args=(rank, world_size, backend, port, results, fn, args), daemon=True)
             for rank in range(world_size)]
    for proc in procs:
        proc.start()
    try:
        values = _collect(results, procs, world_size, time.monotonic() + timeout_s, timeout_s)
    except BaseException:
        _stop(procs, grace_s=0.0)  # peers of a failed rank block in collectives: no point waiting
        raise
    _stop(procs, grace_s=10.0)  # ranks tear the group down after reporting; give them time
    return values


def _stop(procs: list, grace_s: float) -> None:
    """Join every child within ``grace_s`` seconds in all, then kill what is left."""
    deadline = time.monotonic() + grace_s
    for proc in procs:
        proc.join(timeout=max(0.0, deadline - time.monotonic()))
        if proc.is_alive():
            proc.kill()
            proc.join()


def _collect(results: Any, procs: list, world_size: int, deadline: float, timeout_s: float) -> list:
    """Wait for one message per rank; fail fast on a child error or a child that died silently."""
    values: dict[int, Any] = {}
    errors: dict[int, str] = {}
    while len(values) + len(errors) < world_size:
        if time.monotonic() > deadline:
            missing = sorted(set(range(world_size)) - values.keys() - errors.keys())
            raise TimeoutError(f"ranks {missing} still running after {timeout_s:.0f} s; killed")
        try:
            rank, ok, value = results.get(timeout=0.5)
        except queue.Empty:
            _check_alive(procs, values.keys() | errors.keys(), results)
            continue
        if ok:
            values[rank] = pickle.loads(value)
        else:
            errors[rank] = value
        if errors:  # peers of a failed rank usually block in a collective: do not wait for them
            break
    if errors:
        text = "\n".join(f"--- rank {rank} ---\n{tb}" for rank, tb in sorted(errors.items()))
        raise RuntimeError(f"{len(errors)} of {world_size} ranks failed:\n{text}")
    return [values[rank] for rank in range(world_size)]


def _check_alive(procs: list, reported: Any, results: Any) -> None:
    """A rank that exited without reporting (segfault, os._exit) fails the run."""
    for rank, proc in enumerate(procs):
        if rank not in reported and proc.exitcode is not None and results.empty():
            time.sleep(1.0)  # its result may be in flight: a child flushes the queue before it exits
            if results.empty():
                raise RuntimeError(f"rank {rank} exited with code {proc.exitcode} before reporting a result")
