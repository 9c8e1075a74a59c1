"""Decode steps of a mixture-of-experts decoder whose dispatch breaks the graph (``torch.where``).

``torchpcg.models.moe.moe_decoder``: a ``BufferDecoder`` (KV cache in module buffers, SDPA in its
attention op) whose MLPs are 8 experts, top-2, dispatched with ``torch.where``. Dynamo breaks the
graph at every dispatch, so every compiler sees many frames, one ``forward`` shared by all experts.
Per mode, in one process: median ms per call at each T (decode T=1 and a few small T), after a
warm-up of the same calls, and the counters over the timed calls.

    python -m bench.moe --out bench/results              # GPU: 16 layers, hidden 2048, bf16
    python -m bench.moe --quick --out /tmp/moe           # tiny model on the CPU, emulated graphs

Modes: eager; inductor (``torch.compile`` default, no graphs); reduce-overhead (CUDA graph
trees); piecewise (``torch.compile(model, backend="piecewise")``).
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

import torch

import torchpcg
from bench import measure
from bench.cli import git_commit, names_from, positive_ints, write_record
from torchpcg.models import DecoderConfig, reference_config
from torchpcg.models.buffer_decoder import BUFFER_ATTENTION_OP
from torchpcg.models.moe import moe_decoder

REPO_ROOT = Path(__file__).resolve().parents[1]
MODE_NAMES = ("eager", "inductor", "reduce-overhead", "piecewise")
COUNTED = ("dynamo_graphs", "recompiles", "recaptures", "captured", "replays", "copied_bytes", "graphless_runs",
           "eager_runs", "fallbacks")


def parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.moe", description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="tiny model on the CPU, emulated graphs")
    p.add_argument("--modes", type=names_from(MODE_NAMES), default=MODE_NAMES)
    p.add_argument("--tokens", type=positive_ints, default=(1, 2, 4, 8), help="T per call (default 1,2,4,8)")
    p.add_argument("--experts", type=int, default=8)
    p.add_argument("--top-k", type=int, default=2)
    p.add_argument("--repeats", type=int, default=30)
    p.add_argument("--out", type=Path, required=True)
    return p.parse_args(argv)


def build(name: str, model: torch.nn.Module, quick: bool) -> Any:
    if name == "eager":
        return model
    if name == "inductor":
        return torch.compile(model)
    if name == "reduce-overhead":
        if quick:
            return None  # CUDA graph trees need a GPU
        def run(ids: torch.Tensor, pos: torch.Tensor, compiled=torch.compile(model, mode="reduce-overhead")) -> Any:
            torch.compiler.cudagraph_mark_step_begin()
            return compiled(ids, pos)
        return run
    options = {"cudagraph": "emulate", "compiler": "eager", "capture_sizes": "1,2,4,8"} if quick else {}
    return torch.compile(model, backend="piecewise", options=options)


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    torchpcg.register_splitting_op(BUFFER_ATTENTION_OP)
    if args.quick:
        config, device, dtype = DecoderConfig(num_layers=2, max_seq_len=256), torch.device("cpu"), torch.float32
    else:
        config, device, dtype = reference_config(), torch.device("cuda"), torch.bfloat16
    model = moe_decoder(config, args.experts, args.top_k).to(device, dtype).eval()
    generator = torch.Generator(device).manual_seed(0)
    calls = {t: (torch.randint(1, config.vocab_size, (t,), generator=generator, device=device),
                 torch.arange(64, 64 + t, device=device)) for t in args.tokens}
    results: dict[str, Any] = {
        "torch": torch.__version__, "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "commit": git_commit(REPO_ROOT), "argv": sys.argv[1:] if argv is None else argv,
        "model": {"layers": config.num_layers, "hidden": config.hidden_size, "experts": args.experts,
                  "top_k": args.top_k, "dtype": str(dtype).removeprefix("torch.")}, "modes": {}}
    with torch.no_grad():
        references = {t: model(*a).float().cpu() for t, a in calls.items()}
        for name in args.modes:
            print(f"[bench.moe] {name} ...", file=sys.stderr, flush=True)
            torch._dynamo.reset()
            torchpcg.reset_stats()
            runner = build(name, model, args.quick)
            if runner is None:
                results["modes"][name] = {"status": "unavailable", "reason": "needs a CUDA GPU"}
                continue
            start = time.perf_counter()
            for _ in range(3):
                for a in calls.values():
                    runner(*a)  # compile, warm, capture
            row: dict[str, Any] = {"status": "ok", "setup_s": round(time.perf_counter() - start, 2), "median_ms": {},
                                   "max_abs_diff": {}}
            setup = torchpcg.stats()
            row["setup_counters"] = {k: setup[k] for k in COUNTED}
            torchpcg.reset_stats()  # from here: the timed calls, where nothing should be compiled or captured
            for t, a in calls.items():
                row["max_abs_diff"][t] = float((runner(*a).float().cpu() - references[t]).abs().max())
                row["median_ms"][t] = round(measure.time_call(lambda a=a: runner(*a), device, 2, args.repeats).median_ms, 3)
            stats = torchpcg.stats()
            row["counters"] = {k: stats[k] for k in COUNTED}
            results["modes"][name] = row
    write_record(args.out, "moe", results, markdown)
    return 0


def markdown(results: dict[str, Any]) -> str:
    modes = {n: r for n, r in results["modes"].items() if r["status"] == "ok"}
    tokens = sorted({int(t) for r in modes.values() for t in r["median_ms"]})
    m = results["model"]
    lines = [f"# MoE decode steps ({m['layers']} layers, hidden {m['hidden']}, {m['experts']} experts, top-{m['top_k']}, "
             f"{m['dtype']}) on {results['device']}, torch {results['torch']}, commit {results['commit']}", "",
             "| mode | " + " | ".join(f"T={t} ms" for t in tokens)
             + " | Dynamo graphs (setup) | recaptures (timed) | captured (timed) |",
             "|---|" + "---:|" * (len(tokens) + 3)]
    for name, r in modes.items():
        c = r["counters"]
        lines.append(f"| {name} | " + " | ".join(f"{r['median_ms'][t]:.3f}" for t in tokens)
                     + f" | {r['setup_counters']['dynamo_graphs']} | {c['recaptures']} | {c['captured']} |")
    best = {t: min(r["median_ms"][t] for n, r in modes.items() if n != "piecewise") for t in tokens}
    if "piecewise" in modes and best:
        lines += ["", "piecewise ÷ the best other mode (lower is better): " + ", ".join(
            f"T={t} {modes['piecewise']['median_ms'][t] / best[t]:.2f}x" for t in tokens) + "."]
    for name, r in results["modes"].items():
        if r["status"] != "ok":
            lines.append(f"- `{name}`: n/a ({r['reason']})")
    return "\n".join(lines) + "\n"



if __name__ == "__main__":
    raise SystemExit(main())
