"""A Llama-style decoder written the way a model author usually writes one: ``forward(ids, pos)``,
each layer's KV cache a pair of module buffers, attention through ``F.scaled_dot_product_attention``.

In: input_ids [T] and positions [T] of ONE sequence. Out: logits [T, vocab]. The tokens' k/v are
written into the layers' ``k_cache`` / ``v_cache`` buffers [max_seq_len, Hkv, D] at ``positions``.

It differs from ``FlatDecoder`` where our own reference model was tuned for piecewise graphs, so
tests and the bench also see a model that was not:

- the KV cache is module state (buffers), not an argument: Dynamo sees it as static inputs;
- the attention op (``torchpcg_models::buffer_attention``, a ``torch.library.custom_op``) builds
  its causal mask inside and lets SDPA pick its kernel. On Hopper SDPA picks cuDNN for a masked
  call, which builds an execution plan for every new shape (tens of ms at a T not seen before):
  under piecewise graphs the op runs eagerly at every real T, so this is the case mixed traffic
  must survive (see docs/design.md, "Split ops at every T").

Example:
    >>> model = BufferDecoder(DecoderConfig())
    >>> logits = model(torch.tensor([1, 2, 3]), torch.arange(3))  # [3, 512]
    >>> model.reset_cache()                                         # zeros, in place

Note: one sequence per call, no batching, no paging; weights are random (std 0.02).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from torchpcg.models.decoder import MLP, DecoderConfig, RMSNorm, Rotary, apply_rotary, init_decoder_weights

__all__ = ["BufferDecoder", "BUFFER_ATTENTION_OP"]


@torch.library.custom_op("torchpcg_models::buffer_attention", mutates_args=("k_cache", "v_cache"))
def buffer_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor,
                     v_cache: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """q [T, Hq, D], k/v [T, Hkv, D]: write k/v at ``positions``, attend causally -> [T, Hq, D]."""
    k_cache.index_copy_(0, positions, k)
    v_cache.index_copy_(0, positions, v)
    slots = k_cache.shape[0]
    mask = torch.arange(slots, device=q.device)[None, :] <= positions[:, None]  # [T, S]
    groups = q.shape[1] // k_cache.shape[1]
    out = F.scaled_dot_product_attention(
        q.transpose(0, 1)[None], k_cache.transpose(0, 1)[None], v_cache.transpose(0, 1)[None],
        attn_mask=mask[None, None], enable_gqa=groups > 1)  # [1, Hq, T, D]
    return out[0].transpose(0, 1).contiguous()


@buffer_attention.register_fake
def _buffer_attention_fake(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor,
                           v_cache: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    return torch.empty_like(q)


BUFFER_ATTENTION_OP = torch.ops.torchpcg_models.buffer_attention


class CachedAttention(nn.Module):
    """q/k/v projections -> rotary -> buffer_attention over this layer's cache buffers -> o_proj."""

    def __init__(self, config: DecoderConfig) -> None:
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_dim = config.num_heads, config.num_kv_heads, config.head_dim
        self.q_proj = nn.Linear(config.hidden_size, self.num_heads * self.head_dim, bias=False)
        self.k_proj = nn.Linear(config.hidden_size, self.num_kv_heads * self.head_dim, bias=False)
        self.v_proj = nn.Linear(config.hidden_size, self.num_kv_heads * self.head_dim, bias=False)
        self.o_proj = nn.Linear(self.num_heads * self.head_dim, config.hidden_size, bias=False)
        cache_shape = (config.max_seq_len, self.num_kv_heads, self.head_dim)
        self.register_buffer("k_cache", torch.zeros(cache_shape), persistent=False)
        self.register_buffer("v_cache", torch.zeros(cache_shape), persistent=False)

    def forward(self, x: torch.Tensor, positions: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        q = apply_rotary(self.q_proj(x).unflatten(-1, (self.num_heads, self.head_dim)), cos, sin)
        k = apply_rotary(self.k_proj(x).unflatten(-1, (self.num_kv_heads, self.head_dim)), cos, sin)
        v = self.v_proj(x).unflatten(-1, (self.num_kv_heads, self.head_dim))
        out = buffer_attention(q, k, v, self.k_cache, self.v_cache, positions)
        return self.o_proj(out.flatten(-2))


class BufferLayer(nn.Module):
    """Pre-norm block: h += attn(norm(h)); h += mlp(norm(h))."""

    def __init__(self, config: DecoderConfig) -> None:
        super().__init__()
        self.input_norm = RMSNorm(config.hidden_size, config.rms_eps)
        self.self_attn = CachedAttention(config)
        self.post_attention_norm = RMSNorm(config.hidden_size, config.rms_eps)
        self.mlp = MLP(config)

    def forward(self, h: torch.Tensor, positions: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        h = h + self.self_attn(self.input_norm(h), positions, cos, sin)
        return h + self.mlp(self.post_attention_norm(h))


class BufferDecoder(nn.Module):
    """Llama-style decoder with its KV cache in module buffers; see the module docstring."""

    def __init__(self, config: DecoderConfig, seed: int | None = 0) -> None:
        super().__init__()
        self.config = config
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.rotary = Rotary(config.head_dim, config.rope_theta)
        self.layers = nn.ModuleList(BufferLayer(config) for _ in range(config.num_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_eps)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        if seed is not None:
            self.init_weights(seed)

    def init_weights(self, seed: int = 0) -> None:
        """Matrices ~ N(0, 0.02) from ``seed``, norm weights 1 (``init_decoder_weights``), caches zero."""
        init_decoder_weights(self, seed)
        self.reset_cache()

    @torch.no_grad()
    def reset_cache(self) -> None:
        """Zero every layer's k/v cache in place (addresses unchanged: captured graphs stay valid)."""
        for layer in self.layers:
            layer.self_attn.k_cache.zero_()
            layer.self_attn.v_cache.zero_()

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """input_ids, positions [T] int64 -> logits [T, vocab]; writes the tokens' k/v into the caches."""
        h = self.embed_tokens(input_ids)
        cos, sin = self.rotary(positions)
        for layer in self.layers:
            h = layer(h, positions, cos, sin)
        return self.lm_head(self.norm(h))
