"""The pieces' Inductor pass: a residual sum that is also a piece output compiles as in a whole graph."""
from __future__ import annotations

import pytest
import torch
from torch.fx.experimental.proxy_tensor import make_fx

import torchpcg
from torchpcg.inductor_passes import piece_passes, unfuse_output_addmm
from tests.utils import compare, tiny_decoder

aten = torch.ops.aten


def _norm(s: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    return s * torch.rsqrt((s * s).mean(-1, keepdim=True) + 1e-6) * g


def _residual_then_norm(h, x, w, g):
    s = torch.addmm(h, x, w)  # what Inductor makes of h + x @ w when s is also an output
    return s, _norm(s, g)


def _targets(gm: torch.fx.GraphModule) -> list:
    return [n.target for n in gm.graph.nodes if n.op == "call_function"]


def _inputs(bias_shape=(5, 8)):
    torch.manual_seed(0)
    return torch.randn(*bias_shape), torch.randn(5, 6), torch.randn(6, 8), torch.randn(8)


def test_a_sum_used_by_pointwise_ops_and_the_output_is_unfused_and_computes_the_same():
    args = _inputs()
    gm = make_fx(_residual_then_norm)(*args)
    expected = gm(*args)
    assert unfuse_output_addmm(gm.graph, device_types=("cpu",)) == 1
    gm.recompile()
    targets = _targets(gm)
    assert aten.addmm.default not in targets and aten.mm.default in targets and aten.add.Tensor in targets
    for got, want in zip(gm(*args), expected):
        torch.testing.assert_close(got, want)


def test_a_chain_of_residual_sums_is_unfused_from_the_output_back():
    """h1 feeds h2's addmm (not pointwise) until h2 is rewritten: both go, as Inductor fused both
    in a piece on the GPU (15 + 15 addmm kernels in the 16-layer bench decoder's profile)."""

    def chain(h, x, w, g):
        h1 = torch.addmm(h, x, w)
        h2 = torch.addmm(h1, _norm(h1, g)[:, :6], w)
        return h2, _norm(h2, g)

    args = _inputs()
    gm = make_fx(chain)(*args)
    expected = gm(*args)
    assert unfuse_output_addmm(gm.graph, device_types=("cpu",)) == 2
    gm.recompile()
    assert aten.addmm.default not in _targets(gm)
    for got, want in zip(gm(*args), expected):
        torch.testing.assert_close(got, want)


@pytest.mark.parametrize("case", ["broadcast bias", "reduction use", "output only", "beta", "other device"])
def test_other_addmms_are_left_fused(case):
    bias_shape = (8,) if case == "broadcast bias" else (5, 8)

    def fn(h, x, w, g):
        s = torch.addmm(h, x, w, beta=2.0) if case == "beta" else torch.addmm(h, x, w)
        if case == "output only":
            return s
        if case == "reduction use":
            return s, s.sum(0)
        return s, _norm(s, g)

    gm = make_fx(fn)(*_inputs(bias_shape))
    devices = ("cuda",) if case == "other device" else ("cpu",)
    assert unfuse_output_addmm(gm.graph, device_types=devices) == 0
    assert aten.addmm.default in _targets(gm)


@pytest.mark.parametrize("inp_rows", ["same symbol", "a number equal to the hint"])
def test_shapes_are_compared_without_adding_a_guard(inp_rows):
    """[8, 8] != [T, 8] with T's hint 8 would guard T == 8 and specialize T: the vision encoder
    compiled again on its next call that way. Only a provably equal shape is rewritten."""
    from torch._dynamo.source import ConstantSource
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.fx.experimental.symbolic_shapes import ShapeEnv

    env = ShapeEnv()
    tokens = env.create_symintnode(env.create_symbol(8, ConstantSource("T")), hint=8)
    with FakeTensorMode(shape_env=env):
        values = {"inp": torch.empty(tokens if inp_rows == "same symbol" else 8, 8),
                  "x": torch.empty(tokens, 6), "w": torch.empty(6, 8), "out": torch.empty(tokens, 8)}
    graph = torch.fx.Graph()
    inp, x, w = (graph.placeholder(name) for name in ("inp", "x", "w"))
    for node in (inp, x, w):
        node.meta["val"] = values[node.name]
    total = graph.call_function(aten.addmm.default, (inp, x, w))
    total.meta["val"] = values["out"]
    scaled = graph.call_function(aten.mul.Tensor, (total, 2.0))
    graph.output((total, scaled))
    assert unfuse_output_addmm(graph, device_types=("cpu",)) == (1 if inp_rows == "same symbol" else 0)
    assert env.guards == [] and not env.replacements


def test_a_users_own_post_grad_pass_is_kept_and_ours_left_out():
    import torch._inductor.config as inductor_config

    assert "post_grad_custom_post_pass" in piece_passes()  # installed by default
    with inductor_config.patch(post_grad_custom_post_pass=lambda graph: None):
        assert piece_passes() == {}


def _piece_codes(model, monkeypatch, passes: bool) -> list[str]:
    """Inductor's code for the model's pieces, compiled fresh (no FX graph cache, no in-process
    reuse), with the pieces' passes on or off; one call at T=7 checked against eager."""
    from torch._inductor.utils import run_and_get_code

    from torchpcg.compilers import REUSED

    REUSED.clear()
    if not passes:
        monkeypatch.setattr("torchpcg.compilers.piece_passes", dict)
    compiled = torch.compile(model, backend="piecewise", fullgraph=True,
                             options={"cudagraph": "cuda", "max_capture_size": 32})
    with torch._inductor.config.patch(fx_graph_cache=False):
        _, codes = run_and_get_code(compare, model, compiled, 7, start=5, atol=2e-2, rtol=2e-2)
    monkeypatch.undo()
    assert codes, "no Inductor code was generated"
    return codes


@pytest.mark.cuda
def test_decoder_pieces_compile_without_residual_addmm_and_equal_eager(monkeypatch):
    """On the GPU, Inductor fuses a piece's residual sum (a piece output) into addmm; with the
    pieces' pass it runs as mm + an add fused into the next norm, as in a whole-model graph, and
    the model still matches eager at every T, graphs on."""
    model = tiny_decoder("cuda", torch.bfloat16, hidden_size=128, num_heads=4, num_kv_heads=2, intermediate_size=256)
    without = _piece_codes(model, monkeypatch, passes=False)
    assert any("extern_kernels.addmm" in code for code in without)  # what the pass is for
    torch._dynamo.reset()
    codes = _piece_codes(model, monkeypatch, passes=True)
    assert not any("extern_kernels.addmm" in code for code in codes)
    assert any("extern_kernels.mm" in code for code in codes)
    compiled = torch.compile(model, backend="piecewise", fullgraph=True,
                             options={"cudagraph": "cuda", "max_capture_size": 32})
    for num_tokens in (1, 3, 8, 32, 33, 3):
        compare(model, compiled, num_tokens, start=5, atol=2e-2, rtol=2e-2)
    assert torchpcg.stats()["replays"] > 0
