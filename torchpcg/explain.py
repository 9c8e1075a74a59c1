"""Explain what the piecewise backend would do with a model, without capturing a graph.

In: a model (an ``nn.Module``, a ``torch.compile``-d one or a ``torchpcg.compile`` one) and one set
of example arguments. Out: an ``ExplainReport``: the pieces in execution order, every split op and
why it was cut, the buckets, the graph mode a real run would use and the static buffer memory.
The same plan, as JSON and text, is what ``debug.dump_split`` writes into ``TORCHPCG_DEBUG_DIR``.
"""
from __future__ import annotations

import collections
import dataclasses
import functools
import inspect
import logging
import operator
import types
from collections.abc import Callable, Mapping
from typing import Any

import torch
import torch.fx

from .config import PiecewiseConfig, format_sizes

__all__ = ["explain", "ExplainReport", "GraphPlan", "PiecePlan", "plan_of", "reason_category", "REASON_CATEGORIES"]

from .backend import compile_options
from .runtime import InputKind
from .stable import describe_callable

log = logging.getLogger(__name__)

# "merged": a tiny compute piece between two split ops that split.py folds into them (run eagerly).
REASON_CATEGORIES = ("attention", "collective", "user", "padding-unsafe", "side effect", "host tensor", "cache state",
                     "merged", "other")


_OFF_NOTE = (" (no graphs on this device: cudagraph='auto' captures CUDA graphs on a GPU; cudagraph='emulate' "
             "runs the CPU stand-in)")
NOTE_WIDTH = 100  # characters of a table cell; the whole reasons are in to_dict() and .pieces


def short_note(note: str) -> str:
    """A table cell of at most ``NOTE_WIDTH`` characters (Hugging Face mask prologues make long ones)."""
    return note if len(note) <= NOTE_WIDTH else note[:NOTE_WIDTH - 1].rstrip() + "…"


def reason_category(reason: str) -> str:
    """'attention (aten::sdpa)' -> 'attention'; split.py and padding.py write the prefixes."""
    if reason.startswith("padding-unsafe"):
        return "padding-unsafe"
    if reason.startswith("attention"):
        return "attention"
    if reason.startswith("collective"):
        return "collective"
    if reason.startswith("user split op"):
        return "user"
    if reason.startswith("merged"):
        return "merged"
    if reason.startswith("side effect"):
        return "side effect"
    if reason.startswith("host tensor"):
        return "host tensor"
    if reason.startswith("cache state"):
        return "cache state"
    return "other"


@dataclasses.dataclass(frozen=True)
class PiecePlan:
    """One piece of the split graph: a compute piece (captured per bucket) or a split op (eager)."""

    index: int  # position in execution order
    name: str  # submodule name in the split module, e.g. "submod_2"
    kind: str  # "compute" or "split"
    num_nodes: int  # FX nodes of the Dynamo graph in this piece
    reasons: tuple[str, ...] = ()  # split pieces: why each op was cut
    token_inputs: int = 0  # compute pieces: inputs with a token dim
    chained_inputs: int = 0  # of those, read in place from the previous graph's static output
    static_bytes: int = 0  # compute pieces: static [bucket, ...] buffers of the other token inputs
    graphless_reason: str = ""  # compute pieces that never use graphs, and why
    # of static_bytes, per buffer shared with other pieces ((dtype, slot) -> bytes): counted once per graph
    shared_bytes: tuple[tuple[str, int, int], ...] = ()

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out["reasons"] = list(self.reasons)
        out["categories"] = [reason_category(r) for r in self.reasons]
        return out


