"""The backend is found by name: after `import torchpcg`, and through the entry point without it."""
from __future__ import annotations

import subprocess
import sys

import pytest
import torch

import torchpcg

FRESH = """
import sys, torch, torch._dynamo
assert "piecewise" in torch._dynamo.list_backends(), torch._dynamo.list_backends()
assert "torchpcg" not in sys.modules, "listing must not need torchpcg imported"
def fn(x):
    h = torch.nn.functional.scaled_dot_product_attention(x[None], x[None], x[None])[0]
    return h * 2
x = torch.randn(5, 8)
torch._dynamo.mark_dynamic(x, 0)
out = torch.compile(fn, backend="piecewise", options={"cudagraph": "emulate", "compiler": "eager"})(x)
torch.testing.assert_close(out, fn(x))
import torchpcg
assert torchpcg.stats()["dynamo_graphs"] == 1 and torchpcg.stats()["split_ops"] == 1
print("ok")
"""


def test_entry_point_finds_the_backend_in_a_fresh_interpreter():
    result = subprocess.run([sys.executable, "-c", FRESH], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0 and result.stdout.strip().endswith("ok"), result.stderr[-2000:]


def test_registered_on_import_and_options_reach_the_backend():
    assert "piecewise" in torch._dynamo.list_backends()

    def fn(x):
        return torch.relu(x) + 1

    x = torch.randn(4, 3)
    torch._dynamo.mark_dynamic(x, 0)
    compiled = torch.compile(fn, backend="piecewise", options={"cudagraph": "off", "capture_sizes": "2,4"})
    with torchpcg.expect(dynamo_graphs=1, captured=0, eager_runs=0, graphless_runs=1):  # Inductor code, no graphs
        torch.testing.assert_close(compiled(x), fn(x))


def test_bad_option_fails_the_compile_with_the_key_named():
    compiled = torch.compile(lambda x: x + 1, backend="piecewise", options={"capture_size": 4})
    with pytest.raises(Exception, match="unknown torchpcg option 'capture_size'"):  # Dynamo wraps it
        compiled(torch.randn(3))
