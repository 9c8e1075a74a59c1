"""The reference FlatDecoder, tensor parallel (Megatron style) over a torch.distributed group.

In: an unsharded FlatDecoder and a process group of ``world_size`` ranks (this rank's shard is
cut from the full weights, so outputs compare with the unsharded model). Out: a module with the
FlatDecoder's call signature whose forward all-reduces twice per layer and returns the full
logits [T, vocab] on every rank.

Per rank r of W: column-parallel fused QKV (the rank's Hq/W query and Hkv/W key/value heads) and
fused gate/up (intermediate/W columns); row-parallel o_proj and down_proj, each followed by
``torch.distributed._functional_collectives.all_reduce(x, "sum", group)``, which Dynamo traces as
``_c10d_functional.all_reduce`` + ``wait_tensor`` (torchpcg split ops by default). The KV cache
holds the rank's Hkv/W heads only. Embedding, norms and lm_head are replicated.

Example (inside each rank of an initialised group)::

    >>> dense = FlatDecoder(DecoderConfig(), seed=0)
    >>> model = TPFlatDecoder.from_dense(dense, dist.group.WORLD)
    >>> cache = model.new_kv_cache()                       # [L, 2, S, Hkv/W, D]
    >>> logits = model(torch.tensor([1, 2]), torch.arange(2), cache)   # [2, 512], same on all ranks

Note: no vocab-parallel embedding or lm_head, no sequence parallelism, no deepstack embeds;
Hq and Hkv must be multiples of the group size. Not written with DTensor (see docs/models.md).
"""
from __future__ import annotations

import torch
import torch.distributed as dist
import torch.distributed._functional_collectives as funcol
import torch.nn.functional as F
from torch import nn

from torchpcg.models.decoder import (Attention, DecoderConfig, DecoderLayer, FlatDecoder, RMSNorm, Rotary,
                                     per_forward_inputs)

__all__ = ["TPFlatDecoder", "shard_rows", "shard_columns"]


def shard_rows(weight: torch.Tensor, rank: int, world_size: int) -> torch.Tensor:
    """Rank's block of output rows of a Linear weight [out, in] (column parallel)."""
    return weight.chunk(world_size, dim=0)[rank].clone()


def shard_columns(weight: torch.Tensor, rank: int, world_size: int) -> torch.Tensor:
    """Rank's block of input columns of a Linear weight [out, in] (row parallel)."""
    return weight.chunk(world_size, dim=1)[rank].clone()


class TPAttention(Attention):
    """Column-parallel qkv over the rank's heads -> rotary -> kv_attention -> row-parallel o_proj."""

    def __init__(self, config: DecoderConfig, layer_index: int, world_size: int, group: dist.ProcessGroup) -> None:
        super().__init__(config, layer_index, shards=world_size)  # this rank's Hq/W and Hkv/W heads
        self.group = group

    def forward(
        self, x: torch.Tensor, positions: torch.Tensor, kv_cache: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
        bias: torch.Tensor | None = None,
    ) -> torch.Tensor:
        partial = super().forward(x, positions, kv_cache, cos, sin, bias)  # [T, H]: this rank's heads' share
        return funcol.all_reduce(partial, "sum", self.group)


