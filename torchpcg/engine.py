"""One graph engine per graph owner: capture, pool lifetime, failure policy, stream rule, kept graphs.

In: a graph mode ('cuda' or 'emulate'; an owner whose mode is 'off' never captures) and the device
its graphs run on; then, per capture, a callable and its static arguments (fixed addresses). Out:
``GraphEngine``, which every graph owner (the piecewise runtime and its full decode graphs,
``runtime.Runtime``; the vision encoder's whole graphs, ``vision.EncoderGraphs``) captures through:

* ``capture(fn, static_args, warm=...)``: a ``graphs.CudaGraph`` or ``graphs.EmulatedGraph`` in the
  owner's pool, made on the first capture and made again after it was retired (an out-of-memory
  capture, or a failure the allocator could not account for; see graphs.py);
* ``failed(what, exc, enforce=...)``: the one policy after a capture raised: ``CaptureError`` under
  enforce, else counted (``capture_failures``, ``fallbacks``) and, after out of memory, the pool
  retired and the allocator's cache emptied (``graphs.release_after_failed_capture``);
* ``order_streams()``: a call on another CUDA stream than the last one waits for that stream;
* optionally (``max_graphs``) a bounded LRU of graphs by key, the least recently used released.

Why one place: each owner did all of this itself and the copies drifted (the vision encoder's
graphs did not retire the pool after out of memory). What stays with an owner: which graph a call
needs (buckets, keys, the runtime's per-runner dicts and address sets), the static buffers, the
warm-up choice (a full graph's warm-up is T's first call), what a failure drops (a bucket, full
graphs, the encoder's graphs of a bucket) and the warning that says so.
"""
from __future__ import annotations

import collections
import logging
from collections.abc import Callable, Hashable, Sequence
from typing import Any

import torch

from .errors import CaptureError
from .graphs import CudaGraph, EmulatedGraph, EmulatedPool, GraphPool, new_pool, release_after_failed_capture
from .stats import COUNTERS

__all__ = ["GraphEngine", "StreamOrder", "current_stream_key"]

log = logging.getLogger(__name__)

# A C++ call on CUDA builds (None on CPU): device index -> (stream id, device, type).
_CURRENT_STREAM = getattr(torch._C, "_cuda_getCurrentStream", None)


