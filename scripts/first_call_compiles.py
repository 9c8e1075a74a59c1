"""What a process's first calls compile, and how much of it Inductor's FX graph cache serves (CPU).

Builds the tiny reference decoder of the tests with ``--layers`` layers, compiles it with
``torchpcg.compile`` (Inductor pieces, emulated graphs), calls it at T=8 then T=1 and prints, per
call, the wall time and Inductor's FX-graph-cache counters. T=8's call traces and compiles every
piece twice (Dynamo's T, T backed); T=1's compiles each piece for its exact shapes. Run it twice
with one cache dir to see a warm start:

    export TORCHINDUCTOR_CACHE_DIR=$(mktemp -d)
    python scripts/first_call_compiles.py --layers 6     # cold: misses for the distinct pieces only
    python scripts/first_call_compiles.py --layers 6     # warm: hits only
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests.utils: the tests' tiny decoder

import torchpcg  # noqa: E402
from tests.utils import tiny_decoder  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=6)
    args = parser.parse_args(argv)
    from torch._dynamo.utils import counters

    model = tiny_decoder(num_layers=args.layers)
    cache = model.new_kv_cache()
    compiled = torchpcg.compile(model, cudagraph="emulate", compiler="inductor", capture_sizes="1,2,4,8",
                                token_inputs={"input_ids": 0, "positions": 0})
    print(f"torch {torch.__version__}, {args.layers} layers\n\n| call | seconds | FX graph cache |\n|---|---:|---|")
    with torch.no_grad():
        for num_tokens in (8, 1):
            counters.clear()
            start = time.perf_counter()
            compiled(torch.randint(0, 100, (num_tokens,)), torch.arange(num_tokens), cache)
            seen = {k.replace("fxgraph_cache_", ""): v for k, v in counters["inductor"].items() if "cache" in k}
            print(f"| first T={num_tokens} | {time.perf_counter() - start:.2f} | "
                  f"{', '.join(f'{v} {k}' for k, v in sorted(seen.items())) or '-'} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
