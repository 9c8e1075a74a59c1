"""Model zoo of the conformance suite: tiny models of every kind torchpcg must serve.

In: a model name, a device and a dtype. Out: a ``ZooModel``, the model in eval mode plus how to
make fresh inputs for a token count and how to pick the output to compare (the logits).

Models (all random weights, built offline, vocab 256, hidden 64, 2 layers):

- ``flat``: the reference ``FlatDecoder`` (ids [T], positions [T], KV cache; split at
  ``torchpcg_models::kv_attention``).
- ``llama``, ``qwen3``, ``gpt2``, ``gemma``: Hugging Face ``*ForCausalLM`` with
  ``attn_implementation="sdpa"`` and ``use_cache=False``; input ``input_ids [1, T]`` only. GPT-2
  brings learned positions and ``Conv1D``; Gemma brings ``(1 + w)`` RMSNorm, tanh-GELU and a
  scaled, tied embedding.
- ``packed``: ``PackedDecoder``, flat tokens of several packed sequences with TWO token inputs
  (``tokens [T]`` and ``segments [T]``, int64, names no heuristic knows) and a custom attention
  op registered with ``torch.library.custom_op`` (``torchpcg_zoo::attend``) and
  ``torchpcg.register_splitting_op``.

Every ``inputs(T, seed)`` call makes new tensors on the model's device with contents fixed by
``(T, seed)``, so eager and compiled calls get identical but distinct inputs (the flat decoder
gets a fresh zeroed KV cache each time).

Example::

    zoo_model = build("llama", "cpu", torch.float32)
    logits = zoo_model.logits(zoo_model.model(*zoo_model.inputs(5, seed=0)))   # [1, 5, 256]

Note: no downloads, no tokenizer, no generation; ``transformers`` must be installed for the
Hugging Face models.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

import torchpcg
from torchpcg.models import DecoderConfig, FlatDecoder

__all__ = ["ZooModel", "MODELS", "build", "PackedDecoder", "ATTEND_OP"]

VOCAB_SIZE = 256
HIDDEN_SIZE = 64
NUM_LAYERS = 2
MAX_POSITIONS = 128  # every token count the suite uses (≤ 40) fits


@dataclasses.dataclass(frozen=True)
class ZooModel:
    """A model plus its input maker and output picker."""

    name: str
    """Zoo name, e.g. ``"llama"``."""
    model: nn.Module
    """The uncompiled model, eval mode, on its device and dtype."""
    make_inputs: Callable[[int, int], tuple[Any, ...]]
    """``(num_tokens, seed) -> positional args``; new tensors on every call."""
    logits: Callable[[Any], torch.Tensor]
    """Picks the tensor to compare from the model's output."""

    def inputs(self, num_tokens: int, seed: int = 0) -> tuple[Any, ...]:
        """Fresh positional args for ``num_tokens`` tokens (``torchpcg.capture``'s make_inputs)."""
        return self.make_inputs(num_tokens, seed)


def _generator(num_tokens: int, seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(1000 * seed + num_tokens)


def _random_ids(num_tokens: int, seed: int, shape: tuple[int, ...], device: torch.device) -> torch.Tensor:
    return torch.randint(0, VOCAB_SIZE, shape, generator=_generator(num_tokens, seed)).to(device)


# ---- the reference decoder -----------------------------------------------------------------------

def flat_decoder(device: torch.device | str, dtype: torch.dtype) -> ZooModel:
    """torchpcg's reference FlatDecoder: (ids [T], positions [T], fresh KV cache) -> logits [T, V]."""
    config = DecoderConfig(vocab_size=VOCAB_SIZE, hidden_size=HIDDEN_SIZE, num_layers=NUM_LAYERS,
                           max_seq_len=MAX_POSITIONS)
    model = FlatDecoder(config).to(device=device, dtype=dtype).eval()
    device = torch.device(device)

    def make_inputs(num_tokens: int, seed: int) -> tuple[Any, ...]:
        ids = _random_ids(num_tokens, seed, (num_tokens,), device)
        positions = torch.arange(num_tokens, device=device)
        return ids, positions, model.new_kv_cache()  # a zeroed cache per call: eager == compiled inputs

    return ZooModel("flat", model, make_inputs, lambda out: out)


# ---- Hugging Face decoders -----------------------------------------------------------------------

def _hf_config(name: str) -> Any:
    import transformers

    common = dict(vocab_size=VOCAB_SIZE, hidden_size=HIDDEN_SIZE, intermediate_size=2 * HIDDEN_SIZE,
                  num_hidden_layers=NUM_LAYERS, num_attention_heads=4, num_key_value_heads=2,
                  max_position_embeddings=MAX_POSITIONS, use_cache=False, attn_implementation="sdpa")
    if name == "llama":
        return transformers.LlamaConfig(**common)
    if name == "qwen3":
        return transformers.Qwen3Config(head_dim=16, **common)
    if name == "gemma":
        return transformers.GemmaConfig(head_dim=16, **common)
    if name == "gpt2":
        return transformers.GPT2Config(vocab_size=VOCAB_SIZE, n_embd=HIDDEN_SIZE, n_layer=NUM_LAYERS, n_head=4,
                                       n_positions=MAX_POSITIONS, bos_token_id=0, eos_token_id=0,
                                       use_cache=False, attn_implementation="sdpa")
    raise ValueError(f"no Hugging Face model {name!r} in the zoo")


def _hf_class(name: str) -> type[nn.Module]:
    import transformers

    return {"llama": transformers.LlamaForCausalLM, "qwen3": transformers.Qwen3ForCausalLM,
            "gemma": transformers.GemmaForCausalLM, "gpt2": transformers.GPT2LMHeadModel}[name]


def hf_model(name: str, device: torch.device | str, dtype: torch.dtype) -> ZooModel:
    """A tiny random Hugging Face causal LM: (input_ids [1, T],) -> .logits [1, T, V]."""
    config = _hf_config(name)
    with torch.random.fork_rng(devices=[]):  # same weights every build, global RNG untouched
        torch.manual_seed(0)
        model = _hf_class(name)(config)
    model = model.to(device=device, dtype=dtype).eval()
    assert model.config._attn_implementation == "sdpa" and not model.config.use_cache
    device = torch.device(device)

    def make_inputs(num_tokens: int, seed: int) -> tuple[Any, ...]:
        return (_random_ids(num_tokens, seed, (1, num_tokens), device),)  # use_cache=False: from the config

    return ZooModel(name, model, make_inputs, lambda out: out.logits)


# ---- a flat model with a registered custom attention op and two token inputs ------------------

@torch.library.custom_op("torchpcg_zoo::attend", mutates_args=())
def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, segments: torch.Tensor) -> torch.Tensor:
    """Causal attention within each packed sequence: q, k, v [T, H, D], segments [T] -> [T, H, D]."""
    order = torch.arange(q.shape[0], device=q.device)
    # [T, T]: token t sees token s <= t of its own sequence; mixes tokens, so it must be a split op.
    allowed = (segments[:, None] == segments[None, :]) & (order[None, :] <= order[:, None])
    out = F.scaled_dot_product_attention(q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1),
                                         attn_mask=allowed)  # [H, T, D]
    return out.transpose(0, 1).contiguous()


