"""KV-cache attention as one custom op, the split op of the reference decoder.

In: the new tokens' q [T, Hq, D], k and v [T, Hkv, D] of ONE sequence, the
whole KV cache [num_layers, 2, max_seq_len, Hkv, D] and the tokens' absolute
positions [T]. Out: attention output [T, Hq, D]; k and v are written into the
cache as a side effect. Dynamo sees `torchpcg_models::kv_attention` as one
opaque op, so the piecewise backend can cut the graph there and run it
eagerly on the real rows; the body may therefore be data-dependent.

Example:
    >>> cache = torch.zeros(1, 2, 16, 2, 8)
    >>> q, k, v = torch.randn(3, 4, 8), torch.randn(3, 2, 8), torch.randn(3, 2, 8)
    >>> out = kv_attention(q, k, v, cache, 0, torch.arange(3))  # [3, 4, 8]
    >>> bias = attention_bias(torch.arange(3), 16, q.dtype)  # [3, 16]: the same, mask made by the caller
    >>> out = kv_attention(q, k, v, cache, 0, torch.arange(3), bias)

The optional ``bias`` ([T, max_seq_len], 0 where a token may attend, -inf elsewhere) is the causal
mask made outside the op. The reference decoder makes it in compiled code, before the op: under
piecewise graphs the op runs eagerly once per layer, so every tensor op inside it costs host
time on each call, and the mask is four of them. Measured on an H200 (T=1, bf16, 16 heads of
128; ``python scripts/attention_host_cost.py`` at ``513c337``): 120 µs to issue the op with the
mask made inside, 55 µs with the bias passed in. On CUDA the op calls the memory-efficient
attention kernel itself (see ``_EFFICIENT`` below): SDPA's own choice, cuDNN, cost 40 ms on the
first call at each new T.

Note: one sequence per call (no batching of several sequences, no paging);
q, k, v and the cache share one dtype (no casting); positions past
`max_seq_len` are an index error, not handled. The op never syncs with the
device: it attends over the whole cache with a causal mask, so the host can
queue the next graph replay while this layer's attention still runs.
"""
from __future__ import annotations

import logging
import math

import torch
import torch.nn.functional as F

__all__ = ["kv_attention", "KV_ATTENTION_OP", "attention_bias", "attend"]

log = logging.getLogger(__name__)


# Explicit schema: inference would type `layer` as SymInt; it is a plain layer index.
_SCHEMA = (
    "(Tensor q, Tensor k, Tensor v, Tensor(a!) kv_cache, int layer, Tensor positions, Tensor? bias=None) -> Tensor"
)


# Defined through torch.library.Library rather than torch.library.custom_op: same op for Dynamo,
# but custom_op adds Python dispatch to every call, and this op runs eagerly once per layer and decode
# step. Through torch.ops this definition costs 14 µs over its Python body (H200, scripts/attention_host_cost.py).
_LIB = torch.library.Library("torchpcg_models", "DEF")
_LIB.define("kv_attention" + _SCHEMA)


