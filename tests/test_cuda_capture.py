"""Real CUDA graphs when things go wrong: failed captures, moved static inputs, side effects, streams.

Each test ends with a process-health check: CUDA random numbers work, no capture is left open,
and another compiled model still captures and replays correctly. Run with ``pytest -m cuda``.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import torchpcg
from tests.utils import SideEffects, compare, tiny_decoder
from torchpcg.graphs import GraphPool, check_health

pytestmark = pytest.mark.cuda

BF16 = {"atol": 2e-2, "rtol": 2e-2}


@torch.library.custom_op("torchpcg_tests::host_sync_scale", mutates_args=())
def host_sync_scale(x: torch.Tensor) -> torch.Tensor:
    """x * 1, after reading a value on the host: a device sync, which no CUDA graph can capture."""
    return x * float(x.abs().sum().item() >= 0)


@host_sync_scale.register_fake
def _(x: torch.Tensor) -> torch.Tensor:
    return torch.empty_like(x)


class _SyncInPiece(torch.nn.Module):
    """A fixed-shape model (a static Dynamo graph) whose first piece holds a synchronizing op."""

    def __init__(self) -> None:
        super().__init__()
        self.proj = torch.nn.Linear(32, 32)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = host_sync_scale(self.proj(x))
        h = F.scaled_dot_product_attention(h[None, None], h[None, None], h[None, None])[0, 0]
        return self.proj(h)


def _healthy_afterwards() -> None:
    """The process is usable: RNG, no open capture, and a fresh model captures and replays."""
    check_health(torch.device("cuda"))
    torch.randint(0, 10, (4,), device="cuda")
    assert not torch.cuda.is_current_stream_capturing()
    before = torchpcg.stats()
    model = tiny_decoder("cuda", torch.float32)
    compiled = torch.compile(model, backend="piecewise", options={"compiler": "eager", "capture_sizes": "4,8"})
    for num_tokens in (3, 8, 3):
        compare(model, compiled, num_tokens, atol=1e-5, rtol=1e-5)
    after = torchpcg.stats()
    assert after["captured"] > before["captured"] and after["replays"] > before["replays"]


def test_capture_failing_on_a_sync_falls_back_and_leaves_the_process_healthy():
    model = _SyncInPiece().cuda().eval()
    compiled = torch.compile(model, backend="piecewise", options={"compiler": "eager"})
    with torch.no_grad():
        for _ in range(3):  # fixed shape: a static graph, fresh tensors every call
            x = torch.randn(8, 32, device="cuda")
            torch.testing.assert_close(compiled(x), model(x), atol=1e-5, rtol=1e-5)
    stats = torchpcg.stats()
    assert stats["capture_failures"] == 1 and stats["fallbacks"] >= 1
    _healthy_afterwards()


def test_capture_failure_under_enforce_raises_and_leaves_the_process_healthy():
    model = _SyncInPiece().cuda().eval()
    compiled = torch.compile(model, backend="piecewise", options={"compiler": "eager", "enforce": True})
    with torch.no_grad(), pytest.raises(torchpcg.CaptureError, match="submod"):
        compiled(torch.randn(8, 32, device="cuda"))
    _healthy_afterwards()


def test_pool_survives_a_failed_capture_inside_the_graph():
    """Unit level: an OOM inside the capture and a sync inside the capture, then captures go on."""
    pool = GraphPool(torch.device("cuda"))
    x = torch.ones(1024, device="cuda")
    with pytest.raises(torch.OutOfMemoryError):
        pool.capture(lambda: torch.empty(1 << 44, device="cuda"), ())
    assert not pool.retired  # an OOM ends the capture cleanly: the pool serves the next capture
    graph = pool.capture(lambda v: v * 2, (x,))
    graph.replay()
    torch.testing.assert_close(graph.outputs[0], x * 2)
    with pytest.raises(Exception, match="capturing|not permitted"):
        pool.capture(lambda v: v * float(v.sum().item()), (x,))
    assert pool.retired  # its allocator state is stale: the runtime starts a fresh pool
    fresh = GraphPool(torch.device("cuda"))
    graph = fresh.capture(lambda v: v * 3 + torch.rand_like(v) * 0, (x,))
    graph.replay()
    torch.testing.assert_close(graph.outputs[0], x * 3)
    _healthy_afterwards()


class _Wide(torch.nn.Module):
    """Row-wise work whose memory grows with T: [T, 16] -> [T, 16, width] -> [T, 16]."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.width = width
        self.proj = torch.nn.Linear(16, 16)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        wide = self.proj(x).unsqueeze(-1).expand(-1, -1, self.width).contiguous()
        h = wide.mean(-1)
        h = F.scaled_dot_product_attention(h[None], h[None], h[None])[0]
        return self.proj(h)