@dataclasses.dataclass(frozen=True)
class GraphPlan:
    """The plan of one Dynamo graph (a model compiled with ``fullgraph=True`` has exactly one)."""

    pieces: tuple[PiecePlan, ...]
    token_symbol: str | None  # e.g. "s72" or "u0"; None: no dynamic token dim (one static graph)
    buckets: tuple[int, ...]
    graph_mode: str  # "cuda", "emulate" or "off": what a real run of this config would use
    num_dynamo_nodes: int
    full_graphs: str = ""  # cudagraph_mode="full_and_piecewise": "T <= 8", or "off: <why>"; "" in piecewise mode

    @property
    def compute_pieces(self) -> tuple[PiecePlan, ...]:
        return tuple(p for p in self.pieces if p.kind == "compute")

    @property
    def split_pieces(self) -> tuple[PiecePlan, ...]:
        return tuple(p for p in self.pieces if p.kind == "split")

    @property
    def split_counts(self) -> dict[str, int]:
        """Split ops per reason category (a split piece holding two kinds counts in both)."""
        counts = dict.fromkeys(REASON_CATEGORIES, 0)
        for piece in self.split_pieces:
            for category in {reason_category(r) for r in piece.reasons}:
                counts[category] += 1
        return counts

    @property
    def largest_bucket(self) -> int:
        return max(self.buckets) if self.buckets else 0

    @property
    def static_buffer_bytes(self) -> int:
        """The pieces' static input buffers; one that pieces share counts once, at its largest."""
        shared: dict[tuple[str, int], int] = {}
        for piece in self.pieces:
            for dtype, slot, size in piece.shared_bytes:
                shared[(dtype, slot)] = max(shared.get((dtype, slot), 0), size)
        own = sum(p.static_bytes - sum(size for _, _, size in p.shared_bytes) for p in self.pieces)
        return own + sum(shared.values())

    def to_dict(self) -> dict[str, Any]:
        return {
            "token_symbol": self.token_symbol,
            "buckets": list(self.buckets),
            "largest_bucket": self.largest_bucket,
            "graph_mode": self.graph_mode,
            "full_graphs": self.full_graphs,
            "num_dynamo_nodes": self.num_dynamo_nodes,
            "num_compute_pieces": len(self.compute_pieces),
            "num_split_ops": len(self.split_pieces),
            "split_counts": self.split_counts,
            "static_buffer_bytes": self.static_buffer_bytes,
            "graphs_per_bucket": len(self.compute_pieces) - sum(bool(p.graphless_reason) for p in self.compute_pieces),
            "pieces": [p.to_dict() for p in self.pieces],
        }

    def table(self) -> str:
        """The pieces as an aligned text table, one row per piece."""
        header = ("#", "piece", "kind", "nodes", "token in", "chained", "static buf", "split reason / note")
        rows = [header]
        users = collections.Counter((dtype, slot) for p in self.pieces for dtype, slot, _ in p.shared_bytes)
        for p in self.pieces:
            if p.kind == "split":
                note = "; ".join(p.reasons)
            else:
                note = f"no graphs: {p.graphless_reason}" if p.graphless_reason else ""
                shared = sum(size for dtype, slot, size in p.shared_bytes if users[(dtype, slot)] > 1)
                if shared:
                    note = "; ".join(filter(None, [note, f"{format_bytes(shared)} of it shared with other pieces"]))
            compute = p.kind == "compute"
            rows.append((str(p.index), p.name, p.kind, str(p.num_nodes),
                         str(p.token_inputs) if compute else "", str(p.chained_inputs) if compute else "",
                         format_bytes(p.static_bytes) if compute else "", short_note(note)))
        widths = [max(len(r[i]) for r in rows) for i in range(len(header) - 1)]
        lines = ["  ".join(cell.rjust(w) if i in (0, 3, 4, 5, 6) else cell.ljust(w)
                           for i, (cell, w) in enumerate(zip(row, widths))) + "  " + row[-1] for row in rows]
        return "\n".join(line.rstrip() for line in lines)

    def summary(self) -> str:
        counts = ", ".join(f"{k} {v}" for k, v in self.split_counts.items() if v) or "none"
        buckets = format_sizes(self.buckets)
        return "\n".join([
            f"token count symbol: {self.token_symbol or 'none (static shapes: one graph, no buckets)'}",
            f"buckets: {buckets}; largest {self.largest_bucket}",
            f"graph mode: {self.graph_mode}" + (_OFF_NOTE if self.graph_mode == "off" else "")
            + (f"; full-decode graphs: {self.full_graphs}" if self.full_graphs else ""),
            f"{len(self.compute_pieces)} compute pieces, {len(self.split_pieces)} split ops ({counts})",
            f"static input buffers at bucket {self.largest_bucket}"
            + (" (what graphs would allocate; none with graphs off)" if self.graph_mode == "off" else "")
            + f": {format_bytes(self.static_buffer_bytes)}",
        ])

    def __str__(self) -> str:
        return self.summary() + "\n\n" + self.table()


