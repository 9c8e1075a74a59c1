"""Where a full-decode call's host time goes, layer by layer, on the bench's decoder.

Each layer is one call path, from the innermost out, timed on its own (the GPU idle when it
starts, as in the bench's synchronized calls):

* ``replay``: the full graph's ``replay()`` alone (the floor: one cudaGraphLaunch);
* ``copy+replay``: the input copies into the graph's static buffers, then the replay: what a
  hand-written loop around a captured graph does (the bench's ``inductor-cudagraph`` does this);
* ``runner``: the full graph's ``PieceRunner`` (plan lookup, copies, replay);
* ``runtime``: ``Runtime.__call__`` with the arguments Dynamo passes it (parameters included):
  locks, token count, the static-address check, the route to the full graph, counters;
* ``dynamo code``: Dynamo's compiled bytecode called directly (what a direct call runs): loads
  ~115 parameters, calls the runtime through Dynamo's wrapper;
* ``torchpcg.compile``: the user's call: the wrapper around ``dynamo code``, with Dynamo's guards
  checked first (``guarded_direct``, the default) or only the call key (``--piecewise-option
  skip_guard_check=1``);
* ``through Dynamo``: the ``torch.compile`` function (frame hook and guards), no torchpcg wrapper:
  what the default path adds to ``dynamo code``.

Two numbers per layer: ``issue`` (host µs until the call returns) and ``latency`` (until the GPU
is done: what the bench times). A layer's cost is its difference to the layer inside it. Layers
are timed in interleaved rounds, so a drift of the host's speed falls on all of them alike.

    python scripts/host_layers.py --tokens 1,8 --out /tmp/layers.json      # GPU: the bench's decoder
    python scripts/host_layers.py --piecewise-option skip_guard_check=1 --out /tmp/layers-unguarded.json
    python scripts/host_layers.py --quick --out /tmp/layers.json           # CPU smoke, emulated graphs
"""
from __future__ import annotations

import argparse
import gc
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

import torchpcg
from bench import decoder
from torchpcg.runtime import CallState, Runtime, _copy_inputs  # internals: this script times them one by one


def _record_runtime_args(compiled: Any, args: tuple[Any, ...]) -> tuple[Runtime, tuple[Any, ...]]:
    """The runtime Dynamo's code calls and the arguments it passes, from one call."""
    seen: list[tuple[Runtime, tuple[Any, ...]]] = []
    real = Runtime.__call__

    def spy(self: Runtime, *inner: Any) -> Any:
        seen.append((self, inner))
        return real(self, *inner)

    Runtime.__call__ = spy  # type: ignore[method-assign]
    try:
        compiled(*args)
    finally:
        Runtime.__call__ = real  # type: ignore[method-assign]
    return seen[-1]


def layers_for(compiled: Any, args: tuple[Any, ...], num_tokens: int) -> dict[str, Callable[[], Any]]:
    """The call paths of a warmed-up full-decode model at ``num_tokens``, innermost first."""
    runtime, inner = _record_runtime_args(compiled, args)
    full = runtime.full
    layers: dict[str, Callable[[], Any]] = {}
    if full is not None and full.runner.captured.get(num_tokens) is not None:
        captured = full.runner.captured[num_tokens]
        plan = captured.plans[num_tokens]
        graph = captured.graph

        def copy_replay() -> None:
            _copy_inputs(plan.zero_whole, plan.copies, inner)
            graph.replay()

        def runner() -> Any:
            runtime.state = CallState(bucket=num_tokens, num_tokens=num_tokens)
            try:
                return full.runner(*inner)
            finally:
                runtime.state = CallState()

        layers.update({"replay": graph.replay, "copy+replay": copy_replay, "runner": runner})
    layers["runtime"] = lambda: runtime(*inner)
    direct = getattr(compiled, "_direct", None)
    if direct is not None:
        layers["dynamo code"] = lambda: direct(args, {})
    layers["torchpcg.compile"] = lambda: compiled(*args)  # the wrapper around "dynamo code"
    layers["through Dynamo"] = lambda: compiled.monitor(*args)  # frame hook and guards, no wrapper
    return layers


