"""The graph engine's policy (engine.GraphEngine), one owner's view, with emulated graphs on CPU:
the pool made lazily and again after a retire, the failure policy (enforce, counters, out of memory),
the bounded LRU of kept graphs, and the failure callback full graphs use through the runtime."""
from __future__ import annotations

import logging

import pytest
import torch

import torchpcg
from tests.utils import tiny_decoder
from torchpcg.engine import GraphEngine
from torchpcg.graphs import EmulatedGraph, EmulatedPool, GraphPool
from torchpcg.runtime import Runtime


def _double(x: torch.Tensor) -> torch.Tensor:
    return x * 2


def test_pool_is_made_on_the_first_capture_and_again_after_a_retire():
    engine = GraphEngine("emulate", None)
    assert engine.pool is None  # nothing made before a capture
    first = engine.capture(_double, [torch.ones(4)])
    pool = engine.pool
    assert isinstance(pool, EmulatedPool) and isinstance(first, EmulatedGraph)
    engine.capture(_double, [torch.ones(4)])
    assert engine.pool is pool  # one pool for every capture of the owner
    pool.retire()
    second = engine.capture(_double, [torch.full((4,), 3.0)])
    assert engine.pool is not pool and not engine.pool.retired
    assert torch.equal(second.outputs[0], torch.full((4,), 6.0))


def test_enforce_raises_capture_error_naming_what_failed():
    engine = GraphEngine("emulate", None, enforce_note="enforce=True")
    with pytest.raises(torchpcg.CaptureError, match=r"^capturing submod_2 at bucket 8 failed: ValueError: no \(enforce=True\)$"):
        engine.failed("submod_2 at bucket 8", ValueError("no"), enforce=True)
    stats = torchpcg.stats()
    assert stats["capture_failures"] == 0 and stats["fallbacks"] == 0  # raised, not counted


def test_a_failure_without_enforce_is_counted_and_returns_the_message():
    engine = GraphEngine("emulate", None)
    with torchpcg.expect(capture_failures=1, fallbacks=1):
        message = engine.failed("the vision encoder at bucket 32", RuntimeError("sync"), enforce=False)
    assert message == "capturing the vision encoder at bucket 32 failed: RuntimeError: sync"
    with torchpcg.expect(capture_failures=1, fallbacks=0):  # an owner that counts no fallback (full graphs)
        engine.failed("full graph at bucket 1", RuntimeError("sync"), enforce=False, fallback=False)


def test_out_of_memory_retires_the_pool_and_empties_the_cache(monkeypatch):
    emptied = []
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: emptied.append(True))
    pool = GraphPool.__new__(GraphPool)  # no CUDA here: only the fields retire() touches
    pool.retired, pool._keeper = False, object()
    engine = GraphEngine("cuda", None)
    engine.pool = pool
    engine.failed("submod_0 at bucket 4", RuntimeError("operation not permitted when stream is capturing"),
                  enforce=False)
    assert not pool.retired and not emptied  # any other failure leaves the pool
    engine.failed("submod_0 at bucket 4", torch.cuda.OutOfMemoryError("pool full"), enforce=False)
    assert pool.retired and pool._keeper is None and emptied == [True]
    monkeypatch.setattr(GraphPool, "__init__", lambda self, device: setattr(self, "retired", False))
    assert engine.current_pool() is not pool  # the next capture goes to a fresh pool


def test_lru_evicts_and_releases_the_least_recently_used_graph():
    engine = GraphEngine("emulate", None, max_graphs=2)
    graphs = {key: engine.capture(_double, [torch.full((2,), float(i))]) for i, key in enumerate("abc")}
    engine.put("a", graphs["a"])
    engine.put("b", graphs["b"])
    assert engine.get("a") is graphs["a"]  # a hit: "a" is now the most recently used
    engine.put("c", graphs["c"])  # over the bound: "b" goes, not "a"
    assert list(engine.graphs) == ["a", "c"] and engine.evictions == 1
    assert graphs["b"].fn is None and graphs["b"].outputs[0].isnan().all()  # released: outputs poisoned
    assert graphs["a"].fn is not None and engine.get("b") is None
    engine.drop(lambda graph: graph is graphs["c"])  # an owner's choice (a dropped bucket): not an eviction
    engine.clear()
    assert not engine.graphs and engine.evictions == 1 and graphs["a"].fn is None and graphs["c"].fn is None


def test_a_failed_full_graph_capture_turns_full_graphs_off_and_keeps_the_buckets(monkeypatch, caplog):
    """Full graphs capture without a warm-up (T's first call was it): fail exactly those captures."""
    real = Runtime.make_graph

    def failing(self, fn, static_args, warm=True):
        if not warm:
            raise RuntimeError("pretend a split op syncs")
        return real(self, fn, static_args, warm)

    monkeypatch.setattr(Runtime, "make_graph", failing)
    model = tiny_decoder(num_layers=2)
    compiled = torchpcg.compile(model, cudagraph="emulate", compiler="eager", cudagraph_mode="full_and_piecewise",
                                full_max_size=4, capture_sizes="1,2,4,8", token_inputs={"input_ids": 0, "positions": 0})
    cache, ref_cache = model.new_kv_cache(), model.new_kv_cache()
    with torch.no_grad(), caplog.at_level(logging.WARNING, logger="torchpcg"):
        for step in range(4):  # T=1: warm-up, failed capture, then piecewise graphs
            ids, positions = torch.randint(0, 512, (1,)), torch.tensor([step])
            torch.testing.assert_close(compiled(ids, positions, cache), model(ids, positions, ref_cache),
                                       atol=1e-5, rtol=1e-5)
    stats = torchpcg.stats()
    assert stats["capture_failures"] == 1 and stats["fallbacks"] == 0 and stats["full_graph_calls"] == 0
    assert stats["capture_sizes"] == [1] and stats["replays"] > 0  # the piecewise bucket stays
    assert "full-decode graphs off: capturing full graph at bucket 1 failed: RuntimeError" in caplog.text
    assert "is dropped" not in caplog.text
