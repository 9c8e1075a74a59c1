"""After warm-up, Dynamo's compiled code called without Dynamo (``skip_guard_check``, opt-in).

In: a model that ``torch.compile`` has compiled, and the arguments of a call that ran through
Dynamo. Out: ``DirectCode``, a function object that runs the bytecode Dynamo generated for the
model's forward (it loads the parameters, calls the compiled graph, applies Python side effects)
and takes the same arguments as ``forward``; or the reason it cannot serve this model.

Why: a call through ``torch.compile`` enters Dynamo's frame hook, evaluates the guards of the
cache entry (tensor checks on every parameter and input) and only then runs the compiled code.
Serving engines skip that after warm-up: vLLM swaps the compiled code object into ``forward``
(its "custom dispatcher"). Here the function is a new object built from the compiled code and
the original function's globals and closure, so ``forward`` itself is never modified and other
instances of the class run as before.

What is still checked, per call: the *call key*, which is, for every tensor argument, its dtype,
device, sizes (the token dims left out) and layout (contiguous, or its strides); for every
plain value (int, float, bool, str, None), the value; and three global settings Dynamo guards
on that a serving loop may change (autocast, default dtype, deterministic algorithms). A call
whose key differs from the warm-up call's goes through Dynamo, which may compile again (the
caller then stops calling directly). A parameter or cache whose memory moved is still caught by
the runtime's address check.

What is not checked: parameters or submodules replaced by other objects, attributes the forward
reads, global state Dynamo guards on beyond the three above (grad mode is not among them:
torchpcg.compile sets it on every call), hooks added after warm-up. Hence opt-in, for serving
loops whose model does not change after warm-up.

Used only when the model's forward has exactly one compiled entry (a backed token dim has
two: T=1 and T >= 2), that code calls no resume function (a graph break: resume functions run
uncompiled outside Dynamo's frame hook), the model has no module hooks, and every argument is
a tensor, a plain value, or a dict / list / tuple of those.
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
    """Dynamo's compiled forward as a plain function: call with the forward's own arguments."""

    def __init__(self, function: Callable[..., Any], owner: Any, key: tuple[Any, ...]) -> None:
        self.function = function
        self.owner = owner  # the module (``self`` of forward), or None for a plain function
        self.key = key  # the warm-up call's call_key: calls with another key go through Dynamo

    def __call__(self, args: tuple[Any, ...], kwargs: Mapping[str, Any]) -> Any:
        if self.owner is None:
            return self.function(*args, **kwargs)
        return self.function(self.owner, *args, **kwargs)


def call_key(arguments: Mapping[str, Any], token_dims: Mapping[str, int]) -> tuple[Any, ...] | None:
    """What Dynamo's guards would compare between calls, cheaply; None if an argument is of a kind
    this key cannot describe (an object whose attributes Dynamo guards on, a cache class).

    ``token_dims``: {key: dim} of the token inputs, keys spelled as ``_TokenLayout`` spells them
    (``name``, or ``name['inner']`` for a tensor inside a dict argument).
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


def direct_code(model: Any, key: tuple[Any, ...] | None) -> DirectCode | str:
    """``DirectCode`` for ``model``'s compiled forward, or why there is none (a sentence)."""
    if key is None:
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
    try:
        direct = types.FunctionType(code, function.__globals__, function.__name__, function.__defaults__,
                                    function.__closure__)
    except (TypeError, ValueError) as exc:  # closure cells that do not match the compiled code
        return f"the compiled code cannot be made a function ({exc})"
    direct.__kwdefaults__ = function.__kwdefaults__
    return DirectCode(direct, owner, key)


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
