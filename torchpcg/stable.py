"""Guard-stable compilation: ``compile_model`` and the ``StableModel`` it returns.

In: an ``nn.Module`` (or any callable) and how its inputs vary between calls. Out: a callable with
the model's signature whose Dynamo guards do not change under serving traffic (grad mode, T=1
first, optional kwargs that come and go), watched by a ``RecompileMonitor`` that counts, explains
and, under ``enforce``, forbids every recompile after the first call; after warm-up it can call
Dynamo's compiled code directly (``direct.py``).

Four things make Dynamo recompile a serving model, and each has its answer:

==============================  ===============================================================
guard that flips                what ``StableModel`` does
==============================  ===============================================================
grad mode (GLOBAL_STATE)        forward always runs under ``torch.no_grad()`` / ``inference_mode``
size 0/1 specialisation (T=1)   the token dim is marked *unbacked* from the first compiled call
                                (``token_inputs.py`` finds and marks it)
optional kwarg None <-> Tensor  ``stable_kwargs``: always a slice of a preallocated, zeroed buffer
                                (``stable_buffers.py``)
Python scalar / anything else   not fixable from outside: the monitor names it and the fix
                                (``recompiles.py``)
==============================  ===============================================================

``compile_model`` is ``torchpcg.compile`` for a plain model; the public ``torchpcg.compile``
(``front.py``) sends vision-language models to ``vlm.py`` first, which compiles their language
model through ``compile_model``. A front end: imports token_inputs, stable_buffers, recompiles,
debug, direct, config and errors, never vlm, vision, front or explain (they import it). No CUDA
here; nothing in this module captures graphs.
"""
from __future__ import annotations

import inspect
import logging
import threading
from collections.abc import Callable, Mapping
from typing import Any

import torch

from .config import PiecewiseConfig
from .debug import depyf_session
from .direct import DirectCode, call_key, direct_code
from .errors import ConfigError
from .recompiles import RecompileMonitor, describe_callable
from .stable_buffers import StableSpec, StableTree
from .token_inputs import TokenLayout, check_dynamic_dim, mark_token_dim, resolve_token_layout, static_tensor_ids

__all__ = ["compile_model", "StableModel"]

log = logging.getLogger(__name__)

_MISSED = object()  # StableModel._call_direct: the call's key differs, go through Dynamo
_DIRECT_MISS_LIMIT = 8  # such calls that Dynamo served without compiling before direct calls stop


def _default_stance() -> bool:
    """Whether torch's compiler stance is the default one (``set_stance("force_eager")`` and the
    like change what Dynamo's frame hook does; a guarded direct call leaves those to it)."""
    stance = getattr(torch._dynamo.eval_frame, "_stance", None)
    return (stance is not None and getattr(stance, "stance", None) == "default"
            and not getattr(stance, "skip_guard_eval_unsafe", False))


class _Bound:
    """One call's arguments by name, in parameter order, defaults applied (what
    ``inspect.BoundArguments`` after ``apply_defaults`` holds); ``args``/``kwargs`` are read from
    ``arguments``, so values replaced there (marked token inputs) are what the model gets."""

    __slots__ = ("arguments", "_positional")

    def __init__(self, arguments: dict[str, Any], positional: tuple[str, ...]) -> None:
        self.arguments = arguments
        self._positional = positional

    @property
    def args(self) -> tuple:
        return tuple(self.arguments[name] for name in self._positional)

    @property
    def kwargs(self) -> dict[str, Any]:
        return {name: value for name, value in self.arguments.items() if name not in self._positional}


