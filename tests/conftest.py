"""Shared pytest set-up: markers, a clean Dynamo and counter state for every test."""
from __future__ import annotations

import pytest
import torch

import torchpcg


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "cuda: needs a CUDA GPU (skipped without one)")
    config.addinivalue_line("markers", "multigpu: needs 2+ CUDA GPUs (multi-process NCCL tests; skipped with fewer)")
    config.addinivalue_line("markers", "slow: takes more than a few seconds on CPU")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _fresh_state():
    torch._dynamo.reset()
    torchpcg.reset_stats()
    yield
    torch._dynamo.reset()


@pytest.fixture
def one_cpu_thread():
    """Tiny matmuls: intra-op threads only add contention (13x slower on a busy 2-core CI box)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
