"""The Dynamo backend ``"piecewise"``: split, compile pieces, build the runtime.

In: the FX GraphModule and example inputs Dynamo hands a backend, plus ``options=``.
Out: a ``Runtime`` that Dynamo calls instead of the graph. Imports the runtime, the compile step
(split, padding, token_shapes, compilers, full) and debug; explain, vlm and capture import it,
nothing below does.
"""
from __future__ import annotations

import contextlib
import logging
import os
import re
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import sympy
import torch
import torch.fx

from .compilers import ExactShapeCode, LazyCode, TokenDispatch, compile_piece, copy_graph_module
from .config import PiecewiseConfig, format_sizes
from .debug import dump_split, install_bytecode_dump
from .errors import ConfigError, SplitError
from .layout import expr_of, symbols_of, token_source
from .padding import classify, written_bases
from .runtime import PieceRunner, Runtime, resolve_graph_mode
from .full import FullGraphs, full_graph_blockers, written_inputs
from .split import (SplitGraph, SplitPiece, cache_state_reasons, capturable_ops, host_tensor_reason,
                    split_graph, split_reason, user_split_ops)
from .token_shapes import token_symbol
from .stats import COUNTERS

__all__ = ["piecewise_backend", "register", "collect_runtimes", "compile_options", "mode_options"]

log = logging.getLogger(__name__)
BACKEND_NAME = "piecewise"

_collectors = threading.local()


def piecewise_backend(gm: torch.fx.GraphModule, example_inputs: Sequence[Any], *,
                      mode: str | None = None, options: Mapping[str, Any] | None = None) -> Runtime:
    """``torch.compile(model, backend="piecewise", options={...})`` lands here once per Dynamo graph.

    Example::

        compiled = torch.compile(model, backend="piecewise", options={"capture_sizes": (1, 2, 4, 8)})

    Note: inference only; outputs never require grad. Knobs: see ``PiecewiseConfig``.
    """
    start = time.perf_counter()
    config = PiecewiseConfig.resolve({**mode_options(mode), **(options or {})})
    COUNTERS.add("dynamo_graphs")
    symbol = token_symbol(gm)
    _check_symbols(gm, symbol, config)
    static_names = static_inputs(gm, example_inputs, state_in_graphs=config.cache_in_graphs)
    reasons = split_reasons(gm, config, symbol)
    if not config.cache_in_graphs:  # per-request state (a static KV cache) is read beside the attention
        for node, why in cache_state_reasons(gm, marked_state(gm, example_inputs)).items():
            reasons.setdefault(node, why)
    try:
        split = split_graph(gm, reasons, written_bases)
    except Exception as exc:  # noqa: BLE001 - torch.fx's splitter on a graph shape it does not handle
        return _unsplit(gm, exc, config)
    _check_split(split, config)
    device = graph_device(gm)
    locator = token_locator(gm, symbol)
    if symbol is not None and locator is None:
        log.warning("token symbol %s sizes no input dim on its own (sources: %s): calls run without graphs",
                    symbol, symbol_sources(gm))
        COUNTERS.add("fallbacks")
    piece_statics = static_piece_inputs(split, static_names)
    # Addresses checked per call: what captured pieces read. An input only split ops read (a KV cache
    # inside the attention op) reaches them eagerly, so a new one per call costs nothing.
    computed = {piece.name for piece in split.compute_pieces}
    read = sorted({name for piece, names in piece_statics.items() if piece in computed for name in names.values()},
                  key=static_names.get)
    runtime = Runtime(split, config, symbol, locator, resolve_graph_mode(config, device), device,
                      static_args=[static_names[n] for n in read], static_names=read)
    runtime.frame = compiled_frame()
    for piece in split.compute_pieces:
        fake_args = [n.meta.get("example_value", n.meta.get("val")) for n in piece.gm.graph.nodes if n.op == "placeholder"]
        # Runner first: it reads the piece's output structure, which Inductor may rewrite.
        runner = PieceRunner(piece.name, piece.gm, piece.gm, fake_args, symbol, runtime, static_inputs=piece_statics[piece.name])
        runner.compiled = _compile(piece, fake_args, symbol, config)
        _note_graphless(runner, config, gm)
        runtime.install(runner)
    if config.cudagraph_mode == "full_and_piecewise":
        _add_full_graphs(runtime, gm, reasons, static_names, config)
    elif symbol is not None and runtime.runners and not any(runner.sees_symbol() for runner in runtime.runners):
        # Only split ops see the dynamic size (a decode step's cache length, the one dynamic size
        # of a [1, 1] call): bucketing by it would capture the same graphs again per bucket.
        log.info("the dynamic size %s reaches only split ops (sources: %s): one graph per piece serves every "
                 "value", symbol, symbol_sources(gm))
        runtime.unbucket()
    COUNTERS.add("pieces", len(split.compute_pieces))
    COUNTERS.add("split_ops", len(split.split_pieces))
    log.info("piecewise%s: %d pieces, %d split ops, graphs=%s, buckets=%s, compiled with %s in %.2fs",
             f" {runtime.frame}" if runtime.frame else "", len(split.compute_pieces), len(split.split_pieces),
             runtime.graph_mode,
             format_sizes(runtime.buckets), config.compiler, time.perf_counter() - start)
    if config.debug_dir:
        dump_split(runtime, gm, config.debug_dir)
        install_bytecode_dump(config.debug_dir)  # Dynamo runs the hook for this frame after we return
    for collector in getattr(_collectors, "stack", ()):
        collector.append(runtime)
    return runtime


