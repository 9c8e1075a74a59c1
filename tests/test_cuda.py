"""Real CUDA graphs on the reference decoder (bf16); run on the GPU machine with ``-m cuda``."""
from __future__ import annotations

import pytest
import torch

import torchpcg
from tests.utils import compare, decoder_inputs, run_in_threads, tiny_decoder

pytestmark = pytest.mark.cuda

MAX = 64
TOKEN_COUNTS = (1, 2, 3, 7, 8, 16, 24, 31, 32, 40, 48, 56, 64, 65, 100, 128)
BF16 = {"atol": 2e-2, "rtol": 2e-2}


def _compile(model, **options):
    options = {"cudagraph": "cuda", "max_capture_size": MAX, **options}
    return torch.compile(model, backend="piecewise", fullgraph=True, options=options)


@pytest.mark.parametrize("compiler", ["eager", "inductor"])
def test_real_graphs_equal_eager_bf16(compiler):
    model = tiny_decoder("cuda", torch.bfloat16, hidden_size=128, num_heads=4, num_kv_heads=2, intermediate_size=256)
    compiled = _compile(model, compiler=compiler)
    for num_tokens in TOKEN_COUNTS:
        compare(model, compiled, num_tokens, start=5, **BF16)
    for num_tokens in TOKEN_COUNTS:  # second round: replays only
        compare(model, compiled, num_tokens, start=5, **BF16)
    stats = torchpcg.stats()
    assert stats["replays"] > 0 and stats["captured"] > 0 and stats["capture_failures"] == 0


def test_real_graphs_fp32_tight():
    model = tiny_decoder("cuda", torch.float32)
    compiled = _compile(model, compiler="eager")
    for num_tokens in (3, 8, 3, 33, 64, 65):
        compare(model, compiled, num_tokens, atol=1e-5, rtol=1e-5)


def test_stale_rows_and_output_lifetime_on_cuda():
    model = tiny_decoder("cuda", torch.float32)
    compiled = _compile(model, compiler="eager", capture_sizes=(8,))
    first = compiled(*decoder_inputs(model, 8, seed=1))
    kept = first.clone()
    compare(model, compiled, 3, atol=1e-5, rtol=1e-5)
    compare(model, compiled, 5, atol=1e-5, rtol=1e-5)
    assert torch.equal(first, kept)


def test_non_default_stream():
    model = tiny_decoder("cuda", torch.float32)
    compiled = _compile(model, compiler="eager", capture_sizes=(4, 8))
    stream = torch.cuda.Stream()
    with torch.cuda.stream(stream):
        for num_tokens in (3, 8, 3, 5):
            compare(model, compiled, num_tokens, atol=1e-5, rtol=1e-5)
    torch.cuda.synchronize()


def test_two_threads_on_cuda():
    model = tiny_decoder("cuda", torch.float32)
    compiled = _compile(model, compiler="eager", capture_sizes=(4, 8))
    compiled(*decoder_inputs(model, 8))
    compiled(*decoder_inputs(model, 3))
    def calls(num_tokens: int) -> None:
        for _ in range(10):
            compare(model, compiled, num_tokens, atol=1e-5, rtol=1e-5)

    run_in_threads(calls, (3, 7))


def test_explicit_capture_then_only_replays():
    model = tiny_decoder("cuda", torch.bfloat16)
    compiled = _compile(model, compiler="inductor", capture_sizes=(2, 4, 8, 16))
    torchpcg.capture(compiled, lambda n: decoder_inputs(model, n), sizes=(2, 4, 8, 16), progress=False)
    with torchpcg.expect(captured=0, dynamo_graphs=0, eager_runs=0, graphless_runs=0):
        for num_tokens in (2, 3, 5, 9, 16):
            compare(model, compiled, num_tokens, **BF16)
