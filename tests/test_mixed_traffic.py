"""Server traffic: every call a token count not seen before, on a model with its KV cache in module
buffers and SDPA inside its attention op (``BufferDecoder``). Pins: same numbers as eager at every
T, no recompile and no recapture after warm-up, SDPA's kernel order while a call runs (cuDNN last,
the caller's order back afterwards) and the host-time split in ``stats()["host_us"]``."""
from __future__ import annotations

import random

import pytest
import torch

import torchpcg
from torchpcg import sdpa
from torchpcg.models import DecoderConfig
from torchpcg.models.buffer_decoder import BUFFER_ATTENTION_OP, BufferDecoder

BUCKETS = "1,2,4,8,16"
CONFIG = DecoderConfig(num_layers=2, max_seq_len=128)


@pytest.fixture(autouse=True)
def _attention_is_a_split_op():
    torchpcg.register_splitting_op(BUFFER_ATTENTION_OP)  # what the model's author does


def _pair(device: str = "cpu", dtype: torch.dtype = torch.float32) -> tuple[BufferDecoder, BufferDecoder]:
    """The model to compile and an identical one to run eagerly; both caches start from zeros."""
    return (BufferDecoder(CONFIG).to(device, dtype).eval(), BufferDecoder(CONFIG).to(device, dtype).eval())


def _compiled(kind: str, model: BufferDecoder, **options):
    if kind == "plain":
        return torch.compile(model, backend="piecewise", options={"capture_sizes": BUCKETS, **options})
    return torchpcg.compile(model, capture_sizes=BUCKETS, **options)


def _new_t_every_call(compiled, model: BufferDecoder, reference: BufferDecoder, device: str, atol: float,
                      rtol: float) -> None:
    """Warm up, reset the cache in place, then 25 calls each at a T not used before (inside and
    above the buckets), each checked against the eager twin; the counters must not move."""
    make = lambda n: (torch.randint(1, CONFIG.vocab_size, (n,), device=device), torch.arange(n, device=device))  # noqa: E731
    with torch.no_grad():  # plain torch.compile guards on grad mode: warm up as traffic will run
        torchpcg.capture(compiled, make, progress=False)
    model.reset_cache()  # the warm-up wrote positions 0..15; the twin never saw them
    sizes = [t for t in range(1, 31) if t not in (1, 2, 4, 8, 16)]
    random.Random(0).shuffle(sizes)
    with torchpcg.expect(recompiles=0, recaptures=0, captured=0, fallbacks=0):
        for num_tokens in sizes:  # each call writes slots 40.. and attends to them and the zeros below
            ids = torch.randint(1, CONFIG.vocab_size, (num_tokens,), device=device)
            positions = torch.arange(40, 40 + num_tokens, device=device)
            with torch.no_grad():
                got, want = compiled(ids, positions), reference(ids, positions)
            torch.testing.assert_close(got.float(), want.float(), atol=atol, rtol=rtol, msg=f"T={num_tokens}")


@pytest.mark.parametrize("kind", ["plain", "torchpcg"])
def test_every_call_a_new_t_matches_eager_without_recompiles(kind: str) -> None:
    model, reference = _pair()
    compiled = _compiled(kind, model, cudagraph="emulate", compiler="eager")
    _new_t_every_call(compiled, model, reference, "cpu", atol=1e-5, rtol=1e-4)


def test_host_times_split_each_call_around_its_replays() -> None:
    model, _ = _pair()
    compiled = _compiled("plain", model, cudagraph="emulate", compiler="eager")
    with torch.no_grad():
        torchpcg.capture(compiled, lambda n: (torch.ones(n, dtype=torch.long), torch.arange(n)), progress=False)
        torchpcg.reset_stats()
        for num_tokens in (3, 5, 9):
            compiled(torch.ones(num_tokens, dtype=torch.long), torch.arange(num_tokens))
        host = torchpcg.stats()["host_us"]
        assert host["calls"] == 3
        assert host["replays"] > 0 and host["between"] > 0  # three pieces replayed, two split ops between
        parts = host["before"] + host["replays"] + host["between"] + host["after"]
        assert abs(parts - host["total"]) <= 0.5  # each part rounded to 0.1 µs
        assert host["max"] >= host["total"]
        torchpcg.reset_stats()
        compiled(torch.ones(20, dtype=torch.long), torch.arange(20))  # above the largest bucket: no graph
        host = torchpcg.stats()["host_us"]
    assert host["calls"] == 1 and host["replays"] == 0 and host["before"] == host["total"]
    torchpcg.reset_stats()
    assert torchpcg.stats()["host_us"] == {"calls": 0}


