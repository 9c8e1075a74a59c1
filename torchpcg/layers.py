"""Find the decoder layers of LLM and VLM wrappers.

In: any ``nn.Module``. Out: ``(dotted_path, nn.ModuleList)`` of its transformer blocks, so tools
can check that every layer got its attention split (enforce mode), find the language model of a
vision-language model (``torchpcg.vlm``) or count layers per piece.
"""
from __future__ import annotations

import collections
import re

from torch import nn

from .errors import SplitError

__all__ = ["find_transformer_layers", "KNOWN_LAYER_PATHS", "is_vision_path"]

# Where the common wrappers keep their blocks, most specific first. Paths are relative to the
# model passed in: "model.layers" is ``model.model.layers`` in user code.
KNOWN_LAYER_PATHS = (
    "model.language_model.layers",  # Qwen2.5-VL / Qwen3-VL / LLaVA (transformers >= 4.52: model.language_model)
    "language_model.model.layers",  # LLaVA-style VLMs before 4.52 (language_model is a CausalLM)
    "thinker.model.layers",  # Qwen2.5-Omni / Qwen3-Omni
    "model.model.layers",  # a wrapper around a CausalLM (PEFT, reward models)
    "language_model.layers",  # a VLM base model (LlavaModel, Qwen3VLModel) without its LM head
    "model.layers",  # LlamaForCausalLM, Qwen3ForCausalLM, ...
    "layers",  # a bare decoder (LlamaModel, torchpcg.models.FlatDecoder)
)

# A path component naming a vision (or audio) encoder: its blocks are never the decoder layers.
_ENCODER_COMPONENT = re.compile(r"vision|visual|image|img|pixel|^vit(_|$)|audio|speech|patch_embed")


def is_vision_path(path: str) -> bool:
    """Whether a dotted module path lies inside a vision or audio tower (``model.visual.blocks``)."""
    return any(_ENCODER_COMPONENT.search(part) for part in path.lower().split("."))


def find_transformer_layers(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """Return ``(dotted_path, layers)`` of the model's decoder layers.

    Example::

        >>> path, layers = torchpcg.find_transformer_layers(llama_for_causal_lm)
        >>> path, len(layers)
        ('model.layers', 32)
        >>> torchpcg.find_transformer_layers(qwen3_vl)[0]
        'model.language_model.layers'

    Known paths (``KNOWN_LAYER_PATHS``: ``layers``, ``model.layers``, ``model.model.layers``,
    ``language_model.model.layers``, ``model.language_model.layers``, ``thinker.model.layers``, ...)
    win; otherwise the largest ``nn.ModuleList`` whose entries are all of one class and that is not
    inside a vision or audio tower (a path component like ``visual``, ``vision_tower``,
    ``image_encoder``, ``audio_tower``); ties go to the shallower path. Raises ``SplitError``
    listing what was tried when nothing fits.

    Note: it looks at module structure only; it does not run or compile the model.
    """
    if not isinstance(model, nn.Module):
        raise SplitError(f"find_transformer_layers(model={type(model).__name__}): expected an nn.Module")
    modules = dict(model.named_modules())
    for path in KNOWN_LAYER_PATHS:
        found = modules.get(path)
        if isinstance(found, nn.ModuleList) and len(found) > 0 and _uniform(found):
            return path, found
    lists = [(path, m) for path, m in modules.items() if isinstance(m, nn.ModuleList) and len(m) > 0]
    candidates = [(len(m), path, m) for path, m in lists if _uniform(m) and not is_vision_path(path)]
    if not candidates:
        raise SplitError(_nothing_found(model, lists))
    _, path, layers = max(candidates, key=lambda c: (c[0], -c[1].count(".")))
    return path, layers


def _uniform(layers: nn.ModuleList) -> bool:
    return len(collections.Counter(type(m) for m in layers)) == 1


def _nothing_found(model: nn.Module, lists: list[tuple[str, nn.ModuleList]]) -> str:
    skipped = [f"{path} ({'vision/audio tower' if is_vision_path(path) else 'mixed block types'})"
               for path, m in lists]
    return (f"{type(model).__name__} has no decoder layers: tried the known layer paths "
            f"{', '.join(KNOWN_LAYER_PATHS)}, then any nn.ModuleList of identical blocks outside vision "
            f"towers; skipped: {', '.join(skipped) or 'none (no nn.ModuleList at all)'}. Pass the language "
            f"model itself, or name its layers (e.g. torchpcg.find_transformer_layers(model.decoder))")
