"""Piece compiles: Inductor code with T backed for T >= 2 (compilers.compile_backed and
TokenDispatch) equals eager, and is used only where every assumption it made holds."""
from __future__ import annotations

import torch

import torchpcg
from torchpcg.compilers import ExactShapeCode, LazyCode, TokenDispatch, compile_backed
from torchpcg.layout import symbols_of
from torchpcg.token_shapes import token_symbol
from tests.utils import tiny_decoder


def _dynamo_graph(fn, *args):
    """Dynamo's graph of fn with dim 0 of the first argument unbacked, and its fake inputs."""
    got = {}

    def backend(gm, example_inputs):
        got["gm"] = gm
        got["fakes"] = [n.meta.get("example_value") for n in gm.graph.nodes if n.op == "placeholder"]
        return gm

    torch._dynamo.decorators.mark_unbacked(args[0], 0)
    torch.compile(fn, backend=backend, fullgraph=True)(*args)
    return got["gm"], got["fakes"]


def _real_args(fakes, x, w):
    """Real inputs in the graph's order: the token count, x [T, 16], w [16, 16]."""
    return [x.shape[0] if not isinstance(f, torch.Tensor) else x if isinstance(f.shape[0], torch.SymInt) else w
            for f in fakes]


def test_backed_code_is_kept_only_where_its_guards_hold():
    """A sum over T makes Inductor's CPU code assume T <= 4096: kept for T up to 8 and serving up
    to 4096 (proven by value ranges), refused for a range up to 8192."""
    def fn(x, w):
        h = x @ w
        return h.sum(0) + h

    x, w = torch.randn(6, 16), torch.randn(16, 16)
    gm, fakes = _dynamo_graph(fn, x, w)
    symbol = token_symbol(gm)
    backed = compile_backed(gm, fakes, symbol, 8, "inductor", "sum over T")
    assert backed is not None and backed.max_tokens == 4096
    for num_tokens in (2, 5, 8, 4096):
        x = torch.randn(num_tokens, 16)
        # fp32 sums over up to 4096 rows in another order: a summation-order tolerance
        torch.testing.assert_close(backed.code(*_real_args(fakes, x, w))[0], fn(x, w), rtol=1e-4, atol=2e-3)
    assert compile_backed(gm, fakes, symbol, 8192, "inductor", "sum over T") is None


def test_a_guard_is_proven_over_a_range_or_checked_at_each_T():
    """Value ranges prove a bound for a whole range; what they cannot prove is checked at each T;
    the range past the bucket stops where a guard stops holding."""
    import sympy

    from torchpcg.compilers import _holds, _proven_up_to

    t = sympy.Symbol("t", integer=True, positive=True)
    assert _holds(sympy.Le(2048 * t, 2**31 - 1), t, 2, 512)
    assert not _holds(sympy.Le(t, 300), t, 2, 512)
    assert _holds(sympy.Ne(t, 1), t, 2, 512)
    assert _proven_up_to({sympy.Le(2048 * t, 2**31 - 1)}, t, 512) == (2**31 - 1) // 2048
    assert _proven_up_to(set(), t, 512) == 2**31 - 1


def test_exact_shape_code_is_compiled_per_layout_and_falls_back_past_its_limit():
    """One compile per (sizes, strides) of the call; a transposed input gets code of its own, not
    code that assumed a contiguous one; past ``limit`` keys the fallback serves. All equal eager."""
    def fn(x, w):
        h = x @ w
        return (h.sum(1, keepdim=True) + h,)

    x, w = torch.randn(6, 16), torch.randn(16, 16)
    gm, fakes = _dynamo_graph(fn, x, w)
    fallback_calls = []
    exact = ExactShapeCode(gm, "inductor", "test", _counting(gm, fallback_calls), limit=2)
    x1 = torch.randn(1, 16)
    x_t = torch.randn(16, 2).t()  # [2, 16], strides (1, 2)
    for x in (x1, x1.clone(), x_t, torch.randn(3, 16)):
        torch.testing.assert_close(exact(*_real_args(fakes, x, w))[0], fn(x, w)[0])
    assert len(exact.compiled) == 2 and len(fallback_calls) == 1  # [1, 16] once, [2, 16] transposed; T=3 past limit
    # A plain argument that cannot be a key (a list): the fallback serves, nothing is compiled.
    unkeyed = ExactShapeCode(gm, "inductor", "test", lambda *args: ("fallback", len(args)))
    assert unkeyed(x1, [0]) == ("fallback", 2) and not unkeyed.compiled


def test_a_failed_exact_shape_compile_hands_over_to_the_fallback(caplog):
    gm, fakes = _dynamo_graph(lambda x, w: (x @ w,), torch.randn(4, 16), torch.randn(16, 16))
    fallback_calls = []
    exact = ExactShapeCode(gm, "inductor", "test", _counting(gm, fallback_calls))
    exact.compiler = "no-such-compiler"  # compile_piece's assertion fails: as any compile error would
    x, w = torch.randn(1, 16), torch.randn(16, 16)
    for _ in range(2):
        torch.testing.assert_close(exact(*_real_args(fakes, x, w))[0], x @ w)
    assert exact.failed and not exact.compiled and len(fallback_calls) == 2
    assert "compiling for exact shapes failed" in caplog.text


