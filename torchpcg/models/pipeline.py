"""The reference FlatDecoder split into pipeline-parallel stages.

In: a FlatDecoder and a number of stages. Out: ``num_stages`` modules that share the original's
weights (its own submodules, no copies) and, chained, compute exactly what the model computes.

Stage contract (the one vLLM's pipeline-parallel models follow):

=========  ===============================================  =========================================
stage      in                                               out
=========  ===============================================  =========================================
first      ``(input_ids [T], positions [T], kv_cache)``     proxy ``{"hidden_states", "residual"}``
middle     ``(proxy, positions, kv_cache)``                 proxy for the next stage
last       ``(proxy, positions, kv_cache)``                 logits ``[T, vocab]``
=========  ===============================================  =========================================

The proxy tensors are both ``[T, H]``. FlatDecoder keeps one residual stream ``h``, and a layer
ends with ``h = h_mid + mlp(norm(h_mid))``. A stage stops just before that last add:
``residual`` is ``h_mid`` (the stream after the attention add) and ``hidden_states`` is the MLP's
output; the next stage starts with ``h = residual + hidden_states``, the very add the whole model
does, so chained stages equal the model bit for bit (fp32 and bf16 alike). This is the layout of
vLLM's ``IntermediateTensors`` (fused add + norm at the stage boundary), so both proxies carry
meaning; neither is a copy of the other.

Every stage takes the full-shape KV cache ``[num_layers, 2, S, Hkv, D]``: its layers keep their
global layer index and read and write only their own rows ``cache[first_layer:last_layer]``, so one
cache per rank (or one shared in-process cache) works unchanged and the other stages' rows stay
untouched.

Example:
    >>> model = FlatDecoder(DecoderConfig(num_layers=4))
    >>> first, last = split_stages(model, 2)
    >>> cache = model.new_kv_cache()
    >>> proxy = first(torch.tensor([1, 2, 3]), torch.arange(3), cache)   # {"hidden_states", "residual"}
    >>> logits = last(proxy, torch.arange(3), cache)                     # == model(...), [3, 512]

Note: no deepstack embeds (a pipeline stage would need its own slice of them).
"""
from __future__ import annotations

import torch
from torch import nn

from torchpcg.models.decoder import FlatDecoder, per_forward_inputs

__all__ = ["PipelineStage", "split_stages", "PROXY_KEYS"]

PROXY_KEYS = ("hidden_states", "residual")


class PipelineStage(nn.Module):
    """Layers ``[start, stop)`` of a FlatDecoder, plus the embedding (first stage) or the final
    norm and lm_head (last stage); every submodule is the original model's own object.

    ``forward(inputs, positions, kv_cache)``: ``inputs`` is ``input_ids [T]`` on the first stage
    and the previous stage's proxy dict on the others.
    """

    def __init__(self, model: FlatDecoder, start: int, stop: int) -> None:
        super().__init__()
        num_layers = len(model.layers)
        if not 0 <= start < stop <= num_layers:
            raise ValueError(f"layers [{start}, {stop}) are not a non-empty range of 0..{num_layers}")
        self.config = model.config
        self.start, self.stop = start, stop
        self.is_first, self.is_last = start == 0, stop == num_layers
        self.embed_tokens = model.embed_tokens if self.is_first else None
        self.rotary = model.rotary  # a buffer derived from the config: shared, not a copy
        self.layers = nn.ModuleList(model.layers[start:stop])
        self.norm = model.norm if self.is_last else None
        self.lm_head = model.lm_head if self.is_last else None

    def forward(
        self, inputs: torch.Tensor | dict[str, torch.Tensor], positions: torch.Tensor, kv_cache: torch.Tensor
    ) -> torch.Tensor | dict[str, torch.Tensor]:
        """input_ids [T] or proxy {hidden_states, residual} [T, H] -> proxy, or logits [T, vocab] last."""
        if self.is_first:
            h = self.embed_tokens(inputs)  # [T, H]
        else:
            h = inputs["residual"] + inputs["hidden_states"]  # the add the previous stage left out
        cos, sin, bias = per_forward_inputs(self.rotary, positions, kv_cache, h.dtype)
        for layer in self.layers[:-1]:
            h = layer(h, positions, kv_cache, cos, sin, bias)
        last = self.layers[-1]
        residual = h + last.self_attn(last.input_norm(h), positions, kv_cache, cos, sin, bias)
        hidden_states = last.mlp(last.post_attention_norm(residual))
        if not self.is_last:
            return {"hidden_states": hidden_states, "residual": residual}
        return self.lm_head(self.norm(residual + hidden_states))  # DecoderLayer's `h_mid + mlp(...)`

    def extra_repr(self) -> str:
        return f"layers=[{self.start}, {self.stop}), first={self.is_first}, last={self.is_last}"


def split_stages(model: FlatDecoder, num_stages: int) -> list[PipelineStage]:
    """``model``'s layers in ``num_stages`` contiguous stages, as even as possible (the first
    stages get one more layer when they do not divide evenly); weights shared with ``model``."""
    num_layers = len(model.layers)
    if not 1 <= num_stages <= num_layers:
        raise ValueError(f"num_stages={num_stages}: expected 1..num_layers={num_layers}")
    if model.config.deepstack_layers:
        raise ValueError("split_stages does not support deepstack embeds (deepstack_layers > 0)")
    base, extra = divmod(num_layers, num_stages)
    stages, start = [], 0
    for index in range(num_stages):
        stop = start + base + (index < extra)
        stages.append(PipelineStage(model, start, stop).train(model.training))
        start = stop
    return stages
