"""Where a BufferDecoder call's host time goes under piecewise graphs (GPU; bench.mixed's model).

Prints, as Markdown:
1. the buffer attention op alone, eager, per SDPA order (torch's, cuDNN last): SDPA's chosen
   backend, host µs per call (back to back, GPU faster than the host) and GPU µs per call, at
   T = 1, 8, 128 and S = the model's cache slots; and the op's body called without the
   ``torch.library.custom_op`` wrapper;
2. a ``torch.profiler`` table of 5 piecewise calls at T=1 and at T=8: host time by op (self CPU),
   so the glue between replays and the split op's parts are seen apart;
3. (``firstpass``) bench.mixed's mixed traffic twice, per front end (plain ``torch.compile``,
   ``torchpcg.compile``): each pass's wall time, its slowest calls with their T, and a profiler
   table of the first pass (what runs only the first time a T is seen).

    python scripts/mixed_profile.py [--layers 16] [--parts op,full,profile,firstpass]
"""
from __future__ import annotations

import argparse
import contextlib
import time

import torch

import torchpcg
from torchpcg.models import reference_config
from torchpcg.models.buffer_decoder import BUFFER_ATTENTION_OP, BufferDecoder, buffer_attention
from torchpcg.sdpa import cudnn_last

BACKENDS = {0: "math", 1: "flash", 2: "efficient", 3: "cudnn", 4: "overrideable", -1: "error"}


def host_and_gpu_us(fn, calls: int = 200) -> tuple[float, float]:
    for _ in range(20):
        fn()
    torch.cuda.synchronize()
    start_event, end_event = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start = time.perf_counter()
    start_event.record()
    for _ in range(calls):
        fn()
    host = (time.perf_counter() - start) / calls * 1e6
    end_event.record()
    torch.cuda.synchronize()
    return host, start_event.elapsed_time(end_event) * 1e3 / calls


def _ms_per_call(compiled, args, calls: int = 50) -> float:
    """10 warm-up calls, then wall ms per call over ``calls`` calls; stats() count the timed calls."""
    for _ in range(10):
        compiled(*args)
    torch.cuda.synchronize()
    torchpcg.reset_stats()
    start = time.perf_counter()
    for _ in range(calls):
        compiled(*args)
    torch.cuda.synchronize()
    return (time.perf_counter() - start) / calls * 1e3


def op_table(config, dtype: torch.dtype) -> None:
    dev = torch.device("cuda")
    heads, kv_heads, dim, slots = config.num_heads, config.num_kv_heads, config.head_dim, config.max_seq_len
    body = getattr(buffer_attention, "_init_fn", None)
    get, put = torch._C._get_sdp_priority_order, torch._C._set_sdp_priority_order
    q0 = torch.randn(1, heads, 1, dim, device=dev, dtype=dtype)
    torch._fused_sdp_choice(q0, q0, q0, attn_mask=torch.ones(1, 1, 1, 1, dtype=torch.bool, device=dev))
    default = get()
    print(f"SDPA order after torch's own choice: {[BACKENDS.get(b, b) for b in default]}\n")
    print("| order | T | backend | op host µs | op GPU µs | body host µs (no custom_op wrapper) | sdpa alone host µs |")
    print("|---|---:|---|---:|---:|---:|---:|")
    for label, order in (("torch", default), ("cudnn-last", cudnn_last(list(default)))):
        put(order)
        for t in (1, 8, 128):
            q = torch.randn(t, heads, dim, device=dev, dtype=dtype)
            k = torch.randn(t, kv_heads, dim, device=dev, dtype=dtype)
            v = torch.randn(t, kv_heads, dim, device=dev, dtype=dtype)
            kc = torch.zeros(slots, kv_heads, dim, device=dev, dtype=dtype)
            vc = torch.zeros_like(kc)
            pos = torch.arange(1000, 1000 + t, device=dev)
            mask = (torch.arange(slots, device=dev)[None, :] <= pos[:, None])[None, None]
            qs, ks = q.transpose(0, 1)[None], kc.transpose(0, 1)[None]
            choice = torch._fused_sdp_choice(qs, ks, ks, attn_mask=mask, enable_gqa=heads != kv_heads)
            op_h, op_g = host_and_gpu_us(lambda: BUFFER_ATTENTION_OP(q, k, v, kc, vc, pos))
            body_h = host_and_gpu_us(lambda: body(q, k, v, kc, vc, pos))[0] if body else float("nan")
            sdpa_h = host_and_gpu_us(lambda: torch.nn.functional.scaled_dot_product_attention(
                qs, ks, ks, attn_mask=mask, enable_gqa=heads != kv_heads))[0]
            print(f"| {label} | {t} | {BACKENDS.get(choice, choice)} | {op_h:.1f} | {op_g:.1f} | {body_h:.1f} | "
                  f"{sdpa_h:.1f} |")
    put(default)


def profile_piecewise(config, dtype: torch.dtype) -> None:
    dev = torch.device("cuda")
    model = BufferDecoder(config).to(dev, dtype).eval()
    torchpcg.register_splitting_op(BUFFER_ATTENTION_OP)
    for direct in (False, True):
        torch._dynamo.reset()
        compiled = torch.compile(model, backend="piecewise", options={"direct_ops": direct})
        print(f"\n# piecewise, direct_ops={direct}")
        _profile(compiled, config, dev)


