"""Reference models for tests, bench and the demo: a flat-token Llama-style decoder, the same
written as model authors usually write one (``BufferDecoder``: KV cache in module buffers, SDPA
in its attention op) and with graph-breaking mixture-of-experts MLPs (``moe_decoder``),
its KV-cache attention op (`torchpcg_models::kv_attention`) and a tensor parallel
version of the decoder (`TPFlatDecoder`, torch.distributed functional collectives), and pipeline
stages of it (`split_stages`, proxy tensors between stages); a packed-patch vision encoder
(`PackedViT`) and its varlen attention op (`torchpcg_models::varlen_attention`).

Importing this package registers the op and does nothing else; it never imports
torchpcg's top level, so torchpcg may import it without a cycle.
"""
from __future__ import annotations

import torch

from torchpcg.models.attention import KV_ATTENTION_OP, kv_attention
from torchpcg.models.buffer_decoder import BUFFER_ATTENTION_OP, BufferDecoder
from torchpcg.models.decoder import DecoderConfig, FlatDecoder, reference_config
from torchpcg.models.moe import MoEMLP, moe_decoder
from torchpcg.models.pipeline import PipelineStage, split_stages
from torchpcg.models.vit import VARLEN_ATTENTION_OP, PackedViT, ViTConfig, pack_images, varlen_attention, vit_reference_config

__all__ = ["KV_ATTENTION_OP", "kv_attention", "BUFFER_ATTENTION_OP", "BufferDecoder", "MoEMLP", "moe_decoder",
           "DecoderConfig", "FlatDecoder", "reference_config", "PipelineStage",
           "split_stages", "VARLEN_ATTENTION_OP", "varlen_attention", "ViTConfig", "PackedViT", "pack_images",
           "vit_reference_config"]

if torch.distributed.is_available():  # builds without torch.distributed lack functional collectives
    from torchpcg.models.tensor_parallel import TPFlatDecoder

    __all__ += ["TPFlatDecoder"]
