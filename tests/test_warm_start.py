"""A second process reuses the compiled pieces, from the cache directory or from a warm-start file
(``torchpcg.save_warm_start`` / ``load_warm_start``); two processes can fill one cache at once."""
from __future__ import annotations

import argparse

import pytest

from bench import warm_start
from bench.warm_start import measure


@pytest.mark.slow
def test_second_process_hits_the_cache_and_concurrent_writers_agree():
    runs = measure(argparse.Namespace(layers=2, hidden=64, device="cpu", reference=False, no_concurrent=False))
    pieces = runs["cold"]["pieces"]
    assert runs["cold"]["fxgraph_cache_miss"] >= 1
    # One compile per piece at T=7: T backed (torchpcg.compilers.TokenDispatch; Dynamo's T waits
    # for a call that needs it, compilers.LazyCode), cached.
    assert runs["warm"]["fxgraph_cache_hit"] == pieces and runs["warm"]["fxgraph_cache_miss"] == 0
    # A fresh cache directory given the cold run's torchpcg.save_warm_start file: the same hits
    assert runs["artifacts"]["fxgraph_cache_hit"] == pieces and runs["artifacts"]["fxgraph_cache_miss"] == 0
    for name, run in runs.items():
        assert run["max_abs_diff"] < 1e-5, f"{name}: {run}"  # fp32 vs the uncompiled model


@pytest.mark.slow
def test_reference_run_captures_every_default_bucket_before_its_call(monkeypatch: pytest.MonkeyPatch):
    """``--reference``: the bench's decoder (shrunk here), all default buckets captured, as a server starts."""
    import torch

    import torchpcg
    import torchpcg.models
    from torchpcg.config import PiecewiseConfig

    monkeypatch.setattr(torchpcg.models, "reference_config",
                        lambda: torchpcg.models.DecoderConfig(num_layers=2, hidden_size=32, num_heads=2,
                                                              num_kv_heads=2, intermediate_size=64,
                                                              max_seq_len=1024))
    torchpcg.reset_stats()
    with torch.no_grad():
        run = warm_start.child(layers=0, hidden=0, device="cpu", reference=True)
    assert run["max_abs_diff"] < 1e-5  # fp32 vs the uncompiled model
    assert run["capture_sizes"] == sorted(PiecewiseConfig.resolve({}).buckets)


@pytest.mark.slow
def test_aot_compiled_piecewise_model_loads_in_a_fresh_process_and_matches_eager(tmp_path):
    """scripts/precompile_probe.py: Dynamo's AOT artifact of a piecewise model, saved and loaded in
    two processes on one cache; the loaded one skips the trace, rebuilds the pieces and agrees."""
    import os
    import sys
    from pathlib import Path

    import torch

    if not hasattr(torch._dynamo, "aot_compile"):
        pytest.skip(f"torch {torch.__version__} has no torch._dynamo.aot_compile (torch >= 2.10)")
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
    import precompile_probe

    env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": str(tmp_path / "inductor")}
    saved = precompile_probe.spawn("save", tmp_path / "model.aot", 1, env)
    loaded = precompile_probe.spawn("load", tmp_path / "model.aot", 1, env)
    assert saved["max_abs_diff"] < 1e-5 and loaded["max_abs_diff"] < 1e-5  # fp32, T = 1, 3, 8, 12 vs eager
    assert loaded["recompiles"] == 0 and loaded["dynamo_graphs"] == 1  # the backend ran once, from the artifact
    assert loaded["fxgraph_cache_hit"] > 0  # some pieces from the save's cache (not all: see the probe's note)
