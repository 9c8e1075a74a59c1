"""``python -m torchpcg.demo --quick`` runs end to end on CPU and says PASS."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.skipif(sys.platform == "win32", reason="subprocess env handling differs")
def test_demo_quick_passes():
    env = {**os.environ, "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", "")}
    env.pop("TORCHPCG_DEBUG_DIR", None)
    result = subprocess.run([sys.executable, "-m", "torchpcg.demo", "--quick", "--device", "cpu"],
                            cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    out = result.stdout
    assert "attention (torchpcg_models::kv_attention)" in out  # the split plan table
    assert "above the largest bucket" in out and "FAIL" not in out
    assert out.strip().splitlines()[-1].startswith("PASS")
    assert "piecewise" in out and "eager" in out  # the timing table