class GraphEngine:
    """Captures, pool, failure policy and stream rule of one graph owner (see the module docstring).

    Example::

        engine = GraphEngine("emulate", None, enforce_note="enforce=True", max_graphs=2)
        graph = engine.capture(lambda x: x * 2, [torch.ones(4)], warm=False)
        engine.put("ones", graph)     # any object with a .graph (or a graph itself) may be kept
        graph.replay()

    Note: it does not choose buckets or keys, copy inputs or own static buffers; those stay with
    the owner. Not thread-safe on its own: owners call it under their call lock.
    """

    def __init__(self, graph_mode: str = "off", device: torch.device | None = None, *,
                 enforce_note: str = "TORCHPCG_ENFORCE=1", max_graphs: int | None = None,
                 name: str = "graph") -> None:
        self.graph_mode = graph_mode
        self.device = device
        self.enforce_note = enforce_note  # how the user asked for enforce, named in CaptureError
        self.pool: GraphPool | EmulatedPool | None = None  # made on the first capture
        self.order_streams = StreamOrder(device)  # call it at the start of each call on 'cuda'
        self.max_graphs = max_graphs  # None: put() keeps every graph
        self.name = name  # what a kept graph is called in the log
        self.graphs: collections.OrderedDict[Hashable, Any] = collections.OrderedDict()  # LRU first
        self.evictions = 0

    def place(self, graph_mode: str, device: torch.device | None) -> None:
        """Set the mode and device for an owner that learns them on its first call (before any capture)."""
        self.graph_mode, self.device = graph_mode, device
        self.order_streams = StreamOrder(device)

    # ---- capture ----------------------------------------------------------------------------------

    def current_pool(self) -> GraphPool | EmulatedPool:
        """The pool captures go to: the owner's one pool, a fresh one when it was retired."""
        if self.pool is None or self.pool.retired:
            self.pool = new_pool(self.graph_mode, self.device)
        return self.pool

    def capture(self, fn: Callable[..., Any], static_args: Sequence[Any], *, warm: bool = True
                ) -> CudaGraph | EmulatedGraph:
        """Capture ``fn(*static_args)`` into the owner's pool; ``warm``: run it once outside the graph
        first on 'cuda' (lazy inits, autotuning, cuBLAS workspaces). Raises what the capture raised:
        the caller passes it to ``failed`` (``CaptureError`` means the process could not be healed)."""
        pool = self.current_pool()
        if self.graph_mode == "cuda" and warm:
            fn(*static_args)
        return pool.capture(fn, static_args)

    def failed(self, what: str, exc: Exception, *, enforce: bool, fallback: bool = True) -> str:
        """A capture of ``what`` raised ``exc``: raise ``CaptureError`` under ``enforce``; else count
        it (``fallbacks`` too when ``fallback``), retire the pool after out of memory and return the
        message for the owner's log. What to drop is the owner's choice."""
        message = f"capturing {what} failed: {type(exc).__name__}: {exc}"
        if enforce:
            raise CaptureError(f"{message} ({self.enforce_note})") from exc
        COUNTERS.add("capture_failures")
        if fallback:
            COUNTERS.add("fallbacks")
        release_after_failed_capture(self.pool, exc)
        return message

    # ---- kept graphs (bounded LRU) ----------------------------------------------------------------

    def get(self, key: Hashable) -> Any:
        """The graph kept under ``key`` (now the most recently used), or None."""
        entry = self.graphs.get(key)
        if entry is not None:
            self.graphs.move_to_end(key)
        return entry

    def put(self, key: Hashable, entry: Any) -> None:
        """Keep ``entry`` (a graph, or an object with a ``.graph``) under ``key``; over ``max_graphs``,
        release the least recently used (call it after the new graph's first replay: the evicted
        graphs' memory then serves later captures only)."""
        self.graphs[key] = entry
        while self.max_graphs is not None and len(self.graphs) > self.max_graphs:
            self.evict()

    def evict(self, count: bool = True) -> None:
        """Release the least recently used graph; its pool memory serves later captures."""
        key, entry = self.graphs.popitem(last=False)
        _graph_of(entry).release()
        if count:
            self.evictions += 1
            log.debug("evicted %s %s", self.name, key)

    def drop(self, which: Callable[[Any], bool]) -> None:
        """Release every kept graph whose entry ``which`` selects (not counted as evictions)."""
        for key in [k for k, entry in self.graphs.items() if which(entry)]:
            _graph_of(self.graphs.pop(key)).release()

    def clear(self) -> None:
        """Release every kept graph (not counted as evictions)."""
        while self.graphs:
            self.evict(count=False)


def _graph_of(entry: Any) -> CudaGraph | EmulatedGraph:
    return getattr(entry, "graph", entry)


def current_stream_key(device_index: int) -> Any:
    """What identifies the current CUDA stream of ``device_index``, as cheaply as torch allows."""
    if _CURRENT_STREAM is not None:
        return _CURRENT_STREAM(device_index)
    return torch.cuda.current_stream(device_index)


class StreamOrder:
    """Back-to-back calls on different CUDA streams share static buffers: called at the start of
    each call, it makes a call on another stream than the last one wait for that stream.

    The stream is compared by ``current_stream_key`` (a tuple from C++, ~1 us); a ``Stream``
    object is made only when it changed (``torch.cuda.current_stream`` costs ~10 us a call).
    Calls on one stream cost nothing else.
    """

    def __init__(self, device: torch.device | None) -> None:
        self.device = device
        self._index: int | None = None  # device's index, found on the first call
        self._key: Any = None  # the last call's stream, as current_stream_key gives it
        self._last: torch.cuda.Stream | None = None

    def __call__(self) -> None:
        if self._index is None:
            self._index = torch.cuda._get_device_index(self.device, optional=True)
        key = current_stream_key(self._index)
        if key == self._key:
            return
        stream = torch.cuda.current_stream(self._index)
        if self._last is not None:  # another stream than the last call's (the keys differ)
            stream.wait_stream(self._last)
        self._last, self._key = stream, key
