"""GPU probe: which torch calls keep a process healthy around failed captures and dropped pools.

Run on a CUDA machine: ``python scripts/probe_capture_recovery.py [part ...]``; each part runs in
its own subprocess so one broken process does not hide the next result. Prints one line per check.
Parts: api, mempool, sync_fail, oom_fail, dead_handle, newcomer_hf, newcomer_flat.
"""
from __future__ import annotations

import subprocess
import sys
import traceback

import torch


def _rng_ok() -> str:
    try:
        torch.randint(0, 10, (4,), device="cuda")
        torch.cuda.synchronize()
        return "rng ok"
    except Exception as exc:  # noqa: BLE001
        return f"rng BROKEN: {str(exc).splitlines()[0][:120]}"


def part_api() -> None:
    print("torch", torch.__version__, torch.cuda.get_device_name())
    for name in ("_cuda_endAllocateToPool", "_cuda_releasePool", "_cuda_endAllocateCurrentStreamToPool",
                 "_cuda_beginAllocateCurrentStreamToPool"):
        print(name, hasattr(torch._C, name))
    print("MemPool", hasattr(torch.cuda, "MemPool"))
    gen = torch.cuda.default_generators[0]
    print("graphsafe_set_state", hasattr(gen, "graphsafe_set_state"), "clone_state", hasattr(gen, "clone_state"))


def _capture(fn, pool, stream):
    graph = torch.cuda.CUDAGraph()
    torch.cuda.synchronize()
    with torch.cuda.stream(stream):
        graph.capture_begin(pool=pool)
        try:
            out = fn()
        except BaseException:
            try:
                graph.capture_end()
            except Exception as exc:  # noqa: BLE001
                print("  capture_end after failure raised:", str(exc).splitlines()[0][:100])
            raise
        graph.capture_end()
    torch.cuda.current_stream().wait_stream(stream)
    return graph, out


def part_mempool() -> None:
    x = torch.ones(1024, device="cuda")
    stream = torch.cuda.Stream()
    pool = torch.cuda.MemPool()
    g1, out1 = _capture(lambda: x * 2, pool.id, stream)
    g1.replay()
    print("mempool g1", out1.sum().item())
    del g1, out1
    g2, out2 = _capture(lambda: x * 3, pool.id, stream)
    g2.replay()
    print("mempool recapture after all graphs dropped:", out2.sum().item(), _rng_ok())
    del pool  # graphs still alive
    g2.replay()
    torch.cuda.synchronize()
    print("mempool object dropped while a graph lives: replay ok", out2.sum().item())
    del g2, out2
    print("after all gone", _rng_ok())


def _recover(pool_id, gen_state) -> None:
    dev = torch.cuda.current_device()
    try:
        torch._C._cuda_endAllocateToPool(dev, pool_id)
        print("  endAllocateToPool ok")
    except Exception as exc:  # noqa: BLE001
        print("  endAllocateToPool raised", str(exc)[:100])
    gen = torch.cuda.default_generators[dev]
    gen.graphsafe_set_state(gen_state)
    print("  generator restored")


def _fail_case(name, fn, recover) -> None:
    x = torch.ones(1024, device="cuda")
    stream = torch.cuda.Stream()
    pool = torch.cuda.MemPool()
    gen = torch.cuda.default_generators[torch.cuda.current_device()]
    saved = gen.clone_state()
    try:
        _capture(lambda: fn(x), pool.id, stream)
        print(name, "capture did not fail")
    except Exception as exc:  # noqa: BLE001
        print(name, "failed as expected:", type(exc).__name__, str(exc).splitlines()[0][:100])
    print(" before recovery:", _rng_ok(), "capturing:", torch.cuda.is_current_stream_capturing())
    if recover:
        _recover(pool.id, saved)
    print(" after recovery:", _rng_ok())
    try:
        g, out = _capture(lambda: x * 5 + torch.rand(1024, device="cuda") * 0, pool.id, stream)
        g.replay()
        torch.cuda.synchronize()
        print(" recapture into same pool:", out.sum().item())
    except Exception as exc:  # noqa: BLE001
        print(" recapture failed:", str(exc).splitlines()[0][:140])
    y = torch.randn(1 << 20, device="cuda")
    print(" plain alloc after:", float(y.abs().sum() > 0), _rng_ok(), "alloc MiB", torch.cuda.memory_allocated() >> 20)


def part_sync_fail() -> None:
    _fail_case("sync (no recovery)", lambda x: x * (x.sum().item()), recover=False)


def part_sync_fail_recover() -> None:
    _fail_case("sync (recovery)", lambda x: x * (x.sum().item()), recover=True)


def part_oom_fail() -> None:
    _fail_case("oom", lambda x: torch.empty(1 << 42, device="cuda"), recover=False)


def part_oom_fail_recover() -> None:
    _fail_case("oom (recovery)", lambda x: torch.empty(1 << 42, device="cuda"), recover=True)


def part_dead_handle() -> None:
    x = torch.ones(8, device="cuda")
    stream = torch.cuda.Stream()
    handle = torch.cuda.graph_pool_handle()
    g, out = _capture(lambda: x * 2, handle, stream)
    del g, out
    try:
        _capture(lambda: x * 2, handle, stream)
        print("dead handle: capture ok")
    except Exception as exc:  # noqa: BLE001
        print("dead handle:", str(exc).splitlines()[0][:140])
    print(" ", _rng_ok())


def part_newcomer_hf() -> None:
    import logging
    import transformers
    import torchpcg  # noqa: F401

    logging.basicConfig(level=logging.WARNING)
    cfg = transformers.LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, attn_implementation="sdpa")
    model = transformers.LlamaForCausalLM(cfg).cuda().eval()
    compiled = torch.compile(model, backend="piecewise")
    for n in (5, 1, 7, 1, 3, 9, 1, 5):
        ids = torch.randint(0, 256, (1, n), device="cuda")
        with torch.no_grad():
            ref = model(ids).logits
            got = compiled(ids).logits
        print("hf T", n, "maxdiff", (ref - got).abs().max().item())
    print(torchpcg.stats(), _rng_ok())


def part_newcomer_flat() -> None:
    import logging
    import torchpcg
    from torchpcg.models import DecoderConfig, FlatDecoder

    logging.basicConfig(level=logging.WARNING)
    model = FlatDecoder(DecoderConfig()).cuda().eval()
    compiled = torch.compile(model, backend="piecewise")
    for n in (5, 1, 7, 1, 3, 9, 1, 5):
        ids = torch.randint(0, 512, (n,), device="cuda")
        pos = torch.arange(n, device="cuda")
        c1, c2 = model.new_kv_cache(), model.new_kv_cache()
        with torch.no_grad():
            ref = model(ids, pos, c1)
            got = compiled(ids, pos, c2)
        print("flat T", n, "maxdiff", (ref - got).abs().max().item())
    print(torchpcg.stats(), _rng_ok())


PARTS = {name[5:]: fn for name, fn in globals().items() if name.startswith("part_")}

if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--one":
        try:
            PARTS[sys.argv[2]]()
        except Exception:  # noqa: BLE001
            traceback.print_exc(limit=3)
        sys.exit(0)
    for name in sys.argv[1:] or list(PARTS):
        print(f"==== {name}", flush=True)
        proc = subprocess.run([sys.executable, __file__, "--one", name], capture_output=True, text=True, timeout=300)
        print(proc.stdout[-4000:], proc.stderr[-2500:], f"[rc {proc.returncode}]", flush=True)
