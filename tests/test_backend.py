"""The piecewise backend end to end on the reference decoder, emulated graphs (CPU)."""
from __future__ import annotations

import sys

import pytest
import torch

import torchpcg
from torchpcg.config import default_capture_sizes
from tests.utils import compare, decoder_inputs, run_in_threads, tiny_decoder, without_graphs

MAX = 64
BUCKETS = default_capture_sizes(MAX)  # 1, 2, 4, 8, 16, ..., 64
TOKEN_COUNTS = sorted(set(BUCKETS) | {1, 2, 3, 7, 31, 64, 100, MAX, MAX + 1, 2 * MAX})


def _compile(model, **options):
    options = {"cudagraph": "emulate", "max_capture_size": MAX, **options}
    return torch.compile(model, backend="piecewise", fullgraph=True, options=options)


@pytest.mark.parametrize("compiler", ["eager", "inductor"])
def test_equals_eager_for_every_bucket_and_token_count(compiler):
    model = tiny_decoder()
    compiled = _compile(model, compiler=compiler)
    for num_tokens in TOKEN_COUNTS:
        compare(model, compiled, num_tokens, atol=1e-5, rtol=1e-5)
    stats = torchpcg.stats()
    assert without_graphs(stats) == sum(n > MAX for n in TOKEN_COUNTS)  # above the largest bucket: no graphs
    # Plain torch.compile specializes T=1 into a static graph of its own (torchpcg.compile avoids that).
    assert set(stats["capture_sizes"]) == set(BUCKETS) - {1}
    assert stats["replays"] > 0


def test_with_cache_context_and_graphs_off():
    model = tiny_decoder()
    compiled = _compile(model, cudagraph="off", compiler="eager")
    for num_tokens in (2, 5, 64, 65):
        compare(model, compiled, num_tokens, atol=1e-5, rtol=1e-5, start=10)
    stats = torchpcg.stats()
    assert stats["captured"] == 0 and without_graphs(stats) == 4 and stats["graph_calls"] == 0


def test_one_attention_split_per_layer():
    model = tiny_decoder(num_layers=3)
    compiled = _compile(model, compiler="eager")
    with torchpcg.expect(dynamo_graphs=1, split_ops=3, pieces=4):
        compiled(*decoder_inputs(model, 5))


def test_padding_rows_never_leak_from_an_earlier_call():
    model = tiny_decoder()
    compiled = _compile(model, compiler="eager", capture_sizes=(8,))
    compiled(*decoder_inputs(model, 8, seed=1))  # fills the bucket's 8 rows
    compare(model, compiled, 3, atol=1e-5, rtol=1e-5)
    runtime = _runtime_of(compiled, model, 3)
    for runner in runtime.runners:
        for index, view in runner.captured[8].token_views.items():
            dim = runner.inputs[index].layout.token_dims[0]
            assert torch.count_nonzero(view.narrow(dim, 3, 5)) == 0, f"{runner.name} input {index}"


def test_outputs_of_a_call_survive_the_next_call():
    model = tiny_decoder()
    compiled = _compile(model, compiler="eager", capture_sizes=(8,))
    first = compiled(*decoder_inputs(model, 6, seed=1))
    kept = first.clone()
    compiled(*decoder_inputs(model, 6, seed=2))
    assert torch.equal(first, kept)


def test_without_copy_outputs_the_next_call_overwrites():
    model = tiny_decoder()
    compiled = _compile(model, compiler="eager", capture_sizes=(8,), copy_outputs=False)
    compiled(*decoder_inputs(model, 6, seed=1))  # capture pass
    first = compiled(*decoder_inputs(model, 6, seed=1))
    kept = first.clone()
    compiled(*decoder_inputs(model, 6, seed=2))
    assert not torch.equal(first, kept)  # documented: outputs live in static buffers


