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
    # Two compiles per piece (Dynamo's T, and T backed: torchpcg.compilers.TokenDispatch), both cached.
    assert runs["warm"]["fxgraph_cache_hit"] == 2 * pieces and runs["warm"]["fxgraph_cache_miss"] == 0
    for name, run in runs.items():
        assert run["max_abs_diff"] < 1e-5, f"{name}: {run}"  # fp32 vs the uncompiled model
