"""Guard-stable compilation: ``StableModel``, ``compile_model`` and the recompile monitor.

In: an ``nn.Module`` (or any callable) and how its inputs vary between calls. Out: a callable with
the model's signature whose Dynamo guards do not change under serving traffic (grad mode, T=1
first, optional kwargs that come and go), plus a monitor that counts, explains and, under
``enforce``, forbids every recompile after the first call.

Four things make Dynamo recompile a serving model, and each has its answer here:

==============================  ===============================================================
guard that flips                what this module does
==============================  ===============================================================
grad mode (GLOBAL_STATE)        forward always runs under ``torch.no_grad()`` / ``inference_mode``
size 0/1 specialisation (T=1)   the token dim is marked *unbacked* from the first compiled call
optional kwarg None <-> Tensor  ``stable_kwargs``: always a slice of a preallocated, zeroed buffer
Python scalar / anything else   not fixable from outside: the monitor names it and the fix
==============================  ===============================================================

``compile_model`` is ``torchpcg.compile`` for a plain model; the public ``torchpcg.compile``
(``front.py``) sends vision-language models to ``vlm.py`` first, which compiles their language
model through ``compile_model``. A front end: imports debug, direct, config, errors and stats,
never vlm, vision, front or explain (they import it). No CUDA here; nothing in this module
captures graphs.
"""
from __future__ import annotations

import copy
import dataclasses
import functools
import inspect
import logging
import re
import threading
from collections.abc import Callable, Iterator, Mapping
from typing import Any, Union

import torch

from .debug import depyf_session
from .direct import DirectCode, call_key, direct_code
from .config import PiecewiseConfig
from .errors import ConfigError, RecompileError, TorchPCGError
from .stats import COUNTERS

__all__ = ["compile_model", "check_dynamic_dim", "StableBuffer", "StableModel", "RecompileMonitor", "watch_recompiles",
           "StableInputError", "describe_callable", "mark_token_dim", "resolve_token_layout"]

log = logging.getLogger(__name__)

DYNAMIC_DIM_MODES = ("auto", "unbacked", "backed", "off")
TOKEN_SHAPE_ID = "torchpcg_tokens"  # one shared unbacked symbol for every token dim (torch >= 2.13)

# Names of per-layer or per-sequence state: never *inferred* as token inputs, even when a size
# equals T by coincidence (a decode batch has T == number of sequences; a KV cache may have
# T == num_layers rows). Any word of the name, or its last word (``cache_position`` is a token input).
_STATE_WORDS = frozenset({"past", "kv"})
_STATE_LAST_WORDS = frozenset({"cache", "caches", "kvcache", "len", "lens", "lengths", "seqlen", "seqlens",
                               "table", "tables", "loc"})


class StableInputError(TorchPCGError, ValueError):
    """A call passed a value that does not fit the StableBuffer declared for it."""


# ---- stable kwargs -------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class StableBuffer:
    """Declares an optional tensor input that must always reach the model as a tensor.

    ``shape`` has exactly one ``-1``: the token dim. torchpcg preallocates a buffer with room for
    the largest token count seen, and every call passes its first ``T`` rows: zeroed when the
    caller gives ``None`` (or leaves the kwarg out), the caller's tensor copied in otherwise.

    Example::

        torchpcg.compile(model, stable_kwargs={
            "input_deepstack_embeds": torchpcg.StableBuffer(shape=(-1, 3 * hidden), dtype=torch.bfloat16)})

    Note: the buffer is reused, so the model must not keep references to the input across calls.
    """

    shape: tuple[int, ...]
    """Full shape with ``-1`` at the token dim, e.g. ``(-1, 3 * hidden)``."""

    dtype: torch.dtype = torch.float32
    """Dtype of the buffer; a caller's tensor must have exactly this dtype."""

    device: torch.device | str | None = None
    """Where to allocate; ``None`` = the model's device (its first parameter or buffer)."""

    def __post_init__(self) -> None:
        shape = tuple(self.shape)
        if shape.count(-1) != 1 or any(not isinstance(s, int) or (s <= 0 and s != -1) for s in shape):
            raise ConfigError(f"StableBuffer(shape={self.shape!r}): expected positive ints and exactly one -1 "
                              "marking the token dim, e.g. (-1, 3 * hidden)")
        if not isinstance(self.dtype, torch.dtype):
            raise ConfigError(f"StableBuffer(dtype={self.dtype!r}): expected a torch.dtype, e.g. torch.float32")
        object.__setattr__(self, "shape", shape)

    @property
    def token_dim(self) -> int:
        return self.shape.index(-1)

    def shape_for(self, num_tokens: int) -> tuple[int, ...]:
        return tuple(num_tokens if s == -1 else s for s in self.shape)


