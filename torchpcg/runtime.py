"""The callable Dynamo gets back: bucket lookup, padding, piece sequencing, output slicing.

In: a ``SplitGraph`` whose compute pieces were compiled, the token symbol, the config and which
graph inputs have stable addresses. Out: ``Runtime``, called with Dynamo's flat argument list.
Per call it picks the bucket B >= T, and each compute piece (a ``PieceRunner``) copies its inputs
into static buffers (token inputs: B rows, padding rows zeroed), replays its graph and hands the
next op views of the real rows ``[:T]``. Split ops run eagerly on those real rows. Calls above
the largest bucket, or with graphs off, run the same compiled pieces without graphs. Captures go
through the runtime's ``engine.GraphEngine`` (pool, failure policy, stream rule); the graphs
themselves stay in the runners, by bucket and address set.

Inputs are classified once, at compile time (``_input_specs``):

======== ======================================================= ==============================
kind     what                                                    at replay
======== ======================================================= ==============================
token    sizes depend on the token count                         copied into ``[B, ...]`` rows
static   parameters, buffers, ``mark_static_address`` tensors    read in place (address checked
                                                                 once per call, not per piece)
copied   every other tensor: user inputs of static graphs,       copied into an own buffer
         split-op outputs without a token dim
symint   a size that depends on the token count                  the bucket's value
const    anything else                                           passed as captured
======== ======================================================= ==============================

A token or copied input that is the output of an earlier graph of the same bucket is *chained*:
read in place from that graph's output, no copy.
"""
from __future__ import annotations

import bisect
import dataclasses
import logging
import operator
import threading
import time
import weakref
from collections.abc import Callable, Collection, Mapping, Sequence
from typing import Any

import sympy
import torch

from .address_sets import AddressSets
from .config import PiecewiseConfig
from .engine import GraphEngine
from .errors import CaptureError, PaddingError
from .graphs import CudaGraph, EmulatedGraph, flatten_outputs
from .layout import Layout, evaluate, expr_of, symbols_of, tokens_at
from .op_calls import direct_custom_ops
from .split import SplitGraph
from .sdpa import SdpaOrder
from .stats import COUNTERS, HOST_TIMES
from .verify import first_difference

__all__ = ["Runtime", "PieceRunner", "CallState", "resolve_graph_mode", "InputKind", "direct_forward",
           "graphless_counter"]

log = logging.getLogger(__name__)


class InputKind:
    """How a piece input reaches its graph (see the module docstring)."""

    TOKEN, STATIC, COPIED, SYMINT, CONST = "token", "static", "copied", "symint", "const"


_TOKEN, _STATIC, _COPIED, _SYMINT, _CONST = (InputKind.TOKEN, InputKind.STATIC, InputKind.COPIED,
                                             InputKind.SYMINT, InputKind.CONST)
STATIC_GRAPH_BUCKET = 0  # bucket key of graphs without a token symbol (one static shape)
# How a call that full graphs serve runs (full.FullGraphs.route): the whole forward's compiled code
# without a graph (T's first call, the warm-up), or its graph (captured on the first such call).
FULL_WARM, FULL_REPLAY = "warm", "replay"


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


# A piece's output as the next pieces see it: (weak reference to the tensor handed out, the graph
# output it is the real rows of, at full bucket size).
_Produced = tuple["weakref.ReferenceType[torch.Tensor]", torch.Tensor]


@dataclasses.dataclass
class CallState:
    """What the current call decided, shared by the runtime and its piece runners."""

    bucket: int | None = None  # None: this call runs without graphs
    num_tokens: int = 0
    used_graphs: bool = False
    replays: int = 0  # added to the process counters once, when the call ends
    copied_bytes: int = 0  # likewise: bytes the replays' input copies moved
    # Host clock (time.perf_counter_ns) for stats()["host_us"]: the first replay's launch, the last
    # one's return, and the time spent inside replay() calls. 0: no replay in this call.
    first_replay: int = 0
    last_replay: int = 0
    replay_ns: int = 0
    # id() of an output a piece handed out (its real rows) -> (a weak reference to that tensor, the
    # graph output at full bucket size, not owning its memory). A later piece captured at the same
    # bucket reads such an input in place instead of copying it. Weak on both sides: an output's
    # memory goes back to the pool after its last use, for later captures of the same pass.
    graph_outputs: dict[int, _Produced] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass(frozen=True)
class _InputSpec:
    kind: str  # an InputKind
    layout: Layout | None = None  # for _TOKEN and _COPIED (fixed sizes)
    expr: sympy.Expr | int | None = None  # for _SYMINT


@dataclasses.dataclass(frozen=True)
class _ReplayPlan:
    """Everything one replay at (bucket, T) touches, built once: the hot path only copies and replays."""

    zero_whole: tuple[torch.Tensor, ...]  # multi-token-dim buffers ([T, T] masks): zeroed, then copied
    copies: tuple[tuple[int, torch.Tensor, tuple[int, ...], torch.Tensor | None], ...]  # see _copy_inputs
    outputs: Any  # the packed real-rows outputs handed to the next op
    registry: tuple[tuple[int, _Produced], ...]  # CallState.graph_outputs entries of the outputs, for chaining
    copy_bytes: int  # what the copies move per replay (stats()["copied_bytes"])


