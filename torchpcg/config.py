"""Every torchpcg knob in one validated dataclass.

In: ``options=`` dicts, ``TORCHPCG_*`` environment variables, keyword arguments. Out: a frozen
``PiecewiseConfig``. Precedence: ``options=`` / keywords > environment > defaults. Environment
variables are read here and nowhere else.
"""
from __future__ import annotations

import dataclasses
import difflib
import logging
import os
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from .errors import ConfigError

__all__ = ["PiecewiseConfig", "default_capture_sizes", "format_sizes", "CUDAGRAPH_MODES", "GRAPH_MODES", "COMPILERS",
           "SDPA_ORDERS"]

log = logging.getLogger(__name__)

ENV_PREFIX = "TORCHPCG_"
CUDAGRAPH_MODES = ("auto", "cuda", "emulate", "off")
GRAPH_MODES = ("piecewise", "full_and_piecewise")
COMPILERS = ("inductor", "eager")
SDPA_ORDERS = ("auto", "torch")
_TRUE = ("1", "true", "yes", "on")
_FALSE = ("0", "false", "no", "off", "")


def default_capture_sizes(max_capture_size: int) -> tuple[int, ...]:
    """The default bucket schedule: 1, 2, 4, 8, every 8 to 256, every 32 to the max.

    Example::

        >>> default_capture_sizes(40)
        (1, 2, 4, 8, 16, 24, 32, 40)

    Small steps where decode lives (each padded token costs a full layer of work there), coarser
    steps for prefill-sized calls where the launch overhead graphs remove is already amortised.
    """
    sizes = [1, 2, 4] + list(range(8, 257, 8)) + list(range(288, max(max_capture_size, 288) + 1, 32))
    capped = [s for s in sizes if s <= max_capture_size]
    if max_capture_size not in capped:
        capped.append(max_capture_size)  # the max itself is always a bucket
    return tuple(capped)


def format_sizes(sizes: Iterable[int]) -> str:
    """A bucket list for logs and reports: short lists whole, long ones as '[1, 2, 4, ..., 512] (43 sizes)'."""
    sizes = list(sizes)
    if not sizes:
        return "none"
    if len(sizes) <= 10:
        return str(sizes)
    return f"[{sizes[0]}, {sizes[1]}, {sizes[2]}, ..., {sizes[-1]}] ({len(sizes)} sizes)"


