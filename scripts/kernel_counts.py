"""Kernels per forward of the reference decoder, per way of marking the token dim (GPU).

A whole-forward graph of ``cudagraph_mode="full_and_piecewise"`` launched more kernels per decode
step than a whole-model Inductor graph of the same model (320 against 245 on the 16-layer bench
decoder, H200, torch 2.11). This compiles the same model several ways and counts the kernels one
call launches, by name, so the cause shows as the rows that differ:

    python scripts/kernel_counts.py --layers 4 --tokens 8       # prints a Markdown table

Ways: ``torch.compile`` with the token dim static, backed (``mark_dynamic``), unbacked
(``mark_unbacked`` on each token input, as torchpcg.compile does on torch < 2.13); torchpcg
full graphs with ``dynamic_dim`` auto (unbacked) and backed; ``pieces`` and ``pieces-unbacked``:
torchpcg piecewise graphs with and without ``backed_compile``. ``WAY@N`` compiles with Inductor's
``unbacked_symint_fallback`` (the size it assumes for an unbacked T when choosing kernels) set to N.
"""
from __future__ import annotations

import argparse
import collections
import sys
from collections.abc import Callable

import torch

import torchpcg
from torchpcg.models.attention import KV_ATTENTION_OP
from torchpcg.models.decoder import FlatDecoder, reference_config


def kernel_names(fn: Callable[[], object]) -> collections.Counter[str]:
    """Kernel names launched by one call of ``fn`` (graph replays included)."""
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    return collections.Counter(e.name for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--tokens", type=int, default=8)
    p.add_argument("--ways", default="static,backed,unbacked,torchpcg-auto,torchpcg-backed,pieces,pieces-unbacked")
    args = p.parse_args(argv)
    torch.manual_seed(0)
    model = FlatDecoder(reference_config(num_layers=args.layers)).to("cuda", torch.bfloat16).eval()
    cache = model.new_kv_cache().to("cuda", torch.bfloat16)
    ids = torch.randint(0, 32000, (args.tokens,), device="cuda")
    positions = torch.arange(64, 64 + args.tokens, device="cuda")
    counts: dict[str, collections.Counter[str]] = {}
    for spec in args.ways.split(","):
        way, _, fallback = spec.partition("@")  # "unbacked@8": Inductor's size hint for unbacked T is 8
        patch = {"unbacked_symint_fallback": int(fallback)} if fallback else {}
        torch._dynamo.reset()
        if way.startswith("pieces"):  # piecewise graphs; "pieces-unbacked": without the backed compile
            compiled = torchpcg.compile(model, compiler="inductor", split_ops=(KV_ATTENTION_OP,),
                                        capture_sizes=(args.tokens,), backed_compile=way == "pieces")
            def call() -> object:
                return compiled(ids.clone(), positions.clone(), cache)
        elif way.startswith("torchpcg"):
            compiled = torchpcg.compile(model, compiler="inductor", split_ops=(KV_ATTENTION_OP,),
                                        cudagraph_mode="full_and_piecewise", capture_sizes=(args.tokens,),
                                        dynamic_dim=way.split("-")[1])
            def call() -> object:
                return compiled(ids.clone(), positions.clone(), cache)
        else:
            compiled = torch.compile(model, fullgraph=True, dynamic=False if way == "static" else None)
            def call() -> object:
                i, p_ = ids.clone(), positions.clone()
                if way == "backed":
                    torch._dynamo.mark_dynamic(i, 0)
                    torch._dynamo.mark_dynamic(p_, 0)
                elif way == "unbacked":
                    torch._dynamo.decorators.mark_unbacked(i, 0)
                    torch._dynamo.decorators.mark_unbacked(p_, 0)
                return compiled(i, p_, cache)
        with torch.no_grad(), torch._inductor.config.patch(patch):
            for _ in range(3):  # compile / warm, capture, replay
                call()
            counts[spec] = kernel_names(call)
        print(f"{spec}: {sum(counts[spec].values())} kernels", file=sys.stderr, flush=True)
    ways = list(counts)
    print(f"Kernels per call, {args.layers}-layer reference decoder, T={args.tokens}, {torch.cuda.get_device_name()}, "
          f"torch {torch.__version__}\n")
    print("| kernel | " + " | ".join(ways) + " |")
    print("|---|" + "---:|" * len(ways))
    print("| **total** | " + " | ".join(str(sum(counts[w].values())) for w in ways) + " |")
    names = sorted({n for c in counts.values() for n in c})
    for name in names:
        row = [counts[w].get(name, 0) for w in ways]
        if len(set(row)) > 1:
            print(f"| `{name[:110]}` | " + " | ".join(map(str, row)) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
