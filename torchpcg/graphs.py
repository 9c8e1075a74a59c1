"""Capture and replay one piece at one bucket: a real CUDA graph or an emulated one.

In: a compiled piece, its static input list (fixed addresses) and a pool. Out: a ``Graph`` whose
``replay()`` recomputes the piece into fixed output tensors.

Pools have an explicit lifetime. A ``GraphPool`` owns a private CUDA memory pool and keeps it
alive with a *keeper*: an empty graph captured into it when the pool is made (the pattern of
Inductor's CUDA graph trees). Without it, the pool dies with its last graph and the next
``capture_begin(pool=...)`` trips an allocator assertion; with it, graphs can be dropped and
captured again into the same pool for as long as the runtime lives.

A failed capture leaves the process healthy: ``capture()`` ends the capture whatever raised
(``capture_begin``, the piece or ``capture_end``), stops the allocator from routing allocations to
the pool, takes the CUDA generator out of capture mode, checks that random numbers work again and
retires the pool (a fresh one serves later captures). If the process cannot be healed it raises
``CaptureError``; continuing would corrupt every later CUDA call.

``EmulatedGraph``/``EmulatedPool`` keep the same semantics on CPU (outputs at fixed addresses,
overwritten by every replay; inputs read from the captured buffers, never from the caller's
tensors; a released graph's outputs are poisoned; capturing into a retired pool raises), so CPU
tests catch buffer-reuse, padding, aliasing and lifetime bugs that real graphs would show.
"""
from __future__ import annotations

import contextlib
import gc
import logging
import warnings
from collections.abc import Callable, Iterator, Sequence
from typing import Any, Protocol

import torch

from .errors import CaptureError

__all__ = ["Graph", "Pool", "CudaGraph", "EmulatedGraph", "GraphPool", "EmulatedPool", "capture_stream",
           "flatten_outputs", "new_pool"]

log = logging.getLogger(__name__)


class Graph(Protocol):
    outputs: list[Any]

    def replay(self) -> None: ...

    def release(self) -> None: ...


class Pool(Protocol):
    retired: bool

    def capture(self, fn: Callable[..., Any], static_args: Sequence[Any]) -> Graph: ...

    def retire(self) -> None: ...


def flatten_outputs(result: Any) -> list[Any]:
    """A piece returns one value or a tuple; callers always see a list."""
    return list(result) if isinstance(result, (tuple, list)) else [result]


def new_pool(graph_mode: str, device: torch.device | None) -> GraphPool | EmulatedPool:
    """A pool for ``graph_mode`` 'cuda' (real) or 'emulate'."""
    return GraphPool(device) if graph_mode == "cuda" else EmulatedPool()


def release_after_failed_capture(pool: GraphPool | EmulatedPool | None, exc: BaseException) -> None:
    """After a capture into ``pool`` failed with ``exc``: if it ran out of CUDA memory, retire the
    pool (later captures go to a fresh one) and give back what the allocator caches.

    A private pool's free blocks stay reserved while the pool lives and count against the process's
    limit, so without this the next, smaller bucket would fail too. Graphs already captured in the
    pool keep their memory. One policy for every graph owner (piecewise runtime, full decode graphs,
    vision encoder graphs), applied by ``engine.GraphEngine.failed``.
    """
    if not isinstance(exc, torch.OutOfMemoryError) or not isinstance(pool, GraphPool):
        return
    pool.retire()
    torch.cuda.empty_cache()


# ---- real CUDA graphs ----------------------------------------------------------------------------

_CAPTURE_STREAMS: dict[int, torch.cuda.Stream] = {}


def capture_stream(device: torch.device) -> torch.cuda.Stream:
    """The one side stream every pool of this process captures on, per device.

    cuBLAS keeps a workspace per (handle, stream), made on a stream's first matmul and kept for the
    life of the process: 32 MiB on Hopper by default. A stream per pool would put one more in every
    pool (a compiled model, or a pool retired after an out-of-memory capture); one stream per device
    pays it once. ``torch.cuda.graph`` shares its default capture stream the same way. Captures are
    serialised anyway: a capture in global mode forbids unsafe CUDA calls from other threads.
    """
    index = device.index if device.index is not None else torch.cuda.current_device()
    stream = _CAPTURE_STREAMS.get(index)
    if stream is None:
        stream = _CAPTURE_STREAMS.setdefault(index, torch.cuda.Stream(device=torch.device("cuda", index)))
    return stream


