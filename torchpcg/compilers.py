"""Compile one piece. In: a piece GraphModule and its fake (symbolic) example inputs.
Out: a callable taking real tensors of any token count. No CUDA graphs here.

``inductor`` compiles once for the dynamic token size (the fake inputs carry the token symbol),
or for one exact size when given real inputs (full graphs at T=1, full.py); ``compile_backed``
compiles again with T backed, and ``TokenDispatch`` picks the code by T;
``eager`` runs the piece's FX code as is (fast to build, useful for debugging and CPU tests).

The fake inputs are the parent Dynamo graph's own values, so Inductor's FX graph cache sees its
symbols; ``hinted_symints`` makes their SymInts look the same to the cache in every graph and
process (see its docstring).
"""
from __future__ import annotations

import functools
import logging
import threading
import time
from collections.abc import Callable, Collection, Sequence
from typing import Any, NamedTuple

import sympy
import torch
import torch.fx

from .config import COMPILERS
from .inductor_passes import piece_passes
from .layout import expr_of, symbols_of, token_source, tokens_at
from .stats import COUNTERS

__all__ = ["BackedCode", "ExactShapeCode", "LazyCode", "TokenDispatch", "compile_piece", "compile_exact",
           "compile_backed", "copy_graph_module", "hinted_symints", "structure_key", "REUSED"]

log = logging.getLogger(__name__)

# Graphs are ours to capture: Inductor must not add its own cudagraph trees inside a piece.
_INDUCTOR_PATCHES = {"triton.cudagraphs": False}
# What torch.compile(mode="max-autotune") sets, minus its CUDA graphs (ours are outside the piece).
_AUTOTUNE_PATCHES = {"max_autotune": True, "coordinate_descent_tuning": True}


def compile_piece(gm: torch.fx.GraphModule, fake_args: Sequence[Any], compiler: str, name: str = "", *,
                  max_autotune: bool = False) -> Callable[..., Any]:
    """Compile ``gm`` for every token count the fake inputs' symbols allow, or for the shapes of real
    inputs (``max_autotune``: tuned kernels)."""
    assert compiler in COMPILERS, compiler  # validated by PiecewiseConfig
    if compiler == "eager":
        return gm
    start = time.perf_counter()
    from torch._inductor.compile_fx import compile_fx

    # no_grad: pieces are inference-only, so AOT builds a forward graph, not a joint one.
    # piece_passes: what a piece's cut changes in Inductor's choices, undone (inductor_passes.py).
    patches = {**_INDUCTOR_PATCHES, **piece_passes(), **(_AUTOTUNE_PATCHES if max_autotune else {})}
    with torch.no_grad(), torch._inductor.config.patch(patches):
        compiled = compile_fx(gm, hinted_symints(fake_args))
    log.debug("inductor compiled %s in %.2fs", name or "piece", time.perf_counter() - start)
    return compiled


# ---- identical pieces compile once per process ------------------------------------------------

class _Unkeyable(Exception):
    """A graph or input the structural key cannot render: no reuse, compile as usual."""


_TOKEN = sympy.Symbol("T", integer=True, positive=True)
_SIMPLE = (bool, int, str, type(None), torch.dtype, torch.device, torch.layout, torch.memory_format)


