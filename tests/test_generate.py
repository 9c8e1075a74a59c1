"""generate() with piecewise graphs: the three recipes of docs/models.md equal eager token for token.

Tiny random Llama and Qwen3 (tests/hf_tiny.py), greedy, 32 new tokens, two prompts per compiled
model (the second replays and captures at new sizes). CPU: emulated graphs, eager pieces; the GPU
variants are in tests/test_conformance_hf.py.

- ``forward``: ``model.forward = torch.compile(model.forward, backend="piecewise")``, default
  dynamic cache.
- ``compile_config``: transformers' own path, ``cache_implementation="static"`` +
  ``CompileConfig(backend="piecewise")``; transformers passes ``mode="reduce-overhead"`` and no
  options, so the knobs come from ``TORCHPCG_*``.
- ``torchpcg``: ``model.forward = torchpcg.compile(model.forward)``.
"""
from __future__ import annotations

import json

import pytest
import torch

import torchpcg
from tests import hf_tiny
from torchpcg.backend import collect_runtimes

transformers = pytest.importorskip("transformers")

CPU_OPTIONS = {"cudagraph": "emulate", "compiler": "eager", "max_capture_size": 64}
PROMPTS = ((7, 0), (12, 1))  # (length, seed)


@pytest.fixture
def piecewise_env(monkeypatch):
    """CompileConfig cannot carry options next to its mode: knobs through the environment."""
    monkeypatch.setenv("TORCHPCG_CUDAGRAPH", "emulate")
    monkeypatch.setenv("TORCHPCG_COMPILER", "eager")
    monkeypatch.setenv("TORCHPCG_MAX_CAPTURE_SIZE", "64")


@pytest.mark.parametrize("recipe", hf_tiny.RECIPES)
@pytest.mark.parametrize("name", ["llama", "qwen3"])
def test_generate_equals_eager_token_for_token(name, recipe, piecewise_env, one_cpu_thread):
    model = hf_tiny.causal_lm(name)
    compiled = hf_tiny.Recipe(recipe, model, CPU_OPTIONS if recipe != "compile_config" else None)
    for length, seed in PROMPTS:
        ids = hf_tiny.text_ids(length, seed)
        with torch.no_grad():
            expected = model.generate(ids, **hf_tiny.GREEDY)
        got = compiled.generate(ids)
        assert got.shape == (1, length + 32)
        assert torch.equal(got, expected), f"prompt {length}: {got[0, length:].tolist()} != {expected[0, length:].tolist()}"
    stats = torchpcg.stats()
    # Decode steps really ran on (emulated) graphs, nothing fell back.
    assert stats["graph_calls"] >= 2 * 31 and stats["replays"] > 0
    assert stats["capture_failures"] == 0 and stats["fallbacks"] == 0
    assert "forward" not in model.__dict__  # the recipe put the original forward back


def test_compile_config_with_your_own_static_cache_keeps_one_graph(one_cpu_thread):
    """The serving form of recipe (b): one StaticCache reset per request, options without a mode.

    transformers makes a new StaticCache per generate() otherwise: new addresses, so graphs that
    read the cache in place are captured again (``recaptures``). With one cache: one Dynamo graph,
    captured once, replayed by every request.
    """
    model = hf_tiny.causal_lm("llama")
    config = hf_tiny.compile_config(mode=None, options=CPU_OPTIONS)  # options need mode=None
    cache = transformers.StaticCache(config=model.config, max_cache_len=96)
    captured = None
    for length, seed in ((7, 0), (12, 1), (5, 2)):
        ids = hf_tiny.text_ids(length, seed)
        with torch.no_grad():
            expected = model.generate(ids, **hf_tiny.GREEDY)
        cache.reset()  # in place: the addresses graphs read stay the same
        got = model.generate(ids, compile_config=config, **{hf_tiny.cache_kwarg(model): cache}, **hf_tiny.GREEDY)
        assert torch.equal(got, expected), f"prompt {length}"
        captured = captured or torchpcg.stats()["captured"]
    stats = torchpcg.stats()
    assert stats["dynamo_graphs"] == 1 and stats["recaptures"] == 0 and stats["captured"] == captured
    assert stats["graph_calls"] == 3 * 31  # every decode step (transformers runs prefill uncompiled)