class GraphPool:
    """One private CUDA memory pool, alive as long as this object; captures on ``capture_stream``.

    Every piece and bucket of one runtime captures into it, largest bucket first, so smaller
    buckets reuse the larger ones' memory. Reuse is safe because a forward replays one bucket's
    graphs in capture order, and graphs that are dropped are never replayed again.
    """

    def __init__(self, device: torch.device | None) -> None:
        self.device = torch.device("cuda", torch.cuda.current_device()) if device is None or device.index is None \
            else device
        self.handle = torch.cuda.graph_pool_handle()
        self.stream = capture_stream(self.device)
        self.retired = False
        self._keeper: torch.cuda.CUDAGraph | None = torch.cuda.CUDAGraph()
        # An empty capture: holds one use of the pool (device and host allocator) for our lifetime.
        # It also ends any capture mode a failed capture left on the CUDA generator.
        with _quiet_empty_graphs(), torch.cuda.device(self.device), torch.cuda.stream(self.stream):
            self._keeper.capture_begin(pool=self.handle)
            self._keeper.capture_end()

    def capture(self, fn: Callable[..., Any], static_args: Sequence[Any]) -> CudaGraph:
        """Capture ``fn(*static_args)``; on any failure heal the process and re-raise."""
        if self.retired:
            raise AssertionError("capture into a retired pool")  # our invariant: the runtime swaps pools
        graph = torch.cuda.CUDAGraph()
        torch.cuda.synchronize(self.device)
        with torch.cuda.device(self.device), torch.cuda.stream(self.stream), _gc_paused(), _quiet_empty_graphs():
            try:
                graph.capture_begin(pool=self.handle)
                live = flatten_outputs(fn(*static_args))
                graph.capture_end()
            except BaseException as exc:
                self._recover(graph, exc)
                raise
        torch.cuda.current_stream(self.device).wait_stream(self.stream)
        return CudaGraph(graph, live)

    def retire(self) -> None:
        """No new captures here; the pool's memory goes once its last graph is gone."""
        self.retired = True
        self._keeper = None

    def _recover(self, graph: torch.cuda.CUDAGraph, exc: BaseException) -> None:
        """Undo what a failed capture left behind, or raise ``CaptureError`` if that is impossible."""
        log.debug("capture failed (%s: %s); restoring allocator and generator state", type(exc).__name__, exc)
        ended = False
        if torch.cuda.is_current_stream_capturing():
            try:
                graph.capture_end()  # an OOM inside the piece leaves a valid capture: this ends it cleanly
                ended = True
            except Exception as end_exc:  # noqa: BLE001 - an invalidated capture (e.g. a sync) raises here
                log.debug("capture_end after the failure raised: %s", end_exc)
        if not ended:
            # capture_end did not run to completion: the allocator still routes this stream to the
            # pool and the CUDA generator is still in capture mode.
            with contextlib.suppress(Exception):  # "not currently recording" when nothing was begun
                torch._C._cuda_endAllocateToPool(self.device.index, self.handle)
            self.retire()  # its allocator bookkeeping is stale: later captures use a fresh pool
            _CAPTURE_STREAMS.pop(self.device.index, None)  # and a fresh stream, whatever state this one is in
        del graph
        try:
            if not ended:
                GraphPool(self.device).retire()  # a clean empty capture ends the generator's capture mode
            check_health(self.device)
        except Exception as health:  # noqa: BLE001 - anything here means the process is broken
            raise CaptureError(
                f"a failed CUDA graph capture ({type(exc).__name__}: {exc}) left the CUDA context unusable "
                f"({type(health).__name__}: {health}); restart the process. Run with TORCHPCG_CUDAGRAPH=off "
                "to find the op that cannot be captured") from exc


class CudaGraph:
    """A captured CUDA graph and its outputs.

    Outputs are kept as non-owning tensors: once captured, their pool memory may be reused by
    later captures. That is safe because every forward replays pieces in the order (and with the
    liveness) of the capture pass, and final outputs are cloned before the next call.
    """

    def __init__(self, graph: torch.cuda.CUDAGraph, live: list[Any]) -> None:
        self.graph: torch.cuda.CUDAGraph | None = graph
        self.live_outputs: list[Any] | None = live  # strong refs for the capture pass only
        self.outputs = [_non_owning(t) for t in live]

    def release_capture_outputs(self) -> list[Any]:
        """Hand the strong outputs to the capture pass once; later passes use ``outputs``."""
        live, self.live_outputs = self.live_outputs, None
        return live if live is not None else self.outputs

    def replay(self) -> None:
        self.graph.replay()  # type: ignore[union-attr]

    def release(self) -> None:
        """Never replayed again; its pool memory may serve later captures."""
        self.graph = None
        self.live_outputs = None


