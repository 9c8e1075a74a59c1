"""Timing, memory and correctness measurements for one mode. No model or mode knowledge here.

In: a zero-argument call (or runner + inputs). Out: latencies in ms, memory in MiB, error numbers.
Method (see bench/README.md): synchronize, host clock around ONE call, synchronize; warmup calls
first; median and p90 over the repeats. This is the latency a caller sees, host overhead included.
"""
from __future__ import annotations

import dataclasses
import gc
import math
import statistics
import sys
import time
from collections.abc import Callable, Hashable, Mapping
from typing import Any, TypeVar

import torch

__all__ = [
    "Latency", "ErrorReport", "MemorySnapshot", "synchronize", "time_call", "time_calls", "time_sequence", "compare",
    "memory_snapshot", "reset_peak", "peak_allocated_mb", "activation_peak_mb", "activation_reserved_mb", "machine_speed",
    "host_op_us",
]

MIB = 1024 * 1024
K = TypeVar("K", bound=Hashable)


@dataclasses.dataclass(frozen=True)
class Latency:
    median_ms: float
    p90_ms: float
    min_ms: float
    repeats: int


@dataclasses.dataclass(frozen=True)
class ErrorReport:
    """out vs reference logits: max |diff|, ||diff|| / ||ref|| (float64), and whether within tol."""

    max_abs_diff: float
    rel_err: float
    ref_max_abs: float
    ok: bool


@dataclasses.dataclass(frozen=True)
class MemorySnapshot:
    allocated_mb: float
    reserved_mb: float


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_call(call: Callable[[], object], device: torch.device, warmup: int, repeats: int) -> Latency:
    """Median / p90 of `repeats` synchronized single calls after `warmup` untimed ones."""
    return time_calls({0: call}, device, warmup, repeats)[0]


def time_calls(calls: Mapping[K, Callable[[], object]], device: torch.device, warmup: int, repeats: int,
               rounds: int = 1) -> dict[K, Latency]:
    """`time_call` for each call, its `repeats` taken in `rounds` passes over all the calls.

    On a shared host a burst of noise lasts longer than one call: timed back to back, 20 calls of
    2 ms can all fall inside it and move that one cell by 25% (seen on an H200, see
    docs/benchmarks.md). Spread over rounds, a burst costs every call a few samples instead, and
    the median drops them.
    """
    if rounds < 1:
        raise ValueError(f"rounds={rounds}: expected >= 1")
    for call in calls.values():
        for _ in range(warmup):
            call()
    samples: dict[K, list[float]] = {key: [] for key in calls}
    for index in range(rounds):
        count = repeats // rounds + (index < repeats % rounds)
        for key, call in calls.items():
            for _ in range(count):
                synchronize(device)
                start = time.perf_counter()
                call()
                synchronize(device)
                samples[key].append((time.perf_counter() - start) * 1e3)
    return {key: Latency(statistics.median(times), _percentile(times, 90), min(times), repeats)
            for key, times in samples.items()}


def time_sequence(calls: list[Callable[[], object]], device: torch.device) -> float:
    """Seconds for all calls back to back (one synchronize at each end)."""
    synchronize(device)
    start = time.perf_counter()
    for call in calls:
        call()
    synchronize(device)
    return time.perf_counter() - start


def _percentile(values: list[float], percent: float) -> float:
    """Linear-interpolated percentile (numpy's default method) without numpy."""
    ordered = sorted(values)
    rank = (len(ordered) - 1) * percent / 100
    low, high = math.floor(rank), math.ceil(rank)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


def compare(output: torch.Tensor, reference: torch.Tensor, tol: float) -> ErrorReport:
    """Compare on the CPU in float64; NaN or Inf anywhere fails."""
    out = output.detach().to("cpu", torch.float64)
    ref = reference.detach().to("cpu", torch.float64)
    if out.shape != ref.shape:
        return ErrorReport(math.inf, math.inf, float(ref.abs().max()), False)
    diff = out - ref
    ref_norm = float(ref.norm())
    rel = float(diff.norm()) / ref_norm if ref_norm > 0 else float(diff.norm())
    max_abs = float(diff.abs().max()) if diff.numel() else 0.0
    finite = bool(torch.isfinite(out).all())
    ok = finite and math.isfinite(rel) and rel <= tol
    return ErrorReport(max_abs if finite else math.inf, rel if finite else math.inf, float(ref.abs().max()), ok)


def memory_snapshot(device: torch.device) -> MemorySnapshot | None:
    if device.type != "cuda":
        return None
    return MemorySnapshot(torch.cuda.memory_allocated(device) / MIB, torch.cuda.memory_reserved(device) / MIB)


def reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def activation_peak_mb(call: Callable[[], object], device: torch.device) -> float | None:
    """MiB allocated at the peak of ``call`` above what was allocated before it (its activations
    and outputs; weights and caches already live are not counted). None on CPU."""
    return _peak_of(call, device, torch.cuda.memory_allocated, torch.cuda.max_memory_allocated)


def activation_reserved_mb(call: Callable[[], object], device: torch.device) -> float | None:
    """MiB of allocator segments ``call`` needs on its own: it runs in a private memory pool
    (``torch.cuda.MemPool``), as a CUDA graph's allocations do, so it cannot borrow free blocks in
    the segments that hold the weights and caches. Graph memory is counted in whole segments too,
    so the two compare like for like. (From the shared pool after ``empty_cache`` the H200 bench
    read 2 MiB for a call whose tensors peak at 38 MiB: it fitted in the weights' segments.)
    None on CPU or where torch has no ``MemPool``."""
    segments = private_pool_segments(call, device)
    return None if segments is None else sum(segment["total_size"] for segment in segments) / MIB


