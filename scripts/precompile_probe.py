"""Does Dynamo's AOT compile shorten a warm start under the piecewise backend? (a probe, not a feature)

A warm start (a second process on a warm Inductor cache) still pays Dynamo's trace of the model,
which profiles put at 3.9-7 s of the bench decoder's 9.5-12.4 s on an H200 (docs/benchmarks.md).
torch's AOT compile (``torch._dynamo.aot_compile``, torch >= 2.10, private API) saves the traced
graph and its guards, so a later process skips the trace. It needs the backend to return a
``SerializableCallable``: here the Dynamo graph is pickled with ``GraphPickler`` (fake example
values dropped, the placeholders' shapes kept), and on load the fake values are rebuilt, the graph
is fake-propagated and ``piecewise_backend`` runs on it again, its pieces going through the FX
graph cache. vLLM's ``VllmSerializableFunction`` works the same way.

    python scripts/precompile_probe.py compare --runs 4     # fresh processes: plain warm start vs AOT load
    python scripts/precompile_probe.py save                 # one process: trace, compile, save the artifact
    python scripts/precompile_probe.py load                 # one process: load it, first call, check vs eager

Each child prints one JSON line: seconds from compile/load to the end of the first call, the FX
graph cache counters, the max abs diff vs eager at T = 1, 3, 8, 12 and torchpcg's recompile
counter. ``--device`` picks CPU (emulated graphs) or CUDA (real graphs); the default is CUDA when
there is one. ``compare`` prints each child's row to stderr as it finishes.

Note: measured on CPU (2 cores, torch 2.13.0, 16-layer tiny decoder, ``compare --runs 5``): the
loaded model matched eager (max abs diff 7.3e-7) with 0 recompiles, but its first call took no
less than a plain warm start: median 10.49 s against 9.66 s (an earlier run of 4 pairs: 8.64 s
against 8.20 s). Re-propagating fake values and rebuilding the pieces cost what skipping the
trace saved. Torch's AOT load turns on ``enable_autograd_for_aot``, which is part of Inductor's
cache key: the backend runs with it off, so a load hits the entries a plain process wrote (with
it on, the first load missed 3 of its 6 codes).

On an H200 (torch 2.11, ``compare --runs 1 --reference``: the bench's decoder, all 43 default
buckets captured inside the timed start) it is no faster either: 9.80 s loaded against 9.55 s for a
plain warm start, 20.65 s cold (bench/results/2026-11-30-nvidia-h200-precompile-d21f3ab-reference.md).
An earlier GPU run read 9.27 s against 11.47 s only because its plain process compiled 3 codes the
save had not written; ``compare`` now runs one plain process to fill the cache first.
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import pickle
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

OPTIONS: dict[str, Any] = {"capture_sizes": (1, 2, 4, 8)}
CHECK_TOKENS = (1, 3, 8, 12)  # 12: above the largest bucket


def _record(value: Any) -> tuple[Any, ...]:
    """A placeholder's example value as plain data: ("symint", name, hint) or ("tensor", sizes, strides, ...)."""
    def dims(xs: Any) -> tuple[Any, ...]:
        return tuple((str(x.node.expr), x.node.hint) if isinstance(x, torch.SymInt) else int(x) for x in xs)
    if isinstance(value, torch.SymInt):
        return ("symint", str(value.node.expr), value.node.hint)
    if isinstance(value, torch.Tensor):
        return ("tensor", dims(value.shape), dims(value.stride()), value.dtype, str(value.device))
    return ("other", value)


def _rebuild_inputs(records: list[tuple[Any, ...]], fake_mode: Any) -> list[Any]:
    """Fake inputs with fresh symbols (unbacked where the saved ones were) for the saved records."""
    from torch._dynamo.source import ConstantSource
    from torch.fx.experimental.symbolic_shapes import DimDynamic

    shape_env, symbols = fake_mode.shape_env, {}

    def symint(name: str, hint: int | None) -> torch.SymInt:
        if name not in symbols:
            if hint is None:  # unbacked, as torchpcg.compile marks T
                symbols[name] = shape_env.create_unbacked_symint()
            else:
                source = ConstantSource(name)
                expr = shape_env.create_symbol(hint, source, dynamic_dim=DimDynamic.DYNAMIC)
                symbols[name] = shape_env.create_symintnode(expr, hint=hint, source=source)
        return symbols[name]

    def size(d: Any) -> Any:
        return symint(*d) if isinstance(d, tuple) else d

    inputs: list[Any] = []
    with fake_mode:
        for record in records:
            if record[0] == "symint":
                inputs.append(symint(record[1], record[2]))
            elif record[0] == "tensor":
                _, shape, stride, dtype, device = record
                inputs.append(torch.empty_strided([size(d) for d in shape], [size(d) for d in stride], dtype=dtype,
                                                  device=device))
            else:
                inputs.append(record[1])
    shape_env.pending_fresh_unbacked_symbols.clear()  # made for the inputs, not by an op
    return inputs