def structure_key(gm: torch.fx.GraphModule, inputs: Sequence[Any], symbol: Any = None) -> tuple[Any, ...] | None:
    """A key that two graphs share only if they compute the same function of inputs that look alike.

    The decoder's middle layers are pieces of identical code that differ only in node names and
    in which parameters they get as inputs. Inductor's FX graph cache finds that (names
    normalised), but each hit still costs a key, a load and the kernels' start-up: the cold
    piecewise build on the H200 made 28 hits, and AOT's cache lookups took 4.4 s cumulative in its
    profile (``scripts/setup_breakdown.py``). Keyed here by each
    node's op, target and arguments (other nodes by position, constants by value), the inputs'
    sizes, strides, dtypes and devices (``symbol`` written as T) and Inductor's config, the
    compiled code is reused in-process instead. None when the graph reads state of its own
    (``get_attr``, ``call_module``: its values are not inputs) or holds a value the key cannot
    render; such graphs compile as usual.
    """
    try:
        position: dict[torch.fx.Node, int] = {}
        nodes = []
        for node in gm.graph.nodes:
            if node.op in ("get_attr", "call_module"):
                return None
            position[node] = len(position)
            target = None if node.op == "placeholder" else node.target
            nodes.append((node.op, target, _render(node.args, position), _render(node.kwargs, position)))
        config = torch._inductor.config.get_hash()
        return (tuple(nodes), tuple(_input_key(value, symbol) for value in inputs), config)
    except (_Unkeyable, AttributeError, TypeError):
        return None


def _render(value: Any, position: dict[torch.fx.Node, int]) -> Any:
    if isinstance(value, torch.fx.Node):
        return ("node", position[value])
    if isinstance(value, (tuple, list)):
        return (type(value).__name__, *(_render(v, position) for v in value))
    if isinstance(value, dict):
        return ("dict", *((k, _render(v, position)) for k, v in value.items()))
    if isinstance(value, float):
        return ("float", repr(value))  # 0.0 and -0.0 differ; so do 1 and 1.0
    if isinstance(value, slice):
        return ("slice", *(_render(v, position) for v in (value.start, value.stop, value.step)))
    if isinstance(value, _SIMPLE) or value is Ellipsis:
        return (type(value).__name__, value)
    raise _Unkeyable(type(value).__name__)


def _input_key(value: Any, symbol: Any) -> Any:
    def size(n: Any) -> Any:
        expr = expr_of(n)
        return expr if isinstance(expr, int) else str(expr.xreplace({symbol: _TOKEN}) if symbol is not None else expr)

    if isinstance(value, torch.Tensor):
        return ("tensor", tuple(map(size, value.shape)), tuple(map(size, value.stride())),
                size(value.storage_offset()), value.dtype, value.device, value.requires_grad)
    if isinstance(value, torch.SymInt):
        return ("symint", size(value))
    return _render(value, {})


class _Reused:
    """Compiled code by ``structure_key``, for this process (bounded: the oldest entry goes first)."""

    def __init__(self, limit: int = 256) -> None:
        self.limit = limit
        self._code: dict[tuple[Any, ...], Any] = {}
        self._lock = threading.Lock()

    def code(self, kind: str, gm: torch.fx.GraphModule, inputs: Sequence[Any], symbol: Any,
             options: tuple[Any, ...], name: str, build: Callable[[], Any]) -> Any:
        """``build()``'s result for ``gm`` on ``inputs``, or the one an identical graph got before.
        ``kind`` and ``options`` are what else the result depends on; a failed build is not kept."""
        structure = structure_key(gm, inputs, symbol)
        if structure is None:
            return build()
        key = (kind, *options, structure)
        with self._lock:
            if key in self._code:
                log.debug("%s: reused the %s code of an identical piece", name or "piece", kind)
                return self._code[key]
        code = build()
        with self._lock:
            self._code[key] = code
            while len(self._code) > self.limit:
                del self._code[next(iter(self._code))]
        return code

    def clear(self) -> None:
        with self._lock:
            self._code.clear()


REUSED = _Reused()


def compile_exact(gm: torch.fx.GraphModule, args: Sequence[Any], compiler: str, name: str = "", *,
                  max_autotune: bool = False) -> Callable[..., Any]:
    """``gm`` compiled for the exact sizes and strides of the real inputs ``args``.

    Through fake copies in a shape env of their own, not the real tensors: Inductor's FX graph
    cache needs a shape env and bypasses a compile without one ("No shape env"). With it, pieces
    of identical code (the middle decoder layers) compile once per process, and a second process
    loads them from the cache (warm start).
    """
    if compiler == "eager":
        return gm
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.fx.experimental.symbolic_shapes import ShapeEnv

    def build() -> Callable[..., Any]:
        mode = FakeTensorMode(shape_env=ShapeEnv())
        fakes = [mode.from_tensor(a, static_shapes=True) if isinstance(a, torch.Tensor) else a for a in args]
        with torch._guards.tracing(torch._guards.TracingContext(mode)):
            return compile_piece(gm, fakes, compiler, name, max_autotune=max_autotune)

    return REUSED.code("exact-shape", gm, args, None, (compiler, max_autotune), name, build)


