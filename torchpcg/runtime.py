"""The callable Dynamo gets back: bucket lookup, padding, piece sequencing, output slicing.

In: a ``SplitGraph`` whose compute pieces were compiled, the token symbol and the config.
Out: ``Runtime``, called with Dynamo's flat argument list. Per call it picks the bucket B >= T,
and each compute piece (a ``PieceRunner``) copies its token inputs into static buffers of B rows
(padding rows zeroed), replays its graph and hands the next op views of the real rows ``[:T]``.
Split ops run eagerly on those real rows. Calls above the largest bucket, or with graphs off,
run the same compiled pieces without graphs.
"""
from __future__ import annotations

import bisect
import dataclasses
import logging
import threading
from collections.abc import Callable, Sequence
from typing import Any

import sympy
import torch

from .config import PiecewiseConfig
from .errors import CaptureError
from .graphs import CudaGraph, EmulatedGraph, GraphPool, flatten_outputs
from .layout import Layout, evaluate, expr_of, symbols_of
from .split import SplitGraph, SplitPiece
from .stats import COUNTERS

__all__ = ["Runtime", "PieceRunner", "CallState", "resolve_graph_mode"]

log = logging.getLogger(__name__)

_TOKEN, _REF, _SYMINT, _CONST = "token", "ref", "symint", "const"
STATIC_GRAPH_BUCKET = 0  # bucket key of graphs without a token symbol (one static shape)


def resolve_graph_mode(config: PiecewiseConfig, device: torch.device | None) -> str:
    """'cuda', 'emulate' or 'off' for a graph whose tensors live on ``device``."""
    mode = config.cudagraph
    on_cuda = device is not None and device.type == "cuda"
    if mode == "auto":
        return "cuda" if on_cuda else "off"
    if mode == "cuda" and not on_cuda:
        message = f"cudagraph='cuda' but the graph runs on {device}; CUDA graphs need CUDA tensors"
        if config.enforce:
            raise CaptureError(message + " (TORCHPCG_ENFORCE=1)")
        log.warning("%s: running without graphs (use cudagraph='emulate' on CPU)", message)
        COUNTERS.add("fallbacks")
        return "off"
    return mode


@dataclasses.dataclass
class CallState:
    """What the current call decided, shared by the runtime and its piece runners."""

    bucket: int | None = None  # None: this call runs without graphs
    num_tokens: int = 0
    used_graphs: bool = False
    # data_ptr of a real-rows view handed out by a piece -> that graph output at full bucket size.
    # A later piece captured at the same bucket reads such an input in place instead of copying it.
    graph_outputs: dict[int, torch.Tensor] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass(frozen=True)
class _InputSpec:
    kind: str  # _TOKEN, _REF, _SYMINT or _CONST
    layout: Layout | None = None  # for _TOKEN
    expr: sympy.Expr | int | None = None  # for _SYMINT


@dataclasses.dataclass(frozen=True)
class _ReplayPlan:
    """Everything one replay at (bucket, T) touches, built once: the hot path only copies and replays."""

    zero_whole: tuple[torch.Tensor, ...]  # multi-token-dim buffers ([T, T] masks): zeroed, then copied
    copies: tuple[tuple[int, torch.Tensor, torch.Tensor | None], ...]  # (input, dst [T rows], padding rows)
    outputs: Any  # the packed real-rows outputs handed to the next op
    registry: tuple[tuple[int, torch.Tensor], ...]  # (data_ptr of a real view, full output) for chaining


@dataclasses.dataclass
class _Captured:
    """One (piece, bucket) graph and the buffers it reads."""

    graph: CudaGraph | EmulatedGraph
    token_views: dict[int, torch.Tensor]  # input index -> [B, ...] static view
    refs: tuple[tuple[int, int], ...]  # (input index, data_ptr) read in place: by reference or chained
    copied: dict[int, torch.Tensor]  # input index -> own buffer (inputs that moved once)
    plans: dict[int, _ReplayPlan] = dataclasses.field(default_factory=dict)  # by T