def test_exact_shape_compiles_go_through_the_fx_graph_cache():
    """T=1's exact-shape compiles use Inductor's FX graph cache (a real-tensor compile bypasses it:
    "No shape env"), so a warm start loads them; identical middle layers share one compiled code
    in-process (``compilers.structure_key``) and meet the cache once."""
    from torch._dynamo.utils import counters

    from torchpcg.compilers import REUSED

    REUSED.clear()  # other tests in this process may have compiled the same pieces
    model = tiny_decoder(num_layers=4)
    cache, ref_cache = model.new_kv_cache(), model.new_kv_cache()
    with torchpcg.backend.collect_runtimes() as runtimes:
        compiled = torchpcg.compile(model, cudagraph="emulate", compiler="inductor", capture_sizes="1,2,4,8",
                                    token_inputs={"input_ids": 0, "positions": 0})
        with torch.no_grad():
            for position, num_tokens in ((0, 8), (8, 1)):
                if num_tokens == 1:
                    counters.clear()
                ids = torch.randint(0, model.config.vocab_size, (num_tokens,))
                positions = torch.arange(position, position + num_tokens)
                torch.testing.assert_close(compiled(ids, positions, cache), model(ids, positions, ref_cache))
    pieces = [r for runtime in runtimes for r in runtime.runners]
    assert [len(r.compiled.exact.compiled) for r in pieces] == [1] * len(pieces)
    inductor = counters["inductor"]
    assert inductor["fxgraph_cache_bypass"] == 0
    codes = [next(iter(r.compiled.exact.compiled.values())) for r in pieces]
    distinct = len({id(code) for code in codes})
    assert len(pieces) == 5 and distinct == 3  # first, middle x3 (one code), last
    assert inductor["fxgraph_cache_hit"] + inductor["fxgraph_cache_miss"] == distinct


def test_no_backed_code_for_a_graph_with_a_second_dynamic_size():
    def fn(x, y):
        return x.sum(0) + y.sum(0)

    x, y = torch.randn(5, 16), torch.randn(7, 16)
    torch._dynamo.decorators.mark_unbacked(y, 0)
    gm, fakes = _dynamo_graph(fn, x, y)
    symbols = {str(s) for f in fakes if isinstance(f, torch.Tensor) for s in symbols_of(f)}
    assert len(symbols) == 2, symbols  # T of x, and y's own size
    assert compile_backed(gm, fakes, token_symbol(gm), 8, "inductor", "two sizes") is None


def test_pieces_run_backed_code_from_T_2_up_and_compile_dynamos_code_on_first_use():
    """Inductor pieces: T >= 2 run the code compiled with T backed (above the largest bucket too:
    its guards are proven there), T=1 code compiled for its exact shapes; Dynamo's unbacked code
    is compiled only when a call needs it (here: T=1 once the exact code is off). Every call
    equals eager, no recompiles."""
    model = tiny_decoder(num_layers=2)
    cache, ref_cache = model.new_kv_cache(), model.new_kv_cache()
    late_before = torchpcg.stats()["late_compiles"]
    with torchpcg.backend.collect_runtimes() as runtimes:
        compiled = torchpcg.compile(model, cudagraph="emulate", compiler="inductor", capture_sizes="1,2,4,8",
                                    token_inputs={"input_ids": 0, "positions": 0})
        position, unbacked_calls, lazy = 0, [], []
        with torch.no_grad():
            for num_tokens in (5, 1, 3, 8, 2, 17, 1, 6):
                ids = torch.randint(0, model.config.vocab_size, (num_tokens,))
                positions = torch.arange(position, position + num_tokens)
                torch.testing.assert_close(compiled(ids, positions, cache), model(ids, positions, ref_cache))
                position += num_tokens
                if not lazy:  # compiled now: count the calls that reach the unbacked code
                    for dispatch in (r.compiled for runtime in runtimes for r in runtime.runners):
                        assert isinstance(dispatch, TokenDispatch) and isinstance(dispatch.other, LazyCode)
                        lazy.append(dispatch.other)
                        dispatch.other = _counting(dispatch.other, unbacked_calls)
        dispatches = [r.compiled for runtime in runtimes for r in runtime.runners]
        # T=1 runs code compiled once for its shapes (at capture; an emulated replay runs it
        # again), T=3, 8, 2, 6 and 17 (above the largest bucket) the backed code: nothing needed
        # Dynamo's code, so it was never compiled.
        assert dispatches and all(d.backed is not None and d.max_tokens >= 17 for d in dispatches)
        assert not unbacked_calls and all(code.code is None for code in lazy)
        assert [len(d.exact.compiled) for d in dispatches] == [1] * len(dispatches)
        assert torchpcg.stats()["late_compiles"] - late_before == len(dispatches)  # the exact T=1 code
        for d in dispatches:
            d.exact = None  # the exact code off: T=1 falls back to Dynamo's code, compiled now
        ids, positions = torch.randint(0, model.config.vocab_size, (1,)), torch.tensor([position])
        with torch.no_grad():
            torch.testing.assert_close(compiled(ids, positions, cache), model(ids, positions, ref_cache))
        assert all(code.code is not None for code in lazy) and len(unbacked_calls) >= len(dispatches)
        assert torchpcg.stats()["late_compiles"] - late_before == 2 * len(dispatches)  # and Dynamo's code
    torch.testing.assert_close(cache, ref_cache)
    assert torchpcg.stats()["recompiles"] == 0