class BackedCode(NamedTuple):
    """Inductor code compiled with T backed, and the token counts it may serve: 2 .. ``max_tokens``."""

    code: Callable[..., Any]
    max_tokens: int


def compile_backed(gm: torch.fx.GraphModule, fake_args: Sequence[Any], symbol: Any, max_tokens: int,
                   compiler: str, name: str = "", *, max_autotune: bool = False) -> BackedCode | None:
    """``gm`` compiled once with T *backed*, for every token count T in 2..``max_tokens`` at
    least, or None.

    Dynamo hands torchpcg an unbacked T (one graph for every T, T=1 included), and Inductor fuses
    less around an unbacked size: the 4-layer reference decoder launched 81 kernels per call
    compiled that way, 64 with T backed or static (H200, torch 2.11, ``scripts/kernel_counts.py``).
    So this compiles ``gm`` again from fresh fake inputs in a shape env of its own: each of
    Dynamo's ``fake_args`` rebuilt with the same sizes and strides, T replaced by an ordinary
    (backed) symbol hinted with ``max_tokens``. The hint is fixed, not the first call's T, so the
    FX graph cache finds this compile again in the next process.

    Correct by construction: a backed symbol is assumed >= 2 (so T=1 never runs this code), and
    every other assumption Inductor makes about a size is a guard in that shape env (also on an
    FX-graph-cache hit, which re-adds the cached guards), e.g. ``T <= 4096`` for a reduction over
    T on CPU, or a 32-bit index bound on the GPU. The code is returned only when every guard holds
    at every T in 2..``max_tokens`` and T was not replaced by a value; None (the caller keeps its
    other code) when one fails, when the compile fails, or when an input depends on a second
    symbol or has a storage offset. Its range reaches past ``max_tokens`` as far as value-range
    analysis proves every guard (``BackedCode.max_tokens``), so large calls run it too. A piece
    identical to one compiled before in this process (``structure_key``) gets that one's result.
    """
    return REUSED.code("backed", gm, fake_args, symbol, (compiler, max_autotune, max_tokens), name,
                       lambda: _compile_backed(gm, fake_args, symbol, max_tokens, compiler, name, max_autotune))


def _compile_backed(gm: torch.fx.GraphModule, fake_args: Sequence[Any], symbol: Any, max_tokens: int,
                    compiler: str, name: str, max_autotune: bool) -> BackedCode | None:
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.fx.experimental.symbolic_shapes import ShapeEnv

    shape_env = ShapeEnv()
    mode = FakeTensorMode(shape_env=shape_env)
    try:
        token, fakes = _backed_fakes(fake_args, symbol, max_tokens, shape_env, mode)
        if fakes is None:
            return None
        # A tracing context of our own: Inductor takes the fake mode from it (Dynamo's, otherwise).
        with torch._guards.tracing(torch._guards.TracingContext(mode)):
            compiled = compile_piece(gm, fakes, compiler, name, max_autotune=max_autotune)
    except Exception as exc:  # noqa: BLE001 - the caller keeps its other code (any torch version's API)
        log.info("%s: no backed compile (%s: %s)", name or "piece", type(exc).__name__, str(exc).splitlines()[0][:200])
        return None
    guards = {g.expr for g in shape_env.guards if token in g.expr.free_symbols}
    assumed = sorted(str(expr) for expr in guards if not _holds(expr, token, 2, max_tokens))
    if shape_env.replacements.get(token, token) != token:
        assumed.append(f"T = {shape_env.replacements[token]}")
    if assumed:
        log.info("%s: the backed compile assumed %s; keeping the other code", name or "piece", "; ".join(assumed[:3]))
        return None
    return BackedCode(compiled, _proven_up_to(guards, token, max_tokens))