StableSpec = Union[StableBuffer, Mapping[str, "StableSpec"]]


class _StableSlot:
    """The buffer behind one StableBuffer: allocated on first use, grown when T exceeds it."""

    def __init__(self, name: str, spec: StableBuffer, initial_tokens: int) -> None:
        self.name = name
        self.spec = spec
        self.initial_tokens = initial_tokens
        self.buffer: torch.Tensor | None = None  # [.., capacity at token dim, ..]

    @property
    def capacity(self) -> int:
        return 0 if self.buffer is None else self.buffer.shape[self.spec.token_dim]

    def fill(self, value: Any, num_tokens: int, device: torch.device) -> torch.Tensor:
        """The first ``num_tokens`` rows of the buffer, holding ``value`` or zeros."""
        rows = self._rows(num_tokens, device)
        if value is None:
            rows.zero_()  # every pass: a text-only call never sees an earlier call's features
            return rows
        if not isinstance(value, torch.Tensor):
            raise StableInputError(f"stable kwarg {self.name!r}: expected a Tensor or None, got {type(value).__name__}")
        if tuple(value.shape) != tuple(rows.shape) or value.dtype != self.spec.dtype:
            raise StableInputError(
                f"stable kwarg {self.name!r}: got shape {tuple(value.shape)} dtype {value.dtype}, expected shape "
                f"{tuple(rows.shape)} dtype {self.spec.dtype} (StableBuffer shape={self.spec.shape}, "
                f"T={num_tokens}); fix the input or the StableBuffer declaration")
        rows.copy_(value)
        return rows

    def _rows(self, num_tokens: int, device: torch.device) -> torch.Tensor:
        if num_tokens > self.capacity:
            # Growing never recompiles: the slice passed below has the (dynamic) token dim.
            size = max(num_tokens, self.initial_tokens)
            target = torch.device(self.spec.device) if self.spec.device is not None else device
            self.buffer = torch.zeros(self.spec.shape_for(size), dtype=self.spec.dtype, device=target)
        assert self.buffer is not None
        return self.buffer.narrow(self.spec.token_dim, 0, num_tokens)


class _StableTree:
    """A stable kwarg: one slot, or a dict of them (nested optional inputs)."""

    def __init__(self, name: str, spec: StableSpec, initial_tokens: int) -> None:
        self.name = name
        if isinstance(spec, StableBuffer):
            self.slot: _StableSlot | None = _StableSlot(name, spec, initial_tokens)
            self.children: dict[str, _StableTree] = {}
        elif isinstance(spec, Mapping) and spec:
            self.slot = None
            self.children = {str(k): _StableTree(f"{name}[{k!r}]", v, initial_tokens) for k, v in spec.items()}
        else:
            raise ConfigError(f"stable_kwargs[{name!r}]={spec!r}: expected a torchpcg.StableBuffer or a "
                              "non-empty dict of them")

    def fill(self, value: Any, num_tokens: int, device: torch.device) -> Any:
        if self.slot is not None:
            return self.slot.fill(value, num_tokens, device)
        if value is not None and not isinstance(value, Mapping):
            raise StableInputError(f"stable kwarg {self.name!r}: expected a dict of tensors or None, "
                                   f"got {type(value).__name__}")
        given = dict(value or {})
        unknown = sorted(set(given) - set(self.children))
        if unknown:
            raise StableInputError(f"stable kwarg {self.name!r}: keys {unknown} are not declared; declared: "
                                   f"{sorted(self.children)}")
        return {key: child.fill(given.get(key), num_tokens, device) for key, child in self.children.items()}

    def leaves(self, value: Any) -> Iterator[tuple[torch.Tensor, int]]:
        """(tensor, token dim) of every leaf of a filled value."""
        if self.slot is not None:
            yield value, self.slot.spec.token_dim
            return
        for key, child in self.children.items():
            yield from child.leaves(value[key])


# ---- token dims ----------------------------------------------------------------------------------

