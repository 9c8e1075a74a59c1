"""Where the piecewise graph memory goes: the pool's growth per capture, and its segments after setup.

Builds the decoder bench's ``piecewise`` mode (``bench/modes.py``) on the bench's model and
records, around every graph capture, the private pool's reserved bytes (its segments) and active
bytes (blocks still held: the captured graphs' live outputs). Then it lists the pool's segments
after setup, with what is allocated in each, next to the eager yardstick: one eager call at the
largest bucket in a private ``torch.cuda.MemPool``, which is what the bench's graph-memory target
compares against. CUDA only.

    python scripts/graph_memory.py                       # the bench's model, default buckets
    python scripts/graph_memory.py --piecewise-option cudagraph_mode=full_and_piecewise
    PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True python scripts/graph_memory.py

Flags other than ``--top`` are the decoder bench's (``python -m bench.decoder --help``).
"""
from __future__ import annotations

import argparse
import dataclasses
import sys
from collections import defaultdict
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

MIB = 1024 * 1024


def segments_by_pool() -> dict[tuple[int, int], list[dict[str, Any]]]:
    """The allocator's segments now, grouped by the pool they belong to."""
    import torch

    pools: dict[tuple[int, int], list[dict[str, Any]]] = defaultdict(list)
    for segment in torch.cuda.memory._snapshot()["segments"]:
        pools[tuple(segment["segment_pool_id"])].append(segment)
    return pools


def pool_bytes(handle: Any) -> tuple[int, int]:
    """(reserved, active) bytes of the pool ``handle``: its segments, and the blocks in use in them."""
    segments = segments_by_pool().get(tuple(handle), [])
    return sum(s["total_size"] for s in segments), sum(s["active_size"] for s in segments)


def trace_captures(records: list[dict[str, Any]]) -> None:
    """Wrap ``PieceRunner._capture`` so each capture appends its piece, bucket and pool bytes."""
    from torchpcg import runtime

    original = runtime.PieceRunner._capture

    def traced(self: Any, bucket: int, num_tokens: int, args: Any) -> Any:
        pool = self.runtime.engine.pool
        before = pool_bytes(pool.handle) if pool is not None and not pool.retired else (0, 0)
        result = original(self, bucket, num_tokens, args)
        reserved, active = pool_bytes(self.runtime.engine.pool.handle)
        records.append({"piece": self.name, "bucket": bucket, "reserved": reserved, "active": active,
                        "growth": reserved - before[0]})
        return result

    runtime.PieceRunner._capture = traced


def segment_lines(segments: list[dict[str, Any]], top: int) -> list[str]:
    """A table of the largest segments: size, allocated, blocks in use."""
    lines = ["| segment MiB | allocated MiB | active blocks |", "|---|---|---|"]
    for s in sorted(segments, key=lambda s: -s["total_size"])[:top]:
        used = sum(1 for b in s["blocks"] if b["state"] == "active_allocated")
        lines.append(f"| {s['total_size'] / MIB:.2f} | {s['allocated_size'] / MIB:.2f} | {used} |")
    total = sum(s["total_size"] for s in segments)
    allocated = sum(s["allocated_size"] for s in segments)
    lines.append(f"| **{total / MIB:.2f}** in {len(segments)} | **{allocated / MIB:.2f}** | |")
    return lines


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--top", type=int, default=12, help="segments listed per pool (default 12)")
    own, bench_flags = parser.parse_known_args(argv)

    import torch

    from bench import decoder
    from bench.modes import MODES

    settings = decoder.resolve_settings(decoder.parse_args(bench_flags + ["--no-progress"]))
    if settings.device.type != "cuda":
        print("graph_memory: needs CUDA (graph pools are CUDA memory)", file=sys.stderr)
        return 2
    records: list[dict[str, Any]] = []
    trace_captures(records)
    mode = {m.name: m for m in MODES}["piecewise"]
    with torch.no_grad():
        ctx = decoder.prefilled_context(settings)
        model, kv_cache = ctx.model, ctx.kv_cache
        largest = ctx.buckets[-1]
        eager = decoder.measure.private_pool_segments(lambda: model(*ctx.make_inputs(largest), kv_cache),
                                                      settings.device)
        if eager is None:
            print("graph_memory: needs torch.cuda.MemPool for the eager yardstick (this torch has none)", file=sys.stderr)
            return 2
        peak = decoder.measure.activation_peak_mb(lambda: model(*ctx.make_inputs(largest), kv_cache), settings.device)
        workspace = decoder.measure.stream_workspace_mb(settings.device, settings.dtype)
        decoder.free_memory(settings.device)
        reserved_before = torch.cuda.memory_reserved(settings.device)
        runner = mode.build(dataclasses.replace(ctx, info={}))
        for num_tokens in sorted(settings.tokens, reverse=True):
            runner(*ctx.make_inputs(num_tokens))
        torch.cuda.synchronize(settings.device)
        decoder.free_memory(settings.device, dynamo=False)
        reserved_delta = torch.cuda.memory_reserved(settings.device) - reserved_before
        pools = segments_by_pool()

    eager_total = sum(s["total_size"] for s in eager) / MIB
    print(f"# Graph memory of piecewise on {torch.cuda.get_device_name(settings.device)}, torch {torch.__version__}\n")
    print(f"Buckets: {list(ctx.buckets)}; captures: {len(records)}.")
    print(f"Eager call at T={largest}: tensor peak {peak:.2f} MiB, private pool {eager_total:.2f} MiB.")
    print(f"Reserved delta across setup (after empty_cache): {reserved_delta / MIB:.2f} MiB "
          f"= {reserved_delta / MIB / eager_total:.2f}x the eager pool.")
    if workspace is not None:
        print(f"Of which cuBLAS's workspace for the capture stream: {workspace:.2f} MiB; the rest "
              f"{reserved_delta / MIB - workspace:.2f} MiB = {(reserved_delta / MIB - workspace) / eager_total:.2f}x "
              "the eager pool.")
    print()
    print("## Pool growth per bucket (largest first)\n")
    print("| bucket | captures | growth MiB | pool reserved after MiB | pool active after MiB |")
    print("|---|---|---|---|---|")
    by_bucket: dict[int, list[dict[str, Any]]] = defaultdict(list)
    for record in records:
        by_bucket[record["bucket"]].append(record)
    for bucket, rows in by_bucket.items():
        print(f"| {bucket} | {len(rows)} | {sum(r['growth'] for r in rows) / MIB:.2f} | "
              f"{rows[-1]['reserved'] / MIB:.2f} | {rows[-1]['active'] / MIB:.2f} |")
    print("\n## Captures that grew the pool\n")
    print("| piece | bucket | growth MiB | pool reserved after MiB | active after MiB |")
    print("|---|---|---|---|---|")
    for r in records:
        if r["growth"]:
            print(f"| {r['piece']} | {r['bucket']} | {r['growth'] / MIB:.2f} | {r['reserved'] / MIB:.2f} | "
                  f"{r['active'] / MIB:.2f} |")
    print("\n## Segments after setup, by pool\n")
    for handle, segments in sorted(pools.items(), key=lambda kv: -sum(s["total_size"] for s in kv[1])):
        print(f"### pool {handle}\n")
        print("\n".join(segment_lines(segments, own.top)) + "\n")
    print("### eager call's private pool\n")
    print("\n".join(segment_lines(eager, own.top)))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
