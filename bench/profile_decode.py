"""Where a decode step's time goes: host time per call and GPU idle time, per mode, from torch.profiler.

In: the decoder bench's model flags (`python -m bench.profile_decode --help`). Out: a JSON record
(--out) and a Markdown table on stdout with, per mode and T: the host time to issue one call
(perf_counter around the call, the GPU idle before it), the GPU busy time (union of kernel
intervals), the GPU idle time inside the call (its kernel span minus busy), kernels and graph
launches per call.

Example::

    python -m bench.profile_decode --tokens 1,8 --out bench/results/profile.json   # GPU
    python -m bench.profile_decode --quick --out /tmp/p.json                       # CPU smoke

Note: one process, modes built one after another on one model and KV cache, as bench/decoder.py.
"""
from __future__ import annotations

import argparse
import collections
import cProfile
import dataclasses
import pstats
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

from bench import decoder
from bench.cli import names_from
from bench.modes import MODE_NAMES

__all__ = ["main", "profile_mode"]

DEFAULT_MODES = "piecewise,piecewise-full-decode,inductor-cudagraph"


def host_breakdown(runner: Any, ids: torch.Tensor, positions: torch.Tensor, device: torch.device, calls: int,
                   top: int = 25) -> list[dict[str, Any]]:
    """cProfile of ``calls`` calls: the ``top`` functions by own (exclusive) host time, per call.

    cProfile adds a fixed cost per Python call, so Python-heavy rows read high; use it to rank
    where host time goes, and the un-profiled ``host_us`` for the total.
    """
    profiler = cProfile.Profile()
    for _ in range(calls):  # the GPU idle before each call, as for host_us: no launch queue back-pressure
        decoder.measure.synchronize(device)
        profiler.enable()
        runner(ids, positions)
        profiler.disable()
    decoder.measure.synchronize(device)
    stats = pstats.Stats(profiler).stats  # (file, line, name) -> (prim calls, calls, tottime, cumtime, callers)
    rows = sorted(stats.items(), key=lambda item: item[1][2], reverse=True)[:top]
    return [{"function": f"{Path(file).name}:{line}({name})" if file != "~" else name,
             "calls_per_call": n / calls, "own_us_per_call": own / calls * 1e6, "cum_us_per_call": cum / calls * 1e6}
            for (file, line, name), (_, n, own, cum, _) in rows]