@dataclasses.dataclass(frozen=True)
class PiecewiseConfig:
    """Every knob of the piecewise backend.

    Each field is also an ``options=`` key, a ``torchpcg.compile(**knobs)`` keyword and a
    ``TORCHPCG_<FIELD>`` environment variable.

    Example::

        >>> cfg = PiecewiseConfig.resolve({"capture_sizes": "1,2,4", "cudagraph": "emulate"})
        >>> cfg.buckets
        (1, 2, 4)

    Note: building a config validates it; it never reads the environment unless you call
    ``from_env()`` or ``resolve()``.
    """

    capture_sizes: tuple[int, ...] | None = None
    """Token buckets to capture; ``None`` = ``default_capture_sizes(max_capture_size)``.
    Sorted, deduplicated, sizes above ``max_capture_size`` dropped."""

    max_capture_size: int = 512
    """Largest bucket. Calls with more tokens run the compiled pieces without graphs."""

    split_ops: tuple[str, ...] = ()
    """Extra split ops as ``"ns::op"`` or ``"ns::op.overload"``, added to the built-in set."""

    split_collectives: bool = True
    """Cut at functional collectives (they run eagerly) or keep them inside graphs."""

    compiler: str = "inductor"
    """Piece compiler: ``inductor`` (dynamic-shape compiles per piece, see ``backed_compile``) or ``eager``."""

    backed_compile: bool = True
    """With Inductor, compile each piece with the token count *backed* (an ordinary dynamic size),
    to serve T = 2 .. the largest bucket and larger T as far as its guards are proven (full graphs:
    2 .. ``full_max_size``), and for T=1's exact shapes on its first call: Inductor fuses more than
    around Dynamo's unbacked size. Backed code is kept only where every size assumption it made
    holds; Dynamo's own compile waits for a call that nothing else serves. Off: Dynamo's compile
    serves every T (one compile per distinct piece)."""

    cudagraph: str = "auto"
    """``auto`` (real graphs on CUDA, none on CPU), ``cuda``, ``emulate`` (CPU stand-in with
    the same static-buffer semantics) or ``off``."""

    copy_outputs: bool = True
    """Clone final outputs so the next call cannot overwrite them."""

    enforce: bool = False
    """Raise instead of falling back (no split point, capture failure, recompile after warmup)."""

    debug_dir: str | None = None
    """Dump split plan, piece code and decompiled bytecode here."""

    verify: bool = False
    """On the first use of each bucket, run every piece padded and exact and compare real rows."""

    cudagraph_mode: str = "piecewise"
    """``piecewise``: graphs between split ops. ``full_and_piecewise``: calls of T <= ``full_max_size``
    tokens replay one whole-forward graph (split ops inside, no padding) when every split op is
    capturable; other calls use piecewise graphs."""

    full_max_size: int = 8
    """Largest token count served by a whole-forward graph in ``full_and_piecewise`` mode; one
    graph per exact T from 1 to this."""

    skip_module_guards: bool = False
    """``torchpcg.compile`` only: drop Dynamo's per-call guards on the model's parameters and buffers
    (``torch.compiler.skip_guard_on_all_nn_modules_unsafe``). Saves their check on every call; only
    for models whose parameters keep their dtype, shape and device after compiling (a moved
    parameter is still caught by address)."""

    skip_guard_check: bool = False
    """``torchpcg.compile`` only: after warm-up, run Dynamo's compiled forward directly, without
    Dynamo's frame hook and guard check, while each call's argument dtypes, devices, sizes (token
    dims aside) and plain values match the warm-up call's (``torchpcg.direct``). Unsafe if the
    model's parameters, submodules or attributes are replaced after warm-up; for serving loops."""

    guarded_direct: bool = True
    """``torchpcg.compile`` only: after warm-up, evaluate Dynamo's own guards of the compiled entry
    (its C++ guard manager) and, when they pass, call Dynamo's compiled forward directly: the same
    checks as a call through ``torch.compile``, without Dynamo's frame hook, the token marking and
    the recompile monitor around it (``torchpcg.direct``). A failing guard sends the call through
    Dynamo. Off: every call goes through ``torch.compile``'s function."""

    max_autotune: bool = False
    """Compile pieces with Inductor's max-autotune (slower compile, tuned kernels). Also set by
    ``torch.compile(..., mode="max-autotune")``."""

    max_address_sets: int = 32
    """Sets of read-in-place input addresses one Dynamo graph keeps graphs for. One compiled frame
    can serve many layers or experts (after a graph break inside a layer), each call with other
    weights: each set gets its own graphs, captured lazily; past this many, the least recently
    used set's graphs are dropped (``address_sets``)."""

    cache_in_graphs: bool = False
    """Per-request state (``mark_static_address`` tensors that the graph writes and that are neither
    parameters nor buffers: a static KV cache) read in place inside the graphs. Off (default): the
    ops that read it run eagerly beside the attention and its small counters are copied, so a new
    cache per request (transformers' default for a static cache) needs no new graphs. On: a little
    less host work per call when one cache lives for the process (reset in place); every new cache
    object is then a new address set, captured again."""

    sdpa_order: str = "auto"
    """``auto``: while a compiled call runs on a CUDA device, ``scaled_dot_product_attention`` tries
    cuDNN attention last, after flash and memory-efficient attention. Split ops run eagerly at every
    real token count, and cuDNN builds a plan per new shape (35 ms each on an H100): under mixed
    traffic that made every call as slow as eager (``torchpcg.sdpa``). ``torch``: leave SDPA's order
    as torch and the caller set it."""

    compile_sizes: tuple[int, ...] = (1,)
    """Token counts whose pieces get code compiled for exactly that size (static shapes: Inductor
    fuses and picks kernels for the known size), on the first call at that size, which is the
    warm-up before capture; other sizes run the code compiled with T dynamic. Only sizes that are
    also capture sizes reach graphs; another size serves calls without graphs at exactly that T.
    Needs Inductor pieces with T unbacked (the default); ``torchpcg.stats()["late_compiles"]``
    counts the compiles, the FX graph cache keeps them for the next process."""

    compile_sizes_autotune: bool = False
    """Compile the ``compile_sizes`` code with Inductor's max-autotune and coordinate-descent
    tuning (slower compile, tuned kernels); the other sizes' code as ``max_autotune`` says."""

    direct_ops: bool = True
    """Split ops defined with ``torch.library.custom_op`` that have one implementation for every
    device and no other registration are called as their Python body between graphs, without the
    dispatcher and the custom-op wrapper (tens of µs per layer and call; ``torchpcg.op_calls``).
    Off: every split op is called through ``torch.ops``."""

    def __post_init__(self) -> None:
        _check_positive("max_capture_size", self.max_capture_size)
        if self.compiler not in COMPILERS:
            raise ConfigError(f"compiler={self.compiler!r}: expected one of {', '.join(COMPILERS)}")
        _check_positive("full_max_size", self.full_max_size)
        _check_positive("max_address_sets", self.max_address_sets)
        for size in self.compile_sizes:
            _check_positive("compile_sizes", size)
        object.__setattr__(self, "compile_sizes", tuple(sorted(set(self.compile_sizes))))
        if self.cudagraph_mode not in GRAPH_MODES:
            raise ConfigError(f"cudagraph_mode={self.cudagraph_mode!r}: expected one of {', '.join(GRAPH_MODES)}")
        if self.sdpa_order not in SDPA_ORDERS:
            raise ConfigError(f"sdpa_order={self.sdpa_order!r}: expected one of {', '.join(SDPA_ORDERS)}")
        if self.cudagraph not in CUDAGRAPH_MODES:
            raise ConfigError(f"cudagraph={self.cudagraph!r}: expected one of {', '.join(CUDAGRAPH_MODES)}")
        if self.capture_sizes is not None:
            for size in self.capture_sizes:
                _check_positive("capture_sizes", size)
            kept = tuple(sorted({s for s in self.capture_sizes if s <= self.max_capture_size}))
            if not kept:
                raise ConfigError(
                    f"capture_sizes={list(self.capture_sizes)}: every size is above "
                    f"max_capture_size={self.max_capture_size}; raise TORCHPCG_MAX_CAPTURE_SIZE or pick smaller sizes"
                )
            if len(kept) < len(set(self.capture_sizes)):
                log.warning("capture_sizes above max_capture_size=%d dropped: %s", self.max_capture_size,
                            sorted(s for s in set(self.capture_sizes) if s > self.max_capture_size))
            object.__setattr__(self, "capture_sizes", kept)
        for op in self.split_ops:
            if not isinstance(op, str) or "::" not in op:
                raise ConfigError(f"split_ops entry {op!r}: expected 'namespace::op' or 'namespace::op.overload'")

    @property
    def buckets(self) -> tuple[int, ...]:
        """The bucket sizes in force, ascending."""
        if self.capture_sizes is not None:
            return self.capture_sizes
        return default_capture_sizes(self.max_capture_size)

    @property
    def largest_bucket(self) -> int:
        return self.buckets[-1]

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> PiecewiseConfig:
        """Defaults overridden by every ``TORCHPCG_<FIELD>`` variable that is set."""
        return cls(**_env_overrides(os.environ if environ is None else environ))

    @classmethod
    def resolve(cls, options: Mapping[str, Any] | None = None,
                environ: Mapping[str, str] | None = None) -> PiecewiseConfig:
        """Merge ``options`` (highest), the environment, then defaults; validate everything."""
        merged = _env_overrides(os.environ if environ is None else environ)
        merged.update(parse_options(options or {}))
        return cls(**merged)

    def replace(self, **changes: Any) -> PiecewiseConfig:
        """A copy with some knobs changed (values parsed like ``options=``)."""
        return dataclasses.replace(self, **parse_options(changes))

    def to_dict(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}


