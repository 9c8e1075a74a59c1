"""Host time to issue one KV-cache attention call, per implementation (GPU; decode shapes).

Piecewise graphs run the attention op eagerly between replays, so its host time is paid once per
layer and call. This measures variants of the reference op (torchpcg.models.attention) at the
bench decoder's shapes: 16 heads of 128, cache of 128 slots, T = 1 and 8, bf16; and the bench's
packed op (``bench/packed_attention.py``: k and v stacked by the graph before it, one cache write).

    python scripts/attention_host_cost.py            # prints a Markdown table

Host time = wall time of ``calls`` back-to-back calls / calls, with the GPU faster than the host
(checked: the GPU time of one call is printed beside it).

A second table times the *first* call at a T never seen before against a repeat call at that T,
per SDPA backend (the op's SDPA call with the backend forced), and for the op as shipped, and
names the kernels each ran. SDPA's default on Hopper, cuDNN, builds an execution plan per new
shape: 38 ms at first sight against 0.54 ms for a repeat (H200, torch 2.11, at `f9e258b`), which
made mixed traffic's first pass ~8x its second under piecewise graphs. The op now calls the
memory-efficient kernel directly on CUDA (torchpcg/models/attention.py).
"""
from __future__ import annotations

import contextlib
import math
import statistics
import sys
import time

from pathlib import Path

import torch
import torch.nn.functional as F

from torchpcg.models.attention import KV_ATTENTION_OP, attention_bias

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # bench/ is a repo package, not installed
from bench.packed_attention import kv_attention_packed  # noqa: E402


def _bool_mask(positions: torch.Tensor, slots: int) -> torch.Tensor:
    return (torch.arange(slots, device=positions.device)[None, :] <= positions[:, None])[None, None]


def _float_mask(positions: torch.Tensor, slots: int, dtype: torch.dtype) -> torch.Tensor:
    allowed = _bool_mask(positions, slots)
    return torch.zeros(allowed.shape, dtype=dtype, device=positions.device).masked_fill_(~allowed, float("-inf"))


def premasked(q, k, v, cache, layer, positions, mask):
    """The mask comes in (computed once per forward, in a compiled piece); one SDPA call."""
    cache[layer, 0].index_copy_(0, positions, k)
    cache[layer, 1].index_copy_(0, positions, v)
    out = F.scaled_dot_product_attention(q.transpose(0, 1)[None], cache[layer, 0].transpose(0, 1)[None],
                                         cache[layer, 1].transpose(0, 1)[None], attn_mask=mask,
                                         scale=1.0 / math.sqrt(q.shape[-1]))
    return out[0].transpose(0, 1)


def premasked_one_write(q, k, v, cache, layer, positions, mask):
    """As premasked, with k and v written by one index_copy_ over the stacked pair."""
    cache[layer].index_copy_(1, positions, torch.stack((k, v)))
    out = F.scaled_dot_product_attention(q.transpose(0, 1)[None], cache[layer, 0].transpose(0, 1)[None],
                                         cache[layer, 1].transpose(0, 1)[None], attn_mask=mask,
                                         scale=1.0 / math.sqrt(q.shape[-1]))
    return out[0].transpose(0, 1)


def host_us(fn, calls: int = 200) -> tuple[float, float]:
    """(host µs per call, GPU µs per call)."""
    for _ in range(10):
        fn()
    torch.cuda.synchronize()
    samples = []
    for _ in range(5):
        start = time.perf_counter()
        for _ in range(calls):
            fn()
        samples.append((time.perf_counter() - start) / calls * 1e6)
        torch.cuda.synchronize()
    begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    begin.record()
    for _ in range(calls):
        fn()
    end.record()
    torch.cuda.synchronize()
    return statistics.median(samples), begin.elapsed_time(end) * 1e3 / calls


