"""Process-wide counters: what was compiled, captured, replayed and what fell back.

In: increments from every stage. Out: ``stats()`` snapshots that users read and tests assert on,
via ``expect(**deltas)``.
"""
from __future__ import annotations

import collections
import contextlib
import threading
from collections.abc import Iterator
from typing import Any

__all__ = ["stats", "reset_stats", "expect", "COUNTER_KEYS", "HOST_WINDOW"]

COUNTER_KEYS = (
    "dynamo_graphs",  # backend invocations (one per Dynamo graph compiled with backend="piecewise")
    "pieces",  # compute pieces made by splitting
    "split_ops",  # split pieces (ops run eagerly between graph replays)
    "captured",  # (piece, bucket) graphs captured (real or emulated)
    "replays",  # graph replays
    "eager_runs",  # calls run without graphs and without compiled code: pieces compiled with compiler="eager"
    # (their FX code), a VLM's language model run uncompiled after a fallback
    "graphless_runs",  # calls run by Inductor-compiled code without graphs: T above the largest bucket, graphs
    # off, a dropped bucket, and in full_and_piecewise mode the first call of each T <= full_max_size (its warm-up)
    "copied_bytes",  # bytes copied into graphs' static input buffers by replays (token inputs, copied inputs):
    # a weight or cache copied on every replay shows here, graph_calls apart it grows per call
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
    "late_compile_ms",  # wall time of those compiles, ms (exact-size code for compile_sizes included)
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

HOST_WINDOW = 256  # calls that stats()["host_us"] averages over


class _HostTimes:
    """Host time of the last ``HOST_WINDOW`` compiled calls, split around their graph replays.

    Per call, from the runtime's entry to its return (Dynamo's guard check before it is not
    included): ``before`` the first replay's launch (bucket choice, address check, input copies of
    the first piece), ``replays`` (inside ``replay()`` calls), ``between`` the first launch and the
    last replay's return less ``replays`` (split ops run eagerly, later pieces' input copies),
    ``after`` the last replay (output slicing and cloning). A call without graphs counts whole in
    ``before``. Slow first calls at new token counts show up as a large ``between`` and ``max``.
    """

    def __init__(self) -> None:
        self._calls: collections.deque[tuple[int, int, int, int, int]] = collections.deque(maxlen=HOST_WINDOW)

    def note(self, started: int, first_replay: int, replay_ns: int, last_replay: int, ended: int) -> None:
        """Record one call from ``time.perf_counter_ns`` stamps (``first_replay`` 0: no replay)."""
        if not first_replay:
            self._calls.append((ended - started, ended - started, 0, 0, 0))
            return
        self._calls.append((ended - started, first_replay - started, replay_ns,
                            last_replay - first_replay - replay_ns, ended - last_replay))

    def summary(self) -> dict[str, float]:
        """Means in µs over the window (``calls`` of them) and the slowest call's total."""
        calls = list(self._calls)  # deque append is atomic; a copy for a stable read
        if not calls:
            return {"calls": 0}
        n = len(calls)
        sums = [sum(column) for column in zip(*calls)]
        out: dict[str, float] = {"calls": n}
        for name, total in zip(("total", "before", "replays", "between", "after"), sums):
            out[name] = round(total / n / 1e3, 1)
        out["max"] = round(max(c[0] for c in calls) / 1e3, 1)
        return out

    def reset(self) -> None:
        self._calls.clear()


HOST_TIMES = _HostTimes()


def stats() -> dict[str, Any]:
    """Return a snapshot of torchpcg's process-wide counters.

    Example::

        >>> import torchpcg
        >>> sorted(torchpcg.stats())[:3]
        ['capture_failures', 'capture_sizes', 'captured']

    Keys: ``dynamo_graphs``, ``pieces``, ``split_ops``, ``captured``, ``replays``, ``eager_runs``,
    ``graphless_runs``, ``copied_bytes``,
    ``graph_calls``, ``full_graph_calls``, ``recompiles``, ``fallbacks``, ``capture_failures``, ``recaptures``,
    ``graphless_pieces``, ``real_tokens``, ``padded_tokens`` (ints), ``capture_sizes``
    (sorted list of bucket sizes captured at least once) and ``host_us``: host time per call over
    the last 256 calls, in µs, split around the graph replays (``calls``, ``total``, ``before``,
    ``replays``, ``between``, ``after``, ``max``; see ``_HostTimes``).

    Note: counters are process-wide, shared by every compiled model; call ``reset_stats()``
    between measurements.
    """
    snap = COUNTERS.snapshot()
    snap["host_us"] = HOST_TIMES.summary()
    return snap


def reset_stats() -> None:
    """Zero every counter returned by ``stats()`` and forget the host times."""
    COUNTERS.reset()
    HOST_TIMES.reset()


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
