"""A second process reuses the compiled pieces; two processes can fill one cache at once."""
from __future__ import annotations

import argparse

import pytest

from bench.warm_start import measure


@pytest.mark.slow
def test_second_process_hits_the_cache_and_concurrent_writers_agree():
    runs = measure(argparse.Namespace(layers=2, hidden=64, device="cpu"))
    pieces = runs["cold"]["pieces"]
    assert runs["cold"]["fxgraph_cache_miss"] >= 1
    # One compile per piece at T=7: T backed (torchpcg.compilers.TokenDispatch; Dynamo's T waits
    # for a call that needs it, compilers.LazyCode), cached.
    assert runs["warm"]["fxgraph_cache_hit"] == pieces and runs["warm"]["fxgraph_cache_miss"] == 0
    for name, run in runs.items():
        assert run["max_abs_diff"] < 1e-5, f"{name}: {run}"  # fp32 vs the uncompiled model
