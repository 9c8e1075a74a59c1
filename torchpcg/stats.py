"""Process-wide counters: what was compiled, captured, replayed and what fell back.

In: increments from every stage. Out: ``stats()`` snapshots that users read and tests assert on,
via ``expect(**deltas)``.
"""
from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator
from typing import Any

__all__ = ["stats", "reset_stats", "expect", "COUNTER_KEYS"]

COUNTER_KEYS = (
    "dynamo_graphs",  # backend invocations (one per Dynamo graph compiled with backend="piecewise")
    "pieces",  # compute pieces made by splitting
    "split_ops",  # split pieces (ops run eagerly between graph replays)
    "captured",  # (piece, bucket) graphs captured (real or emulated)
    "replays",  # graph replays
    "eager_runs",  # calls served without graphs (T above the largest bucket, graphs off, fallbacks, and
    # in full_and_piecewise mode the first call of each T <= full_max_size: the full graph's warm-up)
    "graph_calls",  # calls served with graphs
    "full_graph_calls",  # of those, calls served by one whole-forward graph (cudagraph_mode="full_and_piecewise")
    "recompiles",  # Dynamo recompiles of a torchpcg-compiled frame after warmup
    "fallbacks",  # logged fallbacks (capture failure, graphless piece, ...)
    "capture_failures",  # captures that failed (OOM or error) and were dropped
    "recaptures",  # graphs dropped and captured again because a non-token input moved
    "graphless_pieces",  # pieces that never use graphs (second dynamic symbol, ...)
    "late_compiles",  # Inductor code made on a call, after the backend returned: exact-shape code (T=1 of
    # pieces, full graphs' static code), Dynamo's code on its first use (compilers.ExactShapeCode, LazyCode);
    # an identical piece's code reused in-process counts too; flat once warm-up is done
    "real_tokens",  # sum of T over graph calls
    "padded_tokens",  # sum of (bucket - T) over graph calls
)


class _Counters:
    """Thread-safe integer counters plus the set of captured bucket sizes."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._counts: dict[str, int] = dict.fromkeys(COUNTER_KEYS, 0)
        self._capture_sizes: set[int] = set()

    def add(self, key: str, amount: int = 1) -> None:
        assert key in self._counts, f"unknown counter {key!r}"  # our own invariant
        with self._lock:
            self._counts[key] += amount

    def note_capture_size(self, size: int) -> None:
        with self._lock:
            self._capture_sizes.add(size)

    def snapshot(self) -> dict[str, Any]:
        with self._lock:
            snap: dict[str, Any] = dict(self._counts)
            snap["capture_sizes"] = sorted(self._capture_sizes)
        return snap

    def reset(self) -> None:
        with self._lock:
            self._counts = dict.fromkeys(COUNTER_KEYS, 0)
            self._capture_sizes = set()


COUNTERS = _Counters()


def stats() -> dict[str, Any]:
    """Return a snapshot of torchpcg's process-wide counters.

    Example::

        >>> import torchpcg
        >>> sorted(torchpcg.stats())[:3]
        ['capture_failures', 'capture_sizes', 'captured']

    Keys: ``dynamo_graphs``, ``pieces``, ``split_ops``, ``captured``, ``replays``, ``eager_runs``,
    ``graph_calls``, ``full_graph_calls``, ``recompiles``, ``fallbacks``, ``capture_failures``, ``recaptures``,
    ``graphless_pieces``, ``real_tokens``, ``padded_tokens`` (ints) and ``capture_sizes``
    (sorted list of bucket sizes captured at least once).

    Note: counters are process-wide, shared by every compiled model; call ``reset_stats()``
    between measurements.
    """
    return COUNTERS.snapshot()


def reset_stats() -> None:
    """Zero every counter returned by ``stats()``."""
    COUNTERS.reset()


@contextlib.contextmanager
def expect(**deltas: int) -> Iterator[None]:
    """Check that the block changes the named counters by exactly these amounts.

    Example::

        with torchpcg.expect(recompiles=0, eager_runs=1):
            compiled(big_input)

    Raises ``AssertionError`` naming every counter that moved differently. Meant for tests.
    """
    unknown = sorted(set(deltas) - set(COUNTER_KEYS))
    if unknown:
        raise KeyError(f"expect(): unknown counters {unknown}; known: {list(COUNTER_KEYS)}")
    before = COUNTERS.snapshot()
    yield
    after = COUNTERS.snapshot()
    wrong = {k: (v, after[k] - before[k]) for k, v in deltas.items() if after[k] - before[k] != v}
    if wrong:
        detail = ", ".join(f"{k}: expected +{want}, got +{got}" for k, (want, got) in wrong.items())
        raise AssertionError(f"torchpcg counters moved unexpectedly: {detail}")
