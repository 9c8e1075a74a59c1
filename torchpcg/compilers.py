"""Compile one piece. In: a piece GraphModule and its fake (symbolic) example inputs.
Out: a callable taking real tensors of any token count. No CUDA graphs here.

``inductor`` compiles once for the dynamic token size (the fake inputs carry the token symbol),
or for one exact size when given real inputs (full graphs, full.py);
``eager`` runs the piece's FX code as is (fast to build, useful for debugging and CPU tests).

The fake inputs are the parent Dynamo graph's own values, so Inductor's FX graph cache sees its
symbols; ``hinted_symints`` makes their SymInts look the same to the cache in every graph and
process (see its docstring).
"""
from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from typing import Any

import sympy
import torch
import torch.fx

from .config import COMPILERS
from .layout import expr_of, symbols_of

__all__ = ["compile_piece", "compile_backed", "hinted_symints"]

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
    patches = {**_INDUCTOR_PATCHES, **(_AUTOTUNE_PATCHES if max_autotune else {})}
    with torch.no_grad(), torch._inductor.config.patch(patches):
        compiled = compile_fx(gm, hinted_symints(fake_args))
    log.debug("inductor compiled %s in %.2fs", name or "piece", time.perf_counter() - start)
    return compiled


def compile_backed(gm: torch.fx.GraphModule, args: Sequence[Any], fake_args: Sequence[Any], symbol: Any,
                   sizes: Sequence[int], compiler: str, name: str = "", *,
                   max_autotune: bool = False) -> Callable[..., Any] | None:
    """``gm`` compiled once for every token count in ``sizes`` (all >= 2), with T *backed*; or None.

    Dynamo hands torchpcg an unbacked T (one graph for every T, T=1 included), and Inductor fuses
    less around an unbacked size (it cannot compare or hint it): the 4-layer reference decoder
    launched 81 kernels per call compiled that way, 64 with T backed or static (H200, torch 2.11,
    ``scripts/kernel_counts.py``). So this compiles from fresh fake inputs in a shape env of its
    own, where T is an ordinary (backed) symbol hinted with this call's T: ``args`` are the call's
    real inputs, ``fake_args`` Dynamo's, which say which dims are T.

    Correct by construction: a backed symbol is assumed >= 2, and every assumption Inductor makes
    beyond that is a guard in that shape env. The code is returned only when every guard holds at
    every size in ``sizes``. None (the caller compiles per exact T) when a guard fails, or when a
    dim or SymInt input is an expression of T other than T itself (``2*T``: its symbol would be
    unrelated to T's here).
    """
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.fx.experimental.symbolic_shapes import DimDynamic, ShapeEnv, StatelessSymbolicContext

    if min(sizes) < 2:
        raise ValueError(f"sizes={list(sizes)}: a backed token count is >= 2")
    shape_env = ShapeEnv()
    mode = FakeTensorMode(shape_env=shape_env)
    fakes: list[Any] = list(args)
    token: torch.SymInt | None = None
    symint_at = []
    for index, (arg, fake) in enumerate(zip(args, fake_args)):
        if isinstance(fake, torch.SymInt) and symbol in symbols_of(fake):
            if expr_of(fake) != symbol:
                return None
            symint_at.append(index)
        elif isinstance(arg, torch.Tensor):
            exprs = [expr_of(size) for size in fake.size()]
            if any(e != symbol and not isinstance(e, int) and symbol in e.free_symbols for e in exprs):
                return None
            # DUCK: every dim of this size gets one symbol, T's; the others stay static.
            dims = [DimDynamic.DUCK if e == symbol else DimDynamic.STATIC for e in exprs]
            fakes[index] = mode.from_tensor(arg, symbolic_context=StatelessSymbolicContext(
                dynamic_sizes=dims, constraint_sizes=[None] * len(dims)))
            if token is None and DimDynamic.DUCK in dims:
                token = fakes[index].size(dims.index(DimDynamic.DUCK))
    if token is None:
        return None
    for index in symint_at:
        fakes[index] = token
    try:
        compiled = compile_piece(gm, fakes, compiler, name, max_autotune=max_autotune)
    except Exception as exc:  # noqa: BLE001 - the caller compiles per exact T instead
        log.info("%s: no backed compile (%s: %s)", name or "piece", type(exc).__name__, str(exc).splitlines()[0][:200])
        return None
    t = token.node.expr
    replaced = shape_env.replacements.get(t, t)
    broken = [str(g.expr) for g in shape_env.guards for n in sizes if g.expr.xreplace({t: n}) != sympy.true]
    if replaced != t or broken:
        log.info("%s: the backed compile assumed %s; compiling per exact T instead", name or "piece",
                 f"T = {replaced}" if replaced != t else "; ".join(sorted(set(broken))[:3]))
        return None
    return compiled


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
