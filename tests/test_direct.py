"""``skip_guard_check``: after warm-up, Dynamo's compiled forward called without Dynamo.

Pinned: answers equal eager (token counts in and above the buckets, T=1 included), the direct
path really serves the calls (and the runtime's graphs behind it), a call whose argument kinds
changed goes through Dynamo, a moved weight is still recaptured, and the cases the direct path
must refuse (hooks, graph breaks, two compiled entries) keep every call on Dynamo.
"""
from __future__ import annotations

import logging

import pytest
import torch

import torchpcg
from tests.utils import compare, decoder_inputs, tiny_decoder
from torchpcg.direct import call_key

EMULATE = {"cudagraph": "emulate", "compiler": "eager", "capture_sizes": "1,2,4,8"}
TOKENS = {"input_ids": 0, "positions": 0}
MIX = (3, 1, 5, 8, 2, 11, 1, 7, 3)  # 11: above the largest bucket


def _compile(model, **knobs):
    return torchpcg.compile(model, **EMULATE, token_inputs=TOKENS, skip_guard_check=True, **knobs)


def test_direct_calls_equal_eager_and_serve_the_graphs():
    model = tiny_decoder(num_layers=2)
    compiled = _compile(model)
    for num_tokens in MIX:
        compare(model, compiled, num_tokens, atol=1e-5, rtol=1e-5)
    stats = torchpcg.stats()
    # call 1 compiles, call 2 runs through Dynamo and arms the direct path, the rest are direct
    assert compiled.direct_calls == len(MIX) - 2
    assert stats["recompiles"] == 0 and stats["dynamo_graphs"] == 1
    assert stats["graph_calls"] == len(MIX) - 1  # T=11 runs without graphs; every other call replays or captures


def test_a_direct_call_runs_without_grad_and_leaves_the_callers_grad_mode_as_it_was():
    model = tiny_decoder(num_layers=1)
    compiled = _compile(model)
    for num_tokens in (3, 5):
        compare(model, compiled, num_tokens, atol=1e-5, rtol=1e-5)
    ids, positions, cache = decoder_inputs(model, 2, mark=False)
    with torch.enable_grad():
        out = compiled(ids, positions, cache)
        assert torch.is_grad_enabled()  # restored after the call
    assert compiled.direct_calls == 1 and out.grad_fn is None and not out.requires_grad
    with pytest.raises((RuntimeError, IndexError)), torch.enable_grad():
        try:
            compiled(ids, positions[:1], cache)  # the same call key, rows that disagree: fails inside
        finally:
            assert torch.is_grad_enabled()
    assert compiled.direct_calls == 2


def test_guarded_direct_calls_are_the_default_and_equal_eager():
    """Without skip_guard_check, calls after warm-up pass Dynamo's own guards, then run its code directly."""
    model = tiny_decoder(num_layers=2)
    compiled = torchpcg.compile(model, **EMULATE, token_inputs=TOKENS)
    for num_tokens in MIX:
        compare(model, compiled, num_tokens, atol=1e-5, rtol=1e-5)
    assert compiled.guarded_calls == len(MIX) - 2 and compiled.direct_calls == 0
    stats = torchpcg.stats()
    assert stats["recompiles"] == 0 and stats["graph_calls"] == len(MIX) - 1


def test_a_submodule_replaced_after_warm_up_fails_a_guard_so_the_call_goes_through_dynamo():
    """What the call key cannot see and Dynamo's guards do: a submodule of another type."""
    model = tiny_decoder(num_layers=2)
    compiled = torchpcg.compile(model, **EMULATE, token_inputs=TOKENS)
    for num_tokens in (3, 5, 2):
        compare(model, compiled, num_tokens, atol=1e-5, rtol=1e-5)
    guarded_before = compiled.guarded_calls
    model.norm = torch.nn.Identity()  # eager sees it too
    for num_tokens in (3, 1):
        compare(model, compiled, num_tokens, atol=1e-5, rtol=1e-5)
    assert guarded_before == 1 and compiled.guarded_calls == guarded_before
    assert torchpcg.stats()["recompiles"] == 1


