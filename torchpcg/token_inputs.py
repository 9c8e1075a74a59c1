"""Token inputs: which arguments carry the token count T, at which dim, and marking them dynamic.

In: one call's arguments by name (dict arguments included: a pipeline stage's proxy tensors) and,
optionally, the user's ``token_inputs={name: dim}``. Out: a ``TokenLayout`` ({key: dim}, the
primary input, how to read and replace each one in a call) and ``mark_token_dim``, which marks a
token dim for Dynamo (unbacked with one shared symbol, or backed).

Why: Dynamo specialises sizes 0 and 1 and compiles every unmarked size static, so a serving model
recompiles on its first T=1 or new-T call unless its token dims are marked from the first compiled
call. Users rarely name them, so they are inferred by shape, with a name rule that keeps per-layer
and per-sequence state (caches, ``*_lens``) out when its size equals T by coincidence.
``stable.StableModel`` and ``explain`` use it. Imports only errors; no CUDA here.
"""
from __future__ import annotations

import copy
import dataclasses
import functools
import inspect
import logging
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import torch

from .errors import ConfigError, StableInputError

__all__ = ["DYNAMIC_DIM_MODES", "TOKEN_SHAPE_ID", "TokenLayout", "check_dynamic_dim", "mark_token_dim",
           "resolve_token_layout", "static_tensor_ids"]

log = logging.getLogger(__name__)

# auto: unbacked, and backed if Dynamo cannot trace an unbacked T (stable.StableModel retries once).
DYNAMIC_DIM_MODES = ("auto", "unbacked", "backed", "off")
TOKEN_SHAPE_ID = "torchpcg_tokens"  # one shared unbacked symbol for every token dim (torch >= 2.13)

# Names of per-layer or per-sequence state: never *inferred* as token inputs, even when a size
# equals T by coincidence (a decode batch has T == number of sequences; a KV cache may have
# T == num_layers rows). Any word of the name, or its last word (``cache_position`` is a token input).
_STATE_WORDS = frozenset({"past", "kv"})
_STATE_LAST_WORDS = frozenset({"cache", "caches", "kvcache", "len", "lens", "lengths", "seqlen", "seqlens",
                               "table", "tables", "loc"})


def check_dynamic_dim(dynamic_dim: str) -> None:
    """Raise ``ConfigError`` unless ``dynamic_dim`` is one of ``DYNAMIC_DIM_MODES``."""
    if dynamic_dim not in DYNAMIC_DIM_MODES:
        raise ConfigError(f"dynamic_dim={dynamic_dim!r}: expected one of {', '.join(DYNAMIC_DIM_MODES)}")


def mark_token_dim(tensor: torch.Tensor, dim: int, mode: str) -> None:
    """Mark ``tensor``'s ``dim`` as the token dim: ``unbacked`` (one shared symbol, T=1 included),
    ``backed`` (``mark_dynamic``: sizes 0/1 stay specialised); any other mode (``off``) leaves it static."""
    if mode == "unbacked":
        _mark_unbacked(tensor, dim)
    elif mode == "backed":
        torch._dynamo.mark_dynamic(tensor, dim)


@functools.lru_cache(maxsize=None)
def _unbacked_marker() -> Callable[[torch.Tensor, int], None]:
    """mark_unbacked with one shared symbol where torch supports ``shape_id`` (2.13), plain before."""
    mark = getattr(torch._dynamo, "mark_unbacked", None) or torch._dynamo.decorators.mark_unbacked
    if "shape_id" in inspect.signature(mark).parameters:
        return functools.partial(mark, shape_id=TOKEN_SHAPE_ID)
    # Without shape_id each tensor gets its own symbol; Dynamo unifies them where they broadcast.
    return mark


def _mark_unbacked(tensor: torch.Tensor, dim: int) -> None:
    _unbacked_marker()(tensor, dim)


@dataclasses.dataclass(frozen=True)
class TokenLayout:
    """Which argument carries the token count and which dims to mark dynamic: {key: dim}.

    A key is an argument's name, or for a tensor inside a dict argument (pipeline-parallel proxy
    tensors) its path spelled ``name['key']`` (nested: ``name['a']['b']``); ``paths`` holds the
    path of every key as a tuple, (name,) for a plain argument.
    """

    primary: str
    dims: dict[str, int]
    paths: dict[str, tuple[str, ...]] = dataclasses.field(default_factory=dict)

    def path(self, key: str) -> tuple[str, ...]:
        return self.paths.get(key, (key,))

    def leaf(self, arguments: Mapping[str, Any], key: str) -> Any:
        """The value at ``key`` (None if the call does not have it)."""
        value: Any = arguments
        for part in self.path(key):
            if not isinstance(value, Mapping):
                return None
            value = value.get(part)
        return value

    def replace(self, arguments: dict[str, Any], key: str, value: Any) -> None:
        """Put ``value`` at ``key``, copying the dicts on its path: the caller's dicts stay as they were."""
        *parents, last = self.path(key)
        target = arguments
        for part in parents:
            target[part] = copy.copy(target[part])  # a new dict of the caller's type, same entries
            target = target[part]
        target[last] = value

    def num_tokens(self, arguments: Mapping[str, Any]) -> int:
        value = self.leaf(arguments, self.primary)
        if not isinstance(value, torch.Tensor):
            raise StableInputError(f"token input {self.primary!r} must be a Tensor on every call, got "
                                   f"{type(value).__name__}")
        return value.shape[self.dims[self.primary]]


