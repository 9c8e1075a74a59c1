"""Full-decode graphs (``cudagraph_mode="full_and_piecewise"``): one whole-forward graph per exact
T up to ``full_max_size``, piecewise graphs above. Emulated graphs on CPU; real ones at the end."""
from __future__ import annotations

import logging

import pytest
import torch
import torch.nn.functional as F

import torchpcg
from tests.utils import SideEffects, tiny_decoder, without_graphs

FULL = {"cudagraph_mode": "full_and_piecewise", "full_max_size": 4, "capture_sizes": "1,2,4,8,16"}
TOKENS = (5, 1, 1, 1, 3, 3, 2, 4, 4, 9, 1, 17, 1, 2)  # repeats: a full graph replays from a T's second call


def _serve(model, compiled, device="cpu", atol=1e-5, rtol=1e-5):
    """Decode-like traffic against one cache; outputs and the cache itself must equal eager."""
    cache, ref_cache = model.new_kv_cache(device), model.new_kv_cache(device)
    position = 0
    with torch.no_grad():
        for num_tokens in TOKENS:
            ids = torch.randint(0, model.config.vocab_size, (num_tokens,), device=device)
            positions = torch.arange(position, position + num_tokens, device=device)
            torch.testing.assert_close(compiled(ids, positions, cache), model(ids, positions, ref_cache),
                                       atol=atol, rtol=rtol)
            position += num_tokens
    torch.testing.assert_close(cache, ref_cache, atol=atol, rtol=rtol)


@pytest.mark.parametrize("entry", ["torchpcg.compile", "torch.compile"])
def test_full_graphs_equal_eager_and_serve_small_calls(entry):
    model = tiny_decoder(num_layers=3)
    if entry == "torchpcg.compile":
        compiled = torchpcg.compile(model, cudagraph="emulate", compiler="eager", **FULL,
                                    token_inputs={"input_ids": 0, "positions": 0})
    else:  # Dynamo's static T=1 graph and its dynamic graph both get full graphs
        compiled = torch.compile(model, backend="piecewise", options={"cudagraph": "emulate", "compiler": "eager", **FULL})
    _serve(model, compiled)
    stats = torchpcg.stats()
    # T in 1..4 after its first call: 1 x4 (T=1 repeats), 3, 4, 2 -> at least 5 whole-forward calls
    assert stats["full_graph_calls"] >= 5, stats
    # Without graphs: T=17 (above the largest bucket) and the first call of each T <= 4 per Dynamo
    # graph, the full graph's warm-up: 1, 3, 2, 4; torch.compile also has Dynamo's first graph,
    # static at T=5 (warmed, never called again), and its static T=1 graph beside the dynamic one.
    warmups = 4 if entry == "torchpcg.compile" else 5
    assert without_graphs(stats) == 1 + warmups and stats["recompiles"] == 0


@pytest.mark.parametrize("compiler", ["eager", "inductor"])
def test_side_effects_happen_once_inside_a_full_graph(compiler):
    """T's first call (the warm-up, no graph), its capture and its replays each write once. With
    Inductor the full graphs run the whole Dynamo graph, split ops inside, compiled for each T."""
    model, reference = SideEffects().eval(), SideEffects().eval()
    reference.load_state_dict(model.state_dict())
    with torchpcg.backend.collect_runtimes() as runtimes:
        compiled = torch.compile(model, backend="piecewise", dynamic=True,
                                 options={"cudagraph": "emulate", "compiler": compiler, **FULL})
        cache, ref_cache = torch.zeros(16), torch.zeros(16)
        with torch.no_grad():
            for num_tokens in (2, 2, 2, 3, 3, 8):
                x = torch.randn(num_tokens, 16)
                torch.testing.assert_close(compiled(x, cache), reference(x, ref_cache))
    assert int(model.calls) == int(reference.calls) == 6
    torch.testing.assert_close(cache, ref_cache)
    assert torchpcg.stats()["full_graph_calls"] == 3  # T=2 twice, T=3 once; T=8 is piecewise
    assert [r.full.whole_graph for r in runtimes] == [compiler == "inductor"]
    assert [r.full.compiled_sizes for r in runtimes] == [[2, 3] if compiler == "inductor" else []]
    assert [r.full.compiles for r in runtimes] == [1 if compiler == "inductor" else 0]  # one backed compile: T=2, 3


@pytest.mark.parametrize("backed_compile", [True, False])
def test_full_graphs_with_inductor_equal_eager(backed_compile):
    """Inductor code of the whole forward: static at T=1 and one compile with T backed for T=2..4;
    with backed_compile=0, static code per T."""
    model = tiny_decoder(num_layers=3)
    with torchpcg.backend.collect_runtimes() as runtimes:
        compiled = torchpcg.compile(model, cudagraph="emulate", compiler="inductor", **FULL,
                                    backed_compile=backed_compile, token_inputs={"input_ids": 0, "positions": 0})
        _serve(model, compiled)
    assert [(r.full.compiled_sizes, r.full.compiles) for r in runtimes] == [([1, 2, 3, 4], 2 if backed_compile else 4)]
    assert torchpcg.stats()["recompiles"] == 0


