"""Input classification, side effects, aliasing and graph lifetime, on emulated graphs (CPU).

The same semantics run on real graphs in tests/test_cuda_capture.py. Emulated graphs are made to
fail where real ones would: a dropped graph's outputs are poisoned, a retired pool refuses captures.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import torchpcg
from tests.utils import SideEffects
from torchpcg.graphs import EmulatedPool

EMULATE = {"cudagraph": "emulate", "compiler": "eager"}


@pytest.mark.parametrize("dynamic", [False, True], ids=["static-graph", "dynamic-graph"])
def test_writes_into_inputs_happen_once_per_call(dynamic):
    model, reference = SideEffects().eval(), SideEffects().eval()
    reference.load_state_dict(model.state_dict())
    compiled = torch.compile(model, backend="piecewise", dynamic=dynamic or None, options=EMULATE)
    cache, ref_cache = torch.zeros(16), torch.zeros(16)
    with torch.no_grad():
        for _ in range(5):
            x = torch.randn(4, 16)
            torch.testing.assert_close(compiled(x, cache), reference(x, ref_cache))
    assert int(model.calls) == int(reference.calls) == 5
    torch.testing.assert_close(cache, ref_cache)
    assert torchpcg.stats()["replays"] > 0


class _WriteAcrossPieces(torch.nn.Module):
    """``a.mul_(2)`` in a compute piece, on an attention output that a later attention reads."""

    def __init__(self) -> None:
        super().__init__()
        self.proj = torch.nn.Linear(16, 16)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.proj(x)[None]
        a = F.scaled_dot_product_attention(h, h, h)
        a.mul_(2)
        b = self.proj(a)
        return F.scaled_dot_product_attention(b, a, a)[0] + b[0]


def test_in_place_write_into_another_pieces_value_runs_eagerly():
    model = _WriteAcrossPieces().eval()
    compiled = torch.compile(model, backend="piecewise", options=EMULATE)
    with torch.no_grad():
        for num_tokens in (3, 3, 5):
            x = torch.randn(num_tokens, 16)
            torch.testing.assert_close(compiled(x), model(x))
    report = torchpcg.explain(model, torch.randn(3, 16))
    assert any(r.startswith("side effect: in-place write into") for p in report.graphs[0].pieces for r in p.reasons)


@torch.library.custom_op("torchpcg_tests::accumulate", mutates_args=("into",))
def accumulate(into: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """into += x (a KV-cache-style write through a view), returns x + into."""
    into.add_(x)
    return x + into


@accumulate.register_fake
def _(into: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    return torch.empty_like(x)


class _ViewOfUserInput(torch.nn.Module):
    """A compute piece hands a split op a view of a (copied) user input; the op writes through it."""

    def forward(self, x: torch.Tensor, state: torch.Tensor) -> torch.Tensor:
        row = state[1]  # [16] view of the caller's [2, 16] state
        h = torch.tanh(x) * 2
        return accumulate(row, h)


def test_split_op_writes_through_a_view_of_a_user_input_reach_the_caller():
    torchpcg.register_splitting_op("torchpcg_tests::accumulate")
    model = _ViewOfUserInput()
    compiled = torch.compile(model, backend="piecewise", options=EMULATE)
    state, ref_state = torch.zeros(2, 16), torch.zeros(2, 16)
    for _ in range(3):
        x = torch.randn(16)
        torch.testing.assert_close(compiled(x, state), model(x, ref_state))
    torch.testing.assert_close(state, ref_state)


class _Scaled(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.proj = torch.nn.Linear(16, 16)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.proj(x)
        h = F.scaled_dot_product_attention(h[None], h[None], h[None])[0]
        return self.proj(h)


def test_static_graph_with_fresh_tensors_replays_without_recapture():
    model = _Scaled().eval()
    compiled = torch.compile(model, backend="piecewise", options=EMULATE)
    with torch.no_grad():
        for _ in range(4):  # plain torch.compile, one shape: Dynamo hands over a static graph
            x = torch.randn(1, 16)
            torch.testing.assert_close(compiled(x), model(x))
    stats = torchpcg.stats()
    assert stats["dynamo_graphs"] == 1 and stats["recaptures"] == 0
    assert stats["captured"] == stats["pieces"] and stats["replays"] == 3 * stats["pieces"]


def test_dropped_graph_outputs_are_poisoned_like_reused_pool_memory():
    model = _Scaled().eval()
    compiled = torch.compile(model, backend="piecewise", options={**EMULATE, "copy_outputs": False})
    x = torch.randn(2, 16)
    with torch.no_grad():
        old = compiled(x)  # a view of graph memory, valid until the next call
        model.proj.weight.data = torch.randn(16, 16)  # a static input moves: every graph is dropped
        new = compiled(x)
    assert torch.isnan(old).all()  # a real pool would hand that memory to the new captures
    torch.testing.assert_close(new, model(x))
    assert torchpcg.stats()["recaptures"] == 1


def test_emulated_pool_refuses_capture_after_retirement():
    pool = EmulatedPool()
    graph = pool.capture(lambda v: v + 1, (torch.ones(3),))
    graph.replay()
    pool.retire()
    with pytest.raises(AssertionError, match="retired pool"):
        pool.capture(lambda v: v + 1, (torch.ones(3),))
    graph.release()
    with pytest.raises(AssertionError, match="released graph"):
        graph.replay()


class _Positions3D(torch.nn.Module):
    """mrope-style positions [3, B, T], passed contiguous on one call and as an expanded view on another."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = torch.nn.Linear(8, 8)

    def forward(self, x: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        h = self.lin(x) + pos.sum(0)[..., None].float()
        return F.scaled_dot_product_attention(h[:, None], h[:, None], h[:, None])[:, 0]


def test_broadcast_token_input_is_copied_into_its_static_buffer():
    """A graph compiled for an expanded (stride-0) input has a stride-0 static buffer: copy_ into it
    used to raise 'more than one element of the written-to tensor refers to a single memory location'."""
    model = _Positions3D().eval()
    compiled = torchpcg.compile(model, **EMULATE, capture_sizes=(4, 8, 16), token_inputs={"x": 1, "pos": 2})
    calls = [(13, False), (5, True), (6, True), (14, False), (3, True)]
    with torch.no_grad():
        for num_tokens, expanded in calls:
            base = torch.arange(num_tokens).view(1, 1, -1)
            pos = base.expand(3, 1, -1) if expanded else base.repeat(3, 1, 1)
            x = torch.randn(1, num_tokens, 8)
            torch.testing.assert_close(compiled(x, pos), model(x, pos))
    stats = torchpcg.stats()
    assert stats["graph_calls"] == len(calls) and stats["capture_failures"] == 0


_ALIVE: list[int] = []  # chaining-registry entries still alive, each time _probe_registry runs
_RUNTIMES: list = []  # the runtimes list of the compiled model under test, while it is called


@torch.library.custom_op("torchpcg_tests::probe_registry", mutates_args=())
def _probe_registry(wide: torch.Tensor) -> torch.Tensor:
    """A split op that counts the live entries of the running call's chaining registry."""
    if _RUNTIMES and _RUNTIMES[0]:
        state = _RUNTIMES[0][0].state
        _ALIVE.append(sum(1 for ref, _ in state.graph_outputs.values() if ref() is not None))
    return wide[:, :4].clone()


@_probe_registry.register_fake
def _(wide: torch.Tensor) -> torch.Tensor:
    return wide.new_empty(wide.shape[0], 4)


class _WideLayers(torch.nn.Module):
    def __init__(self, layers: int) -> None:
        super().__init__()
        self.up = torch.nn.ModuleList(torch.nn.Linear(8, 64) for _ in range(layers))
        self.down = torch.nn.ModuleList(torch.nn.Linear(4, 8) for _ in range(layers))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for up, down in zip(self.up, self.down):
            x = x + down(_probe_registry(up(x)))
        return x


def test_the_chaining_registry_keeps_no_output_alive_past_its_last_use():
    """On real graphs a later capture reuses the pool memory of outputs nobody reads any more; an
    entry that owned its output would keep every piece's outputs alive until the capture pass
    ends, and the pool would grow with the layer count. Here the live entries stay level as the
    layers of a capture pass go by (one more per layer before the entries were weak), and the
    answers equal eager in that pass and in the replays after it. Replays allocate nothing: their
    entries are the plans' own non-owning views."""
    torchpcg.register_splitting_op("torchpcg_tests::probe_registry")
    layers = 6
    model = _WideLayers(layers).eval()
    with torchpcg.backend.collect_runtimes() as runtimes:
        compiled = torchpcg.compile(model, **EMULATE, capture_sizes="4,8", token_inputs={"x": 0})
        with torch.no_grad():
            compiled(torch.randn(3, 8))  # compiles (and captures bucket 4)
            x = torch.randn(8, 8)
            expected = model(x)
            _RUNTIMES[:], _ALIVE[:] = [runtimes], []
            try:
                got = compiled(x)  # the capture pass at bucket 8
            finally:
                _RUNTIMES.clear()
            torch.testing.assert_close(got, expected)
            assert len(_ALIVE) == layers
            # level from the second layer on (the residual stream and one wide output)
            assert max(_ALIVE[1:]) == min(_ALIVE[1:]), f"live registry entries per layer: {_ALIVE}"
            for num_tokens in (5, 8, 3):
                x = torch.randn(num_tokens, 8)
                torch.testing.assert_close(compiled(x), model(x))
    assert torchpcg.stats()["recompiles"] == 0


@torch.library.custom_op("torchpcg_tests::shift", mutates_args=())
def _shift(x: torch.Tensor) -> torch.Tensor:
    """A split op (eager between pieces): its output is copied into the next piece's static buffer."""
    return x + 1


@_shift.register_fake
def _(x: torch.Tensor) -> torch.Tensor:
    return torch.empty_like(x)


class _ViewOutlivesTheNextCopy(torch.nn.Module):
    """Piece 1 hands out a view of its own input (``a[:, :4]``); piece 3 reads it after piece 2 has
    filled its input buffer. If pieces 1 and 2 shared one input buffer, piece 2's copy would
    overwrite what the view shows before piece 3 reads it. (Linear layers keep the pieces from
    being merged into the split ops as tiny ones.)"""

    def __init__(self) -> None:
        super().__init__()
        self.p1, self.p2, self.p3 = (torch.nn.Linear(8, 8) for _ in range(3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = _shift(x)
        view = a[:, :4]  # piece 1: its input a, a view of it out
        b = _shift(self.p1(a))
        c = _shift(self.p2(b))  # piece 2: its input b, copied into its buffer
        return self.p3(c)[:, :4] + view  # piece 3 reads the view of piece 1's input


def test_pieces_share_input_buffers_except_where_an_output_views_one():
    torchpcg.register_splitting_op("torchpcg_tests::shift")
    model = _ViewOutlivesTheNextCopy().eval()
    with torchpcg.backend.collect_runtimes() as runtimes:
        compiled = torchpcg.compile(model, **EMULATE, capture_sizes="4,8", token_inputs={"x": 0})
        with torch.no_grad():
            for num_tokens in (8, 5, 8, 3, 6):
                x = torch.randn(num_tokens, 8)
                torch.testing.assert_close(compiled(x), model(x))
    (runtime,) = runtimes
    runners = runtime.runners[1:]  # the first piece only checks the token count
    token_inputs = [[i for i, spec in enumerate(r.inputs) if spec.kind == "token"] for r in runners]
    slots = [runner.shared_slots for runner in runners]
    assert [len(t) for t in token_inputs] == [1, 1, 2], token_inputs  # piece 3 also reads the view
    # piece 1's input is viewed by its output: private; piece 2's is shared; piece 3 reads the view
    # in place (chained) and its own input from a shared slot
    assert slots[0] == {} and slots[1] == {token_inputs[1][0]: 0}, slots
    assert torchpcg.stats()["replays"] > 0


def test_decoder_layers_share_one_buffer_for_the_attention_output():
    from tests.utils import compare, tiny_decoder

    num_layers = 3
    model = tiny_decoder(num_layers=num_layers)
    with torchpcg.backend.collect_runtimes() as runtimes:
        compiled = torchpcg.compile(model, **EMULATE, capture_sizes="1,2,4,8", token_inputs={"input_ids": 0, "positions": 0})
        for num_tokens in (8, 3, 8, 1, 5):
            compare(model, compiled, num_tokens, atol=1e-5, rtol=1e-5)
    (runtime,) = runtimes
    attention_inputs = [s for runner in runtime.runners[1:] for i, s in runner.storages.items()
                        if runner.inputs[i].layout.dtype.is_floating_point]
    assert len(attention_inputs) == num_layers
    assert len({s.data_ptr() for s in attention_inputs}) == 1  # one buffer, not one per layer


def test_a_chained_input_from_elsewhere_recaptures_the_whole_bucket():
    """If a piece's chained input ever stops being its producer's graph output (nothing in torchpcg
    does that today; forced here), the piece must not be recaptured alone: the pieces after it
    read its old outputs through replay plans made for it. The call that finds it runs the rest
    without graphs, and the next call captures the bucket again, in order."""
    from tests.utils import compare, tiny_decoder

    model = tiny_decoder(num_layers=3)
    with torchpcg.backend.collect_runtimes() as runtimes:
        compiled = torchpcg.compile(model, **EMULATE, capture_sizes="4,8", token_inputs={"input_ids": 0, "positions": 0})
        for num_tokens in (8, 7, 8, 7):  # capture bucket 8, plans for T=8 and T=7
            compare(model, compiled, num_tokens, atol=1e-5, rtol=1e-5)
        (runtime,) = runtimes
        consumer = next(r for r in runtime.runners if r.captured.get(8) is not None and r.captured[8].chained)
        captured = consumer.captured[8]
        captured.chained = tuple((i, ptr + 1) for i, ptr in captured.chained)  # "from elsewhere" now
        captured.plans.clear()
        before = torchpcg.stats()["captured"]
        for num_tokens in (8, 7, 8, 5):  # the first finds it; the next captures bucket 8 again
            compare(model, compiled, num_tokens, atol=1e-5, rtol=1e-5)
    pieces_with_graphs = sum(1 for r in runtime.runners if not r.graphless_reason)
    assert torchpcg.stats()["captured"] - before == pieces_with_graphs  # the whole bucket, once
    assert torchpcg.stats()["recompiles"] == 0