@attend.register_fake
def _attend_fake(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, segments: torch.Tensor) -> torch.Tensor:
    return q.new_empty(q.shape)  # contiguous [T, H, D], like the real op


ATTEND_OP = "torchpcg_zoo::attend"


class PackedBlock(nn.Module):
    """Pre-LayerNorm block: h += o(attend(qkv(norm(h)))); h += mlp(norm(h)), GELU MLP."""

    def __init__(self, hidden_size: int, num_heads: int) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.attn_norm = nn.LayerNorm(hidden_size)
        self.qkv = nn.Linear(hidden_size, 3 * hidden_size)
        self.out = nn.Linear(hidden_size, hidden_size)
        self.mlp_norm = nn.LayerNorm(hidden_size)
        self.mlp = nn.Sequential(nn.Linear(hidden_size, 2 * hidden_size), nn.GELU(),
                                 nn.Linear(2 * hidden_size, hidden_size))

    def forward(self, h: torch.Tensor, segments: torch.Tensor) -> torch.Tensor:
        head_dim = h.shape[-1] // self.num_heads
        q, k, v = self.qkv(self.attn_norm(h)).unflatten(-1, (3, self.num_heads, head_dim)).unbind(1)  # [T, H, D]
        h = h + self.out(attend(q, k, v, segments).flatten(-2))
        return h + self.mlp(self.mlp_norm(h))


class PackedDecoder(nn.Module):
    """Flat tokens of packed sequences: tokens [T], segments [T] (sequence id, non-decreasing) -> logits [T, V].

    Both inputs carry the token dim and neither has a conventional name. ``segments`` feeds a
    row-wise embedding (inside graphs) and the split op (outside).
    """

    def __init__(self, vocab_size: int = VOCAB_SIZE, hidden_size: int = HIDDEN_SIZE, num_heads: int = 4,
                 num_layers: int = NUM_LAYERS, num_segments: int = 4) -> None:
        super().__init__()
        self.num_segments = num_segments
        self.embed = nn.Embedding(vocab_size, hidden_size)
        self.segment_embed = nn.Embedding(num_segments, hidden_size)
        self.blocks = nn.ModuleList(PackedBlock(hidden_size, num_heads) for _ in range(num_layers))
        self.norm = nn.LayerNorm(hidden_size)
        self.lm_head = nn.Linear(hidden_size, vocab_size, bias=False)

    def forward(self, tokens: torch.Tensor, segments: torch.Tensor) -> torch.Tensor:
        h = self.embed(tokens) + self.segment_embed(segments)  # [T, H]
        for block in self.blocks:
            h = block(h, segments)
        return self.lm_head(self.norm(h))


def packed_decoder(device: torch.device | str, dtype: torch.dtype) -> ZooModel:
    """PackedDecoder; registers ``torchpcg_zoo::attend`` as a split op (idempotent)."""
    torchpcg.register_splitting_op(ATTEND_OP)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = PackedDecoder()
    model = model.to(device=device, dtype=dtype).eval()
    device = torch.device(device)

    def make_inputs(num_tokens: int, seed: int) -> tuple[Any, ...]:
        tokens = _random_ids(num_tokens, seed, (num_tokens,), device)
        segments = torch.randint(0, model.num_segments, (num_tokens,), generator=_generator(num_tokens, seed + 7))
        return tokens, segments.sort().values.to(device)

    return ZooModel("packed", model, make_inputs, lambda out: out)


# ---- registry ------------------------------------------------------------------------------------

MODELS: tuple[str, ...] = ("flat", "llama", "qwen3", "gpt2", "gemma", "packed")


def build(name: str, device: torch.device | str, dtype: torch.dtype) -> ZooModel:
    """The zoo model ``name`` (one of ``MODELS``) on ``device`` in ``dtype``."""
    if name == "flat":
        return flat_decoder(device, dtype)
    if name == "packed":
        return packed_decoder(device, dtype)
    return hf_model(name, device, dtype)