def test_cudnn_last_moves_only_cudnn() -> None:
    cudnn = int(torch.nn.attention.SDPBackend.CUDNN_ATTENTION)
    flash, efficient = int(torch.nn.attention.SDPBackend.FLASH_ATTENTION), int(torch.nn.attention.SDPBackend.EFFICIENT_ATTENTION)
    assert sdpa.cudnn_last([cudnn, flash, efficient]) == [flash, efficient, cudnn]
    assert sdpa.cudnn_last([flash, efficient, cudnn]) == [flash, efficient, cudnn]


def test_sdpa_order_is_set_for_the_call_and_given_back(monkeypatch: pytest.MonkeyPatch) -> None:
    """The C++ order is process state on every build, so the enter/exit contract runs on CPU too;
    only torch's lazy default choice needs a GPU (skipped here, run by the cuda test below)."""
    monkeypatch.setattr(sdpa, "_settle", lambda device: None)
    original = torch._C._get_sdp_priority_order()
    cudnn_first = [int(torch.nn.attention.SDPBackend.CUDNN_ATTENTION)] + sdpa.cudnn_last(original)[:-1]
    torch._C._set_sdp_priority_order(cudnn_first)
    try:
        order = sdpa.SdpaOrder(True, torch.device("cuda"))
        previous = order.enter()
        assert torch._C._get_sdp_priority_order() == sdpa.cudnn_last(cudnn_first)
        order.exit(previous)
        assert torch._C._get_sdp_priority_order() == cudnn_first
        for off in (sdpa.SdpaOrder(False, torch.device("cuda")), sdpa.SdpaOrder(True, torch.device("cpu"))):
            assert off.enter() is None and torch._C._get_sdp_priority_order() == cudnn_first
    finally:
        torch._C._set_sdp_priority_order(original)


# ---- real graphs ---------------------------------------------------------------------------------

@pytest.mark.cuda
@pytest.mark.parametrize("kind", ["plain", "torchpcg"])
def test_every_call_a_new_t_on_cuda(kind: str) -> None:
    model, reference = _pair("cuda", torch.bfloat16)
    _new_t_every_call(_compiled(kind, model), model, reference, "cuda", atol=3e-2, rtol=3e-2)


@pytest.mark.cuda
def test_split_ops_see_cudnn_last_and_the_caller_keeps_its_order(monkeypatch: pytest.MonkeyPatch) -> None:
    model, reference = _pair("cuda", torch.bfloat16)
    ids, positions = torch.randint(1, CONFIG.vocab_size, (5,), device="cuda"), torch.arange(5, device="cuda")
    with torch.no_grad():
        reference(ids, positions)  # eager SDPA first: torch has made its default choice
    callers_order = torch._C._get_sdp_priority_order()
    seen: list[list[int]] = []
    real = torch.nn.functional.scaled_dot_product_attention

    def recording(*args, **kwargs):
        seen.append(torch._C._get_sdp_priority_order())
        return real(*args, **kwargs)

    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", recording)
    compiled = _compiled("plain", model)
    with torch.no_grad():
        compiled(ids, positions)
    assert seen and all(order == sdpa.cudnn_last(callers_order) for order in seen)
    assert torch._C._get_sdp_priority_order() == callers_order
    seen.clear()
    off = _compiled("plain", BufferDecoder(CONFIG).to("cuda", torch.bfloat16).eval(), sdpa_order="torch")
    with torch.no_grad():
        off(ids, positions)
    assert seen and all(order == callers_order for order in seen)