@dataclasses.dataclass(frozen=True)
class ExplainReport:
    """What ``torchpcg.explain`` returns: ``print(report)``, ``report.to_dict()``, or the fields.

    ``pieces``, ``split_counts``, ``buckets``, ``graph_mode``, ``token_symbol`` and
    ``static_buffer_bytes`` describe the first Dynamo graph (the only one under ``fullgraph=True``);
    ``graphs`` holds every graph's plan.
    """

    model: str
    graphs: tuple[GraphPlan, ...]
    config: dict[str, Any]

    def _first(self) -> GraphPlan:
        if not self.graphs:
            raise ValueError("explain saw no Dynamo graph: the model ran without calling the piecewise backend")
        return self.graphs[0]

    @property
    def pieces(self) -> tuple[PiecePlan, ...]:
        return self._first().pieces

    @property
    def split_counts(self) -> dict[str, int]:
        return self._first().split_counts

    @property
    def buckets(self) -> tuple[int, ...]:
        return self._first().buckets

    @property
    def graph_mode(self) -> str:
        return self._first().graph_mode

    @property
    def token_symbol(self) -> str | None:
        return self._first().token_symbol

    @property
    def static_buffer_bytes(self) -> int:
        return sum(g.static_buffer_bytes for g in self.graphs)

    def summary(self) -> str:
        """The summary lines of every graph, without the piece table."""
        return "\n".join(g.summary() for g in self.graphs)

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-serialisable data: ``json.dumps(report.to_dict())`` works."""
        config = {k: (list(v) if isinstance(v, tuple) else v) for k, v in self.config.items()}
        return {"model": self.model, "config": config, "graphs": [g.to_dict() for g in self.graphs]}

    def __str__(self) -> str:
        parts = [f"torchpcg.explain: {self.model}: {len(self.graphs)} Dynamo graph(s)"]
        for i, graph in enumerate(self.graphs):
            parts.append(f"\n-- graph {i} --" if len(self.graphs) > 1 else "")
            parts.append(str(graph))
        return "\n".join(p for p in parts if p)


# ---- building plans from runtimes -----------------------------------------------------------------

def plan_of(runtime: Any, graph_mode: str | None = None) -> GraphPlan:
    """The ``GraphPlan`` of a ``Runtime`` the backend built (``graph_mode`` overrides its own)."""
    runners = {r.piece.name: r for r in runtime.runners}
    largest = runtime.largest_bucket
    from_graphs = _inputs_from_compute_pieces(runtime.split.split_gm, set(runners))
    pieces = []
    for piece in runtime.split.pieces:
        runner = runners.get(piece.name)
        kind = "split" if piece.is_split_op else "compute"
        token = {i: s for i, s in enumerate(runner.inputs) if s.kind == InputKind.TOKEN} if runner is not None else {}
        copied = {i: s for i, s in enumerate(runner.inputs) if s.kind == InputKind.COPIED} if runner is not None else {}
        # Float token inputs and copied inputs that are a previous graph's output are read in
        # place (runtime: chained inputs); every other token input has one flat buffer sized for
        # the largest bucket, every other copied input one buffer of its fixed shape.
        chained = {i for i, s in {**token, **copied}.items() if i in from_graphs.get(piece.name, ())
                   and (s.kind == InputKind.COPIED or s.layout.dtype.is_floating_point)}
        sizes = {i: s.layout.storage_numel_at(largest) * _itemsize(s.layout.dtype)
                 for i, s in {**token, **copied}.items() if i not in chained}
        slots = getattr(runner, "shared_slots", {}) if runner is not None else {}
        shared = tuple((str(token[i].layout.dtype), slot, sizes[i]) for i, slot in slots.items() if i in sizes)
        static = sum(sizes.values())
        pieces.append(PiecePlan(
            index=piece.index, name=piece.name, kind=kind, num_nodes=len(piece.node_names),
            reasons=tuple(piece.reasons), token_inputs=len(token), chained_inputs=len(chained),
            static_bytes=static, graphless_reason=getattr(runner, "graphless_reason", "") or "",
            shared_bytes=shared,
        ))
    nodes = sum(p.num_nodes for p in pieces)
    symbol = str(runtime.symbol) if runtime.symbol is not None else None
    buckets = tuple(runtime.buckets) if runtime.symbol is not None else ()
    full = ""
    if runtime.full_blockers:
        full = "off: " + "; ".join(runtime.full_blockers[:3]) + (" ..." if len(runtime.full_blockers) > 3 else "")
    elif runtime.config.cudagraph_mode == "full_and_piecewise":
        full = f"T <= {runtime.config.full_max_size}, one whole-forward graph per exact T"
    return GraphPlan(tuple(pieces), symbol, buckets, graph_mode or runtime.graph_mode, nodes, full)


def _inputs_from_compute_pieces(split_gm: torch.fx.GraphModule, compute: set[str]) -> dict[str, set[int]]:
    """Piece name -> indices of its inputs produced directly by another compute piece."""
    found: dict[str, set[int]] = {}
    for node in split_gm.graph.nodes:
        if node.op != "call_module" or node.target not in compute:
            continue
        for index, arg in enumerate(node.args):
            while isinstance(arg, torch.fx.Node) and arg.op == "call_function" and arg.target is operator.getitem:
                arg = arg.args[0]  # getitem of a piece's output tuple
            if isinstance(arg, torch.fx.Node) and arg.op == "call_module" and arg.target in compute:
                found.setdefault(node.target, set()).add(index)
    return found


def _itemsize(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def format_bytes(num_bytes: int) -> str:
    """1536 -> '1.5 KiB'."""
    value = float(num_bytes)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if value < 1024 or unit == "GiB":
            return f"{int(value)} B" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{value:.1f} GiB"


def would_use_graph_mode(config: PiecewiseConfig, device: torch.device | None) -> str:
    """Like ``runtime.resolve_graph_mode`` but silent: explain only reports, it never falls back."""
    on_cuda = device is not None and device.type == "cuda"
    if config.cudagraph == "auto":
        return "cuda" if on_cuda else "off"
    if config.cudagraph == "cuda" and not on_cuda:
        return "off (cudagraph='cuda' needs CUDA tensors)"
    return config.cudagraph


# ---- explain --------------------------------------------------------------------------------------

def explain(model_or_compiled: Callable[..., Any], *args: Any, token_inputs: Mapping[str, int] | None = None,
            options: Mapping[str, Any] | None = None, dynamic_dim: str | None = None,
            **kwargs: Any) -> ExplainReport:
    """Split ``model`` as the piecewise backend would and report the plan; captures no graph.

    Example::

        >>> model = FlatDecoder(DecoderConfig())
        >>> report = torchpcg.explain(model, ids, positions, model.new_kv_cache())
        >>> print(report)                  # summary + one row per piece
        >>> report.split_counts            # {'attention': 2, 'collective': 0, 'user': 0, ...}
        >>> json.dumps(report.to_dict())   # pieces, reasons, buckets, graph mode, memory

    ``model_or_compiled`` may be the module, ``torch.compile(module, backend="piecewise",
    options=...)`` or ``torchpcg.compile(module, ...)``; the compiled model's options (and
    ``options=``, which win) give the buckets and split ops. The model is compiled afresh with
    ``fullgraph=True``, ``cudagraph="off"`` and eager pieces, and run once on ``*args, **kwargs`` under
    ``no_grad``. Token dims are marked dynamic as ``torchpcg.compile`` finds them, by shape: the
    first tensor argument (dim 1 for 2-D integer ids, else dim 0) plus every other tensor
    argument with T rows at that dim (pass T > 1; see docs/zero-recompiles.md for the
    exclusions); ``token_inputs={"name": dim}`` names them instead. ``dynamic_dim``: ``"unbacked"`` or ``"backed"`` (``mark_dynamic``);
    default (or ``"auto"``): the ``torchpcg.compile`` model's own if it is one of those two, else
    unbacked and, if the model cannot be traced that way (code that branches on the token count,
    e.g. Hugging Face mask helpers), backed. With backed dims pass at least 2 tokens (Dynamo specialises a size of 1).

    Note: the model really runs once, so in-place effects happen (pass a scratch KV cache). The
    compile is counted in ``torchpcg.stats()`` (``dynamo_graphs``, ``pieces``, ``split_ops``, and the
    call as ``graphless_runs``, or ``eager_runs`` with ``compiler="eager"``) but captures nothing. It does not touch the Dynamo cache of your own compiled
    model: it compiles a copy of ``forward``'s code object, so your model neither recompiles nor
    loses compiled code (``torch._dynamo.reset()`` would). Forward hooks of the module are not run.
    """
    module, found_options, found_tokens, found_dim = _unwrap(model_or_compiled)
    user_config = PiecewiseConfig.resolve({**found_options, **dict(options or {})})
    # The plan does not depend on the piece compiler; eager pieces make explain seconds, not minutes.
    trace_config = user_config.replace(cudagraph="off", compiler="eager", debug_dir=None, verify=False, enforce=False)
    chosen = dynamic_dim if dynamic_dim not in (None, "auto") else found_dim
    attempts = [chosen] if chosen in ("unbacked", "backed") else ["unbacked", "backed"]
    for attempt, mode in enumerate(attempts):
        try:
            runtimes = _trace_once(module, trace_config, args, kwargs, token_inputs or found_tokens, mode)
            break
        except Exception as exc:  # noqa: BLE001 - Dynamo raises many types; we retry once, then re-raise
            if attempt + 1 == len(attempts):
                raise
            log.info("explain: tracing with %s token dims failed (%s: %s); retrying with %s",
                     mode, type(exc).__name__, str(exc).splitlines()[0][:200], attempts[attempt + 1])
    plans = [plan_of(r, would_use_graph_mode(user_config, _device_of(r))) for r in runtimes]
    log.info("explain %s: %d Dynamo graph(s)", describe_callable(module), len(plans))
    return ExplainReport(describe_callable(module), tuple(plans), user_config.to_dict())


def _trace_once(module: Any, config: PiecewiseConfig, args: tuple, kwargs: dict,
                token_inputs: Mapping[str, int] | None, dynamic_dim: str) -> list[Any]:
    """Compile a fresh copy of ``module``'s forward, call it once, return the runtimes built."""
    from .backend import collect_runtimes
    from .stable import mark_token_dim, resolve_token_layout

    fresh, signature_owner = _fresh_callable(module)
    compiled = torch.compile(fresh, backend="piecewise", fullgraph=True, options=config.to_dict())
    bound = inspect.signature(signature_owner).bind(*args, **kwargs)
    layout = resolve_token_layout(dict(bound.arguments), token_inputs, set())
    for name, dim in layout.dims.items():
        value = layout.leaf(bound.arguments, name)  # a name, or a tensor inside a dict argument
        if isinstance(value, torch.Tensor):
            value = value.detach()  # a new tensor object: the caller's stays unmarked
            layout.replace(bound.arguments, name, value)
            mark_token_dim(value, dim, dynamic_dim)
    with collect_runtimes() as runtimes, torch.no_grad():
        compiled(*bound.args, **bound.kwargs)
    return runtimes


