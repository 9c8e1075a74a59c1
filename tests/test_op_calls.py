"""Split ops written with ``torch.library.custom_op`` are called as their Python body between graphs
(``torchpcg.op_calls``): same results as through the dispatcher, and only for ops whose dispatcher
path could end nowhere else."""
from __future__ import annotations

import logging

import pytest
import torch

import torchpcg
from torchpcg.models import DecoderConfig
from torchpcg.models.attention import KV_ATTENTION_OP
from torchpcg.models.buffer_decoder import BUFFER_ATTENTION_OP, BufferDecoder, buffer_attention
from torchpcg.op_calls import custom_op_body, direct_custom_ops


@torch.library.custom_op("torchpcg_test_ops::per_device", mutates_args=())
def _per_device(x: torch.Tensor) -> torch.Tensor:
    return x * 2


@_per_device.register_kernel("cpu")
def _per_device_cpu(x: torch.Tensor) -> torch.Tensor:
    return x * 3  # a kernel for one device: the dispatcher chooses, so no direct call


def test_only_single_body_custom_ops_have_a_body() -> None:
    assert custom_op_body(BUFFER_ATTENTION_OP) is buffer_attention._init_fn
    assert custom_op_body(torch.ops.torchpcg_test_ops.per_device.default) is None
    assert custom_op_body(KV_ATTENTION_OP) is None  # torch.library.Library op: no Python wrapper to skip
    assert custom_op_body(torch.ops.aten.add.Tensor) is None
    assert custom_op_body(torch.add) is None


def test_rewrite_copies_the_piece() -> None:
    def f(x: torch.Tensor) -> torch.Tensor:
        return torch.ops.torchpcg_test_ops.per_device(x) + BUFFER_ATTENTION_OP(x, x, x, x, x, x[:, 0, 0].long())

    gm = torch.fx.symbolic_trace(f)
    rewritten = direct_custom_ops(gm)
    assert rewritten is not gm
    targets = [n.target for n in rewritten.graph.nodes if n.op == "call_function"]
    assert buffer_attention._init_fn in targets  # the custom op with one body
    assert torch.ops.torchpcg_test_ops.per_device.default in targets or torch.ops.torchpcg_test_ops.per_device in targets
    assert BUFFER_ATTENTION_OP in [n.target for n in gm.graph.nodes]  # the plan's graph still names the op
    plain = torch.fx.symbolic_trace(lambda x: x.sin())
    assert direct_custom_ops(plain) is plain


@pytest.mark.parametrize("direct_ops", [True, False])
def test_buffer_decoder_same_as_eager(direct_ops: bool, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG, logger="torchpcg.op_calls")
    torchpcg.register_splitting_op(BUFFER_ATTENTION_OP)
    config = DecoderConfig(num_layers=2, max_seq_len=64)
    model, reference = BufferDecoder(config).eval(), BufferDecoder(config).eval()
    compiled = torch.compile(model, backend="piecewise",
                             options={"capture_sizes": "1,2,4,8", "cudagraph": "emulate", "direct_ops": direct_ops})
    torchpcg.reset_stats()
    with torch.no_grad():
        start = 0
        for tokens in (3, 1, 5, 8, 2, 11):  # 11: above the largest bucket, no graphs
            ids = torch.randint(0, config.vocab_size, (tokens,))
            positions = torch.arange(start, start + tokens)
            start += tokens
            torch.testing.assert_close(compiled(ids, positions), reference(ids, positions), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(model.layers[0].self_attn.k_cache, reference.layers[0].self_attn.k_cache)
    assert torchpcg.stats()["recompiles"] == 0
    direct_calls = [r for r in caplog.records if "called as its Python body" in r.getMessage()]
    # one split piece per layer, in every Dynamo graph built (T=1 may get a graph of its own)
    assert (len(direct_calls) >= config.num_layers) if direct_ops else not direct_calls
