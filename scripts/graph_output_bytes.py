"""What the graphs of one bucket hold, counted on CPU: static input buffers and graph outputs.

Builds the reference decoder (bench size unless overridden), compiles it with emulated graphs and
eager pieces, runs one call at ``--tokens`` (capturing that bucket) and sums, per kind:

- the static input buffers of every piece (allocated outside the graph pool; a buffer that
  pieces share counted once);
- the outputs of every piece's graph at that bucket (graph pool memory on a GPU). Before the
  chaining registry held its entries weakly, all of these were alive at once at the end of a
  capture pass, so the pool had to hold their sum.

    python scripts/graph_output_bytes.py                # 16 layers, hidden 2048, T=512, bf16
    python scripts/graph_output_bytes.py --layers 4 --tokens 64

Prints a Markdown table. CPU only; ~2 GB of memory at the bench size.
"""
from __future__ import annotations

import argparse
import collections
import sys

import torch

import torchpcg
from torchpcg.models import FlatDecoder, reference_config


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=16)
    parser.add_argument("--tokens", type=int, default=512)
    args = parser.parse_args(argv)
    config = reference_config(num_layers=args.layers, max_seq_len=max(1024, 2 * args.tokens + 128))
    model = FlatDecoder(config, seed=0)
    for param in model.parameters():
        param.data = param.data.to(torch.bfloat16)
    model.eval().requires_grad_(False)
    cache = model.new_kv_cache("cpu", torch.bfloat16)
    with torchpcg.backend.collect_runtimes() as runtimes:
        compiled = torchpcg.compile(model, cudagraph="emulate", compiler="eager", capture_sizes=f"1,{args.tokens}",
                                    token_inputs={"input_ids": 0, "positions": 0})
        with torch.no_grad():
            compiled(torch.randint(1, 100, (args.tokens,)), torch.arange(128, 128 + args.tokens), cache)
    (runtime,) = runtimes
    rows: collections.Counter[tuple[str, str]] = collections.Counter()
    seen: set[int] = set()  # pieces share input buffers (runtime._shared_slots): count each once
    for runner in runtime.runners:
        for index, storage in runner.storages.items():
            if storage.data_ptr() in seen:
                continue
            seen.add(storage.data_ptr())
            rows[("static input buffer", f"{tuple(runner.inputs[index].layout.sizes_at(args.tokens))} {storage.dtype}")] += _mib(storage)
        for buffer in runner.buffers.values():
            rows[("static input buffer", f"{tuple(buffer.shape)} {buffer.dtype}")] += _mib(buffer)
        for captured in runner.captured.values():
            for output in captured.graph.outputs:
                if isinstance(output, torch.Tensor):
                    rows[("graph output", f"{tuple(output.shape)} {output.dtype}")] += _mib(output)
    print(f"Reference decoder, {args.layers} layers, hidden {config.hidden_size}, bf16; one bucket, T={args.tokens}; "
          f"torch {torch.__version__}\n")
    print("| kind | shape, dtype | MiB, all pieces |\n|---|---|---:|")
    for (kind, shape), mib in sorted(rows.items(), key=lambda item: -item[1]):
        print(f"| {kind} | {shape} | {mib:.2f} |")
    for kind in ("static input buffer", "graph output"):
        print(f"| **{kind}s, total** | | **{sum(v for (k, _), v in rows.items() if k == kind):.1f}** |")
    return 0


def _mib(tensor: torch.Tensor) -> float:
    return tensor.numel() * tensor.element_size() / 2**20


if __name__ == "__main__":
    sys.exit(main())
