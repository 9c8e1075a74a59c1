"""After warm-up, Dynamo's compiled code called without Dynamo's frame hook: checked by Dynamo's
own guards (``guarded_direct``, the default) or by an argument key only (``skip_guard_check``,
opt-in).

In: a model that ``torch.compile`` has compiled, and the arguments of a call that ran through
Dynamo. Out: ``DirectCode``, a function object that runs the bytecode Dynamo generated for the
model's forward (it loads the parameters, calls the compiled graph, applies Python side effects)
and takes the same arguments as ``forward``; or the reason it cannot serve this model.

Why: a call through ``torch.compile`` goes through Dynamo's Python wrapper and frame hook, which
evaluates the guards of the cache entry and only then runs the compiled code; torchpcg's wrapper
adds the token marking and the recompile monitor around it. All of it comes before the graph's
launch. Serving engines skip it after warm-up: vLLM swaps the compiled code object into
``forward`` (its "custom dispatcher"), with no guard at all. Here the function is a new object
built from the compiled code and the original function's globals and closure, so ``forward``
itself is never modified and other instances of the class run as before.

**Guarded (default).** Before each direct call, the cache entry's guard manager (Dynamo's C++
guards: every parameter's tensor checks, module hooks, attributes the forward read, global state)
runs on the call's frame locals, ``{"self": model, **bound arguments}``, as the frame hook would
run it. A failing guard sends the call through Dynamo, which compiles again (and direct calls
stop). Same checks as ``torch.compile``; only the machinery around them is gone.

**Unguarded (``skip_guard_check``).** What is checked per call is the *call key*: for every tensor
argument its dtype, device, sizes (the token dims left out) and layout (contiguous, or its
strides); for every plain value (int, float, bool, str, None), the value; and three global
settings Dynamo guards on that a serving loop may change (autocast, default dtype, deterministic
algorithms). Not checked: parameters or submodules replaced by other objects, attributes the
forward reads, other global state (grad mode is set by torchpcg.compile on every call), hooks
added after warm-up. Hence opt-in, for serving loops whose model does not change after warm-up.

Either way a parameter or cache whose memory moved is caught by the runtime's address check.
Used only when the model's forward has exactly one compiled entry (a backed token dim has
two: T=1 and T >= 2), that code calls no resume function (a graph break: resume functions run
uncompiled outside Dynamo's frame hook) and the model has no module hooks; unguarded, also only
when every argument is a tensor, a plain value, or a dict / list / tuple of those.
"""
from __future__ import annotations

import logging
import types
from collections.abc import Callable, Mapping
from typing import Any

import torch

__all__ = ["DirectCode", "call_key", "direct_code"]

log = logging.getLogger(__name__)

_PLAIN = (int, float, bool, str, type(None))


class DirectCode:
    """Dynamo's compiled forward as a plain function: call with the forward's own arguments.

    Which calls it may serve: with ``guard`` (``guarded_direct``), those that pass Dynamo's own
    guards of the compiled entry; without (``skip_guard_check``), those whose ``call_key`` equals
    the warm-up call's.
    """

    def __init__(self, function: Callable[..., Any], owner: Any, key: tuple[Any, ...] | None,
                 guard: Callable[[dict[str, Any]], bool] | None = None) -> None:
        self.function = function
        self.owner = owner  # the module (``self`` of forward), or None for a plain function
        self.key = key  # the warm-up call's call_key: calls with another key go through Dynamo
        self.guard = guard  # Dynamo's guard check of the entry: frame locals -> bool
        self._self_name = function.__code__.co_varnames[0] if owner is not None else None

    def matches(self, arguments: Mapping[str, Any], token_dims: Mapping[str, int]) -> bool:
        """Whether a call with these bound arguments (defaults applied) may run directly."""
        if self.guard is None:
            return call_key(arguments, token_dims) == self.key
        # The frame's locals at entry, as Dynamo's frame hook would hand them to the guards.
        return bool(self.guard({self._self_name: self.owner, **arguments} if self.owner is not None
                               else dict(arguments)))

    def __call__(self, args: tuple[Any, ...], kwargs: Mapping[str, Any]) -> Any:
        if self.owner is None:
            return self.function(*args, **kwargs)
        return self.function(self.owner, *args, **kwargs)


def call_key(arguments: Mapping[str, Any], token_dims: Mapping[str, int]) -> tuple[Any, ...] | None:
    """What Dynamo's guards would compare between calls, cheaply; None if an argument is of a kind
    this key cannot describe (an object whose attributes Dynamo guards on, a cache class).

    ``token_dims``: {key: dim} of the token inputs, keys spelled as ``token_inputs.TokenLayout``
    spells them (``name``, or ``name['inner']`` for a tensor inside a dict argument).
    """
    parts: list[Any] = [_global_state()]
    for name, value in arguments.items():
        if not _describe(name, value, token_dims, parts):
            return None
    return tuple(parts)


