"""Stock Hugging Face models under ``backend="piecewise"``: padding must never change an answer.

Models are built from tiny random configs (no downloads). Emulated graphs on CPU; the ``cuda``
variant replays real graphs. Covers: every sequence length 1..40 and above the largest bucket,
``use_cache=False``, ``logits_to_keep=1`` (last-token selection must not pick a padding row) and
a ``StaticCache`` prefill followed by decode steps (cache writes must never receive padding rows).
"""
from __future__ import annotations

import contextlib

import pytest
import torch

import torchpcg
from tests.utils import without_graphs

transformers = pytest.importorskip("transformers")

MAX = 32
LENGTHS = list(range(1, 41)) + [MAX + 1, 2 * MAX + 5]


def _model(name: str, device: str = "cpu", dtype: torch.dtype = torch.float32):
    common = dict(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)
    if name == "llama":
        config = transformers.LlamaConfig(**common)
        cls = transformers.LlamaForCausalLM
    else:
        config = transformers.Qwen3Config(head_dim=16, **common)
        cls = transformers.Qwen3ForCausalLM
    config._attn_implementation = "sdpa"
    torch.manual_seed(0)
    return cls(config).to(device=device, dtype=dtype).eval()


def _compile(model, cudagraph: str = "emulate"):
    options = {"cudagraph": cudagraph, "compiler": "eager", "max_capture_size": MAX}
    return torch.compile(model, backend="piecewise", fullgraph=True, options=options)


def _ids(length: int, device: str = "cpu") -> torch.Tensor:
    ids = torch.randint(0, 128, (1, length), generator=torch.Generator().manual_seed(length)).to(device)
    torch._dynamo.mark_dynamic(ids, 1)
    return ids


@pytest.mark.parametrize("name", ["llama", "qwen3"])
def test_logits_equal_eager_for_every_length(name):
    model = _model(name)
    compiled = _compile(model)
    with torch.no_grad():
        for length in LENGTHS:
            ids = _ids(length)
            expected = model(input_ids=ids, use_cache=False).logits
            got = compiled(input_ids=ids, use_cache=False).logits
            torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5, msg=lambda m: f"S={length}: {m}")
    stats = torchpcg.stats()
    assert stats["replays"] > 0 and without_graphs(stats) >= 2 and stats["capture_failures"] == 0


@pytest.mark.parametrize("name", ["llama", "qwen3"])
def test_last_token_logits_never_come_from_a_padding_row(name):
    model = _model(name)
    compiled = _compile(model)
    with torch.no_grad():
        for length in (3, 5, 13, 31, MAX + 3):
            ids = _ids(length)
            expected = model(input_ids=ids, use_cache=False, logits_to_keep=1).logits
            got = compiled(input_ids=ids, use_cache=False, logits_to_keep=1).logits
            assert got.shape == expected.shape == (1, 1, 128)
            torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5, msg=lambda m: f"S={length}: {m}")