# The largest token count backed code may serve: a 32-bit size. Inductor's own index guards say
# less where they must (``_proven_up_to``).
_MAX_SIZE = 2**31 - 1


def _holds(expr: Any, token: Any, low: int, high: int) -> bool:
    """Whether the guard ``expr`` is true at every T in low..high: proven by value ranges when
    they can (a fraction of a millisecond), else checked at each T. The check at each T alone took
    21 s of a 62 s cold piecewise setup on the H200 (``scripts/setup_breakdown.py``)."""
    if _proven(expr, token, low, high):
        return True
    return all(expr.xreplace({token: n}) is sympy.true for n in range(low, high + 1))


@functools.lru_cache(maxsize=4096)  # identical pieces bring identical guards
def _proven(expr: Any, token: Any, low: int, high: int) -> bool:
    """Whether value-range analysis proves ``expr`` for every T in low..high (False: unknown)."""
    try:
        from torch.utils._sympy.value_ranges import ValueRanges, bound_sympy

        bound = bound_sympy(expr, {token: ValueRanges(low, high)})
    except Exception:  # noqa: BLE001 - an expression the analysis does not know: check each T
        return False
    return bound.lower is sympy.true and bound.upper is sympy.true


def _proven_up_to(guards: set[Any], token: Any, max_tokens: int) -> int:
    """The largest T >= ``max_tokens`` (at most ``_MAX_SIZE``) such that value ranges prove every
    guard for T in 2..T; ``max_tokens`` when they prove nothing past it. Each step proves a whole
    range, so the answer is sound whether or not a guard is monotone in T."""
    def proven(high: int) -> bool:
        return all(_proven(expr, token, 2, high) for expr in guards)

    if proven(_MAX_SIZE):
        return _MAX_SIZE
    if not proven(max_tokens):
        return max_tokens  # a guard held only by the check at each T
    low, high = max_tokens, _MAX_SIZE  # proven(low), not proven(high)
    while high - low > 1:
        middle = (low + high) // 2
        low, high = (middle, high) if proven(middle) else (low, middle)
    return low


def _backed_fakes(fake_args: Sequence[Any], symbol: Any, max_tokens: int, shape_env: Any,
                  mode: Any) -> tuple[Any, list[Any] | None]:
    """(T's new symbol, Dynamo's fake inputs rebuilt in ``mode`` with T replaced by it); fakes None
    when an input depends on a second symbol or has a storage offset."""
    from torch._dynamo.source import ConstantSource
    from torch.fx.experimental.symbolic_shapes import DimDynamic

    source = ConstantSource("torchpcg_token_count")
    token = shape_env.create_symbol(max_tokens, source=source, dynamic_dim=DimDynamic.DYNAMIC)

    def rebuilt(value: Any) -> Any:
        expr = expr_of(value)
        if isinstance(expr, int):
            return expr
        new = expr.xreplace({symbol: token})
        return shape_env.create_symintnode(new, hint=int(new.xreplace({token: max_tokens})), source=source)

    fakes: list[Any] = []
    for fake in fake_args:
        if symbols_of(fake) - {symbol}:
            return token, None  # a second dynamic size: not ours to choose
        if isinstance(fake, torch.Tensor):
            if expr_of(fake.storage_offset()) != 0:
                return token, None
            with mode:
                fakes.append(torch.empty_strided([rebuilt(n) for n in fake.size()], [rebuilt(n) for n in fake.stride()],
                                                 dtype=fake.dtype, device=fake.device))
        elif isinstance(fake, torch.SymInt):
            fakes.append(rebuilt(fake))
        else:
            fakes.append(fake)
    return token, fakes