def test_written_input_that_moves_turns_full_graphs_off(caplog):
    model = tiny_decoder(num_layers=2)
    compiled = torchpcg.compile(model, cudagraph="emulate", compiler="eager", **FULL,
                                token_inputs={"input_ids": 0, "positions": 0})
    with torch.no_grad(), caplog.at_level(logging.WARNING, logger="torchpcg.full"):
        for step in range(4):
            cache = model.new_kv_cache()  # a new cache on every call: the graph's cache is stale
            ids, positions = torch.randint(0, 512, (1,)), torch.tensor([step])
            torch.testing.assert_close(compiled(ids, positions, cache), model(ids, positions, model.new_kv_cache()),
                                       atol=1e-5, rtol=1e-5)
    assert "kv_cache" in caplog.text and "changed address" in caplog.text
    assert torchpcg.stats()["full_graph_calls"] == 1  # the second call captured; the third saw the move


@torch.library.custom_op("torchpcg_full_tests::mix", mutates_args=())
def _mix(x: torch.Tensor) -> torch.Tensor:
    return x.cumsum(0)  # reads earlier rows: a split op


@_mix.register_fake
def _(x: torch.Tensor) -> torch.Tensor:
    return torch.empty_like(x)


class _Mixer(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.proj = torch.nn.Linear(16, 16)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(_mix(self.proj(x)))


@pytest.mark.parametrize("capturable", [False, True])
def test_only_capturable_split_ops_go_inside(capturable, caplog):
    torchpcg.register_splitting_op("torchpcg_full_tests::mix", capturable=capturable)
    model = _Mixer().eval()
    compiled = torch.compile(model, backend="piecewise", dynamic=True,
                             options={"cudagraph": "emulate", "compiler": "eager", **FULL})
    with torch.no_grad(), caplog.at_level(logging.WARNING, logger="torchpcg.backend"):
        for num_tokens in (2, 2, 2, 6):
            x = torch.randn(num_tokens, 16)
            torch.testing.assert_close(compiled(x), model(x))
    calls = torchpcg.stats()["full_graph_calls"]
    if capturable:
        assert calls == 2
    else:
        assert calls == 0 and "torchpcg_full_tests::mix" in caplog.text and "capturable=True" in caplog.text


def test_sdpa_model_gets_full_graphs():
    class Attn(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.proj = torch.nn.Linear(16, 16)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            h = self.proj(x)[None]
            return self.proj(F.scaled_dot_product_attention(h, h, h, is_causal=True)[0])

    model = Attn().eval()
    compiled = torch.compile(model, backend="piecewise", dynamic=True,
                             options={"cudagraph": "emulate", "compiler": "eager", **FULL})
    with torch.no_grad():
        for num_tokens in (3, 3, 3, 7, 7):
            x = torch.randn(num_tokens, 16)
            torch.testing.assert_close(compiled(x), model(x))
    assert torchpcg.stats()["full_graph_calls"] == 2


@pytest.mark.cuda
@pytest.mark.parametrize("compiler", ["eager", "inductor"])
def test_full_graphs_on_cuda(compiler):
    model = tiny_decoder("cuda", torch.float32, num_layers=3)
    with torchpcg.backend.collect_runtimes() as runtimes:
        compiled = torchpcg.compile(model, compiler=compiler, **FULL, token_inputs={"input_ids": 0, "positions": 0})
        _serve(model, compiled, device="cuda", atol=1e-4, rtol=1e-4)
    stats = torchpcg.stats()
    assert stats["full_graph_calls"] >= 5 and stats["capture_failures"] == 0 and stats["recompiles"] == 0
    assert all(r.full.whole_graph == (compiler == "inductor") for r in runtimes) and runtimes
    if compiler == "inductor":  # T=1 static, T=2..4 one backed compile
        assert [(r.full.compiled_sizes, r.full.compiles) for r in runtimes] == [([1, 2, 3, 4], 2)]
    torch.randint(0, 10, (4,), device="cuda")  # the CUDA generator is out of capture mode


@pytest.mark.parametrize("capturable", [False, True])
def test_explain_says_whether_full_graphs_serve_the_model(capturable):
    torchpcg.register_splitting_op("torchpcg_full_tests::mix", capturable=capturable)
    report = torchpcg.explain(_Mixer().eval(), torch.randn(4, 16), options=FULL)
    full = report.to_dict()["graphs"][0]["full_graphs"]
    if capturable:
        assert full.startswith("T <= 4") and "full-decode graphs: T <= 4" in str(report)
    else:
        assert full.startswith("off: ") and "torchpcg_full_tests::mix" in full
