"""A flat-token Llama-style decoder, the reference model of tests, bench and demo.

In: input_ids [T] and positions [T] of ONE sequence, a KV cache
[num_layers, 2, max_seq_len, Hkv, D] and optional Qwen3-VL style deepstack
embeds [T, deepstack_layers * hidden]. Out: logits [T, vocab].

Every op except the `torchpcg_models::kv_attention` op is row-wise along the
token dim (embedding, RMSNorm over hidden, linears, rotary from each row's own
position, SwiGLU), so a piece between two attentions is padding-safe.

Example:
    >>> model = FlatDecoder(DecoderConfig())
    >>> cache = model.new_kv_cache()
    >>> logits = model(torch.tensor([1, 2, 3]), torch.arange(3), cache)  # [3, 512]

Note: no batching of sequences, no sampling, no training features (dropout,
tied weights); weights are random (std 0.02), never downloaded.
"""
from __future__ import annotations

from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F
from torch import nn

from torchpcg.models.attention import attention_bias, kv_attention

__all__ = ["DecoderConfig", "FlatDecoder", "reference_config", "init_decoder_weights"]


@dataclass(frozen=True)
class DecoderConfig:
    """Sizes of a FlatDecoder; the defaults make a tiny test model."""

    vocab_size: int = 512
    """Number of token ids (rows of the embedding, columns of the logits)."""
    hidden_size: int = 64
    """Width H of the residual stream."""
    num_layers: int = 2
    """Number of decoder layers (and of KV-cache layers)."""
    num_heads: int = 4
    """Query heads Hq; head dim D = hidden_size // num_heads."""
    num_kv_heads: int = 2
    """Key/value heads Hkv (GQA when < num_heads); must divide num_heads."""
    intermediate_size: int = 128
    """Hidden width of the SwiGLU MLP."""
    max_seq_len: int = 256
    """Positions the KV cache holds."""
    rope_theta: float = 10000.0
    """Base of the rotary inverse frequencies."""
    rms_eps: float = 1e-6
    """Epsilon of every RMSNorm."""
    deepstack_layers: int = 0
    """Number of first layers after which deepstack embeds are added (0 = none)."""

    def __post_init__(self) -> None:
        if self.hidden_size % self.num_heads:
            raise ValueError(f"hidden_size={self.hidden_size} must be a multiple of num_heads={self.num_heads}")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"num_heads={self.num_heads} must be a multiple of num_kv_heads={self.num_kv_heads}")
        if self.head_dim % 2:
            raise ValueError(f"head dim {self.head_dim} must be even for rotary; change hidden_size or num_heads")
        if not 0 <= self.deepstack_layers <= self.num_layers:
            raise ValueError(f"deepstack_layers={self.deepstack_layers} must be in 0..num_layers={self.num_layers}")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads


def reference_config(**overrides: int | float) -> DecoderConfig:
    """The benchmark size (~1B parameters, MHA, TinyLlama-like); `overrides` replace fields."""
    base = DecoderConfig(
        vocab_size=32000,
        hidden_size=2048,
        num_layers=16,
        num_heads=16,
        num_kv_heads=16,
        intermediate_size=5632,
        max_seq_len=2048,
    )
    return replace(base, **overrides)


@torch.no_grad()
def init_decoder_weights(model: nn.Module, seed: int = 0) -> None:
    """Matrices ~ N(0, 0.02), norm weights 1; same seed and device = same weights (one generator
    per device, parameters in ``named_parameters`` order; meta parameters skipped)."""
    generators: dict[torch.device, torch.Generator] = {}
    for name, param in model.named_parameters():
        if param.is_meta:
            continue
        if name.endswith("norm.weight"):
            param.fill_(1.0)
            continue
        if param.device not in generators:
            generators[param.device] = torch.Generator(device=param.device).manual_seed(seed)
        param.normal_(0.0, 0.02, generator=generators[param.device])


