"""Cold vs warm start: does a second process reuse the compiled pieces?

Each run is a fresh Python process that builds the reference decoder, compiles it with the
piecewise backend (Inductor pieces) and makes one call; runs share ``TORCHINDUCTOR_CACHE_DIR``.
``cold`` starts from an empty cache (and saves its compile artifacts with
``torchpcg.save_warm_start``), ``warm`` reuses the cache directory, ``artifacts`` starts from
another empty cache directory and loads the cold run's artifacts first
(``torchpcg.load_warm_start``: a fresh machine given one file), ``concurrent`` starts two
processes on one empty cache at once (both must finish and agree with eager).

    python -m bench.warm_start --out bench/results            # CPU or GPU, whatever is there
    python -m bench.warm_start --layers 2 --hidden 64         # tiny (CI uses this)
    python -m bench.warm_start --reference --no-concurrent    # the bench's decoder, every default bucket

Writes ``warm_start-<device>.json``: {"device", "torch", "runs": {name: {setup_s, fxgraph_cache_hit,
fxgraph_cache_miss, max_abs_diff}}}.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from typing import Any

CHILD_FLAG = "--child"


def child(layers: int, hidden: int, device: str, reference: bool = False, save: str | None = None,
          load: str | None = None) -> dict[str, Any]:
    """One process: compile + first call (``reference``: the bench's decoder, every default bucket
    captured first, as a server starts); report setup seconds, cache counters and correctness.
    ``load``: a warm-start file loaded first (its time counts in setup); ``save``: written after."""
    import torch

    import torchpcg
    from torchpcg.models import DecoderConfig, FlatDecoder, reference_config

    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    if reference:
        config = reference_config()
    else:
        config = DecoderConfig(num_layers=layers, hidden_size=hidden, num_heads=max(1, hidden // 64) * 2,
                               num_kv_heads=max(1, hidden // 64) * 2, intermediate_size=hidden * 2)
    model = FlatDecoder(config).to(device, dtype).eval()
    ids = torch.arange(7, device=device) % config.vocab_size
    positions = torch.arange(7, device=device)
    scratch = model.new_kv_cache(device, dtype)
    start = time.perf_counter()
    if load:
        torchpcg.load_warm_start(load)
    buckets = {} if reference else {"capture_sizes": (8,)}  # reference: the default buckets
    compiled = torchpcg.compile(model, compiler="inductor", cudagraph="cuda" if device == "cuda" else "emulate",
                                **buckets)
    if reference:
        torchpcg.capture(compiled, lambda n: (torch.arange(n, device=device) % config.vocab_size,
                                              torch.arange(n, device=device), scratch), progress=False)
    got = compiled(ids, positions, model.new_kv_cache(device, dtype))
    setup_s = time.perf_counter() - start
    with torch.no_grad():
        expected = model(ids, positions, model.new_kv_cache(device, dtype))
    counters = torch._dynamo.utils.counters["inductor"]
    if save:
        torchpcg.save_warm_start(save)
    return {"setup_s": setup_s, "fxgraph_cache_hit": counters["fxgraph_cache_hit"],
            "fxgraph_cache_miss": counters["fxgraph_cache_miss"],
            "max_abs_diff": (got.float() - expected.float()).abs().max().item(),
            "pieces": torchpcg.stats()["pieces"], "capture_sizes": torchpcg.stats()["capture_sizes"]}


def _spawn(cache_dir: str, args: argparse.Namespace, *extra: str) -> subprocess.Popen:
    env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": cache_dir, "PYTHONUNBUFFERED": "1"}
    command = [sys.executable, "-m", "bench.warm_start", CHILD_FLAG, "--layers", str(args.layers),
               "--hidden", str(args.hidden), "--device", args.device, *(["--reference"] if args.reference else []),
               *extra]
    return subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _result(process: subprocess.Popen) -> dict[str, Any]:
    out, err = process.communicate()
    if process.returncode != 0:
        raise RuntimeError(f"child failed (exit {process.returncode}):\n{err[-3000:]}")
    return json.loads(out.strip().splitlines()[-1])


def measure(args: argparse.Namespace) -> dict[str, dict[str, Any]]:
    runs: dict[str, dict[str, Any]] = {}
    with tempfile.TemporaryDirectory() as shared, tempfile.TemporaryDirectory() as fresh, \
            tempfile.TemporaryDirectory() as loaded:
        artifacts = os.path.join(loaded, "model.warm")
        runs["cold"] = _result(_spawn(shared, args, "--save", artifacts))
        runs["warm"] = _result(_spawn(shared, args))
        runs["artifacts"] = _result(_spawn(os.path.join(loaded, "cache"), args, "--load", artifacts))
        if args.no_concurrent:
            return runs
        pair = [_spawn(fresh, args), _spawn(fresh, args)]  # two writers, one empty cache, same time
        runs["concurrent_a"], runs["concurrent_b"] = (_result(p) for p in pair)
    return runs


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(CHILD_FLAG, action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--save", default=None, help=argparse.SUPPRESS)  # child: write a warm-start file
    parser.add_argument("--load", default=None, help=argparse.SUPPRESS)  # child: load one first
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--reference", action="store_true",
                        help="the bench's reference decoder (16 layers, hidden 2048), every default bucket captured "
                             "(--layers/--hidden are ignored)")
    parser.add_argument("--no-concurrent", action="store_true", help="cold, warm and artifacts only")
    parser.add_argument("--device", default=None, help="cuda or cpu (default: cuda if available)")
    parser.add_argument("--out", default=None, help="directory for warm_start-<device>.json")
    args = parser.parse_args(argv)
    import torch

    args.device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if args.child:
        print(json.dumps(child(args.layers, args.hidden, args.device, args.reference, args.save, args.load)))
        return 0
    runs = measure(args)
    device = torch.cuda.get_device_name() if args.device == "cuda" else "cpu"
    record = {"device": device, "torch": torch.__version__, "reference": args.reference,
              "layers": None if args.reference else args.layers, "hidden": None if args.reference else args.hidden,
              "runs": runs}
    print("| run | setup s | fxgraph cache hits | misses | max abs diff vs eager |\n|---|---:|---:|---:|---:|")
    for name, run in runs.items():
        print(f"| {name} | {run['setup_s']:.2f} | {run['fxgraph_cache_hit']} | {run['fxgraph_cache_miss']} | "
              f"{run['max_abs_diff']:.2e} |")
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        suffix = "-reference" if args.reference else ""
        path = os.path.join(args.out, f"warm_start-{device.lower().replace(' ', '-')}{suffix}.json")
        with open(path, "w") as fh:
            json.dump(record, fh, indent=1)
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
