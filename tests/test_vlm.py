"""torchpcg.compile(vlm): the language model compiled piecewise, the vision tower eager.

Tiny random Qwen3-VL (deepstack, mrope) and LLaVA (tests/hf_tiny.py), CPU, emulated graphs, eager
pieces; every output is compared with the uncompiled model on the same inputs. The GPU variants
(real graphs) are in tests/test_conformance_hf.py.
"""
from __future__ import annotations

import pytest
import torch

import torchpcg
from tests import hf_tiny
from tests.utils import without_graphs
from torchpcg import vlm

transformers = pytest.importorskip("transformers")

KNOBS = {"cudagraph": "emulate", "compiler": "eager", "capture_sizes": (1, 2, 4, 8, 16, 32)}


def _text(length: int, seed: int) -> dict[str, torch.Tensor]:
    return {"input_ids": hf_tiny.text_ids(length, seed)}


def _assert_logits_equal(model, compiled, request, what: str) -> None:
    with torch.no_grad():
        expected = model(**request).logits
        got = compiled(**request).logits
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5, msg=lambda m: f"{what}: {m}")


def test_is_vlm_and_the_language_model_found():
    qwen, llava = hf_tiny.qwen3_vl(), hf_tiny.llava()
    assert vlm.is_vlm(qwen) and vlm.is_vlm(llava)
    assert not vlm.is_vlm(hf_tiny.causal_lm("llama")) and not vlm.is_vlm(torch.nn.Linear(2, 2))
    spec = vlm.language_model_spec(qwen)
    assert (spec.path, spec.num_layers, spec.deepstack_layers, spec.mrope) == ("model.language_model", 3, 2, True)
    spec = vlm.language_model_spec(llava)
    assert (spec.path, spec.num_layers, spec.deepstack_layers, spec.mrope) == ("model.language_model", 2, 0, False)
    compiled = torchpcg.compile(qwen, **KNOBS)
    assert isinstance(compiled, vlm.CompiledVLM) and compiled.config.cudagraph == "emulate"
    with pytest.raises(torchpcg.ConfigError, match="chooses these itself"):
        torchpcg.compile(qwen, token_inputs={"input_ids": 1})


def test_qwen3_vl_mixed_traffic_one_graph_no_recompiles_no_stale_features(one_cpu_thread):
    """Image and text-only requests share one graph; deepstack rows never leak into a later call."""
    model = hf_tiny.qwen3_vl()
    compiled = torchpcg.compile(model, **KNOBS)
    requests = [
        ("image 4x4", hf_tiny.qwen3_vl_image(3, 4, seed=0)),  # T=13: image tokens at rows 4..7
        ("text after image", _text(9, 1)),  # rows 4..7 of the deepstack buffer must be zeros again
        ("wide image", hf_tiny.qwen3_vl_image(2, 9, seed=2, h=4, w=8)),  # T=21, 8 image tokens
        ("text", _text(13, 3)),
        ("decode-sized text", _text(1, 4)),  # T=1: its own graph (backed token dim), warmup not recompile
        ("image again", hf_tiny.qwen3_vl_image(1, 1, seed=5)),
        ("text again", _text(5, 6)),
        ("text T=1 again", _text(1, 7)),
    ]
    for what, request in requests:
        _assert_logits_equal(model, compiled, request, what)
    stats = torchpcg.stats()
    assert stats["recompiles"] == 0 and compiled.recompiles == [] and compiled.monitor.recompiles == []
    assert stats["dynamo_graphs"] == 2  # T >= 2 and T = 1; image and text-only calls share them
    assert stats["replays"] > 0 and stats["graph_calls"] == len(requests)
    assert stats["capture_failures"] == 0 and stats["graphless_pieces"] == 0
    assert "forward" not in model.model.language_model.__dict__  # the original model is untouched


