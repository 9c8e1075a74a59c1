"""Where graphs are cut: attention, user ops, collectives, merges, and graphs without split points."""
from __future__ import annotations


import operator

import pytest
import torch
import torch.distributed as dist

import torchpcg
from torchpcg.backend import collect_runtimes
from torchpcg.split import split_reason


def _plan(fn, *args, **options):
    """Compile ``fn`` with the piecewise backend (emulated graphs), run it, return (out, runtime)."""
    options = {"cudagraph": "emulate", "compiler": "eager", "capture_sizes": (8,), **options}
    compiled = torch.compile(fn, backend="piecewise", fullgraph=True, options=options)
    with collect_runtimes() as runtimes:
        out = compiled(*args)
    return out, runtimes[-1]


def _tokens(num_tokens: int = 5, width: int = 8) -> torch.Tensor:
    x = torch.randn(num_tokens, width)
    torch._dynamo.mark_dynamic(x, 0)
    return x


def _kinds(runtime) -> list[str]:
    return ["split" if p.is_split_op else "piece" for p in runtime.split.pieces]


def test_sdpa_is_cut_and_results_match():
    def fn(x):
        h = torch.nn.functional.scaled_dot_product_attention(x[None], x[None], x[None])[0]
        return torch.relu(h) + 1

    x = _tokens()
    out, runtime = _plan(fn, x)
    torch.testing.assert_close(out, fn(x))
    assert _kinds(runtime) == ["piece", "split", "piece"]
    assert runtime.split.split_pieces[0].reasons[0].startswith("attention")


@pytest.mark.parametrize("op", [
    torch.ops.aten._scaled_dot_product_flash_attention.default,
    torch.ops.aten._scaled_dot_product_efficient_attention.default,
    torch.ops.aten._flash_attention_forward.default,
    torch.ops.aten.scaled_dot_product_attention.default,
])
def test_aten_attention_variants_are_split_ops(op):
    graph = torch.fx.Graph()
    node = graph.call_function(op, (graph.placeholder("q"),))
    assert split_reason(node, (), True).startswith("attention")


_lib = torch.library.Library("pcgtest", "DEF")  # noqa: our toy op namespace for these tests


@torch.library.custom_op("pcgtest::mix", mutates_args=())
def mix(x: torch.Tensor) -> torch.Tensor:
    """Token-mixing toy op with a known result: every row becomes the column sum."""
    return x.sum(0, keepdim=True).expand_as(x).clone()


@mix.register_fake
def _(x):
    return torch.empty_like(x)


def _with_mix(x):
    return mix(x * 2) * 3


def test_registered_custom_op_is_cut(monkeypatch):
    monkeypatch.setattr("torchpcg.split._USER_OPS", {})
    x = _tokens()
    torchpcg.register_splitting_op(mix)
    out, runtime = _plan(_with_mix, x)
    torch.testing.assert_close(out, (x * 2).sum(0, keepdim=True).expand_as(x) * 3)
    assert any("user split op (pcgtest::mix" in r for p in runtime.split.split_pieces for r in p.reasons)


def test_split_ops_option_and_env(monkeypatch):
    monkeypatch.setattr("torchpcg.split._USER_OPS", {})
    x = _tokens()
    _, runtime = _plan(_with_mix, x, split_ops="pcgtest::mix")
    assert "user split op (pcgtest::mix.default)" in runtime.split.split_pieces[0].reasons
    torch._dynamo.reset()
    monkeypatch.setenv("TORCHPCG_SPLIT_OPS", "pcgtest::mix")
    _, runtime = _plan(_with_mix, _tokens())
    assert "user split op (pcgtest::mix.default)" in runtime.split.split_pieces[0].reasons


def test_consecutive_split_ops_share_one_split_piece():
    def fn(x):
        a = torch.nn.functional.scaled_dot_product_attention(x[None], x[None], x[None])
        b = torch.nn.functional.scaled_dot_product_attention(a, a, a)[0]
        return b + 1

    x = _tokens()
    out, runtime = _plan(fn, x)
    torch.testing.assert_close(out, fn(x))
    assert len(runtime.split.split_pieces) == 1
    assert len(runtime.split.split_pieces[0].reasons) == 1  # both are 'attention (...)': listed once


def test_graph_without_split_point_is_one_piece_and_enforce_raises():
    def fn(x):
        return torch.relu(x) * 2

    x = _tokens()
    out, runtime = _plan(fn, x)
    torch.testing.assert_close(out, fn(x))
    assert _kinds(runtime) == ["piece"]
    torch._dynamo.reset()
    with pytest.raises(Exception, match="no split point found"):
        _plan(fn, _tokens(), enforce=True)


def test_graph_of_only_a_split_op():
    def fn(x):
        return torch.nn.functional.scaled_dot_product_attention(x[None], x[None], x[None])

    x = _tokens()
    out, runtime = _plan(fn, x)
    torch.testing.assert_close(out, fn(x))
    assert runtime.runners == [] or all(r.gm is not None for r in runtime.runners)


def test_tiny_piece_between_split_ops_is_merged():
    def fn(x):
        a = torch.nn.functional.scaled_dot_product_attention(x[None], x[None], x[None])
        a = a * 2  # one pointwise op between two attentions: cheaper eagerly than as a graph
        return torch.nn.functional.scaled_dot_product_attention(a, a, a)[0] @ torch.ones(8, 8)

    x = _tokens()
    out, runtime = _plan(fn, x)
    torch.testing.assert_close(out, fn(x))
    assert _kinds(runtime) == ["piece", "split", "piece"]
    assert any(r.startswith("merged: 1-op piece") for r in runtime.split.split_pieces[0].reasons)