def test_guarded_direct_leaves_a_non_default_stance_to_dynamo():
    model = tiny_decoder(num_layers=1)
    compiled = torchpcg.compile(model, **EMULATE, token_inputs=TOKENS)
    for num_tokens in (3, 5, 2):
        compare(model, compiled, num_tokens, atol=1e-5, rtol=1e-5)
    guarded_before, graph_calls = compiled.guarded_calls, torchpcg.stats()["graph_calls"]
    with torch.compiler.set_stance("force_eager"):
        compare(model, compiled, 3, atol=1e-5, rtol=1e-5)
    assert compiled.guarded_calls == guarded_before and torchpcg.stats()["graph_calls"] == graph_calls
    compare(model, compiled, 3, atol=1e-5, rtol=1e-5)
    assert compiled.guarded_calls == guarded_before + 1


def test_a_guard_check_that_keeps_refusing_what_dynamo_serves_is_dropped():
    """If torchpcg's run of the guards refuses calls that Dynamo then serves without compiling,
    every call would pay both checks: after a few such calls the direct path is dropped."""
    model = tiny_decoder(num_layers=1)
    compiled = torchpcg.compile(model, **EMULATE, token_inputs=TOKENS)
    for num_tokens in (3, 5):
        compare(model, compiled, num_tokens, atol=1e-5, rtol=1e-5)
    assert compiled._direct is not None
    compiled._direct.guard = lambda f_locals: False  # a check that disagrees with Dynamo's frame hook
    for _ in range(12):
        compare(model, compiled, 2, atol=1e-5, rtol=1e-5)
    assert compiled._direct is None and compiled.guarded_calls == 0
    assert torchpcg.stats()["recompiles"] == 0


def test_guarded_direct_off_sends_every_call_through_dynamo():
    model = tiny_decoder(num_layers=1)
    compiled = torchpcg.compile(model, **EMULATE, token_inputs=TOKENS, guarded_direct=False)
    for num_tokens in (3, 5, 2, 1):
        compare(model, compiled, num_tokens, atol=1e-5, rtol=1e-5)
    assert compiled.guarded_calls == 0 and compiled.direct_calls == 0


def test_off_by_default():
    model = tiny_decoder(num_layers=1)
    compiled = torchpcg.compile(model, **EMULATE, token_inputs=TOKENS)
    for num_tokens in (3, 5, 2):
        compare(model, compiled, num_tokens, atol=1e-5, rtol=1e-5)
    assert compiled.direct_calls == 0


def test_a_call_with_other_argument_kinds_goes_through_dynamo():
    model = tiny_decoder(num_layers=1)
    compiled = _compile(model)
    for num_tokens in (3, 5, 2):
        compare(model, compiled, num_tokens, atol=1e-5, rtol=1e-5)
    direct_before = compiled.direct_calls
    ids, positions, cache = decoder_inputs(model, 4, mark=False)
    cache_ref = cache.clone()
    with torch.no_grad():
        expected = model(ids.int(), positions, cache_ref)  # int32 token ids: another call key
    got = compiled(ids.int(), positions, cache)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    assert compiled.direct_calls == direct_before  # Dynamo served it (and compiled again)
    assert torchpcg.stats()["recompiles"] == 1
    compare(model, compiled, 3, atol=1e-5, rtol=1e-5)  # after a recompile: Dynamo from now on
    assert compiled.direct_calls == direct_before


def test_a_moved_weight_is_recaptured_under_direct_calls():
    model = tiny_decoder(num_layers=2)
    compiled = _compile(model)
    for num_tokens in (3, 1, 3):
        compare(model, compiled, num_tokens, atol=1e-5, rtol=1e-5)
    weight = next(model.parameters())
    weight.data = torch.randn_like(weight)  # same Parameter object, new memory
    for num_tokens in (3, 1):
        compare(model, compiled, num_tokens, atol=1e-5, rtol=1e-5)
    stats = torchpcg.stats()
    assert compiled.direct_calls >= 3 and stats["recaptures"] == 1 and stats["recompiles"] == 0


