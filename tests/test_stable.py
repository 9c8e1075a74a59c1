"""torchpcg.compile: zero recompiles under mixed serving traffic, stable kwargs, token dims.

The mixed-traffic test is the contract of issue 5: 300+ calls on the reference decoder with a
deepstack kwarg, T=1 first, T up to twice the largest bucket, None and tensor kwargs interleaved,
callers alternating grad modes: one Dynamo compile (torch's own counters), zero recompiles,
every output equal to the uncompiled model, and no stale features after a multimodal call.
"""
from __future__ import annotations

import random

import pytest
import torch

import torchpcg
from tests.utils import unique_graphs
from torchpcg.config import PiecewiseConfig
from torchpcg.errors import ConfigError
from torchpcg.models import DecoderConfig, FlatDecoder
from torchpcg.errors import StableInputError
from torchpcg.stable import compile_model as stable_compile
from torchpcg.stable_buffers import StableBuffer

BUCKETS = (1, 2, 4, 8, 16)
DECODER = DecoderConfig(deepstack_layers=2)
DEEPSTACK_WIDTH = DECODER.deepstack_layers * DECODER.hidden_size


pytestmark = pytest.mark.usefixtures("one_cpu_thread")



def _cache_entries(code) -> int | None:
    """Compiled versions Dynamo holds for a frame (None where torch lacks the debug hook)."""
    lister = getattr(torch._dynamo.eval_frame, "_debug_get_cache_entry_list", None)
    return None if lister is None else len(lister(code))


def _traffic(num_calls: int, max_tokens: int, seed: int = 0) -> list[tuple[int, bool]]:
    """(T, multimodal?) per call: T=1 first, every T in 1..max_tokens once, then random;
    plus multimodal -> text-only pairs at one T and within one bucket (the stale-leak case)."""
    rng = random.Random(seed)
    calls = [(1, False)] + [(t, rng.random() < 0.5) for t in range(1, max_tokens + 1)]
    calls += [(5, True), (5, False), (7, True), (6, False), (16, True), (16, False), (1, True), (1, False)]
    while len(calls) < num_calls:
        calls.append((rng.randint(1, max_tokens), rng.random() < 0.5))
    return calls


def _run_mixed_traffic(compiled, model: FlatDecoder, *, device: str, dtype: torch.dtype,
                       num_calls: int, atol: float, rtol: float) -> None:
    gen = torch.Generator().manual_seed(0)
    eager_cache = model.new_kv_cache()
    compiled_cache = model.new_kv_cache()
    leak_checks = 0
    last_multimodal: tuple[int, torch.Tensor] | None = None
    for i, (num_tokens, multimodal) in enumerate(_traffic(num_calls, 2 * BUCKETS[-1])):
        ids = torch.randint(0, DECODER.vocab_size, (num_tokens,), generator=gen).to(device)
        start = int(torch.randint(0, DECODER.max_seq_len - num_tokens + 1, (1,), generator=gen))
        positions = torch.arange(start, start + num_tokens, device=device)
        deepstack = torch.randn(num_tokens, DEEPSTACK_WIDTH, generator=gen).to(device, dtype) if multimodal else None
        compiled_cache.copy_(eager_cache)  # both see the same history
        with (torch.enable_grad() if i % 2 else torch.no_grad()):  # callers of both kinds
            out = compiled(ids, positions, compiled_cache, input_deepstack_embeds=deepstack)
        with torch.no_grad():
            ref = model(ids, positions, eager_cache, deepstack)
        torch.testing.assert_close(out, ref, atol=atol, rtol=rtol, msg=lambda m: f"call {i} T={num_tokens}: {m}")
        torch.testing.assert_close(compiled_cache, eager_cache, atol=atol, rtol=rtol)
        if not multimodal and last_multimodal is not None and last_multimodal[0] == num_tokens:
            # Same T right after a multimodal call: equal to eager text-only (checked above) and
            # not to the multimodal answer, so stale features would have been caught.
            assert not torch.allclose(out, last_multimodal[1], atol=atol, rtol=rtol)
            leak_checks += 1
        last_multimodal = (num_tokens, out) if multimodal else None
    assert leak_checks >= 3


MIXED_CASES = {
    "eager": dict(backend="eager"),
    "piecewise": dict(backend="piecewise", cudagraph="emulate", compiler="eager", capture_sizes=BUCKETS),
}


