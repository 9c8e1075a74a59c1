"""The split plan of one Dynamo graph: what ``explain`` reports and ``debug`` dumps.

In: a ``Runtime`` the backend built (pieces compiled; nothing needs to be captured). Out: a
``GraphPlan`` (frozen): the pieces in execution order (``PiecePlan``), every split op and why it
was cut, the buckets, the graph mode, the full-decode graphs and the static buffer memory; as a
text table (``str``) and as JSON-ready data (``to_dict``). No CUDA here, nothing is compiled.

A tool above the runtime: imports ``runtime`` and ``config``, never ``backend``, ``explain``, ``debug`` or
``stable``; ``explain`` and ``debug`` import it.
"""
from __future__ import annotations

import collections
import dataclasses
import operator
from typing import Any

import torch
import torch.fx

from .config import format_sizes
from .runtime import InputKind, Runtime

__all__ = ["GraphPlan", "PiecePlan", "plan_of", "reason_category", "REASON_CATEGORIES", "format_bytes", "short_note",
           "NOTE_WIDTH"]

# "merged": a tiny compute piece between two split ops that split.py folds into them (run eagerly).
REASON_CATEGORIES = ("attention", "collective", "user", "padding-unsafe", "side effect", "host tensor", "cache state",
                     "merged", "other")


_OFF_NOTE = (" (no graphs on this device: cudagraph='auto' captures CUDA graphs on a GPU; cudagraph='emulate' "
             "runs the CPU stand-in)")
NOTE_WIDTH = 100  # characters of a table cell; the whole reasons are in to_dict() and .pieces


def short_note(note: str) -> str:
    """A table cell of at most ``NOTE_WIDTH`` characters (Hugging Face mask prologues make long ones)."""
    return note if len(note) <= NOTE_WIDTH else note[:NOTE_WIDTH - 1].rstrip() + "…"


# (prefix a split reason starts with, its category); split.py and padding.py write the prefixes
_REASON_PREFIXES = (("padding-unsafe", "padding-unsafe"), ("attention", "attention"), ("collective", "collective"),
                    ("user split op", "user"), ("merged", "merged"), ("side effect", "side effect"),
                    ("host tensor", "host tensor"), ("cache state", "cache state"))


def reason_category(reason: str) -> str:
    """'attention (aten::sdpa)' -> 'attention'; 'other' for a reason of no known prefix."""
    return next((category for prefix, category in _REASON_PREFIXES if reason.startswith(prefix)), "other")


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
    frame: str = ""  # the Python frame Dynamo compiled, "qualname (file:line)"; '' where torch does not say

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
            "frame": self.frame,
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
        return "\n".join(([f"frame: {self.frame}"] if self.frame else []) + [
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


def plan_of(runtime: Runtime, graph_mode: str | None = None) -> GraphPlan:
    """The ``GraphPlan`` of a ``Runtime`` the backend built (``graph_mode`` overrides its own)."""
    runners = {r.name: r for r in runtime.runners}
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
    return GraphPlan(tuple(pieces), symbol, buckets, graph_mode or runtime.graph_mode, nodes, full,
                     runtime.frame)


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