def test_forward_hooks_keep_calls_on_dynamo(caplog):
    model = tiny_decoder(num_layers=1)
    model.register_forward_hook(lambda module, args, out: out * 2)  # compiled into the graph
    compiled = _compile(model)
    with caplog.at_level(logging.WARNING, logger="torchpcg.stable"):
        for num_tokens in (3, 3, 3):  # the second call would arm the direct path
            compare(model, compiled, num_tokens, atol=1e-5, rtol=1e-5)
    assert compiled.direct_calls == 0
    assert any("forward hooks" in r.getMessage() for r in caplog.records)


class _Broken(torch.nn.Module):
    """A graph break in the middle: the code after it is a resume function Dynamo compiles apart."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = torch.nn.Linear(8, 8), torch.nn.Linear(8, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.a(x)
        torch._dynamo.graph_break()
        return self.b(h)


def test_a_graph_break_keeps_calls_on_dynamo(caplog):
    model = _Broken().eval()
    compiled = torchpcg.compile(model, cudagraph="emulate", compiler="eager", token_inputs={"x": 0},
                                skip_guard_check=True, fullgraph=False)
    with caplog.at_level(logging.WARNING, logger="torchpcg.stable"), torch.no_grad():
        for num_tokens in (3, 3, 3):  # the second call would arm the direct path
            x = torch.randn(num_tokens, 8)
            torch.testing.assert_close(compiled(x), model(x))
    assert compiled.direct_calls == 0
    assert any("graph break" in r.getMessage() for r in caplog.records)


@pytest.mark.parametrize("dynamic_dim", ["backed", "off"])
def test_a_token_dim_dynamo_guards_on_keeps_calls_on_dynamo(caplog, dynamic_dim):
    """A backed T was compiled for T >= 2 (T=1 gets its own entry), a static one per size: the
    argument key leaves T out, so the direct code would run T=1 (or a new size) on the wrong entry."""
    model = tiny_decoder(num_layers=1)
    compiled = _compile(model, dynamic_dim=dynamic_dim)
    with caplog.at_level(logging.WARNING, logger="torchpcg.stable"):
        for num_tokens in (3, 3, 1, 5, 1, 2):  # the second call would arm the direct path
            compare(model, compiled, num_tokens, atol=1e-5, rtol=1e-5)
    assert compiled.direct_calls == 0
    assert any(f"the token dim is {dynamic_dim}" in r.getMessage() for r in caplog.records)


def test_call_key_leaves_out_token_dims_and_refuses_unknown_objects():
    a = {"ids": torch.zeros(3, dtype=torch.long), "cache": torch.zeros(2, 4), "flag": True}
    b = {"ids": torch.zeros(7, dtype=torch.long), "cache": torch.zeros(2, 4), "flag": True}
    assert call_key(a, {"ids": 0}) == call_key(b, {"ids": 0})
    assert call_key(a, {}) != call_key(b, {})  # without the token dim the sizes differ
    assert call_key({**a, "flag": False}, {"ids": 0}) != call_key(a, {"ids": 0})
    assert call_key({**a, "cache": torch.zeros(2, 5)}, {"ids": 0}) != call_key(a, {"ids": 0})
    assert call_key({"state": {"h": torch.zeros(3, 2)}}, {"state['h']": 0}) == \
        call_key({"state": {"h": torch.zeros(9, 2)}}, {"state['h']": 0})
    assert call_key({"cache": object()}, {}) is None
    assert call_key({**a, "cache": torch.zeros(4, 2).t()}, {"ids": 0}) != call_key(a, {"ids": 0})  # strides
    assert call_key({"ids": torch.zeros(1, 3)}, {"ids": 1}) == call_key({"ids": torch.zeros(1, 9)}, {"ids": 1})
    outside = call_key(a, {"ids": 0})
    with torch.autocast("cpu"):
        assert call_key(b, {"ids": 0}) != outside  # under autocast: another key