def _device_of(runtime: Any) -> torch.device | None:
    """The device of the first token input (where static buffers would live)."""
    for runner in runtime.runners:
        for spec in runner.inputs:
            if spec.kind == InputKind.TOKEN:
                return spec.layout.device
    return None


def _unwrap(model: Any) -> tuple[Any, dict[str, Any], dict[str, int] | None, str]:
    """(the plain module or function, piecewise options found, token_inputs, dynamic_dim or '')."""
    options: dict[str, Any] = {}
    token_inputs = None
    dynamic_dim = ""
    from .stable import StableModel

    if isinstance(model, StableModel):
        options = model.config.to_dict()
        token_inputs = model.token_inputs
        dynamic_dim = model.dynamic_dim if model.dynamic_dim in ("unbacked", "backed") else ""  # auto/off: ours
        model = model.model
    if hasattr(model, "_torchdynamo_orig_callable"):  # OptimizedModule or a torch.compile-d function
        options = options or compile_options(model)
        model = getattr(model, "_orig_mod", None) or model._torchdynamo_orig_callable
    return model, options, token_inputs, dynamic_dim


def _fresh_callable(model: Any) -> tuple[Callable[..., Any], Callable[..., Any]]:
    """A callable running ``model``'s forward from a *copy* of its code object, plus its signature source.

    Dynamo keys compiled code and recompile counts on the code object of the frame it compiles (with
    ``fullgraph=True`` only the top frame: everything below is inlined). A copy gets its own empty
    cache, so explain neither reuses nor disturbs the cache entries of the user's compiled model.
    """
    if isinstance(model, torch.nn.Module):
        forward = type(model).forward
        return types.MethodType(_copy_function(forward), model), model.forward
    if isinstance(model, types.MethodType):
        return types.MethodType(_copy_function(model.__func__), model.__self__), model
    if isinstance(model, types.FunctionType):
        return _copy_function(model), model
    if isinstance(model, functools.partial):
        return functools.partial(_fresh_callable(model.func)[0], *model.args, **model.keywords), model
    raise TypeError(f"torchpcg.explain: expected an nn.Module or a function, got {type(model).__name__}")


def _copy_function(fn: types.FunctionType) -> types.FunctionType:
    copy = types.FunctionType(fn.__code__.replace(), fn.__globals__, fn.__name__, fn.__defaults__, fn.__closure__)
    copy.__kwdefaults__ = fn.__kwdefaults__
    copy.__dict__.update(fn.__dict__)
    copy.__qualname__ = fn.__qualname__
    return copy