def _unsplit(gm: torch.fx.GraphModule, exc: Exception, config: PiecewiseConfig) -> Callable[..., Any]:
    """A Dynamo graph torch.fx could not split runs as it is, without graphs: correct, slow, loud.

    The first such failure seen was ``split_module`` reading symbols from a lifted
    ``torch._check`` message function (now handled, ``split._drop_opaque_attr_values``); another
    graph shape it cannot handle should cost speed, not the user's call.
    """
    first = str(exc).splitlines()[0][:300] if str(exc) else ""
    message = (f"splitting a Dynamo graph of {len(gm.graph.nodes)} nodes failed ({type(exc).__name__}: {first}); "
               "it runs as traced, without CUDA graphs. Please report it with the graph (TORCH_LOGS=graph_code prints it)")
    if config.enforce:
        raise SplitError(message + " (TORCHPCG_ENFORCE=1)") from exc
    log.warning("%s", message)
    COUNTERS.add("fallbacks")
    return gm.forward


def compiled_frame() -> str:
    """The Python frame Dynamo is compiling now, as ``qualname (file:line)``; '' where torch does
    not say. After a graph break each frame (a resume function, a submodule's ``forward`` called
    from one) is a Dynamo graph of its own: explain and the logs name them."""
    context = torch._guards.TracingContext.try_get()
    traced = getattr(context, "traced_code", None) if context is not None else None
    if not traced:
        return ""
    code = traced[0]
    return f"{getattr(code, 'co_qualname', code.co_name)} ({os.path.basename(code.co_filename)}:{code.co_firstlineno})"


def _compile(piece: SplitPiece, fake_args: list[Any], symbol: sympy.Symbol | None,
             config: PiecewiseConfig) -> Callable[..., Any]:
    """A piece's code. With Inductor: compiled statically for each T in ``compile_sizes`` (T=1 by
    default) on its first call there, with T backed for the other T = 2 .. the largest bucket and
    past it as far as its guards are proven, and for Dynamo's (unbacked) T on the first call
    nothing else serves (``TokenDispatch``,
    ``ExactShapeCode``, ``LazyCode``: Inductor fuses more around a known size), unless
    ``backed_compile`` is off or Dynamo's T is backed already (``dynamic_dim="backed"``,
    ``mark_dynamic``: its T=1 calls get a graph of their own)."""
    from torch.fx.experimental.symbolic_shapes import free_unbacked_symbols

    if config.compiler == "eager" or not config.backed_compile or symbol is None or not free_unbacked_symbols(symbol):
        return compile_piece(piece.gm, fake_args, config.compiler, piece.name, max_autotune=config.max_autotune)

    def compile_unbacked() -> Callable[..., Any]:
        return compile_piece(copy_graph_module(piece.gm), fake_args, config.compiler, piece.name,
                             max_autotune=config.max_autotune)

    # Later, outside Dynamo's compile, only where every size is unbacked: Dynamo's shape env is
    # frozen by then and would drop a guard on a backed size; an unbacked one cannot be guarded.
    later = all(free_unbacked_symbols(s) for f in fake_args for s in symbols_of(f))
    unbacked = LazyCode(compile_unbacked, piece.name) if later else compile_unbacked()
    # Exact-shape code per compile size (compiled on its first call: the warm-up before capture)
    exact = ExactShapeCode(piece.gm, config.compiler, piece.name, unbacked,
                           max_autotune=config.max_autotune or config.compile_sizes_autotune,
                           limit=len(config.compile_sizes) + 3)
    dispatch = TokenDispatch(piece.gm, fake_args, symbol, config.largest_bucket, config.compiler, unbacked,
                             piece.name, max_autotune=config.max_autotune, exact=exact,
                             exact_sizes=config.compile_sizes)
    if dispatch.backed is None and isinstance(unbacked, LazyCode):
        unbacked.ensure()  # no backed code: Dynamo's serves every T >= 2, compiled now as before
    return dispatch


