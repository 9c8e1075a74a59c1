"""Decoder bench: every mode of bench/modes.py on the reference decoder, in one process.

In: command-line flags (`python -m bench.decoder --help`). Out: a Markdown report on stdout and, in
--out (default bench/results/), <date>-<device>.json, .md and .png. Exit status 1 when a mode
failed or disagreed with eager beyond tolerance (the files are written first), 2 on bad flags.

Example::

    python -m bench.decoder                      # GPU, reference size, all modes (a few minutes)
    python -m bench.decoder --quick --out /tmp/b # CPU smoke: tiny model, emulated graphs, < 60 s

Note: one sequence per call (the decoder's flat-token API); no batching, no sampling.
"""
from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import random
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from bench import measure, report
from bench.cli import DEFAULT_TOL, DTYPES, UsageError, exit_status, git_commit, names_from, positive_ints
from bench.modes import MODE_NAMES, MODES, BenchContext, Mode, ModeUnavailable, Runner
from torchpcg.models.decoder import DecoderConfig, FlatDecoder, reference_config

__all__ = ["main", "Settings", "ModeOutcome", "UsageError"]

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_TOKENS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)
QUICK_TOKENS = (1, 4, 16)
ATTENTION_OP = "torchpcg_models::kv_attention"
# --attention: the reference decoder's op, or bench/packed_attention.py's (k/v stacked in the graph).
ATTENTION_VARIANTS = ("reference", "packed")
QUICK_CAPTURE_SIZES = (1, 2, 4, 8)  # 16 is above the largest bucket: the fallback path runs too
QUICK_SKIPPED = {"inductor": "skipped by --quick: a cold CPU Inductor compile takes 5-30 s on 2 cores; "
                            "pass --modes to run it"}
METHOD = (
    "latency: per call, torch.cuda.synchronize(); perf_counter; call; synchronize; perf_counter "
    "(host overhead included), after `warmup` untimed calls; median and p90 (linear) of `repeats`, "
    "taken in `rounds` passes over the token counts (a burst of host noise spreads over every T). "
    "setup: build + compile + capture of every bucket + `warm_calls` calls per token count, wall clock. "
    "memory: allocated/reserved delta across setup after gc + empty_cache (graph pools, compiled "
    "constants, static buffers); peak = max_memory_allocated over the mode's whole run. "
    "correctness: once per T, KV-cache context restored, logits vs eager on the same cache, "
    "rel_err = ||out-ref||/||ref|| in float64."
)