def test_explicit_capture_goes_largest_first():
    model = tiny_decoder()
    compiled = _compile(model, compiler="eager", capture_sizes=(2, 4, 8))
    order = []
    summary = torchpcg.capture(compiled, lambda n: order.append(n) or decoder_inputs(model, n), sizes=(2, 4, 8),
                               progress=False)
    # largest first, then the largest again: plain torch.compile's first call made a static graph,
    # and the dynamic graph made on the second call serves that size from then on
    assert order == [8, 4, 2, 8] and summary["sizes"] == [8, 4, 2]
    assert torchpcg.stats()["capture_sizes"] == [2, 4, 8]
    with torchpcg.expect(captured=0, dynamo_graphs=0):
        for num_tokens in (2, 3, 8):
            compare(model, compiled, num_tokens, atol=1e-5, rtol=1e-5)


def test_capture_progress_names_the_bucket_while_it_is_captured(monkeypatch):
    """The bar names a bucket before its calls run (a slow bucket shows while it runs) and counts
    it done after; it ends closed with every bucket counted."""
    import tqdm.auto

    events = []

    class Bar:
        def __init__(self, total, **kwargs):
            self.n, self.total = 0, total

        def set_postfix(self, **kwargs):
            events.append(("naming", kwargs["capturing"]))

        def update(self, n):
            self.n += n
            events.append(("done", self.n))

        def close(self):
            events.append(("closed", self.n))

    monkeypatch.setattr(tqdm.auto, "tqdm", Bar)
    model = tiny_decoder()
    compiled = _compile(model, compiler="eager", capture_sizes=(2, 4))
    torchpcg.capture(compiled, lambda n: events.append(("call", n)) or decoder_inputs(model, n), sizes=(2, 4))
    assert events == [("naming", 4), ("call", 4), ("done", 1), ("naming", 2), ("call", 2), ("call", 4), ("done", 2),
                      ("closed", 2)]


