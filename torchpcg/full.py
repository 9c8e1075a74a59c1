"""Whole-forward graphs for decode-sized calls (``cudagraph_mode="full_and_piecewise"``).

In: the Dynamo graph, the reason each split node was cut, and its runtime. Out: ``FullGraphs``,
which the runtime asks first on a call of T <= ``full_max_size`` tokens: one CUDA graph of the
whole forward per exact T, split ops captured inside, so a decode step is one replay instead of
one replay per piece plus an eager op between each.

Correct by construction:

* **Exact T, never padded.** A split op exists because it is not row-wise (attention, a KV-cache
  write at given positions): padding rows would be attended to or written. A whole graph is kept
  per exact token count, so every op inside sees only real rows.
* **Only capturable split ops.** Every split op must be declared capturable (built-in attention,
  ``register_splitting_op(op, capturable=True)``) or be an ordinary tensor op cut only for padding;
  collectives, data-dependent and random ops keep a model piecewise (the reasons are logged).
* **Written inputs read in place.** Inputs a split op writes (a KV cache) are the graph's own
  tensors, not copies; their addresses are checked on every call, and a moved one turns full
  graphs off for this model (logged once) instead of writing into a stale tensor.
* **Side effects once.** T's first call runs the whole compiled forward without a graph (it warms
  up every kernel at that exact size: Triton autotuning, cuBLAS workspaces); its second call
  captures without a warm-up run, so a captured op's writes happen once per call, as in eager.

**The whole graph compiled by Inductor.** With ``compiler="inductor"`` the full graphs run the
Dynamo graph compiled by Inductor as one piece (split ops inside, as opaque calls), not the chain
of pieces: Inductor fuses across the split points (the residual add and norm around attention).
Compiled as pieces are (``compilers.TokenDispatch``): once with T backed for T = 2 ..
``full_max_size``, at build time, and statically for T = 1 on its first call. Dynamo's unbacked
T cost kernels: a decode step of the 16-layer reference decoder launched 320 kernels compiled
that way, 246 per exact T, against 245 for a hand-captured whole-model Inductor graph (H200,
torch 2.11; see docs/design.md). If a compile fails, the full graphs run the compiled pieces,
with a warning.
"""
from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
import torch.fx

from .compilers import ExactShapeCode, TokenDispatch, copy_graph_module
from .padding import REASON_PREFIX, written_bases
from .runtime import FULL_REPLAY, FULL_WARM, PieceRunner, Runtime
from .split import CACHE_STATE_PREFIX, is_capturable

__all__ = ["FullGraphs", "full_graph_blockers", "written_inputs"]

log = logging.getLogger(__name__)

# Padding categories that cannot sit inside a graph whatever the size: a host sync, a random draw
# whose offsets the graph would freeze, a second dynamic size; attention ops nobody declared capturable.
_NOT_CAPTURABLE = ("data-dependent", "random", "second dynamic symbol", "attention")


def full_graph_blockers(reasons: Mapping[torch.fx.Node, str], capturable: frozenset[str]) -> list[str]:
    """Split nodes that keep this graph piecewise, as ``"node: why"``; empty means full graphs work."""
    blockers = []
    for node, why in reasons.items():
        if is_capturable(node, capturable):
            continue
        if why.startswith("side effect"):
            continue  # a write into another piece's value: one graph holds both
        if why.startswith(CACHE_STATE_PREFIX):
            continue  # a plain tensor op on the cache: a whole graph reads it in place, address checked
        if why.startswith(REASON_PREFIX) and not why[len(REASON_PREFIX):].startswith(_NOT_CAPTURABLE):
            continue  # not row-wise, but a plain tensor op at one exact size
        blockers.append(f"{node.name}: {why}")
    return blockers


def written_inputs(gm: torch.fx.GraphModule, nodes: Sequence[torch.fx.Node]) -> list[int]:
    """Positions of the graph inputs that ``nodes`` write in place (through views)."""
    placeholders = {n: i for i, n in enumerate(n for n in gm.graph.nodes if n.op == "placeholder")}
    found = {placeholders[base] for node in nodes for base in written_bases(node) if base in placeholders}
    return sorted(found)


