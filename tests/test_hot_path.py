"""The per-call path: counters once per call, split ops called without nn.Module.__call__, and
``skip_module_guards`` (fewer Dynamo guards) still equal to eager and still catching moved weights."""
from __future__ import annotations

import torch

import torchpcg
from tests.utils import compare, tiny_decoder

EMULATE = {"cudagraph": "emulate", "compiler": "eager", "capture_sizes": "1,2,4,8"}
TOKENS = {"input_ids": 0, "positions": 0}


def test_replays_are_counted_per_piece_once_per_call():
    model = tiny_decoder(num_layers=2)  # 3 compute pieces around 2 attention ops
    compiled = torchpcg.compile(model, **EMULATE, token_inputs=TOKENS)
    for num_tokens in (3, 3, 5, 1, 1):
        compare(model, compiled, num_tokens, atol=1e-5, rtol=1e-5)
    stats = torchpcg.stats()
    # first use of buckets 4, 8, 1 captures (no replay); the repeats of 3 and 1 replay 3 pieces each
    assert stats["replays"] == 2 * 3 and stats["graph_calls"] == 5


def test_split_ops_run_through_their_generated_code():
    model = tiny_decoder(num_layers=2)
    with torchpcg.backend.collect_runtimes() as runtimes:
        compiled = torchpcg.compile(model, **EMULATE, token_inputs=TOKENS)
        compare(model, compiled, 3, atol=1e-5, rtol=1e-5)
    split_gm = runtimes[0].split.split_gm
    for piece in runtimes[0].split.split_pieces:
        bound = split_gm.__dict__[piece.name]
        assert bound.__self__ is piece.gm and bound.__func__.__name__ == "forward"  # generated, not _lazy_forward


def test_skip_module_guards_equals_eager_and_still_sees_moved_weights():
    model = tiny_decoder(num_layers=2)
    compiled = torchpcg.compile(model, **EMULATE, token_inputs=TOKENS, skip_module_guards=True)
    for num_tokens in (3, 1, 8, 5, 1):
        compare(model, compiled, num_tokens, atol=1e-5, rtol=1e-5)
    weight = next(model.parameters())
    weight.data = torch.randn_like(weight)  # same Parameter, new memory: the graphs read the old one
    for num_tokens in (3, 1):
        compare(model, compiled, num_tokens, atol=1e-5, rtol=1e-5)
    stats = torchpcg.stats()
    assert stats["recompiles"] == 0 and stats["recaptures"] == 1


def test_static_inputs_checked_by_the_cpp_loop_still_catch_a_moved_weight(monkeypatch):
    """CUDA builds check the ~115 parameter addresses in one C++ call; CPU builds lack it, so a
    Python stand-in with its contract runs here: calls that match return early, a move recaptures."""
    checks = []

    def ptrs_equal(tensors, ptrs, indices):
        checks.append(len(indices))
        return all(tensors[i].data_ptr() == ptrs[i] for i in indices)

    monkeypatch.setattr(torchpcg.runtime, "_PTRS_EQUAL", ptrs_equal)
    model = tiny_decoder(num_layers=2)
    compiled = torchpcg.compile(model, **EMULATE, token_inputs=TOKENS)
    for num_tokens in (3, 1, 3):
        compare(model, compiled, num_tokens, atol=1e-5, rtol=1e-5)
    weight = next(model.parameters())
    weight.data = torch.randn_like(weight)
    for num_tokens in (3, 1):
        compare(model, compiled, num_tokens, atol=1e-5, rtol=1e-5)
    stats = torchpcg.stats()
    assert stats["recompiles"] == 0 and stats["recaptures"] == 1
    # one check per call once the addresses are known; every parameter is among the static inputs
    assert len(checks) >= 4 and len(set(checks)) == 1 and checks[0] >= len(list(model.parameters()))


def test_each_piece_copies_only_what_no_earlier_graph_made():
    """Per call, the reference decoder copies input_ids and positions into the first piece and each
    attention output into the piece after it; everything else (residual stream, rotary tables, the
    causal mask made once per forward) is read in place from the graph that made it."""
    num_layers = 3
    model = tiny_decoder(num_layers=num_layers)
    with torchpcg.backend.collect_runtimes() as runtimes:
        compiled = torchpcg.compile(model, **EMULATE, token_inputs=TOKENS)
        for _ in range(2):  # capture, then replay
            compare(model, compiled, 3, atol=1e-5, rtol=1e-5)
    (runtime,) = runtimes
    copies = [len(plan.copies) for runner in runtime.runners for captured in runner.captured.values()
              for plan in captured.plans.values()]
    assert len(copies) == num_layers + 1 and copies == [2] + [1] * num_layers, copies


def test_a_pieces_input_copies_and_padding_go_out_as_one_foreach_each(monkeypatch):
    """Before a replay, the first piece's two token inputs are copied in one ``_foreach_copy_`` and
    their padding rows (T=3 in bucket 4) zeroed in one ``_foreach_zero_``; outputs equal eager."""
    calls = []
    real_copy, real_zero = torch._foreach_copy_, torch._foreach_zero_

    def foreach_copy(dsts, srcs, *rest, **kwargs):
        calls.append(("copy", len(dsts)))
        return real_copy(dsts, srcs, *rest, **kwargs)

    def foreach_zero(tensors):
        calls.append(("zero", len(tensors)))
        return real_zero(tensors)

    model = tiny_decoder(num_layers=2)
    compiled = torchpcg.compile(model, **EMULATE, token_inputs=TOKENS)
    compare(model, compiled, 3, atol=1e-5, rtol=1e-5)  # captures bucket 4
    monkeypatch.setattr(torch, "_foreach_copy_", foreach_copy)
    monkeypatch.setattr(torch, "_foreach_zero_", foreach_zero)
    for _ in range(2):
        compare(model, compiled, 3, atol=1e-5, rtol=1e-5)
    assert calls == [("copy", 2), ("zero", 2)] * 2, calls
    assert torchpcg.stats()["replays"] == 2 * 3