class _Binder:
    """``Signature.bind`` + ``apply_defaults``, with the signature read once, not on every call.

    The layout (positional names, keyword-only names, defaults) is taken from the signature up
    front; a call is bound by zipping. Signatures with ``*args``/``**kwargs`` and calls that do not
    fit (too many positionals, an unknown or repeated keyword, a missing argument) go through
    ``inspect`` as before, so the error a bad call raises is unchanged.
    """

    def __init__(self, signature: inspect.Signature) -> None:
        self.signature = signature
        params = list(signature.parameters.values())
        kinds = {p.kind for p in params}
        self._fast = not kinds & {inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.VAR_KEYWORD}
        self._names = tuple(p.name for p in params)
        self._positional = tuple(p.name for p in params if p.kind in (inspect.Parameter.POSITIONAL_ONLY,
                                                                      inspect.Parameter.POSITIONAL_OR_KEYWORD))
        self._keywords = frozenset(p.name for p in params if p.kind != inspect.Parameter.POSITIONAL_ONLY)
        self._defaults = tuple((p.name, p.default) for p in params if p.default is not inspect.Parameter.empty)

    def bind(self, args: tuple, kwargs: Mapping[str, Any]) -> _Bound | inspect.BoundArguments:
        if self._fast and len(args) <= len(self._positional):
            given = dict(zip(self._positional, args))
            if all(k in self._keywords and k not in given for k in kwargs):
                given.update(kwargs)
                for name, default in self._defaults:
                    given.setdefault(name, default)
                if len(given) == len(self._names):
                    return _Bound({name: given[name] for name in self._names}, self._positional)
        bound = self.signature.bind(*args, **kwargs)  # var-args signatures, or the call's TypeError
        bound.apply_defaults()  # same positional layout on every call, whatever the caller spelled
        return bound


