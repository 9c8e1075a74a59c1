"""Mixed traffic on a decoder written as model authors write one: ``BufferDecoder``.

Its KV cache lives in module buffers, ``forward(input_ids, positions)`` takes no cache, and its
attention op calls ``F.scaled_dot_product_attention`` with a mask (cuDNN attention on Hopper, a
plan per new shape). Per mode, in one process: median latency at fixed T, then three call
sequences timed whole: the bench's mixed traffic (60% T <= 8), the same again, and "every T new"
(T uniform over 1..largest bucket, no T repeated). Counters over the timed calls (after warm-up) say whether
anything recompiled or was captured (again); ``host_us`` splits the host time of the every-T-new
calls around their graph replays.

    python -m bench.mixed --out bench/results          # reference size (16 layers, hidden 2048), bf16
    python -m bench.mixed --quick --out /tmp/mixed     # tiny model on CPU, emulated graphs

Modes: eager; inductor-cudagraph (the Inductor-compiled model captured whole, one CUDA graph per
bucket, padded rows writing a scratch cache slot: the upper bound); piecewise (plain
``torch.compile(model, backend="piecewise")``); piecewise-sdpa-torch (the same with
``sdpa_order="torch"``: SDPA's own kernel order, what every earlier release did);
piecewise-op-dispatch (the same with ``direct_ops=False``: the attention op called through
``torch.ops``, the dispatcher and the custom-op wrapper, as before ``direct_ops``); torchpcg
(``torchpcg.compile(model)``, token inputs inferred); torchpcg-hinted (``token_inputs`` named);
torchpcg-full-decode (``cudagraph_mode="full_and_piecewise"``, the op registered capturable).
The attention op is registered as a split op, as the model's author would.
"""
from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

import torchpcg
from bench import measure
from bench.cli import DTYPES, git_commit, names_from, positive_ints, write_record
from bench.decoder import InputMaker, distinct_traffic_sizes, mixed_traffic_sizes
from bench.modes import BenchContext, ModeUnavailable, WholeModelGraphs
from torchpcg.models import reference_config
from torchpcg.models.buffer_decoder import BUFFER_ATTENTION_OP, BufferDecoder
from torchpcg.models.decoder import DecoderConfig

REPO_ROOT = Path(__file__).resolve().parents[1]
Runner = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
MODE_NAMES = ("eager", "inductor-cudagraph", "piecewise", "piecewise-sdpa-torch", "piecewise-op-dispatch", "torchpcg",
              "torchpcg-hinted", "torchpcg-full-decode")
TOL = {torch.bfloat16: 3e-2, torch.float32: 1e-4}
# torchpcg.stats() counters recorded after warm-up (summed over the timed calls)
COUNTED = ("recompiles", "recaptures", "captured", "replays", "eager_runs", "graphless_runs", "copied_bytes",
           "fallbacks", "capture_failures", "dynamo_graphs")


@dataclasses.dataclass(frozen=True)
class Settings:
    device: torch.device
    dtype: torch.dtype
    model_config: DecoderConfig  # the name bench.decoder.InputMaker reads
    tokens: tuple[int, ...]
    context: int  # cache positions filled before timing; calls write at context + arange(T)
    calls: int
    seed: int
    modes: tuple[str, ...]
    options: dict[str, Any]  # piecewise knobs every torchpcg mode gets (quick: CPU stand-ins)
    out: Path


