"""A leaner split op for the decoder bench: k and v packed in the graph, one cache-write kernel.

Under piecewise graphs the reference decoder's ``torchpcg_models::kv_attention`` runs eagerly once
per layer, and launches three kernels between two graph replays: ``torch.stack`` of k and v, the
cache's ``index_copy_`` and the attention. The profile at ``3ee4289`` (docs/benchmarks.md, 2026-11-30)
put about two thirds of piecewise's host time per call in that op (as
cProfile ranks it), and the GPU's extra idle time in the switches around its kernels. This variant moves the stack into the graph
before the op (Inductor fuses it with the rotary), so the op launches two kernels and does one
tensor op less on the host:

    python -m bench.decoder --attention packed --modes inductor-cudagraph,piecewise,piecewise-full-decode

Every mode of the bench runs the same packed model, so the comparison stays fair; the report's
config line names the variant. Same numbers as the reference op (``tests/test_bench_quick.py``).

Note: the KV cache layout is the reference decoder's ([layers, 2, slots, Hkv, D]); only how k and
v reach it changes. The op is declared capturable (sync-free, fixed addresses), as the reference
op is, so full-decode graphs may include it.
"""
from __future__ import annotations

import torch

import torchpcg
from torchpcg.models.attention import attend, attention_bias
from torchpcg.models.decoder import Attention, FlatDecoder

__all__ = ["PACKED_ATTENTION_OP", "kv_attention_packed", "PackedAttention", "use_packed_attention"]

_LIB = torch.library.Library("torchpcg_bench", "DEF")
_LIB.define("kv_attention_packed(Tensor q, Tensor kv, Tensor(a!) kv_cache, int layer, Tensor positions, "
            "Tensor bias) -> Tensor")


def _packed_impl(q: torch.Tensor, kv: torch.Tensor, kv_cache: torch.Tensor, layer: int, positions: torch.Tensor,
                 bias: torch.Tensor) -> torch.Tensor:
    """kv [T, 2, Hkv, D] into cache[layer, :, positions] with one index_copy_, then attend over it."""
    kv_cache[layer].index_copy_(1, positions, kv.transpose(0, 1))  # [2, T, Hkv, D] along the slot dim
    if q.shape[0] == 0:
        return torch.empty_like(q)
    return attend(q, kv_cache[layer, 0], kv_cache[layer, 1], bias)


_LIB.impl("kv_attention_packed", _packed_impl, "CompositeExplicitAutograd")


@torch.library.register_fake("torchpcg_bench::kv_attention_packed", lib=_LIB)
def _packed_fake(q: torch.Tensor, kv: torch.Tensor, kv_cache: torch.Tensor, layer: int, positions: torch.Tensor,
                 bias: torch.Tensor) -> torch.Tensor:
    return torch.empty_like(q)


PACKED_ATTENTION_OP = "torchpcg_bench::kv_attention_packed"
torchpcg.register_splitting_op(PACKED_ATTENTION_OP, capturable=True)
kv_attention_packed = torch.ops.torchpcg_bench.kv_attention_packed  # (q, kv, kv_cache, layer, positions, bias)


class PackedAttention(Attention):
    """The reference ``Attention`` with k and v stacked in compiled code and the packed op."""

    def forward(
        self, x: torch.Tensor, positions: torch.Tensor, kv_cache: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
        bias: torch.Tensor | None = None,
    ) -> torch.Tensor:
        q, k, v = self.project(x, cos, sin)
        if bias is None:
            bias = attention_bias(positions, kv_cache.shape[2], q.dtype)
        kv = torch.stack((k, v), dim=1)  # [T, 2, Hkv, D]: one graph kernel with the rotary, not an eager one
        out = kv_attention_packed(q.contiguous(), kv, kv_cache, self.layer_index, positions, bias)
        return self.o_proj(out.flatten(-2))


def use_packed_attention(model: FlatDecoder) -> FlatDecoder:
    """Swap every layer's attention for ``PackedAttention``, sharing its weights; returns ``model``."""
    for index, layer in enumerate(model.layers):
        old = layer.self_attn
        if type(old) is not Attention:
            raise TypeError(f"use_packed_attention: layer {index} has {type(old).__name__}; expected the "
                            "reference decoder's Attention")
        with torch.device("meta"):  # no weights allocated: the old module's are taken over below
            new = PackedAttention(model.config, old.layer_index)
        new.qkv_proj, new.o_proj = old.qkv_proj, old.o_proj
        layer.self_attn = new
    return model
