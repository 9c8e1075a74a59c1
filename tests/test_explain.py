"""torchpcg.explain on the reference decoder: the plan is right and nothing is captured."""
from __future__ import annotations

import json

import pytest
import torch

import torchpcg
from torchpcg import plan
from torchpcg.explain import ExplainReport, explain, reason_category
from tests.utils import decoder_inputs, tiny_decoder

OPTIONS = {"compiler": "eager", "capture_sizes": "1,2,4,8,16"}


def _args(model, num_tokens: int = 5):
    return decoder_inputs(model, num_tokens, mark=False)


@pytest.mark.parametrize("num_layers", [1, 3])
def test_explain_counts_attention_splits(num_layers):
    model = tiny_decoder(num_layers=num_layers)
    report = explain(model, *_args(model), options=OPTIONS)
    assert isinstance(report, ExplainReport)
    attention = [p for p in report.pieces if p.kind == "split" and "attention" in {reason_category(r) for r in p.reasons}]
    assert len(attention) == num_layers
    assert report.split_counts["attention"] == num_layers
    assert report.split_counts["collective"] == report.split_counts["user"] == 0
    assert all("torchpcg_models::kv_attention" in p.reasons[0] for p in attention)
    assert [p.index for p in report.pieces] == list(range(len(report.pieces)))
    assert report.pieces[-1].kind == "compute"  # norm + lm_head after the last attention
    assert report.buckets == (1, 2, 4, 8, 16)
    assert report.token_symbol is not None
    assert report.graph_mode == "off"  # cudagraph=auto on CPU
    assert report.static_buffer_bytes > 0


def test_explain_captures_nothing_and_is_json():
    model = tiny_decoder()
    ids, positions, cache = _args(model)
    report = explain(model, ids, positions, cache, options={**OPTIONS, "cudagraph": "emulate"})
    stats = torchpcg.stats()
    assert stats["captured"] == 0 and stats["replays"] == 0
    assert report.graph_mode == "emulate"  # what a real run would use, though explain ran without graphs
    data = json.loads(json.dumps(report.to_dict()))
    graph = data["graphs"][0]
    assert graph["num_split_ops"] == 2 and graph["split_counts"]["attention"] == 2
    assert {p["kind"] for p in graph["pieces"]} == {"compute", "split"}
    text = str(report)
    assert "attention (torchpcg_models::kv_attention)" in text and "submod_" in text
    assert not hasattr(ids, "_dynamo_unbacked_indices") and not hasattr(ids, "_dynamo_dynamic_indices")


def test_explain_reads_options_of_a_compiled_model_and_leaves_its_cache_alone():
    model = tiny_decoder()
    compiled = torch.compile(model, backend="piecewise", fullgraph=True,
                             options={"cudagraph": "emulate", "compiler": "eager", "capture_sizes": "1,2,4,8"})
    ids, positions, cache = decoder_inputs(model, 3)
    compiled(ids, positions, cache)
    entries = torch._dynamo.eval_frame._debug_get_cache_entry_list(type(model).forward.__code__)
    report = explain(compiled, *_args(model, 6))
    assert report.buckets == (1, 2, 4, 8) and report.graph_mode == "emulate"
    after = torch._dynamo.eval_frame._debug_get_cache_entry_list(type(model).forward.__code__)
    assert len(after) == len(entries) == 1
    with torchpcg.expect(dynamo_graphs=0, replays=3):  # the user's model: no recompile, graphs replayed
        compiled(*decoder_inputs(model, 4))  # bucket 4, captured by the first call


def test_reason_categories():
    assert reason_category("attention (aten::scaled_dot_product_attention)") == "attention"
    assert reason_category("collective (_c10d_functional::all_reduce)") == "collective"
    assert reason_category("user split op (mylib::op)") == "user"
    assert reason_category("padding-unsafe: slice along the token dim (getitem)") == "padding-unsafe"
    assert reason_category("merged: 1-op piece between split ops runs eagerly") == "merged"
    assert reason_category("side effect: in-place write into 'a', made outside this piece (mul_)") == "side effect"