def mark_token_dim(tensor: torch.Tensor, dim: int, mode: str) -> None:
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
class _TokenLayout:
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
                    stable_names: set[str], static_ids: frozenset[int] = frozenset()) -> _TokenLayout:
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
        return _TokenLayout(primary, dims, paths)  # every [1, ...] tensor would match
    for key, path, value in tensors[1:]:
        token_dim = 0 if value.dim() == 1 else dim  # HF cache_position [S] next to input_ids [B, S]
        if value.dim() > token_dim and value.shape[token_dim] == num_tokens:
            # The name rule reads the innermost name: proxy['kv_cache'] is state like kv_cache.
            if reason := _not_token_reason(path[-1], value, first.dim()):
                log.debug("%s has T=%d rows at dim %d but is not a token input: %s", key, num_tokens,
                          token_dim, reason)
                continue
            dims[key], paths[key] = token_dim, path
    return _TokenLayout(primary, dims, paths)


def _named_layout(arguments: Mapping[str, Any], token_inputs: Mapping[str, int]) -> _TokenLayout:
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
    primary = next((k for k in dims if isinstance(_TokenLayout(k, dims, paths).leaf(arguments, k), torch.Tensor)),
                   None)
    if primary is None:
        raise ConfigError(f"token_inputs={dict(token_inputs)}: none of them is a Tensor on this call")
    return _TokenLayout(primary, dims, paths)


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


def _static_tensor_ids(model: Any) -> frozenset[int]:
    """id() of every parameter and buffer of ``model`` (empty for a plain function)."""
    if not isinstance(model, torch.nn.Module):
        return frozenset()
    return frozenset(id(t) for t in (*model.parameters(), *model.buffers()))


# ---- recompile monitor ---------------------------------------------------------------------------

def _unique_graphs() -> int:
    """Dynamo's own count of graphs compiled in this process (every torch version we support)."""
    return torch._dynamo.utils.counters["stats"]["unique_graphs"]


def _guard_failure_lengths() -> dict[Any, int]:
    failures = getattr(torch._dynamo.guards, "guard_failures", {})
    return {code: len(reasons) for code, reasons in list(failures.items())}


def _new_guard_failures(before: Mapping[Any, int], code: Any) -> list[str]:
    """Guard failure reasons Dynamo recorded since ``before``; those of ``code`` first if present."""
    failures = getattr(torch._dynamo.guards, "guard_failures", {})
    fresh = {c: list(r[before.get(c, 0):]) if len(r) >= before.get(c, 0) else list(r)
             for c, r in list(failures.items())}
    fresh = {c: r for c, r in fresh.items() if r}
    if code in fresh:
        return fresh[code]
    return [reason for reasons in fresh.values() for reason in reasons]


_STANCE_ERROR = "fail_on_recompile"


def _reasons_from_stance_error(err: BaseException) -> list[str]:
    """Parse '- 0/0: <reason>' lines from torch's fail_on_recompile message."""
    text = str(err)
    _, _, tail = text.partition("guard failure(s):")
    reasons = []
    for line in tail.splitlines():
        line = line.strip()
        if line.startswith("- ") and re.match(r"-\s+\d+/\d+:", line):
            reasons.append(line[2:])
    return reasons


def _clean_reason(reason: str) -> str:
    """'0/1: L['x'] is None   # code comment' -> "x is None"."""
    first = reason.strip().splitlines()[0] if reason.strip() else reason
    first = re.sub(r"^\[?\d+/\d+\]?:\s*", "", first)
    first = first.split("  #")[0].strip()
    return re.sub(r"L\['([^']+)'\]", r"\1", first)


def _plain_name(expr: str) -> str:
    """"kwargs['x']" or "x" -> "x"."""
    inner = re.findall(r"\['([^']+)'\]", expr)
    return inner[-1] if inner else expr.strip()


