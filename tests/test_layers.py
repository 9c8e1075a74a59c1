"""find_transformer_layers on the reference decoder, stock HF models and VLM-style wrappers."""
from __future__ import annotations

import pytest
from torch import nn

import torchpcg
from tests.utils import tiny_decoder


class Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(2, 2)


def _blocks(n: int) -> nn.ModuleList:
    return nn.ModuleList(Block() for _ in range(n))


def _nest(path: str, leaf: nn.Module, root: nn.Module | None = None) -> nn.Module:
    """Put ``leaf`` at dotted ``path`` under ``root`` (a new empty module by default)."""
    root = root if root is not None else nn.Module()
    owner = root
    *parents, last = path.split(".")
    for name in parents:
        if not hasattr(owner, name):
            owner.add_module(name, nn.Module())
        owner = getattr(owner, name)
    owner.add_module(last, leaf)
    return root


def test_reference_decoder():
    model = tiny_decoder(num_layers=3)
    path, layers = torchpcg.find_transformer_layers(model)
    assert path == "layers" and layers is model.layers and len(layers) == 3


# The list, as user code spells it (model.<path>), each with a bigger vision tower beside it.
@pytest.mark.parametrize("path", ["layers", "model.layers", "language_model.model.layers", "model.model.layers",
                                  "thinker.model.layers", "model.language_model.layers"])
def test_known_paths_win_over_a_bigger_vision_tower(path):
    layers = _blocks(2)
    model = _nest(path, layers)
    _nest("visual.blocks", _blocks(6), model)
    _nest("mlp_stack", _blocks(5), model)  # an unknown bigger list does not beat a known path either
    found_path, found = torchpcg.find_transformer_layers(model)
    assert (found_path, found) == (path, layers)


def test_hf_causal_lm_and_vlm_style_wrappers():
    transformers = pytest.importorskip("transformers")
    config = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                      num_attention_heads=2, num_key_value_heads=2)
    causal = transformers.LlamaForCausalLM(config)
    assert torchpcg.find_transformer_layers(causal) == ("model.layers", causal.model.layers)
    assert torchpcg.find_transformer_layers(causal.model) == ("layers", causal.model.layers)

    class Vlm(nn.Module):  # language model under .model.language_model, vision tower beside it
        def __init__(self) -> None:
            super().__init__()
            self.model = nn.Module()
            self.model.language_model = causal.model
            self.model.visual = nn.Module()
            self.model.visual.blocks = nn.ModuleList(nn.Linear(4, 4) for _ in range(5))

    vlm = Vlm()
    assert torchpcg.find_transformer_layers(vlm) == ("model.language_model.layers", causal.model.layers)


def test_stock_hf_vlms():
    from tests import hf_tiny

    qwen = hf_tiny.qwen3_vl()
    assert torchpcg.find_transformer_layers(qwen) == ("model.language_model.layers", qwen.model.language_model.layers)
    assert torchpcg.find_transformer_layers(qwen.model) == ("language_model.layers", qwen.model.language_model.layers)
    llava = hf_tiny.llava()
    assert torchpcg.find_transformer_layers(llava) == ("model.language_model.layers",
                                                       llava.model.language_model.layers)


def test_fallback_is_the_largest_uniform_list_outside_vision_towers():
    class Odd(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.mixed = nn.ModuleList([nn.Linear(2, 2), nn.ReLU(), nn.Linear(2, 2), nn.ReLU()])
            self.blocks = nn.ModuleList(nn.Linear(2, 2) for _ in range(3))

    path, layers = torchpcg.find_transformer_layers(Odd())
    assert path == "blocks" and len(layers) == 3

    model = _nest("decoder.stack", _blocks(3))
    for tower in ("vision_tower.encoder.layers", "image_encoder.blocks", "audio_tower.layers", "vit.blocks"):
        _nest(tower, _blocks(8), model)
    assert torchpcg.find_transformer_layers(model) == ("decoder.stack", model.decoder.stack)


def test_error_lists_what_was_tried():
    with pytest.raises(torchpcg.SplitError, match="tried the known layer paths model.language_model.layers") as info:
        torchpcg.find_transformer_layers(nn.Linear(2, 2))
    assert "thinker.model.layers" in str(info.value) and "none (no nn.ModuleList at all)" in str(info.value)

    only_vision = _nest("visual.blocks", _blocks(4))
    only_vision.add_module("mixed", nn.ModuleList([nn.Linear(2, 2), nn.ReLU()]))
    with pytest.raises(torchpcg.SplitError) as info:
        torchpcg.find_transformer_layers(only_vision)
    assert "visual.blocks (vision/audio tower)" in str(info.value)
    assert "mixed (mixed block types)" in str(info.value)
    with pytest.raises(torchpcg.SplitError, match="expected an nn.Module"):
        torchpcg.find_transformer_layers(lambda x: x)