def test_sdpa_backend_context_compiles_nothing_new():
    """docs/tuning.md's recipe (calls inside ``sdpa_kernel`` without cuDNN, against cuDNN's plan
    per new T) must not cost compiles: toggled on every other call, the same Dynamo graphs as
    without it, and eager's numbers."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    no_cudnn = [SDPBackend.EFFICIENT_ATTENTION, SDPBackend.FLASH_ATTENTION, SDPBackend.MATH]
    graphs = []
    for toggle in (False, True):
        torch._dynamo.reset()  # else the second model reuses the first one's Dynamo code
        torchpcg.reset_stats()
        model = _model("llama")
        compiled = _compile(model)
        with torch.no_grad():
            for i, length in enumerate((5, 1, 7, 3, 1, 9, MAX + 3, 2)):
                ids = _ids(length)
                expected = model(input_ids=ids, use_cache=False).logits
                with sdpa_kernel(no_cudnn) if toggle and i % 2 == 0 else contextlib.nullcontext():
                    got = compiled(input_ids=ids, use_cache=False).logits
                torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
        stats = torchpcg.stats()
        assert stats["recompiles"] == 0
        graphs.append(stats["dynamo_graphs"])
    assert graphs[0] == graphs[1] > 0


def _static_cache_run(model, call, prefill: int, decode_steps: int):
    """Prefill ``prefill`` tokens into a StaticCache, then decode one token at a time."""
    cache = transformers.StaticCache(config=model.config, max_cache_len=64)
    ids = torch.randint(0, 128, (1, prefill + decode_steps), generator=torch.Generator().manual_seed(7))
    logits = []
    with torch.no_grad():
        chunk = ids[:, :prefill]
        torch._dynamo.mark_dynamic(chunk, 1)
        position = torch.arange(prefill)
        torch._dynamo.mark_dynamic(position, 0)
        logits.append(call(input_ids=chunk, past_key_values=cache, cache_position=position, use_cache=True).logits)
        for step in range(decode_steps):
            at = prefill + step
            out = call(input_ids=ids[:, at:at + 1], past_key_values=cache,
                       cache_position=torch.tensor([at]), use_cache=True)
            logits.append(out.logits)
    tensors = [t for layer in cache.layers for t in (layer.keys, layer.values)]
    return logits, tensors


@pytest.mark.parametrize("name", ["llama", "qwen3"])
def test_static_cache_prefill_then_decode(name):
    model = _model(name)
    compiled = _compile(model)
    expected_logits, expected_cache = _static_cache_run(model, model, prefill=11, decode_steps=4)
    got_logits, got_cache = _static_cache_run(model, compiled, prefill=11, decode_steps=4)
    for step, (got, expected) in enumerate(zip(got_logits, expected_logits)):
        torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5, msg=lambda m: f"step {step}: {m}")
    for index, (got, expected) in enumerate(zip(got_cache, expected_cache)):
        # Padding rows written into the cache would show up here as extra non-zero slots.
        torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5, msg=lambda m: f"cache tensor {index}: {m}")
    assert torchpcg.stats()["graph_calls"] > 0


@pytest.mark.cuda
@pytest.mark.parametrize("name", ["llama", "qwen3"])
def test_hf_models_on_real_graphs(name):
    model = _model(name, "cuda", torch.bfloat16)
    compiled = _compile(model, cudagraph="cuda")
    with torch.no_grad():
        for length in LENGTHS + LENGTHS[:8]:  # the second pass replays
            ids = _ids(length, "cuda")
            expected = model(input_ids=ids, use_cache=False).logits
            got = compiled(input_ids=ids, use_cache=False).logits
            torch.testing.assert_close(got, expected, atol=2e-2, rtol=2e-2, msg=lambda m: f"S={length}: {m}")
    assert torchpcg.stats()["replays"] > 0


def test_torchpcg_compile_falls_back_to_backed_dims_for_hf_mask_code():
    """HF mask helpers cannot be traced with an unbacked length; torchpcg.compile retries backed."""
    model = _model("llama")
    compiled = torchpcg.compile(model, cudagraph="emulate", compiler="eager", max_capture_size=MAX)
    with torch.no_grad():
        for length in (5, 2, 9, 31, MAX + 4, 3, 7, 5):  # 7 and 5 replay bucket 8
            ids = torch.randint(0, 128, (1, length), generator=torch.Generator().manual_seed(length))
            expected = model(input_ids=ids, use_cache=False).logits
            got = compiled(input_ids=ids, use_cache=False).logits
            torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5, msg=lambda m: f"S={length}: {m}")
    assert compiled.dynamic_dim == "backed"
    stats = torchpcg.stats()
    assert stats["recompiles"] == 0 and stats["dynamo_graphs"] == 1 and stats["replays"] > 0


def _serve_full(model, device: str, compiler: str, atol: float) -> list:
    """Plain torch.compile in full_and_piecewise mode, fresh tensors per call, T=1 in the mix."""
    options = {"cudagraph_mode": "full_and_piecewise", "full_max_size": 4, "compiler": compiler,
               "max_capture_size": MAX}
    if device == "cpu":
        options["cudagraph"] = "emulate"
    with torchpcg.backend.collect_runtimes() as runtimes:
        compiled = torch.compile(model, backend="piecewise", options=options)
        with torch.no_grad():
            for length in (5, 1, 1, 3, 3, 2, 2, 9, 4, 4, 1, 40, 3):
                ids = torch.randint(0, 128, (1, length), device=device)
                expected = model(input_ids=ids, use_cache=False).logits
                got = compiled(input_ids=ids, use_cache=False).logits
                torch.testing.assert_close(got, expected, atol=atol, rtol=atol, msg=lambda m: f"S={length}: {m}")
    stats = torchpcg.stats()
    assert stats["full_graph_calls"] >= 4 and stats["capture_failures"] == 0 and stats["recompiles"] == 0, stats
    return runtimes


def test_hf_model_full_graphs_emulated():
    runtimes = _serve_full(_model("llama"), "cpu", "eager", 1e-5)
    assert any(r.full is not None for r in runtimes)


@pytest.mark.cuda
@pytest.mark.parametrize("name", ["llama", "qwen3"])
def test_hf_model_full_graphs_on_real_graphs(name):
    """What a newcomer runs: a stock model, the default call, Inductor, fresh tensors; the full
    graphs run one Inductor compile of the whole graph."""
    runtimes = _serve_full(_model(name, "cuda", torch.bfloat16), "cuda", "inductor", 2e-2)
    assert any(r.full is not None and r.full.whole_graph for r in runtimes)