def test_explain_hugging_face_llama_falls_back_to_backed_dims():
    transformers = pytest.importorskip("transformers")
    config = transformers.LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)
    config._attn_implementation = "sdpa"
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(config).eval()
    ids = torch.randint(0, 128, (1, 9))
    report = explain(model, input_ids=ids, use_cache=False, options={"compiler": "eager", "max_capture_size": 32})
    assert report.split_counts["attention"] == 2  # one sdpa per layer
    assert report.token_symbol is not None and report.buckets[-1] == 32


def test_explain_a_torchpcg_compile_model_before_its_first_call():
    model = tiny_decoder()
    compiled = torchpcg.compile(model, cudagraph="emulate", compiler="eager", capture_sizes=(1, 2, 4))
    report = explain(compiled, *_args(model, 3))
    assert report.token_symbol is not None and report.buckets == (1, 2, 4)
    assert report.split_counts["attention"] == 2


def test_static_buffer_estimate_equals_what_the_runtime_allocates():
    from torchpcg.backend import collect_runtimes

    model = tiny_decoder(num_layers=3)
    options = {**OPTIONS, "cudagraph": "emulate"}
    report = explain(model, *_args(model), options=options)
    compiled = torchpcg.compile(model, **options)
    with collect_runtimes() as runtimes:
        for num_tokens in (16, 3, 1):  # every piece captures; buffers are sized for the largest bucket
            compiled(*_args(model, num_tokens))
    buffers = {b.data_ptr(): b for r in runtimes[0].runners for b in [*r.storages.values(), *r.buffers.values()]}
    allocated = sum(b.numel() * b.element_size() for b in buffers.values())  # a buffer pieces share, once
    assert report.static_buffer_bytes == allocated
    assert len(buffers) < sum(len(r.storages) + len(r.buffers) for r in runtimes[0].runners)  # some are shared
    assert sum(p.chained_inputs for p in report.pieces) > 0  # the residual stream is read in place


def test_graphs_off_on_cpu_is_said_and_long_reasons_are_cut_in_the_table():
    """On CPU with cudagraph='auto' no graph is captured: the report says so and that the buffer
    memory is what graphs would allocate; a table cell stays short, the whole reason is in to_dict()."""
    model = tiny_decoder()
    report = torchpcg.explain(model, *decoder_inputs(model, 3))
    text = str(report)
    assert "graph mode: off (no graphs on this device" in text and "none with graphs off" in text
    long_reason = "merged: " + "x" * 300
    assert len(plan.short_note(long_reason)) == plan.NOTE_WIDTH
    assert plan.short_note("attention (aten::sdpa)") == "attention (aten::sdpa)"


def test_a_graph_breaking_model_is_explained_frame_by_frame():
    """A mixture-of-experts MLP that dispatches with torch.where breaks Dynamo's graph: explain of
    the plain torch.compile model (fullgraph=False, torch.compile's default) lists one plan per
    Dynamo graph, each naming the frame it came from, as the backend sees them; fullgraph=True
    (explain's default for a plain module) traces it whole."""
    from torchpcg.models import DecoderConfig
    from torchpcg.models.buffer_decoder import BUFFER_ATTENTION_OP
    from torchpcg.models.moe import moe_decoder

    torchpcg.register_splitting_op(BUFFER_ATTENTION_OP)
    model = moe_decoder(DecoderConfig(num_layers=2, max_seq_len=64), num_experts=4, top_k=2).eval()
    args = (torch.randint(0, model.config.vocab_size, (5,)), torch.arange(5))
    compiled = torch.compile(model, backend="piecewise", options={"capture_sizes": "1,2,4,8"})
    report = explain(compiled, *args)
    assert len(report.graphs) > 1 and all(graph.frame for graph in report.graphs)
    assert any(graph.frame.startswith("MLP.forward (decoder.py:") for graph in report.graphs)  # the experts
    assert "frame: MLP.forward" in str(report) and report.to_dict()["graphs"][0]["frame"] == report.graphs[0].frame
    whole = explain(model, *args, options={"capture_sizes": "1,2,4,8"})
    assert len(whole.graphs) == 1 and whole.graphs[0].frame.startswith("BufferDecoder.forward")
    assert len(explain(compiled, *args, fullgraph=True).graphs) == 1