# ---- settings ------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Settings:
    """Everything a run depends on, resolved from flags (explicit flags > --quick defaults > defaults)."""

    quick: bool
    device: torch.device
    dtype: torch.dtype
    model_config: DecoderConfig
    context: int  # tokens already in the KV cache before each call: positions = context + arange(T)
    tokens: tuple[int, ...]
    modes: tuple[str, ...]
    skipped: dict[str, str]  # listed in the report as n/a with this reason, not run
    capture_sizes: tuple[int, ...] | None  # None = piecewise's default buckets
    piecewise_options: dict[str, Any]
    warmup: int
    repeats: int
    rounds: int
    mixed_calls: int
    seed: int
    tol: float
    out_dir: Path
    commit: str | None
    progress: bool
    argv: tuple[str, ...]  # the flags of this run, for the record
    isolate: bool = False  # each mode in its own process (run_isolated)
    attention: str = "reference"  # the decoder's split op: ATTENTION_VARIANTS


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.decoder", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--quick", action="store_true", help="CPU smoke: tiny model, emulated graphs, 3 token counts")
    p.add_argument("--out", type=Path, default=REPO_ROOT / "bench" / "results", help="output directory")
    p.add_argument("--modes", type=names_from(MODE_NAMES), default=None, help=f"comma list from {','.join(MODE_NAMES)} (default all)")
    p.add_argument("--tokens", type=positive_ints, default=None, help="comma list of T (default 1,2,4,...,1024; quick 1,4,16)")
    p.add_argument("--device", default=None, help="cuda (default) or cpu (default with --quick)")
    p.add_argument("--dtype", choices=sorted(DTYPES), default=None, help="bfloat16 (default) or float32 (quick)")
    p.add_argument("--context", type=int, default=None, help="tokens already cached (default 128; quick 32)")
    group = p.add_argument_group("model (default: reference_config(); quick: DecoderConfig())")
    for flag, field in _MODEL_FLAGS.items():
        group.add_argument(f"--{flag}", type=int, default=None, dest=field, help=f"DecoderConfig.{field}")
    p.add_argument("--capture-sizes", type=positive_ints, default=None,
                   help="buckets for piecewise and whole-model graphs (default piecewise's; quick 1,2,4,8)")
    p.add_argument("--piecewise-option", action="append", default=[], metavar="KEY=VALUE",
                   help="extra torchpcg option, repeatable (e.g. compiler=eager)")
    p.add_argument("--warmup", type=int, default=None, help="untimed calls per (mode, T) (default 5; quick 1)")
    p.add_argument("--repeats", type=int, default=None, help="timed calls per (mode, T) (default 30; quick 3)")
    p.add_argument("--rounds", type=int, default=5,
                   help="passes over the token counts the repeats are spread over (default 5; 1: back to back)")
    p.add_argument("--mixed-calls", type=int, default=200, help="calls in the mixed-traffic run (>= 200 counts)")
    p.add_argument("--seed", type=int, default=0, help="weights, inputs and mixed-traffic sizes")
    p.add_argument("--tol", type=float, default=None, help="max rel_err vs eager (default 3e-2 bf16, 1e-4 fp32)")
    p.add_argument("--commit", default=None, help="commit to record when git is unavailable")
    p.add_argument("--no-progress", action="store_true", help="no tqdm bars on stderr")
    p.add_argument("--attention", choices=ATTENTION_VARIANTS, default="reference",
                   help="the decoder's split op: the reference kv_attention, or 'packed' (k and v stacked in the "
                        "graph, one cache-write kernel; bench/packed_attention.py), for every mode")
    p.add_argument("--isolate", action="store_true",
                   help="run each mode in its own Python process (nothing left over from earlier modes: Dynamo "
                        "caches, graph pools, Python objects); results merged into one report")
    args = p.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    return args


_MODEL_FLAGS = {"layers": "num_layers", "hidden": "hidden_size", "heads": "num_heads", "kv-heads": "num_kv_heads",
                "intermediate": "intermediate_size", "vocab": "vocab_size", "max-seq-len": "max_seq_len"}


def resolve_settings(args: argparse.Namespace) -> Settings:
    quick = args.quick
    dtype = DTYPES[args.dtype or ("float32" if quick else "bfloat16")]
    base = DecoderConfig() if quick else reference_config()
    overrides = {field: getattr(args, field) for field in _MODEL_FLAGS.values() if getattr(args, field) is not None}
    model_config = dataclasses.replace(base, **overrides)
    device = torch.device(args.device or ("cpu" if quick else "cuda"))
    # The decoder's attention is a custom op: name it as a split op, as a user of such a model would.
    options: dict[str, Any] = {"split_ops": (_split_op(args.attention),)}
    if quick or device.type != "cuda":
        options.update(cudagraph="emulate", compiler="eager" if quick else "inductor")
    capture_sizes = args.capture_sizes or (QUICK_CAPTURE_SIZES if quick else None)
    if capture_sizes is not None:
        options["capture_sizes"] = capture_sizes
    if args.rounds < 1:
        raise UsageError(f"--rounds {args.rounds}: expected a positive number of passes (1: back to back)")
    for item in args.piecewise_option:
        key, sep, value = item.partition("=")
        if not sep:
            raise UsageError(f"--piecewise-option {item!r}: expected KEY=VALUE, e.g. compiler=eager")
        options[key.strip()] = value.strip()
    settings = Settings(
        quick=quick, device=device, dtype=dtype, model_config=model_config,
        context=args.context if args.context is not None else (32 if quick else 128),
        tokens=tuple(sorted(set(args.tokens or (QUICK_TOKENS if quick else DEFAULT_TOKENS)))),
        modes=args.modes or MODE_NAMES, skipped={} if args.modes or not quick else dict(QUICK_SKIPPED),
        capture_sizes=capture_sizes, piecewise_options=options,
        warmup=args.warmup if args.warmup is not None else (1 if quick else 5),
        repeats=args.repeats if args.repeats is not None else (3 if quick else 30),
        rounds=args.rounds,
        mixed_calls=args.mixed_calls, seed=args.seed, tol=args.tol or DEFAULT_TOL[dtype],
        out_dir=args.out, commit=args.commit, progress=not args.no_progress, argv=tuple(args.argv),
        isolate=args.isolate, attention=args.attention,
    )
    _check_fits(settings)
    return settings


