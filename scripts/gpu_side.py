"""How much of a call's latency is the GPU's own work, and how much is the GPU waiting for the host.

For each bench mode and T, two timings of the same call, in interleaved rounds:

* ``latency``: the GPU idle when the call starts (as in the bench's synchronized calls); CUDA
  events around the call. The GPU waits whenever the host has not queued the next work yet.
* ``queued``: the same call queued behind a GPU sleep longer than the host needs to issue it, so
  every kernel and graph is already queued when the GPU gets to them: the call's span on the GPU
  alone (kernels, graph launches and the gaps between them that the GPU itself makes).

``latency - queued`` is what host work costs the call; ``queued`` minus the whole-model graph's
``queued`` is what more kernels and launches cost on the GPU, whatever the host does. A lever that
only makes the host faster can win at most the first.

    python scripts/gpu_side.py --tokens 1,8,32,128,512 --out /tmp/gpu-side.json   # GPU only
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

from bench import decoder
from bench.cli import names_from
from bench.modes import MODE_NAMES

DEFAULT_MODES = "inductor-cudagraph,piecewise,piecewise-full-decode"


def _sleep_cycles(device: torch.device, milliseconds: float) -> int:
    """GPU clock cycles that ``torch.cuda._sleep`` spins for about ``milliseconds``."""
    cycles = 1_000_000
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda.synchronize(device)
    start.record()
    torch.cuda._sleep(cycles)
    end.record()
    torch.cuda.synchronize(device)
    return int(cycles * milliseconds / max(start.elapsed_time(end), 1e-3))


def _one_call(runner: Any, ids: torch.Tensor, positions: torch.Tensor,
              events: tuple[torch.cuda.Event, torch.cuda.Event], device: torch.device) -> tuple[float, float]:
    """(host µs to issue one call, µs between CUDA events around it on the GPU)."""
    start, end = events
    begun = time.perf_counter()
    start.record()
    runner(ids, positions)
    end.record()
    issued = (time.perf_counter() - begun) * 1e6
    torch.cuda.synchronize(device)
    return issued, start.elapsed_time(end) * 1e3


def time_mode(runner: Any, ids: torch.Tensor, positions: torch.Tensor, device: torch.device, rounds: int,
              sleep_cycles: int) -> dict[str, float]:
    """Median µs of ``latency``, ``queued`` and the host's time to issue the call."""
    for _ in range(5):
        runner(ids, positions)
    idle, behind = [], []  # (issue µs, GPU µs) per call: the GPU idle at the start, or busy with a sleep
    events = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    for _ in range(rounds):
        torch.cuda.synchronize(device)
        idle.append(_one_call(runner, ids, positions, events, device))
        torch.cuda._sleep(sleep_cycles)
        behind.append(_one_call(runner, ids, positions, events, device))
    (issue, latency), (issue_queued, queued) = zip(*idle), zip(*behind)
    return {"latency_us": statistics.median(latency), "queued_us": statistics.median(queued),
            "issue_us": statistics.median(issue), "issue_us_max": max(issue),
            "issue_queued_us": statistics.median(issue_queued), "issue_queued_us_max": max(issue_queued)}


def launch_costs(device: torch.device, sleep_cycles: int, launches: int = 200) -> dict[str, float]:
    """Host µs per small kernel launch and per graph replay, with the GPU idle and with it busy
    (behind a sleep): whether issuing work gets slower while the GPU runs."""
    x = torch.zeros(16, device=device)
    graph = torch.cuda.CUDAGraph()
    stream = torch.cuda.Stream(device)
    stream.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(stream):
        x.add_(1)
        with torch.cuda.graph(graph, stream=stream):
            for _ in range(8):
                x.add_(1)
    torch.cuda.current_stream(device).wait_stream(stream)
    work = {"kernel": lambda: x.add_(1), "graph replay": graph.replay}
    out: dict[str, float] = {}
    for name, call in work.items():
        for busy in (False, True):
            samples = []
            for _ in range(5):
                torch.cuda.synchronize(device)
                if busy:
                    torch.cuda._sleep(sleep_cycles)
                begun = time.perf_counter()
                for _ in range(launches):
                    call()
                samples.append((time.perf_counter() - begun) * 1e6 / launches)
            torch.cuda.synchronize(device)
            out[f"{name}, GPU {'busy' if busy else 'idle'}"] = min(samples)
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python scripts/gpu_side.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--tokens", default="1,8,32,128,512", help="comma list of T")
    p.add_argument("--modes", default=DEFAULT_MODES, type=names_from(MODE_NAMES), help="comma list of bench modes")
    p.add_argument("--rounds", type=int, default=30, help="timed calls per (mode, T) and kind")
    p.add_argument("--sleep-ms", type=float, default=15.0, help="GPU sleep before a queued call; above the issue time")
    p.add_argument("--piecewise-option", action="append", default=[], metavar="KEY=VALUE",
                   help="extra torchpcg knob for the piecewise modes (repeatable)")
    p.add_argument("--out", type=Path, required=True, help="JSON output path")
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        print("gpu_side.py needs a CUDA device", file=sys.stderr)
        return 2
    settings = decoder.script_settings(args.tokens, args.piecewise_option)
    tokens = tuple(int(t) for t in args.tokens.split(","))
    sleep_cycles = _sleep_cycles(settings.device, args.sleep_ms)
    results = decoder.script_record(settings, rounds=args.rounds, sleep_ms=args.sleep_ms,
                                    host_op_us=decoder.measure.host_op_us(settings.device), modes={})
    results["launch_us"] = launch_costs(settings.device, sleep_cycles)
    with torch.no_grad():
        ctx = decoder.prefilled_context(settings)
        inputs = {t: ctx.make_inputs(t) for t in tokens}
        results["modes"] = decoder.measure_modes(ctx, args.modes, lambda runner: {
            t: time_mode(runner, *inputs[t], settings.device, args.rounds, sleep_cycles) for t in tokens})
    decoder.write_script_record(args.out, results, markdown)
    return 0


def markdown(results: dict[str, Any]) -> str:
    modes = {name: rows for name, rows in results["modes"].items() if "unavailable" not in rows}
    reference = modes.get("inductor-cudagraph")
    lines = [f"GPU side of a call, {results['device']}, torch {results['torch']}, commit `{results['commit']}`, "
             f"median of {results['rounds']} calls each; host {results['host_op_us']:.1f} µs per small op", "",
             "| mode | T | latency µs | queued µs (GPU alone) | host-bound µs | issue µs | issue µs, queued | "
             "queued - whole graph's queued µs |", "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for name, rows in modes.items():
        for t, row in rows.items():
            extra = "-" if reference is None else f"{row['queued_us'] - reference[t]['queued_us']:.0f}"
            lines.append(f"| {name} | {t} | {row['latency_us']:.0f} | {row['queued_us']:.0f} | "
                         f"{row['latency_us'] - row['queued_us']:.0f} | {row['issue_us']:.0f} | {row['issue_queued_us']:.0f} | {extra} |")
    lines += ["", "Host µs per launch: " + ", ".join(f"{k} {v:.1f}" for k, v in results.get("launch_us", {}).items())]
    lines += ["", f"A queued call is behind a {results['sleep_ms']:.0f} ms GPU sleep; it is valid while the issue "
              "time stays below that (max issue µs per mode and T is in the JSON)."]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