class _Scaled(torch.nn.Module):
    """A non-token input (``scale``, [H]) read inside a piece: its address may change per call."""

    def __init__(self) -> None:
        super().__init__()
        self.proj = torch.nn.Linear(16, 16)

    def forward(self, x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        h = self.proj(x) * scale
        h = torch.nn.functional.scaled_dot_product_attention(h[None], h[None], h[None])[0]
        return self.proj(h) * scale


def test_new_user_tensor_each_call_is_copied_not_recaptured():
    model = _Scaled().eval()
    compiled = _compile(model, compiler="eager", capture_sizes=(4,))
    for step in range(4):
        x = torch.randn(3, 16)
        torch._dynamo.mark_dynamic(x, 0)
        scale = torch.full((16,), float(step + 1))  # a new tensor, new address, new values
        torch.testing.assert_close(compiled(x, scale), model(x, scale))
    stats = torchpcg.stats()
    assert stats["recaptures"] == 0 and stats["replays"] > 0
    assert stats["captured"] == stats["pieces"]  # one bucket: each piece captured once, never again


def test_static_input_that_moves_is_captured_again_once():
    model = _Scaled().eval()
    compiled = _compile(model, compiler="eager", capture_sizes=(4,))
    scale = torch.ones(16)

    def call():
        x = torch.randn(3, 16)
        torch._dynamo.mark_dynamic(x, 0)
        torch.testing.assert_close(compiled(x, scale), model(x, scale))

    call()
    call()
    captured = torchpcg.stats()["captured"]
    model.proj.weight.data = torch.randn(16, 16)  # same Parameter, new memory: graphs read the old one
    call()
    call()
    stats = torchpcg.stats()
    assert stats["recaptures"] == 1 and stats["captured"] == 2 * captured


def test_capture_failure_falls_back_and_enforce_raises(monkeypatch):
    model = tiny_decoder()
    compiled = _compile(model, compiler="eager", capture_sizes=(4, 8))
    from torchpcg.runtime import Runtime

    real = Runtime.make_graph

    def failing(self, fn, static_args, warm=True):
        if self.state.bucket == 4:
            raise torch.cuda.OutOfMemoryError("pretend the pool is full")
        return real(self, fn, static_args, warm)

    monkeypatch.setattr(Runtime, "make_graph", failing)
    compare(model, compiled, 3, atol=1e-5, rtol=1e-5)  # bucket 4 fails -> no graphs this call
    compare(model, compiled, 3, atol=1e-5, rtol=1e-5)  # bucket 4 dropped -> served by bucket 8
    stats = torchpcg.stats()
    assert stats["capture_failures"] == 1 and stats["capture_sizes"] == [8]

    torch._dynamo.reset()
    strict = _compile(model, compiler="eager", capture_sizes=(4,), enforce=True)
    with pytest.raises(torchpcg.CaptureError, match="bucket 4"):
        strict(*decoder_inputs(model, 3))


def test_a_graph_the_splitter_fails_on_runs_as_traced_and_enforce_raises(monkeypatch, caplog):
    """torch.fx's split_module failing on a graph shape (as it did on torch 2.11's lifted
    torch._check messages) costs speed, not the call: a warning, a fallback, eager's numbers."""
    model = tiny_decoder()

    def failing(*args, **kwargs):
        raise AssertionError("cannot extract sympy expressions from <function <lambda>>")

    monkeypatch.setattr("torchpcg.backend.split_graph", failing)
    compiled = _compile(model, compiler="eager")
    with caplog.at_level("WARNING", logger="torchpcg.backend"):
        for num_tokens in (3, 1, 9):
            compare(model, compiled, num_tokens, atol=1e-5, rtol=1e-5)
    assert "splitting a Dynamo graph" in caplog.text and "cannot extract sympy" in caplog.text
    stats = torchpcg.stats()
    assert stats["fallbacks"] >= 1 and stats["captured"] == 0 and stats["replays"] == 0

    torch._dynamo.reset()
    strict = _compile(model, compiler="eager", enforce=True)
    with pytest.raises(Exception, match="splitting a Dynamo graph"):
        strict(*decoder_inputs(model, 3))


def test_two_threads_never_share_static_buffers():
    model = tiny_decoder()
    compiled = _compile(model, compiler="eager", capture_sizes=(4, 8))
    compiled(*decoder_inputs(model, 8))
    compiled(*decoder_inputs(model, 3))
    def calls(num_tokens: int) -> None:
        for _ in range(20):
            compare(model, compiled, num_tokens, atol=1e-5, rtol=1e-5)

    run_in_threads(calls, (3, 7))


def test_second_dynamic_symbol_runs_without_graphs_or_raises_under_enforce():
    class TwoLengths(torch.nn.Module):
        def forward(self, x: torch.Tensor, memory: torch.Tensor) -> torch.Tensor:
            h = torch.nn.functional.scaled_dot_product_attention(x[None], x[None], x[None])[0]
            return h * 2 + memory.mean()  # memory [L] has its own dynamic length

    model = TwoLengths()
    compiled = _compile(model, compiler="eager", capture_sizes=(4,))
    for num_tokens, length in ((3, 5), (4, 9), (2, 17), (4, 3)):
        x, memory = torch.randn(num_tokens, 8), torch.randn(length)
        torch._dynamo.mark_dynamic(x, 0)
        torch._dynamo.mark_dynamic(memory, 0)
        torch.testing.assert_close(compiled(x, memory), model(x, memory))
    stats = torchpcg.stats()
    assert stats["graph_calls"] > 0 and stats["dynamo_graphs"] == 1  # handled: the mean over L runs eagerly

    torch._dynamo.reset()
    strict = _compile(model, compiler="eager", capture_sizes=(4,), enforce=True)
    x, memory = torch.randn(3, 8), torch.randn(5)
    torch._dynamo.mark_dynamic(x, 0)
    torch._dynamo.mark_dynamic(memory, 0)
    with pytest.raises(Exception, match="dynamic symbol.*L_memory_ dim 0"):
        strict(x, memory)


def _runtime_of(compiled, model, num_tokens):
    from torchpcg.backend import collect_runtimes

    torch._dynamo.reset()
    with collect_runtimes() as runtimes:
        compiled(*decoder_inputs(model, 8, seed=1))
        compiled(*decoder_inputs(model, num_tokens))
    return runtimes[-1]


def test_capture_without_sizes_uses_the_compiled_models_buckets():
    model = tiny_decoder()
    compiled = _compile(model, compiler="eager", capture_sizes=(2, 4, 8))
    order = []
    summary = torchpcg.capture(compiled, lambda n: order.append(n) or decoder_inputs(model, n), progress=False)
    assert order == [8, 4, 2, 8] and summary["sizes"] == [8, 4, 2]  # the options' buckets, not the defaults
    stable = torchpcg.compile(model, cudagraph="emulate", compiler="eager", capture_sizes=(3, 6))
    assert torchpcg.capture(stable, lambda n: decoder_inputs(model, n, mark=False), progress=False)["sizes"] == [6, 3]


@pytest.mark.parametrize("mode", ["default", "reduce-overhead", "max-autotune"])
def test_torch_compile_mode_keyword(mode, monkeypatch):
    """Hugging Face CompileConfig passes mode="reduce-overhead"; torch.compile refuses options= with a mode."""
    monkeypatch.setenv("TORCHPCG_CUDAGRAPH", "emulate")
    monkeypatch.setenv("TORCHPCG_COMPILER", "eager")  # max-autotune's Inductor patches are checked below
    model = tiny_decoder()
    with torchpcg.backend.collect_runtimes() as runtimes:
        compiled = torch.compile(model, backend="piecewise", mode=mode)
        for num_tokens in (3, 8, 1, 5, 8):
            compare(model, compiled, num_tokens, atol=1e-5, rtol=1e-5)
    assert runtimes and all(r.config.max_autotune == (mode == "max-autotune") for r in runtimes)
    assert torchpcg.stats()["replays"] > 0


def test_unknown_mode_names_the_value_and_the_allowed_ones():
    model = tiny_decoder()
    compiled = torch.compile(model, backend="piecewise", mode="fastest")
    with pytest.raises(Exception, match=r"mode='fastest'.*'reduce-overhead'.*'max-autotune'"):
        compare(model, compiled, 3, atol=1e-5, rtol=1e-5)


def test_capture_names_the_size_a_too_small_cache_cannot_hold():
    """The default buckets go to 512; a model with 256 cache slots fails at T=512 inside its own op.
    The error keeps its type and says which size failed and which knob leaves it out."""
    model = tiny_decoder(max_seq_len=256)
    compiled = torch.compile(model, backend="piecewise", options={"cudagraph": "emulate", "compiler": "eager"})
    cache = model.new_kv_cache()
    with pytest.raises(IndexError) as caught:
        torchpcg.capture(compiled, lambda n: (torch.zeros(n, dtype=torch.long), torch.arange(n), cache), progress=False)
    text = "\n".join(getattr(caught.value, "__notes__", []))
    assert sys.version_info < (3, 11) or ("T=512" in text and "max_capture_size" in text)


def test_a_resume_graph_after_a_graph_break_is_named_as_the_cause():
    """A resume function's stack inputs (L_stack0_, ...) tell that a graph break made the second
    dynamic size; the warning then names the break and how to find it. Other graphs: no hint."""
    from torchpcg.backend import graph_break_hint

    graph = torch.fx.Graph()
    stack, x = graph.placeholder("L_stack0_"), graph.placeholder("L_x_")
    graph.output(graph.call_function(torch.add, (stack, x)))
    hint = graph_break_hint(torch.fx.GraphModule(torch.nn.Module(), graph))
    assert "graph break" in hint and "L_stack0_" in hint and "TORCH_LOGS=graph_breaks" in hint
    plain = torch.fx.Graph()
    plain.output(plain.placeholder("L_x_"))
    assert graph_break_hint(torch.fx.GraphModule(torch.nn.Module(), plain)) == ""


def test_out_of_memory_retires_the_pool_for_every_graph_owner(monkeypatch):
    """One policy after a failed capture (runtime, full graphs, vision encoder graphs): out of CUDA
    memory retires the pool and empties the allocator's cache; any other failure leaves both."""
    from torchpcg.graphs import EmulatedPool, GraphPool, release_after_failed_capture

    emptied = []
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: emptied.append(True))
    pool = GraphPool.__new__(GraphPool)  # no CUDA here: only the fields retire() touches
    pool.retired, pool._keeper = False, object()
    release_after_failed_capture(pool, RuntimeError("operation not permitted when stream is capturing"))
    assert not pool.retired and not emptied
    release_after_failed_capture(pool, torch.cuda.OutOfMemoryError("pool full"))
    assert pool.retired and pool._keeper is None and emptied == [True]
    emulated = EmulatedPool()
    release_after_failed_capture(emulated, torch.cuda.OutOfMemoryError("pool full"))
    assert not emulated.retired and emptied == [True]