class PieceRunner:
    """Runs one compute piece: replay at the call's bucket, or the compiled code directly."""

    def __init__(self, piece: SplitPiece, compiled: Callable[..., Any], fake_args: Sequence[Any],
                 symbol: sympy.Symbol | None, runtime: Runtime) -> None:
        self.piece = piece
        self.compiled = compiled
        self.symbol = symbol
        self.runtime = runtime
        self.inputs, self.graphless_reason = _input_specs(fake_args, symbol)
        self.outputs = _output_specs(piece.gm, symbol)
        self.single_output = not isinstance(_output_arg(piece.gm), (tuple, list))
        self.captured: dict[int, _Captured] = {}
        self.storages: dict[int, torch.Tensor] = {}  # input index -> flat buffer for the largest bucket
        self.copy_mode: set[int] = set()  # _REF inputs that moved: copied into own buffers from now on

    # ---- call paths ----------------------------------------------------------------------------

    def __call__(self, *args: Any) -> Any:
        state = self.runtime.state
        if state.bucket is None or self.graphless_reason:
            return self._run_direct(args)
        captured = self.captured.get(state.bucket)
        if captured is None:
            return self._capture(state.bucket, state.num_tokens, args)
        moved = [i for i, ptr in captured.refs if args[i].data_ptr() != ptr]
        if moved:
            self._on_moved(moved, args)
            return self._run_direct(args)
        plan = captured.plans.get(state.num_tokens) or self._plan(captured, state.num_tokens)
        _copy_inputs(plan.zero_whole, plan.copies, captured.copied, args)
        captured.graph.replay()
        COUNTERS.add("replays")
        state.used_graphs = True
        state.graph_outputs.update(plan.registry)
        return plan.outputs

    def _run_direct(self, args: Sequence[Any]) -> Any:
        """The compiled piece on the caller's tensors, no graph: exact rows, fresh outputs."""
        return self._pack(flatten_outputs(self.compiled(*args)))

    def _copy_targets(self, token_views: dict[int, torch.Tensor], num_tokens: int) -> tuple[
            tuple[torch.Tensor, ...], tuple[tuple[int, torch.Tensor, torch.Tensor | None], ...]]:
        """Where each token input goes at T: (buffers zeroed whole, (input, rows :T, rows T:))."""
        copies, zero_whole = [], []
        for index, view in token_views.items():
            layout = self.inputs[index].layout
            if len(layout.token_dims) != 1:  # e.g. [T, T]: zero everything, then write the real block
                zero_whole.append(view)
                copies.append((index, layout.real_rows(view, num_tokens), None))
                continue
            dim = layout.token_dims[0]
            real = evaluate(layout.sizes[dim], layout.symbol, num_tokens)
            pad = view.narrow(dim, real, view.size(dim) - real) if view.size(dim) > real else None
            copies.append((index, view.narrow(dim, 0, real), pad))
        return tuple(zero_whole), tuple(copies)

    def _plan(self, captured: _Captured, num_tokens: int) -> _ReplayPlan:
        zero_whole, copies = self._copy_targets(captured.token_views, num_tokens)
        registry: dict[int, torch.Tensor] = {}
        outputs = self._real_outputs(captured.graph.outputs, CallState(num_tokens=num_tokens, graph_outputs=registry))
        plan = _ReplayPlan(zero_whole, copies, outputs, tuple(registry.items()))
        captured.plans[num_tokens] = plan
        return plan

    def _capture(self, bucket: int, num_tokens: int, args: Sequence[Any]) -> Any:
        static_args, token_views, copied = self._static_args(bucket, args)
        chained = [i for i, spec in enumerate(self.inputs) if spec.kind == _TOKEN and i not in token_views]
        captured_refs = tuple((i, args[i].data_ptr()) for i, spec in enumerate(self.inputs)
                              if spec.kind == _REF and i not in self.copy_mode) + tuple(
                              (i, args[i].data_ptr()) for i in chained)
        _copy_inputs(*self._copy_targets(token_views, num_tokens), copied, args)
        self.runtime.verify(self, static_args, args)
        try:
            graph = self.runtime.make_graph(self.compiled, static_args)
        except Exception as exc:  # OOM or an op that cannot be captured: fall back, never crash
            self.runtime.capture_failed(bucket, self.piece.name, exc)
            return self._run_direct(args)
        self.captured[bucket] = _Captured(graph, token_views, captured_refs, copied)
        COUNTERS.add("captured")
        if self.symbol is not None:  # a static graph (no token symbol) has no bucket to report
            COUNTERS.note_capture_size(bucket)
        log.debug("captured %s at bucket %d", self.piece.name, bucket)
        outputs = graph.release_capture_outputs()
        if isinstance(graph, CudaGraph):
            graph.replay()  # capture records work; this replay computes the outputs
        self.runtime.state.used_graphs = True
        return self._real_outputs(outputs, self.runtime.state)

    # ---- buffers -------------------------------------------------------------------------------

    def _static_args(self, bucket: int, args: Sequence[Any]) -> tuple[list[Any], dict[int, torch.Tensor], dict[int, torch.Tensor]]:
        static: list[Any] = []
        token_views: dict[int, torch.Tensor] = {}
        copied: dict[int, torch.Tensor] = {}
        for i, (spec, arg) in enumerate(zip(self.inputs, args)):
            if spec.kind == _TOKEN:
                chained = self._chained_input(i, spec.layout, bucket, arg)
                if chained is not None:
                    static.append(chained)
                    continue
                token_views[i] = self._bucket_view(i, spec.layout, bucket)
                static.append(token_views[i])
            elif spec.kind == _REF and i in self.copy_mode:
                copied[i] = _new_buffer_like(arg)
                static.append(copied[i])
            elif spec.kind == _SYMINT:
                static.append(evaluate(spec.expr, self.symbol, bucket))
            else:
                static.append(arg)
        return static, token_views, copied

    def _chained_input(self, index: int, layout: Layout, bucket: int, arg: Any) -> torch.Tensor | None:
        """The producing graph's [B, ...] output when ``arg`` is its real-rows view, else None.

        Reading it in place saves a copy per input (the residual stream, rotary tables shared by
        all layers). Safe because graphs replay in capture order, so the producer has written it
        and nothing captured in between may reuse its memory (it was alive during the capture
        pass). Integer inputs are always copied: their padding rows must be 0 to stay in range.
        """
        if index in self.copy_mode or not layout.dtype.is_floating_point:
            return None
        full = self.runtime.state.graph_outputs.get(arg.data_ptr())
        if full is None or full.size() != layout.sizes_at(bucket) or full.stride() != layout.strides_at(bucket):
            return None
        return full

    def _bucket_view(self, index: int, layout: Layout, bucket: int) -> torch.Tensor:
        """[B, ...] view with the compiled code's strides over one buffer shared by all buckets."""
        storage = self.storages.get(index)
        if storage is None:
            numel = max(layout.storage_numel_at(self.runtime.largest_bucket), layout.storage_numel_at(bucket))
            with torch.inference_mode(False):  # a normal tensor, writable inside and outside inference mode
                storage = torch.zeros(numel, dtype=layout.dtype, device=layout.device)
            self.storages[index] = storage
        return torch.as_strided(storage, layout.sizes_at(bucket), layout.strides_at(bucket))

    def _on_moved(self, moved: list[int], args: Sequence[Any]) -> None:
        names = [_input_name(self.piece.gm, i) for i in moved]
        log.warning("%s: input(s) %s changed address since capture; they are copied into static buffers "
                    "from now on and this model's graphs are captured again", self.piece.name, ", ".join(names))
        self.copy_mode.update(moved)  # _REF inputs get own buffers; chained token inputs get copied
        COUNTERS.add("recaptures")
        self.runtime.invalidate_after_call()

    # ---- outputs -------------------------------------------------------------------------------

    def _real_outputs(self, outputs: Sequence[Any], state: CallState) -> Any:
        num_tokens, real = state.num_tokens, []
        for spec, value in zip(self.outputs, outputs):
            if spec.kind == _TOKEN:
                full, value = value, spec.layout.real_rows(value, num_tokens)
                state.graph_outputs[value.data_ptr()] = full
            elif spec.kind == _SYMINT:
                value = evaluate(spec.expr, self.symbol, num_tokens)
            real.append(value)
        return self._pack(real)

    def _pack(self, values: list[Any]) -> Any:
        return values[0] if self.single_output else tuple(values)