# ---- parsing -------------------------------------------------------------------------------------

def _check_positive(name: str, value: Any) -> None:
    if not _is_positive_int(value):
        raise ConfigError(f"{name}={value!r}: expected a positive integer")


def _parse_int(source: str, raw: Any) -> int:
    if isinstance(raw, bool):
        raise ConfigError(f"{source}={raw!r}: expected a positive integer, e.g. 512")
    try:
        value = int(raw.strip()) if isinstance(raw, str) else int(raw)
    except (TypeError, ValueError):
        raise ConfigError(f"{source}={raw!r}: expected a positive integer, e.g. 512") from None
    if value <= 0 or (not isinstance(raw, str) and value != raw):
        raise ConfigError(f"{source}={raw!r}: expected a positive integer, e.g. 512")
    return value


def _parse_sizes(source: str, raw: Any) -> tuple[int, ...] | None:
    if raw is None:
        return None
    items: Iterable[Any] = raw.split(",") if isinstance(raw, str) else raw
    try:
        sizes = tuple(_parse_int(source, item) for item in items)
    except (ConfigError, TypeError):
        raise ConfigError(f"{source}={raw!r}: expected comma-separated positive ints, e.g. '1,2,4,8'") from None
    if not sizes:
        raise ConfigError(f"{source}={raw!r}: expected at least one size, e.g. '1,2,4,8'")
    return sizes


