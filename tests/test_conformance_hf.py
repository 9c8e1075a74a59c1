"""GPU conformance for Hugging Face end to end: generate() recipes and vision-language models.

Every case runs real CUDA graphs (``cudagraph="cuda"``) on tiny random models (tests/hf_tiny.py)
in float32 and compares with the uncompiled model on the same inputs; all are marked ``cuda``
(skipped without a GPU). The CPU versions with emulated graphs are tests/test_generate.py and
tests/test_vlm.py.

- ``test_generate_on_real_graphs[llama|qwen3-forward|compile_config|torchpcg]``: greedy, 32 new
  tokens, two prompts, tokens equal eager's. ``compile_config`` is transformers' own path with
  every torchpcg default (Inductor pieces); ``forward``/``torchpcg`` use Inductor pieces for Llama
  and eager pieces for Qwen3 (both compilers covered, half the compile time).
- ``test_qwen3_vl_mixed_traffic_on_real_graphs``: image and text-only requests interleaved, logits
  equal eager, one graph for T >= 2 plus one for T = 1, zero recompiles.
- ``test_qwen3_vl_generate_on_real_graphs``: generate() with a static cache under enforce (every
  layer's attention split, graphs used), image and text prompts, tokens equal eager's.
- ``test_llava_text_warmup_then_images_on_real_graphs``: every bucket captured with text-only
  inputs, then image requests served from those graphs (logits equal eager, no new capture), then
  generate() with an image on the same compiled model.

Run: ``pytest -m cuda tests/test_conformance_hf.py``.
"""
from __future__ import annotations

import pytest
import torch

import torchpcg
from tests import hf_tiny
from tests.utils import without_graphs

transformers = pytest.importorskip("transformers")

pytestmark = pytest.mark.cuda

DEVICE = "cuda"
BUCKETS = (1, 2, 4, 8, 16, 32)
TOL = {"atol": 1e-4, "rtol": 1e-4}  # fp32; padded GEMMs may pick other cuBLAS kernels


def _healthy() -> None:
    """The process can still use CUDA normally after the case."""
    torch.cuda.synchronize()
    assert not torch.cuda.is_current_stream_capturing()
    torch.randint(0, 10, (4,), device=DEVICE)  # the generator is not stuck in capture mode


@pytest.mark.parametrize("recipe", hf_tiny.RECIPES)
@pytest.mark.parametrize("name", ["llama", "qwen3"])
def test_generate_on_real_graphs(name, recipe):
    model = hf_tiny.causal_lm(name, DEVICE)
    options = {"cudagraph": "cuda", "compiler": "inductor" if name == "llama" else "eager", "max_capture_size": 64}
    compiled = hf_tiny.Recipe(recipe, model, None if recipe == "compile_config" else options)
    for length, seed in ((7, 0), (12, 1)):
        ids = hf_tiny.text_ids(length, seed, DEVICE)
        with torch.no_grad():
            expected = model.generate(ids, **hf_tiny.GREEDY)
        got = compiled.generate(ids)
        assert torch.equal(got, expected), f"prompt {length}: {got[0, length:].tolist()} != {expected[0, length:].tolist()}"
    stats = torchpcg.stats()
    assert stats["graph_calls"] >= 2 * 31 and stats["replays"] > 0 and stats["capture_failures"] == 0
    _healthy()


def test_qwen3_vl_mixed_traffic_on_real_graphs():
    model = hf_tiny.qwen3_vl(DEVICE)
    compiled = torchpcg.compile(model, cudagraph="cuda", compiler="eager", capture_sizes=BUCKETS)
    requests = [hf_tiny.qwen3_vl_image(3, 4, seed=0, device=DEVICE), {"input_ids": hf_tiny.text_ids(9, 1, DEVICE)},
                hf_tiny.qwen3_vl_image(2, 9, seed=2, h=4, w=8, device=DEVICE),
                {"input_ids": hf_tiny.text_ids(1, 3, DEVICE)}, {"input_ids": hf_tiny.text_ids(13, 4, DEVICE)},
                hf_tiny.qwen3_vl_image(1, 1, seed=5, device=DEVICE), {"input_ids": hf_tiny.text_ids(5, 6, DEVICE)}]
    outputs = []
    with torch.no_grad():
        for index, request in enumerate(requests):
            expected = model(**request).logits
            got = compiled(**request).logits
            outputs.append((got, expected))
            torch.testing.assert_close(got, expected, **TOL, msg=lambda m: f"request {index}: {m}")
    for index, (got, expected) in enumerate(outputs):  # later replays did not overwrite earlier outputs
        torch.testing.assert_close(got, expected, **TOL, msg=lambda m: f"request {index} after the run: {m}")
    stats = torchpcg.stats()
    assert stats["recompiles"] == 0 and compiled.recompiles == [] and stats["dynamo_graphs"] == 2
    assert stats["replays"] > 0 and stats["capture_failures"] == 0 and stats["recaptures"] == 0
    _healthy()


def test_qwen3_vl_generate_on_real_graphs():
    model = hf_tiny.qwen3_vl(DEVICE)
    compiled = torchpcg.compile(model, cudagraph="cuda", compiler="eager", capture_sizes=BUCKETS, enforce=True)
    for request in (hf_tiny.qwen3_vl_image(3, 4, seed=0, device=DEVICE), {"input_ids": hf_tiny.text_ids(6, 1, DEVICE)},
                    hf_tiny.qwen3_vl_image(2, 3, seed=2, device=DEVICE)):
        with torch.no_grad():
            expected = model.generate(**request, cache_implementation="static", **hf_tiny.GREEDY)
        got = compiled.generate(**request, cache_implementation="static", **hf_tiny.GREEDY)
        assert torch.equal(got, expected), f"{got.tolist()} != {expected.tolist()}"
    stats = torchpcg.stats()
    assert stats["recompiles"] == 0 and stats["graph_calls"] == 3 * 32 and without_graphs(stats) == 0
    _healthy()


def test_llava_text_warmup_then_images_on_real_graphs():
    model = hf_tiny.llava(DEVICE)
    compiled = torchpcg.compile(model, cudagraph="cuda", compiler="eager", capture_sizes=BUCKETS)
    warm_ids = hf_tiny.text_ids(32, 0, DEVICE)
    torchpcg.capture(compiled, lambda n: (warm_ids[:, :n],), progress=False)
    captured = torchpcg.stats()["captured"]
    with torch.no_grad():
        for index, request in enumerate([hf_tiny.llava_image(3, 4, seed=1, device=DEVICE),
                                         {"input_ids": hf_tiny.text_ids(7, 2, DEVICE)},
                                         hf_tiny.llava_image(10, 2, seed=3, device=DEVICE)]):
            expected = model(**request).logits
            got = compiled(**request).logits
            torch.testing.assert_close(got, expected, **TOL, msg=lambda m: f"request {index}: {m}")
    stats = torchpcg.stats()
    assert stats["captured"] == captured and stats["recompiles"] == 0 and without_graphs(stats) == 0
    request = hf_tiny.llava_image(3, 4, seed=4, device=DEVICE)
    with torch.no_grad():
        expected = model.generate(**request, **hf_tiny.GREEDY)
    got = compiled.generate(**request, **hf_tiny.GREEDY)  # then generate() on the same compiled model
    assert torch.equal(got, expected), f"{got.tolist()} != {expected.tolist()}"
    assert torchpcg.stats()["capture_failures"] == 0
    _healthy()