@dataclasses.dataclass
class _Captured:
    """One (piece, bucket) graph and the buffers it reads."""

    graph: CudaGraph | EmulatedGraph
    token_views: dict[int, torch.Tensor]  # input index -> [B, ...] static view
    copied: dict[int, torch.Tensor]  # input index -> own buffer of a copied input
    chained: tuple[tuple[int, int], ...]  # (input index, data_ptr) read in place from an earlier graph
    aliases: tuple[tuple[int, int, tuple[int, ...], tuple[int, ...], int], ...]  # see _alias_outputs
    plans: dict[int, _ReplayPlan] = dataclasses.field(default_factory=dict)  # by T


class PieceRunner:
    """Runs one graph's code: replay at the call's bucket, or the compiled code directly.

    ``name`` and ``gm`` say what it runs: a compute piece of the split module (``submod_N``, its
    piece's graph) or, for full decode graphs, the whole forward (``full.FullGraphs``). ``gm`` gives
    the output structure and, under verify mode, the nodes whose real rows are compared.
    """

    def __init__(self, name: str, gm: torch.fx.GraphModule, compiled: Callable[..., Any], fake_args: Sequence[Any],
                 symbol: sympy.Symbol | None, runtime: Runtime, static_inputs: Mapping[int, str] | None = None,
                 share_buffers: bool = True) -> None:
        self.name = name
        self.gm = gm
        self.compiled = compiled
        self.symbol = symbol
        self.runtime = runtime
        self.static_names = dict(static_inputs or {})  # piece input index -> graph input name, read in place
        self.inputs, self.graphless_reason = _input_specs(fake_args, symbol, self.static_names)
        self.outputs = _output_specs(gm, symbol)
        self.single_output = not isinstance(_output_arg(gm), (tuple, list))
        self.captured: dict[int, _Captured] = {}
        self.storages: dict[int, torch.Tensor] = {}  # token input index -> flat buffer for the largest bucket
        # token input index -> slot of the runtime's buffers shared between pieces (see _shared_slots)
        self.shared_slots = _shared_slots(self.inputs, fake_args, gm) if share_buffers else {}
        self.buffers: dict[int, torch.Tensor] = {}  # copied input index -> its buffer (fixed shape)
        self.unchained: set[int] = set()  # inputs once chained whose producer changed: always copied
        self.warm_before_capture = True  # run once outside the graph first (lazy inits, autotuning)
        self.at_bucket = True  # captured at a bucket's padded shape; False: at the call's exact T (full graphs)
        # What a failed capture of this runner drops, given the message: None, its bucket everywhere
        # (Runtime.capture_failed); full graphs turn themselves off.
        self.on_capture_failure: Callable[[str], None] | None = None

    def sees_symbol(self) -> bool:
        """Whether any input or output of this piece depends on the token symbol."""
        kinds = {spec.kind for spec in self.inputs + self.outputs}
        return bool(self.graphless_reason) or _TOKEN in kinds or _SYMINT in kinds

    def demote(self, names: Collection[str]) -> None:
        """Static inputs named ``names`` keep moving: copy them on every replay from now on."""
        for index, name in self.static_names.items():
            if name in names:
                self.inputs[index] = _InputSpec(_COPIED)

    # ---- call paths ----------------------------------------------------------------------------

    def __call__(self, *args: Any) -> Any:
        state = self.runtime.state
        if state.bucket is None or self.graphless_reason:
            return self._run_direct(args)
        captured = self.captured.get(state.bucket)
        if captured is None:
            return self._capture(state.bucket, state.num_tokens, args)
        plan = captured.plans.get(state.num_tokens)
        if plan is None:
            plan = self._plan(captured, state.num_tokens, args)
            if plan is None:  # a chained input comes from elsewhere now: capture again next call
                return self._run_direct(args)
        _copy_inputs(plan.zero_whole, plan.copies, args)
        launched = _now()
        captured.graph.replay()
        state.last_replay = _now()
        state.first_replay = state.first_replay or launched
        state.replay_ns += state.last_replay - launched
        state.replays += 1
        state.copied_bytes += plan.copy_bytes
        state.used_graphs = True
        state.graph_outputs.update(plan.registry)
        return _with_aliases(plan.outputs, captured.aliases, args, self.single_output) if captured.aliases else plan.outputs

    def _run_direct(self, args: Sequence[Any]) -> Any:
        """The compiled piece on the caller's tensors, no graph: exact rows, fresh outputs."""
        return self._pack(flatten_outputs(self.compiled(*args)))

    def _copy_targets(self, token_views: dict[int, torch.Tensor], copied: dict[int, torch.Tensor],
                      num_tokens: int) -> tuple[
            tuple[torch.Tensor, ...], tuple[tuple[int, torch.Tensor, tuple[int, ...], torch.Tensor | None], ...]]:
        """Where each input goes at T: (buffers zeroed whole, (input, rows :T or buffer, rows T:))."""
        copies, zero_whole = [], []
        for index, view in token_views.items():
            layout = self.inputs[index].layout
            if len(layout.token_dims) != 1:  # e.g. [T, T]: zero everything, then write the real block
                zero_whole.append(view)
                copies.append((index, *_writable(layout.real_rows(view, num_tokens)), None))
                continue
            dim = layout.token_dims[0]
            real = evaluate(layout.sizes[dim], layout.symbol, num_tokens)
            pad = view.narrow(dim, real, view.size(dim) - real) if view.size(dim) > real else None
            copies.append((index, *_writable(view.narrow(dim, 0, real)), pad))
        copies.extend((index, *_writable(buffer), None) for index, buffer in copied.items())
        return tuple(zero_whole), tuple(copies)

    def _plan(self, captured: _Captured, num_tokens: int, args: Sequence[Any]) -> _ReplayPlan | None:
        """Build (once per T) what a replay touches; None if a chained input no longer matches."""
        stale = [i for i, ptr in captured.chained if args[i].data_ptr() != ptr]
        if stale:
            # Not this piece alone: the pieces after it replay plans that read its graph's outputs,
            # which this call will not write, and a lone recapture mid-bucket could take pool memory
            # that replayed outputs still need. So the rest of this call runs without graphs and
            # the next call captures the whole bucket again, in order.
            log.debug("%s: chained input(s) %s come from elsewhere at T=%d; bucket %d is captured again, "
                      "this input without chaining", self.name, stale, num_tokens, self.runtime.state.bucket)
            self.unchained.update(stale)
            self.runtime.drop_after_call(None, self.runtime.state.bucket)
            self.runtime.state.bucket = None
            return None
        zero_whole, copies = self._copy_targets(captured.token_views, captured.copied, num_tokens)
        registry: dict[int, _Produced] = {}
        outputs = self._real_outputs(captured.graph.outputs, CallState(num_tokens=num_tokens, graph_outputs=registry))
        plan = _ReplayPlan(zero_whole, copies, outputs, tuple(registry.items()), _bytes_of(copies))
        captured.plans[num_tokens] = plan
        return plan

    def _capture(self, bucket: int, num_tokens: int, args: Sequence[Any]) -> Any:
        static_args, token_views, copied, chained = self._static_args(bucket, args)
        _copy_inputs(*self._copy_targets(token_views, copied, num_tokens), args)
        self.runtime.verify(self, static_args, args)
        try:
            graph = self.runtime.make_graph(self.compiled, static_args, warm=self.warm_before_capture)
        except CaptureError:
            raise  # the process could not be healed: never continue
        except Exception as exc:  # OOM or an op that cannot be captured: fall back, never crash
            self.runtime.capture_failed(bucket, self, exc)
            return self._run_direct(args)
        outputs = graph.release_capture_outputs()
        # An output that is a read-in-place input (a buffer written inside a full graph) is the
        # caller's own tensor, not graph memory: never cloned, or the caller would get a new buffer.
        in_place = {arg.untyped_storage().data_ptr() for spec, arg in zip(self.inputs, static_args)
                    if spec.kind == _STATIC and isinstance(arg, torch.Tensor)}
        self.runtime.own([o for o in outputs if not (isinstance(o, torch.Tensor)
                                                     and o.untyped_storage().data_ptr() in in_place)],
                         token_views.values(), copied.values())
        captured = _Captured(graph, token_views, copied, chained, _alias_outputs(outputs, copied))
        self.captured[bucket] = captured
        COUNTERS.add("captured")
        if self.symbol is not None and self.at_bucket:  # static graphs and full graphs (exact T) have no bucket
            COUNTERS.note_capture_size(bucket)
        log.debug("captured %s at bucket %d", self.name, bucket)
        if isinstance(graph, CudaGraph):
            graph.replay()  # capture records work; this replay computes the outputs
        self.runtime.state.used_graphs = True
        # The call hands on the live outputs but notes the graph's non-owning ones for chaining: the
        # registry lives for the whole call, and a strong entry would pin every piece's outputs until
        # it ends. No later capture of this pass could then reuse their pool memory, and the pool
        # would grow to all pieces' outputs at the largest bucket instead of what is alive at once
        # (see graphs.CudaGraph on why reuse by liveness is safe).
        real = self._real_outputs(outputs, self.runtime.state, registered=graph.outputs)
        return _with_aliases(real, captured.aliases, args, self.single_output) if captured.aliases else real

    # ---- buffers -------------------------------------------------------------------------------

    def _static_args(self, bucket: int, args: Sequence[Any]) -> tuple[
            list[Any], dict[int, torch.Tensor], dict[int, torch.Tensor], tuple[tuple[int, int], ...]]:
        """The graph's inputs at ``bucket``: static buffers, chained outputs, in-place statics."""
        static: list[Any] = []
        token_views: dict[int, torch.Tensor] = {}
        copied: dict[int, torch.Tensor] = {}
        chained: list[tuple[int, int]] = []
        for i, (spec, arg) in enumerate(zip(self.inputs, args)):
            full = self._chained_input(i, spec, bucket, arg) if spec.kind in (_TOKEN, _COPIED) else None
            if full is not None:
                chained.append((i, arg.data_ptr()))
                static.append(full)
            elif spec.kind == _TOKEN:
                token_views[i] = self._bucket_view(i, spec.layout, bucket)
                static.append(token_views[i])
            elif spec.kind == _COPIED:
                copied[i] = self._buffer(i, arg)
                static.append(copied[i])
            elif spec.kind == _SYMINT:
                static.append(evaluate(spec.expr, self.symbol, bucket))
            else:
                static.append(arg)
        return static, token_views, copied, tuple(chained)

    def _chained_input(self, index: int, spec: _InputSpec, bucket: int, arg: Any) -> torch.Tensor | None:
        """The producing graph's full output when ``arg`` is its real-rows view, else None.

        Reading it in place saves a copy per input (the residual stream, rotary tables shared by
        all layers). Safe because graphs replay in capture order, so the producer has written it
        and nothing captured in between may reuse its memory (it was alive during the capture
        pass). Integer token inputs are always copied: their padding rows must be 0 to stay in range.
        """
        if index in self.unchained or not isinstance(arg, torch.Tensor):
            return None
        produced = self.runtime.state.graph_outputs.get(id(arg))
        if produced is None or produced[0]() is not arg:  # not a graph's output (or id() reused)
            return None
        full = produced[1]
        if spec.kind == _COPIED:
            return full if full.size() == arg.size() and full.stride() == arg.stride() else None
        layout = spec.layout
        if not layout.dtype.is_floating_point:
            return None
        if full.size() != layout.sizes_at(bucket) or full.stride() != layout.strides_at(bucket):
            return None
        return full

    def _bucket_view(self, index: int, layout: Layout, bucket: int) -> torch.Tensor:
        """[B, ...] view with the compiled code's strides over one buffer shared by all buckets."""
        storage = self.storages.get(index)
        if storage is None:
            numel = max(layout.storage_numel_at(self.runtime.largest_bucket), layout.storage_numel_at(bucket))
            slot = self.shared_slots.get(index)
            if slot is None:
                storage = _zeros(numel, layout.dtype, layout.device)
            else:
                storage = self.runtime.shared_buffer(layout.dtype, layout.device, slot, numel)
            self.storages[index] = storage
        return torch.as_strided(storage, layout.sizes_at(bucket), layout.strides_at(bucket))

    def _buffer(self, index: int, arg: torch.Tensor) -> torch.Tensor:
        """The own buffer of a copied input: its shape is fixed, so all buckets share one."""
        buffer = self.buffers.get(index)
        if buffer is None or buffer.size() != arg.size() or buffer.stride() != arg.stride():
            with torch.inference_mode(False):
                buffer = torch.empty_strided(arg.size(), arg.stride(), dtype=arg.dtype, device=arg.device)
            self.buffers[index] = buffer
        return buffer

    # ---- outputs -------------------------------------------------------------------------------

    def _real_outputs(self, outputs: Sequence[Any], state: CallState, registered: Sequence[Any] | None = None) -> Any:
        """The real rows of each output, noted in ``state.graph_outputs`` so a later piece can read
        the full output in place; ``registered``: the full outputs to note there, when not
        ``outputs`` themselves (the same tensors, not owning their memory)."""
        num_tokens, real = state.num_tokens, []
        for spec, value, noted in zip(self.outputs, outputs, registered if registered is not None else outputs):
            if spec.kind == _TOKEN:
                value = spec.layout.real_rows(value, num_tokens)
                state.graph_outputs[id(value)] = (weakref.ref(value), noted)
            elif spec.kind == _SYMINT:
                value = evaluate(spec.expr, self.symbol, num_tokens)
            elif isinstance(value, torch.Tensor):
                state.graph_outputs[id(value)] = (weakref.ref(value), noted)  # a fixed-shape output: chained as is
            real.append(value)
        return self._pack(real)

    def _pack(self, values: list[Any]) -> Any:
        return values[0] if self.single_output else tuple(values)