def _tensor_leaves(arguments: Mapping[str, Any]) -> Iterator[tuple[str, tuple[str, ...], torch.Tensor]]:
    """(key, path, tensor) of every tensor argument and every tensor inside a dict argument, in
    argument order (Dynamo flattens dict inputs into graph inputs the same way)."""
    def walk(key: str, path: tuple[str, ...], value: Any) -> Iterator[tuple[str, tuple[str, ...], torch.Tensor]]:
        if isinstance(value, torch.Tensor):
            yield key, path, value
        elif isinstance(value, dict):
            for name, item in value.items():
                if isinstance(name, str):
                    yield from walk(f"{key}[{name!r}]", (*path, name), item)

    for name, value in arguments.items():
        yield from walk(name, (name,), value)


def resolve_token_layout(arguments: Mapping[str, Any], token_inputs: Mapping[str, int] | None,
                    stable_names: set[str], static_ids: frozenset[int] = frozenset()) -> TokenLayout:
    """The token inputs of one call: ``token_inputs`` if given, else inferred by shape.

    The rule is in ``compile``'s docstring; tensors inside dict arguments (e.g. a pipeline stage's
    ``{"hidden_states", "residual"}``) are candidates like top-level ones. At T <= 1 shapes cannot
    tell token inputs apart, so only the primary input is returned; ``StableModel`` waits for a
    call with T > 1 instead. ``static_ids``: ``id()`` of the model's parameters and buffers (never
    token inputs).
    """
    if token_inputs:
        return _named_layout(arguments, token_inputs)
    tensors = [(key, path, v) for key, path, v in _tensor_leaves(arguments)
               if path[0] not in stable_names and not _is_static(v, static_ids)]
    if not tensors:
        raise ConfigError("torchpcg.compile found no tensor argument to take the token count from; "
                          "pass token_inputs={'name': dim}")
    primary, primary_path, first = tensors[0]
    # [B, S] integer ids -> tokens on dim 1; flat [T] ids or [T, ...] hidden states -> dim 0.
    dim = 1 if first.dim() == 2 and not first.is_floating_point() else 0
    if first.dim() <= dim:
        raise ConfigError(f"first tensor argument {primary!r} has shape {tuple(first.shape)}: no token dim; "
                          "pass token_inputs={'name': dim}")
    num_tokens = first.shape[dim]
    dims, paths = {primary: dim}, {primary: primary_path}
    if num_tokens <= 1:
        return TokenLayout(primary, dims, paths)  # every [1, ...] tensor would match
    for key, path, value in tensors[1:]:
        token_dim = 0 if value.dim() == 1 else dim  # HF cache_position [S] next to input_ids [B, S]
        if value.dim() > token_dim and value.shape[token_dim] == num_tokens:
            # The name rule reads the innermost name: proxy['kv_cache'] is state like kv_cache.
            if reason := _not_token_reason(path[-1], value, first.dim()):
                log.debug("%s has T=%d rows at dim %d but is not a token input: %s", key, num_tokens,
                          token_dim, reason)
                continue
            dims[key], paths[key] = token_dim, path
    return TokenLayout(primary, dims, paths)


def _named_layout(arguments: Mapping[str, Any], token_inputs: Mapping[str, int]) -> TokenLayout:
    missing = sorted(set(token_inputs) - set(arguments))
    if missing:
        raise ConfigError(f"token_inputs names {missing} are not arguments of forward; arguments: "
                          f"{sorted(arguments)}")
    dims: dict[str, int] = {}
    paths: dict[str, tuple[str, ...]] = {}
    for name, dim in token_inputs.items():
        if isinstance(arguments[name], dict):  # a named dict argument: every tensor in it, at that dim
            leaves = list(_tensor_leaves({name: arguments[name]}))
        else:
            leaves = [(name, (name,), arguments[name])]
        for key, path, _ in leaves:
            dims[key], paths[key] = int(dim), path
    primary = next((k for k in dims if isinstance(TokenLayout(k, dims, paths).leaf(arguments, k), torch.Tensor)),
                   None)
    if primary is None:
        raise ConfigError(f"token_inputs={dict(token_inputs)}: none of them is a Tensor on this call")
    return TokenLayout(primary, dims, paths)


def _is_static(tensor: torch.Tensor, static_ids: frozenset[int]) -> bool:
    """A parameter, a buffer of the model, or marked with ``torch._dynamo.mark_static_address``."""
    if isinstance(tensor, torch.nn.Parameter) or id(tensor) in static_ids:
        return True
    static_type = getattr(torch._dynamo.utils, "get_static_address_type", None)
    return static_type is not None and static_type(tensor) is not None


def _not_token_reason(name: str, tensor: torch.Tensor, primary_ndim: int) -> str:
    """Why a tensor whose size matches T is still not a token input ('' if it is one)."""
    if tensor.dim() > primary_ndim + 1:
        return f"{tensor.dim()} dims, more than the primary input's {primary_ndim} + 1 (a cache, a 4-D mask)"
    words = name.lower().split("_")
    if _STATE_WORDS.intersection(words) or words[-1] in _STATE_LAST_WORDS:
        return "its name says per-layer or per-sequence state (cache, past, kv, *_lens, *_table, ...)"
    return ""


def static_tensor_ids(model: Any) -> frozenset[int]:
    """id() of every parameter and buffer of ``model`` (empty for a plain function)."""
    if not isinstance(model, torch.nn.Module):
        return frozenset()
    return frozenset(id(t) for t in (*model.parameters(), *model.buffers()))
