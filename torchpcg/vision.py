"""CUDA graphs for vision encoders over packed patches: piecewise, or one graph per image split.

In: a vision encoder called as ``encoder(patches [P, ...], cu_seqlens [N+1], ...)``: the patches
of N images packed along dim 0, image i owning rows ``cu_seqlens[i]:cu_seqlens[i+1]``, attention a
varlen op that reads ``cu_seqlens``. Out: a callable with the encoder's signature that replays
CUDA graphs, in one of two modes (knob ``vit_cuda_graph``):

``piecewise``
    The normal piecewise backend with the patch count P as the token dim: the graph is cut at the
    varlen attention (it runs eagerly with the real ``cu_seqlens``), everything between is
    captured once per bucket of ``vit_capture_sizes``. ``cu_seqlens`` is marked dynamic, so any
    number of images of any sizes shares one Dynamo graph.
``full``
    ``EncoderGraphs``: the whole encoder, attention included, captured as one graph per
    ``(bucket, cu_seqlens)``. A varlen kernel bakes the segment boundaries it was captured with
    (host-side lengths, grid sizes), so two batches of the same total length but different image
    splits must never share a graph; the key holds the padded ``cu_seqlens`` itself (the dict
    hashes it and compares it exactly: a hash collision cannot share a graph). Padding rows
    ``P..B`` form their own last segment, so real rows never attend to them. At most
    ``vit_max_graphs`` graphs are kept, least recently used evicted and released.

Knobs (field = ``options`` key = ``TORCHPCG_`` + upper-case name; a bad value raises
``ConfigError`` naming the variable, the value and what is allowed):

=========================  ==================================================  ==============
``vit_cuda_graph``         ``off`` / ``0``, ``piecewise`` / ``1``, ``full``     ``off``
``vit_capture_sizes``      comma list of patch-count buckets                    64 ... 16384
``vit_max_graphs``         whole-encoder graphs kept (LRU), positive int        32
=========================  ==================================================  ==============

No Dynamo graph surgery here: piecewise mode is ``stable.compile_model`` (``torchpcg.compile``'s
plain-model path: an encoder is never a VLM) with ViT buckets; full mode captures through an
``engine.GraphEngine`` (its pool, failure policy, stream rule and LRU of graphs; real CUDA graphs, or
emulated ones on CPU). A front end: imports stable, runtime, engine and graphs; nothing in
torchpcg imports it but the package's ``__init__``.
"""
from __future__ import annotations

import dataclasses
import inspect
import logging
import threading
from collections.abc import Callable, Hashable, Mapping, Sequence
from typing import Any

import torch

from .config import VIT_GRAPH_MODES, PiecewiseConfig, VisionConfig, default_vit_capture_sizes, format_sizes
from .engine import GraphEngine
from .errors import CaptureError, ConfigError, TorchPCGError
from .graphs import CudaGraph, EmulatedGraph
from .runtime import graphless_counter, resolve_graph_mode
from .stable import StableModel, compile_model
from .stats import COUNTERS

__all__ = ["VisionConfig", "EncoderGraphs", "PiecewiseEncoder", "compile_vision", "default_vit_capture_sizes",
           "VIT_GRAPH_MODES"]

log = logging.getLogger(__name__)


# ---- the encoder's call --------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class _Call:
    """One call bound to the encoder's signature: where the patches and boundaries are."""

    arguments: dict[str, Any]  # name -> value, defaults applied
    segments: dict[str, tuple[int, ...]]  # cu_seqlens (first) and other boundary inputs, on the host
    num_patches: int  # P = cu_seqlens[-1]
    token_names: tuple[str, ...]  # tensor arguments with P rows at dim 0

    @property
    def bounds(self) -> tuple[int, ...]:
        return next(iter(self.segments.values()))


