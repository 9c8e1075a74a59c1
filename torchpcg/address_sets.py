"""Graphs per set of read-in-place addresses: one compiled frame serving many layers or experts.

A graph reads parameters, buffers and ``mark_static_address`` tensors in place, at the addresses
they had when it was captured. One Dynamo graph can legitimately see several such address sets:
after a graph break inside a layer (a data-dependent MoE dispatch, a ``.item()``) Dynamo compiles
the layer's ``forward`` as a frame of its own and calls it once per layer, each call with another
layer's weights. Treating the second set as "moved" dropped every graph, captured again, and on
the next move copied the weights on every replay.

So each set of addresses keeps its own graphs, like the recordings PyTorch's CUDA graph trees keep
per static-input address set: a call whose addresses match a known set replays that set's graphs
(captured lazily, bucket by bucket, like any graph). The sets are bounded (``max_address_sets``,
least recently used evicted). A *real* move is told apart by the tensors themselves: each set
keeps weak references to the tensors it was made from, and when a new set appears, a known set
whose tensor is gone (a parameter reassigned: ``module.w = nn.Parameter(...)``) or sits elsewhere
now (``w.data = ...``) is stale: its graphs are dropped, and the caller hears which inputs moved.

In: the addresses of a call's read-in-place inputs (a tuple, in the runtime's input order) and the
tensors. Out: the graph dicts (one ``{bucket: captured}`` per piece runner) to use for that call.
"""
from __future__ import annotations

import collections
import dataclasses
import logging
import weakref
from collections.abc import Callable, Sequence
from typing import Any

import torch

__all__ = ["AddressSets"]

log = logging.getLogger(__name__)

Key = tuple  # data_ptr of each read-in-place input, in the runtime's order
Graphs = list  # one {bucket: captured graph} dict per piece runner


@dataclasses.dataclass
class _Set:
    graphs: Graphs
    tensors: tuple[weakref.ReferenceType, ...]  # the inputs this set was made from, weakly


class AddressSets:
    """The known address sets of one runtime and their graphs; see the module docstring."""

    def __init__(self, limit: int, release: Callable[[Graphs], None]) -> None:
        self.limit = limit
        self._release = release  # drops a set's graphs (they never replay again)
        self._sets: collections.OrderedDict[Key, _Set] = collections.OrderedDict()
        self._evicted: collections.OrderedDict[Key, None] = collections.OrderedDict()  # to tell a return
        self.evictions = 0
        self._warned_evicting = False

    def __len__(self) -> int:
        return len(self._sets)

    def note(self, key: Key, tensors: Sequence[Any], graphs: Graphs) -> None:
        """Record ``key`` as the set in use with ``graphs`` (the first call, or after a reset)."""
        self._sets[key] = _Set(graphs, _weak(tensors))
        self._sets.move_to_end(key)

    def switch(self, key: Key, tensors: Sequence[Any], fresh: Callable[[], Graphs]) -> tuple[Graphs, list[int], bool]:
        """The graphs for a call at ``key``: (graphs, positions of inputs that moved for real, whether
        ``key`` is a set that was evicted before and now comes back).

        A known key is a hit. Otherwise stale sets are dropped first (their inputs' positions come
        back as moved), then the least recently used sets beyond the bound, and ``fresh()`` makes
        the new set's empty graph dicts.
        """
        found = self._sets.get(key)
        if found is not None:
            self._sets.move_to_end(key)
            return found.graphs, [], False
        moved: set[int] = set()
        for old_key, old in list(self._sets.items()):
            stale = _stale_positions(old_key, old.tensors)
            if stale:
                moved.update(stale)
                self._drop(old_key)
        while len(self._sets) >= self.limit:
            oldest = next(iter(self._sets))
            self._drop(oldest)
            self._evicted[oldest] = None
            while len(self._evicted) > 4 * self.limit:
                self._evicted.popitem(last=False)
            self.evictions += 1
            if not self._warned_evicting:
                self._warned_evicting = True
                log.warning("more than max_address_sets=%d sets of read-in-place input addresses (one compiled "
                            "frame serving that many layers or experts, or inputs reallocated per call): the least "
                            "recently used set's graphs are dropped and captured again when it returns; raise "
                            "TORCHPCG_MAX_ADDRESS_SETS", self.limit)
        returning = self._evicted.pop(key, "absent") is None
        graphs = fresh()
        self.note(key, tensors, graphs)
        log.debug("a new set of read-in-place addresses for this graph (%d known)", len(self._sets))
        return graphs, sorted(moved), returning

    def clear(self) -> None:
        """Drop every set's graphs (the key's layout changes: an input is copied from now on)."""
        for key in list(self._sets):
            self._drop(key)
        self._evicted.clear()

    def _drop(self, key: Key) -> None:
        self._release(self._sets.pop(key).graphs)


def _weak(tensors: Sequence[Any]) -> tuple[weakref.ReferenceType, ...]:
    return tuple(weakref.ref(t) for t in tensors)


def _stale_positions(key: Key, tensors: Sequence[weakref.ReferenceType]) -> list[int]:
    """Positions whose tensor is gone or no longer at the address the set was made with."""
    out = []
    for position, (ptr, ref) in enumerate(zip(key, tensors)):
        tensor = ref()
        if tensor is None or (isinstance(tensor, torch.Tensor) and tensor.data_ptr() != ptr):
            out.append(position)
    return out