def _zeros(numel: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    with torch.inference_mode(False):  # a normal tensor, writable inside and outside inference mode
        return torch.zeros(numel, dtype=dtype, device=device)


def _shared_slots(specs: Sequence[_InputSpec], fake_args: Sequence[Any], gm: torch.fx.GraphModule) -> dict[int, int]:
    """Token inputs whose static buffer may be one buffer shared with other pieces -> its slot.

    Pieces replay one after another on one stream, and each copies its token inputs into their
    buffers right before its replay: once piece i's replay is queued, its input buffer is free
    for piece i+1 to fill. So the pieces' buffers for, say, the attention output can be one
    buffer instead of one per layer (2 MiB instead of 32 MiB at T=512 on the 16-layer reference
    decoder, ``scripts/graph_output_bytes.py``). Two inputs of one piece get different slots (per
    dtype). Not shared: an input that an output is a view of, since a later op may read that
    output after the next piece wrote the buffer (found from the fake tensors' storages; on any
    doubt, nothing is shared).
    """
    try:
        from torch.multiprocessing.reductions import StorageWeakRef

        aliased = {StorageWeakRef(v.untyped_storage()) for v in _output_values(gm) if isinstance(v, torch.Tensor)}
        slots: dict[int, int] = {}
        per_dtype: dict[torch.dtype, int] = {}
        for index, (spec, fake) in enumerate(zip(specs, fake_args)):
            if spec.kind != _TOKEN or not isinstance(fake, torch.Tensor):
                continue
            if StorageWeakRef(fake.untyped_storage()) in aliased:
                continue
            dtype = spec.layout.dtype  # type: ignore[union-attr]
            slots[index] = per_dtype.get(dtype, 0)
            per_dtype[dtype] = slots[index] + 1
        return slots
    except Exception as exc:  # noqa: BLE001 - a fake without storage: keep every buffer private
        log.debug("%s: static input buffers kept private (%s)", gm.__class__.__name__, exc)
        return {}


def _alias_outputs(outputs: Sequence[Any], copied: dict[int, torch.Tensor]) -> tuple[
        tuple[int, int, tuple[int, ...], tuple[int, ...], int], ...]:
    """Outputs that are views of a copied input's buffer: (output, input, size, stride, offset).

    Such an output must be a view of the caller's tensor, not of our copy: a later op may write
    through it (a KV cache slice handed to an attention op) or compare it by identity.
    """
    if not copied:
        return ()
    by_storage = {buffer.untyped_storage().data_ptr(): (index, buffer) for index, buffer in copied.items()}
    found = []
    for position, value in enumerate(outputs):
        if isinstance(value, torch.Tensor) and value.untyped_storage().data_ptr() in by_storage:
            index, buffer = by_storage[value.untyped_storage().data_ptr()]
            offset = value.storage_offset() - buffer.storage_offset()
            found.append((position, index, tuple(value.size()), tuple(value.stride()), offset))
    return tuple(found)


def _with_aliases(outputs: Any, aliases: Sequence[tuple[int, int, tuple[int, ...], tuple[int, ...], int]],
                  args: Sequence[Any], single: bool) -> Any:
    """Replace outputs that alias a copied input by the same view of the caller's tensor."""
    values = [outputs] if single else list(outputs)
    for position, index, size, stride, offset in aliases:
        source = args[index]
        values[position] = source.as_strided(size, stride, source.storage_offset() + offset)
    return values[0] if single else tuple(values)


def _writable(dst: torch.Tensor) -> tuple[torch.Tensor, tuple[int, ...]]:
    """``dst`` narrowed to one element along its broadcast (stride-0) dims, and those dims.

    An input compiled as an expanded view (mrope positions ``pos.expand(3, B, T)``) gets a static
    buffer with the same stride-0 dims; ``copy_`` refuses to write such a view (several elements
    share one address). Every element along such a dim is the same, in the buffer and in the
    caller's tensor (Dynamo guards the strides), so one element is copied.
    """
    dims = tuple(d for d in range(dst.dim()) if dst.stride(d) == 0 and dst.size(d) > 1)
    for d in dims:
        dst = dst.narrow(d, 0, 1)
    return dst, dims


def _copy_inputs(zero_whole: Sequence[torch.Tensor],
                 copies: Sequence[tuple[int, torch.Tensor, tuple[int, ...], torch.Tensor | None]],
                 args: Sequence[Any]) -> None:
    """Fill a graph's static inputs: rows :T (or the whole buffer) from the call, rows T.. zero.

    ``copies``: (input index, destination, broadcast dims of the destination that the source is
    narrowed along (see ``_writable``; empty nearly always), padding rows or None).

    The copies go out as one ``torch._foreach_copy_`` and the padding as one ``_foreach_zero_``
    (one launch each on CUDA, not one per input): they come before the graph's launch, so on a
    synchronized decode step every µs of host time here adds to the step's latency.
    """
    for view in zero_whole:  # first: the copies below write the real block inside these
        view.zero_()
    dsts, srcs, pads = [], [], []
    for index, dst, broadcast, padding in copies:
        src = args[index]
        for d in broadcast:
            src = src.narrow(d, 0, 1)
        if dst.data_ptr() != src.data_ptr() or dst.stride() != src.stride():  # not the buffer itself
            dsts.append(dst)  # [T, ...] -> static [B, ...] rows :T; or a copied input into its buffer
            srcs.append(src)
        if padding is not None:
            pads.append(padding)  # rows T.. hold zeros, never an earlier call's data
    if len(dsts) > 1:
        torch._foreach_copy_(dsts, srcs)
    elif dsts:
        dsts[0].copy_(srcs[0])
    if len(pads) > 1:
        torch._foreach_zero_(pads)
    elif pads:
        pads[0].zero_()


def _input_specs(fake_args: Sequence[Any], symbol: sympy.Symbol | None,
                 static_inputs: Collection[int]) -> tuple[list[_InputSpec], str]:
    """Classify each piece input once; a second dynamic symbol makes the piece graphless (with why)."""
    specs, reason = [], ""
    for index, fake in enumerate(fake_args):
        found = symbols_of(fake)
        others = found - ({symbol} if symbol is not None else set())
        if others:
            reason = f"depends on dynamic symbol(s) {', '.join(sorted(map(str, others)))} besides the token count"
        if isinstance(fake, torch.Tensor):
            if symbol is not None and symbol in found:
                specs.append(_InputSpec(_TOKEN, layout=Layout.of(fake, symbol)))
            else:
                kind = _STATIC if index in static_inputs else _COPIED
                specs.append(_InputSpec(kind, layout=Layout.of(fake, symbol) if kind == _COPIED else None))
        elif isinstance(fake, torch.SymInt) and found:
            specs.append(_InputSpec(_SYMINT, expr=expr_of(fake)))
        else:
            specs.append(_InputSpec(_CONST))
    return specs, reason


def _output_arg(gm: torch.fx.GraphModule) -> Any:
    return next(n for n in reversed(gm.graph.nodes) if n.op == "output").args[0]


def _output_values(gm: torch.fx.GraphModule) -> list[Any]:
    """The example value of each output of ``gm`` (a constant output as itself)."""
    out = _output_arg(gm)
    return [node.meta.get("example_value", node.meta.get("val")) if isinstance(node, torch.fx.Node) else node
            for node in (out if isinstance(out, (tuple, list)) else [out])]


def _output_specs(gm: torch.fx.GraphModule, symbol: sympy.Symbol | None) -> list[_InputSpec]:
    specs = []
    for value in _output_values(gm):
        found = symbols_of(value)
        if isinstance(value, torch.Tensor) and symbol in found:
            specs.append(_InputSpec(_TOKEN, layout=Layout.of(value, symbol)))
        elif isinstance(value, torch.SymInt) and symbol in found:
            specs.append(_InputSpec(_SYMINT, expr=expr_of(value)))
        else:
            specs.append(_InputSpec(_CONST))
    return specs


class Runtime:
    """What ``torch.compile`` calls: one Dynamo graph, split, compiled, captured per bucket."""

    def __init__(self, split: SplitGraph, config: PiecewiseConfig, symbol: sympy.Symbol | None,
                 token_locator: tuple[int, int | None] | None, graph_mode: str,
                 device: torch.device | None = None, static_args: Collection[int] = (),
                 static_names: Sequence[str] = ()) -> None:
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
        self.static_args = tuple(static_args)  # indices of read-in-place tensors among the call's args
        self._static_names = tuple(static_names)  # their names, for the log line when one moves
        self._static_getter = _getter(self.static_args)  # args -> those tensors, one C call
        self._static_ptrs: tuple[int, ...] | None = None  # their addresses when the graphs were captured
        self._ptrs_by_arg: list[int | None] = []  # the same, at their arg positions (the C++ check's form)
        self._static_index_list: list[int] = []  # static_args as a list, for the same check
        self._moves: dict[int, int] = {}  # static arg index -> times it moved for real
        self._sets = AddressSets(config.max_address_sets, _release_graphs)  # graphs per address set
        self._owned: set[int] = set()  # storage addresses of graph outputs and static buffers
        self._shared_buffers: dict[tuple[torch.dtype, torch.device, int], torch.Tensor] = {}  # see shared_buffer
        self._lock = threading.RLock()
        # Captures, the pool, the failure policy and the stream rule (the graphs stay in the runners).
        self.engine = GraphEngine(graph_mode, device, enforce_note="TORCHPCG_ENFORCE=1")
        self._sdpa_order = SdpaOrder(config.sdpa_order == "auto", device)
        self._drop_after_call: list[tuple[PieceRunner | None, int]] = []  # (runner or all, bucket)
        self.full: Any = None  # full.FullGraphs in cudagraph_mode="full_and_piecewise", when the model allows
        self.full_blockers: list[str] = []  # why full graphs are off for this graph (explain, logs)
        self.frame = ""  # the Python frame Dynamo compiled, "qualname (file:line)" (backend.compiled_frame)
        for piece in split.split_pieces:  # eager split ops: skip nn.Module.__call__ overhead per call
            gm = direct_custom_ops(piece.gm) if config.direct_ops else piece.gm
            split.split_gm.__dict__[piece.name] = direct_forward(gm)
        self.forward = direct_forward(split.split_gm)  # the split module's generated code, called directly

    def unbucket(self) -> None:
        """No compute piece depends on the dynamic size: one static graph per piece, whatever its value."""
        self.symbol = None
        self.buckets = [STATIC_GRAPH_BUCKET]
        self.largest_bucket = STATIC_GRAPH_BUCKET
        for runner in self.runners:
            runner.symbol = None

    def install(self, runner: PieceRunner) -> None:
        """Replace a compute submodule of the split module with its runner."""
        gm = self.split.split_gm
        del gm._modules[runner.name]
        gm.__dict__[runner.name] = runner  # the generated forward calls self.submod_N(...)
        self.runners.append(runner)

    # ---- the call ------------------------------------------------------------------------------

    def __call__(self, *args: Any) -> Any:
        if torch.is_grad_enabled():  # a plain torch.compile call; torchpcg.compile's wrapper has it off
            with torch.no_grad():
                return self._call(args)
        return self._call(args)

    def _call(self, args: tuple[Any, ...]) -> Any:
        started = _now()
        with self._lock:
            if self._drop_after_call:
                self._drop_pending_graphs()  # dropped by the last call, whose outputs were views of them
            num_tokens = self.num_tokens(args)
            bucket = self.bucket_for(num_tokens)
            if bucket is not None:
                self._check_static_inputs(args)
                if self.graph_mode == "cuda":
                    self.engine.order_streams()  # a call on another stream than the last waits for it
            full = self.full if bucket is not None else None
            key = full.key(num_tokens) if full is not None else None
            route = full.route(key, args) if key is not None else None
            if route is not None:  # the whole forward: its graph, or (T's first call) its code as warm-up
                self.state = CallState(bucket=key if route == FULL_REPLAY else None, num_tokens=num_tokens)
                forward, bucket = full.runner, key
            else:
                self.state = CallState(bucket=bucket, num_tokens=num_tokens)
                forward = self.forward
            # Split ops run eagerly at every real T: no per-shape SDPA plans (cuDNN last). A full graph
            # is captured once per exact T, as a whole-model graph is: it keeps the caller's order, so
            # its kernels are the ones torch would pick (cuDNN's, on Hopper) and the plan is built once.
            order = self._sdpa_order.enter() if route is None else None
            try:
                outputs = forward(*args)
            finally:
                self._sdpa_order.exit(order)
                state, self.state = self.state, CallState()
            self._count(state, bucket, num_tokens)
            if state.used_graphs and forward is not self.forward:
                COUNTERS.add("full_graph_calls")
            if state.used_graphs and self.config.copy_outputs:
                outputs = _clone_owned(outputs, self._owned)  # the next call overwrites graph memory
            HOST_TIMES.note(started, state.first_replay, state.replay_ns, state.last_replay, _now())
            return outputs

    def forward_without_graphs(self, *args: Any) -> Any:
        """The split module with every piece running its compiled code, no graph, inside a call.

        The full decode graphs' code when they chain the pieces (``full.FullGraphs``): captured as
        one graph, so the pieces must not replay or capture their own; the call's state is set
        aside for this and put back after."""
        saved, self.state = self.state, CallState()
        try:
            return self.forward(*args)
        finally:
            self.state = saved

    def num_tokens(self, args: Sequence[Any]) -> int:
        return 0 if self.token_locator is None else tokens_at(args, self.token_locator)

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

    def _check_static_inputs(self, args: Sequence[Any]) -> None:
        """Graphs read static inputs in place: each set of their addresses has its own graphs.

        Another set (one compiled frame called for each layer or expert, with its weights) switches
        to that set's graphs (``address_sets.AddressSets``). A real move (a parameter reassigned, a
        cache reallocated) drops the graphs that read the old tensor; an input that moves for real
        a second time is copied on every replay from then on, like a user input.
        """
        if not self.static_args:
            return
        if _PTRS_EQUAL is not None and len(self._ptrs_by_arg) == len(args):  # ~115 parameters: one C++ loop
            if _PTRS_EQUAL(list(args), self._ptrs_by_arg, self._static_index_list):
                return
        statics = self._static_getter(args)
        ptrs = tuple(map(_data_ptr, statics))
        if ptrs == self._static_ptrs:
            return
        runners = self._all_runners()
        if self._static_ptrs is None:
            self._sets.note(ptrs, statics, [runner.captured for runner in runners])
        else:
            graphs, moved, returning = self._sets.switch(ptrs, statics, lambda: [{} for _ in runners])
            for runner, captured in zip(runners, graphs):
                runner.captured = captured
            if moved:
                ptrs = self._moved_for_real([self.static_args[p] for p in moved], args)
            elif returning:
                COUNTERS.add("recaptures")  # an evicted set's graphs are captured again
        self._static_ptrs = ptrs
        self._ptrs_by_arg = [None] * len(args)
        for index, ptr in zip(self.static_args, ptrs):
            self._ptrs_by_arg[index] = ptr
        self._static_index_list = list(self.static_args)  # the C++ check takes lists

    def _moved_for_real(self, moved: Sequence[int], args: Sequence[Any]) -> tuple[int, ...]:
        """Say which inputs moved, count it, and demote those that moved before; the call's
        addresses (in the new layout when an input was demoted)."""
        first_time = not self._moves
        for index in moved:
            self._moves[index] = self._moves.get(index, 0) + 1
        demoted = [i for i in moved if self._moves[i] > 1]
        names = [self._static_names[self.static_args.index(i)] for i in moved]
        log.log(logging.WARNING if first_time or demoted else logging.DEBUG,
                "static input(s) %s changed address (a parameter reassigned or a cache reallocated): the graphs "
                "that read the old tensors are dropped and captured again%s",
                ", ".join(names[:4]) + (" ..." if len(names) > 4 else ""),
                "; it moved before, so it is copied on every replay from now on" if demoted else "")
        COUNTERS.add("recaptures")
        if demoted:
            self._sets.clear()  # every key holds the demoted inputs' addresses: start over
            self._demote(demoted)
        statics = self._static_getter(args)  # in the new layout when an input was demoted
        ptrs = tuple(map(_data_ptr, statics))
        if demoted and self.static_args:
            self._sets.note(ptrs, statics, [runner.captured for runner in self._all_runners()])
        return ptrs

    def watch_static_inputs(self, names_to_index: Mapping[str, int]) -> None:
        """Add read-in-place inputs to the per-call address check (a whole-forward graph reads the
        inputs of split ops too, which piecewise graphs leave to the eager op)."""
        merged = dict(zip(self._static_names, self.static_args))
        merged.update(names_to_index)
        ordered = sorted(merged.items(), key=lambda item: item[1])
        self._static_names = tuple(name for name, _ in ordered)
        self.static_args = tuple(index for _, index in ordered)
        self._static_getter = _getter(self.static_args)
        self._static_ptrs = None  # noted again on the next call

    def _demote(self, indices: Collection[int]) -> None:
        names = {self._static_names[self.static_args.index(i)] for i in indices}
        for runner in self._all_runners():
            runner.demote(names)
        keep = [(i, n) for i, n in zip(self.static_args, self._static_names) if n not in names]
        self.static_args = tuple(i for i, _ in keep)
        self._static_names = tuple(n for _, n in keep)
        self._static_getter = _getter(self.static_args)

    def shared_buffer(self, dtype: torch.dtype, device: torch.device, slot: int, numel: int) -> torch.Tensor:
        """A flat buffer of at least ``numel`` elements that pieces share for their token inputs
        (``_shared_slots``); a larger request gets a new one, earlier pieces keep the old."""
        key = (dtype, device, slot)
        buffer = self._shared_buffers.get(key)
        if buffer is None or buffer.numel() < numel:
            buffer = _zeros(numel, dtype, device)
            self._shared_buffers[key] = buffer
        return buffer

    def own(self, *groups: Any) -> None:
        """Note tensors whose memory belongs to graphs: final outputs there are cloned."""
        for group in groups:
            self._owned.update(t.untyped_storage().data_ptr() for t in group if isinstance(t, torch.Tensor))

    def _count(self, state: CallState, bucket: int | None, num_tokens: int) -> None:
        if state.replays:
            COUNTERS.add("replays", state.replays)
            COUNTERS.add("copied_bytes", state.copied_bytes)
        if state.used_graphs:
            COUNTERS.add("graph_calls")
            COUNTERS.add("real_tokens", num_tokens)
            COUNTERS.add("padded_tokens", (bucket or num_tokens) - num_tokens)
        else:
            COUNTERS.add(graphless_counter(self.config.compiler))

    def captured_graphs(self) -> int:
        return sum(len(r.captured) for r in self._all_runners())

    def _all_runners(self) -> list[PieceRunner]:
        return self.runners + ([self.full.runner] if self.full is not None else [])

    # ---- services for piece runners ------------------------------------------------------------

    def make_graph(self, fn: Callable[..., Any], static_args: list[Any], warm: bool = True) -> CudaGraph | EmulatedGraph:
        """Capture ``fn`` on ``static_args`` into this runtime's pool (a fresh one if it was retired),
        after a warm-up run outside the graph on CUDA when ``warm`` (``engine.GraphEngine.capture``)."""
        return self.engine.capture(fn, static_args, warm=warm)

    def verify(self, runner: PieceRunner, static_args: list[Any], args: Sequence[Any]) -> None:
        """Verify mode: padded real rows must equal the exact-size run (first use of a bucket)."""
        if not self.config.verify or self.symbol is None or not runner.at_bucket:
            return  # a full graph runs at the exact T: nothing is padded
        diff = first_difference(runner.gm, list(args), static_args, self.symbol, self.state.num_tokens)
        if diff is not None:
            node, amount = diff
            raise PaddingError(
                f"{runner.name}: at bucket {self.state.bucket} (T={self.state.num_tokens}) the real rows of node "
                f"{node!r} differ from the exact-size run by {amount:.3g}; the op is not row-wise along the token dim. "
                f"Register it with torchpcg.register_splitting_op(...) or report it as a padding-analysis bug")

    def capture_failed(self, bucket: int, runner: PieceRunner, exc: Exception) -> None:
        """Drop bucket ``bucket`` everywhere; this and later calls there run without its graphs.

        A runner with its own ``on_capture_failure`` (full graphs: they turn themselves off) gets the
        message instead, and the piecewise buckets are unaffected. The engine raises under enforce,
        counts, and retires the pool after out of memory.
        """
        own = runner.on_capture_failure
        message = self.engine.failed(f"{runner.name} at bucket {bucket}", exc, enforce=self.config.enforce,
                                     fallback=own is None)
        if own is not None:
            own(message)
            self.state.bucket = None
            return
        log.warning("%s; bucket %d is dropped, calls there use the next larger bucket or no graphs", message, bucket)
        if bucket in self.buckets:
            self.buckets.remove(bucket)
        self.state.bucket = None  # the rest of this call runs without graphs
        self.drop_after_call(None, bucket)

    def drop_after_call(self, runner: PieceRunner | None, bucket: int | None) -> None:
        """Drop graphs at ``bucket`` (of ``runner``, or of all runners) when the next call starts.

        Not now: earlier pieces of this call still hand out views of their graphs' memory, and
        with ``copy_outputs=False`` this call's outputs are such views until the next call.
        """
        self._drop_after_call.append((runner, bucket))

    def _drop_pending_graphs(self) -> None:
        pending, self._drop_after_call = self._drop_after_call, []
        for runner, bucket in pending:
            self._drop(runner, bucket)

    def _drop(self, runner: PieceRunner | None, bucket: int | None) -> None:
        """Release graphs (of one runner or all; at one bucket or all): they never replay again."""
        for each in [runner] if runner is not None else self._all_runners():
            for key in [bucket] if bucket is not None else list(each.captured):
                captured = each.captured.pop(key, None)
                if captured is not None:
                    captured.graph.release()


def _release_graphs(graphs: Sequence[dict[int, _Captured]]) -> None:
    """Release every graph of an address set (one dict per runner) and empty the dicts."""
    for captured in graphs:
        for entry in captured.values():
            entry.graph.release()
        captured.clear()


def graphless_counter(compiler: str) -> str:
    """The counter of a call served without graphs: ``eager_runs`` when the code it ran is the FX
    code itself (``compiler="eager"``), ``graphless_runs`` when it is compiled code."""
    return "eager_runs" if compiler == "eager" else "graphless_runs"


def _bytes_of(copies: Sequence[tuple[int, torch.Tensor, tuple[int, ...], torch.Tensor | None]]) -> int:
    """Bytes a replay's input copies write (their destinations' sizes)."""
    return sum(dst.numel() * dst.element_size() for _, dst, _, _ in copies)


_data_ptr = torch.Tensor.data_ptr
_now = time.perf_counter_ns

# A C++ loop that Inductor's CUDA graph trees use on their hot path; CUDA builds only (None on CPU).
_PTRS_EQUAL = getattr(torch._C, "_tensors_data_ptrs_at_indices_equal", None)  # (tensors, ptrs, indices) -> bool


def direct_forward(gm: torch.fx.GraphModule) -> Callable[..., Any]:
    """``gm``'s generated ``forward``, bound: no ``nn.Module.__call__`` (hooks, ~5 us) and no lazy
    recompile check per call. Generated once here if ``gm`` is a lazy graph module."""
    real_recompile = getattr(gm, "real_recompile", None)
    if real_recompile is not None:
        real_recompile()
    return gm.forward


def _getter(indices: Sequence[int]) -> Callable[[Sequence[Any]], tuple[Any, ...]]:
    """``args -> tuple(args[i] for i in indices)``, without a Python loop (itemgetter of one index
    returns the item itself, not a tuple)."""
    if len(indices) == 1:
        only = indices[0]
        return lambda args: (args[only],)
    return operator.itemgetter(*indices) if indices else (lambda args: ())


def _clone_owned(outputs: Any, owned: set[int]) -> Any:
    """Clone output tensors that live in graph memory; others (fresh, or a caller's input) as they are."""
    if isinstance(outputs, torch.Tensor):
        return outputs.clone() if outputs.untyped_storage().data_ptr() in owned else outputs
    if isinstance(outputs, (tuple, list)):
        return type(outputs)(_clone_owned(o, owned) for o in outputs)
    return outputs