@pytest.mark.cuda
def test_full_graphs_keep_the_callers_order_and_piecewise_calls_put_cudnn_last(monkeypatch: pytest.MonkeyPatch) -> None:
    """cudagraph_mode="full_and_piecewise": a call of T <= full_max_size warms up and captures one
    whole-forward graph per exact T, as a whole-model graph is captured, so its SDPA calls see the
    caller's order (cuDNN's plan built once, at capture); a call above it runs split ops eagerly
    at its real T, with cuDNN last. Both equal eager."""
    torchpcg.register_splitting_op(BUFFER_ATTENTION_OP, capturable=True)
    model, reference = _pair("cuda", torch.bfloat16)
    with torch.no_grad():
        reference(torch.tensor([1], device="cuda"), torch.tensor([0], device="cuda"))  # torch's own choice made
        reference.reset_cache()
    callers_order = torch._C._get_sdp_priority_order()
    seen: list[tuple[int, list[int]]] = []  # (T, SDPA order) of every SDPA call inside a compiled call
    recording_on = [False]
    real = torch.nn.functional.scaled_dot_product_attention

    def recording(q, *args, **kwargs):
        if recording_on[0]:
            seen.append((q.shape[2], torch._C._get_sdp_priority_order()))
        return real(q, *args, **kwargs)

    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", recording)
    compiled = _compiled("torchpcg", model, cudagraph_mode="full_and_piecewise")  # T unbacked from the first call
    torchpcg.reset_stats()
    position = 0
    with torch.no_grad():
        for num_tokens in (12, 1, 1, 1, 12):  # 12 > full_max_size: piecewise; T=1: warm-up, capture, replay
            ids = torch.randint(1, CONFIG.vocab_size, (num_tokens,), device="cuda")
            positions = torch.arange(position, position + num_tokens, device="cuda")
            recording_on[0] = True
            got = compiled(ids, positions)
            recording_on[0] = False
            torch.testing.assert_close(got.float(), reference(ids, positions).float(), atol=3e-2, rtol=3e-2)
            position += num_tokens
    assert {t for t, _ in seen} == {1, 12}
    assert all(order == callers_order for t, order in seen if t == 1)  # full graph: warm-up and capture
    assert all(order == sdpa.cudnn_last(callers_order) for t, order in seen if t == 12)  # eager split ops
    assert torch._C._get_sdp_priority_order() == callers_order
    assert torchpcg.stats()["full_graph_calls"] >= 1


def test_a_new_cache_per_request_read_only_by_the_split_op_costs_no_recapture() -> None:
    """The KV cache buffers reach only the attention op (run eagerly), so graphs never read them:
    a new cache per request (each buffer reassigned) is neither a move nor a copy."""
    model, reference = _pair()
    compiled = _compiled("plain", model, cudagraph="emulate", compiler="eager")
    make = lambda n: (torch.randint(1, CONFIG.vocab_size, (n,)), torch.arange(n))  # noqa: E731
    with torch.no_grad():
        torchpcg.capture(compiled, make, progress=False)
        with torchpcg.expect(recaptures=0, captured=0, dynamo_graphs=0):
            for request, num_tokens in enumerate((5, 3, 12)):
                for twin in (model, reference):  # a new cache per request, as a server might allocate it
                    for layer in twin.layers:
                        layer.self_attn.k_cache = torch.zeros_like(layer.self_attn.k_cache)
                        layer.self_attn.v_cache = torch.zeros_like(layer.self_attn.v_cache)
                ids = torch.randint(1, CONFIG.vocab_size, (num_tokens,))
                positions = torch.arange(num_tokens)
                torch.testing.assert_close(compiled(ids, positions), reference(ids, positions), atol=1e-5, rtol=1e-4,
                                           msg=f"request {request}")


def test_a_weight_copied_on_every_replay_shows_in_copied_bytes() -> None:
    """A parameter reassigned twice is copied on every replay from then on: the bytes show in
    stats()['copied_bytes'], one weight's worth per call more than before."""
    model, reference = _pair()
    compiled = _compiled("plain", model, cudagraph="emulate", compiler="eager")
    make = lambda n: (torch.randint(1, CONFIG.vocab_size, (n,)), torch.arange(n))  # noqa: E731
    weight_bytes = model.lm_head.weight.numel() * model.lm_head.weight.element_size()

    def bytes_per_call(calls: int = 3) -> float:
        torchpcg.reset_stats()
        for _ in range(calls):
            ids, positions = make(5)
            torch.testing.assert_close(compiled(ids, positions), reference(ids, positions), atol=1e-5, rtol=1e-4)
        return torchpcg.stats()["copied_bytes"] / calls

    with torch.no_grad():
        torchpcg.capture(compiled, make, progress=False)
        before = bytes_per_call()
        assert 0 < before < weight_bytes  # token inputs only
        for _ in range(2):  # moved twice: copied on every replay from then on
            for twin in (model, reference):
                twin.lm_head.weight = torch.nn.Parameter(twin.lm_head.weight.detach().clone())
            bytes_per_call(1)  # the move's own call recaptures
        assert bytes_per_call() == before + weight_bytes
