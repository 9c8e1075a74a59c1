"""find_transformer_layers on the reference decoder, stock HF models and VLM-style wrappers."""
from __future__ import annotations

import pytest
from torch import nn

import torchpcg
from tests.utils import tiny_decoder


def test_reference_decoder():
    model = tiny_decoder(num_layers=3)
    path, layers = torchpcg.find_transformer_layers(model)
    assert path == "layers" and layers is model.layers and len(layers) == 3


def test_hf_causal_lm_and_vlm_style_wrappers():
    transformers = pytest.importorskip("transformers")
    config = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                      num_attention_heads=2, num_key_value_heads=2)
    causal = transformers.LlamaForCausalLM(config)
    assert torchpcg.find_transformer_layers(causal) == ("model.layers", causal.model.layers)

    class Vlm(nn.Module):  # language model under .model.language_model, vision tower beside it
        def __init__(self) -> None:
            super().__init__()
            self.model = nn.Module()
            self.model.language_model = causal.model
            self.model.visual = nn.Module()
            self.model.visual.blocks = nn.ModuleList(nn.Linear(4, 4) for _ in range(5))

    vlm = Vlm()
    assert torchpcg.find_transformer_layers(vlm) == ("model.language_model.layers", causal.model.layers)


def test_fallback_is_the_largest_uniform_list_and_errors_name_known_paths():
    class Odd(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.mixed = nn.ModuleList([nn.Linear(2, 2), nn.ReLU(), nn.Linear(2, 2), nn.ReLU()])
            self.blocks = nn.ModuleList(nn.Linear(2, 2) for _ in range(3))

    path, layers = torchpcg.find_transformer_layers(Odd())
    assert path == "blocks" and len(layers) == 3
    with pytest.raises(torchpcg.SplitError, match="known layer paths are model.language_model.layers"):
        torchpcg.find_transformer_layers(nn.Linear(2, 2))