@pytest.mark.parametrize("name", ["llama", "mixtral"])
def test_a_new_static_cache_per_generate_call_needs_no_new_graphs(name, one_cpu_thread):
    """transformers' default for recipe (b): a new StaticCache per generate() call. Its key/value
    tensors reach only the attention (run eagerly), its length counter is copied (a few bytes), so
    later calls replay the first call's graphs: no recapture, no new capture, no cache copied."""
    model = hf_tiny.causal_lm(name)
    config = hf_tiny.compile_config(mode=None, options=CPU_OPTIONS)
    kwargs = {"cache_implementation": "static", "max_cache_len": 96}  # one cache shape: one Dynamo graph
    for call, (length, seed) in enumerate(((7, 0), (12, 1), (5, 2))):
        ids = hf_tiny.text_ids(length, seed)
        with torch.no_grad():
            expected = model.generate(ids, **hf_tiny.GREEDY)
        before = torchpcg.stats()
        got = model.generate(ids, compile_config=config, **kwargs, **hf_tiny.GREEDY)
        assert torch.equal(got, expected), f"prompt {length}"
        after = torchpcg.stats()
        if call:  # after the first call: the same graphs, every step
            assert after["captured"] == before["captured"] and after["recaptures"] == 0
            assert after["dynamo_graphs"] == 1
            per_step = (after["copied_bytes"] - before["copied_bytes"]) / (after["graph_calls"] - before["graph_calls"])
            assert per_step < 4096  # token rows and counters; one layer's cache here is 24 KiB


def test_cache_in_graphs_reads_your_own_cache_inside_the_graphs(one_cpu_thread):
    """cache_in_graphs=1 with one StaticCache reset in place: the cache reads are captured (fewer
    eager ops per step), still one capture for every request and tokens equal to eager."""
    model = hf_tiny.causal_lm("llama")
    config = hf_tiny.compile_config(mode=None, options={**CPU_OPTIONS, "cache_in_graphs": True})
    cache = transformers.StaticCache(config=model.config, max_cache_len=96)
    captured = []
    for length, seed in ((7, 0), (12, 1)):
        ids = hf_tiny.text_ids(length, seed)
        with torch.no_grad():
            expected = model.generate(ids, **hf_tiny.GREEDY)
        cache.reset()
        with collect_runtimes() as runtimes:
            got = model.generate(ids, compile_config=config, **{hf_tiny.cache_kwarg(model): cache}, **hf_tiny.GREEDY)
        assert torch.equal(got, expected), f"prompt {length}"
        captured.append(torchpcg.stats()["captured"])
        reasons = [why for runtime in runtimes for piece in runtime.split.split_pieces for why in piece.reasons]
        assert not any(why.startswith("cache state") for why in reasons)
    assert captured[0] == captured[1] and torchpcg.stats()["recaptures"] == 0


def test_recipe_b_as_transformers_runs_it_captures_nothing_after_its_one_recompile(one_cpu_thread):
    """No max_cache_len: transformers sizes each new cache to the request, so the second request
    makes the cache length dynamic (Dynamo's one recompile). That size reaches only the attention,
    so its graphs serve every length: nothing is captured after the second request."""
    model = hf_tiny.causal_lm("llama")
    config = hf_tiny.compile_config(mode=None, options=CPU_OPTIONS)
    captured = []
    for length, seed in ((7, 0), (12, 1), (5, 2), (30, 3), (9, 4)):
        ids = hf_tiny.text_ids(length, seed)
        with torch.no_grad():
            expected = model.generate(ids, **hf_tiny.GREEDY)
        got = model.generate(ids, compile_config=config, cache_implementation="static", **hf_tiny.GREEDY)
        assert torch.equal(got, expected), f"prompt {length}"
        captured.append(torchpcg.stats()["captured"])
    stats = torchpcg.stats()
    assert stats["dynamo_graphs"] == 2 and stats["recaptures"] == 0
    assert captured[1:] == [captured[1]] * 4, captured  # prompt 30 grows the cache past earlier sizes: no capture


