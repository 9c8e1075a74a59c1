"""Pipeline parallel: the reference decoder split into stages, each compiled with torchpcg.

Issue 12, item 2: stage k > 0 takes the previous stage's proxy tensors (a dict
``{"hidden_states", "residual"}``) as token-dim inputs with static buffers, copied on every
replay and never a reason to capture again; stages chained equal the whole uncompiled model for
every T. In one process (CPU, emulated graphs; and CUDA with real graphs), and over two processes
that send the proxies with ``torch.distributed.send`` (gloo on CPU; nccl on 2 GPUs).
"""
from __future__ import annotations

import inspect

import pytest
import torch

import torchpcg
from tests.distributed_utils import run_distributed
from tests.utils import unique_graphs
from torchpcg.models import DecoderConfig, FlatDecoder
from torchpcg.models.pipeline import PROXY_KEYS, split_stages
from torchpcg.token_inputs import resolve_token_layout

pytestmark = pytest.mark.usefixtures("one_cpu_thread")

BUCKETS = "1,2,4,8,16"
CPU_OPTIONS = {"cudagraph": "emulate", "compiler": "eager", "capture_sizes": BUCKETS}
CUDA_OPTIONS = {"cudagraph": "cuda", "capture_sizes": BUCKETS}
CONFIG = DecoderConfig(num_layers=3)  # 3 stages of one layer: first, middle (dict in, dict out), last
# T=1 first, repeats, every bucket, one above the largest (16): no graphs there, same answer.
TRAFFIC = (1, 1, 3, 3, 7, 16, 20, 5, 1, 12, 2)
FP32 = {"atol": 1e-5, "rtol": 1e-5}
CUDA_TOL = {"atol": 1e-4, "rtol": 1e-4}  # Inductor fp32 vs eager on the GPU


def _model(device: str = "cpu") -> FlatDecoder:
    return FlatDecoder(CONFIG, seed=0).to(device).eval()


def _call_inputs(model: FlatDecoder, traffic: tuple[int, ...], seed: int = 0):
    """(ids, positions) per call: one sequence that grows, so later calls attend to earlier ones."""
    device = next(model.parameters()).device
    generator = torch.Generator().manual_seed(seed)
    start = 0
    for num_tokens in traffic:
        ids = torch.randint(0, CONFIG.vocab_size, (num_tokens,), generator=generator).to(device)
        yield ids, torch.arange(start, start + num_tokens, device=device)
        start += num_tokens


