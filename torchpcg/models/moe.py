"""A mixture-of-experts MLP that dispatches tokens the way many model files do: ``torch.where``.

In: x [T, H]. Out: [T, H], each row the weighted sum of its top-k experts' SwiGLU outputs.
``torch.where(chosen == e)`` has a data-dependent size, so Dynamo breaks the graph there: the
experts run as frames of their own, one compiled ``forward`` shared by every expert and layer.
That is the case piecewise graphs must survive without recapturing (``address_sets``).

Example:
    >>> model = moe_decoder(DecoderConfig(), num_experts=4, top_k=2)   # a BufferDecoder with MoE MLPs
    >>> logits = model(torch.tensor([1, 2, 3]), torch.arange(3))
"""
from __future__ import annotations

import torch
from torch import nn

from torchpcg.models.buffer_decoder import BufferDecoder
from torchpcg.models.decoder import MLP, DecoderConfig

__all__ = ["MoEMLP", "moe_decoder"]


class MoEMLP(nn.Module):
    """Router -> top-k experts per token (softmax weights renormalised over the k) -> weighted sum."""

    def __init__(self, config: DecoderConfig, num_experts: int, top_k: int) -> None:
        super().__init__()
        if not 1 <= top_k <= num_experts:
            raise ValueError(f"top_k={top_k} must be in 1..num_experts={num_experts}")
        self.top_k = top_k
        self.router = nn.Linear(config.hidden_size, num_experts, bias=False)
        self.experts = nn.ModuleList(MLP(config) for _ in range(num_experts))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weights, chosen = self.router(x).float().softmax(-1).topk(self.top_k, dim=-1)  # [T, k] each
        weights = (weights / weights.sum(-1, keepdim=True)).to(x.dtype)
        out = torch.zeros_like(x)
        for index, expert in enumerate(self.experts):
            rows, slot = torch.where(chosen == index)  # data-dependent size: Dynamo breaks the graph here
            out.index_add_(0, rows, expert(x[rows]) * weights[rows, slot, None])
        return out


def moe_decoder(config: DecoderConfig, num_experts: int = 8, top_k: int = 2, seed: int = 0) -> BufferDecoder:
    """A ``BufferDecoder`` whose layers' MLPs are ``MoEMLP``s (KV cache in module buffers, SDPA in
    its attention op); weights ~ N(0, 0.02) from ``seed``."""
    model = BufferDecoder(config, seed=None)
    for layer in model.layers:
        layer.mlp = MoEMLP(config, num_experts, top_k)
    model.init_weights(seed)
    return model
