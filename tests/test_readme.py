"""The README's Quick start runs as written on a CPU-only machine (graphs off, the same results)."""
from __future__ import annotations

import contextlib
import io
import re
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"


def test_quick_start_runs_as_written(monkeypatch: pytest.MonkeyPatch) -> None:
    text = README.read_text(encoding="utf-8")
    block = re.search(r"## Quick start\n\n```python\n(.*?)```", text, re.S)
    assert block is not None, "README has no Quick start code block"
    monkeypatch.setenv("TORCHPCG_COMPILER", "eager")  # speed only: the pieces as FX code instead of Inductor's
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        exec(compile(block.group(1), str(README), "exec"), {"__name__": "__readme__"})  # noqa: S102
    printed = out.getvalue()
    assert "'recompiles': 0" in printed and "'capture_failures': 0" in printed
    assert "split ops" in printed and "attention" in printed  # the explain report