def _add_full_graphs(runtime: Runtime, gm: torch.fx.GraphModule, reasons: Mapping[torch.fx.Node, str],
                     static_names: Mapping[str, int], config: PiecewiseConfig) -> None:
    """Whole-forward graphs for T <= full_max_size when every split op may sit inside a graph."""
    runtime.full_blockers = full_graph_blockers(reasons, capturable_ops())
    if runtime.full_blockers:
        log.warning("cudagraph_mode=full_and_piecewise: %d split op(s) cannot run inside a CUDA graph, so this "
                    "graph stays piecewise: %s%s (declare an op safe with register_splitting_op(op, capturable=True))",
                    len(runtime.full_blockers), "; ".join(runtime.full_blockers[:3]),
                    " ..." if len(runtime.full_blockers) > 3 else "")
        return
    if runtime.graph_mode == "off":
        return  # nothing to capture (explain, cudagraph="off"): the blockers above are the answer
    runtime.full = FullGraphs(runtime, gm, static_names, written_inputs(gm, list(reasons)), config.full_max_size,
                              compiler=config.compiler, max_autotune=config.max_autotune,
                              backed_compile=config.backed_compile)
    if runtime.full.off_reason:
        runtime.full_blockers = [runtime.full.off_reason]
        log.warning("cudagraph_mode=full_and_piecewise: %s; this graph stays piecewise", runtime.full.off_reason)
        runtime.full = None
        return
    runtime.watch_static_inputs(static_names)  # a whole-forward graph reads the split ops' inputs too


# torch.compile's ``mode`` as the backend reads it. Hugging Face ``CompileConfig`` passes
# ``mode="reduce-overhead"`` by default; our graphs are that mode's point, so it changes nothing.
_MODES = {None: {}, "default": {}, "reduce-overhead": {},
          "max-autotune": {"max_autotune": True}, "max-autotune-no-cudagraphs": {"max_autotune": True}}


def mode_options(mode: str | None) -> dict[str, Any]:
    """The knobs ``torch.compile(..., mode=...)`` stands for; an unknown mode raises ``ConfigError``."""
    if mode not in _MODES:
        allowed = ", ".join(repr(m) for m in _MODES if m is not None)
        raise ConfigError(f"torch.compile(backend='piecewise', mode={mode!r}): expected None or one of {allowed}")
    return dict(_MODES[mode])


def split_reasons(gm: torch.fx.GraphModule, config: PiecewiseConfig,
                  symbol: sympy.Symbol | None) -> dict[torch.fx.Node, str]:
    """Node -> why it runs eagerly: attention, collective, user op, or not padding-safe."""
    user_ops = user_split_ops() | set(config.split_ops)
    reasons = {}
    for node in gm.graph.nodes:
        why = split_reason(node, user_ops, config.split_collectives)
        if why:
            reasons[node] = why
    # Static graphs too: writes into graph inputs and data-dependent ops are cut whatever the shapes.
    for node, why in classify(gm, symbol).items():
        reasons.setdefault(node, why)
    device = graph_device(gm)
    if device is not None and device.type == "cuda":  # host work cannot live inside a CUDA graph
        for node in gm.graph.nodes:
            why = host_tensor_reason(node)
            if why:
                reasons.setdefault(node, why)
    return reasons


def static_inputs(gm: torch.fx.GraphModule, example_inputs: Sequence[Any],
                  state_in_graphs: bool = False) -> dict[str, int]:
    """Placeholder name -> index, for inputs with a stable address: read in place by the graphs.

    Dynamo marks parameters, buffers and ``torch._dynamo.mark_static_address`` tensors (Hugging
    Face ``StaticCache``) with a static input type; every other input is copied on each replay.
    """
    found = {}
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    for index, node in enumerate(placeholders):
        example = example_inputs[index] if index < len(example_inputs) else None
        if _static_kind(node, example) is not None and (state_in_graphs or not _small_marked_state(node, example)):
            found[node.name] = index
    return found