def _global_state() -> tuple[Any, ...]:
    """The global settings Dynamo guards on that a serving loop might change between calls."""
    return (torch.is_autocast_enabled("cuda"), torch.is_autocast_enabled("cpu"), torch.get_default_dtype(),
            torch.are_deterministic_algorithms_enabled())


def _describe(key: str, value: Any, token_dims: Mapping[str, int], parts: list[Any]) -> bool:
    if isinstance(value, torch.Tensor):
        sizes = value.shape
        dim = token_dims.get(key)
        if dim is not None and dim < len(sizes):
            sizes = (*sizes[:dim], -1, *sizes[dim + 1:])  # the token count: dynamic in the graph
        # Dynamo guards strides too (symbolically, for a dynamic dim): contiguous tensors share one
        # layout at every T; any other layout is compared as is (a new T then means a new key).
        layout = "contiguous" if value.is_contiguous() else value.stride()
        parts.append((key, value.dtype, value.device, tuple(sizes), layout))
        return True
    if isinstance(value, _PLAIN):
        parts.append((key, type(value), value))
        return True
    if isinstance(value, dict):
        parts.append((key, dict, len(value)))
        return all(_describe(f"{key}[{name!r}]", item, token_dims, parts) for name, item in value.items())
    if isinstance(value, (list, tuple)):
        parts.append((key, type(value), len(value)))
        return all(_describe(f"{key}[{i}]", item, token_dims, parts) for i, item in enumerate(value))
    return False


def direct_code(model: Any, key: tuple[Any, ...] | None, guarded: bool = False) -> DirectCode | str:
    """``DirectCode`` for ``model``'s compiled forward, or why there is none (a sentence).

    ``guarded``: calls are checked by Dynamo's guards of the compiled entry (``key`` unused);
    else by ``key``, the warm-up call's ``call_key``.
    """
    if key is None and not guarded:
        return "an argument is neither a tensor, a plain value nor a container of those"
    owner, function = _forward_of(model)
    if function is None:
        return "its forward is not a plain Python function of its class"
    if owner is not None and _has_hooks(owner):
        return "the model has forward hooks, which a direct call would skip"
    entries = _cache_entries(function.__code__)
    if entries is None:
        return f"torch {torch.__version__} does not list Dynamo's cache entries"
    if len(entries) != 1:
        return f"its forward has {len(entries)} compiled entries; a direct call needs exactly one"
    code = entries[0].code
    if any(name.startswith("__resume_at") for name in code.co_names):
        return "its forward has a graph break (the code after it would run uncompiled)"
    guard = None
    if guarded:
        guard = getattr(getattr(entries[0], "guard_manager", None), "check", None)
        if guard is None:
            return f"torch {torch.__version__} does not expose the guard check of Dynamo's cache entries"
    try:
        direct = types.FunctionType(code, function.__globals__, function.__name__, function.__defaults__,
                                    function.__closure__)
    except (TypeError, ValueError) as exc:  # closure cells that do not match the compiled code
        return f"the compiled code cannot be made a function ({exc})"
    direct.__kwdefaults__ = function.__kwdefaults__
    return DirectCode(direct, owner, key, guard)


def _forward_of(model: Any) -> tuple[Any, types.FunctionType | None]:
    """(self, function) that Dynamo compiled: ``type(model).forward`` for a module, else the function."""
    if isinstance(model, torch.nn.Module):
        if "forward" in vars(model):  # an instance attribute: not the class's function
            return model, None
        function = getattr(type(model), "forward", None)
        return model, function if isinstance(function, types.FunctionType) else None
    return None, model if isinstance(model, types.FunctionType) else None


def _has_hooks(module: torch.nn.Module) -> bool:
    from torch.nn.modules import module as module_module

    own = (module._forward_hooks, module._forward_pre_hooks)
    shared = (getattr(module_module, "_global_forward_hooks", {}), getattr(module_module, "_global_forward_pre_hooks", {}))
    return any(len(hooks) for hooks in (*own, *shared))


def _cache_entries(code: types.CodeType) -> list[Any] | None:
    """Dynamo's compiled entries for ``code`` (each has ``.code``, the generated bytecode)."""
    listing = getattr(torch._C._dynamo.eval_frame, "_debug_get_cache_entry_list", None)
    return None if listing is None else list(listing(code))
