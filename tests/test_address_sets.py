"""Graphs per set of read-in-place addresses: a compiled frame shared by layers keeps one set of
graphs per layer (no recapture, no weight copy), a reassigned parameter is still told moved, and
the sets are bounded."""
from __future__ import annotations

import gc
import logging

import pytest
import torch
from torch import nn

import torchpcg
from torchpcg.address_sets import AddressSets

OPTIONS = {"cudagraph": "emulate", "compiler": "eager", "capture_sizes": "1,2,4,8"}


class Block(nn.Module):
    """A graph break inside the layer: Dynamo compiles Block.forward as a frame of its own, called
    once per layer with that layer's weights."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.up, self.down = nn.Linear(width, 2 * width), nn.Linear(2 * width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.up(x))
        torch._dynamo.graph_break()
        return x + self.down(h)


class Stack(nn.Module):
    def __init__(self, layers: int = 3, width: int = 16) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.blocks = nn.ModuleList(Block(width) for _ in range(layers))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = block(x)
        return x


def _run(compiled, model, sizes, width: int = 16) -> None:
    for num_tokens in sizes:
        x = torch.randn(num_tokens, width)
        with torch.no_grad():
            torch.testing.assert_close(compiled(x), model(x), atol=1e-5, rtol=1e-5, msg=f"T={num_tokens}")


def test_a_frame_shared_by_layers_keeps_graphs_per_layer_without_recapture_or_copy() -> None:
    model = Stack(width=64).eval()
    compiled = torch.compile(model, backend="piecewise", options=OPTIONS)
    one_layer = sum(p.numel() * p.element_size() for p in model.blocks[0].parameters())
    _run(compiled, model, (5, 3, 7, 2, 6), width=64)  # warm-up: every bucket once per layer
    captured = torchpcg.stats()["captured"]
    torchpcg.reset_stats()
    sizes = (6, 3, 8, 5, 2, 7, 4)
    with torchpcg.expect(recaptures=0, captured=0, dynamo_graphs=0):
        _run(compiled, model, sizes, width=64)
    stats = torchpcg.stats()
    assert stats["replays"] > 0 and captured > 0
    # token rows only (about 4 KiB per call here): a weight copied per replay would be 3 layers' worth
    assert stats["copied_bytes"] / len(sizes) < one_layer / 2


def test_a_reassigned_parameter_in_a_shared_frame_is_one_move(caplog: pytest.LogCaptureFixture) -> None:
    model = Stack().eval()
    compiled = torch.compile(model, backend="piecewise", options=OPTIONS)
    _run(compiled, model, (5, 3, 7, 2, 6))
    with torch.no_grad():
        model.blocks[1].up.weight = nn.Parameter(model.blocks[1].up.weight * 0.5)
    gc.collect()
    with caplog.at_level(logging.WARNING, logger="torchpcg"), torchpcg.expect(recaptures=1, dynamo_graphs=0):
        _run(compiled, model, (5, 3, 7, 2, 6))
    assert any("changed address" in r.getMessage() and "reassigned" in r.getMessage() for r in caplog.records)


def test_address_sets_are_bounded_and_tell_a_returning_set() -> None:
    released: list[list[dict]] = []
    sets = AddressSets(2, released.append)
    tensors = [torch.zeros(2) for _ in range(3)]
    keys = [(t.data_ptr(),) for t in tensors]
    sets.note(keys[0], [tensors[0]], [{1: "g0"}])
    graphs, moved, returning = sets.switch(keys[1], [tensors[1]], lambda: [{}])
    assert graphs == [{}] and moved == [] and not returning and len(sets) == 2
    assert sets.switch(keys[0], [tensors[0]], lambda: [{}]) == ([{1: "g0"}], [], False)  # a hit: its own graphs
    sets.switch(keys[2], [tensors[2]], lambda: [{}])  # a third set: the least recently used (keys[1]) goes
    assert len(sets) == 2 and sets.evictions == 1 and released == [[{}]]
    assert sets.switch(keys[1], [tensors[1]], lambda: [{}])[2]  # it comes back: captured again


def test_address_sets_tell_a_real_move_from_another_set() -> None:
    sets = AddressSets(8, lambda graphs: None)
    fresh = lambda: [{}]  # noqa: E731
    layer0, layer1, shared = torch.zeros(4), torch.zeros(4), torch.zeros(1)
    sets.note((layer0.data_ptr(), shared.data_ptr()), [layer0, shared], [{}])
    _, moved, _ = sets.switch((layer1.data_ptr(), shared.data_ptr()), [layer1, shared], fresh)
    assert moved == [] and len(sets) == 2  # another layer: both sets stay
    layer1.data = torch.ones(4)  # the same tensor, new memory: the set made with it is stale
    _, moved, _ = sets.switch((layer1.data_ptr(), shared.data_ptr()), [layer1, shared], fresh)
    assert moved == [0] and len(sets) == 2  # layer 1's old set dropped, its new one made
    del layer0  # gone: a parameter reassigned, its old tensor freed
    gc.collect()
    third = torch.zeros(4)
    _, moved, _ = sets.switch((third.data_ptr(), shared.data_ptr()), [third, shared], fresh)
    assert moved == [0] and len(sets) == 2


@pytest.mark.cuda
def test_a_frame_shared_by_layers_on_real_graphs() -> None:
    """The same on CUDA graphs and Inductor pieces: per-layer graphs replay with each layer's
    weights, nothing captured or recaptured once warm, outputs equal eager."""
    model = Stack(width=64).cuda().eval()
    compiled = torch.compile(model, backend="piecewise", options={"capture_sizes": "1,2,4,8"})

    def run(sizes):
        for num_tokens in sizes:
            x = torch.randn(num_tokens, 64, device="cuda")
            with torch.no_grad():
                torch.testing.assert_close(compiled(x), model(x), atol=1e-4, rtol=1e-4, msg=f"T={num_tokens}")

    run((5, 3, 7, 2, 6, 1))
    with torchpcg.expect(recaptures=0, captured=0, dynamo_graphs=0):
        run((6, 3, 8, 5, 2, 7, 4, 1))
    assert torchpcg.stats()["replays"] > 0