def private_pool_segments(call: Callable[[], object], device: torch.device) -> list[dict] | None:
    """The allocator segments (``torch.cuda.MemPool.snapshot()`` entries) that ``call`` makes in a
    private memory pool of its own, with its output still alive. Segments only grow in a pool, so
    they hold the call's peak. None on CPU or where torch has no ``MemPool``."""
    api = _pool_api(device)
    if api is None:
        return None
    pool_type, use_pool, index = api
    synchronize(device)
    pool = pool_type()
    try:
        with use_pool(pool, index):
            output = call()
            synchronize(device)
        segments = pool.snapshot()
        del output
    except (AttributeError, RuntimeError, TypeError, ValueError) as err:  # an older MemPool API: no second yardstick
        print(f"eager reserved peak not measured: {type(err).__name__}: {err}", file=sys.stderr)
        return None
    finally:
        del pool
    gc.collect()
    torch.cuda.empty_cache()
    return segments


def stream_workspace_mb(device: torch.device, dtype: torch.dtype) -> float | None:
    """MiB that a stream's first matmul keeps for good: cuBLAS's workspace for that stream (32 MiB
    on Hopper by default). Every graph mode captures on a side stream, so its first captured
    matmul puts one such workspace in the graph pool; eager's stream made its own long before.
    Measured as one matmul on a side stream in a private pool, with cuBLAS's cached workspaces
    cleared around it (call before any graph is captured). None on CPU or without ``MemPool``."""
    api, clear = _pool_api(device), getattr(torch._C, "_cuda_clearCublasWorkspaces", None)
    if api is None or clear is None:
        return None
    pool_type, use_pool, index = api
    matrix = torch.ones(64, 64, device=device, dtype=dtype)
    synchronize(device)
    clear()
    pool, stream = pool_type(), torch.cuda.Stream(device=device)
    try:
        with torch.cuda.stream(stream), use_pool(pool, index):
            product = matrix @ matrix
            stream.synchronize()
            del product
        active = sum(segment["active_size"] for segment in pool.snapshot())
    except (AttributeError, RuntimeError, TypeError, ValueError) as err:
        print(f"stream workspace not measured: {type(err).__name__}: {err}", file=sys.stderr)
        return None
    finally:
        clear()  # the workspace goes back to the pool, which can then go
        del pool
    gc.collect()
    torch.cuda.empty_cache()
    return active / MIB


def _pool_api(device: torch.device) -> tuple[Any, Any, int] | None:
    """(``torch.cuda.MemPool``, ``torch.cuda.use_mem_pool``, device index) on CUDA with a torch that
    has private memory pools; None otherwise."""
    pool_type, use_pool = getattr(torch.cuda, "MemPool", None), getattr(torch.cuda, "use_mem_pool", None)
    if device.type != "cuda" or pool_type is None or use_pool is None:
        return None
    return pool_type, use_pool, torch.cuda.current_device() if device.index is None else device.index


def _peak_of(call: Callable[[], object], device: torch.device, now: Callable[[torch.device], int],
             peak: Callable[[torch.device], int]) -> float | None:
    if device.type != "cuda":
        return None
    synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    before = now(device)
    output = call()
    synchronize(device)
    del output
    return (peak(device) - before) / MIB


def peak_allocated_mb(device: torch.device) -> float | None:
    return torch.cuda.max_memory_allocated(device) / MIB if device.type == "cuda" else None


def host_op_us(device: torch.device) -> float:
    """Host µs to issue one small in-place op: median of 5 x 1000 calls (about 50 ms on a GPU host).

    The bench takes it once per run and again just before each mode is timed: on shared cloud machines it
    drifted by 20 % between two back-to-back runs on one machine (7.6 and 9.2 µs), which moves a
    mode's latency by its host share and so the ratios between modes timed minutes apart.
    """
    small = torch.zeros(1, 2048, device=device)
    samples = []
    for _ in range(5):
        synchronize(device)
        start = time.perf_counter()
        for _ in range(1000):
            small.add_(1)
        samples.append((time.perf_counter() - start) * 1e3)  # ms per 1000 calls = µs per call
    synchronize(device)
    return statistics.median(samples)


def machine_speed(device: torch.device) -> dict[str, float | None]:
    """Two numbers that say how fast this machine is, so runs on different machines can be compared.

    ``host_op_us``: ``host_op_us(device)``.
    ``gpu_matmul_ms``: device time of 20 bf16 matmuls of 2048 x 2048 (CUDA events; None on CPU).
    Two H200s this bench ran on differed by 2x in host op time (8.5 vs 16.7 µs) and 1.6x in GPU
    busy time per whole-model graph call (1675 vs 2738 µs): compare ratios across runs only when
    these match.
    """
    speed: dict[str, float | None] = {"host_op_us": host_op_us(device), "gpu_matmul_ms": None}
    if device.type == "cuda":
        a = torch.randn(2048, 2048, device=device, dtype=torch.bfloat16)
        for _ in range(3):
            a @ a
        begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        begin.record()
        for _ in range(20):
            a @ a
        end.record()
        synchronize(device)
        speed["gpu_matmul_ms"] = begin.elapsed_time(end)
    return speed
