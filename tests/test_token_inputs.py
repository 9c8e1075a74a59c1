"""torchpcg.compile finds token inputs by shape, not by name (issue 9, item 7).

The rule (docs/zero-recompiles.md): without ``token_inputs=``, calls with T <= 1 run the
uncompiled model until the first call with T > 1, whose shapes name the token inputs; that call
compiles. Every case runs mixed traffic with fresh tensors on every call (T=1 first or a large T
first, T=1 repeated, sizes repeated, T above the largest bucket) and checks: outputs equal the
uncompiled model, one Dynamo graph, zero recompiles (enforce on, so a recompile would raise).
"""
from __future__ import annotations

import logging

import pytest
import torch

import torchpcg
from tests.utils import unique_graphs
from torchpcg.models import DecoderConfig, FlatDecoder
from torchpcg.stable import compile_model as stable_compile
from torchpcg.token_inputs import resolve_token_layout

BUCKETS = "1,2,4,8,16"
PIECEWISE = dict(cudagraph="emulate", compiler="eager", capture_sizes=BUCKETS, enforce=True)
DECODER = DecoderConfig(num_layers=2)
TRAFFIC = (1, 1, 3, 5, 5, 1, 16, 40, 2, 1, 7, 8, 16, 33, 1, 4)  # 40, 33: above the largest bucket


pytestmark = pytest.mark.usefixtures("one_cpu_thread")



class WhereAmI(torch.nn.Module):
    """The reference decoder behind argument names torchpcg has never seen: positions arrive as
    ``where_am_i``, the KV cache as ``memory`` (its first dim is num_layers = 2: equals T at T=2)."""

    def __init__(self) -> None:
        super().__init__()
        self.decoder = FlatDecoder(DECODER)

    def forward(self, tokens: torch.Tensor, where_am_i: torch.Tensor, memory: torch.Tensor) -> torch.Tensor:
        return self.decoder(tokens, where_am_i, memory)


