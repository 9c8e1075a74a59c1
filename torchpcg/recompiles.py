"""The recompile monitor: every Dynamo recompile after warm-up counted, explained and, under enforce, refused.

In: a ``torch.compile``'d callable (what ``torchpcg.compile`` builds, or any the user passes to
``watch_recompiles``) and Dynamo's guard-failure text. Out: a ``RecompileMonitor``, called like the
callable, whose ``.recompiles`` lists one plain-words message per recompile, each counted in
``stats()["recompiles"]`` and logged once; ``explain_guard_failure`` turns one guard failure into
the fix (``stable_kwargs``, ``token_inputs``, ``no_grad``, ...).

Why: a serving model that recompiles under traffic stalls while Dynamo and the backend compile and
capture again, and Dynamo's guard text (``L['x'] is None``, ``tensor 'x' size mismatch at index 0``)
does not say what to change. Detection reads Dynamo's process-wide counters around each call.
``stable.StableModel`` watches every model it compiles. Imports config, errors and stats; no CUDA
here.
"""
from __future__ import annotations

import inspect
import logging
import re
from collections.abc import Callable, Mapping
from typing import Any

import torch

from .config import PiecewiseConfig
from .errors import RecompileError, TorchPCGError
from .stats import COUNTERS

__all__ = ["RecompileMonitor", "watch_recompiles", "explain_guard_failure", "describe_callable"]

log = logging.getLogger(__name__)


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
    """The name messages give a callable: what ``torch.compile`` wrapped, by qualified name or type."""
    inner = getattr(fn, "_orig_mod", None) or getattr(fn, "_torchdynamo_orig_callable", None) or fn
    return getattr(inner, "__qualname__", None) or type(inner).__name__