def _parse_compile_sizes(source: str, raw: Any) -> tuple[int, ...]:
    """Like capture sizes, but empty means none (``TORCHPCG_COMPILE_SIZES=""``: no exact-size code)."""
    if raw is None or (isinstance(raw, str) and not raw.strip()) or (isinstance(raw, (tuple, list)) and not raw):
        return ()
    return _parse_sizes(source, raw) or ()


def _parse_bool(source: str, raw: Any) -> bool:
    if isinstance(raw, bool):
        return raw
    if isinstance(raw, int) and raw in (0, 1):
        return bool(raw)
    if isinstance(raw, str) and raw.strip().lower() in _TRUE + _FALSE:
        return raw.strip().lower() in _TRUE
    raise ConfigError(f"{source}={raw!r}: expected 1 or 0 (also true/false, yes/no, on/off)")


def _parse_choice(choices: tuple[str, ...]) -> Callable[[str, Any], str]:
    def parse(source: str, raw: Any) -> str:
        value = raw.strip().lower() if isinstance(raw, str) else raw
        if value not in choices:
            raise ConfigError(f"{source}={raw!r}: expected one of {', '.join(choices)}")
        return value
    return parse


def _parse_ops(source: str, raw: Any) -> tuple[str, ...]:
    items = raw.split(",") if isinstance(raw, str) else raw
    ops = []
    for item in items:
        name = _op_name(item)
        if name is None:
            raise ConfigError(f"{source}={raw!r}: entry {item!r} is not 'namespace::op', e.g. 'mylib::attention'")
        if name:
            ops.append(name)
    return tuple(ops)


def _op_name(item: Any) -> str | None:
    """'ns::op' for a string, an OpOverload or an OpOverloadPacket; '' for blanks; None if unusable."""
    if isinstance(item, str):
        item = item.strip()
        return item if (not item or "::" in item) else None
    name = getattr(item, "name", None)  # OpOverload.name() -> 'ns::op.overload'
    if callable(name):
        return name()
    qualified = getattr(item, "_qualified_op_name", None)  # OpOverloadPacket
    return qualified if isinstance(qualified, str) else None


def _parse_path(source: str, raw: Any) -> str | None:
    if raw is None or (isinstance(raw, str) and not raw.strip()):
        return None
    if not isinstance(raw, (str, os.PathLike)):
        raise ConfigError(f"{source}={raw!r}: expected a directory path")
    return os.fspath(raw)


_PARSERS: dict[str, Callable[[str, Any], Any]] = {
    "capture_sizes": _parse_sizes,
    "max_capture_size": _parse_int,
    "split_ops": _parse_ops,
    "split_collectives": _parse_bool,
    "compiler": _parse_choice(COMPILERS),
    "cudagraph": _parse_choice(CUDAGRAPH_MODES),
    "copy_outputs": _parse_bool,
    "enforce": _parse_bool,
    "debug_dir": _parse_path,
    "verify": _parse_bool,
    "cudagraph_mode": _parse_choice(GRAPH_MODES),
    "full_max_size": _parse_int,
    "skip_module_guards": _parse_bool,
    "skip_guard_check": _parse_bool,
    "guarded_direct": _parse_bool,
    "backed_compile": _parse_bool,
    "max_autotune": _parse_bool,
    "max_address_sets": _parse_int,
    "cache_in_graphs": _parse_bool,
    "sdpa_order": _parse_choice(SDPA_ORDERS),
    "direct_ops": _parse_bool,
    "compile_sizes": _parse_compile_sizes,
    "compile_sizes_autotune": _parse_bool,
}
assert set(_PARSERS) == {f.name for f in dataclasses.fields(PiecewiseConfig)}