class FullGraphs:
    """One whole-forward graph per exact token count up to ``max_size``, beside the piecewise ones.

    The graphs are ``PieceRunner`` captures of the whole forward (inputs classified and copied as
    for any piece): the whole Dynamo graph compiled by Inductor in one piece, with T backed for
    T = 2 .. ``max_size`` and static for T = 1; or the split module's chain of compiled pieces with
    ``compiler="eager"`` or when a compile failed (``whole_graph`` says which).
    """

    def __init__(self, runtime: Runtime, gm: torch.fx.GraphModule, static_names: Mapping[str, int],
                 written: Sequence[int], max_size: int, compiler: str = "eager", max_autotune: bool = False,
                 backed_compile: bool = True) -> None:
        placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
        fake_args = [n.meta.get("example_value", n.meta.get("val")) for n in placeholders]
        in_place = {index: name for name, index in static_names.items()}
        in_place.update({index: placeholders[index].name for index in written})
        self.runtime = runtime
        # Runner first: it reads the graph's output structure, which Inductor may rewrite.
        self.runner = PieceRunner("full graph", gm, runtime.forward_without_graphs, fake_args, runtime.symbol, runtime,
                                  static_inputs=in_place, share_buffers=False)
        self.runner.warm_before_capture = False  # T's first call, run without a graph, was the warm-up
        self.runner.at_bucket = False  # one graph per exact T: no padding to verify, no bucket to note
        self.runner.on_capture_failure = self.turn_off  # a failed capture: no full graphs, buckets stay
        self.whole_graph = compiler != "eager"  # the whole graph compiled by Inductor (False: the chained pieces)
        self._sizes: set[int] = set()
        # Static code per exact call shapes (T=1; every T without backed code). A failed compile
        # switches to the compiled pieces for good.
        self._static = ExactShapeCode(copy_graph_module(gm), compiler, "full graph", runtime.forward_without_graphs,
                                      max_autotune=max_autotune, limit=max(max_size, 1), on_failure=self._use_pieces)
        self._code = TokenDispatch(gm, fake_args, runtime.symbol, max_size, compiler,
                                   self._static if self.whole_graph else runtime.forward_without_graphs,
                                   "full graph", max_autotune=max_autotune, backed=backed_compile)
        if self.whole_graph:
            self.runner.compiled = self._whole_forward
        self.written = tuple(written)
        self.written_names = tuple(placeholders[i].name for i in written)
        self.max_size = max_size
        self.off_reason = self.runner.graphless_reason
        self._seen: set[int] = set()  # token counts called once (warm-up done)
        self._ptrs: tuple[int, ...] | None = None  # written inputs' addresses when graphs were captured

    def key(self, num_tokens: int) -> int | None:
        """The graph key for a call of ``num_tokens`` tokens, or None when full graphs don't serve it."""
        if self.off_reason:
            return None
        if self.runtime.symbol is None:
            return 0  # a static graph: its one shape
        return num_tokens if 1 <= num_tokens <= self.max_size else None

    def route(self, key: int, args: Sequence[Any]) -> str | None:
        """How this call runs: ``FULL_WARM`` (T's first call: the whole forward, no graph),
        ``FULL_REPLAY`` (its graph, captured on the first such call) or None (piecewise: full graphs
        went off)."""
        if key not in self._seen:
            self._seen.add(key)
            return FULL_WARM
        ptrs = tuple(args[i].data_ptr() for i in self.written)
        if self._ptrs is None:
            self._ptrs = ptrs
        elif ptrs != self._ptrs:
            self.turn_off(f"input(s) {', '.join(self.written_names)} written inside the graph changed address; "
                          f"pass the same tensor on every call (or mark it with torch._dynamo.mark_static_address)")
            return None
        return FULL_REPLAY

    def turn_off(self, reason: str) -> None:
        """No more full graphs for this model: drop them (at the next call) and say why, once."""
        if self.off_reason:
            return
        self.off_reason = reason
        log.warning("full-decode graphs off: %s; calls use piecewise graphs", reason)
        for key in list(self.runner.captured):
            self.runtime.drop_after_call(self.runner, key)

    @property
    def compiled_sizes(self) -> list[int]:
        """Token counts served by the whole graph's Inductor code so far, ascending."""
        return sorted(self._sizes) if self.whole_graph else []

    @property
    def compiles(self) -> int:
        """Inductor compiles of the whole graph so far: one with T backed (T >= 2), static ones."""
        return (self._code.backed is not None) + len(self._static.compiled)

    def _whole_forward(self, *args: Any) -> Any:
        """The whole graph's Inductor code for this call: the compile with T backed (made at build
        time) for T >= 2, else static code for the call's shapes, compiled on T's first call (its
        warm-up): T=1, or every T when the backed compile was refused."""
        out = self._code(*args)
        if self.whole_graph:
            self._sizes.add(self.runtime.num_tokens(args))
        return out

    def _use_pieces(self, exc: Exception) -> Callable[..., Any]:
        """A whole-graph compile failed: the full graphs run the compiled pieces from now on."""
        log.warning("full-decode graphs: compiling the whole graph with %s failed (%s: %s); they run the compiled "
                    "pieces instead", self._static.compiler, type(exc).__name__, str(exc).splitlines()[0][:200])
        self.whole_graph = False
        self.runner.compiled = self.runtime.forward_without_graphs
        return self.runtime.forward_without_graphs
