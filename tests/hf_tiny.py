"""Tiny random Hugging Face models for the generate() and VLM tests (no downloads).

In: a name, a device and a dtype. Out: the model in eval mode with ``attn_implementation="sdpa"``,
plus input makers for image requests. Every builder seeds its own RNG (same weights on every
build, the global RNG untouched).

- ``causal_lm("llama" | "qwen3")``: ``*ForCausalLM``, vocab 128, hidden 64, 2 layers.
- ``qwen3_vl()``: ``Qwen3VLForConditionalGeneration``, a 3-layer text model (mrope, head dim 16)
  and a 2-block vision tower whose two blocks both feed deepstack features to the first two
  decoder layers. ``qwen3_vl_image(...)`` makes one request with an image of ``h x w`` patches.
- ``llava()``: ``LlavaForConditionalGeneration``, CLIP vision tower (16 px images, 4 px patches:
  16 image tokens) and a 2-layer Llama. ``llava_image(...)`` makes one image request.

Token ids 100..103 are the image / video / vision-start / vision-end tokens; text ids are < 100.

Note: written against transformers 5.17 .. 5.24 (``past_key_values`` was renamed ``cache`` in
between; nothing here names either).
"""
from __future__ import annotations

from typing import Any

import pytest
import torch

transformers = pytest.importorskip("transformers")

VOCAB_SIZE = 128
IMAGE_TOKEN, VIDEO_TOKEN, VISION_START, VISION_END = 100, 101, 102, 103
QWEN3_VL_PATCH = 4  # pixels per patch side; temporal patch 2, 3 channels
LLAVA_IMAGE_SIZE, LLAVA_PATCH = 16, 4


def _build(cls: Any, config: Any, device: str, dtype: torch.dtype) -> Any:
    config._attn_implementation = "sdpa"
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = cls(config)
    return model.to(device=device, dtype=dtype).eval()


def causal_lm(name: str, device: str = "cpu", dtype: torch.dtype = torch.float32) -> Any:
    """A tiny ``LlamaForCausalLM``, ``Qwen3ForCausalLM`` or ``MixtralForCausalLM`` (4 experts, top-2)."""
    common = dict(vocab_size=VOCAB_SIZE, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)
    if name == "llama":
        return _build(transformers.LlamaForCausalLM, transformers.LlamaConfig(**common), device, dtype)
    if name == "qwen3":
        return _build(transformers.Qwen3ForCausalLM, transformers.Qwen3Config(head_dim=16, **common), device, dtype)
    if name == "mixtral":
        config = transformers.MixtralConfig(num_local_experts=4, num_experts_per_tok=2, **common)
        return _build(transformers.MixtralForCausalLM, config, device, dtype)
    raise ValueError(f"causal_lm(name={name!r}): expected 'llama', 'qwen3' or 'mixtral'")


def qwen3_vl(device: str = "cpu", dtype: torch.dtype = torch.float32, num_layers: int = 3) -> Any:
    """A tiny ``Qwen3VLForConditionalGeneration`` (skips if this transformers has none)."""
    if not hasattr(transformers, "Qwen3VLForConditionalGeneration"):
        pytest.skip("transformers has no Qwen3VLForConditionalGeneration")
    text = dict(vocab_size=VOCAB_SIZE, hidden_size=64, intermediate_size=128, num_hidden_layers=num_layers,
                num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=512,
                rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3],
                                 "mrope_interleaved": True})
    vision = dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=2, patch_size=QWEN3_VL_PATCH,
                  temporal_patch_size=2, spatial_merge_size=2, out_hidden_size=64, num_position_embeddings=16,
                  deepstack_visual_indexes=[0, 1], in_channels=3)
    config = transformers.Qwen3VLConfig(text_config=text, vision_config=vision, image_token_id=IMAGE_TOKEN,
                                        video_token_id=VIDEO_TOKEN, vision_start_token_id=VISION_START,
                                        vision_end_token_id=VISION_END)
    return _build(transformers.Qwen3VLForConditionalGeneration, config, device, dtype)


def text_ids(length: int, seed: int, device: str = "cpu") -> torch.Tensor:
    """[1, length] random text token ids (< 100)."""
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, IMAGE_TOKEN, (1, length), generator=generator).to(device)