SMALL_STATE = 64  # elements: marked state this small is copied per replay rather than read in place


def marked_state(gm: torch.fx.GraphModule, example_inputs: Sequence[Any]) -> set[str]:
    """Placeholders of per-request state: ``mark_static_address`` tensors larger than
    ``SMALL_STATE`` that are neither parameters nor module buffers and that the graph writes in
    place (a static KV cache's keys and values, updated by the cache write). The nodes reading them
    run eagerly (``split.cache_state_reasons``). A marked tensor the graph only reads (a table kept
    at a fixed address to save its copy) stays read in place by the graphs."""
    written = {base.name for node in gm.graph.nodes if node.op in ("call_function", "call_method")
               for base in written_bases(node) if base.op == "placeholder"}
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    return {node.name for node, example in zip(placeholders, example_inputs)
            if node.name in written and _is_marked_state(node, example) and example.numel() > SMALL_STATE}


def _small_marked_state(node: torch.fx.Node, example: Any) -> bool:
    """Marked state of at most ``SMALL_STATE`` elements (a static cache's length counter, Hugging
    Face ``StaticLayer.cumulative_length``): copied on every replay, a few bytes (``copied_bytes``).
    Read in place, a new cache object per ``generate()`` call would be a new address set: new
    graphs every call."""
    return _is_marked_state(node, example) and example.numel() <= SMALL_STATE


def _static_kind(node: torch.fx.Node, example: Any) -> str | None:
    """Dynamo's static input type of a placeholder (parameters, buffers, ``mark_static_address``), or None."""
    kind = (node.meta.get("tensor_dict") or {}).get("_dynamo_static_input_type")
    if kind is None and isinstance(example, torch.Tensor):
        kind = torch._dynamo.utils.get_static_address_type(example)
    return kind


def _is_marked_state(node: torch.fx.Node, example: Any) -> bool:
    """A static-address tensor that is neither a parameter nor a module buffer (Dynamo's source)."""
    if not isinstance(example, torch.Tensor) or isinstance(example, torch.nn.Parameter):
        return False
    if _static_kind(node, example) is None:
        return False
    grapharg = node.meta.get("grapharg")
    source = getattr(getattr(grapharg, "source", None), "name", "")
    source = str(source() if callable(source) else source)
    # No source (a graph loaded from Dynamo's AOT artifact): nothing tells state from weights, so
    # nothing is treated as state and every static input is read in place, as before.
    return bool(source) and "._buffers[" not in source and "._parameters[" not in source


def static_piece_inputs(split: SplitGraph, static_names: Mapping[str, int]) -> dict[str, dict[int, str]]:
    """Compute piece name -> {its input index: graph input name} for inputs read in place."""
    found: dict[str, dict[int, str]] = {}
    for node in split.split_gm.graph.nodes:
        if node.op != "call_module":
            continue
        found[node.target] = {i: a.name for i, a in enumerate(node.args)
                              if isinstance(a, torch.fx.Node) and a.op == "placeholder" and a.name in static_names}
    return found


def _check_split(split: SplitGraph, config: PiecewiseConfig) -> None:
    if split.split_pieces:
        return
    message = "no split point found (no attention, collective or registered split op in the graph)"
    if config.enforce:
        raise SplitError(message + "; register your attention op with torchpcg.register_splitting_op (TORCHPCG_ENFORCE=1)")
    log.info("%s: the whole graph is one piece", message)


def _check_symbols(gm: torch.fx.GraphModule, symbol: sympy.Symbol | None, config: PiecewiseConfig) -> None:
    """Under enforce, a dynamic size other than the token count is an error (it cannot be bucketed)."""
    if not config.enforce:
        return
    others = {str(s) for n in gm.graph.nodes if n.op == "placeholder"
              for s in symbols_of(n.meta.get("example_value"))} - {str(symbol)}
    if others:
        raise SplitError(
            f"second dynamic symbol(s) {', '.join(sorted(others))} besides the token count {symbol} "
            f"(sources: {symbol_sources(gm)}); mark only the token dim dynamic (torchpcg.compile does) "
            f"or pass such sizes as static (TORCHPCG_ENFORCE=1)")


