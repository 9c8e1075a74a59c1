"""Explicit warm-up: capture every bucket of a compiled model before serving, largest first.

In: a model compiled with the piecewise backend and ``make_inputs(num_tokens) -> args``.
Out: graphs captured for each bucket (lazy capture would otherwise do it on first use).
"""
from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable, Sequence
from typing import Any

from .backend import compile_options
from .config import PiecewiseConfig

__all__ = ["capture"]

log = logging.getLogger(__name__)


def capture(compiled: Callable[..., Any], make_inputs: Callable[[int], Sequence[Any]],
            sizes: Iterable[int] | None = None, *, progress: bool = True) -> dict[str, Any]:
    """Call ``compiled(*make_inputs(B))`` for every bucket B, largest first; return a summary.

    Largest first so smaller buckets reuse the memory pool of larger ones. With
    ``cudagraph_mode="full_and_piecewise"`` it also captures the whole-forward graph of every T up to
    ``full_max_size`` (two calls each: warm-up, capture). ``sizes`` defaults to
    the buckets of the compiled model (``compiled.config`` for ``torchpcg.compile`` models, else
    the ``options=`` of a ``torch.compile(..., backend="piecewise")`` model merged with the
    environment, as the backend itself resolves them).

    Example::

        compiled = torch.compile(model, backend="piecewise")
        torchpcg.capture(compiled, lambda n: (ids[:n], pos[:n], cache))

    Note: ``make_inputs`` must give inputs whose side effects are harmless (a scratch KV cache).
    Returns ``{"sizes": [...], "seconds": float}``.
    """
    start = time.perf_counter()
    config = getattr(compiled, "config", None)
    if not isinstance(config, PiecewiseConfig):
        config = PiecewiseConfig.resolve(compile_options(compiled))
    order = sorted(set(sizes) if sizes is not None else config.buckets, reverse=True)
    # Full-decode graphs: one per exact T; T's first call is its warm-up, the second captures it.
    full = list(range(config.full_max_size, 0, -1)) if config.cudagraph_mode == "full_and_piecewise" else []
    done: list[int] = []
    bar = _progress(len(order) + len(full), progress)
    for size in order:
        bar(size)
        _call_at(compiled, make_inputs, size, config)
        done.append(size)
    if len(order) > 1:
        # Plain torch.compile makes a static graph on its first call (the largest size here) and a
        # dynamic one on the second; from then on the dynamic graph serves the largest size too and
        # would capture it on the first call of traffic. One more call captures it now (a replay
        # where the graph serving that size has it already, as with torchpcg.compile).
        _call_at(compiled, make_inputs, order[0], config)
    for size in full:
        bar(size)
        for _ in range(2 - (size in done)):
            compiled(*make_inputs(size))
    bar(None)
    seconds = time.perf_counter() - start
    log.info("captured %d buckets in %.2fs", len(done), seconds)
    return {"sizes": done, "seconds": seconds}


def _call_at(compiled: Callable[..., Any], make_inputs: Callable[[int], Sequence[Any]], size: int,
             config: PiecewiseConfig) -> None:
    """One warm-up call at ``size`` tokens; a failure says which size and how to leave it out.

    The usual cause is a bucket larger than the model can hold (a KV cache of fewer slots than the
    largest bucket: ``index_copy_(): index 256 is out of bounds``). The error keeps its type; the
    size and the fix are added to it (a note on Python 3.11+, a log line before).
    """
    try:
        compiled(*make_inputs(size))
    except Exception as exc:
        hint = (f"torchpcg.capture: the call at T={size} failed; the buckets go up to {config.largest_bucket} "
                f"(max_capture_size={config.max_capture_size}). If the model holds fewer tokens than that (a KV "
                f"cache of fewer slots), set max_capture_size (TORCHPCG_MAX_CAPTURE_SIZE) below what it holds, "
                f"or pass sizes=")
        add_note = getattr(exc, "add_note", None)
        if add_note is not None:
            add_note(hint)
        else:
            log.error("%s", hint)
        raise


def _progress(total: int, enabled: bool) -> Callable[[int | None], None]:
    """A tqdm-style bar on stderr when tqdm is installed and asked for; else a no-op.

    ``step(size)`` before each bucket's calls: the bar names the bucket being captured (a slow
    one, e.g. T=1 compiling its exact-shape code, shows while it runs); ``step(None)`` at the end.
    """
    if not enabled:
        return lambda size: None
    try:
        from tqdm.auto import tqdm
    except ImportError:
        return lambda size: log.debug("capturing bucket %s", size) if size is not None else None
    bar = tqdm(total=total, desc="torchpcg capture", unit="bucket", leave=False)
    started = False

    def step(size: int | None) -> None:
        nonlocal started
        if started:
            bar.update(1)  # the previous bucket is done
        started = True
        if size is None:
            bar.close()
        else:
            bar.set_postfix(capturing=size)
    return step