def parse(argv: list[str] | None) -> Settings:
    p = argparse.ArgumentParser(prog="python -m bench.mixed", description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="tiny model on the CPU, emulated graphs, 8 buckets")
    p.add_argument("--modes", type=names_from(MODE_NAMES), default=MODE_NAMES, help="comma list of modes")
    p.add_argument("--tokens", type=positive_ints, default=None, help="fixed T timed (default 1,8,32,128,512)")
    p.add_argument("--calls", type=int, default=200, help="calls in each traffic sequence")
    p.add_argument("--layers", type=int, default=None, help="decoder layers (default 16; quick 2)")
    p.add_argument("--dtype", choices=sorted(DTYPES), default=None, help="default bfloat16 (quick: float32)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, required=True, help="folder for the JSON and Markdown record")
    args = p.parse_args(argv)
    if args.quick:
        config = DecoderConfig(num_layers=args.layers or 2, max_seq_len=128)
        device, dtype = torch.device("cpu"), DTYPES[args.dtype or "float32"]
        tokens, context = args.tokens or (1, 8, 16), 32
        options = {"cudagraph": "emulate", "capture_sizes": "1,2,4,8,16", "compiler": "eager"}
    else:
        config = reference_config(num_layers=args.layers or 16)
        device, dtype = torch.device("cuda"), DTYPES[args.dtype or "bfloat16"]
        tokens, context, options = args.tokens or (1, 8, 32, 128, 512), 1024, {}
    if context + max(tokens) + 1 > config.max_seq_len:
        p.error(f"context {context} + largest T {max(tokens)} + a scratch slot exceed max_seq_len {config.max_seq_len}")
    return Settings(device, dtype, config, tokens, context, args.calls, args.seed, args.modes, options, args.out)


def build(name: str, model: BufferDecoder, s: Settings, buckets: tuple[int, ...]) -> Runner:
    """Compile and warm ``name``; every bucket captured before timing."""
    make = InputMaker(s, seed_offset=7)
    if name == "eager":
        return model
    if name == "inductor-cudagraph":
        if s.device.type != "cuda":
            raise ModeUnavailable("a whole-model CUDA graph needs a CUDA device")
        compiled = torch.compile(model, fullgraph=True)
        for size in sorted(buckets, reverse=True):
            compiled(*make(size))  # compile and autotune every bucket outside capture
        ctx = BenchContext(model=model, kv_cache=None, device=s.device, buckets=buckets,  # type: ignore[arg-type]
                           scratch_position=s.model_config.max_seq_len - 1, make_inputs=make, tokens=s.tokens,
                           piecewise_options={})
        graphs = WholeModelGraphs(lambda ids, pos, _cache: compiled(ids, pos), ctx)
        graphs.capture_all()
        return graphs
    options = dict(s.options)
    if name.endswith("sdpa-torch"):
        options["sdpa_order"] = "torch"
    if name.endswith("op-dispatch"):
        options["direct_ops"] = False
    if name == "torchpcg-full-decode":
        if s.device.type != "cuda":
            raise ModeUnavailable("full-decode CUDA graphs need a CUDA device")
        options["cudagraph_mode"] = "full_and_piecewise"
    if name.startswith("piecewise"):
        compiled = torch.compile(model, backend="piecewise", options=options)
    else:
        hints = {"token_inputs": {"input_ids": 0, "positions": 0}} if name == "torchpcg-hinted" else {}
        compiled = torchpcg.compile(model, **options, **hints)
    torchpcg.capture(compiled, make, sizes=buckets, progress=False)
    return compiled


def run_mode(name: str, model: BufferDecoder, s: Settings, buckets: tuple[int, ...],
             references: dict[int, torch.Tensor], traffic: dict[str, list[tuple[torch.Tensor, torch.Tensor]]],
             fixed: dict[int, tuple[torch.Tensor, torch.Tensor]]) -> dict[str, Any]:
    torch._dynamo.reset()
    torchpcg.reset_stats()
    start = time.perf_counter()
    # The attention op never syncs and keeps its addresses: capturable, so full graphs may hold it.
    torchpcg.register_splitting_op(BUFFER_ATTENTION_OP, capturable=name == "torchpcg-full-decode")
    try:
        runner = build(name, model, s, buckets)
    except ModeUnavailable as err:
        return {"status": "unavailable", "reason": str(err)}
    row: dict[str, Any] = {"status": "ok", "setup_s": round(time.perf_counter() - start, 2), "median_ms": {},
                           "rel_err": {}}
    torchpcg.reset_stats()  # counters from here on: after warm-up, where every one of them should stay 0
    for num_tokens, args in fixed.items():
        out = runner(*args).float().cpu()
        row["rel_err"][num_tokens] = measure.compare(out, references[num_tokens], TOL[s.dtype]).rel_err
        row["median_ms"][num_tokens] = round(measure.time_call(lambda a=args: runner(*a), s.device, 3, 30).median_ms, 3)
    counters = dict.fromkeys(COUNTED, 0)
    for key, calls in traffic.items():
        row[f"{key}_s"] = round(measure.time_sequence([lambda a=a: runner(*a) for a in calls], s.device), 3)
        stats = torchpcg.stats()
        counters = {k: counters[k] + stats[k] for k in COUNTED}
        row["host_us"] = stats["host_us"]  # the last sequence's calls alone: every T new
        torchpcg.reset_stats()
    if max(row["rel_err"].values()) > TOL[s.dtype]:
        row["status"] = "wrong"
    row["counters"] = counters
    runner = None  # frees its graphs before the next mode
    torch._dynamo.reset()
    if s.device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
    return row


def main(argv: list[str] | None = None) -> int:
    s = parse(argv)
    buckets = torchpcg.PiecewiseConfig.resolve(s.options).buckets
    top = max(s.tokens)
    with torch.no_grad():
        model = BufferDecoder(s.model_config, seed=s.seed).to(s.device, s.dtype).eval()
        prefix = InputMaker(s, seed_offset=1)(s.context)
        model(prefix[0], torch.arange(s.context, device=s.device))  # the cache holds a real context
        fixed = {t: InputMaker(s, seed_offset=2)(t) for t in s.tokens}
        references = {t: model(*args).float().cpu() for t, args in fixed.items()}
        traffic_sizes = {"mixed": mixed_traffic_sizes(s.calls, s.seed, buckets[-1], top),
                         "distinct": distinct_traffic_sizes(s.calls, s.seed, buckets[-1], top)}
        made = {key: [InputMaker(s, seed_offset=3)(t) for t in sizes] for key, sizes in traffic_sizes.items()}
        traffic = {"mixed": made["mixed"], "mixed_again": made["mixed"], "distinct": made["distinct"]}
        results: dict[str, Any] = {
            "torch": torch.__version__, "device": torch.cuda.get_device_name(s.device) if s.device.type == "cuda"
            else "cpu", "commit": git_commit(REPO_ROOT), "argv": sys.argv[1:] if argv is None else argv,
            "model": dataclasses.asdict(s.model_config), "dtype": str(s.dtype).removeprefix("torch."),
            "context": s.context, "buckets": len(buckets), "largest_bucket": buckets[-1],
            "traffic": {key: {"calls": len(sizes), "distinct_T": len(set(sizes)), "tokens": sum(sizes)}
                        for key, sizes in traffic_sizes.items()},
            "modes": {}}
        for name in s.modes:
            print(f"[bench.mixed] {name} ...", file=sys.stderr, flush=True)
            results["modes"][name] = run_mode(name, model, s, buckets, references, traffic, fixed)
            write_record(s.out, "mixed", results, markdown, quiet=True)  # a run cut off keeps the modes done
    write_record(s.out, "mixed", results, markdown)
    return 1 if any(r["status"] == "wrong" for r in results["modes"].values()) else 0


def markdown(results: dict[str, Any]) -> str:
    """The record as tables: latency per T, traffic wall time, ratios to the whole-model graph."""
    modes = {n: r for n, r in results["modes"].items() if r["status"] != "unavailable"}
    tokens = sorted({int(t) for r in modes.values() for t in r["median_ms"]})
    traffic = results["traffic"]
    heads = [f"mixed s ({traffic['mixed']['calls']} calls, {traffic['mixed']['distinct_T']} T)", "mixed again s",
             f"every T new s ({traffic['distinct']['calls']} calls, {traffic['distinct']['distinct_T']} T)"]
    lines = [f"# Mixed traffic, BufferDecoder ({results['model']['num_layers']} layers, hidden "
             f"{results['model']['hidden_size']}, {results['dtype']}) on {results['device']}, torch {results['torch']}, "
             f"commit {results['commit']}", "",
             "| mode | " + " | ".join(f"T={t} ms" for t in tokens) + " | " + " | ".join(heads)
             + " | recompiles | recaptures | captured | max rel_err |",
             "|---|" + "---:|" * (len(tokens) + 7)]
    for name, r in modes.items():
        cells = [f"{r['median_ms'][t]:.3f}" for t in tokens]
        cells += [f"{r[k]:.3f}" for k in ("mixed_s", "mixed_again_s", "distinct_s")]
        counters = r.get("counters", {})
        cells += [str(counters.get(k, "-")) for k in ("recompiles", "recaptures", "captured")]
        cells.append(f"{max(r['rel_err'].values()):.1e}")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    bound = modes.get("inductor-cudagraph")
    if bound:
        lines += ["", "Each mode's time ÷ inductor-cudagraph's (lower is better; 1.00 = the whole-model graph):", "",
                  "| mode | " + " | ".join(f"T={t}" for t in tokens) + " | mixed | mixed again | every T new |",
                  "|---|" + "---:|" * (len(tokens) + 3)]
        for name, r in modes.items():
            cells = [f"{r['median_ms'][t] / bound['median_ms'][t]:.2f}" for t in tokens]
            cells += [f"{r[k] / bound[k]:.2f}" for k in ("mixed_s", "mixed_again_s", "distinct_s")]
            lines.append(f"| {name} | " + " | ".join(cells) + " |")
    hosts = [f"`{n}` {r['host_us']['total']:.0f} (before {r['host_us']['before']:.0f}, replays "
             f"{r['host_us']['replays']:.0f}, between {r['host_us']['between']:.0f}, after {r['host_us']['after']:.0f}, "
             f"max {r['host_us']['max']:.0f})" for n, r in modes.items() if r.get("host_us", {}).get("calls")]
    if hosts:
        lines += ["", "Host µs per call over the every-T-new sequence, `torchpcg.stats()['host_us']` (mean; max = "
                  "the slowest call): " + "; ".join(hosts) + "."]
    for name, r in results["modes"].items():
        if r["status"] == "unavailable":
            lines.append(f"- `{name}`: n/a ({r['reason']})")
    return "\n".join(lines) + "\n"



if __name__ == "__main__":
    raise SystemExit(main())
