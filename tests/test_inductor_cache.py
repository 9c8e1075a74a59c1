"""Inductor's FX graph cache with piecewise pieces: a second Dynamo graph in one process and a
second process on a warm ``TORCHINDUCTOR_CACHE_DIR`` never raise, and give eager's answer.

Each case runs in fresh interpreters (``python -m tests.test_inductor_cache CASE CALLS``) sharing
one cache dir, so nothing cached in this pytest process can hide a miss or a bad lookup.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from typing import Any

import pytest
import torch  # module level: the custom op's string annotations resolve here

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OPTIONS = {"cudagraph": "emulate", "compiler": "inductor", "capture_sizes": "1,2,4,8"}
DEVICE_ENV = "TORCHPCG_CACHE_TEST_DEVICE"  # the child's device: "cpu" (emulated graphs) or "cuda"


def _run_toy(calls: list[tuple[str, int]]) -> float:
    """The smallest graph that raised ``KeyError: 't1'`` before ``compilers.hinted_symints``.

    ``x`` unbacked (u0), ``y`` backed (s17): ``x * 2 + y`` replaces u0 by s17, so the piece after
    the split op gets two SymInts reading ``s17``, one without a hint. Compiled once with both
    backed, once with ``x`` unbacked: same cache key, guards over two inputs vs one hint.
    """
    import torchpcg

    @torch.library.custom_op("torchpcg_cache_test::running_sum", mutates_args=())
    def running_sum(x: torch.Tensor) -> torch.Tensor:
        return x.cumsum(0)

    @running_sum.register_fake
    def _(x: torch.Tensor) -> torch.Tensor:
        return torch.empty_like(x)

    torchpcg.register_splitting_op("torchpcg_cache_test::running_sum")

    class Toy(torch.nn.Module):
        def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
            summed = running_sum(x * 2 + y)  # [T]
            rows = summed.view(x.size(0), 1) + torch.arange(y.size(0), dtype=summed.dtype).view(-1, 1)
            return rows.sum(1) * x.size(0)

    model = Toy()
    compiled = torch.compile(model, backend="piecewise", fullgraph=True, options=OPTIONS)
    worst = 0.0
    for marking, num_tokens in calls:
        x, y = torch.randn(num_tokens), torch.randn(num_tokens)
        if marking == "unbacked":
            torch._dynamo.decorators.mark_unbacked(x, 0)
        torch._dynamo.mark_dynamic(y, 0)
        if marking == "backed":
            torch._dynamo.mark_dynamic(x, 0)
        worst = max(worst, (compiled(x, y) - model(x, y)).abs().max().item())
    return worst


def _run_decoder(calls: list[tuple[str, int]]) -> float:
    """Plain ``torch.compile`` of the reference decoder, as a new user calls it: fresh tensors,
    nothing marked, so a first static graph is followed by a dynamic one."""
    from torchpcg.models import DecoderConfig, FlatDecoder

    device = os.environ.get(DEVICE_ENV, "cpu")
    torch.manual_seed(0)
    config = DecoderConfig(num_layers=1, hidden_size=64, num_heads=2, num_kv_heads=2, intermediate_size=128)
    model = FlatDecoder(config).to(device).eval()
    options = {**OPTIONS, "cudagraph": "cuda" if device == "cuda" else "emulate"}
    compiled = torch.compile(model, backend="piecewise", fullgraph=True, options=options)
    worst = 0.0
    for _, num_tokens in calls:
        ids = torch.arange(num_tokens, device=device) % config.vocab_size
        positions = torch.arange(num_tokens, device=device)
        with torch.no_grad():
            expected = model(ids, positions, model.new_kv_cache())
        got = compiled(ids.clone(), positions.clone(), model.new_kv_cache())
        worst = max(worst, (got - expected).abs().max().item())
    return worst


CASES = {"toy": _run_toy, "decoder": _run_decoder}


def child(case: str, calls: str) -> dict[str, Any]:
    """One process: run ``calls`` ("backed:3,unbacked:5") of ``case``; report diff and cache counters."""
    import torchpcg

    parsed = [(marking, int(n)) for marking, n in (item.split(":") for item in calls.split(","))]
    worst = CASES[case](parsed)
    counters = torch._dynamo.utils.counters["inductor"]
    return {"max_abs_diff": worst, "dynamo_graphs": torchpcg.stats()["dynamo_graphs"],
            "hits": counters["fxgraph_cache_hit"], "misses": counters["fxgraph_cache_miss"]}


def _spawn(cache_dir: str, case: str, calls: str, device: str = "cpu") -> dict[str, Any]:
    env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": cache_dir, "PYTHONPATH": ROOT, DEVICE_ENV: device}
    run = subprocess.run([sys.executable, "-m", "tests.test_inductor_cache", case, calls], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, f"{case} {calls} exited {run.returncode}:\n{run.stderr[-4000:]}"
    return json.loads(run.stdout.strip().splitlines()[-1])


@pytest.mark.slow
def test_second_graph_and_second_process_share_pieces_with_mixed_symbols(tmp_path):
    cold = _spawn(str(tmp_path), "toy", "backed:3,unbacked:5")  # graph 2 looks up graph 1's pieces
    warm = _spawn(str(tmp_path), "toy", "unbacked:4,backed:6")   # the other order, warm cache
    for run in (cold, warm):
        assert run["max_abs_diff"] < 1e-5, run
    assert warm["hits"] >= 1 and warm["misses"] == 0, warm


@pytest.mark.slow
@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.cuda)])
def test_decoder_static_then_dynamic_graph_cold_and_warm(tmp_path, device):
    cold = _spawn(str(tmp_path), "decoder", "-:1,-:3,-:5,-:1", device)
    warm = _spawn(str(tmp_path), "decoder", "-:1,-:3,-:5,-:1", device)
    assert cold["dynamo_graphs"] == warm["dynamo_graphs"] >= 2, (cold, warm)  # static T=1, then dynamic
    for run in (cold, warm):
        assert run["max_abs_diff"] < 1e-5, run
    assert warm["misses"] == 0 and warm["hits"] == cold["misses"], (cold, warm)


if __name__ == "__main__":
    print(json.dumps(child(sys.argv[1], sys.argv[2])))