class _Signature:
    """Binds calls to the encoder's forward, reads its boundary inputs and finds its token inputs.

    Boundary (segment) inputs are ``cu_seqlens`` and every other parameter named ``*seqlens``
    (Qwen2.5-VL's ``cu_window_seqlens``): 1-D offsets from 0 to P.
    """

    def __init__(self, encoder: Callable[..., Any], cu_seqlens_arg: str, token_inputs: Sequence[str] | None) -> None:
        self.signature = inspect.signature(getattr(encoder, "forward", encoder))
        if cu_seqlens_arg not in self.signature.parameters:
            raise ConfigError(f"cu_seqlens_arg={cu_seqlens_arg!r} is not a parameter of the encoder's forward"
                              f"{self.signature}; pass the name of its image-boundary argument")
        unknown = sorted(set(token_inputs or ()) - set(self.signature.parameters))
        if unknown:
            raise ConfigError(f"token_inputs {unknown} are not parameters of the encoder's forward{self.signature}")
        self.cu_seqlens_arg = cu_seqlens_arg
        self.token_inputs = tuple(token_inputs) if token_inputs else None
        self.segment_inputs = (cu_seqlens_arg, *(n for n in self.signature.parameters
                                                 if n != cu_seqlens_arg and n.endswith("seqlens")))

    def bind(self, args: tuple, kwargs: Mapping[str, Any]) -> _Call:
        bound = self.signature.bind(*args, **kwargs)
        bound.apply_defaults()
        arguments = dict(bound.arguments)
        segments = {self.cu_seqlens_arg: self._offsets(self.cu_seqlens_arg, arguments[self.cu_seqlens_arg], None)}
        num_patches = segments[self.cu_seqlens_arg][-1]
        for name in self.segment_inputs[1:]:
            if arguments.get(name) is not None:
                segments[name] = self._offsets(name, arguments[name], num_patches)
        names = self.token_inputs or tuple(
            name for name, value in arguments.items() if name not in segments
            and isinstance(value, torch.Tensor) and value.dim() >= 1 and value.shape[0] == num_patches)
        for name in names:
            value = arguments[name]
            if not isinstance(value, torch.Tensor) or value.dim() == 0 or value.shape[0] != num_patches:
                raise TorchPCGError(f"token input {name!r} has shape {getattr(value, 'shape', None)}, expected "
                                    f"{num_patches} rows at dim 0 ({self.cu_seqlens_arg}[-1])")
        if not names:
            raise TorchPCGError(f"no tensor argument has {num_patches} rows ({self.cu_seqlens_arg}[-1]) at dim 0; "
                                "pass token_inputs=('patches', ...)")
        return _Call(arguments, segments, num_patches, names)

    @staticmethod
    def _offsets(name: str, value: Any, num_patches: int | None) -> tuple[int, ...]:
        """Host copy of a 1-D boundary tensor, checked: 0, non-decreasing, ending at P."""
        if not isinstance(value, torch.Tensor) or value.dim() != 1 or value.numel() < 2:
            raise TorchPCGError(f"{name} must be a 1-D tensor of offsets [segments + 1], got "
                                f"{getattr(value, 'shape', type(value).__name__)}")
        offsets = tuple(int(b) for b in value.tolist())  # a device sync when it lives on a GPU
        if offsets[0] != 0 or any(b > e for b, e in zip(offsets, offsets[1:])) or (
                num_patches is not None and offsets[-1] != num_patches):
            end = "" if num_patches is None else f", ending at {num_patches}"
            raise TorchPCGError(f"{name}={list(offsets[:8])}{'...' if len(offsets) > 8 else ''}: expected 0, then "
                                f"non-decreasing offsets{end}")
        return offsets


# ---- whole-encoder graphs ------------------------------------------------------------------------

@dataclasses.dataclass
class _Bucket:
    """Static inputs shared by every graph of one bucket and input layout (one replays at a time)."""

    size: int
    token_buffers: dict[str, torch.Tensor]  # name -> [bucket, ...]
    other_buffers: dict[str, torch.Tensor]  # name -> a copy of a non-token tensor input
    warmed: bool = False  # cuda: one eager run on these buffers before the first capture


@dataclasses.dataclass
class _KeyedGraph:
    """One captured encoder graph: its image split, static cu_seqlens and outputs."""

    key: Hashable
    bucket: int
    graph: CudaGraph | EmulatedGraph
    segments: dict[str, torch.Tensor]  # padded boundaries the graph was captured with; never written again
    static: _Bucket  # the buffers the graph reads: alive as long as the graph
    outputs: list[Any]  # flat, in graph memory
    single: bool  # the encoder returned one value, not a tuple