class RMSNorm(nn.Module):
    """x / rms(x) * weight over the hidden dim, computed in float32."""

    def __init__(self, hidden_size: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()  # [T, H]
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return (x32 * self.weight.float()).to(x.dtype)


class Rotary(nn.Module):
    """cos/sin [T, D/2] from each token's own position (row-wise: no token reductions)."""

    def __init__(self, head_dim: int, theta: float) -> None:
        super().__init__()
        exponents = torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim
        # Non-persistent: derived from the config, never part of a checkpoint.
        self.register_buffer("inv_freq", 1.0 / theta**exponents, persistent=False)  # [D/2]

    def forward(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        freqs = positions[:, None].float() * self.inv_freq[None, :].float()  # [T, D/2]
        return freqs.cos(), freqs.sin()


def per_forward_inputs(rotary: Rotary, positions: torch.Tensor, kv_cache: torch.Tensor,
                       dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """What every layer of one forward reads, made once at its top: rotary cos/sin [T, D/2] and
    the causal bias [T, max_seq_len] (``attention_bias``). Made per layer instead, each piece
    would read ``positions`` (a user input) and copy it into its static buffer on every call."""
    cos, sin = rotary(positions)
    return cos, sin, attention_bias(positions, kv_cache.shape[2], dtype)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate-half rotary on x [T, heads, D] with cos/sin [T, D/2], in float32."""
    x1, x2 = x.float().chunk(2, dim=-1)  # [T, heads, D/2] each
    cos, sin = cos[:, None, :], sin[:, None, :]  # broadcast over heads
    rotated = torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)
    return rotated.to(x.dtype)


class Attention(nn.Module):
    """Fused qkv projection -> rotary -> kv_attention op -> o_proj.

    ``shards`` > 1 keeps 1/shards of the heads (a tensor-parallel rank's share; o_proj then gives
    that rank's partial sum).
    """

    def __init__(self, config: DecoderConfig, layer_index: int, shards: int = 1) -> None:
        super().__init__()
        self.layer_index = layer_index  # constant per module: Dynamo specializes on it
        self.num_heads = config.num_heads // shards
        self.num_kv_heads = config.num_kv_heads // shards
        self.head_dim = config.head_dim
        qkv_size = (self.num_heads + 2 * self.num_kv_heads) * self.head_dim
        self.qkv_proj = nn.Linear(config.hidden_size, qkv_size, bias=False)
        self.o_proj = nn.Linear(self.num_heads * self.head_dim, config.hidden_size, bias=False)

    def forward(
        self, x: torch.Tensor, positions: torch.Tensor, kv_cache: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
        bias: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """``bias``: the causal mask (``attention_bias``), made once per forward by the model; made here if None."""
        q, k, v = self.project(x, cos, sin)
        if bias is None:  # made in compiled code, not inside the eagerly run op (host time per layer)
            bias = attention_bias(positions, kv_cache.shape[2], q.dtype)
        # contiguous(): the op's inputs are the split boundary; dense rows copy cleanly into static buffers.
        out = kv_attention(q.contiguous(), k.contiguous(), v.contiguous(), kv_cache, self.layer_index, positions, bias)
        return self.o_proj(out.flatten(-2))  # [T, H]

    def project(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """x [T, H] -> q [T, Hq, D] and k [T, Hkv, D] rotated, v [T, Hkv, D]: one fused qkv matmul."""
        q_size, kv_size = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        q, k, v = self.qkv_proj(x).split([q_size, kv_size, kv_size], dim=-1)  # [T, Hq*D], [T, Hkv*D] x2
        q = apply_rotary(q.unflatten(-1, (self.num_heads, self.head_dim)), cos, sin)  # [T, Hq, D]
        k = apply_rotary(k.unflatten(-1, (self.num_kv_heads, self.head_dim)), cos, sin)  # [T, Hkv, D]
        return q, k, v.unflatten(-1, (self.num_kv_heads, self.head_dim))


class MLP(nn.Module):
    """SwiGLU: down(silu(gate(x)) * up(x))."""

    def __init__(self, config: DecoderConfig) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.up_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nn.Module):
    """Pre-norm block: h += attn(norm(h)); h += mlp(norm(h))."""

    def __init__(self, config: DecoderConfig, layer_index: int, self_attn: nn.Module | None = None,
                 mlp: nn.Module | None = None) -> None:
        super().__init__()
        self.input_norm = RMSNorm(config.hidden_size, config.rms_eps)
        self.self_attn = self_attn if self_attn is not None else Attention(config, layer_index)
        self.post_attention_norm = RMSNorm(config.hidden_size, config.rms_eps)
        self.mlp = mlp if mlp is not None else MLP(config)

    def forward(
        self, h: torch.Tensor, positions: torch.Tensor, kv_cache: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
        bias: torch.Tensor | None = None,
    ) -> torch.Tensor:
        h = h + self.self_attn(self.input_norm(h), positions, kv_cache, cos, sin, bias)
        return h + self.mlp(self.post_attention_norm(h))


class FlatDecoder(nn.Module):
    """Llama-style decoder over the flat tokens of one sequence; see the module docstring.

    Example:
        >>> model = FlatDecoder(DecoderConfig(), seed=0)
        >>> cache = model.new_kv_cache()
        >>> logits = model(torch.tensor([5, 6]), torch.tensor([0, 1]), cache)  # [2, 512]

    Note: `seed=None` keeps PyTorch's default init (call `init_weights` later).
    """

    def __init__(self, config: DecoderConfig, seed: int | None = 0) -> None:
        super().__init__()
        self.config = config
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.rotary = Rotary(config.head_dim, config.rope_theta)
        self.layers = nn.ModuleList(DecoderLayer(config, i) for i in range(config.num_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_eps)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        if seed is not None:
            self.init_weights(seed)

    def init_weights(self, seed: int = 0) -> None:
        """Deterministic init (``init_decoder_weights``)."""
        init_decoder_weights(self, seed)

    def new_kv_cache(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> torch.Tensor:
        """Zeros [num_layers, 2, max_seq_len, Hkv, D] on the model's device/dtype unless given."""
        weight = self.embed_tokens.weight
        c = self.config
        shape = (c.num_layers, 2, c.max_seq_len, c.num_kv_heads, c.head_dim)
        return torch.zeros(shape, device=device or weight.device, dtype=dtype or weight.dtype)

    def forward(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        kv_cache: torch.Tensor,
        input_deepstack_embeds: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """input_ids, positions [T] int64 -> logits [T, vocab]; writes the tokens' k/v into kv_cache."""
        h = self.embed_tokens(input_ids)  # [T, H]
        cos, sin, bias = per_forward_inputs(self.rotary, positions, kv_cache, h.dtype)
        for layer in self.layers:
            h = layer(h, positions, kv_cache, cos, sin, bias)
            h = self._add_deepstack(h, input_deepstack_embeds, layer.self_attn.layer_index)
        return self.lm_head(self.norm(h))

    def _add_deepstack(self, h: torch.Tensor, embeds: torch.Tensor | None, layer_index: int) -> torch.Tensor:
        """h + embeds[:, i*H:(i+1)*H] after the first `deepstack_layers` layers (Qwen3-VL style)."""
        if embeds is None or layer_index >= self.config.deepstack_layers:
            return h  # None-ness and layer index are static: Dynamo guards, never a graph break
        width = self.config.hidden_size
        return h + embeds[:, layer_index * width : (layer_index + 1) * width].to(h.dtype)