def _kv_attention_impl(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    kv_cache: torch.Tensor,
    layer: int,
    positions: torch.Tensor,
    bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """Write k, v at `positions`, then attend causally over cache[layer, :, :pos+1]."""
    _write_cache(k, v, kv_cache, layer, positions)
    if q.shape[0] == 0:
        return torch.empty_like(q)
    keys = kv_cache[layer, 0]  # [S, Hkv, D], all max_seq_len slots; the mask hides future ones
    values = kv_cache[layer, 1]
    if bias is None:
        bias = attention_bias(positions, keys.shape[0], q.dtype)
    return attend(q, keys, values, bias)


def attend(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """q [T, Hq, D] over keys/values [S, Hkv, D] with the additive mask ``bias`` [T, S] -> [T, Hq, D],
    laid out like ``torch.empty_like(q)``: the attention half of the op, for other split ops that
    write the cache their own way (``bench/packed_attention.py``)."""
    return _like_q(_causal_attention(q, keys, values, bias), q)


_LIB.impl("kv_attention", _kv_attention_impl, "CompositeExplicitAutograd")


@torch.library.register_fake("torchpcg_models::kv_attention", lib=_LIB)
def _kv_attention_fake(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    kv_cache: torch.Tensor,
    layer: int,
    positions: torch.Tensor,
    bias: torch.Tensor | None = None,
) -> torch.Tensor:
    return torch.empty_like(q)


def _write_cache(
    k: torch.Tensor, v: torch.Tensor, kv_cache: torch.Tensor, layer: int, positions: torch.Tensor
) -> None:
    """kv_cache[layer, 0/1, positions] = k/v: one index_copy_ along the sequence dim of both."""
    kv_cache[layer].index_copy_(1, positions, torch.stack((k, v)))  # index_copy_ checks dtypes match


def attention_bias(positions: torch.Tensor, slots: int, dtype: torch.dtype) -> torch.Tensor:
    """The causal mask as an additive bias [T, slots]: 0 where slot <= positions[t], else -inf.

    Row-wise along T (row t reads only positions[t]), so it may be computed in a padded graph.
    """
    allowed = torch.arange(slots, device=positions.device)[None, :] <= positions[:, None]
    return torch.zeros((), dtype=dtype, device=positions.device).masked_fill(~allowed, float("-inf"))


def _causal_attention(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """q [T, Hq, D] over keys/values [S, Hkv, D] with bias [T, S] -> [T, Hq, D] (maybe a transposed view)."""
    num_groups = q.shape[1] // keys.shape[1]
    if num_groups > 1:
        keys, values = _repeat_kv(keys, num_groups), _repeat_kv(values, num_groups)  # [S, Hq, D]
    if bias.dtype != q.dtype:
        bias = bias.to(q.dtype)
    scale = 1.0 / math.sqrt(q.shape[-1])
    # Both paths compute the softmax in float32 for bf16/fp16 inputs (fused kernels accumulate in
    # fp32; SDPA's math path upcasts).
    if _efficient_fits(q, keys):
        # [1, T, H, D] is the kernel's own layout, so q, keys and values go in as they are and the
        # output is [T, Hq, D] rows; the bias goes per head as a stride-0 view, as SDPA passes it.
        try:
            return _EFFICIENT(q[None], keys[None], values[None], bias.expand(1, q.shape[1], *bias.shape),
                              None, None, None, None, 0.0, 0, False, scale=scale)[0][0]
        except RuntimeError as exc:  # a torch whose kernel refuses these arguments: SDPA from now on
            _efficient_failed(exc)
    out = F.scaled_dot_product_attention(
        q.transpose(0, 1)[None],  # [1, Hq, T, D]
        keys.transpose(0, 1)[None],  # [1, Hq, S, D]
        values.transpose(0, 1)[None],
        attn_mask=bias[None, None],  # [1, 1, T, S]
        scale=scale,
    )
    return out[0].transpose(0, 1)


# On CUDA the op calls the memory-efficient kernel itself instead of letting SDPA choose. SDPA's
# first choice for these shapes on Hopper is cuDNN, which builds an execution plan for every new
# shape: the first call at a T not seen before took 38 ms, a repeat 0.54 ms; the memory-efficient
# kernel took 0.20 ms on both (H200, torch 2.11, `python scripts/attention_host_cost.py`, at
# `f9e258b`). Under piecewise graphs this op runs eagerly at every real T, so mixed traffic met
# that plan build once per distinct T. Called directly in its own [batch, T, heads, D] layout, the
# kernel also skips SDPA's backend selection and six transposes per call.
_EFFICIENT = getattr(torch.ops.aten, "_efficient_attention_forward", None)
_EFFICIENT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def _efficient_failed(exc: RuntimeError) -> None:
    global _EFFICIENT
    _EFFICIENT = None
    log.warning("kv_attention: the memory-efficient attention kernel failed (%s); calling "
                "scaled_dot_product_attention from now on", str(exc).splitlines()[0][:200])


def _efficient_fits(q: torch.Tensor, keys: torch.Tensor) -> bool:
    """Whether the memory-efficient kernel takes these shapes as they are: CUDA, a float dtype, a
    head dim of a multiple of 8 and a slot count of a multiple of 16 (the bias rows stay aligned;
    SDPA would pad them)."""
    return (_EFFICIENT is not None and q.is_cuda and q.dtype in _EFFICIENT_DTYPES
            and q.shape[-1] % 8 == 0 and keys.shape[0] % 16 == 0)


def _repeat_kv(x: torch.Tensor, num_groups: int) -> torch.Tensor:
    """GQA: [S, Hkv, D] -> [S, Hkv * groups, D]; query head h reads kv head h // groups.

    expand + reshape is one copy kernel (repeat_interleave is an index gather, slower on CPU);
    SDPA's enable_gqa is avoided because not every CUDA kernel supports it with a mask.
    """
    seq_len, num_kv_heads, head_dim = x.shape
    return x[:, :, None].expand(seq_len, num_kv_heads, num_groups, head_dim).reshape(seq_len, -1, head_dim)


def _like_q(out: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """out laid out like torch.empty_like(q), the fake impl, so compiled callers index it right."""
    if q.is_contiguous():
        return out.contiguous()  # no copy when the kernel already wrote [T, Hq, D] rows (fused kernels do)
    return torch.empty_like(q).copy_(out)


KV_ATTENTION_OP = torch.ops.torchpcg_models.kv_attention
kv_attention = KV_ATTENTION_OP  # call as kv_attention(q, k, v, kv_cache, layer, positions[, bias])