class EncoderGraphs:
    """A vision encoder replayed as whole CUDA graphs, one per (bucket, image split).

    Call it exactly like the encoder. Each call reads ``cu_seqlens`` on the host (a device sync if
    it lives on a GPU: keep it on the CPU), pads the patch count P to the smallest bucket B >= P,
    copies the token inputs (tensors with P rows at dim 0) into the bucket's static buffers with
    rows P.. zeroed, and replays the graph captured for ``graph_key(B, cu_seqlens + [B])``,
    capturing it on first use. The encoder sees ``cu_seqlens`` with the padding rows as one more
    segment, so real rows never attend to padding. Other boundary inputs (parameters named
    ``*seqlens``, e.g. ``cu_window_seqlens``) are padded the same way and their values are part of
    the key too. Outputs with a token dim keep their real rows
    (``rows * P / B``) and are cloned (``copy_outputs``).

    Example::

        graphs = torchpcg.vision.EncoderGraphs(vit, capture_sizes=(256, 1024, 4096), max_graphs=16)
        features = graphs(patches, cu_seqlens, positions)       # same answer as vit(...)
        graphs.info()   # {'graphs': 1, 'captures': 1, 'replays': 0, 'evictions': 0, ...}

    ``cudagraph``: ``auto`` (real graphs on CUDA, none on CPU), ``cuda``, ``emulate`` (CPU tests) or
    ``off``. ``compiler``: ``eager`` captures the module as is; ``inductor`` captures
    ``torch.compile(encoder, dynamic=True)`` (Inductor's own graphs off). A capture that fails (an op
    that syncs, out of memory, a bucket the encoder rejects) drops its bucket, logged; the call and
    later ones there run at the next larger bucket or eagerly (``CaptureError`` under ``enforce``).

    Note: every tensor output must have a dim 0 proportional to the patch count (patch features,
    merged features); per-image outputs (``[N, ...]``) and pooled ones are not supported (the
    padding segment would add a row). Non-token tensor inputs are copied into static buffers;
    non-tensor inputs are part of the key. The encoder must not keep references to its inputs
    across calls.
    """

    def __init__(self, encoder: Callable[..., Any], *, capture_sizes: Sequence[int] | None = None,
                 max_graphs: int | None = None, cudagraph: str = "auto", compiler: str = "eager",
                 copy_outputs: bool = True, enforce: bool = False, cu_seqlens_arg: str = "cu_seqlens",
                 token_inputs: Sequence[str] | None = None) -> None:
        vision = VisionConfig.resolve({k: v for k, v in {"vit_capture_sizes": capture_sizes,
                                                          "vit_max_graphs": max_graphs}.items() if v is not None})
        self.config = PiecewiseConfig(cudagraph=cudagraph, compiler=compiler, copy_outputs=copy_outputs,
                                      enforce=enforce)
        self.encoder = encoder
        self.buckets = vision.buckets
        self.max_graphs = vision.vit_max_graphs
        self._signature = _Signature(encoder, cu_seqlens_arg, token_inputs)
        self._run: Callable[..., Any] = encoder if compiler == "eager" else _inductor_compile(encoder)
        self._graph_mode: str | None = None  # resolved on the first call, from the inputs' device
        self._first_layout: tuple[Hashable, ...] | None = None
        self._disabled = ""  # why graphs are off after a failed capture
        self._buckets: dict[tuple[int, Hashable], _Bucket] = {}  # (bucket, input layout) -> buffers
        # Captures, the pool, the failure policy, the stream rule and the graphs by key, at most
        # max_graphs (least recently used released). Placed on the inputs' device by the first call.
        self._engine = GraphEngine(enforce_note="enforce=True", max_graphs=self.max_graphs, name="encoder graph")
        self._counts = dict.fromkeys(("captures", "replays", "eager_runs"), 0)
        self._lock = threading.RLock()
        log.info("whole-encoder graphs: buckets %s, at most %d graphs, compiler %s", format_sizes(self.buckets),
                 self.max_graphs, compiler)

    # ---- public -----------------------------------------------------------------------------------

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        with self._lock, torch.no_grad():
            call = self._signature.bind(args, kwargs)
            bucket = self.bucket_for(call.num_patches, self._mode(call))
            if bucket is None:
                self._counts["eager_runs"] += 1
                COUNTERS.add(graphless_counter(self.config.compiler))
                return self._run(**call.arguments)
            return self._replay(call, bucket)

    def bucket_for(self, num_patches: int, graph_mode: str = "cuda") -> int | None:
        """Smallest bucket >= ``num_patches``, or None (too many patches, or graphs off)."""
        if graph_mode == "off" or self._disabled:
            return None
        return next((b for b in self.buckets if b >= num_patches), None)

    def graph_key(self, bucket: int, padded_cu_seqlens: tuple[int, ...]) -> Hashable:
        """The key a graph is stored under: ``(bucket, padded cu_seqlens)``.

        Everything a captured varlen kernel may have baked in is part of the key. Override only to
        experiment (the tests show that a key of the length alone replays the wrong image split).
        """
        return (bucket, padded_cu_seqlens)

    def info(self) -> dict[str, Any]:
        """Graphs held now, captures, replays, evictions, eager runs, and why graphs are off (if so)."""
        with self._lock:
            counts = self._counts
            return {"graphs": len(self._graphs), "captures": counts["captures"], "replays": counts["replays"],
                    "evictions": self._engine.evictions, "eager_runs": counts["eager_runs"],
                    "max_graphs": self.max_graphs, "buckets": list(self.buckets), "disabled": self._disabled}

    def keys(self) -> list[Hashable]:
        """Keys of the graphs held, least recently used first: ``graph_key(...)``, paired with the
        shapes and values of the other inputs when the encoder takes any."""
        with self._lock:
            return list(self._graphs)

    def clear(self) -> None:
        """Release every graph and static buffer (they are captured again on demand)."""
        with self._lock:
            self._engine.clear()
            self._buckets.clear()

    @property
    def _graphs(self) -> dict[Hashable, _KeyedGraph]:
        """The graphs held, by key, least recently used first (the engine keeps them)."""
        return self._engine.graphs

    # ---- one call ---------------------------------------------------------------------------------

    def _mode(self, call: _Call) -> str:
        if self._graph_mode is None:
            device = next((call.arguments[n].device for n in call.token_names), None)
            self._graph_mode = resolve_graph_mode(self.config, device)
            self._engine.place(self._graph_mode, device)
        return self._graph_mode

    def _replay(self, call: _Call, bucket: int) -> Any:
        pad = (bucket,) if bucket > call.num_patches else ()  # padding rows P..B: one more segment
        padded = {name: offsets + pad for name, offsets in call.segments.items()}
        key = self.graph_key(bucket, padded[self._signature.cu_seqlens_arg])
        layout = self._layout(call)
        extras = tuple((name, offsets) for name, offsets in padded.items() if name != self._signature.cu_seqlens_arg)
        if extras or layout:  # other boundaries, tensor shapes, Python values shape the graph too
            key = (key, extras + layout)
        if self._graph_mode == "cuda":
            self._engine.order_streams()  # a call on another stream than the last waits for it
        static = self._bucket(bucket, layout, call)
        self._copy_inputs(static, call)
        entry = self._engine.get(key)  # now the most recently used
        if entry is None:
            entry = self._capture(key, static, call, padded)
            if entry is None:  # capture failed: graphs are off from now on
                self._counts["eager_runs"] += 1
                COUNTERS.add(graphless_counter(self.config.compiler))
                return self._run(**call.arguments)
        else:
            entry.graph.replay()
            self._counts["replays"] += 1
            COUNTERS.add("replays")
        COUNTERS.add("graph_calls")
        COUNTERS.add("real_tokens", call.num_patches)
        COUNTERS.add("padded_tokens", bucket - call.num_patches)
        return self._outputs(entry, call.num_patches, bucket)

    def _layout(self, call: _Call) -> tuple[Hashable, ...]:
        """What else shapes a graph and its buffers: the token inputs' row layout, the other tensors'
        shapes and dtypes, the non-tensor values. Empty while they equal the first call's."""
        parts: list[Hashable] = []
        for name, value in call.arguments.items():
            if name in call.segments:
                continue
            if isinstance(value, torch.Tensor):
                shape = tuple(value.shape[1:]) if name in call.token_names else tuple(value.shape)
                parts.append((name, shape, value.dtype, value.device))
            else:
                try:
                    hash(value)
                except TypeError:
                    value = repr(value)
                parts.append((name, value))
        layout = tuple(parts)
        if self._first_layout is None:
            self._first_layout = layout
        return () if layout == self._first_layout else layout

    def _bucket(self, bucket: int, layout: Hashable, call: _Call) -> _Bucket:
        """The static buffers of (bucket, layout), made on first use and kept (graphs read them)."""
        static = self._buckets.get((bucket, layout))
        if static is None:
            with torch.inference_mode(False):  # normal tensors: writable inside and outside inference mode
                tokens = {n: _zeros_like_rows(call.arguments[n], bucket) for n in call.token_names}
                others = {n: torch.empty_like(v) for n, v in call.arguments.items()
                          if isinstance(v, torch.Tensor) and n not in tokens and n not in call.segments}
            static = _Bucket(bucket, tokens, others)
            self._buckets[(bucket, layout)] = static
        return static

    def _copy_inputs(self, static: _Bucket, call: _Call) -> None:
        num_patches = call.num_patches
        for name, buf in static.token_buffers.items():
            buf[:num_patches].copy_(call.arguments[name])  # [P, ...] -> static [B, ...] rows :P
            if num_patches < static.size:
                buf[num_patches:].zero_()  # padding rows: zeros, never an earlier call's data
        for name, buf in static.other_buffers.items():
            buf.copy_(call.arguments[name])

    def _static_arguments(self, static: _Bucket, call: _Call, segments: Mapping[str, torch.Tensor]) -> dict[str, Any]:
        arguments = dict(call.arguments)
        arguments.update(static.token_buffers)
        arguments.update(static.other_buffers)
        arguments.update(segments)
        return arguments

    def _segment_tensors(self, call: _Call, padded: Mapping[str, tuple[int, ...]]) -> dict[str, torch.Tensor]:
        """One tensor per boundary input holding its padded offsets, owned by the graph (baked)."""
        tensors = {}
        for name, offsets in padded.items():
            source = call.arguments[name]
            tensor = torch.tensor(offsets, dtype=source.dtype)
            if source.device.type == "cpu" and self._graph_mode == "cuda":
                tensor = tensor.pin_memory()  # an H2D copy of it inside the encoder is capturable
            tensor = tensor.to(source.device)
            torch._dynamo.maybe_mark_dynamic(tensor, 0)  # compiler="inductor": any image count, one graph
            tensors[name] = tensor
        return tensors

    def _capture(self, key: Hashable, static: _Bucket, call: _Call,
                 padded: Mapping[str, tuple[int, ...]]) -> _KeyedGraph | None:
        segments = self._segment_tensors(call, padded)
        arguments = self._static_arguments(static, call, segments)
        names = list(arguments)
        structure = {"single": True}

        def forward(*values: Any) -> tuple[Any, ...]:
            result = self._run(**dict(zip(names, values)))
            structure["single"] = not isinstance(result, (tuple, list))
            return tuple(result) if not structure["single"] else (result,)

        try:
            # cuda: one run outside capture per bucket's buffers first (lazy inits, cuBLAS workspaces,
            # Inductor compile)
            graph = self._engine.capture(forward, list(arguments.values()), warm=not static.warmed)
        except CaptureError:
            raise  # the process could not be healed: never continue
        except Exception as exc:  # noqa: BLE001 - an op that cannot be captured, OOM: fall back
            return self._capture_failed(static.size, exc)
        static.warmed = static.warmed or self._graph_mode == "cuda"
        outputs = graph.release_capture_outputs()
        entry = _KeyedGraph(key, static.size, graph, segments, static, list(outputs), structure["single"])
        self._counts["captures"] += 1
        COUNTERS.add("captured")
        COUNTERS.note_capture_size(static.size)
        log.debug("captured encoder graph for %d patches in %d images at bucket %d", call.num_patches,
                  len(call.bounds) - 1, static.size)
        if isinstance(graph, CudaGraph):
            graph.replay()  # capture records work; this replay computes the outputs
        self._engine.put(key, entry)  # over max_graphs: the least recently used is released
        return entry

    def _capture_failed(self, bucket: int, exc: Exception) -> None:
        """Drop ``bucket`` (its calls go to the next larger bucket or run eagerly); no buckets left: off."""
        message = self._engine.failed(f"the vision encoder at bucket {bucket}", exc, enforce=self.config.enforce)
        log.warning("%s; bucket %d is dropped (an op that syncs with the host, e.g. cu_seqlens on the GPU read by "
                    ".tolist(), cannot be captured; keep cu_seqlens on the CPU)", message, bucket)
        self.buckets = tuple(b for b in self.buckets if b != bucket)
        self._engine.drop(lambda entry: entry.bucket == bucket)
        for key in [k for k in self._buckets if k[0] == bucket]:
            del self._buckets[key]
        if not self.buckets:
            self._disabled = message
        return None

    def _outputs(self, entry: _KeyedGraph, num_patches: int, bucket: int) -> Any:
        values = []
        for value in entry.outputs:
            if isinstance(value, torch.Tensor) and value.dim():
                rows = value.shape[0]
                if (rows * num_patches) % bucket:
                    raise TorchPCGError(
                        f"an encoder output has {rows} rows at bucket {bucket}: its real rows for {num_patches} "
                        f"patches ({rows}*{num_patches}/{bucket}) are not whole; use buckets that are multiples "
                        "of the encoder's patch group (e.g. 4 for 2x2 merging)")
                value = value[: rows * num_patches // bucket]
            if isinstance(value, torch.Tensor) and self.config.copy_outputs:
                value = value.clone()  # the next replay overwrites graph memory
            values.append(value)
        return values[0] if entry.single else tuple(values)


def _zeros_like_rows(value: torch.Tensor, rows: int) -> torch.Tensor:
    """Zeros shaped like ``value`` with ``rows`` rows at dim 0."""
    return torch.zeros((rows, *value.shape[1:]), dtype=value.dtype, device=value.device)


def _inductor_compile(encoder: Callable[..., Any]) -> Callable[..., Any]:
    """The encoder compiled by Inductor for every patch count (captured by us, not by Inductor)."""
    compiled = torch.compile(encoder, dynamic=True, fullgraph=True,
                             options={"triton.cudagraphs": False})

    def run(**arguments: Any) -> Any:
        return compiled(**arguments)
    return run


# ---- piecewise -----------------------------------------------------------------------------------

class PiecewiseEncoder:
    """``stable.compile_model`` of a vision encoder: patch-count buckets, ``cu_seqlens`` dynamic.

    The first call finds the token inputs (tensors with ``cu_seqlens[-1]`` rows at dim 0; one host
    read of ``cu_seqlens``) unless ``token_inputs`` names them, and compiles; later calls only mark
    the segment inputs (``cu_seqlens`` and any argument named ``*seqlens``) dynamic at dim 0, so
    the number of images never recompiles, and call the compiled encoder.

    Example::

        encoder = torchpcg.vision.compile_vision(vit, vit_cuda_graph="piecewise", vit_capture_sizes="256,1024")
        features = encoder(patches, cu_seqlens, positions)

    Attributes: ``encoder`` (the original), ``compiled`` (the ``StableModel`` wrapper, after
    the first call), ``config``.

    Note: under ``enforce`` the backend rejects the second dynamic size (the image count); the
    varlen attention is the only op that sees it, so without enforce nothing runs graphless.
    """

    def __init__(self, encoder: Callable[..., Any], config: PiecewiseConfig, *, cu_seqlens_arg: str = "cu_seqlens",
                 token_inputs: Sequence[str] | None = None, segment_inputs: Sequence[str] | None = None) -> None:
        self.encoder = encoder
        self.config = config
        self._signature = _Signature(encoder, cu_seqlens_arg, token_inputs)
        self.segment_inputs = tuple(segment_inputs) if segment_inputs is not None else self._signature.segment_inputs
        self.compiled: StableModel | None = None
        self._lock = threading.Lock()

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        if self.compiled is None:
            with self._lock:
                if self.compiled is None:
                    call = self._signature.bind(args, kwargs)
                    log.info("vision encoder: token inputs %s, segment inputs %s, buckets %s", list(call.token_names),
                             list(self.segment_inputs), format_sizes(self.config.buckets))
                    self.compiled = compile_model(self.encoder, self.config,
                                                  token_inputs=dict.fromkeys(call.token_names, 0))
        bound = self._signature.signature.bind(*args, **kwargs)
        for name in self.segment_inputs:
            value = bound.arguments.get(name)
            if isinstance(value, torch.Tensor) and value.dim() == 1:
                value = value.detach()  # mark a new tensor object: the caller's keeps no Dynamo marks
                torch._dynamo.maybe_mark_dynamic(value, 0)
                bound.arguments[name] = value
        return self.compiled(*bound.args, **bound.kwargs)

    def __getattr__(self, name: str) -> Any:
        if name.startswith("_") or name == "encoder":
            raise AttributeError(name)
        return getattr(self.encoder, name)


# ---- entry point ---------------------------------------------------------------------------------

def compile_vision(encoder: Callable[..., Any], config: VisionConfig | None = None, *,
                   piecewise: PiecewiseConfig | None = None, cu_seqlens_arg: str = "cu_seqlens",
                   token_inputs: Sequence[str] | None = None, **knobs: Any) -> Callable[..., Any]:
    """Give a packed-patch vision encoder CUDA graphs as ``vit_cuda_graph`` says.

    Example::

        encoder = torchpcg.compile_vision(vit, vit_cuda_graph="full", vit_max_graphs=16, compiler="eager")
        features = encoder(patches, cu_seqlens, positions)

    ``knobs`` are ``VisionConfig`` fields (``vit_cuda_graph``, ``vit_capture_sizes``,
    ``vit_max_graphs``) and ``PiecewiseConfig`` fields (``cudagraph``, ``compiler``, ``enforce``,
    ...); the environment (``TORCHPCG_VIT_*``, ``TORCHPCG_*``) fills the rest. Returns the encoder
    itself (``off``), a ``PiecewiseEncoder`` (``piecewise``: buckets ``vit_capture_sizes``, the
    language model's ``capture_sizes`` do not apply) or an ``EncoderGraphs`` (``full``).

    Note: the encoder must take the packed layout (patches ``[P, ...]``, ``cu_seqlens [N+1]``);
    encoders that build ``cu_seqlens`` from image grids inside forward (Hugging Face Qwen2-VL's
    ``grid_thw``) need that step moved out first.
    """
    vision_knobs = {k: v for k, v in knobs.items() if k in VisionConfig.knob_names()}
    other = {k: v for k, v in knobs.items() if k not in vision_knobs}
    if {"capture_sizes", "max_capture_size"} & set(other):
        raise ConfigError("capture_sizes / max_capture_size are the language model's buckets; the vision encoder's "
                          "are vit_capture_sizes (TORCHPCG_VIT_CAPTURE_SIZES)")
    vision = config if config is not None else VisionConfig.resolve()
    if vision_knobs:
        vision = vision.replace(**vision_knobs)
    base = piecewise if piecewise is not None else PiecewiseConfig.resolve()
    buckets = vision.buckets
    settings = base.replace(**other, capture_sizes=buckets, max_capture_size=max(buckets))
    if vision.vit_cuda_graph == "off":
        log.info("vision encoder runs without graphs (vit_cuda_graph=off)")
        return encoder
    if vision.vit_cuda_graph == "piecewise":
        if settings.enforce:
            raise ConfigError("enforce=True (TORCHPCG_ENFORCE=1) with vit_cuda_graph=piecewise: the image count "
                              "(cu_seqlens length) is a second dynamic size, which the backend rejects under enforce; "
                              "use vit_cuda_graph=full or enforce=False for the vision encoder")
        return PiecewiseEncoder(encoder, settings, cu_seqlens_arg=cu_seqlens_arg, token_inputs=token_inputs)
    return EncoderGraphs(encoder, capture_sizes=buckets, max_graphs=vision.vit_max_graphs,
                         cudagraph=settings.cudagraph, compiler=settings.compiler, copy_outputs=settings.copy_outputs,
                         enforce=settings.enforce, cu_seqlens_arg=cu_seqlens_arg, token_inputs=token_inputs)