def _run_where_am_i(compiled, model: WhereAmI, traffic: tuple[int, ...]) -> None:
    """Each call: fresh ids and positions at a random offset; both caches hold the same history."""
    gen = torch.Generator().manual_seed(0)
    eager_cache = model.decoder.new_kv_cache()
    compiled_cache = model.decoder.new_kv_cache()
    for i, num_tokens in enumerate(traffic):
        tokens = torch.randint(0, DECODER.vocab_size, (num_tokens,), generator=gen)
        start = int(torch.randint(0, DECODER.max_seq_len - num_tokens + 1, (1,), generator=gen))
        where_am_i = torch.arange(start, start + num_tokens)
        compiled_cache.copy_(eager_cache)
        out = compiled(tokens, where_am_i, compiled_cache)
        with torch.no_grad():
            ref = model(tokens.clone(), where_am_i.clone(), eager_cache)
        torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5, msg=lambda m: f"call {i} T={num_tokens}: {m}")
        torch.testing.assert_close(compiled_cache, eager_cache, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("first", [1, 2, 40])  # T=1 first; T == num_layers first; above the largest bucket
def test_unseen_token_input_name_compiles_once(first: int) -> None:
    model = WhereAmI().eval()
    compiled = torchpcg.compile(model, **PIECEWISE)
    graphs_before = unique_graphs()
    with torchpcg.expect(recompiles=0):
        _run_where_am_i(compiled, model, (first,) + TRAFFIC)
    assert unique_graphs() - graphs_before == 1
    assert torchpcg.stats()["dynamo_graphs"] == 1 and torchpcg.stats()["captured"] > 0
    assert compiled.recompiles == []
    assert compiled.token_inputs == {"tokens": 0, "where_am_i": 0}  # not memory [2, 2, S, Hkv, D]
    assert compiled.eager_calls == (3 if first == 1 else 0)  # the T=1 calls before the first T=3


def test_t1_first_runs_uncompiled_and_says_why(caplog: pytest.LogCaptureFixture) -> None:
    model = WhereAmI().eval()
    compiled = torchpcg.compile(model, **PIECEWISE)
    cache = model.decoder.new_kv_cache()
    graphs_before = unique_graphs()
    with caplog.at_level(logging.INFO, logger="torchpcg.stable"):
        for position in range(3):
            compiled(torch.tensor([position + 5]), torch.tensor([position]), cache)
        assert compiled.token_inputs is None and compiled.eager_calls == 3
        assert torchpcg.stats()["dynamo_graphs"] == 0 and unique_graphs() == graphs_before
        compiled(torch.tensor([7, 8]), torch.tensor([3, 4]), cache)
    assert compiled.token_inputs == {"tokens": 0, "where_am_i": 0}
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "T > 1" in warnings[0] and "token_inputs=" in warnings[0]
    assert "token_inputs={'tokens': 0, ...}" in warnings[0]
    assert any("inferred from shapes at T=2" in r.getMessage() for r in caplog.records)


def test_named_token_inputs_compile_at_t1_first() -> None:
    model = WhereAmI().eval()
    compiled = torchpcg.compile(model, token_inputs={"tokens": 0, "where_am_i": 0}, **PIECEWISE)
    graphs_before = unique_graphs()
    _run_where_am_i(compiled, model, TRAFFIC[:1])
    assert compiled.eager_calls == 0 and torchpcg.stats()["dynamo_graphs"] == 1
    with torchpcg.expect(recompiles=0):
        _run_where_am_i(compiled, model, TRAFFIC)
    assert unique_graphs() - graphs_before == 1 and compiled.recompiles == []


def test_capture_before_traffic_infers_from_the_largest_bucket() -> None:
    model = WhereAmI().eval()
    compiled = torchpcg.compile(model, **PIECEWISE)
    graphs_before = unique_graphs()
    scratch = model.decoder.new_kv_cache()
    summary = torchpcg.capture(compiled, lambda n: (torch.zeros(n, dtype=torch.long), torch.arange(n), scratch),
                               progress=False)
    assert summary["sizes"] == [16, 8, 4, 2, 1]
    assert compiled.eager_calls == 0 and compiled.token_inputs == {"tokens": 0, "where_am_i": 0}
    assert torchpcg.stats()["capture_sizes"] == [1, 2, 4, 8, 16]
    with torchpcg.expect(recompiles=0, captured=0):  # traffic replays what capture made
        _run_where_am_i(compiled, model, tuple(t for t in TRAFFIC if t <= 16))
    assert unique_graphs() - graphs_before == 1


# ---- the coincidence rule ------------------------------------------------------------------------

def _layout(model: torch.nn.Module | None = None, **arguments: torch.Tensor) -> dict[str, int]:
    static = frozenset(id(t) for t in (*model.parameters(), *model.buffers())) if model is not None else frozenset()
    return resolve_token_layout(arguments, None, set(), static).dims


def test_shape_rule() -> None:
    T, H = 6, 8
    ids, pos = torch.zeros(T, dtype=torch.long), torch.arange(T)
    # Flat: every tensor with T rows at dim 0 and at most 2 dims, whatever its name.
    assert _layout(ids=ids, where_am_i=pos, slots=pos, hidden=torch.randn(T, H), other=torch.randn(5, H)) == {
        "ids": 0, "where_am_i": 0, "slots": 0, "hidden": 0}
    # [B, S] ids: dim 1; 1-D tensors (cache_position [S]) on dim 0; the batch dim never counts.
    batch_ids = torch.zeros(T, T, dtype=torch.long)  # B == S == 6
    assert _layout(input_ids=batch_ids, mask=torch.ones(T, T), cache_position=pos, embeds=torch.randn(T, T, H)) == {
        "input_ids": 1, "mask": 1, "cache_position": 0, "embeds": 1}
    assert _layout(input_ids=torch.zeros(2, T, dtype=torch.long), batch_index=torch.arange(2)) == {"input_ids": 1}


@pytest.mark.parametrize("name, tensor", [
    ("memory", torch.zeros(6, 2, 16, 2, 4)),  # more dims than primary.ndim + 1: a cache
    ("scratch_4d_mask", torch.zeros(6, 1, 6, 6)),
    ("kv_cache", torch.zeros(6, 64)),  # state names: any word past/kv, or last word cache, *_lens, *_table ...
    ("past_key_values", torch.zeros(6, 64)),
    ("key_cache", torch.zeros(6, 64)),
    ("seq_lens", torch.arange(6)),  # a decode batch has T == number of sequences
    ("cu_seqlens", torch.arange(6)),
    ("block_tables", torch.zeros(6, 4, dtype=torch.int32)),
    ("query_start_loc", torch.arange(6)),
])
def test_coincidences_are_not_token_inputs(name: str, tensor: torch.Tensor) -> None:
    ids = torch.zeros(6, dtype=torch.long)
    assert _layout(ids=ids, **{name: tensor}) == {"ids": 0}


def test_parameters_buffers_and_static_addresses_are_not_token_inputs() -> None:
    model = torch.nn.Linear(4, 6)  # weight [6, 4]: 6 rows like T
    model.register_buffer("table", torch.zeros(6, 3))
    static = torch.zeros(6, 5)
    torch._dynamo.mark_static_address(static)
    ids = torch.zeros(6, dtype=torch.long)
    assert _layout(model, ids=ids, weight=model.weight, buffer=model.table, static=static,
                   plain=torch.zeros(6, 5)) == {"ids": 0, "plain": 0}


class PerSequence(torch.nn.Module):
    """Flat tokens plus per-sequence lengths [B]: out[t] = embed(ids[t]) * (1 + sum(seq_lens))."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = torch.nn.Embedding(32, 4)

    def forward(self, ids: torch.Tensor, seq_lens: torch.Tensor) -> torch.Tensor:
        return self.embed(ids) * (1 + seq_lens.sum())


def test_decode_batch_with_t_equal_to_sequences_compiles_once() -> None:
    """First call: 3 sequences, 3 tokens; seq_lens must stay static, or T=5 with 3 sequences breaks."""
    model = PerSequence()
    compiled = stable_compile(model, backend="eager", enforce=True)
    graphs_before = unique_graphs()
    for num_tokens in (3, 5, 1, 9, 3):
        ids, seq_lens = torch.randint(0, 32, (num_tokens,)), torch.tensor([1, num_tokens, 2])
        with torch.no_grad():
            torch.testing.assert_close(compiled(ids, seq_lens), model(ids, seq_lens))
    assert compiled.token_inputs == {"ids": 0} and compiled.recompiles == [] and unique_graphs() - graphs_before == 1


def test_named_token_input_of_another_size_is_left_unmarked(caplog: pytest.LogCaptureFixture) -> None:
    """Marking a size != T with the token symbol would make Dynamo assert; it is passed unmarked,
    recompiled once (the monitor names it) and warned about with the fix."""
    model = PerSequence()
    compiled = stable_compile(model, backend="eager", token_inputs={"ids": 0, "seq_lens": 0})
    with caplog.at_level(logging.WARNING, logger="torchpcg.stable"):
        for num_tokens, num_seqs in ((3, 3), (4, 4), (5, 2), (6, 2)):
            ids, seq_lens = torch.randint(0, 32, (num_tokens,)), torch.arange(num_seqs)
            with torch.no_grad():
                torch.testing.assert_close(compiled(ids, seq_lens), model(ids, seq_lens))
    assert len(compiled.recompiles) == 1
    assert any("token input seq_lens has shape (2,), not T=5" in r.getMessage() for r in caplog.records)


# ---- Hugging Face [batch, seq] -------------------------------------------------------------------

def _llama():
    transformers = pytest.importorskip("transformers")
    config = transformers.LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2)
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM._from_config(config, attn_implementation="sdpa").eval()


@pytest.mark.parametrize("first, extra", [(1, "attention_mask"), (24, "position_ids")])
def test_hf_llama_batch_seq_inputs_compile_without_recompiles(first: int, extra: str) -> None:
    """Hugging Face's sdpa code branches on ``q_length > 1`` (transformers 5.x: "prefill and decode
    are 2 separate graphs anyway"), which an unbacked token dim cannot trace: torchpcg falls back to a
    backed one, so S=1 gets its own graph. Both graphs are warmup; nothing recompiles after that."""
    model = _llama()
    compiled = torchpcg.compile(model, **PIECEWISE)
    gen = torch.Generator().manual_seed(0)
    graphs_before = unique_graphs()
    with torchpcg.expect(recompiles=0):
        for i, seq_len in enumerate((first,) + TRAFFIC):
            input_ids = torch.randint(0, 256, (1, seq_len), generator=gen)
            second = torch.ones(1, seq_len, dtype=torch.long) if extra == "attention_mask" else \
                torch.arange(seq_len)[None]
            with torch.no_grad():
                ref = model(input_ids=input_ids, use_cache=False, **{extra: second}).logits
            got = compiled(input_ids=input_ids, use_cache=False, **{extra: second.clone()}).logits
            torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5, msg=lambda m: f"call {i} S={seq_len}: {m}")
    assert compiled.dynamic_dim == "backed"
    assert unique_graphs() - graphs_before == 2 and torchpcg.stats()["dynamo_graphs"] == 2  # S >= 2, S = 1
    assert compiled.recompiles == []
    assert compiled.token_inputs == {"input_ids": 1, extra: 1}
    assert compiled.eager_calls == (3 if first == 1 else 0)  # S=1 three times before S=3