try:  # torch >= 2.10; main() says so otherwise
    from torch._dynamo.aot_compile_types import SerializableCallable
except ImportError:  # pragma: no cover - old torch
    SerializableCallable = object  # type: ignore[assignment,misc]


class PiecewiseSerializable(SerializableCallable):  # type: ignore[misc,valid-type]
    """The piecewise runtime plus what rebuilds it in another process: the Dynamo graph, its inputs.

    Module level: the AOT artifact pickles the class by name.
    """

    def __init__(self, gm: torch.fx.GraphModule, records: list[tuple[Any, ...]], runtime: Any) -> None:
        self.gm, self.records, self.runtime = gm, records, runtime

    def __call__(self, *args: Any) -> Any:
        return self.runtime(*args)

    @classmethod
    def serialize_compile_artifacts(cls, fn: "PiecewiseSerializable") -> bytes:
        from torch.fx._graph_pickler import GraphPickler, Options

        for node in fn.gm.graph.nodes:  # fake values do not pickle; the shapes are in records
            for key in ("nn_module_stack", "source_fn_stack", "example_value", "val"):
                node.meta.pop(key, None)
        return pickle.dumps({"gm": GraphPickler.dumps(fn.gm, Options(ops_filter=None)), "records": fn.records})

    @classmethod
    def deserialize_compile_artifacts(cls, data: bytes) -> "PiecewiseSerializable":
        from torch._subclasses import FakeTensorMode
        from torch.fx._graph_pickler import GraphPickler
        from torch.fx.experimental.symbolic_shapes import ShapeEnv
        from torch.fx.passes.fake_tensor_prop import FakeTensorProp

        from torchpcg.backend import piecewise_backend

        state = pickle.loads(data)
        fake_mode = FakeTensorMode(shape_env=ShapeEnv())
        gm = GraphPickler.loads(state["gm"], fake_mode)
        inputs = _rebuild_inputs(state["records"], fake_mode)
        FakeTensorProp(gm, mode=fake_mode).propagate_dont_convert_inputs(*inputs)
        for node in gm.graph.nodes:  # the backend reads Dynamo's key
            if "val" in node.meta:
                node.meta["example_value"] = node.meta["val"]
        with torch._inductor.config.patch(enable_autograd_for_aot=False):  # AOT load turns it on; plain compiles run without
            runtime = piecewise_backend(gm, inputs, options=OPTIONS)
        return cls(gm, state["records"], runtime)


def serializable_backend(gm: torch.fx.GraphModule, example_inputs: list[Any]) -> PiecewiseSerializable:
    """``piecewise_backend`` whose result Dynamo's AOT compile can save."""
    from torchpcg.backend import piecewise_backend

    pristine = torch.fx.GraphModule(gm, copy.deepcopy(gm.graph))  # piecewise_backend splits gm in place
    pristine.meta = dict(gm.meta)
    records = [_record(n.meta["example_value"]) for n in gm.graph.nodes if n.op == "placeholder"]
    return PiecewiseSerializable(pristine, records, piecewise_backend(gm, example_inputs, options=OPTIONS))