class StableModel:
    """What ``torchpcg.compile`` returns: call it like the model.

    Attributes: ``model`` (the original), ``compiled`` (what ``torch.compile`` returned),
    ``config``, ``monitor`` (its ``RecompileMonitor``), ``token_inputs`` ({name: dim}, known after
    the first compiled call: the first call, or without ``token_inputs=`` the first with T > 1),
    ``eager_calls`` (calls run uncompiled while waiting for that). Other attributes are read from
    the model.
    """

    def __init__(self, model: Callable[..., Any], compiled: Callable[..., Any], config: PiecewiseConfig, *,
                 stable_kwargs: Mapping[str, StableSpec], token_inputs: Mapping[str, int] | None,
                 inference_mode: bool, dynamic_dim: str, initial_tokens: int,
                 recompile: Callable[[], Callable[..., Any]] | None = None) -> None:
        self.model = model
        self.compiled = compiled
        self._recompile = recompile  # a fresh torch.compile of model, for the auto -> backed retry
        self.config = config
        self.dynamic_dim = dynamic_dim
        self.monitor = RecompileMonitor(compiled, enforce=config.enforce, name=describe_callable(model))
        self._signature = inspect.signature(getattr(model, "forward", model))
        self.__signature__ = self._signature
        self._binder = _Binder(self._signature)  # the signature is read here, once
        self._stable = {name: StableTree(name, spec, initial_tokens) for name, spec in stable_kwargs.items()}
        self._check_names(token_inputs)
        self._token_inputs = dict(token_inputs) if token_inputs else None
        self._layout: TokenLayout | None = None
        self.eager_calls = 0  # T <= 1 calls before the token inputs could be inferred
        self._unmarked: set[str] = set()  # token inputs already warned about for a size != T
        self._backed_kinds: set[int] = set()  # min(T, 2) of calls compiled with a backed token dim
        self._grad_mode = torch.inference_mode if inference_mode else torch.no_grad
        self._direct: DirectCode | None = None  # Dynamo's code, called directly (torchpcg.direct)
        self._direct_reason: str | None = None  # why not (logged once), or None while not yet tried
        self.direct_calls = 0  # calls that ran Dynamo's compiled code on the call key alone (skip_guard_check)
        self.guarded_calls = 0  # calls that ran it directly after Dynamo's guards passed (guarded_direct)
        self._direct_misses = 0  # calls the direct path refused that Dynamo then served without compiling
        self._lock = threading.Lock()  # the stable buffers are shared by every call

    @property
    def token_inputs(self) -> dict[str, int] | None:
        return None if self._layout is None else dict(self._layout.dims)

    @property
    def recompiles(self) -> list[str]:
        return self.monitor.recompiles

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        direct, missed = self._direct, False
        if direct is not None and self._grad_mode is torch.no_grad:
            out = self._call_direct(direct, args, kwargs)
            if out is not _MISSED:
                return out
            missed = True
        with self._lock, self._grad_mode():
            bound = self._binder.bind(args, kwargs)  # the same positional layout whatever the caller spelled
            first = self._layout is None
            if first:
                layout = resolve_token_layout(bound.arguments, self._token_inputs, set(self._stable),
                                         static_tensor_ids(self.model))
                if self._token_inputs is None and layout.num_tokens(bound.arguments) <= 1:
                    return self._run_eager(layout, args, kwargs)  # shapes cannot tell yet
                self._layout = layout
                log.info("%s: token inputs %s (%s)", describe_callable(self.model), layout.dims,
                         "token_inputs=" if self._token_inputs else
                         f"inferred from shapes at T={layout.num_tokens(bound.arguments)}; token_inputs= overrides")
            return self._run_compiled(bound, first, missed)

    forward = __call__

    def _call_direct(self, direct: DirectCode, args: tuple, kwargs: dict) -> Any:
        """After warm-up: Dynamo's code on a call its guards (or, under ``skip_guard_check``, its
        argument key) accept, else ``_MISSED``.

        Every µs here comes before the graph's launch. So no lock: this path touches no
        stable buffer (direct calls are refused with ``stable_kwargs``) and the runtime holds
        its own. Grad mode is switched by one C call, not a context-manager object; it is set
        before the guards run, which check it.
        """
        enabled = torch.is_grad_enabled()
        torch._C._set_grad_enabled(False)
        try:
            return self._try_direct(direct, self._binder.bind(args, kwargs))
        finally:
            torch._C._set_grad_enabled(enabled)

    def _try_direct(self, direct: DirectCode, bound: _Bound | inspect.BoundArguments) -> Any:
        """Dynamo's code on these bound arguments if its guards (or the call key) accept them, else
        ``_MISSED``; grad mode is already the compiled one."""
        if direct.guard is not None:
            if not _default_stance():
                return _MISSED  # set_stance("force_eager") and the like: Dynamo's frame hook decides
            self._fresh_token_tensors(bound.arguments)
        if not direct.matches(bound.arguments, self._layout.dims):  # type: ignore[union-attr]
            return _MISSED
        if direct.guard is None:
            self.direct_calls += 1
        else:
            self.guarded_calls += 1
        return direct(bound.args, bound.kwargs)

    def _fresh_token_tensors(self, arguments: dict[str, Any]) -> None:
        """The token inputs as the Dynamo path passes them: new tensor objects over the same memory
        (``_mark_tokens``), so a caller's own ``mark_dynamic`` is not what the guards see."""
        layout = self._layout
        for name in layout.dims:  # type: ignore[union-attr]
            value = layout.leaf(arguments, name)  # type: ignore[union-attr]
            if isinstance(value, torch.Tensor):
                layout.replace(arguments, name, value.detach())  # type: ignore[union-attr]

    def _run_eager(self, layout: TokenLayout, args: tuple, kwargs: dict) -> Any:
        """A T <= 1 call before the first T > 1 one: the uncompiled model, same answer, nothing marked."""
        if self.eager_calls == 0:
            log.warning("%s: first call has T=1 token, where shapes cannot tell token inputs from other "
                        "[1, ...] tensors; calls run uncompiled until the first call with T > 1, which infers "
                        "them and compiles. To compile from the first call, name them: "
                        "torchpcg.compile(model, token_inputs={'%s': %d, ...})",
                        describe_callable(self.model), layout.primary, layout.dims[layout.primary])
        self.eager_calls += 1
        return self.model(*args, **kwargs)

    def _run_compiled(self, bound: _Bound | inspect.BoundArguments, first: bool, missed: bool = False) -> Any:
        """``missed``: the direct path was tried on this call and refused it."""
        arguments = bound.arguments
        if self._direct is not None and not missed:  # under inference_mode: __call__ did not try it
            out = self._try_direct(self._direct, bound)
            if out is not _MISSED:
                return out
        num_tokens = self._layout.num_tokens(arguments)  # type: ignore[union-attr]
        self._expect_backed_graph(num_tokens)
        self._mark_tokens(arguments, num_tokens)
        recompiles = len(self.monitor.recompiles)
        out = self._call_dynamo(bound, first, num_tokens)
        if missed and self._direct is not None and len(self.monitor.recompiles) == recompiles:
            self._direct_missed()
        if (self.config.skip_guard_check or self.config.guarded_direct) and not first:
            self._update_direct(arguments)
        return out

    def _direct_missed(self) -> None:
        """Dynamo served without compiling a call the direct path refused: a guard that depends on
        more than the frame's locals, or a call key too strict. A few are fine (a stance, a kind of
        call seen before); if they keep coming, each call would pay both checks, so stop."""
        self._direct_misses += 1
        if self._direct_misses >= _DIRECT_MISS_LIMIT:
            log.debug("%s: %d calls refused by the direct path ran through Dynamo without compiling; calls go "
                      "through Dynamo from now on", describe_callable(self.model), self._direct_misses)
            self._direct, self._direct_reason = None, "its check kept refusing calls that Dynamo's guards passed"

    def _update_direct(self, arguments: Mapping[str, Any]) -> None:
        """After a call through Dynamo, call its code directly from now on (once it ran a call after
        warm-up), or stop doing so if Dynamo compiled again. Only ``skip_guard_check``, which the
        user asked for, warns when direct calls cannot be used; ``guarded_direct`` logs at DEBUG."""
        unguarded = self.config.skip_guard_check
        if self.monitor.recompiles:
            if self._direct is not None:
                log.log(logging.WARNING if unguarded else logging.DEBUG,
                        "%s: Dynamo compiled again, so calls go through Dynamo from now on", describe_callable(self.model))
            self._direct, self._direct_reason = None, "Dynamo compiled again after warm-up"
            return
        if self._direct is not None or self._direct_reason is not None:
            return
        if self._stable:
            found: DirectCode | str = "stable_kwargs are filled per call by the Dynamo path"
        elif self.dynamic_dim not in ("auto", "unbacked"):  # auto fell back to "backed" if it had to
            found = (f"the token dim is {self.dynamic_dim}: T=1 and T >= 2 get a compiled entry each, and "
                     "a direct call serves exactly one")
        else:
            key = call_key(arguments, self._layout.dims) if unguarded else None  # type: ignore[union-attr]
            found = direct_code(self.model, key, guarded=not unguarded)
        if isinstance(found, str):
            self._direct_reason = found
            log.log(logging.WARNING if unguarded else logging.DEBUG, "%s: %s, but calls go through Dynamo: %s",
                    describe_callable(self.model), "skip_guard_check is on" if unguarded else "guarded_direct", found)
        else:
            self._direct = found
            log.info("%s: %s", describe_callable(self.model),
                     "skip_guard_check: calls with the dtypes, devices and sizes of this one now run Dynamo's "
                     "compiled code directly" if unguarded else
                     "calls that pass Dynamo's guards now run its compiled code directly (guarded_direct)")

    def _call_dynamo(self, bound: _Bound | inspect.BoundArguments, first: bool, num_tokens: int) -> Any:
        arguments = bound.arguments
        # depyf sees only frames compiled inside its block: wrap the first call (TORCHPCG_DEBUG_DIR).
        with depyf_session(self.config.debug_dir if first else None):
            try:
                return self.monitor(*bound.args, **bound.kwargs)
            except Exception as exc:  # noqa: BLE001 - Dynamo raises many types; only one is retried
                if not (first and self.dynamic_dim == "auto" and self._recompile and _is_data_dependent(exc)):
                    raise
                log.warning("%s cannot be traced with an unbacked token dim (%s); compiling with a backed "
                            "one instead (mark_dynamic: T=1 calls then get a graph of their own). "
                            "Pass dynamic_dim='backed' to skip this attempt.",
                            describe_callable(self.model), str(exc).splitlines()[0][:160])
                self.dynamic_dim = "backed"
                self.compiled = self._recompile()
                self.monitor = RecompileMonitor(self.compiled, enforce=self.config.enforce, name=describe_callable(self.model))
                self._expect_backed_graph(num_tokens)
                self._mark_tokens(arguments, num_tokens)
                return self.monitor(*bound.args, **bound.kwargs)

    def _expect_backed_graph(self, num_tokens: int) -> None:
        """A backed token dim cannot hold T=1 (Dynamo specialises sizes 0/1), so T=1 and T >= 2 get
        one graph each: the first call of each kind is warmup, not a recompile."""
        kind = min(num_tokens, 2)
        if self.dynamic_dim != "backed" or kind in self._backed_kinds:
            return
        if self._backed_kinds:
            log.info("%s: compiling its T=%s graph (backed token dim; warmup, not a recompile)",
                     describe_callable(self.model), "1" if kind < 2 else ">=2")
            self.monitor.warmed_up = False
        self._backed_kinds.add(kind)

    def _mark_tokens(self, arguments: dict[str, Any], num_tokens: int) -> None:
        mode = "unbacked" if self.dynamic_dim == "auto" else self.dynamic_dim
        layout = self._layout
        for name, dim in layout.dims.items():  # type: ignore[union-attr]
            value = layout.leaf(arguments, name)  # type: ignore[union-attr]
            if isinstance(value, torch.Tensor) and self._fits(name, value, dim, num_tokens):
                # Mark a new tensor object (same storage): the caller's tensor keeps no Dynamo marks.
                value = value.detach()
                layout.replace(arguments, name, value)  # type: ignore[union-attr]
                mark_token_dim(value, dim, mode)
        if not self._stable:
            return
        device = self._device(arguments)
        for name, tree in self._stable.items():
            arguments[name] = tree.fill(arguments.get(name), num_tokens, device)
            for tensor, dim in tree.leaves(arguments[name]):
                mark_token_dim(tensor, dim, mode)

    def _fits(self, name: str, value: torch.Tensor, dim: int, num_tokens: int) -> bool:
        """Whether a token input has T rows at its dim; marking one that does not would tie a
        different size to the token symbol, which Dynamo cannot guard (it asserts)."""
        if value.dim() > dim and value.shape[dim] == num_tokens:
            return True
        if name not in self._unmarked:
            self._unmarked.add(name)
            log.warning("%s: token input %s has shape %s, not T=%d rows at dim %d; passed unmarked (Dynamo "
                        "compiles it static). If it is not a token input, name the real ones: token_inputs=%s",
                        describe_callable(self.model), name, tuple(value.shape), num_tokens, dim,
                        {n: d for n, d in self._layout.dims.items() if n != name})  # type: ignore[union-attr]
        return False

    def _device(self, arguments: Mapping[str, Any]) -> torch.device:
        if isinstance(self.model, torch.nn.Module):
            for tensor in self.model.parameters():
                return tensor.device
            for tensor in self.model.buffers():
                return tensor.device
        return self._layout.leaf(arguments, self._layout.primary).device  # type: ignore[union-attr]

    def _check_names(self, token_inputs: Mapping[str, int] | None) -> None:
        params = self._signature.parameters
        names = list(self._stable) + list(token_inputs or {})
        unknown = [n for n in names if n not in params]
        if unknown:
            raise ConfigError(f"{unknown} are not parameters of {describe_callable(self.model)}.forward"
                              f"{self._signature}; stable_kwargs and token_inputs name forward's arguments")

    def __getattr__(self, name: str) -> Any:
        if name.startswith("_") or name in ("model",):
            raise AttributeError(name)
        if name == "generate" and hasattr(self.model, "generate"):
            raise ConfigError(
                f"torchpcg.compile({describe_callable(self.model)}).generate would be the model's own generate(), "
                "which calls the uncompiled model: compile the bound forward instead, "
                "model.forward = torchpcg.compile(model.forward), then call model.generate(...) (docs/models.md)")
        return getattr(self.model, name)

    def __repr__(self) -> str:
        return f"StableModel({describe_callable(self.model)}, dynamic_dim={self.dynamic_dim!r}, stable_kwargs={list(self._stable)})"


