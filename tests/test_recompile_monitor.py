"""The recompile monitor on plain torch.compile: each guard flip triggered on purpose.

Every test compiles with ``backend="eager"`` and ``fullgraph=True``, warms up with one call,
then flips exactly one thing Dynamo guards on and checks the counter, the message (what failed
and the fix), the log line and that results still equal the uncompiled function.
"""
from __future__ import annotations

import logging

import pytest
import torch

import torchpcg
from torchpcg.errors import RecompileError
from torchpcg.recompiles import explain_guard_failure, watch_recompiles

LOGGER = "torchpcg.recompiles"


def scale_add(x: torch.Tensor, y: torch.Tensor | None = None, scale: int = 2) -> torch.Tensor:
    out = x * scale
    if y is not None:
        out = out + y
    return out.sin()


def _watched(fn, **kwargs):
    return watch_recompiles(torch.compile(fn, backend="eager", fullgraph=True), **kwargs)


def _only_warning(caplog: pytest.LogCaptureFixture) -> str:
    lines = [r.getMessage() for r in caplog.records if r.name == LOGGER and r.levelno == logging.WARNING]
    assert len(lines) == 1, lines
    return lines[0]


def test_warmup_and_stable_calls_are_not_recompiles() -> None:
    watched = _watched(scale_add)
    x = torch.randn(3, 4)
    with torchpcg.expect(recompiles=0):
        for _ in range(3):
            torch.testing.assert_close(watched(x), scale_add(x))
    assert watched.warmed_up and watched.recompiles == []


def test_grad_mode_flip(caplog: pytest.LogCaptureFixture) -> None:
    linear = torch.nn.Linear(4, 4)
    watched = _watched(linear)
    x = torch.randn(3, 4)
    with torch.no_grad():
        watched(x)
    with caplog.at_level(logging.WARNING, LOGGER), torchpcg.expect(recompiles=1), torch.enable_grad():
        out = watched(x)
    torch.testing.assert_close(out, linear(x))
    message = _only_warning(caplog)
    assert "grad mode changed: call through torchpcg.compile or wrap in torch.no_grad()" in message
    assert watched.recompiles == [message]


def test_none_then_tensor_kwarg(caplog: pytest.LogCaptureFixture) -> None:
    watched = _watched(scale_add)
    x, y = torch.randn(3, 4), torch.randn(3, 4)
    watched(x)
    with caplog.at_level(logging.WARNING, LOGGER), torchpcg.expect(recompiles=1):
        out = watched(x, y=y)
    torch.testing.assert_close(out, scale_add(x, y))
    assert "kwarg y was None and is now a Tensor: declare it in stable_kwargs" in _only_warning(caplog)


def test_tensor_then_none_kwarg() -> None:
    watched = _watched(scale_add)
    x, y = torch.randn(3, 4), torch.randn(3, 4)
    watched(x, y=y)
    with torchpcg.expect(recompiles=1):
        torch.testing.assert_close(watched(x), scale_add(x))
    assert "kwarg y was a Tensor and is now None: declare it in stable_kwargs" in watched.recompiles[0]


def test_size_one_specialization(caplog: pytest.LogCaptureFixture) -> None:
    watched = _watched(scale_add)
    watched(torch.randn(1, 4))  # decode first: Dynamo bakes T=1 in as a constant
    x = torch.randn(5, 4)
    with caplog.at_level(logging.WARNING, LOGGER), torchpcg.expect(recompiles=1):
        torch.testing.assert_close(watched(x), scale_add(x))
    message = _only_warning(caplog)
    assert "size of dim 0 of x specialized to 1 (now 5)" in message
    assert "token_inputs={'x': 0}" in message and "mark_unbacked" in message


def test_python_scalar_change(caplog: pytest.LogCaptureFixture) -> None:
    watched = _watched(scale_add)
    x = torch.randn(3, 4)
    watched(x, scale=2)
    with caplog.at_level(logging.WARNING, LOGGER), torchpcg.expect(recompiles=1):
        torch.testing.assert_close(watched(x, scale=3), scale_add(x, scale=3))
    assert "Python scalar arg scale changed from 2 to 3: pass it as a tensor" in _only_warning(caplog)


def test_enforce_raises_recompile_error_instead_of_compiling() -> None:
    watched = _watched(scale_add, enforce=True)
    x = torch.randn(3, 4)
    watched(x)
    graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    with torchpcg.expect(recompiles=1), pytest.raises(RecompileError, match="kwarg y was None and is now a Tensor"):
        watched(x, y=torch.randn(3, 4))
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == graphs  # nothing was compiled
    torch.testing.assert_close(watched(x), scale_add(x))  # the warm graph still serves


def test_enforce_from_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TORCHPCG_ENFORCE", "1")
    watched = _watched(scale_add)
    watched(torch.randn(1, 4))
    with pytest.raises(RecompileError, match="size of dim 0 of x specialized to 1"):
        watched(torch.randn(4, 4))


@pytest.mark.parametrize(("reason", "expected"), [
    ("0/0: GLOBAL_STATE changed: grad_mode ", "grad mode changed"),
    ("0/0: GLOBAL_STATE changed: autocast ", "global torch state changed (autocast)"),
    ("0/0: L['y'] is None", "kwarg y was None and is now a Tensor"),  # torch <= 2.11 spelling
    ("0/1: L['kwargs']['mm'] is None   # if mm is not None", "kwarg mm was None and is now a Tensor"),
    ("0/0: tensor 'L['x']' size mismatch at index 1. expected 1, actual 7", "size of dim 1 of x specialized to 1"),
    ("0/0: tensor 'x' size mismatch at index 0. expected 3, actual 5", "changed from 3 to 5 and was compiled static"),
    ("0/0: tensor 'x' dtype mismatch. expected Float, actual Half", "dtype of x changed from Float to Half"),
    ("0/0: L['scale'] == 0.5", "Python scalar arg scale changed from 0.5 to another value"),
    ("0/0: ___check_obj_id(L['self'], 1234)", "guard failed: ___check_obj_id(self, 1234)"),
])
def test_guard_failure_wording(reason: str, expected: str) -> None:
    assert expected in explain_guard_failure(reason)