def _counting(fn, calls):
    def run(*args):
        calls.append(1)
        return fn(*args)
    return run


def test_backed_compile_off_keeps_one_compile_per_piece():
    model = tiny_decoder(num_layers=2)
    cache, ref_cache = model.new_kv_cache(), model.new_kv_cache()
    with torchpcg.backend.collect_runtimes() as runtimes:
        compiled = torchpcg.compile(model, cudagraph="emulate", compiler="inductor", capture_sizes="1,2,4,8",
                                    backed_compile=False, token_inputs={"input_ids": 0, "positions": 0})
        with torch.no_grad():
            for position, num_tokens in ((0, 3), (3, 1), (4, 6)):
                ids = torch.randint(0, model.config.vocab_size, (num_tokens,))
                positions = torch.arange(position, position + num_tokens)
                torch.testing.assert_close(compiled(ids, positions, cache), model(ids, positions, ref_cache))
    runners = [r for runtime in runtimes for r in runtime.runners]
    assert runners and not any(isinstance(r.compiled, TokenDispatch) for r in runners)


def test_structure_key_is_equal_only_for_the_same_function_of_alike_inputs():
    """Identical code under other names shares a key; another constant, op, input shape or
    dtype does not; a graph that reads its own state (get_attr) has none."""
    from torchpcg.compilers import structure_key

    def scaled(x, w):
        return torch.nn.functional.linear(x, w) * 0.5

    def renamed(hidden, weight):
        return torch.nn.functional.linear(hidden, weight) * 0.5

    def other_constant(x, w):
        return torch.nn.functional.linear(x, w) * 0.25

    x, w = torch.randn(4, 8), torch.randn(8, 8)
    key = structure_key(torch.fx.symbolic_trace(scaled), [x, w])
    assert key is not None
    assert structure_key(torch.fx.symbolic_trace(renamed), [x, w]) == key
    assert structure_key(torch.fx.symbolic_trace(other_constant), [x, w]) != key
    assert structure_key(torch.fx.symbolic_trace(scaled), [torch.randn(5, 8), w]) != key
    assert structure_key(torch.fx.symbolic_trace(scaled), [x.double(), w.double()]) != key
    assert structure_key(torch.fx.symbolic_trace(torch.nn.Linear(8, 8)), [x]) is None  # weights are get_attr


def test_compile_sizes_get_exact_shape_code_and_the_rest_keep_the_backed_code():
    """compile_sizes=1,4: every piece compiles code for the exact shapes of T=1 and of bucket 4
    (where T=3 and T=4 are captured), and T=2, 8 and 17 run the code compiled with T backed.
    compile_sizes empty: no exact code, T=1 runs Dynamo's code. Every call equals eager."""
    model = tiny_decoder(num_layers=2)
    for sizes, exact_keys in (("1,4", 2), ("", 0)):
        torch._dynamo.reset()
        cache, ref_cache = model.new_kv_cache(), model.new_kv_cache()
        with torchpcg.backend.collect_runtimes() as runtimes:
            compiled = torchpcg.compile(model, cudagraph="emulate", compiler="inductor", capture_sizes="1,2,4,8",
                                        compile_sizes=sizes, token_inputs={"input_ids": 0, "positions": 0})
            position = 0
            with torch.no_grad():
                for num_tokens in (3, 1, 2, 8, 17, 4, 1):
                    ids = torch.randint(0, model.config.vocab_size, (num_tokens,))
                    positions = torch.arange(position, position + num_tokens)
                    torch.testing.assert_close(compiled(ids, positions, cache), model(ids, positions, ref_cache))
                    position += num_tokens
        dispatches = [r.compiled for runtime in runtimes for r in runtime.runners]
        assert dispatches and all(isinstance(d, TokenDispatch) for d in dispatches)
        assert all(d.exact_sizes == (frozenset({1, 4}) if sizes else frozenset()) for d in dispatches)
        assert [len(d.exact.compiled) for d in dispatches] == [exact_keys] * len(dispatches)
        if not sizes:  # T=1 had nothing else: Dynamo's code was compiled for it
            assert all(isinstance(d.other, LazyCode) and d.other.code is not None for d in dispatches)
        torch.testing.assert_close(cache, ref_cache)
    assert torchpcg.stats()["recompiles"] == 0