def explain_guard_failure(reason: str, arguments: Mapping[str, Any] | None = None) -> str:
    """Turn one Dynamo guard failure into plain words and a fix.

    Example::

        >>> explain_guard_failure("0/0: GLOBAL_STATE changed: grad_mode ")
        'grad mode changed: call through torchpcg.compile or wrap in torch.no_grad()'

    ``arguments`` (name -> value of the call that recompiled) lets scalar messages say the new value.
    """
    text = _clean_reason(reason)
    arguments = arguments or {}
    if text.startswith("GLOBAL_STATE changed"):
        what = text.partition(":")[2].strip() or "unknown"
        if "grad_mode" in what:
            return "grad mode changed: call through torchpcg.compile or wrap in torch.no_grad()"
        return (f"global torch state changed ({what}): keep it identical on every call "
                "(autocast, deterministic algorithms, default dtype, ...)")
    if m := re.fullmatch(r"(.+?) is None", text):
        name = _plain_name(m.group(1))
        return f"kwarg {name} was None and is now a Tensor: declare it in stable_kwargs"
    if m := re.match(r"expected type of '(.+?)' to be a tensor type.*NoneType", text):
        name = _plain_name(m.group(1))
        return f"kwarg {name} was a Tensor and is now None: declare it in stable_kwargs"
    if m := re.match(r"tensor '(.+?)' size mismatch at index (\d+)\. expected (\d+), actual (\d+)", text):
        name, dim, expected, actual = _plain_name(m.group(1)), m.group(2), m.group(3), m.group(4)
        if expected in ("0", "1"):
            return (f"size of dim {dim} of {name} specialized to {expected} (now {actual}): Dynamo treats sizes "
                    f"0/1 as constants; pass it through torchpcg.compile (token_inputs={{'{name}': {dim}}}) or "
                    f"torch._dynamo.decorators.mark_unbacked({name}, {dim}) before the first call")
        return (f"size of dim {dim} of {name} changed from {expected} to {actual} and was compiled static: "
                f"mark it dynamic before the first call (torchpcg.compile token_inputs={{'{name}': {dim}}})")
    if m := re.match(r"tensor '(.+?)' dtype mismatch\. expected (\S+), actual (\S+)", text):
        return (f"dtype of {_plain_name(m.group(1))} changed from {m.group(2)} to {m.group(3)}: "
                "cast it to one dtype before calling")
    if m := re.match(r"tensor '(.+?)' requires_grad mismatch", text):
        return (f"requires_grad of {_plain_name(m.group(1))} changed: pass a tensor that does not require grad "
                "(.detach()), or call through torchpcg.compile")
    if m := re.match(r"tensor '(.+?)' (\w+) mismatch", text):
        return (f"{m.group(2)} of tensor {_plain_name(m.group(1))} changed: keep it identical on every call")
    if m := re.fullmatch(r"([\w.\[\]']+) == (.+)", text):  # a name, not len(x) == 3
        name = _plain_name(m.group(1))
        new = arguments.get(name, "another value")
        return f"Python scalar arg {name} changed from {m.group(2)} to {new}: pass it as a tensor"
    return f"guard failed: {text}: keep this input the same kind on every call (see docs/zero-recompiles.md)"


def _original_callable(fn: Callable[..., Any]) -> Callable[..., Any]:
    """The function torch.compile wrapped: an OptimizedModule's forward, or the plain function."""
    module = getattr(fn, "_orig_mod", None)
    if module is not None:
        return getattr(module, "forward", module)
    return getattr(fn, "_torchdynamo_orig_callable", fn)


def _call_arguments(fn: Callable[..., Any], args: tuple, kwargs: dict) -> dict[str, Any]:
    """name -> value of one call, for messages; {} when the signature cannot be read."""
    try:
        bound = inspect.signature(_original_callable(fn)).bind_partial(*args, **kwargs)
    except (TypeError, ValueError):
        return {}
    return dict(bound.arguments)


def _original_code(fn: Callable[..., Any]) -> Any:
    """The code object Dynamo keys this callable's guard failures by, or None."""
    target = _original_callable(fn)
    return getattr(getattr(target, "__func__", target), "__code__", None)


