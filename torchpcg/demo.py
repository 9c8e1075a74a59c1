"""``python -m torchpcg.demo``: a newcomer's first command.

In: nothing but flags (``--device``, ``--quick``). Out: on stdout, the split plan of the reference
decoder, a piecewise-vs-eager correctness check at several token counts (one above the largest
bucket) with PASS/FAIL, and a timing table of eager, ``torch.compile`` default (Inductor) and
piecewise. Exit status 1 when any check fails.

On CPU the model is small and graphs are *emulated* (same static-buffer semantics, no speed-up):
the demo then shows correctness and the plan, not speed. On a GPU it uses the reference config in
bf16, real CUDA graphs and Inductor-compiled pieces.
"""
from __future__ import annotations

import argparse
import dataclasses
import statistics
import sys
import time
from collections.abc import Callable, Sequence

import torch

import torchpcg
from torchpcg.config import PiecewiseConfig
from torchpcg.debug import depyf_session
from torchpcg.explain import explain

__all__ = ["main", "DemoSetup", "setup_for"]


@dataclasses.dataclass(frozen=True)
class DemoSetup:
    """Everything that differs between a CPU and a GPU run of the demo."""

    device: str
    dtype: torch.dtype
    model_sizes: dict[str, int]  # DecoderConfig fields
    options: dict[str, object]  # piecewise knobs
    check_tokens: tuple[int, ...]  # correctness at these T (the last one above the largest bucket)
    time_tokens: tuple[int, ...]  # timing at these T
    iterations: int  # timed calls per (mode, T)
    tolerance: float  # max |piecewise - eager| / max |eager| allowed
    inductor: bool  # time torch.compile's default (Inductor) too


def setup_for(device: str, quick: bool) -> DemoSetup:
    """Small and quick on CPU, the reference size (bf16, real graphs) on CUDA."""
    if device.startswith("cuda"):
        layers = 4 if quick else 16
        return DemoSetup(
            device=device, dtype=torch.bfloat16,
            model_sizes={"vocab_size": 32000, "hidden_size": 2048, "num_layers": layers, "num_heads": 16,
                         "num_kv_heads": 16, "intermediate_size": 5632, "max_seq_len": 2048},
            options={"cudagraph": "cuda", "compiler": "inductor", "max_capture_size": 512},
            check_tokens=(1, 7, 64, 300, 700) if not quick else (1, 7, 700),
            time_tokens=(1, 8, 64, 256) if not quick else (1, 64),
            iterations=50 if not quick else 10, tolerance=3e-2, inductor=True)
    sizes = ({"vocab_size": 512, "hidden_size": 64, "num_layers": 2, "num_heads": 4, "num_kv_heads": 2,
              "intermediate_size": 128, "max_seq_len": 256} if quick else
             {"vocab_size": 2048, "hidden_size": 256, "num_layers": 4, "num_heads": 4, "num_kv_heads": 2,
              "intermediate_size": 688, "max_seq_len": 512})
    return DemoSetup(
        device=device, dtype=torch.float32, model_sizes=sizes,
        options={"cudagraph": "emulate", "compiler": "eager", "capture_sizes": "1,2,4,8,16,32,64"},
        check_tokens=(1, 5, 64, 100) if quick else (1, 5, 17, 64, 100),
        time_tokens=(1, 16) if quick else (1, 16, 64),
        iterations=5 if quick else 20, tolerance=1e-4, inductor=not quick)


# ---- steps ----------------------------------------------------------------------------------------

def build_model(setup: DemoSetup) -> torch.nn.Module:
    from torchpcg.models import DecoderConfig, FlatDecoder  # here: importing it registers the reference ops

    config = DecoderConfig(**setup.model_sizes)
    model = FlatDecoder(config, seed=None).to(device=setup.device, dtype=setup.dtype)
    model.init_weights(0)  # random weights, on the target device (no download)
    return model.eval()


