"""Host time of ``torchpcg.compile``'s call path around the runtime, with and without
``skip_guard_check`` or ``skip_module_guards`` (CPU is enough: no kernel runs).

Compiles the reference decoder's structure (16 layers, 115 parameters; tiny sizes), warms it up,
then replaces the runtime's ``__call__`` (what Dynamo's compiled code calls) by a stub that returns
the last output. What is left per call is the wrapper: binding the arguments, Dynamo's frame
hook and guards (or the direct call's argument key), the bytecode that loads every parameter,
and the recompile monitor.

    python scripts/call_overhead.py            # prints a Markdown table; median of 7 runs of 2000 calls
"""
from __future__ import annotations

import statistics
import sys
import time

import torch

import torchpcg
from torchpcg.models import DecoderConfig, FlatDecoder
from torchpcg.runtime import Runtime


def measure(skip_guard_check: bool, skip_module_guards: bool = False, calls: int = 2000,
            runs: int = 7) -> tuple[float, int]:
    config = DecoderConfig(vocab_size=32, hidden_size=16, num_layers=16, num_heads=2, num_kv_heads=2,
                           intermediate_size=32, max_seq_len=64)
    model = FlatDecoder(config, seed=0).eval()
    cache = model.new_kv_cache("cpu", torch.float32)
    compiled = torchpcg.compile(model, cudagraph="off", compiler="eager", token_inputs={"input_ids": 0, "positions": 0},
                                skip_guard_check=skip_guard_check, skip_module_guards=skip_module_guards)
    ids, positions = torch.tensor([3]), torch.tensor([5])
    for _ in range(3):
        out = compiled(ids, positions, cache)
    real_call = Runtime.__call__
    Runtime.__call__ = lambda self, *args: out  # the runtime's own work left out
    try:
        samples = []
        for _ in range(runs):
            start = time.perf_counter()
            for _ in range(calls):
                compiled(ids, positions, cache)
            samples.append((time.perf_counter() - start) / calls * 1e6)
    finally:
        Runtime.__call__ = real_call
    torch._dynamo.reset()
    return statistics.median(samples), compiled.direct_calls


def main() -> int:
    print(f"torch {torch.__version__}; host µs per call around a stubbed runtime, 16-layer decoder (115 parameters)\n")
    print("| skip_guard_check | skip_module_guards | µs per call | direct calls |\n|---|---|---:|---:|")
    for skip, module_guards in ((False, False), (False, True), (True, False)):
        us, direct = measure(skip, module_guards)
        print(f"| {int(skip)} | {int(module_guards)} | {us:.1f} | {direct} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
