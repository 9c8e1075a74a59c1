"""A second process reuses the compiled pieces; two processes can fill one cache at once."""
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