# ---- vision encoders' knobs (torchpcg.vision) ---------------------------------------------------

VIT_GRAPH_MODES = ("off", "piecewise", "full")
_VIT_MODE_ALIASES = {"0": "off", "false": "off", "no": "off", "": "off", "1": "piecewise", "true": "piecewise",
                 "yes": "piecewise", "on": "piecewise"}


def default_vit_capture_sizes() -> tuple[int, ...]:
    """Patch-count buckets: every 64 to 256, then steps of ~1.5x up to 16384 (at most 33% padding).

    Example::

        >>> default_vit_capture_sizes()[:6]
        (64, 128, 192, 256, 384, 512)

    Multiples of 64: every packed length of a 2x2-merging encoder is a multiple of 4, and a bucket
    must be one too. A 448x448 image with 14-pixel patches is 1024 patches; 16 of them 16384.
    """
    return (64, 128, 192, 256, 384, 512, 768, 1024, 1536, 2048, 3072, 4096, 6144, 8192, 12288, 16384)


@dataclasses.dataclass(frozen=True)
class VisionConfig:
    """The vision-encoder knobs.

    Example::

        >>> VisionConfig.resolve({"vit_cuda_graph": "full", "vit_capture_sizes": "64,128"}).buckets
        (64, 128)

    Note: the piecewise backend's own knobs (``cudagraph``, ``compiler``, ``enforce``, ...) stay in
    ``PiecewiseConfig``; ``compile_vision`` takes both.
    """

    vit_cuda_graph: str = "off"
    """``off``: the encoder runs as given. ``piecewise``: piecewise graphs split at the varlen
    attention. ``full``: whole-encoder graphs keyed by (bucket, cu_seqlens)."""

    vit_capture_sizes: tuple[int, ...] | None = None
    """Patch-count buckets; ``None`` = ``default_vit_capture_sizes()``. Calls with more patches
    than the largest run without graphs."""

    vit_max_graphs: int = 32
    """Whole-encoder graphs kept at once (``full`` mode); the least recently used is released."""

    def __post_init__(self) -> None:
        if self.vit_cuda_graph not in VIT_GRAPH_MODES:
            raise ConfigError(f"vit_cuda_graph={self.vit_cuda_graph!r}: expected one of {', '.join(VIT_GRAPH_MODES)} "
                              "(or 0/1)")
        if self.vit_capture_sizes is not None:
            if not self.vit_capture_sizes or any(not _is_positive_int(s) for s in self.vit_capture_sizes):
                raise ConfigError(f"vit_capture_sizes={self.vit_capture_sizes!r}: expected positive ints, e.g. (64, 128)")
            object.__setattr__(self, "vit_capture_sizes", tuple(sorted(set(self.vit_capture_sizes))))
        if not _is_positive_int(self.vit_max_graphs):
            raise ConfigError(f"vit_max_graphs={self.vit_max_graphs!r}: expected a positive integer, e.g. 32")

    @property
    def buckets(self) -> tuple[int, ...]:
        """The patch-count buckets in force, ascending."""
        return self.vit_capture_sizes if self.vit_capture_sizes is not None else default_vit_capture_sizes()

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> VisionConfig:
        """Defaults overridden by every ``TORCHPCG_VIT_*`` variable that is set."""
        return cls.resolve(None, environ)

    @classmethod
    def resolve(cls, options: Mapping[str, Any] | None = None,
                environ: Mapping[str, str] | None = None) -> VisionConfig:
        """Merge ``options`` (highest), the environment, then defaults; validate everything."""
        environ = os.environ if environ is None else environ
        merged: dict[str, Any] = {}
        for name, parse in _VIT_PARSERS.items():
            variable = ENV_PREFIX + name.upper()
            if variable in environ:
                merged[name] = parse(variable, environ[variable])
        for name, raw in (options or {}).items():
            if name not in _VIT_PARSERS:
                raise ConfigError(f"unknown vision option {name!r}; known: {', '.join(sorted(_VIT_PARSERS))}")
            merged[name] = _VIT_PARSERS[name](name, raw)
        return cls(**merged)

    def to_dict(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}

    @staticmethod
    def knob_names() -> tuple[str, ...]:
        """The ``vit_*`` knob names (``options`` keys; ``TORCHPCG_`` + upper case in the environment)."""
        return tuple(_VIT_PARSERS)

    def replace(self, **options: Any) -> VisionConfig:
        """A copy with ``options`` parsed and validated as ``resolve`` does."""
        unknown = sorted(set(options) - set(_VIT_PARSERS))
        if unknown:
            raise ConfigError(f"unknown vision option(s) {unknown}; known: {', '.join(sorted(_VIT_PARSERS))}")
        return dataclasses.replace(self, **{k: _VIT_PARSERS[k](k, v) for k, v in options.items()})