def _copy_inputs(zero_whole: Sequence[torch.Tensor], copies: Sequence[tuple[int, torch.Tensor, torch.Tensor | None]],
                 copied: dict[int, torch.Tensor], args: Sequence[Any]) -> None:
    """Fill a graph's static inputs: rows :T from the call, rows T.. zero, moved inputs copied."""
    for view in zero_whole:
        view.zero_()
    for index, dst, padding in copies:
        src = args[index]
        if dst.data_ptr() != src.data_ptr() or dst.stride() != src.stride():
            dst.copy_(src)  # [T, ...] -> static [B, ...] rows :T
        if padding is not None:
            padding.zero_()  # rows T.. hold zeros, never an earlier call's data
    for index, buffer in copied.items():
        buffer.copy_(args[index])


def _new_buffer_like(value: torch.Tensor) -> torch.Tensor:
    with torch.inference_mode(False):
        return torch.empty_strided(value.size(), value.stride(), dtype=value.dtype, device=value.device)


def _input_specs(fake_args: Sequence[Any], symbol: sympy.Symbol | None) -> tuple[list[_InputSpec], str]:
    """Classify each piece input; a second dynamic symbol makes the piece graphless (with why)."""
    specs, reason = [], ""
    for fake in fake_args:
        found = symbols_of(fake)
        others = found - ({symbol} if symbol is not None else set())
        if others:
            reason = f"depends on dynamic symbol(s) {', '.join(sorted(map(str, others)))} besides the token count"
        if isinstance(fake, torch.Tensor):
            specs.append(_InputSpec(_TOKEN, layout=Layout.of(fake, symbol)) if symbol in found else _InputSpec(_REF))
        elif isinstance(fake, torch.SymInt) and found:
            specs.append(_InputSpec(_SYMINT, expr=expr_of(fake)))
        else:
            specs.append(_InputSpec(_CONST))
    return specs, reason