def main() -> int:
    if not torch.cuda.is_available():
        print("needs a CUDA GPU", file=sys.stderr)
        return 2
    dtype, heads, dim, slots, layers = torch.bfloat16, 16, 128, 128, 16
    cache = torch.zeros(layers, 2, slots, heads, dim, dtype=dtype, device="cuda")
    print(f"torch {torch.__version__}, {torch.cuda.get_device_name()}; host µs per call (GPU µs per call)\n")
    print("| T | op, bias passed in (the decoder's call) | op, mask made inside | its SDPA call, default backend "
          "| its SDPA call, efficient backend forced | packed op, k/v stacked before (`--attention packed`) |")
    print("|---:|---:|---:|---:|---:|---:|")
    from torch.nn.attention import SDPBackend, sdpa_kernel

    with torch.no_grad():
        for num_tokens in (1, 8):
            q, k, v = (torch.randn(num_tokens, heads, dim, dtype=dtype, device="cuda") for _ in range(3))
            positions = torch.arange(40, 40 + num_tokens, device="cuda")
            bias = attention_bias(positions, slots, dtype)
            float_mask = _float_mask(positions, slots, dtype)
            rows = [host_us(lambda: KV_ATTENTION_OP(q, k, v, cache, 3, positions, bias)),
                    host_us(lambda: KV_ATTENTION_OP(q, k, v, cache, 3, positions)),
                    host_us(lambda: premasked_one_write(q, k, v, cache, 3, positions, float_mask))]
            with sdpa_kernel([SDPBackend.EFFICIENT_ATTENTION]):
                rows.append(host_us(lambda: premasked_one_write(q, k, v, cache, 3, positions, float_mask)))
            kv = torch.stack((k, v), dim=1)  # made in the graph before the op, so not timed here
            rows.append(host_us(lambda: kv_attention_packed(q, kv, cache, 3, positions, bias)))
            reference = premasked_one_write(q, k, v, cache, 3, positions, float_mask)
            torch.testing.assert_close(kv_attention_packed(q, kv, cache, 3, positions, bias), reference)
            torch.testing.assert_close(KV_ATTENTION_OP(q, k, v, cache, 3, positions, bias), reference)
            torch.testing.assert_close(premasked(q, k, v, cache, 3, positions, _bool_mask(positions, slots)), reference)
            print(f"| {num_tokens} | " + " | ".join(f"{h:.1f} ({g:.1f})" for h, g in rows) + " |")
    first_sight(cache, heads, dim, dtype)
    small = torch.zeros(1, 2048, dtype=dtype, device="cuda")
    other = torch.ones_like(small)
    graph = torch.cuda.CUDAGraph()
    stream = torch.cuda.Stream()
    with torch.cuda.stream(stream):
        graph.capture_begin()
        small.add_(1)
        graph.capture_end()
    torch.cuda.synchronize()
    print(f"\nbaselines, host µs: small.add_(1) {host_us(lambda: small.add_(1))[0]:.1f}; "
          f"small.copy_(other) {host_us(lambda: small.copy_(other))[0]:.1f}; "
          f"replay of a one-kernel graph {host_us(graph.replay)[0]:.1f}")
    return 0


def first_sight(cache: torch.Tensor, heads: int, dim: int, dtype: torch.dtype) -> None:
    """ms of the first call at a new T vs a repeat, for SDPA's default choice, forced backends and the op."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    slots = cache.shape[2]
    backends = {"default": None, "cudnn": SDPBackend.CUDNN_ATTENTION,
                "efficient": SDPBackend.EFFICIENT_ATTENTION, "math": SDPBackend.MATH}
    print("\nFirst call at a new T vs a repeat call (ms, synchronized), and the kernels at T=1:\n")
    print("| SDPA backend | first calls, median ms | repeat calls, median ms | kernels |")
    print("|---|---:|---:|---|")
    sizes = iter(range(3, slots // 2))  # every row gets T values no row has seen

    def sdpa_call(q, k, v, positions):
        return premasked_one_write(q, k, v, cache, 3, positions, _float_mask(positions, slots, dtype))

    def op_call(q, k, v, positions):
        return KV_ATTENTION_OP(q, k, v, cache, 3, positions, attention_bias(positions, slots, dtype))

    rows = [(name, backend, sdpa_call) for name, backend in backends.items()]
    rows.append(("the op as shipped (efficient kernel called directly)", None, op_call))
    for name, backend, call in rows:
        firsts, repeats = [], []
        context = sdpa_kernel([backend]) if backend is not None else contextlib.nullcontext()
        try:
            with context, torch.no_grad():
                for _ in range(8):
                    num_tokens = next(sizes)
                    q, k, v = (torch.randn(num_tokens, heads, dim, dtype=dtype, device="cuda") for _ in range(3))
                    positions = torch.arange(slots - num_tokens, slots, device="cuda")
                    for samples in (firsts, repeats):
                        torch.cuda.synchronize()
                        start = time.perf_counter()
                        call(q, k, v, positions)
                        torch.cuda.synchronize()
                        samples.append((time.perf_counter() - start) * 1e3)
                q1, k1, v1 = (torch.randn(1, heads, dim, dtype=dtype, device="cuda") for _ in range(3))
                last = torch.tensor([slots - 1], device="cuda")
                with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA], acc_events=True) as prof:
                    call(q1, k1, v1, last)
                    torch.cuda.synchronize()
            kernels = sorted({e.name[:40] for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA})
            print(f"| {name} | {statistics.median(firsts):.2f} | {statistics.median(repeats):.2f} | "
                  f"{'; '.join(kernels)} |")
        except RuntimeError as err:  # a backend that cannot run these shapes
            print(f"| {name} | n/a: {str(err).splitlines()[0][:80]} | | |")

if __name__ == "__main__":
    sys.exit(main())