def _is_data_dependent(exc: BaseException) -> bool:
    """Dynamo could not trace an unbacked size (a guard on a data-dependent expression)."""
    text = f"{type(exc).__name__}: {exc}"
    return "data-dependent" in text or "DataDependent" in text or "unbacked" in text.lower()


def compile_model(
    model: Callable[..., Any],
    config: PiecewiseConfig | None = None,
    *,
    backend: str | Callable[..., Any] = "piecewise",
    stable_kwargs: Mapping[str, StableSpec] | None = None,
    token_inputs: Mapping[str, int] | None = None,
    inference_mode: bool = False,
    dynamic_dim: str = "auto",
    fullgraph: bool = True,
    **knobs: Any,
) -> StableModel:
    """``torchpcg.compile`` of a plain model (not a vision-language model): the whole callable, guard-stable.

    Same arguments and behaviour as ``torchpcg.compile`` (``front.compile``, where they are
    described), which lands here for every model ``vlm.is_vlm`` rejects; ``vlm.compile_vlm``
    calls it for a VLM's language model and ``vision.PiecewiseEncoder`` for a vision encoder.

    Example::

        compiled = compile_model(model, backend="eager", token_inputs={"x": 0})
        out = compiled(x)                     # forward under no_grad, x's dim 0 dynamic

    Note: it never checks for a VLM: a VLM passed here is compiled whole, vision tower included.
    """
    check_dynamic_dim(dynamic_dim)
    resolved = _resolve_config(config, backend, knobs)

    def compile_fresh() -> Callable[..., Any]:
        kwargs: dict[str, Any] = {"backend": backend, "fullgraph": fullgraph}
        if backend == "piecewise":  # registered by `import torchpcg`
            kwargs["options"] = {**resolved.to_dict(), **_guard_filter(resolved)}  # torch.compile pops the filter
        return torch.compile(model, **kwargs)

    compiled = compile_fresh()
    return StableModel(model, compiled, resolved, stable_kwargs=dict(stable_kwargs or {}),
                       recompile=compile_fresh,
                       token_inputs=token_inputs, inference_mode=inference_mode, dynamic_dim=dynamic_dim,
                       # Piecewise: room for the largest bucket up front; otherwise grow with traffic.
                       initial_tokens=resolved.largest_bucket if backend == "piecewise" else 1)


