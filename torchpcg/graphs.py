"""Capture and replay one piece at one bucket: a real CUDA graph or an emulated one.

In: a compiled piece and its static input list (fixed addresses). Out: a ``Graph`` whose
``replay()`` recomputes the piece into fixed output tensors. ``EmulatedGraph`` keeps exactly those
semantics on CPU (outputs live at fixed addresses and are overwritten by every replay; inputs are
read from the captured buffers, never from the caller's tensors), so CPU tests catch buffer-reuse,
padding and aliasing bugs that real graphs would show.
"""
from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import Any, Protocol

import torch

__all__ = ["Graph", "CudaGraph", "EmulatedGraph", "GraphPool", "flatten_outputs"]

log = logging.getLogger(__name__)


class Graph(Protocol):
    outputs: list[Any]

    def replay(self) -> None: ...


def flatten_outputs(result: Any) -> list[Any]:
    """A piece returns one value or a tuple; callers always see a list."""
    return list(result) if isinstance(result, (tuple, list)) else [result]


class GraphPool:
    """One CUDA memory pool and capture stream shared by every piece and bucket of a runtime.

    Captures go largest bucket first, so smaller buckets reuse the larger ones' memory.
    """

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.handle = torch.cuda.graph_pool_handle()
        self.stream = torch.cuda.Stream(device=device)


class CudaGraph:
    """A real CUDA graph of ``fn(*static_args)`` in ``pool``.

    Outputs are kept as non-owning tensors: once captured, their pool memory may be reused by
    later captures. That is safe because every forward replays pieces in the order (and with the
    liveness) of the capture pass, and final outputs are cloned before the next call.
    """

    def __init__(self, fn: Callable[..., Any], static_args: Sequence[Any], pool: GraphPool) -> None:
        self.graph = torch.cuda.CUDAGraph()
        torch.cuda.synchronize(pool.device)
        with torch.cuda.stream(pool.stream):
            self.graph.capture_begin(pool=pool.handle)
            try:
                live = flatten_outputs(fn(*static_args))
            except BaseException:
                _end_failed_capture(self.graph)
                raise
            self.graph.capture_end()
        torch.cuda.current_stream(pool.device).wait_stream(pool.stream)
        self.live_outputs: list[Any] | None = live  # strong refs for the capture pass only
        self.outputs = [_non_owning(t) for t in live]

    def release_capture_outputs(self) -> list[Any]:
        """Hand the strong outputs to the capture pass once; later passes use ``outputs``."""
        live, self.live_outputs = self.live_outputs, None
        return live if live is not None else self.outputs

    def replay(self) -> None:
        self.graph.replay()


class EmulatedGraph:
    """CPU stand-in for ``CudaGraph`` with the same static-buffer semantics."""

    def __init__(self, fn: Callable[..., Any], static_args: Sequence[Any]) -> None:
        self.fn = fn
        self.static_args = list(static_args)
        self.outputs = flatten_outputs(fn(*self.static_args))

    def release_capture_outputs(self) -> list[Any]:
        return self.outputs

    def replay(self) -> None:
        fresh = flatten_outputs(self.fn(*self.static_args))
        for static, new in zip(self.outputs, fresh):
            if isinstance(static, torch.Tensor) and static.data_ptr() != new.data_ptr():
                static.copy_(new)  # outputs live at fixed addresses, overwritten each replay


def _non_owning(value: Any) -> Any:
    """A tensor viewing ``value``'s memory without keeping the allocator block alive."""
    if not isinstance(value, torch.Tensor) or value.device.type != "cuda":
        return value
    storage = value.untyped_storage()
    weak = torch._C._construct_storage_from_data_pointer(storage.data_ptr(), value.device, storage.nbytes())
    view = torch.empty(0, dtype=value.dtype, device=value.device)
    view.set_(weak, value.storage_offset(), value.size(), value.stride())
    return view


def _end_failed_capture(graph: torch.cuda.CUDAGraph) -> None:
    try:
        graph.capture_end()
    except Exception as exc:  # the capture is already invalid; the original error matters
        log.debug("capture_end after a failed capture raised: %s", exc)
