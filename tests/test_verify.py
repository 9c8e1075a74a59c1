"""TORCHPCG_VERIFY: the padded replay of each piece is checked against the exact-size run."""
from __future__ import annotations

import pytest
import torch

import torchpcg
from tests.utils import compare, tiny_decoder


class _TokenMean(torch.nn.Module):
    """Adds the mean over tokens to every row: not row-wise, so padding would change the answer."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x * 2 + x.mean(0, keepdim=True)
        return torch.nn.functional.scaled_dot_product_attention(h[None], h[None], h[None])[0]


def _compile(model, **options):
    options = {"cudagraph": "emulate", "compiler": "eager", "capture_sizes": (8,), "verify": True, **options}
    return torch.compile(model, backend="piecewise", fullgraph=True, options=options)


def test_verify_names_piece_and_node_when_analysis_misses_an_unsafe_op(monkeypatch):
    import torchpcg.backend

    monkeypatch.setattr(torchpcg.backend, "classify", lambda gm, symbol: {})  # pretend the analysis missed it
    compiled = _compile(_TokenMean())
    x = torch.randn(5, 4)
    torch._dynamo.mark_dynamic(x, 0)
    with pytest.raises(torchpcg.PaddingError, match=r"submod_0: at bucket 8 \(T=5\).*'mean'"):
        compiled(x)


def test_with_the_analysis_the_same_model_is_cut_and_verifies_clean():
    model = _TokenMean()
    compiled = _compile(model)
    for num_tokens in (5, 8, 3):
        x = torch.randn(num_tokens, 4)
        torch._dynamo.mark_dynamic(x, 0)
        torch.testing.assert_close(compiled(x), model(x))


def test_reference_decoder_verifies_clean(monkeypatch):
    monkeypatch.setenv("TORCHPCG_VERIFY", "1")
    model = tiny_decoder()
    compiled = torch.compile(model, backend="piecewise", fullgraph=True,
                             options={"cudagraph": "emulate", "compiler": "eager", "capture_sizes": (4, 8)})
    for num_tokens in (3, 8, 5):
        compare(model, compiled, num_tokens, atol=1e-5, rtol=1e-5)
    assert torchpcg.stats()["captured"] > 0
