"""The modes the decoder bench compares, in one table: how each is built and set up.

In: a BenchContext (model, KV cache, buckets, an input maker). Out: per mode, a Runner that maps
(input_ids [T], positions [T]) -> logits [T, vocab] against the context's KV cache, already compiled
and captured; or ModeUnavailable with the reason. Timing, correctness and memory live in
bench/decoder.py; this file is the one place to edit when an API changes.
"""
from __future__ import annotations

import bisect
import dataclasses
import logging
import sys
from collections.abc import Callable
from typing import Any

import torch
from tqdm import tqdm

__all__ = ["BenchContext", "Mode", "ModeUnavailable", "Runner", "MODES", "MODE_NAMES", "mark_token_dim"]

Inputs = tuple[torch.Tensor, torch.Tensor]  # input_ids [T] int64, positions [T] int64
Runner = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (ids, positions) -> logits [T, vocab]


class ModeUnavailable(Exception):
    """A mode cannot run here (no CUDA, capture impossible, backend missing); str(e) is the reason."""


@dataclasses.dataclass(frozen=True)
class BenchContext:
    """What every mode builder needs; built once per run by bench/decoder.py."""

    model: torch.nn.Module
    kv_cache: torch.Tensor  # [layers, 2, max_seq_len, Hkv, D]; graphs bake its address in
    device: torch.device
    buckets: tuple[int, ...]  # ascending; whole-model graphs use piecewise's buckets
    scratch_position: int  # padded rows of whole-model graphs write their k/v here; real rows never read it
    make_inputs: Callable[[int], Inputs]  # fresh random ids, positions = context + arange(T)
    tokens: tuple[int, ...]  # the token counts the bench will call with
    piecewise_options: dict[str, Any]
    info: dict[str, Any] = dataclasses.field(default_factory=dict)  # per-mode notes the builder leaves


@dataclasses.dataclass(frozen=True)
class Mode:
    """One row of the mode table."""

    name: str
    summary: str  # one line for the README and the Markdown report
    build: Callable[[BenchContext], Runner]
    needs_cuda: bool = False
    warm_calls: int = 1  # calls per token count during setup (reduce-overhead: warm, record, replay)
    may_break_cuda: bool = False  # a failed capture can leave the CUDA context unusable: run these last
    setup_may_fail: bool = False  # an error while building/capturing is a finding (n/a + reason), not a bench bug


def mark_token_dim(input_ids: torch.Tensor, positions: torch.Tensor) -> None:
    """Mark dim 0 dynamic so Dynamo compiles one graph for every T (T=1 is specialised by Dynamo)."""
    if input_ids.shape[0] >= 2:
        torch._dynamo.mark_dynamic(input_ids, 0)
        torch._dynamo.mark_dynamic(positions, 0)


# ---- builders ------------------------------------------------------------------------------------

