"""Graph memory on real CUDA graphs: a capture pass keeps alive only what eager would.

Every piece's graph memory comes from one pool, and a later capture may reuse the memory of an
earlier piece's output once nothing needs it any more (graphs replay in capture order). Nothing
in the call may pin an output past its last use, or the pool grows to all pieces' outputs at the
largest bucket (~8x an eager call's activation peak on the reference decoder at `513c337`).
Run on the GPU machine with ``-m cuda``.
"""
from __future__ import annotations

import pytest
import torch

import torchpcg
from torchpcg.graphs import GraphPool

pytestmark = pytest.mark.cuda

WIDTH, WIDE, LAYERS, TOKENS = 64, 8192, 6, 64
ALLOCATED: list[int] = []  # torch.cuda.memory_allocated() each time the probe op runs


@torch.library.custom_op("torchpcg_memory_tests::probe", mutates_args=())
def probe(wide: torch.Tensor) -> torch.Tensor:
    """A split op that notes the memory in use, then reads its wide input for the last time."""
    ALLOCATED.append(torch.cuda.memory_allocated(wide.device))
    return wide[:, :8].clone()


@probe.register_fake
def _probe_fake(wide: torch.Tensor) -> torch.Tensor:
    return wide.new_empty(wide.shape[0], 8)


class WideLayers(torch.nn.Module):
    """Each piece makes a [T, 8192] fp32 output (2 MiB at T=64) that only the next split op reads."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.up = torch.nn.ModuleList(torch.nn.Linear(WIDTH, WIDE) for _ in range(LAYERS))
        self.down = torch.nn.ModuleList(torch.nn.Linear(8, WIDTH) for _ in range(LAYERS))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for up, down in zip(self.up, self.down):
            x = x + down(probe(up(x)))
        return x


def test_a_capture_pass_reuses_the_memory_of_outputs_past_their_last_use():
    torchpcg.register_splitting_op("torchpcg_memory_tests::probe")
    model = WideLayers().cuda().eval()
    compiled = torchpcg.compile(model, cudagraph="cuda", compiler="eager", capture_sizes="8,64",
                                token_inputs={"x": 0})
    inputs = {t: torch.randn(t, WIDTH, device="cuda", generator=torch.Generator("cuda").manual_seed(t))
              for t in (64, 50, 7, 8)}
    with torch.no_grad():
        ALLOCATED.clear()
        first = compiled(inputs[64])  # captures every piece at bucket 64
        during_capture = list(ALLOCATED)
        for t in (64, 50, 7, 8, 64):  # replays: the reused memory must not change an answer
            torch.testing.assert_close(compiled(inputs[t]), model(inputs[t]), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(first, model(inputs[64]), atol=1e-5, rtol=1e-5)
    assert len(during_capture) == LAYERS
    wide_bytes = TOKENS * WIDE * 4
    growth = during_capture[-1] - during_capture[0]
    # Pinned outputs would add one wide output per layer: (LAYERS - 1) * 2 MiB by the last probe.
    assert growth < wide_bytes // 2, (
        f"memory in use grew by {growth / 2**20:.1f} MiB over {LAYERS} pieces of the capture pass "
        f"(one wide output is {wide_bytes / 2**20:.1f} MiB): outputs stay alive past their last use")
    stats = torchpcg.stats()
    assert stats["recompiles"] == 0 and stats["capture_failures"] == 0 and stats["replays"] > 0


def _pool_reserved(pool: GraphPool) -> int:
    return sum(s["total_size"] for s in torch.cuda.memory._snapshot()["segments"]
               if tuple(s["segment_pool_id"]) == tuple(pool.handle))


def test_pools_share_one_capture_stream_so_cublas_workspace_is_paid_once():
    """cuBLAS keeps a workspace per stream (32 MiB on Hopper), made inside the pool that captures
    the stream's first matmul. A second pool (another compiled model) must not make another."""
    device = torch.device("cuda")
    a = torch.randn(256, 256, device=device)
    first, second = GraphPool(device), GraphPool(device)
    assert first.stream is second.stream
    graphs = [pool.capture(lambda m: m @ m + 1, (a,)) for pool in (first, second)]
    for graph in graphs:
        graph.replay()
        torch.testing.assert_close(graph.outputs[0], a @ a + 1)
    # The second pool holds only its output: 256 KiB, in one small (2 MiB) segment.
    assert _pool_reserved(second) <= 2 * 2**20, (
        f"the second pool reserved {_pool_reserved(second) / 2**20:.0f} MiB for one 256 KiB output: "
        "its captures made a cuBLAS workspace of their own")
