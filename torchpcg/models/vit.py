"""A packed-patch vision encoder (Qwen2-VL style) and its varlen attention op.

In: the patches of several images packed along one dim, ``patches [P, patch_dim]``, the image
boundaries ``cu_seqlens [N+1]`` (int32, ``cu_seqlens[i]`` = first patch of image i, last entry P)
and each patch's ``positions [P, 2]`` (row, col inside its image). Out: merged features
``[P / merge**2, out_dim]`` (each 2x2 block of neighbouring patches becomes one row).

Every op but the attention is row-wise along the patch dim (linear patch embed, LayerNorm over
hidden, 2-D rotary from each patch's own position, GELU MLP), and the merger reshapes groups of
``merge**2`` consecutive rows into one, so a piece between two attentions is padding-safe as long
as buckets are multiples of ``merge**2``. Attention is ``torchpcg_models::varlen_attention``: one
opaque op that reads ``cu_seqlens`` on the host (``tolist()`` inside the op, never seen by Dynamo),
so Dynamo does not graph-break on it and the piecewise backend cuts the graph there.

Example:
    >>> model = PackedViT(ViTConfig())
    >>> patches, cu_seqlens, positions = pack_images([(4, 4), (2, 6)], model.config)
    >>> model(patches, cu_seqlens, positions).shape      # 16 + 12 patches -> 7 merged rows
    torch.Size([7, 64])

Note: inference only (no dropout, no grad checkpointing); weights are random (std 0.02), never
downloaded. Keep ``cu_seqlens`` on the CPU: on a GPU the op would read it back with a device sync.
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["ViTConfig", "PackedViT", "VARLEN_ATTENTION_OP", "varlen_attention", "pack_images", "vit_reference_config"]


# ---- the varlen attention op ---------------------------------------------------------------------

# FRAGMENT: attention.py owns the DEF library of the torchpcg_models namespace.
_LIB = torch.library.Library("torchpcg_models", "FRAGMENT")
# Tagged cudagraph_unsafe (torchpcg and Inductor split there): the op reads segment boundaries on the
# host, so a graph captured around it bakes one image split. Only a graph keyed by cu_seqlens
# (torchpcg.vision.EncoderGraphs) may contain it.
_UNSAFE = (torch.Tag.cudagraph_unsafe,) if hasattr(torch.Tag, "cudagraph_unsafe") else ()
_LIB.define("varlen_attention(Tensor q, Tensor k, Tensor v, Tensor cu_seqlens) -> Tensor", tags=_UNSAFE)


def _varlen_attention_impl(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: torch.Tensor) -> torch.Tensor:
    """Bidirectional attention inside each segment ``[cu[i], cu[i+1])`` of q, k, v ``[P, H, D]``.

    Runs of equal-length segments go through one batched SDPA call (images of one size: one call).
    """
    bounds = [int(b) for b in cu_seqlens.tolist()]  # host ints: a device sync if cu_seqlens is on a GPU
    if not bounds or bounds[0] != 0 or bounds[-1] != q.shape[0] or any(b > e for b, e in zip(bounds, bounds[1:])):
        raise ValueError(f"varlen_attention: cu_seqlens {bounds[:8]}{'...' if len(bounds) > 8 else ''} must start "
                         f"at 0, never decrease and end at the number of rows {q.shape[0]}")
    out = torch.empty_like(q)
    for start, count, length in _equal_runs(bounds):
        end = start + count * length
        heads, dim = q.shape[1], q.shape[2]
        # [count*L, H, D] -> [count, H, L, D]: one batch entry per segment
        qs, ks, vs = (t[start:end].view(count, length, heads, dim).transpose(1, 2) for t in (q, k, v))
        attended = F.scaled_dot_product_attention(qs, ks, vs, scale=1.0 / math.sqrt(dim))
        out[start:end] = attended.transpose(1, 2).reshape(count * length, heads, dim)
    return out


def _equal_runs(bounds: Sequence[int]) -> list[tuple[int, int, int]]:
    """(first row, number of segments, segment length) of each run of equal, non-empty segments."""
    runs: list[tuple[int, int, int]] = []
    for begin, end in zip(bounds, bounds[1:]):
        length = end - begin
        if length == 0:
            continue
        if runs and runs[-1][2] == length and runs[-1][0] + runs[-1][1] * length == begin:
            first, count, _ = runs[-1]
            runs[-1] = (first, count + 1, length)
        else:
            runs.append((begin, 1, length))
    return runs


_LIB.impl("varlen_attention", _varlen_attention_impl, "CompositeExplicitAutograd")


@torch.library.register_fake("torchpcg_models::varlen_attention", lib=_LIB)
def _varlen_attention_fake(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: torch.Tensor) -> torch.Tensor:
    return torch.empty_like(q)


VARLEN_ATTENTION_OP = torch.ops.torchpcg_models.varlen_attention
varlen_attention = VARLEN_ATTENTION_OP  # call as varlen_attention(q, k, v, cu_seqlens)


# ---- the encoder ---------------------------------------------------------------------------------

@dataclass(frozen=True)
class ViTConfig:
    """Sizes of a PackedViT; the defaults make a tiny test model."""

    patch_dim: int = 48
    """Values per patch (channels * temporal * patch * patch; 3*4*4 by default)."""
    hidden_size: int = 64
    """Width of the residual stream."""
    num_layers: int = 2
    """Number of transformer blocks."""
    num_heads: int = 4
    """Attention heads; head dim = hidden_size // num_heads, a multiple of 4 (2-D rotary)."""
    intermediate_size: int = 128
    """Hidden width of each block's GELU MLP."""
    merge_size: int = 2
    """The merger turns each merge x merge block of patches into one row."""
    out_dim: int = 64
    """Width of the merged features (the language model's hidden size)."""
    rope_theta: float = 10000.0
    """Base of the rotary inverse frequencies."""
    norm_eps: float = 1e-6
    """Epsilon of every LayerNorm."""

    def __post_init__(self) -> None:
        if self.hidden_size % self.num_heads:
            raise ValueError(f"hidden_size={self.hidden_size} must be a multiple of num_heads={self.num_heads}")
        if self.head_dim % 4:
            raise ValueError(f"head dim {self.head_dim} must be a multiple of 4 (2-D rotary)")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def patches_per_row(self) -> int:
        """Patches merged into one output row; packed lengths and buckets are multiples of it."""
        return self.merge_size**2