@pytest.mark.parametrize("case", sorted(MIXED_CASES))
def test_mixed_traffic_compiles_once(case: str) -> None:
    model = FlatDecoder(DECODER).eval()
    graphs_before = unique_graphs()
    compiled = stable_compile(
        model, enforce=True,  # a recompile would raise RecompileError, not just count
        stable_kwargs={"input_deepstack_embeds": StableBuffer(shape=(-1, DEEPSTACK_WIDTH))},
        **MIXED_CASES[case])
    with torchpcg.expect(recompiles=0):
        _run_mixed_traffic(compiled, model, device="cpu", dtype=torch.float32, num_calls=320, atol=1e-5, rtol=1e-5)
    assert unique_graphs() - graphs_before == 1  # Dynamo's own count: one graph for the whole run
    assert _cache_entries(FlatDecoder.forward.__code__) in (1, None)
    assert compiled.recompiles == []
    assert compiled.token_inputs == {"input_ids": 0, "positions": 0}
    assert compiled._stable["input_deepstack_embeds"].slot.capacity == 2 * BUCKETS[-1]  # grew past the max bucket
    if case == "piecewise":
        assert torchpcg.stats()["dynamo_graphs"] == 1
        assert torchpcg.stats()["captured"] > 0


@pytest.mark.cuda
def test_mixed_traffic_compiles_once_cuda() -> None:
    model = FlatDecoder(DECODER).eval().to("cuda", torch.bfloat16)
    graphs_before = unique_graphs()
    compiled = stable_compile(
        model, enforce=True, cudagraph="cuda", capture_sizes=BUCKETS,
        stable_kwargs={"input_deepstack_embeds": StableBuffer(shape=(-1, DEEPSTACK_WIDTH), dtype=torch.bfloat16)})
    with torchpcg.expect(recompiles=0):
        _run_mixed_traffic(compiled, model, device="cuda", dtype=torch.bfloat16, num_calls=320, atol=2e-2, rtol=2e-2)
    assert unique_graphs() - graphs_before == 1
    assert torchpcg.stats()["replays"] > 0 and torchpcg.stats()["dynamo_graphs"] == 1


# ---- nested and invalid stable kwargs ------------------------------------------------------------

class Extras(torch.nn.Module):
    """out = x @ w + extras["a"] + extras["b"].sum(-1): a nested optional input of two tensors."""

    def __init__(self) -> None:
        super().__init__()
        self.w = torch.nn.Parameter(torch.randn(4, 4))

    def forward(self, x: torch.Tensor, extras: dict[str, torch.Tensor] | None = None) -> torch.Tensor:
        out = x @ self.w
        if extras is not None:
            out = out + extras["a"] + extras["b"].sum(-1, keepdim=True)
        return out


def _extras_reference(model: Extras, x: torch.Tensor, extras: dict | None) -> torch.Tensor:
    extras = extras or {}
    zeros = {"a": torch.zeros(x.shape[0], 4), "b": torch.zeros(x.shape[0], 2)}
    with torch.no_grad():
        return model(x, {k: extras.get(k, v) for k, v in zeros.items()})


def test_nested_stable_kwargs() -> None:
    model = Extras()
    compiled = stable_compile(model, backend="eager", token_inputs={"x": 0}, stable_kwargs={
        "extras": {"a": StableBuffer(shape=(-1, 4)), "b": StableBuffer(shape=(-1, 2))}})
    graphs_before = unique_graphs()
    with torchpcg.expect(recompiles=0):
        for num_tokens, keys in [(1, ()), (3, ("a", "b")), (3, ()), (6, ("b",)), (2, ("a",)), (6, ())]:
            x = torch.randn(num_tokens, 4)
            extras = {"a": torch.randn(num_tokens, 4), "b": torch.randn(num_tokens, 2)}
            given = {k: extras[k] for k in keys} or None
            torch.testing.assert_close(compiled(x, extras=given), _extras_reference(model, x, given))
    assert unique_graphs() - graphs_before == 1


def test_stable_kwarg_errors() -> None:
    with pytest.raises(ConfigError, match="exactly one -1"):
        StableBuffer(shape=(4, 8))
    model = FlatDecoder(DECODER).eval()
    with pytest.raises(ConfigError, match="not parameters of FlatDecoder.forward"):
        stable_compile(model, backend="eager", stable_kwargs={"pixel_values": StableBuffer(shape=(-1, 8))})
    compiled = stable_compile(model, backend="eager", stable_kwargs={
        "input_deepstack_embeds": StableBuffer(shape=(-1, DEEPSTACK_WIDTH))})
    ids, positions, cache = torch.tensor([1, 2]), torch.arange(2), model.new_kv_cache()
    with pytest.raises(StableInputError, match=r"got shape \(3, 128\).*expected shape \(2, 128\)"):
        compiled(ids, positions, cache, torch.zeros(3, DEEPSTACK_WIDTH))
    with pytest.raises(StableInputError, match="dtype torch.float16"):
        compiled(ids, positions, cache, torch.zeros(2, DEEPSTACK_WIDTH, dtype=torch.float16))
    nested = stable_compile(Extras(), backend="eager", token_inputs={"x": 0},
                            stable_kwargs={"extras": {"a": StableBuffer(shape=(-1, 4))}})
    with pytest.raises(StableInputError, match=r"keys \['c'\] are not declared"):
        nested(torch.randn(2, 4), extras={"c": torch.zeros(2, 4)})


