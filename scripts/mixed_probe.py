"""Where the time of a call at a new T goes: BufferDecoder (KV cache in module buffers, SDPA inside
its attention op), every call a T not seen before.

Per mode: medians at fixed T, then 200 calls with distinct T drawn from 1..512 (sizes never used
while warming), wall time; counters; for torchpcg.compile without hints a cProfile of fixed-T calls.
Also times the attention op alone at new vs repeated T, with SDPA's default backend order and with
cuDNN last.

    python scripts/mixed_probe.py --out probe.json [--layers 16] [--modes eager,whole,plain,unhinted,hinted]
"""
from __future__ import annotations

import argparse
import cProfile
import io
import json
import pstats
import random
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torchpcg  # noqa: E402
from torchpcg.models import reference_config  # noqa: E402
from torchpcg.models.buffer_decoder import BUFFER_ATTENTION_OP, BufferDecoder  # noqa: E402

CONTEXT = 1024


def sync() -> None:
    torch.cuda.synchronize()


def inputs(num_tokens: int, gen: torch.Generator, vocab: int) -> tuple[torch.Tensor, torch.Tensor]:
    ids = torch.randint(1, vocab, (num_tokens,), generator=gen, device="cuda")
    return ids, torch.arange(CONTEXT, CONTEXT + num_tokens, device="cuda")