def _bind(fn: Callable[..., torch.Tensor], kv_cache: torch.Tensor) -> Runner:
    def run(input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        return fn(input_ids, positions, kv_cache)
    run.compiled = fn  # type: ignore[attr-defined]  # the report reads counters off it (direct_calls)
    return run


def _require_cuda(ctx: BenchContext, what: str) -> None:
    if ctx.device.type != "cuda":
        raise ModeUnavailable(f"{what} needs a CUDA device (running on {ctx.device.type})")


def _prime(fn: Callable[..., torch.Tensor], ctx: BenchContext, sizes: tuple[int, ...]) -> None:
    """Compile (first call at the largest size, token dim marked dynamic) and warm fn at every size."""
    for size in sorted(sizes, reverse=True):
        input_ids, positions = ctx.make_inputs(size)
        mark_token_dim(input_ids, positions)
        fn(input_ids, positions, ctx.kv_cache)


def build_eager(ctx: BenchContext) -> Runner:
    return _bind(ctx.model, ctx.kv_cache)


def build_inductor(ctx: BenchContext) -> Runner:
    compiled = torch.compile(ctx.model)  # defaults: Inductor, no graphs
    _prime(compiled, ctx, ctx.tokens)
    return _bind(compiled, ctx.kv_cache)


def build_reduce_overhead(ctx: BenchContext, mark_cache: bool = True) -> Runner:
    """CUDA graph trees. The KV cache is marked static (what Hugging Face StaticCache does), so
    Inductor records graphs despite the cache being a mutated input; unmarked, it skips them."""
    _require_cuda(ctx, "mode='reduce-overhead' (CUDA graph trees)")
    if mark_cache:
        torch._dynamo.mark_static_address(ctx.kv_cache)  # bench/decoder.py unmarks it after the mode
    compiled = torch.compile(ctx.model, mode="reduce-overhead")
    skips = _CudagraphSkipLog.attach()
    ctx.info["cudagraph_skip_messages"] = skips.messages  # filled while compiling; empty = graphs used

    def run(input_ids: torch.Tensor, positions: torch.Tensor, kv_cache: torch.Tensor) -> torch.Tensor:
        torch.compiler.cudagraph_mark_step_begin()  # each call is a new step: earlier outputs may be overwritten
        return compiled(input_ids, positions, kv_cache)

    _prime(run, ctx, ctx.tokens)  # compile; graph trees record on later calls
    return _bind(run, ctx.kv_cache)


def build_eager_cudagraph(ctx: BenchContext) -> Runner:
    _require_cuda(ctx, "a whole-model CUDA graph")
    graphs = WholeModelGraphs(ctx.model, ctx)
    graphs.capture_all()
    ctx.info["whole_model_graphs"] = graphs.counts
    return graphs


def build_inductor_cudagraph(ctx: BenchContext) -> Runner:
    _require_cuda(ctx, "a whole-model CUDA graph")
    compiled = torch.compile(ctx.model, fullgraph=True)
    _prime(compiled, ctx, ctx.buckets)  # compile + autotune every bucket outside capture
    graphs = WholeModelGraphs(compiled, ctx)
    graphs.capture_all()
    ctx.info["whole_model_graphs"] = graphs.counts
    return graphs


def build_reduce_overhead_unmarked(ctx: BenchContext) -> Runner:
    return build_reduce_overhead(ctx, mark_cache=False)


def build_piecewise_full_decode(ctx: BenchContext) -> Runner:
    """Piecewise above full_max_size, one whole-forward graph per exact T up to it (attention inside)."""
    _require_cuda(ctx, "full-decode CUDA graphs")
    return build_piecewise(ctx, cudagraph_mode="full_and_piecewise")


def build_piecewise(ctx: BenchContext, **knobs: Any) -> Runner:
    try:
        import torchpcg
    except Exception as err:  # noqa: BLE001 - any import problem makes the mode unavailable
        raise ModeUnavailable(f"import torchpcg failed: {type(err).__name__}: {err}") from err
    if "piecewise" not in torch._dynamo.list_backends(exclude_tags=()):
        raise ModeUnavailable("torchpcg did not register the 'piecewise' torch.compile backend")
    options = {**ctx.piecewise_options, **knobs}
    stable = hasattr(torchpcg, "compile")
    if stable:
        compiled = torchpcg.compile(ctx.model, **options)  # marks the token dim itself, from any first T
    else:
        compiled = torch.compile(ctx.model, backend="piecewise", fullgraph=True, options=options)

    def make_args(num_tokens: int) -> tuple[torch.Tensor, ...]:
        input_ids, positions = ctx.make_inputs(num_tokens)
        if not stable:
            mark_token_dim(input_ids, positions)
        return input_ids, positions, ctx.kv_cache

    if hasattr(torchpcg, "capture"):
        torchpcg.capture(compiled, make_args, sizes=ctx.buckets)  # largest first; explicit: options aren't env
    else:
        for size in sorted(ctx.buckets, reverse=True):
            compiled(*make_args(size))  # graphs are captured lazily on a bucket's first call
    return _bind(compiled, ctx.kv_cache)


# ---- the table (display order; bench/decoder.py runs may_break_cuda modes last) -------------------

MODES: tuple[Mode, ...] = (
    Mode("eager", "the uncompiled model", build_eager),
    Mode("inductor", "torch.compile default: Inductor, dynamic token dim, no CUDA graphs", build_inductor),
    Mode("reduce-overhead", "torch.compile(mode='reduce-overhead'): CUDA graph trees, one graph per distinct T; "
         "KV cache marked with mark_static_address (as Hugging Face StaticCache does)",
         build_reduce_overhead, needs_cuda=True, warm_calls=3, setup_may_fail=True),
    Mode("reduce-overhead-unmarked", "the same without marking the cache: Inductor skips graphs for the mutated input",
         build_reduce_overhead_unmarked, needs_cuda=True, warm_calls=3, setup_may_fail=True),
    Mode("eager-cudagraph", "one whole-model CUDA graph per bucket of the eager model, T padded up to the bucket",
         build_eager_cudagraph, needs_cuda=True, may_break_cuda=True, setup_may_fail=True),
    Mode("inductor-cudagraph", "one whole-model CUDA graph per bucket of the Inductor-compiled model, "
         "attention inside: the decode upper bound", build_inductor_cudagraph, needs_cuda=True, may_break_cuda=True,
         setup_may_fail=True),
    Mode("piecewise", "torchpcg: torch.compile(backend='piecewise'), graphs between attention ops", build_piecewise),
    Mode("piecewise-full-decode", "torchpcg with cudagraph_mode='full_and_piecewise': one whole-forward graph "
         "(attention inside) per exact T up to full_max_size, piecewise above", build_piecewise_full_decode,
         needs_cuda=True),
)
MODE_NAMES: tuple[str, ...] = tuple(mode.name for mode in MODES)


# ---- whole-model CUDA graphs ---------------------------------------------------------------------

class WholeModelGraphs:
    """One CUDA graph of fn(ids, positions, kv_cache) per bucket, sharing one memory pool.

    A call with T tokens copies its inputs into static buffers [largest bucket], pads rows T..bucket
    (their positions point at the scratch slot, so the padded k/v writes touch no real position)
    and replays the bucket's graph; calls above the largest bucket run fn without a graph.
    Like `torch.cuda.graphs.make_graphed_callables`, but padded, and with the reason kept on failure.

    Note: the returned logits are a view of the graph's static output, valid until the next call.
    """

    def __init__(self, fn: Callable[..., torch.Tensor], ctx: BenchContext) -> None:
        self.fn, self.ctx = fn, ctx
        self.buckets = tuple(sorted(ctx.buckets))
        ids, _ = ctx.make_inputs(self.buckets[-1])
        self.static_ids = ids.clone()  # [largest]; any valid token ids will do for padded rows
        self.static_positions = torch.full_like(ids, ctx.scratch_position)  # [largest]
        self.graphs: dict[int, tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        self.counts = {"captured": 0, "replays": 0, "eager_runs": 0}

    def capture_all(self) -> None:
        pool = torch.cuda.graph_pool_handle()
        buckets = sorted(self.buckets, reverse=True)  # largest first: smaller ones reuse its pool
        bar = tqdm(buckets, desc="whole-model capture", unit="graph", leave=False, file=sys.stderr,
                   mininterval=0.5 if sys.stderr.isatty() else 30.0)  # logs: a line per 30 s, not per update
        for bucket in bar:
            self._capture(bucket, pool)

    def _capture(self, bucket: int, pool: Any) -> None:
        ids, positions = self.ctx.make_inputs(bucket)
        self.static_ids[:bucket].copy_(ids)
        self.static_positions[:bucket].copy_(positions)
        args = (self.static_ids[:bucket], self.static_positions[:bucket], self.ctx.kv_cache)
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            self.fn(*args)  # warm outside capture: lazy init, cuBLAS workspaces, autotuning
        torch.cuda.current_stream().wait_stream(side)
        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()
        try:
            with torch.cuda.graph(graph, pool=pool):
                output = self.fn(*args)
        except Exception as err:  # noqa: BLE001 - any capture failure makes the mode unavailable
            raise ModeUnavailable(f"capture of bucket {bucket} failed: {_root_cause(err)}") from err
        self.graphs[bucket] = (graph, output)
        self.counts["captured"] += 1

    def __call__(self, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        num_tokens = input_ids.shape[0]
        index = bisect.bisect_left(self.buckets, num_tokens)
        if index == len(self.buckets):
            self.counts["eager_runs"] += 1
            return self.fn(input_ids, positions, self.ctx.kv_cache)
        bucket = self.buckets[index]
        self.static_ids[:num_tokens].copy_(input_ids)  # [T] -> [bucket]; rows T.. keep valid old ids
        self.static_positions[:num_tokens].copy_(positions)
        self.static_positions[num_tokens:bucket].fill_(self.ctx.scratch_position)  # padded rows -> scratch slot
        graph, output = self.graphs[bucket]
        graph.replay()
        self.counts["replays"] += 1
        return output[:num_tokens]


def _root_cause(err: BaseException) -> str:
    """The first error of a chain (torch.cuda.graph's exit raises a second one on a failed capture)."""
    seen = err
    while seen.__context__ is not None and seen.__context__ is not seen:
        seen = seen.__context__
    text = str(seen).strip().splitlines()
    return f"{type(seen).__name__}: {text[0] if text else ''}".strip()


class _CudagraphSkipLog(logging.Handler):
    """Collects Inductor's 'skipping cudagraphs due to ...' warnings (reduce-overhead fell back)."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        message = record.getMessage()
        # "skipping cudagraphs due to ...": graphs were not recorded. Other cudagraph warnings (one
        # graph per distinct size) are not a skip.
        if "skipping cudagraph" in message.lower() and message not in self.messages:
            self.messages.append(message)

    @classmethod
    def attach(cls) -> _CudagraphSkipLog:
        handler = cls()
        for name in ("torch._inductor.cudagraph_utils.__cudagraphs", "torch._inductor.cudagraph_utils"):
            logger = logging.getLogger(name)
            for old in [h for h in logger.handlers if isinstance(h, cls)]:
                logger.removeHandler(old)  # one collector per run, not one per mode built
            logger.addHandler(handler)
        return handler