# ---- token dims ----------------------------------------------------------------------------------

def test_cache_dim_equal_to_t_is_not_marked() -> None:
    model = FlatDecoder(DECODER).eval()  # kv_cache is [num_layers=2, 2, S, Hkv, D]
    compiled = stable_compile(model, backend="eager", enforce=True)
    cache, ref_cache = model.new_kv_cache(), model.new_kv_cache()
    for num_tokens in (2, 1, 5, 2):  # the first call has T == num_layers
        ids, positions = torch.randint(0, 512, (num_tokens,)), torch.arange(num_tokens)
        with torch.no_grad():
            ref = model(ids, positions, ref_cache)
        torch.testing.assert_close(compiled(ids, positions, cache), ref)
    assert compiled.token_inputs == {"input_ids": 0, "positions": 0}


class BatchSeq(torch.nn.Module):
    """[B, S] ids and mask -> [B, S, H]; tokens are on dim 1."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = torch.nn.Embedding(32, 8)
        self.proj = torch.nn.Linear(8, 8)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.proj(self.embed(input_ids)) * attention_mask[..., None]


def test_batch_seq_model_marks_dim_1() -> None:
    model = BatchSeq()
    compiled = stable_compile(model, backend="eager", enforce=True)
    for seq_len in (1, 4, 9, 1):
        ids, mask = torch.randint(0, 32, (2, seq_len)), torch.ones(2, seq_len)
        with torch.no_grad():
            torch.testing.assert_close(compiled(ids, mask), model(ids, mask))
    assert compiled.token_inputs == {"input_ids": 1, "attention_mask": 1}


def test_backed_marking_compiles_a_second_graph_for_t1() -> None:
    """Why "unbacked" is the default: mark_dynamic cannot hold T=1 (Dynamo specialises it), so a
    backed token dim costs a T=1 graph and a T >= 2 graph; each one's first call is warmup.

    token_inputs named, so the T=1 call compiles (inferred ones would wait for T > 1)."""
    model = FlatDecoder(DECODER).eval()
    compiled = stable_compile(model, backend="eager", dynamic_dim="backed", enforce=True,
                              token_inputs={"input_ids": 0, "positions": 0})
    cache = model.new_kv_cache()
    graphs_before = unique_graphs()
    with torchpcg.expect(recompiles=0):
        for num_tokens in (1, 3, 7, 1, 2):
            compiled(torch.randint(0, 512, (num_tokens,)), torch.arange(num_tokens), cache)
    assert unique_graphs() - graphs_before == 2 and compiled.recompiles == []


def test_inference_mode_option() -> None:
    model = FlatDecoder(DECODER).eval()
    compiled = stable_compile(model, backend="eager", inference_mode=True, enforce=True)
    cache = model.new_kv_cache()
    with torch.enable_grad():
        out = compiled(torch.tensor([3]), torch.tensor([0]), cache)
    out = compiled(torch.tensor([4, 5]), torch.tensor([1, 2]), cache)
    assert out.is_inference() and not out.requires_grad


# ---- knobs ---------------------------------------------------------------------------------------

def test_knobs_validated_and_passed() -> None:
    model = FlatDecoder(DECODER).eval()
    with pytest.raises(ConfigError, match=r"knobs \['capture_sizes'\] only apply to backend='piecewise'"):
        stable_compile(model, backend="eager", capture_sizes=(1, 2))
    with pytest.raises(ConfigError, match="unknown torchpcg option 'bucket_sizes'"):
        stable_compile(model, bucket_sizes=(1, 2))
    with pytest.raises(ConfigError, match="dynamic_dim='sometimes'"):
        stable_compile(model, dynamic_dim="sometimes")
    assert stable_compile(model, backend="eager", enforce=True).config.enforce
    compiled = stable_compile(model, PiecewiseConfig(max_capture_size=64), cudagraph="emulate", capture_sizes="1,8")
    assert (compiled.config.capture_sizes, compiled.config.max_capture_size) == ((1, 8), 64)
    assert PiecewiseConfig.resolve(compiled.config.to_dict()) == compiled.config  # what options= carries