def _is_positive_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value > 0


def _parse_vit_mode(source: str, raw: Any) -> str:
    value = str(raw).strip().lower() if isinstance(raw, (str, bool, int)) else raw
    value = _VIT_MODE_ALIASES.get(value, value) if isinstance(value, str) else value
    if value not in VIT_GRAPH_MODES:
        raise ConfigError(f"{source}={raw!r}: expected one of off, piecewise, full (or 0 = off, 1 = piecewise)")
    return value


def _parse_vit_int(source: str, raw: Any) -> int:
    try:
        value = int(raw.strip()) if isinstance(raw, str) else raw
    except ValueError:
        value = None
    if not _is_positive_int(value):
        raise ConfigError(f"{source}={raw!r}: expected a positive integer, e.g. 32")
    return value


def _parse_vit_sizes(source: str, raw: Any) -> tuple[int, ...] | None:
    if raw is None:
        return None
    items = raw.split(",") if isinstance(raw, str) else raw
    try:
        sizes = tuple(_parse_vit_int(source, item) for item in items)
    except (ConfigError, TypeError):
        sizes = ()
    if not sizes:
        raise ConfigError(f"{source}={raw!r}: expected comma-separated positive ints, e.g. '64,128,256'")
    return sizes


_VIT_PARSERS: dict[str, Callable[[str, Any], Any]] = {
    "vit_cuda_graph": _parse_vit_mode,
    "vit_capture_sizes": _parse_vit_sizes,
    "vit_max_graphs": _parse_vit_int,
}
assert set(_VIT_PARSERS) == {f.name for f in dataclasses.fields(VisionConfig)}


# The vision encoders' variables; every other TORCHPCG_* name that no knob reads is a typo.
OTHER_VARIABLES = tuple(ENV_PREFIX + name.upper() for name in _VIT_PARSERS)
_warned_unknown: set[str] = set()


def _warn_unknown(environ: Mapping[str, str]) -> None:
    """One warning per unknown ``TORCHPCG_*`` variable, naming the closest known one: a misspelled
    ``TORCHPCG_CAPTURE_SIZE`` would otherwise be ignored without a word."""
    known = [ENV_PREFIX + name.upper() for name in _PARSERS] + list(OTHER_VARIABLES)
    for variable in environ:
        if not variable.startswith(ENV_PREFIX) or variable in known or variable in _warned_unknown:
            continue
        _warned_unknown.add(variable)
        close = difflib.get_close_matches(variable, known, n=1, cutoff=0.6)
        log.warning("%s is not a torchpcg variable and is ignored%s", variable,
                    f"; did you mean {close[0]}?" if close else f" (known: {', '.join(sorted(known))})")


def _env_overrides(environ: Mapping[str, str]) -> dict[str, Any]:
    _warn_unknown(environ)
    out = {}
    for name, parse in _PARSERS.items():
        var = ENV_PREFIX + name.upper()
        if var in environ:
            out[name] = parse(var, environ[var])
    return out


def parse_options(options: Mapping[str, Any]) -> dict[str, Any]:
    """Validate ``options=`` keys and values; unknown keys raise with the list of known ones."""
    if not isinstance(options, Mapping):
        raise ConfigError(f"options={options!r}: expected a dict of torchpcg knobs")
    out = {}
    for key, raw in options.items():
        if key not in _PARSERS:
            raise ConfigError(f"unknown torchpcg option {key!r}; known options: {', '.join(sorted(_PARSERS))}")
        out[key] = _parse_sizes(key, raw) if key == "capture_sizes" else _PARSERS[key](key, raw)
    return out


def split_op_name(op: Any) -> str:
    """Normalise an op given as string / OpOverload / OpOverloadPacket to 'ns::op[.overload]'."""
    name = _op_name(op)
    if not name:
        raise ConfigError(f"split op {op!r}: expected an OpOverload, an OpOverloadPacket or 'namespace::op'")
    return name