@pytest.fixture
def one_rank_group(tmp_path):
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    yield dist.group.WORLD
    dist.destroy_process_group()


@pytest.mark.parametrize("split_collectives", [True, False])
def test_functional_collectives(one_rank_group, split_collectives):
    import torch.distributed._functional_collectives as funcol

    def fn(x):
        h = torch.relu(x) * 2
        h = funcol.all_reduce(h, "sum", one_rank_group)  # world of 1: the identity
        return h + 1

    x = _tokens()
    out, runtime = _plan(fn, x, split_collectives=split_collectives)
    torch.testing.assert_close(out, torch.relu(x) * 2 + 1)
    reasons = [r for p in runtime.split.split_pieces for r in p.reasons]
    if split_collectives:
        assert reasons and all(r.startswith("collective") for r in reasons)
        assert any("all_reduce" in r for r in reasons) and any("wait_tensor" in r for r in reasons)
    else:
        assert reasons == []


def test_nodes_touching_cpu_tensors_of_a_cuda_graph_run_eagerly():
    """A CPU op in a captured piece runs once at capture (its value frozen); a pageable CPU -> GPU
    copy cannot be captured at all. Fake CUDA tensors: the rule is read from shapes, no GPU needed."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.fx.passes.fake_tensor_prop import FakeTensorProp

    from torchpcg.backend import split_reasons
    from torchpcg.config import PiecewiseConfig

    def f(x, length):  # x on CUDA, length a host-side counter (a cache's cumulative_length)
        offset = length.to(x.device)
        return torch.relu(x + offset) * 2

    mode = FakeTensorMode()
    with mode:
        x, length = torch.empty(4, 8, device="cuda"), torch.empty((), dtype=torch.long)
    gm = torch.fx.symbolic_trace(f)
    FakeTensorProp(gm, mode).propagate(x, length)
    for node in gm.graph.nodes:
        node.meta["example_value"] = node.meta.get("val")
    reasons = {node.name: why for node, why in split_reasons(gm, PiecewiseConfig(), None).items()}
    assert list(reasons) == ["to"] and reasons["to"].startswith("host tensor")


def test_a_check_message_function_lifted_as_an_attribute_splits():
    """torch 2.11's Dynamo lifts ``torch._check(cond, lambda: msg)``'s message into a ``get_attr``
    node whose example value is the function, when ``cond`` is symbolic. ``split_module`` read
    symbols from that value and failed ("cannot extract sympy expressions from <function ...>"):
    the vision encoder's cuda tests met it on an H200 after a recompile made its patch count
    symbolic. The graph below has that shape, built by hand (torch 2.13 emits an assert node)."""
    from torchpcg.split import split_graph

    def message() -> str:
        return "rows must be even"

    root = torch.nn.Module()
    root._check_message = message
    graph = torch.fx.Graph()
    x = graph.placeholder("x")
    x.meta["example_value"] = torch.empty(4, 8)
    text = graph.get_attr("_check_message")
    text.meta["example_value"] = message
    rows = graph.call_function(torch.ops.aten.sym_size.int, (x, 0))
    even = graph.call_function(operator.eq, (graph.call_function(operator.mod, (rows, 2)), 0))
    graph.call_function(torch._check, (even, text))
    h = graph.call_function(torch.relu, (x,))
    cut = graph.call_function(torch.softmax, (h, 0))
    graph.output(graph.call_function(torch.neg, (cut,)))
    gm = torch.fx.GraphModule(root, graph)
    split = split_graph(gm, {cut: "softmax over the token dim"})
    x_in = torch.randn(4, 8)
    torch.testing.assert_close(split.split_gm(x_in), gm(x_in))
    assert [p.is_split_op for p in split.pieces][:2] == [False, True]  # cut at the softmax


def test_ops_reading_a_written_marked_cache_run_eagerly_and_a_read_only_table_stays_in_graphs():
    """A marked tensor the graph writes (a static KV cache) is per-request state: the ops reading
    it run eagerly, so graphs never hold its address. A marked tensor only read (a table kept at
    a fixed address) stays read in place by the graphs; a marked counter of <= 64 elements is copied."""
    from torchpcg.backend import collect_runtimes

    cache, table, count = torch.zeros(64, 8), torch.randn(64, 8), torch.zeros(1)
    for tensor in (cache, table, count):
        torch._dynamo.mark_static_address(tensor)

    def step(x, pos):  # x [T, 8]
        cache.index_copy_(0, pos, x)
        keys = cache[:, None].expand(64, 2, 8).reshape(64, 16)  # a view, then a copy: both read the cache
        return torch.relu(x @ keys[:8, :8].T + table[pos] + count)

    compiled = torch.compile(step, backend="piecewise", options={"cudagraph": "emulate", "compiler": "eager"})
    x, pos = torch.randn(5, 8), torch.arange(5)
    with collect_runtimes() as runtimes, torch.no_grad():
        got = compiled(x, pos)
    cache.zero_()
    torch.testing.assert_close(got, step(x, pos))
    (runtime,) = runtimes
    state_ops = [why for p in runtime.split.split_pieces for why in p.reasons if why.startswith("cache state")]
    assert len(state_ops) >= 3  # the getitem view, the expand view and the reshape copy
    read_in_place = {name for runner in runtime.runners for name in runner.static_names.values()}
    assert any("table" in name for name in read_in_place)
    assert not any("cache" in name or "count" in name for name in read_in_place)