def test_qwen3_vl_generate_static_cache_under_enforce(one_cpu_thread):
    """generate(): image and text prompts, 32 tokens equal eager; enforce proves graphs and splits."""
    model = hf_tiny.qwen3_vl()
    compiled = torchpcg.compile(model, enforce=True, **KNOBS)
    for request in (hf_tiny.qwen3_vl_image(3, 4, seed=0), _text(6, 1), hf_tiny.qwen3_vl_image(2, 3, seed=2)):
        with torch.no_grad():
            expected = model.generate(**request, cache_implementation="static", **hf_tiny.GREEDY)
        got = compiled.generate(**request, cache_implementation="static", **hf_tiny.GREEDY)
        assert torch.equal(got, expected), f"{got.tolist()} != {expected.tolist()}"
    stats = torchpcg.stats()
    assert stats["recompiles"] == 0 and stats["dynamo_graphs"] == 2  # prefill, T=1 decode
    assert stats["graph_calls"] == 3 * 32 and without_graphs(stats) == 0


def test_llava_text_only_warmup_then_image_requests(one_cpu_thread):
    """Capture every bucket with text-only inputs (pixel_values None), then serve images."""
    model = hf_tiny.llava()
    compiled = torchpcg.compile(model, **KNOBS)
    warm_ids = hf_tiny.text_ids(32, 0)
    # capture() calls with grad mode on, the requests below run under no_grad: no recompile either
    summary = torchpcg.capture(compiled, lambda n: (warm_ids[:, :n],), progress=False)
    assert summary["sizes"] == [32, 16, 8, 4, 2, 1]
    captured = torchpcg.stats()["captured"]
    for what, request in [("image", hf_tiny.llava_image(3, 4, seed=1)), ("text", _text(7, 2)),
                          ("image, long prefix", hf_tiny.llava_image(10, 2, seed=3)), ("T=1", _text(1, 4))]:
        _assert_logits_equal(model, compiled, request, what)
    stats = torchpcg.stats()
    assert stats["recompiles"] == 0 and stats["captured"] == captured  # warm buckets served the images
    assert stats["replays"] > 0 and without_graphs(stats) == 0


def test_llava_generate_dynamic_cache(one_cpu_thread):
    """generate() with the default dynamic cache through the wrapper: tokens equal eager."""
    model = hf_tiny.llava()
    compiled = torchpcg.compile(model, **KNOBS)
    for request in (hf_tiny.llava_image(3, 4, seed=0), _text(6, 1)):
        with torch.no_grad():
            expected = model.generate(**request, **hf_tiny.GREEDY)
        got = compiled.generate(**request, **hf_tiny.GREEDY)
        assert torch.equal(got, expected), f"{got.tolist()} != {expected.tolist()}"
    assert torchpcg.stats()["replays"] > 0


def test_enforce_fails_without_graphs_or_without_split_attention():
    model = hf_tiny.llava()
    request = hf_tiny.llava_image(3, 4, seed=0)
    compiled = torchpcg.compile(model, compiler="eager", cudagraph="off", enforce=True)
    with pytest.raises(torchpcg.CaptureError, match="ran without graphs"), torch.no_grad():
        compiled(**request)
    torch._dynamo.reset()
    model.model.language_model.config._attn_implementation = "eager"  # matmul + softmax: no attention op
    compiled = torchpcg.compile(model, enforce=True, **KNOBS)
    with pytest.raises(torchpcg.SplitError, match=r"attention of layer\(s\) \[0, 1\] of 2 was not split"), \
            torch.no_grad():
        compiled(**request)
    assert "forward" not in model.model.language_model.__dict__  # removed even when the call raised


def test_qwen3_vl_batches_of_several_sequences_fall_back_loudly(one_cpu_thread):
    """The deepstack buffer holds one sequence: B > 1 runs the language model eagerly, logged and
    counted (right answers, no graphs); under enforce it is an error."""
    model = hf_tiny.qwen3_vl()
    compiled = torchpcg.compile(model, **KNOBS)
    batch = {"input_ids": torch.cat([hf_tiny.text_ids(9, 1), hf_tiny.text_ids(9, 2)])}
    _assert_logits_equal(model, compiled, batch, "batch of 2")
    _assert_logits_equal(model, compiled, hf_tiny.qwen3_vl_image(3, 4, seed=0), "then one image request")
    stats = torchpcg.stats()
    assert stats["fallbacks"] == 1 and without_graphs(stats) == 1 and stats["graph_calls"] == 1
    strict = torchpcg.compile(model, enforce=True, **KNOBS)
    with pytest.raises(torchpcg.ConfigError, match="batch size 2"), torch.no_grad():
        strict(**batch)