class ExactShapeCode:
    """``gm`` compiled for the exact shapes of a call, on the first call with those shapes.

    A static compile fuses what a symbolic T keeps apart: the 16-layer reference decoder's pieces
    launched 327 kernels per decode step with Dynamo's unbacked code at T=1 (each RMSNorm a
    reduction plus a pointwise kernel), 228 for a whole-model graph (H200, torch 2.11,
    ``bench.profile_decode``). Code is kept per (sizes, strides) of the tensor inputs and the
    plain values, so a call never runs code compiled for another layout; after ``limit`` keys, or
    when a compile fails, ``fallback`` serves (``on_failure``, if given, picks the code to use from
    then on instead). The first call of a key compiles: under CUDA graphs that is the warm-up run
    before capture, never inside it.
    """

    def __init__(self, gm: torch.fx.GraphModule, compiler: str, name: str, fallback: Callable[..., Any], *,
                 max_autotune: bool = False, limit: int = 4,
                 on_failure: Callable[[Exception], Callable[..., Any]] | None = None) -> None:
        self.gm, self.compiler, self.name, self.fallback = gm, compiler, name, fallback
        self.max_autotune, self.limit, self.on_failure = max_autotune, limit, on_failure
        self.compiled: dict[tuple[Any, ...], Callable[..., Any]] = {}
        self.failed = False

    def __call__(self, *args: Any) -> Any:
        key = tuple((tuple(a.shape), a.stride(), a.dtype) if isinstance(a, torch.Tensor) else a for a in args)
        try:
            code = self.compiled.get(key)
        except TypeError:  # an unhashable plain argument: no key to keep code under
            return self.fallback(*args)
        if code is None:
            code = self._compile(key, args)
        return code(*args)

    def _compile(self, key: tuple[Any, ...], args: Sequence[Any]) -> Callable[..., Any]:
        if self.failed or len(self.compiled) >= self.limit:
            return self.fallback
        start = time.perf_counter()
        try:  # on a copy: Inductor rewrites graphs in place
            code = compile_exact(copy_graph_module(self.gm), args, self.compiler, f"{self.name} (exact shapes)",
                                 max_autotune=self.max_autotune)
        except Exception as exc:  # noqa: BLE001 - any compile failure: the fallback still serves
            self.failed = True
            if self.on_failure is not None:
                self.fallback = self.on_failure(exc)
            else:
                log.warning("%s: compiling for exact shapes failed (%s: %s); its other code serves these calls",
                            self.name or "piece", type(exc).__name__, str(exc).splitlines()[0][:200])
            return self.fallback
        elapsed = time.perf_counter() - start
        log.debug("%s: compiled for exact shapes in %.2fs (%d so far)", self.name or "piece", elapsed,
                  len(self.compiled) + 1)
        COUNTERS.add("late_compiles")
        COUNTERS.add("late_compile_ms", round(elapsed * 1000))
        self.compiled[key] = code
        return code


class TokenDispatch:
    """Code for one graph by token count: ``exact`` (code compiled for a call's exact shapes) for T
    in ``exact_sizes`` (the ``compile_sizes`` knob; T=1 by default); Inductor code compiled with T
    backed (``compile_backed``, at construction) for other T in 2..``max_tokens`` and as far past it
    as its guards are proven; ``other`` for the rest, or for every T when there is no backed code
    (``backed=False``, refused, failed, or ``compiler="eager"``)."""

    def __init__(self, gm: torch.fx.GraphModule, fake_args: Sequence[Any], symbol: Any, max_tokens: int,
                 compiler: str, other: Callable[..., Any], name: str = "", *, max_autotune: bool = False,
                 backed: bool = True, exact: Callable[..., Any] | None = None,
                 exact_sizes: Collection[int] = (1,)) -> None:
        self.other = other
        self.exact = exact
        self.exact_sizes = frozenset(exact_sizes)
        self._locate = token_source(fake_args, symbol)
        self.backed: Callable[..., Any] | None = None
        self.max_tokens = 0  # the largest T the backed code serves
        if backed and compiler != "eager" and self._locate is not None and max_tokens >= 2:
            # On a copy: Inductor rewrites graphs in place.
            found = compile_backed(copy_graph_module(gm), fake_args, symbol, max_tokens, compiler,
                                   f"{name} (T backed)", max_autotune=max_autotune)
            if found is not None:
                self.backed, self.max_tokens = found

    def __call__(self, *args: Any) -> Any:
        if self._locate is not None:  # only where an input carries T
            num_tokens = tokens_at(args, self._locate)
            if num_tokens in self.exact_sizes and self.exact is not None:
                return self.exact(*args)
            if 2 <= num_tokens <= self.max_tokens:
                return self.backed(*args)  # type: ignore[misc]  # max_tokens > 0: compiled
        return self.other(*args)