def test_out_of_memory_at_the_largest_bucket_falls_back_to_fewer_buckets():
    # A per-process cap, not the device's free memory: other processes on the GPU (pytest -n) don't matter.
    budget = 4 << 30
    total = torch.cuda.get_device_properties(0).total_memory
    torch.cuda.set_per_process_memory_fraction(min(1.0, (torch.cuda.memory_reserved() + budget) / total))
    try:
        width = int(budget / (52 * 16 * 4))  # bucket 64 needs ~1.2x the budget; 40 real rows fit
        model = _Wide(width).cuda().eval()
        compiled = torch.compile(model, backend="piecewise", dynamic=True,
                                 options={"compiler": "eager", "capture_sizes": "8,64"})
        with torch.no_grad():
            for num_tokens in (40, 8, 40, 5):
                x = torch.randn(num_tokens, 16, device="cuda")
                torch.testing.assert_close(compiled(x), model(x), atol=1e-4, rtol=1e-4)
        stats = torchpcg.stats()
        assert stats["capture_failures"] >= 1 and stats["capture_sizes"] == [8] and stats["replays"] > 0
        del model, compiled
        torch.cuda.empty_cache()
    finally:
        torch.cuda.set_per_process_memory_fraction(1.0)
    _healthy_afterwards()


@pytest.mark.parametrize("dynamic", [False, True], ids=["static", "dynamic"])
def test_side_effects_happen_once_per_call(dynamic):
    model, reference = SideEffects().cuda().eval(), SideEffects().cuda().eval()
    reference.load_state_dict(model.state_dict())
    compiled = torch.compile(model, backend="piecewise", dynamic=dynamic or None, options={"compiler": "eager"})
    cache, ref_cache = torch.zeros(16, device="cuda"), torch.zeros(16, device="cuda")
    with torch.no_grad():
        for step in range(5):
            x = torch.randn(4, 16, device="cuda")
            torch.testing.assert_close(compiled(x, cache), reference(x, ref_cache), atol=1e-4, rtol=1e-4)
    assert int(model.calls) == int(reference.calls) == 5
    torch.testing.assert_close(cache, ref_cache, atol=1e-4, rtol=1e-4)
    assert torchpcg.stats()["replays"] > 0


def test_static_parameter_that_moves_is_captured_again():
    model = tiny_decoder("cuda", torch.float32)
    compiled = torch.compile(model, backend="piecewise", options={"compiler": "eager", "capture_sizes": "4,8"})
    for num_tokens in (3, 8):
        compare(model, compiled, num_tokens, atol=1e-5, rtol=1e-5)
    weight = next(model.parameters())
    weight.data = torch.randn_like(weight)  # same Parameter object, new memory: graphs read the old
    for num_tokens in (3, 8, 3):
        compare(model, compiled, num_tokens, atol=1e-5, rtol=1e-5)
    assert torchpcg.stats()["recaptures"] == 1
    _healthy_afterwards()


class _Heavy(torch.nn.Module):
    """Enough GPU work per call that a second stream would overtake the first without ordering."""

    def __init__(self) -> None:
        super().__init__()
        self.layers = torch.nn.ModuleList(torch.nn.Linear(2048, 2048) for _ in range(8))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = torch.tanh(layer(x))
        h = F.scaled_dot_product_attention(x[None], x[None], x[None])[0]
        return self.layers[0](h)


def test_back_to_back_calls_on_two_streams_do_not_race():
    model = _Heavy().cuda().eval()
    compiled = torch.compile(model, backend="piecewise", options={"compiler": "eager", "capture_sizes": "64"})
    first, second = torch.randn(64, 2048, device="cuda"), torch.randn(64, 2048, device="cuda")
    with torch.no_grad():
        want = (model(first), model(second))
        compiled(first)  # capture outside the race
        side_a, side_b = torch.cuda.Stream(), torch.cuda.Stream()
        for _ in range(3):
            with torch.cuda.stream(side_a):
                torch.cuda._sleep(50_000_000)  # stream A starts late: B would copy its inputs in first
                out_a = compiled(first)
            with torch.cuda.stream(side_b):
                out_b = compiled(second)
            torch.cuda.synchronize()
            torch.testing.assert_close(out_a, want[0], atol=1e-4, rtol=1e-4)
            torch.testing.assert_close(out_b, want[1], atol=1e-4, rtol=1e-4)
    _healthy_afterwards()
