"""Find the decoder layers of LLM and VLM wrappers.

In: any ``nn.Module``. Out: ``(dotted_path, nn.ModuleList)`` of its transformer blocks, so tools
can check that every layer got its attention split (enforce mode) or count layers per piece.
"""
from __future__ import annotations

import collections

from torch import nn

from .errors import SplitError

__all__ = ["find_transformer_layers", "KNOWN_LAYER_PATHS"]

# Where the common wrappers keep their blocks, most specific first.
KNOWN_LAYER_PATHS = (
    "model.language_model.layers",  # Qwen2.5-VL / Qwen3-VL (transformers >= 4.52)
    "language_model.model.layers",  # LLaVA-style VLMs
    "thinker.model.layers",  # Qwen2.5-Omni
    "model.model.layers",  # a wrapper around a CausalLM
    "model.layers",  # LlamaForCausalLM, Qwen3ForCausalLM, ...
    "layers",  # a bare decoder (torchpcg.models.FlatDecoder)
)


def find_transformer_layers(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """Return ``(dotted_path, layers)`` of the model's decoder layers.

    Example::

        >>> path, layers = torchpcg.find_transformer_layers(llama_for_causal_lm)
        >>> path, len(layers)
        ('model.layers', 32)

    Known paths (``KNOWN_LAYER_PATHS``) win; otherwise the largest ``nn.ModuleList`` whose
    entries are all of one class. Raises ``SplitError`` when the model has no such list.

    Note: it looks at module structure only; it does not run or compile the model.
    """
    modules = dict(model.named_modules())
    for path in KNOWN_LAYER_PATHS:
        found = modules.get(path)
        if isinstance(found, nn.ModuleList) and len(found) > 0:
            return path, found
    candidates = [(len(m), path, m) for path, m in modules.items()
                  if isinstance(m, nn.ModuleList) and len(m) > 0 and _uniform(m)]
    if not candidates:
        raise SplitError(f"{type(model).__name__} has no nn.ModuleList of identical blocks; "
                         f"known layer paths are {', '.join(KNOWN_LAYER_PATHS)}")
    _, path, layers = max(candidates, key=lambda c: (c[0], -c[1].count(".")))
    return path, layers


def _uniform(layers: nn.ModuleList) -> bool:
    return len(collections.Counter(type(m) for m in layers)) == 1
