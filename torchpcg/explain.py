"""Explain what the piecewise backend would do with a model, without capturing a graph.

In: a model (an ``nn.Module``, a ``torch.compile``-d one or a ``torchpcg.compile`` one) and one set
of example arguments. Out: an ``ExplainReport``: the pieces in execution order, every split op and
why it was cut, the buckets, the graph mode a real run would use and the static buffer memory.
The same plan (``plan.GraphPlan``), as JSON and text, is what ``debug.dump_split`` writes into
``TORCHPCG_DEBUG_DIR``. A tool above the runtime: imports backend, stable, token_inputs, recompiles,
plan and runtime; nothing in torchpcg imports it but the package's ``__init__`` (and the demo CLI).
"""
from __future__ import annotations

import dataclasses
import functools
import inspect
import logging
import types
from collections.abc import Callable, Mapping
from typing import Any

import torch

from .backend import collect_runtimes, compile_options
from .config import PiecewiseConfig
from .plan import REASON_CATEGORIES, GraphPlan, PiecePlan, plan_of, reason_category
from .runtime import InputKind, Runtime
from .recompiles import describe_callable
from .stable import StableModel
from .token_inputs import mark_token_dim, resolve_token_layout

# GraphPlan, PiecePlan, plan_of, reason_category and REASON_CATEGORIES live in plan.py; named here too
# because a report's reader meets them through explain (tests import reason_category from here).
__all__ = ["explain", "ExplainReport", "GraphPlan", "PiecePlan", "plan_of", "reason_category", "REASON_CATEGORIES"]

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class ExplainReport:
    """What ``torchpcg.explain`` returns: ``print(report)``, ``report.to_dict()``, or the fields.

    ``pieces``, ``split_counts``, ``buckets``, ``graph_mode``, ``token_symbol`` and
    ``static_buffer_bytes`` describe the first Dynamo graph (the only one under ``fullgraph=True``);
    ``graphs`` holds every graph's plan.
    """

    model: str
    graphs: tuple[GraphPlan, ...]
    config: dict[str, Any]

    def _first(self) -> GraphPlan:
        if not self.graphs:
            raise ValueError("explain saw no Dynamo graph: the model ran without calling the piecewise backend")
        return self.graphs[0]

    @property
    def pieces(self) -> tuple[PiecePlan, ...]:
        return self._first().pieces

    @property
    def split_counts(self) -> dict[str, int]:
        return self._first().split_counts

    @property
    def buckets(self) -> tuple[int, ...]:
        return self._first().buckets

    @property
    def graph_mode(self) -> str:
        return self._first().graph_mode

    @property
    def token_symbol(self) -> str | None:
        return self._first().token_symbol

    @property
    def static_buffer_bytes(self) -> int:
        return sum(g.static_buffer_bytes for g in self.graphs)

    def summary(self) -> str:
        """The summary lines of every graph, without the piece table."""
        return "\n".join(g.summary() for g in self.graphs)

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-serialisable data: ``json.dumps(report.to_dict())`` works."""
        config = {k: (list(v) if isinstance(v, tuple) else v) for k, v in self.config.items()}
        return {"model": self.model, "config": config, "graphs": [g.to_dict() for g in self.graphs]}

    def __str__(self) -> str:
        parts = [f"torchpcg.explain: {self.model}: {len(self.graphs)} Dynamo graph(s)"]
        for i, graph in enumerate(self.graphs):
            parts.append(f"\n-- graph {i} --" if len(self.graphs) > 1 else "")
            parts.append(str(graph))
        return "\n".join(p for p in parts if p)


def would_use_graph_mode(config: PiecewiseConfig, device: torch.device | None) -> str:
    """Like ``runtime.resolve_graph_mode`` but silent: explain only reports, it never falls back."""
    on_cuda = device is not None and device.type == "cuda"
    if config.cudagraph == "auto":
        return "cuda" if on_cuda else "off"
    if config.cudagraph == "cuda" and not on_cuda:
        return "off (cudagraph='cuda' needs CUDA tensors)"
    return config.cudagraph


# ---- explain --------------------------------------------------------------------------------------

def explain(model_or_compiled: Callable[..., Any], *args: Any, token_inputs: Mapping[str, int] | None = None,
            options: Mapping[str, Any] | None = None, dynamic_dim: str | None = None,
            fullgraph: bool | None = None, **kwargs: Any) -> ExplainReport:
    """Split ``model`` as the piecewise backend would and report the plan; captures no graph.

    Example::

        >>> model = FlatDecoder(DecoderConfig())
        >>> report = torchpcg.explain(model, ids, positions, model.new_kv_cache())
        >>> print(report)                  # summary + one row per piece
        >>> report.split_counts            # {'attention': 2, 'collective': 0, 'user': 0, ...}
        >>> json.dumps(report.to_dict())   # pieces, reasons, buckets, graph mode, memory

    ``model_or_compiled`` may be the module, ``torch.compile(module, backend="piecewise",
    options=...)`` or ``torchpcg.compile(module, ...)``; the compiled model's options (and
    ``options=``, which win) give the buckets and split ops, and its ``fullgraph`` setting whether
    a graph break splits the model into frames, each a Dynamo graph of its own, listed with the
    frame it came from (``fullgraph=`` overrides; a plain module: ``True``). The model is compiled
    afresh with
    ``cudagraph="off"`` and eager pieces, and run once on ``*args, **kwargs`` under
    ``no_grad``. Token dims are marked dynamic as ``torchpcg.compile`` finds them, by shape: the
    first tensor argument (dim 1 for 2-D integer ids, else dim 0) plus every other tensor
    argument with T rows at that dim (pass T > 1; see docs/zero-recompiles.md for the
    exclusions); ``token_inputs={"name": dim}`` names them instead. ``dynamic_dim``: ``"unbacked"`` or ``"backed"`` (``mark_dynamic``);
    default (or ``"auto"``): the ``torchpcg.compile`` model's own if it is one of those two, else
    unbacked and, if the model cannot be traced that way (code that branches on the token count,
    e.g. Hugging Face mask helpers), backed. With backed dims pass at least 2 tokens (Dynamo specialises a size of 1).

    Note: the model really runs once, so in-place effects happen (pass a scratch KV cache). The
    compile is counted in ``torchpcg.stats()`` (``dynamo_graphs``, ``pieces``, ``split_ops``, and the
    call as ``graphless_runs``, or ``eager_runs`` with ``compiler="eager"``) but captures nothing. It does not touch the Dynamo cache of your own compiled
    model: it compiles a copy of ``forward``'s code object, so your model neither recompiles nor
    loses compiled code (``torch._dynamo.reset()`` would). Forward hooks of the module are not run.
    """
    module, found_options, found_tokens, found_dim, found_fullgraph = _unwrap(model_or_compiled)
    whole = fullgraph if fullgraph is not None else found_fullgraph if found_fullgraph is not None else True
    user_config = PiecewiseConfig.resolve({**found_options, **dict(options or {})})
    # The plan does not depend on the piece compiler; eager pieces make explain seconds, not minutes.
    trace_config = user_config.replace(cudagraph="off", compiler="eager", debug_dir=None, verify=False, enforce=False)
    chosen = dynamic_dim if dynamic_dim not in (None, "auto") else found_dim
    attempts = [chosen] if chosen in ("unbacked", "backed") else ["unbacked", "backed"]
    for attempt, mode in enumerate(attempts):
        try:
            runtimes = _trace_once(module, trace_config, args, kwargs, token_inputs or found_tokens, mode, whole)
            break
        except Exception as exc:  # noqa: BLE001 - Dynamo raises many types; we retry once, then re-raise
            if attempt + 1 == len(attempts):
                raise
            log.info("explain: tracing with %s token dims failed (%s: %s); retrying with %s",
                     mode, type(exc).__name__, str(exc).splitlines()[0][:200], attempts[attempt + 1])
    plans = [plan_of(r, would_use_graph_mode(user_config, _device_of(r))) for r in runtimes]
    log.info("explain %s: %d Dynamo graph(s)", describe_callable(module), len(plans))
    return ExplainReport(describe_callable(module), tuple(plans), user_config.to_dict())


def _trace_once(module: Any, config: PiecewiseConfig, args: tuple, kwargs: dict,
                token_inputs: Mapping[str, int] | None, dynamic_dim: str, fullgraph: bool) -> list[Runtime]:
    """Compile a fresh copy of ``module``'s forward, call it once, return the runtimes built.

    With ``fullgraph=False`` the frames Dynamo starts after a graph break inside a submodule run
    that submodule's own code object, not a copy, so they get Dynamo cache entries next to the
    user's compiled model's (keyed by backend: neither uses the other's code)."""
    fresh, signature_owner = _fresh_callable(module)
    compiled = torch.compile(fresh, backend="piecewise", fullgraph=fullgraph, options=config.to_dict())
    bound = inspect.signature(signature_owner).bind(*args, **kwargs)
    layout = resolve_token_layout(dict(bound.arguments), token_inputs, set())
    for name, dim in layout.dims.items():
        value = layout.leaf(bound.arguments, name)  # a name, or a tensor inside a dict argument
        if isinstance(value, torch.Tensor):
            value = value.detach()  # a new tensor object: the caller's stays unmarked
            layout.replace(bound.arguments, name, value)
            mark_token_dim(value, dim, dynamic_dim)
    with collect_runtimes() as runtimes, torch.no_grad():
        compiled(*bound.args, **bound.kwargs)
    return runtimes


def _device_of(runtime: Runtime) -> torch.device | None:
    """The device of the first token input (where static buffers would live)."""
    for runner in runtime.runners:
        for spec in runner.inputs:
            if spec.kind == InputKind.TOKEN:
                return spec.layout.device
    return None


def _unwrap(model: Any) -> tuple[Any, dict[str, Any], dict[str, int] | None, str, bool | None]:
    """(the plain module or function, piecewise options found, token_inputs, dynamic_dim or '',
    the compiled model's ``fullgraph`` or None where it cannot be read)."""
    options: dict[str, Any] = {}
    token_inputs = None
    dynamic_dim = ""
    fullgraph = None
    if isinstance(model, StableModel):
        options = model.config.to_dict()
        token_inputs = model.token_inputs
        dynamic_dim = model.dynamic_dim if model.dynamic_dim in ("unbacked", "backed") else ""  # auto/off: ours
        fullgraph = _fullgraph_of(model.compiled)
        model = model.model
    if hasattr(model, "_torchdynamo_orig_callable"):  # OptimizedModule or a torch.compile-d function
        options = options or compile_options(model)
        fullgraph = _fullgraph_of(model)
        model = getattr(model, "_orig_mod", None) or model._torchdynamo_orig_callable
    return model, options, token_inputs, dynamic_dim, fullgraph


def _fullgraph_of(compiled: Any) -> bool | None:
    """``torch.compile(..., fullgraph=)`` of an OptimizedModule (its Dynamo context keeps it); None
    for a compiled function, whose context torch does not expose."""
    context = getattr(compiled, "dynamo_ctx", None)
    value = getattr(context, "fullgraph", None)
    if isinstance(value, bool):
        return value
    callback = getattr(context, "callback", None)  # older torch: the fullgraph converter marks itself
    return None if callback is None else hasattr(callback, "_one_graph")


def _fresh_callable(model: Any) -> tuple[Callable[..., Any], Callable[..., Any]]:
    """A callable running ``model``'s forward from a *copy* of its code object, plus its signature source.

    Dynamo keys compiled code and recompile counts on the code object of the frame it compiles (with
    ``fullgraph=True`` only the top frame: everything below is inlined). A copy gets its own empty
    cache, so explain neither reuses nor disturbs the cache entries of the user's compiled model.
    """
    if isinstance(model, torch.nn.Module):
        forward = type(model).forward
        return types.MethodType(_copy_function(forward), model), model.forward
    if isinstance(model, types.MethodType):
        return types.MethodType(_copy_function(model.__func__), model.__self__), model
    if isinstance(model, types.FunctionType):
        return _copy_function(model), model
    if isinstance(model, functools.partial):
        return functools.partial(_fresh_callable(model.func)[0], *model.args, **model.keywords), model
    raise TypeError(f"torchpcg.explain: expected an nn.Module or a function, got {type(model).__name__}")


def _copy_function(fn: types.FunctionType) -> types.FunctionType:
    copy = types.FunctionType(fn.__code__.replace(), fn.__globals__, fn.__name__, fn.__defaults__, fn.__closure__)
    copy.__kwdefaults__ = fn.__kwdefaults__
    copy.__dict__.update(fn.__dict__)
    copy.__qualname__ = fn.__qualname__
    return copy
