"""torchpcg: piecewise CUDA graphs for any PyTorch inference model.

    import torch, torchpcg
    compiled = torch.compile(model, backend="piecewise")

Importing torchpcg registers the ``"piecewise"`` Dynamo backend (it is also found through the
``torch_dynamo_backends`` entry point without importing torchpcg).
"""
from __future__ import annotations

from .backend import piecewise_backend, register as _register_backend
from .capture import capture
from .explain import ExplainReport, explain
from .layers import find_transformer_layers
from .config import PiecewiseConfig, VisionConfig
from .errors import (CaptureError, ConfigError, PaddingError, RecompileError, SplitError, StableInputError,
                     TorchPCGError)
from .split import register_splitting_op
from .front import compile
from .recompiles import watch_recompiles
from .stable_buffers import StableBuffer
from .stats import expect, reset_stats, stats
from .vision import EncoderGraphs, compile_vision
from .warm_start import load_warm_start, save_warm_start

__version__ = "0.1.0"

__all__ = [
    "save_warm_start",
    "load_warm_start",
    "PiecewiseConfig",
    "piecewise_backend",
    "compile",
    "StableBuffer",
    "watch_recompiles",
    "capture",
    "find_transformer_layers",
    "explain",
    "ExplainReport",
    "register_splitting_op",
    "stats",
    "reset_stats",
    "expect",
    "TorchPCGError",
    "ConfigError",
    "SplitError",
    "CaptureError",
    "RecompileError",
    "PaddingError",
    "StableInputError",
    "compile_vision",
    "EncoderGraphs",
    "VisionConfig",
]

_register_backend()