def profile_mode(runner: Any, make_inputs: Any, num_tokens: int, device: torch.device, calls: int,
                 breakdown: bool = False) -> dict[str, Any]:
    """Host and GPU timings of ``calls`` calls at ``num_tokens`` (synchronized between calls)."""
    ids, positions = make_inputs(num_tokens)
    for _ in range(5):
        runner(ids, positions)
    decoder.measure.synchronize(device)
    host = []
    for _ in range(calls):  # issue time only: the GPU is idle when the call starts
        decoder.measure.synchronize(device)
        start = time.perf_counter()
        runner(ids, positions)
        host.append((time.perf_counter() - start) * 1e6)
    decoder.measure.synchronize(device)
    record: dict[str, Any] = {"tokens": num_tokens, "host_us_median": statistics.median(host),
                              "host_us_p90": sorted(host)[int(0.9 * (len(host) - 1))]}
    if breakdown:
        record["host_breakdown"] = host_breakdown(runner, ids, positions, device, calls)
    if device.type != "cuda":
        return record
    activities = [torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]
    windows = []
    with torch.profiler.profile(activities=activities) as prof:
        for index in range(calls):
            torch.cuda.synchronize(device)
            with torch.profiler.record_function(f"call_{index}"):
                runner(ids, positions)
            torch.cuda.synchronize(device)
    events = prof.events()
    calls_cpu = _call_ranges(events)
    kernels = sorted((e.time_range.start, e.time_range.end, e.name) for e in events if _is_gpu_work(e))
    launches = [e.time_range.start for e in events if e.name in ("cudaGraphLaunch", "cuGraphLaunch")]
    for index, (start, _) in enumerate(calls_cpu):
        end = calls_cpu[index + 1][0] if index + 1 < len(calls_cpu) else float("inf")
        mine = [k for k in kernels if start <= k[0] < end]
        if not mine:
            continue
        busy, cursor = 0.0, mine[0][0]
        for k_start, k_end, _ in mine:
            busy += max(0.0, k_end - max(k_start, cursor))
            cursor = max(cursor, k_end)
        span = cursor - mine[0][0]
        windows.append({"busy": busy, "idle": span - busy, "span": span, "kernels": len(mine),
                        "graph_launches": sum(start <= t < end for t in launches),
                        # the call's latency split: host time before the GPU's first kernel, then the span
                        "first_kernel": mine[0][0] - start, "end": cursor - start,
                        "idle_by_decile": _idle_by_decile(mine)})
    if calls_cpu:  # the kernels of the last call by name: what to diff between two modes' code
        start = calls_cpu[-1][0]
        record["kernel_names"] = dict(collections.Counter(k[2] for k in kernels if k[0] >= start).most_common())
        durations: collections.Counter[str] = collections.Counter()
        for k_start, k_end, name in kernels:  # GPU µs per kernel name, per call: where two modes' GPU time differs
            durations[name] += (k_end - k_start) / len(calls_cpu)
        record["kernel_us_per_call"] = {name: round(us, 2) for name, us in durations.most_common()}
        # Host µs per call in each CUDA runtime/driver call (cudaGraphLaunch, cudaLaunchKernel,
        # cudaMemcpyAsync, ...): a call that waits for the GPU (a copy from pageable memory, a
        # cudaFree, a full launch queue) stands out here, and then the host is no longer ahead.
        api: collections.Counter[str] = collections.Counter()
        for e in events:
            if e.device_type == torch.autograd.DeviceType.CPU and e.name.startswith("cu"):
                api[e.name] += (e.time_range.end - e.time_range.start) / len(calls_cpu)
        record["runtime_api_us_per_call"] = {name: round(us, 2) for name, us in api.most_common(12)}
    for key in ("busy", "idle", "span", "kernels", "graph_launches", "first_kernel", "end"):
        record[f"gpu_{key}{'_us' if key not in ('kernels', 'graph_launches') else ''}_median"] = (
            statistics.median(w[key] for w in windows) if windows else None)
    if windows:  # where in the call the GPU waits: idle µs per tenth of the span, median over calls
        record["gpu_idle_us_by_decile"] = [round(statistics.median(w["idle_by_decile"][i] for w in windows), 1)
                                           for i in range(10)]
    return record


def _is_gpu_work(event: Any) -> bool:
    """A kernel or memcpy/memset on the GPU, not a mirrored annotation.

    The profiler mirrors each record_function range on the GPU (gpu_user_annotation): our
    ``call_<i>`` and the ranges torch opens itself. Counted as work, one such range would span
    many kernels and their gaps.
    """
    return (event.device_type == torch.autograd.DeviceType.CUDA and not getattr(event, "is_user_annotation", False)
            and not event.name.startswith("call_"))


def _call_ranges(events: Any) -> list[tuple[float, float]]:
    """(start, end) of each profiled call on the host: our ``call_<i>`` ranges on the CPU only.

    The profiler mirrors them on the GPU too, starting when the GPU reaches them. Up to
    ``acf25a4`` those mirrors were taken as calls as well: every call counted twice, so the
    kernel µs per call read half, and the call windows began at the GPU's first kernel (the
    "µs to the first kernel" column read 0). Busy and idle time were right: a window holding
    no kernel is skipped.
    """
    return sorted((e.time_range.start, e.time_range.end) for e in events
                  if e.name.startswith("call_") and e.device_type == torch.autograd.DeviceType.CPU)