class LazyCode:
    """Code compiled by ``build()`` on its first call, once (thread-safe), not before.

    Dynamo's unbacked code of a piece with backed code serves only what nothing else does: T above
    the backed code's proven range (about a million tokens), T=1 past the exact-shape code's limit
    or after its compile failed. Compiled up front it took 13.6 s of a 62.5 s cold piecewise setup
    on the H200 (``scripts/setup_breakdown.py``), for code a server may never run.
    """

    def __init__(self, build: Callable[[], Callable[..., Any]], name: str) -> None:
        self.build, self.name = build, name
        self.code: Callable[..., Any] | None = None
        self._lock = threading.Lock()

    def __call__(self, *args: Any) -> Any:
        return (self.code or self.ensure())(*args)

    def ensure(self) -> Callable[..., Any]:
        """The code, compiled now if it was not yet."""
        with self._lock:
            if self.code is None:
                log.info("%s: compiling the code for Dynamo's token count", self.name or "piece")
                start = time.perf_counter()
                self.code = self.build()
                COUNTERS.add("late_compiles")
                COUNTERS.add("late_compile_ms", round((time.perf_counter() - start) * 1000))
            return self.code


def copy_graph_module(gm: torch.fx.GraphModule) -> torch.fx.GraphModule:
    """A GraphModule with its own copy of ``gm``'s graph (same submodules and parameters)."""
    graph = torch.fx.Graph()
    graph.output(graph.graph_copy(gm.graph, {}))
    return torch.fx.GraphModule(gm, graph)


def hinted_symints(fake_args: Sequence[Any]) -> list[Any]:
    """``fake_args`` with every SymInt whose value is known carrying that value as its hint.

    Inductor's FX graph cache keys a SymInt input by its text (``"s17"``) and writes and checks
    its shape guards by position (``L['t0']``, ``L['t1']``, ...) over the SymInt inputs that have
    a hint. Dynamo can hand a piece two SymInts that both read ``s17``: one it created for an
    unbacked ``u0`` that a later size check replaced by ``s17`` (no hint: ``u0`` had none), one
    created for ``s17`` itself (hint 3). Such a piece has the same cache key as one whose SymInts
    are both hinted; whichever compiled first stores guards over two inputs, the other looks them
    up with one hint -> ``KeyError: 't1'`` in ``FxGraphCache.find_guarded_entry``, in a second
    Dynamo graph or in the next process on a warm ``TORCHINDUCTOR_CACHE_DIR``. A fresh node for
    the same (replaced) expression computes its hint from the shape env, so equal keys always
    come with the same inputs to guard on. SymInts still holding an unbacked symbol are kept:
    the cache skips them on both sides.
    """
    return [_with_hint(value) for value in fake_args]


def _with_hint(value: Any) -> Any:
    if not isinstance(value, torch.SymInt) or value.node.has_hint():
        return value
    from torch.fx.experimental.sym_node import SymNode
    from torch.fx.experimental.symbolic_shapes import free_unbacked_symbols

    node = value.node
    expr = node.expr  # replacements applied: "s17", where node._expr may still be u0
    if free_unbacked_symbols(expr):
        return value
    fresh = SymNode(expr, node.shape_env, node.pytype, None, fx_node=node.fx_node)  # hint=None: computed
    return torch.SymInt(fresh) if fresh.has_hint() else value