def vit_reference_config(**overrides: int | float) -> ViTConfig:
    """The benchmark size: Qwen2-VL-2B's vision tower (32 blocks, hidden 1280, ~0.6B parameters)."""
    base = ViTConfig(patch_dim=3 * 2 * 14 * 14, hidden_size=1280, num_layers=32, num_heads=16,
                     intermediate_size=5120, merge_size=2, out_dim=1536)
    return replace(base, **overrides)


class VisionRotary(nn.Module):
    """cos/sin [P, D/2] from each patch's (row, col): half the frequencies per axis (row-wise)."""

    def __init__(self, head_dim: int, theta: float) -> None:
        super().__init__()
        exponents = torch.arange(0, head_dim // 2, 2, dtype=torch.float32) / (head_dim // 2)
        self.register_buffer("inv_freq", 1.0 / theta**exponents, persistent=False)  # [D/4]

    def forward(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        freqs = positions.float()[:, :, None] * self.inv_freq[None, None, :]  # [P, 2, D/4]
        freqs = freqs.flatten(1)  # [P, D/2]: row frequencies, then column frequencies
        return freqs.cos(), freqs.sin()


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate-half rotary on x [P, heads, D] with cos/sin [P, D/2], in float32."""
    x1, x2 = x.float().chunk(2, dim=-1)
    cos, sin = cos[:, None, :], sin[:, None, :]
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1).to(x.dtype)


class VisionAttention(nn.Module):
    """Fused qkv -> 2-D rotary -> varlen_attention op -> proj."""

    def __init__(self, config: ViTConfig) -> None:
        super().__init__()
        self.num_heads, self.head_dim = config.num_heads, config.head_dim
        self.qkv = nn.Linear(config.hidden_size, 3 * config.hidden_size)
        self.proj = nn.Linear(config.hidden_size, config.hidden_size)

    def forward(self, x: torch.Tensor, cu_seqlens: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        q, k, v = self.qkv(x).unflatten(-1, (3, self.num_heads, self.head_dim)).unbind(1)  # [P, H, D] each
        q, k = _rotate(q, cos, sin), _rotate(k, cos, sin)
        # contiguous(): the op's inputs are the split boundary; dense rows copy cleanly into static buffers.
        out = varlen_attention(q.contiguous(), k.contiguous(), v.contiguous(), cu_seqlens)
        return self.proj(out.flatten(-2))  # [P, hidden]


class VisionBlock(nn.Module):
    """Pre-norm block: h += attn(norm(h)); h += mlp(norm(h))."""

    def __init__(self, config: ViTConfig) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(config.hidden_size, eps=config.norm_eps)
        self.attn = VisionAttention(config)
        self.norm2 = nn.LayerNorm(config.hidden_size, eps=config.norm_eps)
        self.fc1 = nn.Linear(config.hidden_size, config.intermediate_size)
        self.fc2 = nn.Linear(config.intermediate_size, config.hidden_size)

    def forward(self, h: torch.Tensor, cu_seqlens: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        h = h + self.attn(self.norm1(h), cu_seqlens, cos, sin)
        return h + self.fc2(F.gelu(self.fc1(self.norm2(h)), approximate="tanh"))


class PatchMerger(nn.Module):
    """LayerNorm, then each merge**2 consecutive patches (one 2x2 block) -> one row through an MLP."""

    def __init__(self, config: ViTConfig) -> None:
        super().__init__()
        self.group = config.patches_per_row
        width = config.hidden_size * self.group
        self.norm = nn.LayerNorm(config.hidden_size, eps=config.norm_eps)
        self.fc1 = nn.Linear(width, width)
        self.fc2 = nn.Linear(width, config.out_dim)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        rows = h.shape[0] // self.group
        # A whole number of blocks; also lets Dynamo prove the view below for any (unbacked) P.
        torch._check(rows * self.group == h.shape[0], lambda: "patch count must be a multiple of merge_size**2")
        grouped = self.norm(h).view(rows, self.fc1.in_features)  # [P, hidden] -> [P/4, 4*hidden]
        return self.fc2(F.gelu(self.fc1(grouped)))


class PackedViT(nn.Module):
    """Vision encoder over the packed patches of several images; see the module docstring.

    Example:
        >>> model = PackedViT(ViTConfig(), seed=0)
        >>> out = model(*pack_images([(4, 4)], model.config))    # [4, 64]

    Note: ``seed=None`` keeps PyTorch's default init (call ``init_weights`` later).
    """

    def __init__(self, config: ViTConfig, seed: int | None = 0) -> None:
        super().__init__()
        self.config = config
        self.patch_embed = nn.Linear(config.patch_dim, config.hidden_size)
        self.rotary = VisionRotary(config.head_dim, config.rope_theta)
        self.blocks = nn.ModuleList(VisionBlock(config) for _ in range(config.num_layers))
        self.merger = PatchMerger(config)
        if seed is not None:
            self.init_weights(seed)

    @torch.no_grad()
    def init_weights(self, seed: int = 0) -> None:
        """Deterministic init: matrices ~ N(0, 0.02), biases 0, norm weights 1."""
        generators: dict[torch.device, torch.Generator] = {}
        for name, param in self.named_parameters():
            if param.is_meta:
                continue
            if "norm" in name.rsplit(".", 2)[-2]:
                param.fill_(1.0 if name.endswith("weight") else 0.0)
            elif name.endswith("bias"):
                param.zero_()
            else:
                if param.device not in generators:
                    generators[param.device] = torch.Generator(device=param.device).manual_seed(seed)
                param.normal_(0.0, 0.02, generator=generators[param.device])

    def forward(self, patches: torch.Tensor, cu_seqlens: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """patches [P, patch_dim], cu_seqlens [N+1] int32, positions [P, 2] -> [P / merge**2, out_dim]."""
        h = self.patch_embed(patches.to(self.patch_embed.weight.dtype))  # [P, hidden]
        cos, sin = self.rotary(positions)  # [P, D/2] each, shared by all blocks
        for block in self.blocks:
            h = block(h, cu_seqlens, cos, sin)
        return self.merger(h)


def pack_images(grids: Sequence[tuple[int, int]], config: ViTConfig, *, seed: int = 0,
                device: torch.device | str | None = None, dtype: torch.dtype = torch.float32
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Random patches for images of ``grids`` (rows, cols of patches each), packed for ``PackedViT``.

    Returns ``(patches [P, patch_dim], cu_seqlens [N+1] int32 on the CPU, positions [P, 2] int64)``.
    Patches of each image are ordered block by block (merge x merge blocks, row-major inside), so
    each group of ``merge**2`` consecutive rows is one block, as the merger expects.

    Example:
        >>> patches, cu, pos = pack_images([(2, 2), (4, 2)], ViTConfig())
        >>> cu.tolist(), patches.shape
        ([0, 4, 12], torch.Size([12, 48]))
    """
    m = config.merge_size
    positions, lengths = [], []
    for rows, cols in grids:
        if rows <= 0 or cols <= 0 or rows % m or cols % m:
            raise ValueError(f"image grid {rows}x{cols}: rows and cols must be positive multiples of merge_size={m}")
        r = torch.arange(rows).view(rows // m, m, 1, 1).expand(rows // m, m, cols // m, m)
        c = torch.arange(cols).view(1, 1, cols // m, m).expand(rows // m, m, cols // m, m)
        # block order: [row block, col block, row in block, col in block]
        positions.append(torch.stack((r, c), -1).permute(0, 2, 1, 3, 4).reshape(-1, 2))
        lengths.append(rows * cols)
    cu_seqlens = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)
    generator = torch.Generator().manual_seed(seed)
    patches = torch.randn(sum(lengths), config.patch_dim, generator=generator, dtype=torch.float32)
    return patches.to(device=device, dtype=dtype), cu_seqlens, torch.cat(positions).to(device)