def qwen3_vl_image(prefix: int, suffix: int, seed: int, h: int = 4, w: int = 4, device: str = "cpu",
                   dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    """One Qwen3-VL image request: ``prefix`` text tokens, <start> h*w/4 image tokens <end>, ``suffix``."""
    generator = torch.Generator().manual_seed(seed)
    image_tokens = h * w // 4  # spatial merge 2 x 2
    ids = torch.cat([torch.randint(0, IMAGE_TOKEN, (prefix,), generator=generator), torch.tensor([VISION_START]),
                     torch.full((image_tokens,), IMAGE_TOKEN), torch.tensor([VISION_END]),
                     torch.randint(0, IMAGE_TOKEN, (suffix,), generator=generator)])[None]
    pixels = torch.randn(h * w, 3 * 2 * QWEN3_VL_PATCH ** 2, generator=generator)
    return {"input_ids": ids.to(device), "pixel_values": pixels.to(device=device, dtype=dtype),
            "image_grid_thw": torch.tensor([[1, h, w]], device=device),
            "mm_token_type_ids": (ids == IMAGE_TOKEN).int().to(device)}


def llava(device: str = "cpu", dtype: torch.dtype = torch.float32) -> Any:
    """A tiny ``LlavaForConditionalGeneration`` (CLIP vision tower, Llama text model)."""
    text = transformers.LlamaConfig(vocab_size=VOCAB_SIZE, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                    num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)
    vision = transformers.CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                           num_attention_heads=2, image_size=LLAVA_IMAGE_SIZE, patch_size=LLAVA_PATCH,
                                           projection_dim=32)
    config = transformers.LlavaConfig(vision_config=vision, text_config=text, image_token_id=IMAGE_TOKEN,
                                      vision_feature_layer=-1, vision_feature_select_strategy="default")
    return _build(transformers.LlavaForConditionalGeneration, config, device, dtype)


def llava_image(prefix: int, suffix: int, seed: int, device: str = "cpu",
                dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    """One LLaVA image request: ``prefix`` text tokens, 16 image tokens, ``suffix`` text tokens."""
    generator = torch.Generator().manual_seed(seed)
    image_tokens = (LLAVA_IMAGE_SIZE // LLAVA_PATCH) ** 2  # "default" strategy drops CLS
    ids = torch.cat([torch.randint(0, IMAGE_TOKEN, (prefix,), generator=generator),
                     torch.full((image_tokens,), IMAGE_TOKEN),
                     torch.randint(0, IMAGE_TOKEN, (suffix,), generator=generator)])[None]
    pixels = torch.randn(1, 3, LLAVA_IMAGE_SIZE, LLAVA_IMAGE_SIZE, generator=generator)
    return {"input_ids": ids.to(device), "pixel_values": pixels.to(device=device, dtype=dtype)}


# ---- generate() recipes ------------------------------------------------------------------------------

GREEDY = {"max_new_tokens": 32, "min_new_tokens": 32, "do_sample": False}
RECIPES = ("forward", "compile_config", "torchpcg")
"""The three ways docs/models.md shows: (a) ``model.forward = torch.compile(model.forward,
backend="piecewise")``; (b) ``generate(cache_implementation="static",
compile_config=CompileConfig(backend="piecewise"))``; (c) ``model.forward =
torchpcg.compile(model.forward)``."""


def compile_config(**fields: Any) -> Any:
    """``CompileConfig(backend="piecewise", **fields)`` that also compiles off CUDA (CPU tests).

    transformers compiles inside generate() only on cuda/xpu/tpu/neuron unless the config's
    ``_compile_all_devices`` flag is set (its own tests use it; present in 5.17 and 5.24).
    """
    config = transformers.CompileConfig(backend="piecewise", **fields)
    config._compile_all_devices = True
    return config


def cache_kwarg(model: Any) -> str:
    """The name generate() and forward take a cache by: ``cache`` (transformers >= 5.2x) or ``past_key_values``."""
    import inspect

    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


class Recipe:
    """One generate() recipe applied to one model; ``generate(ids)`` runs greedy decoding with it."""

    def __init__(self, name: str, model: Any, options: dict[str, Any] | None = None) -> None:
        import torchpcg

        if name not in RECIPES:
            raise ValueError(f"Recipe(name={name!r}): expected one of {RECIPES}")
        self.name = name
        self.model = model
        self.forward = None
        if name == "forward":
            self.forward = torch.compile(model.forward, backend="piecewise", options=options)
        elif name == "torchpcg":
            self.forward = torchpcg.compile(model.forward, **(options or {}))

    def generate(self, ids: torch.Tensor, **kwargs: Any) -> torch.Tensor:
        settings = {**GREEDY, **kwargs}
        if self.name == "compile_config":  # piecewise options come from TORCHPCG_* (mode + options is refused)
            return self.model.generate(ids, cache_implementation="static", compile_config=compile_config(),
                                       **settings)
        self.model.forward = self.forward  # an instance attribute: nn.Module.__call__ uses it
        try:
            return self.model.generate(ids, **settings)
        finally:
            del self.model.forward