class RecompileMonitor:
    """Wraps a ``torch.compile``'d callable; every recompile after its first call is an event.

    Each event is counted in ``torchpcg.stats()["recompiles"]``, appended to ``.recompiles``
    and logged once per distinct message (WARNING) with the guard that failed and the fix. Under
    ``enforce`` calls after the first run under ``torch.compiler.set_stance("fail_on_recompile")``
    and a recompile raises ``RecompileError`` with the same text instead of compiling.

    Example::

        compiled = torchpcg.watch_recompiles(torch.compile(model, backend="eager"))
        compiled(x)                       # warmup: compiles, not counted
        with torch.enable_grad():
            compiled(x)                   # WARNING ... grad mode changed: ...

    Note: detection reads Dynamo's process-wide counters around each call; a recompile of another
    function in another thread during the call would be attributed to this one.
    """

    def __init__(self, fn: Callable[..., Any], *, enforce: bool = False, name: str | None = None) -> None:
        self.fn = fn
        self.enforce = enforce
        self.name = name or describe_callable(fn)
        self.recompiles: list[str] = []
        self.warmed_up = False
        self._code = _original_code(fn)
        self._failure_marks: dict[Any, int] = {}
        self._logged: set[str] = set()

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        if not self.warmed_up:
            out = self.fn(*args, **kwargs)  # the first compile of the frame is the warmup
            self.warmed_up = True
            self._failure_marks = _guard_failure_lengths()
            return out
        graphs_before = _unique_graphs()
        if self.enforce:
            out = self._call_enforced(args, kwargs)
        else:
            out = self.fn(*args, **kwargs)
        if _unique_graphs() != graphs_before:
            reasons = _new_guard_failures(self._failure_marks, self._code)
            self._failure_marks = _guard_failure_lengths()
            self._record(reasons, args, kwargs)
        return out

    def _call_enforced(self, args: tuple, kwargs: dict) -> Any:
        try:
            with torch.compiler.set_stance(_STANCE_ERROR):
                return self.fn(*args, **kwargs)
        except RuntimeError as err:
            if _STANCE_ERROR not in str(err) or isinstance(err, TorchPCGError):
                raise
            message = self._record(_reasons_from_stance_error(err), args, kwargs)
            raise RecompileError(f"{message} (enforce is on: TORCHPCG_ENFORCE=1 or enforce=True)") from err

    def _record(self, reasons: list[str], args: tuple, kwargs: dict) -> str:
        arguments = _call_arguments(self.fn, args, kwargs)
        # One reason per cached version, newest first (Dynamo's order): the newest is what changed
        # since the last compile; older ones repeat what the monitor already reported.
        plain = [explain_guard_failure(r, arguments) for r in reasons[:1]]
        if not plain:
            plain = ["Dynamo compiled again but recorded no guard failure (new code path or cache eviction); "
                     "run with TORCH_LOGS=recompiles to see why"]
        message = f"{self.name} recompiled after warmup: " + "; ".join(plain)
        self.recompiles.append(message)
        COUNTERS.add("recompiles")
        if message not in self._logged:
            self._logged.add(message)
            log.warning("%s", message)
        return message


def watch_recompiles(fn: Callable[..., Any], *, enforce: bool | None = None, name: str | None = None
                     ) -> RecompileMonitor:
    """Watch a ``torch.compile``'d callable for recompiles after its first call.

    Example::

        watched = torchpcg.watch_recompiles(torch.compile(f, backend="eager", fullgraph=True))
        watched(torch.randn(1, 4)); watched(torch.randn(5, 4))
        watched.recompiles   # ['f recompiled after warmup: size of dim 0 of x specialized to 1 ...']

    ``enforce=None`` reads ``TORCHPCG_ENFORCE``. Note: it does not stabilise anything; use
    ``torchpcg.compile`` for that.
    """
    if enforce is None:
        enforce = PiecewiseConfig.from_env().enforce
    return RecompileMonitor(fn, enforce=enforce, name=name)


def describe_callable(fn: Any) -> str:
    inner = getattr(fn, "_orig_mod", None) or getattr(fn, "_torchdynamo_orig_callable", None) or fn
    return getattr(inner, "__qualname__", None) or type(inner).__name__


# ---- torchpcg.compile ----------------------------------------------------------------------------

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
        self._stable = {name: _StableTree(name, spec, initial_tokens) for name, spec in stable_kwargs.items()}
        self._check_names(token_inputs)
        self._token_inputs = dict(token_inputs) if token_inputs else None
        self._layout: _TokenLayout | None = None
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
                                         _static_tensor_ids(self.model))
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

    def _run_eager(self, layout: _TokenLayout, args: tuple, kwargs: dict) -> Any:
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
        # depyf sees only frames compiled inside its session: wrap the first call (TORCHPCG_DEBUG_DIR).
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


def check_dynamic_dim(dynamic_dim: str) -> None:
    """Raise ``ConfigError`` unless ``dynamic_dim`` is one of ``DYNAMIC_DIM_MODES``."""
    if dynamic_dim not in DYNAMIC_DIM_MODES:
        raise ConfigError(f"dynamic_dim={dynamic_dim!r}: expected one of {', '.join(DYNAMIC_DIM_MODES)}")


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