def _note_graphless(runner: PieceRunner, config: PiecewiseConfig, gm: torch.fx.GraphModule) -> None:
    if not runner.graphless_reason:
        return
    sources = symbol_sources(gm)
    detail = f"{runner.name} {runner.graphless_reason} (sources: {sources}){graph_break_hint(gm)}"
    if config.enforce:
        raise SplitError(detail + "; it cannot be replayed from a token-count bucket (TORCHPCG_ENFORCE=1)")
    log.warning("%s: it runs without graphs", detail)
    COUNTERS.add("graphless_pieces")
    COUNTERS.add("fallbacks")


def token_locator(gm: torch.fx.GraphModule, symbol: sympy.Symbol | None) -> tuple[int, int | None] | None:
    """(input index, dim) whose size is T; dim None when the input is the SymInt T itself."""
    return token_source([n.meta.get("example_value") for n in gm.graph.nodes if n.op == "placeholder"], symbol)


def symbol_sources(gm: torch.fx.GraphModule) -> str:
    """'s0: L_x_ dim 0, s1: L_kv_ dim 1' — which input introduced each dynamic symbol."""
    seen: dict[str, str] = {}
    for node in gm.graph.nodes:
        value = node.meta.get("example_value") if node.op == "placeholder" else None
        if isinstance(value, torch.Tensor):
            for dim, size in enumerate(value.size()):
                expr = expr_of(size)
                if isinstance(expr, sympy.Symbol):
                    seen.setdefault(str(expr), f"{node.target} dim {dim}")
    return ", ".join(f"{k}: {v}" for k, v in seen.items()) or "none"


def graph_break_hint(gm: torch.fx.GraphModule) -> str:
    """What to say when this Dynamo graph resumes after a graph break, else ''.

    After a break Dynamo compiles the rest of the function as a resume function whose inputs
    include the values on the interpreter stack (placeholders named ``L_stack0_`` ...). Their sizes
    reach it as sizes of their own, unrelated to the token count: a second dynamic symbol, whose
    real cause is the break.
    """
    resumed = [n.target for n in gm.graph.nodes if n.op == "placeholder" and re.match(r"L_stack\d+_", str(n.target))]
    if not resumed:
        return ""
    return (f"; this graph resumes after a graph break (inputs {', '.join(resumed[:3])}), which is the cause: "
            f"find the break with TORCH_LOGS=graph_breaks or torchpcg.explain(compiled, *args) (one plan per frame, "
            f"without resetting Dynamo's caches as torch._dynamo.explain does) and remove it, "
            f"or register the op that breaks it as a split op")


def graph_device(gm: torch.fx.GraphModule) -> torch.device | None:
    """The device of the graph's tensors (CUDA wins if any input is on CUDA)."""
    devices = [n.meta["example_value"].device for n in gm.graph.nodes
               if n.op == "placeholder" and isinstance(n.meta.get("example_value"), torch.Tensor)]
    cuda = [d for d in devices if d.type == "cuda"]
    return cuda[0] if cuda else (devices[0] if devices else None)


@contextlib.contextmanager
def collect_runtimes() -> Iterator[list[Runtime]]:
    """Collect every ``Runtime`` the backend builds inside the block (for explain and capture)."""
    stack = getattr(_collectors, "stack", None)
    if stack is None:
        stack = _collectors.stack = []
    found: list[Runtime] = []
    stack.append(found)
    try:
        yield found
    finally:
        stack.remove(found)


def compile_options(compiled: Any) -> dict[str, Any]:
    """The ``options=`` a ``torch.compile(..., backend="piecewise")`` was given (best effort)."""
    backend = getattr(getattr(compiled, "dynamo_ctx", None), "callback", None)
    for _ in range(8):  # CatchErrorsWrapper -> ConvertFrame -> WrapBackendDebug -> _TorchCompileWrapper
        if backend is None:
            break
        kwargs = getattr(backend, "kwargs", None)
        if isinstance(kwargs, dict) and isinstance(kwargs.get("options"), dict):
            return dict(kwargs["options"])
        backend = getattr(backend, "_torchdynamo_orig_backend", None) or getattr(backend, "__wrapped__", None)
    return {}


def register() -> None:
    """Register ``"piecewise"`` with Dynamo unless the entry point is about to do it."""
    from torch._dynamo.backends import registry

    if BACKEND_NAME in registry._COMPILER_FNS:
        return
    if registry._BACKENDS.get(BACKEND_NAME) is not None:
        return  # discovered through the torch_dynamo_backends entry point; lookup will load us
    registry.register_backend(piecewise_backend, name=BACKEND_NAME)