def _profile(compiled, config, dev) -> None:

    def make(t: int) -> tuple[torch.Tensor, torch.Tensor]:
        return torch.randint(0, config.vocab_size, (t,), device=dev), torch.arange(1000, 1000 + t, device=dev)

    with torch.no_grad():
        torchpcg.capture(compiled, make, progress=False)
        for t in (1, 8):
            args = make(t)
            wall = _ms_per_call(compiled, args)
            print(f"\n## T={t}: {wall:.3f} ms per call; host_us {torchpcg.stats()['host_us']}\n")
            with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU,
                                                    torch.profiler.ProfilerActivity.CUDA]) as prof:
                for _ in range(5):
                    compiled(*args)
                torch.cuda.synchronize()
            print("```")
            table = prof.key_averages()
            print(table.table(sort_by="self_cpu_time_total", row_limit=35, max_name_column_width=70))
            print(table.table(sort_by="self_device_time_total", row_limit=15, max_name_column_width=70))
            print("```")


def full_decode(config, dtype: torch.dtype) -> None:
    """Latency at T=1 and 8 with full decode graphs (the op registered capturable), per SDPA order."""
    dev = torch.device("cuda")
    model = BufferDecoder(config).to(dev, dtype).eval()
    torchpcg.register_splitting_op(BUFFER_ATTENTION_OP, capturable=True)

    def make(t: int) -> tuple[torch.Tensor, torch.Tensor]:
        return torch.randint(0, config.vocab_size, (t,), device=dev), torch.arange(1000, 1000 + t, device=dev)

    print("\n| full decode, sdpa_order | T | ms per call | full_graph_calls | replays per call |")
    print("|---|---:|---:|---:|---:|")
    with torch.no_grad():
        for order in ("auto", "torch"):
            torch._dynamo.reset()
            compiled = torch.compile(model, backend="piecewise",
                                     options={"cudagraph_mode": "full_and_piecewise", "sdpa_order": order})
            torchpcg.capture(compiled, make, progress=False)
            for t in (1, 8):
                args = make(t)
                wall = _ms_per_call(compiled, args)
                st = torchpcg.stats()
                print(f"| {order} | {t} | {wall:.3f} | {st['full_graph_calls']} | {st['replays'] / 50:.1f} |")


def first_pass(config, dtype: torch.dtype) -> None:
    """Mixed traffic (bench.mixed's sizes) twice per front end: where the first pass's extra time goes."""
    from bench.decoder import mixed_traffic_sizes

    dev = torch.device("cuda")
    model = BufferDecoder(config).to(dev, dtype).eval()
    torchpcg.register_splitting_op(BUFFER_ATTENTION_OP)

    def make(t: int) -> tuple[torch.Tensor, torch.Tensor]:
        return torch.randint(0, config.vocab_size, (t,), device=dev), torch.arange(1000, 1000 + t, device=dev)

    sizes = mixed_traffic_sizes(200, 0, 512, min(1024, config.max_seq_len - 1000))
    calls = [make(t) for t in sizes]
    for front in ("piecewise", "torchpcg"):
        torch._dynamo.reset()
        compiled = (torch.compile(model, backend="piecewise") if front == "piecewise"
                    else torchpcg.compile(model))
        with torch.no_grad():
            torchpcg.capture(compiled, make, progress=False)
            torchpcg.reset_stats()
            for attempt in ("first", "second"):
                times = []
                profiled = attempt == "first"
                prof = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) if profiled else None
                torch.cuda.synchronize()
                start = time.perf_counter()
                with prof or contextlib.nullcontext():
                    for args in calls:
                        began = time.perf_counter()
                        compiled(*args)
                        torch.cuda.synchronize()
                        times.append(((time.perf_counter() - began) * 1e3, args[0].shape[0]))
                total = time.perf_counter() - start
                slow = sorted(times, reverse=True)[:8]
                st = torchpcg.stats()
                print(f"\n## {front}, {attempt} pass: {total:.3f} s for {len(calls)} calls (synchronized per call"
                      f"{', profiled' if prof else ''}); slowest (ms, T): "
                      + ", ".join(f"{ms:.1f}@{t}" for ms, t in slow)
                      + f"; recompiles {st['recompiles']}, captured {st['captured']}, dynamo_graphs {st['dynamo_graphs']}")
                if prof is not None:
                    print("```")
                    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=30,
                                                    max_name_column_width=70))
                    print("```")
                torchpcg.reset_stats()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--layers", type=int, default=16)
    p.add_argument("--parts", default="op,full,profile", help="comma list of op, full, profile, firstpass")
    args = p.parse_args()
    config = reference_config(num_layers=args.layers)
    parts = args.parts.split(",")
    if "op" in parts:
        op_table(config, torch.bfloat16)
    if "full" in parts:
        full_decode(config, torch.bfloat16)
    if "profile" in parts:
        profile_piecewise(config, torch.bfloat16)
    if "firstpass" in parts:
        first_pass(config, torch.bfloat16)


if __name__ == "__main__":
    main()