def _idle_by_decile(kernels: list[tuple[float, float, str]]) -> list[float]:
    """GPU idle µs in each tenth of the kernels' span (kernels sorted by start)."""
    first, last = kernels[0][0], max(k[1] for k in kernels)
    width = max((last - first) / 10, 1e-9)
    idle, cursor = [0.0] * 10, first
    for k_start, k_end, _ in kernels:
        if k_start > cursor:  # a gap: its overlap with each tenth
            for decile in range(10):
                low, high = first + decile * width, first + (decile + 1) * width
                idle[decile] += max(0.0, min(k_start, high) - max(cursor, low))
        cursor = max(cursor, k_end)
    return idle


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.profile_decode", description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="CPU smoke: tiny model, emulated graphs")
    p.add_argument("--tokens", default="1,8", help="comma list of T")
    p.add_argument("--modes", default=DEFAULT_MODES, type=names_from(MODE_NAMES), help="comma list of bench modes")
    p.add_argument("--calls", type=int, default=50, help="profiled calls per (mode, T)")
    p.add_argument("--piecewise-option", action="append", default=[], metavar="KEY=VALUE",
                   help="extra torchpcg knob for the piecewise modes (repeatable), e.g. skip_module_guards=1")
    p.add_argument("--breakdown", action="store_true",
                   help="also run cProfile over the calls and report the functions with the most own host time")
    p.add_argument("--out", type=Path, required=True, help="JSON output path")
    args = p.parse_args(argv)
    tokens = tuple(int(t) for t in args.tokens.split(","))
    settings = decoder.script_settings(args.tokens, args.piecewise_option, quick=args.quick)
    results = decoder.script_record(
        settings, model=dataclasses.asdict(settings.model_config), dtype=str(settings.dtype), calls=args.calls,
        piecewise_options={k: str(v) for k, v in settings.piecewise_options.items()}, modes={})
    with torch.no_grad():
        ctx = decoder.prefilled_context(settings)
        results["modes"] = decoder.measure_modes(ctx, args.modes, lambda runner: [
            profile_mode(runner, ctx.make_inputs, t, settings.device, args.calls, args.breakdown) for t in tokens])
    decoder.write_script_record(args.out, results, markdown)
    return 0


def markdown(results: dict[str, Any]) -> str:
    lines = [f"Profile of one call, {results['device']}, torch {results['torch']}, commit `{results['commit']}`, "
             f"median of {results['calls']} calls", "",
             "| mode | T | host µs to issue | µs to the first kernel | µs to the last kernel's end | GPU busy µs | "
             "GPU idle µs in call | kernels | graph launches |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for name, rows in results["modes"].items():
        if isinstance(rows, dict):
            lines.append(f"| {name} | - | n/a: {rows['unavailable']} | | | | | | |")
            continue
        for row in rows:
            def cell(key: str) -> str:
                value = row.get(key)
                return "-" if value is None else f"{value:.0f}"
            lines.append(f"| {name} | {row['tokens']} | {cell('host_us_median')} | {cell('gpu_first_kernel_us_median')} | "
                         f"{cell('gpu_end_us_median')} | {cell('gpu_busy_us_median')} | "
                         f"{cell('gpu_idle_us_median')} | {cell('gpu_kernels_median')} | "
                         f"{cell('gpu_graph_launches_median')} |")
    deciles = [(name, row) for name, rows in results["modes"].items() if isinstance(rows, list)
               for row in rows if row.get("gpu_idle_us_by_decile")]
    if deciles:
        lines += ["", "GPU idle µs per tenth of the call's kernel span (where in the call the GPU waits):", "",
                  "| mode | T | " + " | ".join(f"{10 * i}-{10 * i + 10}%" for i in range(10)) + " |",
                  "|---|---:|" + "---:|" * 10]
        lines += [f"| {name} | {row['tokens']} | " + " | ".join(f"{v:.0f}" for v in row["gpu_idle_us_by_decile"]) + " |"
                  for name, row in deciles]
    for name, rows in results["modes"].items():
        for row in rows if isinstance(rows, list) else []:
            if "host_breakdown" not in row:
                continue
            lines += ["", f"Host time by function (cProfile, own time), {name}, T={row['tokens']}:", "",
                      "| function | calls per call | own µs per call | cumulative µs per call |", "|---|---:|---:|---:|"]
            lines += [f"| `{r['function']}` | {r['calls_per_call']:.1f} | {r['own_us_per_call']:.1f} | "
                      f"{r['cum_us_per_call']:.1f} |" for r in row["host_breakdown"]]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
