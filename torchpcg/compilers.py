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

import torch
import torch.fx

from .config import COMPILERS

__all__ = ["compile_piece", "hinted_symints"]

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
