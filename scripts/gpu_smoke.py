"""Issue-3 timing on the reference decoder: eager vs inductor (no graphs) vs piecewise, bf16.

Usage: python scripts/gpu_smoke.py [--layers 16] [--out DIR]
Prints median ms at T=1, 8, 128, 512 and the capture time of all buckets; writes JSON to --out.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import time

import torch

import torchpcg
from torchpcg.models import FlatDecoder, reference_config


def timed(fn, repeats: int) -> float:
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    samples = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        samples.append(start.elapsed_time(end))
    return statistics.median(samples)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--layers", type=int, default=16)
    parser.add_argument("--out", default=".")
    parser.add_argument("--tokens", default="1,8,128,512")
    args = parser.parse_args()
    tokens = [int(t) for t in args.tokens.split(",")]
    model = FlatDecoder(reference_config(num_layers=args.layers)).to("cuda", torch.bfloat16).eval()
    cache = model.new_kv_cache("cuda", torch.bfloat16)
    ids_all = torch.randint(0, model.config.vocab_size, (1024,), device="cuda")

    def inputs(n: int):
        ids, pos = ids_all[:n].clone(), torch.arange(128, 128 + n, device="cuda")
        torch._dynamo.mark_dynamic(ids, 0)
        torch._dynamo.mark_dynamic(pos, 0)
        return ids, pos, cache

    results: dict[str, dict[int, float]] = {}
    setup: dict[str, float] = {}
    with torch.no_grad():
        results["eager"] = {n: timed(lambda: model(*inputs(n)), 20) for n in tokens}
        torch._dynamo.reset()
        start = time.perf_counter()
        inductor = torch.compile(model, dynamic=True)
        inductor(*inputs(4))
        setup["inductor"] = time.perf_counter() - start
        results["inductor"] = {n: timed(lambda: inductor(*inputs(n)), 20) for n in tokens}
        torch._dynamo.reset()
        start = time.perf_counter()
        piecewise = torch.compile(model, backend="piecewise", fullgraph=True)
        piecewise(*inputs(4))
        compile_s = time.perf_counter() - start
        torch.cuda.synchronize()
        mem0 = torch.cuda.memory_allocated()
        summary = torchpcg.capture(piecewise, inputs, progress=False)
        torch.cuda.synchronize()
        setup["piecewise_compile"] = compile_s
        setup["piecewise_capture_all"] = summary["seconds"]
        graph_mb = (torch.cuda.memory_allocated() - mem0) / 2**20
        results["piecewise"] = {n: timed(lambda: piecewise(*inputs(n)), 20) for n in tokens}
        ref = model(*inputs(8))
        got = piecewise(*inputs(8))
        max_diff = (ref.float() - got.float()).abs().max().item()
    report = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "layers": args.layers,
              "median_ms": results, "setup_s": setup, "graph_mb": graph_mb, "buckets": summary["sizes"],
              "max_abs_diff_T8": max_diff, "stats": torchpcg.stats()}
    print(json.dumps(report, indent=1))
    with open(os.path.join(args.out, "gpu_smoke.json"), "w") as fh:
        json.dump(report, fh, indent=1)


if __name__ == "__main__":
    main()