def _split_op(attention: str) -> str:
    """The decoder's split op for ``--attention``; the packed one is registered only when asked for."""
    if attention == "reference":
        return ATTENTION_OP
    from bench.packed_attention import PACKED_ATTENTION_OP

    return PACKED_ATTENTION_OP


def _check_fits(settings: Settings) -> None:
    needed = settings.context + max(settings.tokens) + 1  # +1: the scratch slot padded rows write
    if needed > settings.model_config.max_seq_len:
        raise UsageError(f"--context {settings.context} + max T {max(settings.tokens)} + 1 scratch slot = {needed} "
                         f"> max_seq_len {settings.model_config.max_seq_len}; "
                         f"pass --max-seq-len {needed} or fewer tokens")
    if settings.device.type == "cuda" and not torch.cuda.is_available():
        raise UsageError("no CUDA device: run with --quick (or --device cpu) on a CPU machine")


# ---- the model and its inputs --------------------------------------------------------------------

def build_model(settings: Settings) -> tuple[FlatDecoder, torch.Tensor]:
    """Random-weight decoder on the device (weights cast to dtype; buffers such as rotary stay fp32)."""
    with torch.device(settings.device):
        model = FlatDecoder(settings.model_config, seed=settings.seed)
    if settings.attention == "packed":
        from bench.packed_attention import use_packed_attention

        use_packed_attention(model)
    for param in model.parameters():
        param.data = param.data.to(settings.dtype)
    model.eval().requires_grad_(False)
    return model, model.new_kv_cache(settings.device, settings.dtype)


def prefill(model: FlatDecoder, kv_cache: torch.Tensor, settings: Settings) -> torch.Tensor:
    """Fill positions [0, context) of the cache with the eager model; return a copy of that prefix."""
    if settings.context:
        generator = torch.Generator(settings.device).manual_seed(settings.seed + 1)
        ids = torch.randint(0, settings.model_config.vocab_size, (settings.context,), generator=generator,
                            device=settings.device)
        model(ids, torch.arange(settings.context, device=settings.device), kv_cache)
    return kv_cache[:, :, : settings.context].clone()  # [L, 2, context, Hkv, D]