def median_ms(fn, args, repeats: int = 20) -> float:
    for _ in range(3):
        fn(*args)
    times = []
    for _ in range(repeats):
        sync()
        start = time.perf_counter()
        fn(*args)
        sync()
        times.append((time.perf_counter() - start) * 1e3)
    return sorted(times)[len(times) // 2]


def wall_s(fn, calls) -> float:
    sync()
    start = time.perf_counter()
    for args in calls:
        fn(*args)
    sync()
    return time.perf_counter() - start


def attention_alone(config) -> dict:
    """First call at a new T vs a repeat, the op alone (bf16)."""
    heads, dim, slots = config.num_heads, config.head_dim, config.max_seq_len
    k_cache = torch.zeros(slots, heads, dim, device="cuda", dtype=torch.bfloat16)
    v_cache = torch.zeros_like(k_cache)
    out = {}
    from torch.nn.attention import SDPBackend

    orders = {"default": None, "cudnn_last": [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION,
                                              SDPBackend.CUDNN_ATTENTION, SDPBackend.MATH]}
    # One call first: torch makes its Hopper default (cuDNN first) lazily, on the first SDPA backend
    # choice of the process. Read before it, the order put back below would be the pre-choice one,
    # and torch would never make its choice: every later mode would run cuDNN-last (as the run at
    # dc5b335 did; see its record).
    q = torch.randn(299, heads, dim, device="cuda", dtype=torch.bfloat16)
    BUFFER_ATTENTION_OP(q, q, q, k_cache, v_cache, torch.arange(299, device="cuda"))
    start_t = 300
    for name, order in orders.items():
        saved = torch._C._get_sdp_priority_order()
        if order is not None:
            torch._C._set_sdp_priority_order([int(b) for b in order])
        firsts, repeats = [], []
        for t in range(start_t, start_t + 5):
            q = torch.randn(t, heads, dim, device="cuda", dtype=torch.bfloat16)
            pos = torch.arange(t, device="cuda")
            sync()
            a = time.perf_counter()
            BUFFER_ATTENTION_OP(q, q, q, k_cache, v_cache, pos)
            sync()
            b = time.perf_counter()
            BUFFER_ATTENTION_OP(q, q, q, k_cache, v_cache, pos)
            sync()
            c = time.perf_counter()
            firsts.append((b - a) * 1e3)
            repeats.append((c - b) * 1e3)
        torch._C._set_sdp_priority_order(saved)
        start_t += 10
        out[name] = {"first_ms": firsts, "repeat_ms": repeats}
    out["default_priority_order"] = list(torch._C._get_sdp_priority_order())
    return out


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--out", required=True)
    p.add_argument("--layers", type=int, default=16)
    p.add_argument("--modes", default="eager,whole,plain,unhinted,hinted")
    p.add_argument("--calls", type=int, default=200)
    args = p.parse_args()
    torchpcg.register_splitting_op("torchpcg_models::buffer_attention")  # what the model's author does
    config = reference_config(num_layers=args.layers)
    result = {"torch": torch.__version__, "device": torch.cuda.get_device_name(), "layers": args.layers,
              "attention_alone": attention_alone(config), "modes": {}}
    print(json.dumps(result["attention_alone"], indent=1), flush=True)
    model = BufferDecoder(config).cuda().to(torch.bfloat16).eval()
    buckets = torchpcg.PiecewiseConfig().buckets
    rng = random.Random(0)
    pool = [t for t in range(1, 513) if t not in set(buckets) and t not in (3, 5, 7)]
    mixed_sizes = rng.sample(pool, args.calls)
    gen = torch.Generator("cuda").manual_seed(0)
    mixed = [inputs(t, gen, config.vocab_size) for t in mixed_sizes]
    fixed = {t: inputs(t, gen, config.vocab_size) for t in (1, 8, 32, 128, 512)}

    for mode in args.modes.split(","):
        torch._dynamo.reset()
        torchpcg.reset_stats()
        t0 = time.perf_counter()
        with torch.no_grad():
            if mode == "eager":
                fn = model
            elif mode == "whole":
                compiled = torch.compile(model, fullgraph=True)
                fn = WholeGraphs(compiled, buckets, config.max_seq_len - 1, gen, config.vocab_size)
            elif mode == "plain":
                fn = torch.compile(model, backend="piecewise")
                for t in sorted(buckets, reverse=True):
                    fn(*inputs(t, gen, config.vocab_size))
            elif mode in ("unhinted", "hinted"):
                hints = {"token_inputs": {"input_ids": 0, "positions": 0}} if mode == "hinted" else {}
                fn = torchpcg.compile(model, **hints)
                torchpcg.capture(fn, lambda n: inputs(n, gen, config.vocab_size), progress=False)
            setup = time.perf_counter() - t0
            row = {"setup_s": setup, "fixed_ms": {t: median_ms(fn, a) for t, a in fixed.items()}}
            row["mixed_s"] = wall_s(fn, mixed)
            row["mixed_again_s"] = wall_s(fn, mixed)
            if mode == "unhinted" or mode == "hinted":
                prof = cProfile.Profile()
                prof.enable()
                for _ in range(30):
                    fn(*fixed[8])
                sync()
                prof.disable()
                s = io.StringIO()
                pstats.Stats(prof, stream=s).sort_stats("tottime").print_stats(25)
                row["profile_T8"] = s.getvalue()[-6000:]
        row["stats"] = {k: v for k, v in torchpcg.stats().items() if not isinstance(v, (list, dict))}
        result["modes"][mode] = row
        print(mode, json.dumps({k: v for k, v in row.items() if k != "profile_T8"}), flush=True)
        if "profile_T8" in row:
            print(row["profile_T8"], flush=True)
        Path(args.out).write_text(json.dumps(result, indent=1))


class WholeGraphs:
    """One CUDA graph of the Inductor-compiled model per bucket; padded rows write the scratch slot."""

    def __init__(self, fn, buckets, scratch: int, gen, vocab: int) -> None:
        self.fn, self.buckets = fn, sorted(buckets)
        top = self.buckets[-1]
        self.ids = torch.ones(top, dtype=torch.long, device="cuda")
        self.pos = torch.full((top,), scratch, dtype=torch.long, device="cuda")
        for t in sorted(self.buckets, reverse=True):
            fn(*inputs(t, gen, vocab))
        pool = torch.cuda.graph_pool_handle()
        self.graphs = {}
        for b in sorted(self.buckets, reverse=True):
            fn(self.ids[:b], self.pos[:b])
            sync()
            g = torch.cuda.CUDAGraph()
            with torch.cuda.graph(g, pool=pool):
                out = fn(self.ids[:b], self.pos[:b])
            self.graphs[b] = (g, out)
        self.scratch = scratch

    def __call__(self, ids, pos):
        import bisect
        t = ids.shape[0]
        i = bisect.bisect_left(self.buckets, t)
        if i == len(self.buckets):
            return self.fn(ids, pos)
        b = self.buckets[i]
        self.ids[:t].copy_(ids)
        self.pos[:t].copy_(pos)
        self.pos[t:b].fill_(self.scratch)
        g, out = self.graphs[b]
        g.replay()
        return out[:t]


if __name__ == "__main__":
    main()
