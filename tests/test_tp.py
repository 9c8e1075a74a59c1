"""Tensor parallel FlatDecoder (TP=2) under piecewise graphs equals the unsharded model.

Each test spawns 2 ranks (tests/distributed_utils.py): gloo on CPU with emulated graphs, or NCCL
on 2 GPUs with real graphs (markers cuda + multigpu, skipped with fewer than 2 GPUs). Every rank
builds the same dense FlatDecoder (seeded), shards it, and compares logits and its slice of the
KV cache with the dense model; counters are read in the children, where the graphs ran.
"""
from __future__ import annotations

import pytest
import torch

from tests.distributed_utils import run_distributed
from tests.utils import without_graphs

WORLD_SIZE = 2
TOKEN_COUNTS = (3, 1, 3, 20)  # T=1, a repeat (replay), one above the largest bucket (eager)
OPTIONS = {"compiler": "eager", "capture_sizes": (1, 2, 4, 8, 16)}

BACKENDS = [
    pytest.param("gloo", id="gloo"),
    pytest.param("nccl", id="nccl", marks=[
        pytest.mark.cuda, pytest.mark.multigpu,
        pytest.mark.skipif(torch.cuda.device_count() < WORLD_SIZE, reason="needs 2 CUDA GPUs")]),
]


def _setup(rank: int, backend: str):
    """(dense, tp model, device, options, atol) for this rank; one intra-op thread on CPU."""
    import torch.distributed as dist

    from torchpcg.models import DecoderConfig, FlatDecoder, TPFlatDecoder

    torch.set_num_threads(1)  # two ranks on a small box: intra-op threads only contend
    device = f"cuda:{rank}" if backend == "nccl" else "cpu"
    dense = FlatDecoder(DecoderConfig(num_layers=2)).to(device).eval()  # seed 0: same weights on every rank
    tp = TPFlatDecoder.from_dense(dense, dist.group.WORLD)
    graphs = "cuda" if backend == "nccl" else "emulate"
    atol = 1e-4 if backend == "nccl" else 1e-5  # GPU kernels sum the two half-heads in another order
    return dense, tp, device, {**OPTIONS, "cudagraph": graphs}, atol


def _inputs(num_tokens: int, device: str, mark: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Fresh ids and positions [T] (same on every rank: seeded by T)."""
    ids = torch.randint(0, 512, (num_tokens,), generator=torch.Generator().manual_seed(num_tokens)).to(device)
    positions = torch.arange(num_tokens, device=device)
    if mark:
        torch._dynamo.mark_dynamic(ids, 0)
        torch._dynamo.mark_dynamic(positions, 0)
    return ids, positions


def _check_calls(dense, tp, compiled, device: str, atol: float, mark: bool) -> None:
    """compiled(ids, positions, local cache) == dense logits and head slice of the dense cache."""
    for num_tokens in TOKEN_COUNTS:
        ids, positions = _inputs(num_tokens, device, mark)
        dense_cache, tp_cache = dense.new_kv_cache(), tp.new_kv_cache()
        with torch.no_grad():
            expected = dense(ids, positions, dense_cache)
            got = compiled(ids, positions, tp_cache)
        msg = f"rank {tp.rank} T={num_tokens}"
        torch.testing.assert_close(got, expected, atol=atol, rtol=1e-5, msg=lambda m: f"{msg}: {m}")
        torch.testing.assert_close(tp_cache, dense_cache[:, :, :, tp.kv_heads()], atol=atol, rtol=1e-5,
                                   msg=lambda m: f"{msg} cache: {m}")


def _piecewise_rank(rank: int, world_size: int, backend: str, split_collectives: bool) -> dict:
    import torchpcg

    dense, tp, device, options, atol = _setup(rank, backend)
    compiled = torch.compile(tp, backend="piecewise", fullgraph=True,
                             options={**options, "split_collectives": split_collectives})
    _check_calls(dense, tp, compiled, device, atol, mark=True)
    return torchpcg.stats()


def _stable_rank(rank: int, world_size: int, backend: str) -> dict:
    import torchpcg
    from torchpcg.explain import reason_category

    dense, tp, device, options, atol = _setup(rank, backend)
    compiled = torchpcg.compile(tp, **options)
    _check_calls(dense, tp, compiled, device, atol, mark=False)
    stats = torchpcg.stats()
    report = torchpcg.explain(compiled, *_inputs(5, device, mark=False), tp.new_kv_cache())
    reasons = [r for p in report.pieces if p.kind == "split" for r in p.reasons]
    return {"stats": stats, "split_counts": report.split_counts,
            "collective_reasons": [r for r in reasons if reason_category(r) == "collective"]}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("split_collectives", [True, False], ids=["split", "in-graph"])
def test_tp_torch_compile_equals_dense(backend, split_collectives):
    per_rank = run_distributed(_piecewise_rank, WORLD_SIZE, backend, split_collectives, backend=backend)
    num_layers = 2
    for stats in per_rank:
        assert stats["replays"] > 0 and without_graphs(stats) >= 1  # T=3 repeats replay; T=20 runs eagerly
        # Per graph: one attention per layer, and with split collectives its all-reduce and the MLP's.
        per_graph = 3 * num_layers if split_collectives else num_layers
        assert stats["split_ops"] == per_graph * stats["dynamo_graphs"], stats


@pytest.mark.parametrize("backend", BACKENDS)
def test_tp_torchpcg_compile_and_explain(backend):
    per_rank = run_distributed(_stable_rank, WORLD_SIZE, backend, backend=backend)
    for result in per_rank:
        stats = result["stats"]
        assert stats["dynamo_graphs"] == 1 and stats["recompiles"] == 0  # one graph for every T, T=1 too
        assert stats["split_ops"] == 6 and stats["replays"] > 0, stats
        assert result["split_counts"]["collective"] == 4  # 2 layers x (attention + MLP) all-reduces
        assert any("all_reduce" in r for r in result["collective_reasons"])
        assert any("wait_tensor" in r for r in result["collective_reasons"])