class TPMLP(nn.Module):
    """SwiGLU with a fused column-parallel gate/up [2*I/W, H] and a row-parallel down [H, I/W]."""

    def __init__(self, config: DecoderConfig, world_size: int, group: dist.ProcessGroup) -> None:
        super().__init__()
        self.group = group
        self.local_size = config.intermediate_size // world_size
        self.gate_up_proj = nn.Linear(config.hidden_size, 2 * self.local_size, bias=False)
        self.down_proj = nn.Linear(self.local_size, config.hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up_proj(x).split([self.local_size, self.local_size], dim=-1)  # [T, I/W] each
        return funcol.all_reduce(self.down_proj(F.silu(gate) * up), "sum", self.group)  # [T, H]


class TPDecoderLayer(DecoderLayer):
    """Pre-norm block as DecoderLayer; both sub-blocks end in an all-reduce."""

    def __init__(self, config: DecoderConfig, layer_index: int, world_size: int, group: dist.ProcessGroup) -> None:
        super().__init__(config, layer_index, self_attn=TPAttention(config, layer_index, world_size, group),
                         mlp=TPMLP(config, world_size, group))


class TPFlatDecoder(nn.Module):
    """FlatDecoder sharded over ``group``; build it with ``from_dense``. See the module docstring."""

    def __init__(self, config: DecoderConfig, group: dist.ProcessGroup) -> None:
        super().__init__()
        world_size = dist.get_world_size(group)
        _check_divisible(config, world_size)
        self.config = config
        self.group = group
        self.rank = dist.get_rank(group)
        self.world_size = world_size
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.rotary = Rotary(config.head_dim, config.rope_theta)
        self.layers = nn.ModuleList(TPDecoderLayer(config, i, world_size, group) for i in range(config.num_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_eps)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)

    @classmethod
    @torch.no_grad()
    def from_dense(cls, dense: FlatDecoder, group: dist.ProcessGroup) -> TPFlatDecoder:
        """This rank's shard of ``dense`` (same device and dtype); ``dense`` is left unchanged."""
        weight = dense.embed_tokens.weight
        model = cls(dense.config, group).to(device=weight.device, dtype=weight.dtype)
        model.embed_tokens.weight.copy_(dense.embed_tokens.weight)
        model.norm.weight.copy_(dense.norm.weight)
        model.lm_head.weight.copy_(dense.lm_head.weight)
        for tp_layer, layer in zip(model.layers, dense.layers):
            model._load_layer(tp_layer, layer)
        return model.train(dense.training)

    def _load_layer(self, tp_layer: TPDecoderLayer, layer: nn.Module) -> None:
        """Copy one dense DecoderLayer's weights, cut to this rank's heads and MLP columns."""
        rank, world_size, c = self.rank, self.world_size, self.config
        tp_layer.input_norm.weight.copy_(layer.input_norm.weight)
        tp_layer.post_attention_norm.weight.copy_(layer.post_attention_norm.weight)
        q, k, v = layer.self_attn.qkv_proj.weight.split(
            [c.num_heads * c.head_dim, c.num_kv_heads * c.head_dim, c.num_kv_heads * c.head_dim])
        local_qkv = [shard_rows(w, rank, world_size) for w in (q, k, v)]  # head blocks: rows are head-major
        tp_layer.self_attn.qkv_proj.weight.copy_(torch.cat(local_qkv))
        tp_layer.self_attn.o_proj.weight.copy_(shard_columns(layer.self_attn.o_proj.weight, rank, world_size))
        gate = shard_rows(layer.mlp.gate_proj.weight, rank, world_size)
        up = shard_rows(layer.mlp.up_proj.weight, rank, world_size)
        tp_layer.mlp.gate_up_proj.weight.copy_(torch.cat([gate, up]))
        tp_layer.mlp.down_proj.weight.copy_(shard_columns(layer.mlp.down_proj.weight, rank, world_size))

    def new_kv_cache(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> torch.Tensor:
        """Zeros [num_layers, 2, max_seq_len, Hkv/W, D]: this rank's key/value heads only."""
        weight = self.embed_tokens.weight
        c = self.config
        shape = (c.num_layers, 2, c.max_seq_len, c.num_kv_heads // self.world_size, c.head_dim)
        return torch.zeros(shape, device=device or weight.device, dtype=dtype or weight.dtype)

    def kv_heads(self) -> slice:
        """The slice of the unsharded cache's head dim (dim 3) that this rank's cache holds."""
        local = self.config.num_kv_heads // self.world_size
        return slice(self.rank * local, (self.rank + 1) * local)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, kv_cache: torch.Tensor) -> torch.Tensor:
        """input_ids, positions [T] int64 -> full logits [T, vocab] on every rank; writes local k/v."""
        h = self.embed_tokens(input_ids)  # [T, H], replicated
        cos, sin, bias = per_forward_inputs(self.rotary, positions, kv_cache, h.dtype)
        for layer in self.layers:
            h = layer(h, positions, kv_cache, cos, sin, bias)
        return self.lm_head(self.norm(h))


def _check_divisible(config: DecoderConfig, world_size: int) -> None:
    """Heads and MLP width must split evenly over the ranks."""
    for name in ("num_heads", "num_kv_heads", "intermediate_size"):
        if getattr(config, name) % world_size:
            raise ValueError(f"{name}={getattr(config, name)} must be a multiple of the TP group size {world_size}; "
                             f"pick a config or group size that divides it")