def test_compile_config_mode_reaches_the_backend(piecewise_env):
    """transformers forwards CompileConfig.mode to the backend: an unknown one is our ConfigError."""
    model = hf_tiny.causal_lm("llama")
    with pytest.raises(Exception, match="mode='bogus'"):
        model.generate(hf_tiny.text_ids(5, 0), cache_implementation="static",
                       compile_config=hf_tiny.compile_config(mode="bogus"), **{**hf_tiny.GREEDY, "max_new_tokens": 2,
                                                                               "min_new_tokens": 2})


def test_bench_generate_runs_on_cpu(tmp_path, monkeypatch, one_cpu_thread):
    """bench/generate.py end to end on CPU (tiny model, 2 tokens), JSON written. ``forward`` is left
    out for time: it shares its code path with ``torchpcg`` (a compiled forward swapped in)."""
    from bench import generate as bench_generate

    monkeypatch.setenv("TORCHPCG_CUDAGRAPH", "emulate")  # what the script sets for compile_config: restored after
    monkeypatch.setenv("TORCHPCG_COMPILER", "eager")
    out = tmp_path / "generate.json"
    status = bench_generate.main(["--device", "cpu", "--size", "tiny", "--prompt-len", "12", "--new-tokens", "3",
                                  "--warmup", "1", "--repeats", "1", "--modes", "eager,compile_config,torchpcg",
                                  "--varied-prompts", "3", "--out", str(out)])
    assert status == 0
    result = json.loads(out.read_text())
    modes = {row["mode"]: row for row in result["results"]}
    assert set(modes) == {"eager", "compile_config", "torchpcg"}
    for row in modes.values():
        assert row["tokens_per_s"] > 0 and row["same_tokens_as_eager"] is True, row
        # the streamer's stamps: the first token comes before the whole call ends, decode is 2 tokens
        assert 0 < row["ttft_s"] < row["median_s"] and row["decode_tokens_per_s"] > 0, row
        assert row["varied_prompts"]["prompt_lens"] == [9, 6, 3], row  # 3 other lengths, all different
    for name in ("compile_config", "torchpcg"):  # the recipes: no recompile, no recapture for a new prompt length
        assert modes[name]["varied_prompts"]["recompiles"] == 0 and modes[name]["varied_prompts"]["recaptures"] == 0
    assert result["env"]["torch"] == torch.__version__ and result["config"]["new_tokens"] == 3


def test_generate_on_the_wrapper_points_to_the_recipe_instead_of_running_eager():
    """StableModel forwards attributes to the model; its generate() would call the uncompiled model."""
    model = hf_tiny.causal_lm("llama")
    compiled = torchpcg.compile(model, cudagraph="emulate", compiler="eager")
    with pytest.raises(torchpcg.ConfigError, match=r"model\.forward = torchpcg\.compile\(model\.forward\)"):
        compiled.generate(hf_tiny.text_ids(5, 0, "cpu"), max_new_tokens=2)
    assert compiled.config.compiler == "eager"  # other attributes still reach the wrapper and the model
    assert compiled.dtype == model.dtype


@pytest.mark.cuda
def test_a_new_static_cache_per_generate_call_on_real_graphs():
    """Recipe (b) as transformers runs it, on CUDA graphs: after the first generate() call the same
    graphs serve every request (no capture, no recapture) and tokens equal eager (fp32)."""
    model = hf_tiny.causal_lm("llama", device="cuda")
    config = hf_tiny.compile_config(mode=None, options={"max_capture_size": 64})
    for call, (length, seed) in enumerate(((7, 0), (12, 1), (5, 2))):
        ids = hf_tiny.text_ids(length, seed, device="cuda")
        with torch.no_grad():
            expected = model.generate(ids, **hf_tiny.GREEDY)
        before = torchpcg.stats()
        got = model.generate(ids, compile_config=config, cache_implementation="static", max_cache_len=96,
                             **hf_tiny.GREEDY)
        assert torch.equal(got, expected), f"prompt {length}"
        after = torchpcg.stats()
        if call:
            assert after["captured"] == before["captured"] and after["recaptures"] == 0