def make_inputs(model: torch.nn.Module, num_tokens: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(input_ids [T], positions [T], a fresh KV cache) for one sequence of T tokens."""
    weight = model.embed_tokens.weight
    generator = torch.Generator().manual_seed(num_tokens)
    ids = torch.randint(0, model.config.vocab_size, (num_tokens,), generator=generator).to(weight.device)
    positions = torch.arange(num_tokens, device=weight.device)
    return ids, positions, model.new_kv_cache()


def show_plan(model: torch.nn.Module, setup: DemoSetup) -> None:
    report = explain(model, *make_inputs(model, 4), options=setup.options)
    print(report)


def check(model: torch.nn.Module, compiled: Callable, setup: DemoSetup, largest: int) -> bool:
    """Piecewise logits and KV cache against eager for each T; prints one line per T."""
    ok = True
    for num_tokens in setup.check_tokens:
        ids, positions, cache = make_inputs(model, num_tokens)
        cache_ref = cache.clone()
        with torch.no_grad():
            expected = model(ids, positions, cache_ref)
        got = compiled(ids, positions, cache)
        scale = max(expected.abs().max().item(), 1e-6)
        diff = max((got - expected).abs().max().item(), (cache - cache_ref).abs().max().item())
        passed = diff / scale <= setup.tolerance and got.shape == expected.shape
        ok &= passed
        where = "above the largest bucket: no graphs" if num_tokens > largest else f"bucket {_bucket(num_tokens, setup)}"
        print(f"  T={num_tokens:<5d} max abs diff {diff:.2e} (rel {diff / scale:.1e}, {where})  "
              f"{'PASS' if passed else 'FAIL'}", flush=True)
    return ok


def _bucket(num_tokens: int, setup: DemoSetup) -> int:
    buckets = PiecewiseConfig.resolve(setup.options).buckets
    return next(b for b in buckets if b >= num_tokens)


def time_modes(model: torch.nn.Module, modes: dict[str, Callable], setup: DemoSetup) -> dict[str, dict[int, float]]:
    """Median milliseconds per call for every mode and T (after two warm-up calls each)."""
    results: dict[str, dict[int, float]] = {name: {} for name in modes}
    for name, fn in modes.items():
        for num_tokens in setup.time_tokens:
            args = make_inputs(model, num_tokens)
            results[name][num_tokens] = _median_ms(fn, args, setup)
            print(f"  {name:<10s} T={num_tokens:<5d} {results[name][num_tokens]:8.3f} ms", flush=True)
    return results


def _median_ms(fn: Callable, args: Sequence[torch.Tensor], setup: DemoSetup) -> float:
    cuda = setup.device.startswith("cuda")
    with torch.no_grad():
        for _ in range(2):
            fn(*args)
        times = []
        for _ in range(setup.iterations):
            if cuda:
                torch.cuda.synchronize()
            start = time.perf_counter()
            fn(*args)
            if cuda:
                torch.cuda.synchronize()
            times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def print_table(results: dict[str, dict[int, float]], setup: DemoSetup) -> None:
    names = list(results)
    header = f"  {'T':>5s}  " + "  ".join(f"{n + ' ms':>13s}" for n in names)
    header += "  " + "  ".join(f"{'vs ' + n:>13s}" for n in names if n != "piecewise")
    print(header)
    for num_tokens in setup.time_tokens:
        row = f"  {num_tokens:>5d}  " + "  ".join(f"{results[n][num_tokens]:13.3f}" for n in names)
        piecewise = results["piecewise"][num_tokens]
        row += "  " + "  ".join(f"{results[n][num_tokens] / piecewise:12.2f}x" for n in names if n != "piecewise")
        print(row)
    print("  (vs X = X's time / piecewise time: above 1 means piecewise is faster)")


# ---- CLI ------------------------------------------------------------------------------------------

def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m torchpcg.demo", description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                        help="cpu or cuda[:n] (default: cuda when available)")
    parser.add_argument("--quick", action="store_true", help="smaller model, fewer sizes and timings (CI smoke)")
    parser.add_argument("--debug-dir", default=None, metavar="DIR",
                        help="also dump split plan, piece code and depyf's decompiled bytecode into DIR")
    parser.add_argument("--threads", type=int, default=1,
                        help="CPU threads for torch (default 1: stable timings on a busy or small machine)")
    args = parser.parse_args(argv)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        parser.error(f"--device {args.device}: CUDA is not available here; use --device cpu")
    start = time.perf_counter()
    if not args.device.startswith("cuda"):
        torch.set_num_threads(args.threads)

    setup = setup_for(args.device, args.quick)
    print(f"torchpcg {torchpcg.__version__} demo on {_device_name(setup.device)}, torch {torch.__version__}", flush=True)
    print(f"\n[1/4] reference decoder {setup.model_sizes} {str(setup.dtype).replace('torch.', '')}", flush=True)
    model = build_model(setup)
    print(f"  {sum(p.numel() for p in model.parameters()) / 1e6:.1f}M parameters", flush=True)

    print(f"  ({time.perf_counter() - start:.1f}s)", flush=True)
    print("\n[2/4] split plan (torchpcg.explain: compiles, runs once, captures nothing)", flush=True)
    show_plan(model, setup)

    print(f"  ({time.perf_counter() - start:.1f}s)", flush=True)
    print(f"\n[3/4] piecewise vs eager (knobs {setup.options})", flush=True)
    knobs = {**setup.options, **({"debug_dir": args.debug_dir} if args.debug_dir else {})}
    compiled = torchpcg.compile(model, **knobs)  # TORCHPCG_DEBUG_DIR works too
    debug_dir = compiled.config.debug_dir
    largest = compiled.config.largest_bucket
    with depyf_session(debug_dir):  # the first call compiles; depyf must watch it
        compiled(*make_inputs(model, 2))
    passed = check(model, compiled, setup, largest)
    if debug_dir:
        print(f"  debug dump: {debug_dir} (README.md there says what each file is)")

    print(f"  ({time.perf_counter() - start:.1f}s)", flush=True)
    print(f"\n[4/4] timing, median of {setup.iterations} calls", flush=True)
    modes: dict[str, Callable] = {"eager": model}
    if setup.inductor:
        # torch.compile's default backend, token dim marked the same way (one graph for every T)
        modes["inductor"] = torchpcg.compile(model, backend="inductor")
    modes["piecewise"] = compiled
    print_table(time_modes(model, modes, setup), setup)
    if setup.device == "cpu":
        print("  CPU: graphs are emulated and pieces run eagerly, so these timings say nothing about the "
              "GPU speed-up; run on a GPU for real numbers (bench/ for the full comparison).")
    stats = torchpcg.stats()
    print(f"\ntorchpcg.stats(): captured {stats['captured']} graphs, {stats['replays']} replays, "
          f"{stats['eager_runs'] + stats['graphless_runs']} calls without graphs, {stats['recompiles']} recompiles")
    print(f"{'PASS' if passed else 'FAIL'}: piecewise matches eager at T={list(setup.check_tokens)} "
          f"({time.perf_counter() - start:.0f}s)")
    return 0 if passed else 1


def _device_name(device: str) -> str:
    if device.startswith("cuda"):
        return f"{device} ({torch.cuda.get_device_name(torch.device(device))})"
    threads = torch.get_num_threads()
    return f"cpu ({threads} thread{'' if threads == 1 else 's'})"


if __name__ == "__main__":
    sys.exit(main())