def check_health(device: torch.device) -> None:
    """Raise if CUDA or its random generator is unusable (the caller's RNG stream is left as it was)."""
    if torch.cuda.is_current_stream_capturing():
        raise RuntimeError("a stream capture is still open")
    state = torch.cuda.get_rng_state(device)
    torch.rand(1, device=device)  # raises "Offset increment outside graph capture" if still broken
    torch.cuda.set_rng_state(state, device)
    torch.cuda.synchronize(device)


@contextlib.contextmanager
def _quiet_empty_graphs() -> Iterator[None]:
    """A piece of views only (or the keeper) captures no kernel: torch warns, nothing is wrong."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="The CUDA Graph is empty")
        yield


@contextlib.contextmanager
def _gc_paused() -> Iterator[None]:
    """No Python GC during capture: a collected CUDA tensor's free must not land in the graph."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


def _non_owning(value: Any) -> Any:
    """A tensor viewing ``value``'s memory without keeping the allocator block alive."""
    if not isinstance(value, torch.Tensor) or value.device.type != "cuda":
        return value
    storage = value.untyped_storage()
    weak = torch._C._construct_storage_from_data_pointer(storage.data_ptr(), value.device, storage.nbytes())
    view = torch.empty(0, dtype=value.dtype, device=value.device)
    view.set_(weak, value.storage_offset(), value.size(), value.stride())
    return view


# ---- emulated graphs (CPU tests) -----------------------------------------------------------------

class EmulatedPool:
    """CPU stand-in for ``GraphPool``: no memory, the same lifetime rules."""

    def __init__(self) -> None:
        self.retired = False

    def capture(self, fn: Callable[..., Any], static_args: Sequence[Any]) -> EmulatedGraph:
        if self.retired:
            raise AssertionError("capture into a retired pool")  # a real pool would assert in the allocator
        return EmulatedGraph(fn, static_args)

    def retire(self) -> None:
        self.retired = True


class EmulatedGraph:
    """CPU stand-in for ``CudaGraph`` with the same static-buffer semantics.

    Capture runs the piece once (a real capture plus its first replay computes it once, too).
    """

    def __init__(self, fn: Callable[..., Any], static_args: Sequence[Any]) -> None:
        self.fn: Callable[..., Any] | None = fn
        # Aliases of the inputs' memory, not the caller's tensor objects: like a CUDA graph, this
        # one holds no reference to a parameter, so a reassigned one can die and be told moved.
        self.static_args = [a.detach() if isinstance(a, torch.Tensor) else a for a in static_args]
        self.outputs = flatten_outputs(fn(*self.static_args))

    def release_capture_outputs(self) -> list[Any]:
        return self.outputs

    def replay(self) -> None:
        if self.fn is None:
            raise AssertionError("replay of a released graph")  # our invariant: dropped graphs stay dropped
        fresh = flatten_outputs(self.fn(*self.static_args))
        for static, new in zip(self.outputs, fresh):
            if isinstance(static, torch.Tensor) and static.data_ptr() != new.data_ptr():
                static.copy_(new)  # outputs live at fixed addresses, overwritten each replay

    def release(self) -> None:
        """Poison the outputs: a real graph's memory is reused by later captures once dropped."""
        self.fn = None
        inputs = {a.untyped_storage().data_ptr() for a in self.static_args if isinstance(a, torch.Tensor)}
        for value in self.outputs:  # outputs that alias an input (a view of a weight) are the input's
            if isinstance(value, torch.Tensor) and value.numel() and value.untyped_storage().data_ptr() not in inputs:
                _poison(value)


def _poison(tensor: torch.Tensor) -> None:
    with torch.inference_mode():  # in-place is allowed there on normal and inference tensors alike
        if tensor.is_floating_point() or tensor.is_complex():
            tensor.fill_(float("nan"))
        elif tensor.dtype == torch.bool:
            tensor.fill_(True)
        else:
            tensor.fill_(torch.iinfo(tensor.dtype).min)