def _guard_filter(config: PiecewiseConfig) -> dict[str, Any]:
    """``{"guard_filter_fn": ...}`` for ``skip_module_guards``, where this torch has the filter."""
    if not config.skip_module_guards:
        return {}
    skip = getattr(torch.compiler, "skip_guard_on_all_nn_modules_unsafe", None)
    if skip is None:
        log.warning("skip_module_guards=1 needs torch.compiler.skip_guard_on_all_nn_modules_unsafe "
                    "(torch >= 2.7); torch %s checks every guard", torch.__version__)
        return {}
    return {"guard_filter_fn": skip}


def _resolve_config(config: PiecewiseConfig | None, backend: Any, knobs: Mapping[str, Any]) -> PiecewiseConfig:
    if config is not None and not isinstance(config, PiecewiseConfig):
        raise ConfigError(f"config={config!r}: expected a torchpcg.PiecewiseConfig or None")
    if backend != "piecewise":
        backend_only = sorted(k for k in knobs if k != "enforce")
        if backend_only:
            raise ConfigError(f"knobs {backend_only} only apply to backend='piecewise'; backend={backend!r} "
                              "takes no torchpcg options (only enforce=)")
    base = config if config is not None else PiecewiseConfig.resolve()
    return base.replace(**knobs) if knobs else base