def time_layers(layers: dict[str, Callable[[], Any]], device: torch.device, rounds: int,
                calls: int) -> dict[str, dict[str, float]]:
    """Median issue and latency µs per layer over ``rounds`` interleaved rounds of ``calls`` calls."""
    issue: dict[str, list[float]] = {name: [] for name in layers}
    latency: dict[str, list[float]] = {name: [] for name in layers}
    for fn in layers.values():  # warm: plans built, caches filled
        for _ in range(3):
            fn()
    gc.collect()
    gc.disable()
    try:
        for _ in range(rounds):
            for name, fn in layers.items():
                for _ in range(calls):
                    decoder.measure.synchronize(device)
                    start = time.perf_counter()
                    fn()
                    issued = time.perf_counter()
                    decoder.measure.synchronize(device)
                    done = time.perf_counter()
                    issue[name].append((issued - start) * 1e6)
                    latency[name].append((done - start) * 1e6)
    finally:
        gc.enable()
    return {name: {"issue_us": statistics.median(issue[name]), "issue_us_min": min(issue[name]),
                   "latency_us": statistics.median(latency[name]), "latency_us_min": min(latency[name])}
            for name in layers}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python scripts/host_layers.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="CPU smoke: tiny model, emulated graphs")
    p.add_argument("--tokens", default="1,8", help="comma list of T (each <= full_max_size)")
    p.add_argument("--rounds", type=int, default=10, help="interleaved rounds")
    p.add_argument("--calls", type=int, default=20, help="calls per layer per round")
    p.add_argument("--piecewise-option", action="append", default=[], metavar="KEY=VALUE",
                   help="extra torchpcg knob (repeatable)")
    p.add_argument("--out", type=Path, required=True, help="JSON output path")
    args = p.parse_args(argv)
    tokens = tuple(int(t) for t in args.tokens.split(","))
    settings = decoder.script_settings(args.tokens, args.piecewise_option, quick=args.quick)
    options = {**settings.piecewise_options, "cudagraph_mode": "full_and_piecewise",
               "capture_sizes": sorted(set(tokens) | {max(tokens)})}
    results = decoder.script_record(settings, rounds=args.rounds, calls=args.calls,
                                    options={k: str(v) for k, v in options.items()}, tokens={})
    with torch.no_grad():
        ctx = decoder.prefilled_context(settings)
        model, kv_cache = ctx.model, ctx.kv_cache
        compiled = torchpcg.compile(model, token_inputs={"input_ids": 0, "positions": 0}, **options)
        calls = {num_tokens: (*ctx.make_inputs(num_tokens), kv_cache) for num_tokens in tokens}
        for num_tokens in sorted(tokens, reverse=True):  # compile, warm-up, capture, first direct call
            for _ in range(4):
                compiled(*calls[num_tokens])
        for num_tokens, call in calls.items():
            results["tokens"][num_tokens] = time_layers(layers_for(compiled, call, num_tokens), settings.device,
                                                        args.rounds, args.calls)
        results["direct_calls"], results["guarded_calls"] = compiled.direct_calls, compiled.guarded_calls
        results["host_op_us"] = decoder.measure.host_op_us(settings.device)
    decoder.write_script_record(args.out, results, markdown)
    return 0


def markdown(results: dict[str, Any]) -> str:
    lines = [f"Host layers of a full-decode call, {results['device']}, torch {results['torch']}, commit "
             f"`{results['commit']}`; median (min) µs of {results['rounds']} x {results['calls']} calls; "
             f"host {results['host_op_us']:.1f} µs per small op; options {results['options']}; direct calls "
             f"{results.get('guarded_calls', 0)} guarded, {results['direct_calls']} on the call key only", ""]
    for num_tokens, rows in results["tokens"].items():
        lines += [f"T={num_tokens}:", "", "| layer | issue µs | latency µs | min | latency over the row above |",
                  "|---|---:|---:|---:|---:|"]
        previous = None
        for name, row in rows.items():
            extra = "" if previous is None else f"{row['latency_us'] - previous:+.1f}"
            lines.append(f"| {name} | {row['issue_us']:.1f} | {row['latency_us']:.1f} | "
                         f"{row['latency_us_min']:.1f} | {extra} |")
            previous = row["latency_us"]
        lines += ["", "A row's latency over the row above is host work it adds before the graph's launch (work "
                  "after the launch overlaps the GPU). `through Dynamo` is the `torch.compile` function without "
                  "torchpcg's wrapper: compare it with `dynamo code`.", ""]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