def _received(proxy: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The proxies as another rank would get them: new tensors (new storage) on every call."""
    return {key: torch.empty_like(value).copy_(value) for key, value in proxy.items()}


def _chain(stages, ids: torch.Tensor, positions: torch.Tensor, cache: torch.Tensor) -> torch.Tensor:
    out = stages[0](ids, positions, cache)
    for stage in stages[1:]:
        assert sorted(out) == sorted(PROXY_KEYS)
        out = stage(_received(out), positions, cache)
    return out


# ---- the stages, uncompiled ----------------------------------------------------------------------

@pytest.mark.parametrize("num_stages", [1, 2, 3])
def test_chained_stages_equal_the_model_exactly(num_stages: int) -> None:
    model = _model()
    stages = split_stages(model, num_stages)
    assert [(s.start, s.stop) for s in stages][-1][1] == CONFIG.num_layers
    model_params = {id(p) for p in model.parameters()}
    assert all(id(p) in model_params for s in stages for p in s.parameters())  # shared, never copied
    assert sum(len(s.layers) for s in stages) == CONFIG.num_layers
    cache_ref, cache = model.new_kv_cache(), model.new_kv_cache()
    with torch.no_grad():
        for ids, positions in _call_inputs(model, TRAFFIC):
            expected = model(ids, positions, cache_ref)
            got = _chain(stages, ids, positions, cache)
            assert torch.equal(got, expected), f"T={ids.numel()}"  # the same adds, in the same order
    assert torch.equal(cache, cache_ref)


def test_each_stage_writes_only_its_own_cache_layers() -> None:
    model = _model()
    first, middle, last = split_stages(model, 3)
    ids, positions = next(_call_inputs(model, (4,)))
    cache = model.new_kv_cache()
    with torch.no_grad():
        proxy = first(ids, positions, cache)
    assert proxy["hidden_states"].shape == proxy["residual"].shape == (4, CONFIG.hidden_size)
    assert cache[0].abs().sum() > 0 and cache[1:].abs().sum() == 0
    with torch.no_grad():
        middle(proxy, positions, cache)
    assert cache[1].abs().sum() > 0 and cache[2].abs().sum() == 0


def test_split_stages_rejects_bad_splits() -> None:
    model = _model()
    with pytest.raises(ValueError, match="num_stages"):
        split_stages(model, 0)
    with pytest.raises(ValueError, match="num_stages"):
        split_stages(model, CONFIG.num_layers + 1)
    with pytest.raises(ValueError, match="deepstack"):
        split_stages(FlatDecoder(DecoderConfig(num_layers=2, deepstack_layers=1)), 2)


# ---- the shape rule reaches into dict arguments --------------------------------------------------

def test_token_inputs_inside_dict_arguments_are_found() -> None:
    T, H = 5, 8
    arguments = {"proxy": {"hidden_states": torch.randn(T, H), "residual": torch.randn(T, H),
                           "scale": torch.randn(H), "kv_cache": torch.randn(T, H)},
                 "positions": torch.arange(T), "kv_cache": torch.zeros(2, 2, 16, 1, 4)}
    layout = resolve_token_layout(arguments, None, set())
    assert layout.dims == {"proxy['hidden_states']": 0, "proxy['residual']": 0, "positions": 0}
    assert layout.primary == "proxy['hidden_states']" and layout.num_tokens(arguments) == T
    named = resolve_token_layout(arguments, {"proxy": 0}, set())  # a named dict: every tensor in it
    assert set(named.dims) == {"proxy['hidden_states']", "proxy['residual']", "proxy['scale']",
                               "proxy['kv_cache']"}


def test_marking_leaves_the_callers_dict_alone() -> None:
    model = _model()
    _, last = split_stages(model, 2)
    compiled = torchpcg.compile(last, **CPU_OPTIONS)
    proxy = {"hidden_states": torch.randn(3, CONFIG.hidden_size), "residual": torch.randn(3, CONFIG.hidden_size)}
    before = dict(proxy)
    compiled(proxy, torch.arange(3), model.new_kv_cache())
    assert proxy == before and all(proxy[k] is before[k] for k in proxy)  # same dict, same tensors
    assert compiled.token_inputs == {"inputs['hidden_states']": 0, "inputs['residual']": 0, "positions": 0}


# ---- compiled stages, chained --------------------------------------------------------------------

def _compile_stages(stages, how: str, options: dict):
    if how == "torchpcg.compile":
        return [torchpcg.compile(stage, **options) for stage in stages]
    return [torch.compile(stage, backend="piecewise", options=options) for stage in stages]


def _check_chained(how: str, device: str, options: dict, tol: dict) -> None:
    model = _model(device)
    compiled = _compile_stages(split_stages(model, 3), how, options)
    cache_ref, cache = model.new_kv_cache(), model.new_kv_cache()
    warm_graphs = None
    for i, (ids, positions) in enumerate(_call_inputs(model, TRAFFIC)):
        with torch.no_grad():
            expected = model(ids, positions, cache_ref)
        got = _chain(compiled, ids, positions, cache)
        torch.testing.assert_close(got, expected, **tol, msg=lambda m: f"call {i}, T={ids.numel()}: {m}")
        if how == "torchpcg.compile" and ids.numel() > 1 and warm_graphs is None:
            warm_graphs = unique_graphs()  # the first T > 1 call compiled every stage
    torch.testing.assert_close(cache, cache_ref, **tol)
    stats = torchpcg.stats()
    assert stats["recaptures"] == 0, stats  # new proxy tensors every call: copied, never captured again
    assert stats["replays"] > 0 and stats["graph_calls"] > 0, stats
    if how == "torchpcg.compile":
        assert stats["recompiles"] == 0, [c.recompiles for c in compiled]
        assert unique_graphs() == warm_graphs  # one Dynamo graph per stage, T=1 first included
        assert compiled[1].token_inputs == {"inputs['hidden_states']": 0, "inputs['residual']": 0, "positions": 0}
        assert compiled[0].eager_calls == 2  # the two T=1 calls before the first T > 1 (shape rule)


@pytest.mark.parametrize("how", ["torchpcg.compile", "torch.compile"])
def test_compiled_stages_chained_equal_the_model(how: str) -> None:
    _check_chained(how, "cpu", CPU_OPTIONS, FP32)


@pytest.mark.cuda
@pytest.mark.parametrize("how", ["torchpcg.compile", "torch.compile"])
def test_compiled_stages_chained_equal_the_model_cuda(how: str) -> None:
    _check_chained(how, "cuda", CUDA_OPTIONS, CUDA_TOL)


# ---- the signature is read once -----------------------------------------------------------------

def test_signature_is_bound_once_not_per_call(monkeypatch: pytest.MonkeyPatch) -> None:
    model = _model()
    first, _, _ = split_stages(model, 3)
    compiled = torchpcg.compile(first, **CPU_OPTIONS)
    cache = model.new_kv_cache()
    compiled(torch.arange(4), torch.arange(4), cache)  # warmup: compiles
    calls = []
    real_bind = inspect.Signature.bind
    monkeypatch.setattr(inspect.Signature, "bind", lambda self, *a, **k: calls.append(1) or real_bind(self, *a, **k))
    expected = first(torch.arange(3), torch.arange(3), cache.clone())
    spellings = [((torch.arange(3), torch.arange(3), cache.clone()), {}),
                 ((torch.arange(3),), {"positions": torch.arange(3), "kv_cache": cache.clone()}),
                 ((), {"kv_cache": cache.clone(), "positions": torch.arange(3), "inputs": torch.arange(3)})]
    for args, kwargs in spellings:
        got = compiled(*args, **kwargs)
        torch.testing.assert_close(got, expected, **FP32)
    assert len(calls) <= 1, f"inspect.Signature.bind ran {len(calls)} times for {len(spellings)} calls"
    with pytest.raises(TypeError):  # a bad call still gets inspect's error
        compiled(torch.arange(3), torch.arange(3), cache, cache)
    with pytest.raises(TypeError):
        compiled(torch.arange(3), torch.arange(3))
    with pytest.raises(TypeError):
        compiled(torch.arange(3), torch.arange(3), cache, inputs=torch.arange(3))


# ---- two processes: rank 0 runs stage 0 and sends, rank 1 receives and runs stage 1 --------------

def _pp_rank(rank: int, world_size: int, device_kind: str, options: dict) -> dict:
    """One rank of PP=2. Rank 1 also runs the whole model locally and returns the differences."""
    import torch.distributed as dist

    torch.set_num_threads(1)
    device = f"cuda:{rank}" if device_kind == "cuda" else "cpu"
    torchpcg.reset_stats()
    model = FlatDecoder(DecoderConfig(num_layers=2), seed=0).to(device).eval()  # same weights on both ranks
    stage = torchpcg.compile(split_stages(model, world_size)[rank], **options)
    cache, cache_ref = model.new_kv_cache(), model.new_kv_cache()
    diffs = []
    for ids, positions in _call_inputs(model, TRAFFIC):
        if rank == 0:
            proxy = stage(ids, positions, cache)
            for key in PROXY_KEYS:
                dist.send(proxy[key].contiguous(), dst=1)
            continue
        proxy = {key: torch.empty(ids.numel(), model.config.hidden_size, device=device) for key in PROXY_KEYS}
        for key in PROXY_KEYS:
            dist.recv(proxy[key], src=0)  # new tensors every call, as any receiving rank has
        logits = stage(proxy, positions, cache)
        with torch.no_grad():
            expected = model(ids, positions, cache_ref)
        diffs.append(((logits - expected).abs().max().item(), expected.abs().max().item()))
    stats = torchpcg.stats()
    return {"diffs": diffs, "stats": {k: stats[k] for k in ("recompiles", "recaptures", "replays")},
            "token_inputs": stage.token_inputs, "eager_calls": stage.eager_calls}


def _check_pp2(results: list[dict], tol: dict) -> None:
    for rank, result in enumerate(results):
        assert result["stats"]["recompiles"] == 0, (rank, result)
        assert result["stats"]["recaptures"] == 0, (rank, result)
        assert result["stats"]["replays"] > 0, (rank, result)
        assert result["eager_calls"] == 2, (rank, result)  # T=1 twice before the first T > 1
    assert results[1]["token_inputs"] == {"inputs['hidden_states']": 0, "inputs['residual']": 0, "positions": 0}
    diffs = results[1]["diffs"]
    assert len(diffs) == len(TRAFFIC)
    for (num_tokens, (diff, scale)) in zip(TRAFFIC, diffs):
        assert diff <= tol["atol"] + tol["rtol"] * scale, f"T={num_tokens}: max diff {diff} (scale {scale})"


def test_pp2_gloo_send_recv() -> None:
    _check_pp2(run_distributed(_pp_rank, 2, "cpu", CPU_OPTIONS, backend="gloo", timeout_s=180), FP32)


@pytest.mark.cuda
@pytest.mark.multigpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 CUDA GPUs")
def test_pp2_nccl_send_recv() -> None:
    _check_pp2(run_distributed(_pp_rank, 2, "cuda", CUDA_OPTIONS, backend="nccl", timeout_s=240), CUDA_TOL)
