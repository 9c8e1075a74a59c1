"""Compile one piece. In: a piece GraphModule and its fake (symbolic) example inputs.
Out: a callable taking real tensors of any token count. No CUDA graphs here.

``inductor`` compiles once for the dynamic token size (the fake inputs carry the token symbol);
``eager`` runs the piece's FX code as is (fast to build, useful for debugging and CPU tests).
"""
from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.fx

from .config import COMPILERS

__all__ = ["compile_piece"]

log = logging.getLogger(__name__)

# Graphs are ours to capture: Inductor must not add its own cudagraph trees inside a piece.
_INDUCTOR_PATCHES = {"triton.cudagraphs": False}


def compile_piece(gm: torch.fx.GraphModule, fake_args: Sequence[Any], compiler: str, name: str = "") -> Callable[..., Any]:
    """Compile ``gm`` for every token count the fake inputs' symbols allow."""
    assert compiler in COMPILERS, compiler  # validated by PiecewiseConfig
    if compiler == "eager":
        return gm
    start = time.perf_counter()
    from torch._inductor.compile_fx import compile_fx

    # no_grad: pieces are inference-only, so AOT builds a forward graph, not a joint one.
    with torch.no_grad(), torch._inductor.config.patch(_INDUCTOR_PATCHES):
        compiled = compile_fx(gm, list(fake_args))
    log.debug("inductor compiled %s in %.2fs", name or "piece", time.perf_counter() - start)
    return compiled