def child(step: str, artifact: Path, layers: int, device: str, reference: bool = False) -> dict[str, Any]:
    """One process: ``plain`` (torch.compile + first call), ``save`` or ``load``; timings and checks.

    ``reference``: the bench's decoder in bf16 with the default buckets, every one captured before
    the first call (as ``python -m bench.warm_start --reference`` times a server's start).
    """
    import torchpcg
    from torch._dynamo.utils import counters
    from torchpcg.config import PiecewiseConfig
    from torchpcg.models import DecoderConfig, FlatDecoder, reference_config

    torch._dynamo.config.enable_aot_compile = True
    if reference:
        OPTIONS.clear()  # the default buckets; the backend reads OPTIONS on save, plain and load alike
        config, dtype = reference_config(), torch.bfloat16 if device == "cuda" else torch.float32
    else:
        config = DecoderConfig(vocab_size=512, hidden_size=128, num_layers=layers, num_heads=4, num_kv_heads=4,
                               intermediate_size=256, max_seq_len=128)
        dtype = torch.float32
    model = FlatDecoder(config, seed=0).eval().to(device, dtype)

    def tokens(num_tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
        ids = torch.arange(1, num_tokens + 1, device=device) % config.vocab_size
        positions = torch.arange(num_tokens, device=device)
        if step != "load":  # T unbacked, as torchpcg.compile marks it; a load takes the saved graph's symbols
            torch._dynamo.decorators.mark_unbacked(ids, 0)
            torch._dynamo.decorators.mark_unbacked(positions, 0)
        return ids, positions

    ids, positions = tokens(5)
    start = time.perf_counter()
    if step == "plain":
        compiled = torch.compile(model, backend="piecewise", options=OPTIONS, fullgraph=True)
    else:
        compiled = torch.compile(model, backend=serializable_backend, fullgraph=True)
    if step == "save":
        from torch._dynamo.aot_compile import ModelInput

        compiled._aot_compile([ModelInput(args=(ids, positions, model.new_kv_cache()), kwargs={},
                                          contexts=[torch.no_grad()])])
        compiled._save_aot_compiled_module(str(artifact))
    elif step == "load":
        compiled._load_aot_compiled_module(artifact.read_bytes())
    with torch.no_grad():
        if reference:
            scratch = model.new_kv_cache()
            torchpcg.capture(compiled, lambda n: (*tokens(n), scratch), sizes=PiecewiseConfig.resolve({}).buckets,
                             progress=False)
        compiled(ids, positions, model.new_kv_cache())
        first_call_s = time.perf_counter() - start
        diffs = []
        for num_tokens in CHECK_TOKENS:
            ids, positions = tokens(num_tokens)
            expected = model(ids, positions, model.new_kv_cache())
            diffs.append((compiled(ids, positions, model.new_kv_cache()) - expected).abs().max().item())
    return {"step": step, "device": device, "reference": reference, "first_call_s": round(first_call_s, 3),
            "max_abs_diff": max(diffs), "recompiles": torchpcg.stats()["recompiles"],
            "dynamo_graphs": torchpcg.stats()["dynamo_graphs"],
            "fxgraph_cache_hit": counters["inductor"]["fxgraph_cache_hit"],
            "fxgraph_cache_miss": counters["inductor"]["fxgraph_cache_miss"]}


def spawn(step: str, artifact: Path, layers: int, env: dict[str, str], device: str = "cpu",
          reference: bool = False) -> dict[str, Any]:
    proc = subprocess.run([sys.executable, __file__, step, "--artifact", str(artifact), "--layers", str(layers),
                           "--device", device, *(["--reference"] if reference else []), "--child"],
                          capture_output=True, text=True, env=env, timeout=900)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    if proc.returncode != 0 or not lines:
        raise RuntimeError(f"{step} failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
    row = json.loads(lines[-1])
    print(f"{step}: first call {row['first_call_s']:.2f} s, max abs diff {row['max_abs_diff']:.1e}, "
          f"recompiles {row['recompiles']}", file=sys.stderr, flush=True)
    return row


def compare(runs: int, layers: int, device: str, reference: bool = False) -> list[dict[str, Any]]:
    """Save once on a fresh cache (the cold start), one plain process to fill the cache, then ``runs``
    alternating plain / load processes on that warm cache.

    The save's process writes only some of the codes a plain process compiles (on an H200 it compiled
    3 codes; the next plain process hit those 3 and compiled 3 more), so the first plain process is
    labelled ``plain-first`` and kept out of the medians.
    """
    with tempfile.TemporaryDirectory() as tmp:
        env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": str(Path(tmp) / "inductor")}
        artifact = Path(tmp) / "piecewise.aot"
        rows = [spawn("save", artifact, layers, env, device, reference),
                {**spawn("plain", artifact, layers, env, device, reference), "step": "plain-first"}]
        for _ in range(runs):
            rows += [spawn(step, artifact, layers, env, device, reference) for step in ("plain", "load")]
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python scripts/precompile_probe.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("step", choices=("compare", "save", "load", "plain"))
    parser.add_argument("--runs", type=int, default=4, help="compare: plain/load pairs")
    parser.add_argument("--layers", type=int, default=16, help="decoder layers (tiny sizes otherwise)")
    parser.add_argument("--artifact", type=Path, default=Path(tempfile.gettempdir()) / "torchpcg-probe.aot")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cuda" if torch.cuda.is_available() else "cpu",
                        help="where the model runs (default: cuda when there is one)")
    parser.add_argument("--reference", action="store_true",
                        help="the bench's decoder (bf16 on CUDA), every default bucket captured in the timed start")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if not hasattr(torch._dynamo, "aot_compile"):
        print(f"torch {torch.__version__} has no torch._dynamo.aot_compile (torch >= 2.10 needed)", file=sys.stderr)
        return 2
    if args.step != "compare":
        print(json.dumps(child(args.step, args.artifact, args.layers, args.device, args.reference)))
        return 0
    rows = compare(args.runs, args.layers, args.device, args.reference)
    model = ("the bench's reference decoder, every default bucket captured" if args.reference
             else f"{args.layers} layers")
    print(f"torch {torch.__version__}, {args.device}, {model}, {args.runs} alternating runs on one warm cache\n")
    print("| step | first call s | max abs diff | recompiles | FX cache hit / miss |")
    print("|---|---:|---:|---:|---:|")
    for row in rows:
        print(f"| {row['step']} | {row['first_call_s']:.2f} | {row['max_abs_diff']:.1e} | {row['recompiles']} | "
              f"{row['fxgraph_cache_hit']} / {row['fxgraph_cache_miss']} |")
    for step in ("plain", "load"):
        times = [row["first_call_s"] for row in rows if row["step"] == step]
        print(f"\n{step}: median {statistics.median(times):.2f} s over {len(times)} runs, "
              f"{statistics.median(times) / rows[0]['first_call_s']:.2f}x the cold save", end="")
    print()
    return 0


if __name__ == "__main__":
    sys.exit(main())