class InputMaker:
    """Random token ids (never zeros) and positions context + arange(T), from a seeded generator."""

    def __init__(self, settings: Settings, seed_offset: int) -> None:
        self.settings = settings
        self.generator = torch.Generator(settings.device).manual_seed(settings.seed + seed_offset)

    def __call__(self, num_tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
        s = self.settings
        ids = torch.randint(1, s.model_config.vocab_size, (num_tokens,), generator=self.generator, device=s.device)
        return ids, torch.arange(s.context, s.context + num_tokens, device=s.device)


def mixed_traffic_sizes(calls: int, seed: int, largest_bucket: int, max_tokens: int) -> list[int]:
    """Seeded T per call: 60% decode-like 1..8, 30% up to the largest bucket, 10% above it (up to max_tokens)."""
    rng = random.Random(seed)
    small_top, bucket_top = min(8, max_tokens), min(largest_bucket, max_tokens)
    sizes = []
    for _ in range(calls):
        draw = rng.random()
        if draw < 0.1 and max_tokens > largest_bucket:
            sizes.append(rng.randint(largest_bucket + 1, max_tokens))
        elif draw < 0.4 and bucket_top > small_top:
            sizes.append(rng.randint(small_top + 1, bucket_top))
        else:
            sizes.append(rng.randint(1, small_top))
    if max_tokens > largest_bucket and all(t <= largest_bucket for t in sizes) and sizes:
        sizes[-1] = max_tokens  # always exercise the no-graph path when the flags allow it
    return sizes


def distinct_traffic_sizes(calls: int, seed: int, largest_bucket: int, max_tokens: int) -> list[int]:
    """Seeded T per call, uniform over 1..min(largest bucket, max_tokens), every T distinct while sizes
    are left (a server's traffic: nearly every call a token count not seen before)."""
    rng = random.Random(seed)
    top = min(largest_bucket, max_tokens)
    sizes: list[int] = []
    while len(sizes) < calls:
        sizes += rng.sample(range(1, top + 1), min(top, calls - len(sizes)))
    return sizes


def default_buckets(settings: Settings) -> tuple[int, ...]:
    """The buckets piecewise will use (its config resolves options and TORCHPCG_* env the same way)."""
    from torchpcg.config import PiecewiseConfig

    return PiecewiseConfig.resolve(settings.piecewise_options).buckets


# ---- running one mode ----------------------------------------------------------------------------

@dataclasses.dataclass
class ModeOutcome:
    """What one mode produced. status: ok | wrong (ran, disagreed with eager) | failed | unavailable."""

    name: str
    status: str = "ok"
    reason: str = ""
    setup_s: float | None = None
    memory_mb: dict[str, float | None] = dataclasses.field(default_factory=dict)
    latency: dict[int, measure.Latency] = dataclasses.field(default_factory=dict)
    errors: dict[int, measure.ErrorReport] = dataclasses.field(default_factory=dict)
    mixed_s: float | None = None
    mixed_again_s: float | None = None  # the same calls once more: first-sight costs paid
    distinct_s: float | None = None  # calls of distinct T, uniform over 1..largest bucket (distinct_traffic_sizes)
    info: dict[str, Any] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass(frozen=True)
class Workload:
    """Inputs shared by every mode: fixed per-T inputs, eager references, the mixed-traffic calls."""

    inputs: dict[int, tuple[torch.Tensor, torch.Tensor]]
    references: dict[int, torch.Tensor]  # eager logits on the CPU
    mixed: list[tuple[torch.Tensor, torch.Tensor]]
    distinct: list[tuple[torch.Tensor, torch.Tensor]]  # every call a new T (distinct_traffic_sizes)
    prefix: torch.Tensor  # cache[:, :, :context] after prefill; modes must never change it


def run_mode(mode: Mode, ctx: BenchContext, workload: Workload, settings: Settings, bar: tqdm) -> ModeOutcome:
    outcome = ModeOutcome(mode.name)
    if mode.needs_cuda and settings.device.type != "cuda":
        return _unavailable(outcome, f"needs CUDA (running on {settings.device.type})")
    ctx = dataclasses.replace(ctx, info={})
    _reset_torchpcg_stats()
    free_memory(settings.device)
    measure.reset_peak(settings.device)
    before = measure.memory_snapshot(settings.device)
    runner: Runner | None = None
    try:
        bar.set_postfix_str(f"{mode.name}: setup")
        runner, outcome.setup_s = _setup(mode, ctx, settings)
        free_memory(settings.device, dynamo=False)
        outcome.memory_mb = _memory_delta(before, measure.memory_snapshot(settings.device))
        bar.set_postfix_str(f"{mode.name}: check")
        _check(runner, ctx, workload, settings, outcome)
        outcome.info["host_op_us"] = round(measure.host_op_us(settings.device), 2)  # the host's speed now
        _time_tokens(runner, workload, settings, outcome, bar)
        bar.set_postfix_str(f"{mode.name}: mixed")
        calls = [_call(runner, *args) for args in workload.mixed]
        outcome.mixed_s = measure.time_sequence(calls, settings.device)
        outcome.mixed_again_s = measure.time_sequence(calls, settings.device)
        bar.set_postfix_str(f"{mode.name}: every T new")
        outcome.distinct_s = measure.time_sequence([_call(runner, *args) for args in workload.distinct], settings.device)
        outcome.memory_mb["peak_allocated"] = measure.peak_allocated_mb(settings.device)
        _check_prefix(ctx, workload, outcome)
    except ModeUnavailable as err:
        _unavailable(outcome, str(err))
        if err.__cause__ is not None:
            outcome.info["traceback"] = "".join(traceback.format_exception(err.__cause__))
    except Exception as err:  # noqa: BLE001 - record, keep measuring the other modes, exit 1 at the end
        outcome.status, outcome.reason = "failed", f"{type(err).__name__}: {err}".splitlines()[0]
        outcome.info["traceback"] = traceback.format_exc()
        print(outcome.info["traceback"], file=sys.stderr)
    outcome.info.update(ctx.info)
    outcome.info.update(_torchpcg_stats(mode.name, runner))
    unmark_cache(ctx.kv_cache)
    try:
        ctx.kv_cache[:, :, : settings.context].copy_(workload.prefix)  # the next mode starts from the same cache
    except RuntimeError:
        pass  # the device is unusable; run() finds out through cuda_broken() and skips the rest
    return outcome


def _setup(mode: Mode, ctx: BenchContext, settings: Settings) -> tuple[Runner, float]:
    """Build (compile, capture) and warm every T; wall-clock seconds including the final synchronize."""
    start = time.perf_counter()
    try:
        runner = mode.build(ctx)
        for num_tokens in sorted(settings.tokens, reverse=True):
            ids, positions = ctx.make_inputs(num_tokens)
            for _ in range(mode.warm_calls):
                runner(ids, positions)
        measure.synchronize(settings.device)
    except ModeUnavailable:
        raise
    except Exception as err:
        if not mode.setup_may_fail:
            raise
        first_line = (str(err).strip().splitlines() or [""])[0]
        raise ModeUnavailable(f"setup raised {type(err).__name__}: {first_line}") from err
    return runner, time.perf_counter() - start


def _check(runner: Runner, ctx: BenchContext, workload: Workload, settings: Settings, outcome: ModeOutcome) -> None:
    for num_tokens, (ids, positions) in workload.inputs.items():
        ctx.kv_cache[:, :, : settings.context].copy_(workload.prefix)
        report = measure.compare(runner(ids, positions), workload.references[num_tokens], settings.tol)
        outcome.errors[num_tokens] = report
        if not report.ok and outcome.status == "ok":
            outcome.status = "wrong"
            outcome.reason = (f"T={num_tokens}: rel_err {report.rel_err:.3g} > tol {settings.tol:g} "
                              f"(max |diff| {report.max_abs_diff:.3g}, max |ref| {report.ref_max_abs:.3g})")


def _time_tokens(runner: Runner, workload: Workload, settings: Settings, outcome: ModeOutcome, bar: tqdm) -> None:
    bar.set_postfix_str(f"{outcome.name}: timing")
    calls = {num_tokens: _call(runner, ids, positions) for num_tokens, (ids, positions) in workload.inputs.items()}
    outcome.latency.update(measure.time_calls(calls, settings.device, settings.warmup, settings.repeats,
                                              settings.rounds))


def _check_prefix(ctx: BenchContext, workload: Workload, outcome: ModeOutcome) -> None:
    if not torch.equal(ctx.kv_cache[:, :, : workload.prefix.shape[2]], workload.prefix) and outcome.status == "ok":
        outcome.status, outcome.reason = "wrong", "wrote into the cached context (positions < context)"


def _call(runner: Runner, ids: torch.Tensor, positions: torch.Tensor):
    return lambda: runner(ids, positions)


def _unavailable(outcome: ModeOutcome, reason: str) -> ModeOutcome:
    outcome.status, outcome.reason = "unavailable", reason
    outcome.latency.clear()
    outcome.errors.clear()
    outcome.mixed_s = outcome.mixed_again_s = outcome.distinct_s = outcome.setup_s = None
    outcome.memory_mb = {}
    return outcome


def _memory_delta(before: measure.MemorySnapshot | None, after: measure.MemorySnapshot | None) -> dict[str, Any]:
    if before is None or after is None:
        return {"setup_reserved_delta": None, "setup_allocated_delta": None, "peak_allocated": None}
    return {"setup_reserved_delta": after.reserved_mb - before.reserved_mb,
            "setup_allocated_delta": after.allocated_mb - before.allocated_mb, "peak_allocated": None}


def free_memory(device: torch.device, dynamo: bool = True) -> None:
    gc.collect()
    if dynamo:
        torch._dynamo.reset()  # also resets cudagraph trees
        gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()


def cuda_broken(device: torch.device) -> str | None:
    """None if the device still works, else why (a failed capture can poison the context)."""
    if device.type != "cuda":
        return None
    try:
        torch.cuda.synchronize(device)
        torch.ones(1, device=device).add_(1).item()
    except Exception as err:  # noqa: BLE001
        return f"{type(err).__name__}: {err}".splitlines()[0]
    return None


def _reset_torchpcg_stats() -> None:
    torchpcg = sys.modules.get("torchpcg")
    if torchpcg is not None and hasattr(torchpcg, "reset_stats"):
        torchpcg.reset_stats()


def _torchpcg_stats(mode_name: str, runner: Runner | None) -> dict[str, Any]:
    """torchpcg's counters after a piecewise mode, and how many calls ran Dynamo's code directly: on
    the call key alone (``direct_calls``, skip_guard_check) or after its guards (``guarded_calls``)."""
    torchpcg = sys.modules.get("torchpcg")
    if not mode_name.startswith("piecewise") or torchpcg is None or not hasattr(torchpcg, "stats"):
        return {}
    stats: dict[str, Any] = {"torchpcg_stats": torchpcg.stats()}
    compiled = getattr(runner, "compiled", None)
    for counter in ("direct_calls", "guarded_calls"):
        value = getattr(compiled, counter, None)
        if value is not None:
            stats[counter] = value
    return stats


# ---- the run -------------------------------------------------------------------------------------

def unmark_cache(kv_cache: torch.Tensor) -> None:
    """Undo reduce-overhead's ``mark_static_address`` on the cache: later modes see it plain."""
    if hasattr(kv_cache, "_dynamo_static_input_type"):
        del kv_cache._dynamo_static_input_type


def measure_modes(ctx: BenchContext, names: tuple[str, ...], measure: Callable[[Runner], Any]) -> dict[str, Any]:
    """``{mode: measure(runner)}`` for each mode in run order, built one after another on ``ctx``'s
    one model and cache (``{"unavailable": why}`` where a mode cannot be built). Each mode's graphs
    and compiled code are freed before the next is built; for the scripts that profile modes."""
    results: dict[str, Any] = {}
    for mode in run_order(names):
        try:
            runner = mode.build(dataclasses.replace(ctx, info={}))
            results[mode.name] = measure(runner)
            del runner
        except ModeUnavailable as err:
            results[mode.name] = {"unavailable": str(err)}
        unmark_cache(ctx.kv_cache)
        free_memory(ctx.device)
    return results


def run_order(names: tuple[str, ...]) -> list[Mode]:
    """Display order, except modes whose failed capture may break CUDA run last."""
    chosen = [mode for mode in MODES if mode.name in names]
    return sorted(chosen, key=lambda mode: mode.may_break_cuda)


def build_workload(model: FlatDecoder, ctx: BenchContext, settings: Settings, prefix: torch.Tensor) -> Workload:
    make = InputMaker(settings, seed_offset=2)
    inputs = {num_tokens: make(num_tokens) for num_tokens in settings.tokens}
    references = {}
    for num_tokens, (ids, positions) in inputs.items():
        ctx.kv_cache[:, :, : settings.context].copy_(prefix)
        references[num_tokens] = model(ids, positions, ctx.kv_cache).to("cpu")
    mixed_make = InputMaker(settings, seed_offset=3)
    traffic = (settings.mixed_calls, settings.seed, ctx.buckets[-1], max(settings.tokens))
    mixed = [mixed_make(t) for t in mixed_traffic_sizes(*traffic)]
    distinct_make = InputMaker(settings, seed_offset=4)
    distinct = [distinct_make(t) for t in distinct_traffic_sizes(*traffic)]
    return Workload(inputs, references, mixed, distinct, prefix)


def run(settings: Settings) -> dict[str, Any]:
    torch.manual_seed(settings.seed)
    threads = torch.get_num_threads()
    if settings.quick:
        torch.set_num_threads(1)  # CI boxes have 2 shared cores: OpenMP spinning stalls when one is busy
    try:
        return _run(settings)
    finally:
        torch.set_num_threads(threads)


def script_settings(tokens: str, piecewise_options: list[str], quick: bool = False) -> Settings:
    """The bench's settings for a profiling script: its ``--tokens`` and ``--piecewise-option``
    values (and ``--quick``), everything else the bench's defaults, no progress bar."""
    flags = ["--quick"] if quick else []
    for item in piecewise_options:
        flags += ["--piecewise-option", item]
    return resolve_settings(parse_args(flags + ["--tokens", tokens, "--no-progress"]))


def prefilled_context(settings: Settings) -> BenchContext:
    """The decoder built, its cache prefilled, and the context every mode builder gets: what the
    profiling scripts start from (``ctx.model``, ``ctx.kv_cache``). Call under ``torch.no_grad()``."""
    model, kv_cache = build_model(settings)
    prefill(model, kv_cache, settings)
    return bench_context(settings, model, kv_cache)


def script_record(settings: Settings, **fields: Any) -> dict[str, Any]:
    """A profiling script's JSON record: torch, device and commit first, then ``fields``."""
    device = torch.cuda.get_device_name(settings.device) if settings.device.type == "cuda" else "cpu"
    return {"torch": torch.__version__, "device": device, "commit": commit_of(settings), **fields}


def write_script_record(path: Path, results: dict[str, Any], markdown: Callable[[dict[str, Any]], str]) -> None:
    """Write a profiling script's record to ``path`` as JSON and print its Markdown table."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(results, indent=2) + "\n")
    print(markdown(results))


def bench_context(settings: Settings, model: FlatDecoder, kv_cache: torch.Tensor) -> BenchContext:
    """What every mode builder gets: the model, its cache, the default buckets, fresh inputs per T."""
    return BenchContext(model=model, kv_cache=kv_cache, device=settings.device, buckets=default_buckets(settings),
                        scratch_position=settings.model_config.max_seq_len - 1,
                        make_inputs=InputMaker(settings, seed_offset=4), tokens=settings.tokens,
                        piecewise_options=settings.piecewise_options)


def _run(settings: Settings) -> dict[str, Any]:
    with torch.no_grad():
        model, kv_cache = build_model(settings)
        prefix = prefill(model, kv_cache, settings)
        ctx = bench_context(settings, model, kv_cache)
        buckets = ctx.buckets
        workload = build_workload(model, ctx, settings, prefix)
        # The graph-memory target's yardstick: one eager call at the largest bucket (cache positions
        # past the context only, which every mode overwrites anyway).
        activation_peak = measure.activation_peak_mb(lambda: model(*ctx.make_inputs(buckets[-1]), kv_cache),
                                                     settings.device)
        activation_reserved = measure.activation_reserved_mb(
            lambda: model(*ctx.make_inputs(buckets[-1]), kv_cache), settings.device)
        workspace = measure.stream_workspace_mb(settings.device, settings.dtype)
        baseline = measure.memory_snapshot(settings.device)
        machine = measure.machine_speed(settings.device)
        commit, params = commit_of(settings), sum(p.numel() for p in model.parameters())
        outcomes: dict[str, ModeOutcome] = {}
        broken: str | None = None
        modes = run_order(settings.modes)
        bar = tqdm(modes, desc="modes", unit="mode", disable=not settings.progress, file=sys.stderr,
                   mininterval=0.5 if sys.stderr.isatty() else 30.0)  # logs: a line per 30 s, not per update
        for mode in bar:
            if broken or mode.name in settings.skipped:
                outcomes[mode.name] = _unavailable(ModeOutcome(mode.name), broken or settings.skipped[mode.name])
                continue
            outcomes[mode.name] = run_mode(mode, ctx, workload, settings, bar)
            why = cuda_broken(settings.device)
            if why:
                broken = f"CUDA unusable after mode {mode.name}: {why}"
            else:
                free_memory(settings.device)
            # Write the record so far: a run killed by a time limit still leaves every finished mode.
            report.write(report.build(settings, outcomes, buckets, workload, baseline, METHOD, commit, params,
                                      activation_peak, machine, activation_reserved, workspace), settings.out_dir,
                         quick=settings.quick)
        bar.close()
    return report.build(settings, outcomes, buckets, workload, baseline, METHOD, commit, params, activation_peak,
                        machine, activation_reserved, workspace)


_PER_MODE_FLAGS = ("--modes", "--out", "--commit")  # flags (with a value) that run_isolated sets per child


def run_isolated(settings: Settings) -> dict[str, Any]:
    """Each mode in a fresh ``python -m bench.decoder`` process, in run order; one merged record.

    In one process every mode inherits what the earlier ones left: the model's Dynamo cache
    entries, graph pools, and millions of Python objects that the garbage collector walks during
    timed calls. A fresh process per mode measures each as a user who runs only that mode would.
    The Inductor cache on disk is shared, so later modes may compile faster (setup_s).
    """
    child_flags, skip = [], False
    for flag in settings.argv:
        if skip:
            skip = False
        elif flag in _PER_MODE_FLAGS:
            skip = True
        elif flag != "--isolate" and not flag.startswith(tuple(f + "=" for f in _PER_MODE_FLAGS)):
            child_flags.append(flag)
    commit = commit_of(settings)
    merged: dict[str, Any] | None = None
    crashed: dict[str, str] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for mode in run_order(settings.modes):
            out = Path(tmp) / mode.name
            command = [sys.executable, "-m", "bench.decoder", *child_flags, "--modes", mode.name, "--out", str(out),
                       "--commit", commit]
            print(f"[isolate] {mode.name}: {' '.join(command[1:])}", file=sys.stderr, flush=True)
            done = subprocess.run(command, cwd=REPO_ROOT, stdout=subprocess.DEVNULL, check=False)
            found = sorted(out.glob("*.json"))
            if not found:
                crashed[mode.name] = f"its process exited with {done.returncode} and wrote no results"
                continue
            child = json.loads(found[0].read_text())
            merged = child if merged is None else _merge(merged, child)
            merged["complete"] = False
            report.write(merged, settings.out_dir, quick=settings.quick)  # a run cut off keeps the modes done
    if merged is None:
        raise SystemExit("python -m bench.decoder --isolate: no mode wrote results")
    merged["failed"].update(crashed)
    merged["argv"] = list(settings.argv)
    merged["method"] += " Each mode ran in its own process (--isolate)."
    merged["complete"] = all(name in merged["modes"] or name in merged["failed"] for name in settings.modes)
    return merged


def _merge(merged: dict[str, Any], child: dict[str, Any]) -> dict[str, Any]:
    merged["results"] += child["results"]
    for key in ("mixed", "mixed_again", "mixed_distinct", "setup_s", "memory_mb", "unavailable", "failed", "wrong", "info", "modes"):
        merged.setdefault(key, {}).update(child.get(key, {}))
    order = {name: i for i, name in enumerate(MODE_NAMES)}  # the report's tables list modes in table order
    merged["results"].sort(key=lambda row: (order[row["mode"]], row["tokens"]))
    merged["modes"] = dict(sorted(merged["modes"].items(), key=lambda item: order[item[0]]))
    return merged


def commit_of(settings: Settings) -> str:
    """--commit, else HEAD's hash (+'-dirty' when tracked files differ; see cli.git_commit), else 'unknown'.

    --commit wins: a copied tree (the GPU machine's) can carry a stale .git.
    """
    return settings.commit or git_commit(REPO_ROOT) or "unknown"


def main(argv: list[str] | None = None) -> int:
    try:
        settings = resolve_settings(parse_args(argv))
    except UsageError as err:
        print(f"python -m bench.decoder: error: {err}", file=sys.stderr)
        return 2

    results = run_isolated(settings) if settings.isolate else run(settings)
    paths = report.write(results, settings.out_dir, quick=settings.quick)
    print(report.markdown(results))
    print("\n" + "\n".join(f"wrote {path}" for path in paths))
    return exit_status(results)


if __name__ == "__main__":
    sys.exit(main())