def _output_arg(gm: torch.fx.GraphModule) -> Any:
    return next(n for n in reversed(gm.graph.nodes) if n.op == "output").args[0]


def _output_specs(gm: torch.fx.GraphModule, symbol: sympy.Symbol | None) -> list[_InputSpec]:
    out = _output_arg(gm)
    specs = []
    for node in out if isinstance(out, (tuple, list)) else [out]:
        value = node.meta.get("example_value", node.meta.get("val")) if isinstance(node, torch.fx.Node) else node
        found = symbols_of(value)
        if isinstance(value, torch.Tensor) and symbol in found:
            specs.append(_InputSpec(_TOKEN, layout=Layout.of(value, symbol)))
        elif isinstance(value, torch.SymInt) and symbol in found:
            specs.append(_InputSpec(_SYMINT, expr=expr_of(value)))
        else:
            specs.append(_InputSpec(_CONST))
    return specs


def _input_name(gm: torch.fx.GraphModule, index: int) -> str:
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    return placeholders[index].name if index < len(placeholders) else f"#{index}"


class Runtime:
    """What ``torch.compile`` calls: one Dynamo graph, split, compiled, captured per bucket."""

    def __init__(self, split: SplitGraph, config: PiecewiseConfig, symbol: sympy.Symbol | None,
                 token_locator: tuple[int, int | None] | None, graph_mode: str,
                 device: torch.device | None = None) -> None:
        self.split = split
        self.config = config
        self.symbol = symbol
        self.token_locator = token_locator  # (arg index, dim) of T; dim None: the arg is T itself
        self.graph_mode = graph_mode
        self.device = device  # where graphs are captured; a piece may see only CPU scalars
        self.state = CallState()
        self.runners: list[PieceRunner] = []
        self.buckets: list[int] = list(config.buckets) if symbol is not None else [STATIC_GRAPH_BUCKET]
        self.largest_bucket = max(self.buckets)
        self._lock = threading.RLock()
        self._pool: GraphPool | None = None
        self._drop_after_call: set[int] | None = None  # buckets whose graphs go at the end of this call
        for piece in split.split_pieces:  # eager split ops: skip nn.Module.__call__ overhead per call
            split.split_gm.__dict__[piece.name] = piece.gm.forward

    def install(self, runner: PieceRunner) -> None:
        """Replace a compute submodule of the split module with its runner."""
        gm = self.split.split_gm
        del gm._modules[runner.piece.name]
        gm.__dict__[runner.piece.name] = runner  # the generated forward calls self.submod_N(...)
        self.runners.append(runner)

    # ---- the call ------------------------------------------------------------------------------

    def __call__(self, *args: Any) -> Any:
        with self._lock, torch.no_grad():
            num_tokens = self.num_tokens(args)
            bucket = self.bucket_for(num_tokens)
            self.state = CallState(bucket=bucket, num_tokens=num_tokens)
            try:
                outputs = self.split.split_gm(*args)
            finally:
                state, self.state = self.state, CallState()
                self._drop_pending_graphs()
            self._count(state, bucket, num_tokens)
            if state.used_graphs and self.config.copy_outputs:
                outputs = _clone_tensors(outputs)  # they live in static buffers the next call overwrites
            return outputs

    def num_tokens(self, args: Sequence[Any]) -> int:
        if self.token_locator is None:
            return 0
        index, dim = self.token_locator
        return int(args[index]) if dim is None else args[index].size(dim)

    def bucket_for(self, num_tokens: int) -> int | None:
        """Smallest bucket >= num_tokens, or None (no graphs: too large, or graphs off)."""
        if self.graph_mode == "off" or not self.runners:
            return None
        if self.symbol is not None and self.token_locator is None:
            return None  # T is no input's whole dim here: nothing to bucket by (logged at compile)
        if self.symbol is None:
            return self.buckets[0] if self.buckets else None
        at = bisect.bisect_left(self.buckets, num_tokens)
        return self.buckets[at] if at < len(self.buckets) else None

    def _count(self, state: CallState, bucket: int | None, num_tokens: int) -> None:
        if state.used_graphs:
            COUNTERS.add("graph_calls")
            COUNTERS.add("real_tokens", num_tokens)
            COUNTERS.add("padded_tokens", (bucket or num_tokens) - num_tokens)
        else:
            COUNTERS.add("eager_runs")

    # ---- services for piece runners ------------------------------------------------------------

    def make_graph(self, fn: Callable[..., Any], static_args: list[Any]) -> CudaGraph | EmulatedGraph:
        if self.graph_mode == "emulate":
            return EmulatedGraph(fn, static_args)
        if self._pool is None:
            self._pool = GraphPool(self.device)
        fn(*static_args)  # warm-up outside the graph: lazy inits, autotuning, cuBLAS workspaces
        return CudaGraph(fn, static_args, self._pool)

    def verify(self, runner: PieceRunner, static_args: list[Any], args: Sequence[Any]) -> None:
        """Verify mode: padded real rows must equal the exact-size run (first use of a bucket)."""
        if not self.config.verify or self.symbol is None:
            return
        from .padding import first_difference
        from .errors import PaddingError

        diff = first_difference(runner.piece.gm, list(args), static_args, self.symbol, self.state.num_tokens)
        if diff is not None:
            node, amount = diff
            raise PaddingError(
                f"{runner.piece.name}: at bucket {self.state.bucket} (T={self.state.num_tokens}) the real rows of node "
                f"{node!r} differ from the exact-size run by {amount:.3g}; the op is not row-wise along the token dim. "
                f"Register it with torchpcg.register_splitting_op(...) or report it as a padding-analysis bug")

    def capture_failed(self, bucket: int, piece_name: str, exc: Exception) -> None:
        """Drop bucket ``bucket`` everywhere; this and later calls there run without its graphs."""
        message = f"capturing {piece_name} at bucket {bucket} failed: {type(exc).__name__}: {exc}"
        if self.config.enforce:
            raise CaptureError(message + " (TORCHPCG_ENFORCE=1)") from exc
        log.warning("%s; bucket %d is dropped, calls there use the next larger bucket or no graphs", message, bucket)
        COUNTERS.add("capture_failures")
        COUNTERS.add("fallbacks")
        if bucket in self.buckets:
            self.buckets.remove(bucket)
        self.state.bucket = None  # the rest of this call runs without graphs
        # Not now: earlier pieces of this call still hand out views of their graphs' memory.
        self._drop_after_call = (self._drop_after_call or set()) | {bucket}

    def invalidate_after_call(self) -> None:
        """Drop every graph once this call ends; the next call at each bucket captures again."""
        self.state.bucket = None
        self._drop_after_call = set(self.buckets) | {b for r in self.runners for b in r.captured}

    def _drop_pending_graphs(self) -> None:
        if not self._drop_after_call:
            return
        for runner in self.runners:
            for bucket in self._drop_after_call:
                runner.captured.pop(bucket, None)
        self._drop_after_call = None


def _clone_tensors(outputs: Any) -> Any:
    if isinstance(outputs, torch.Tensor):
        return outputs.clone()
    if isinstance(outputs, (tuple, list)):
        return type(outputs)(_clone_tensors(o) for o in outputs)
    return outputs
