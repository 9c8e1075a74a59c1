"""Typed errors. Every user-caused problem raises one of these with the fix in the message."""
from __future__ import annotations

__all__ = ["TorchPCGError", "ConfigError", "SplitError", "CaptureError", "RecompileError", "PaddingError",
           "StableInputError"]


class TorchPCGError(RuntimeError):
    """Base class of every error torchpcg raises on purpose."""


class ConfigError(TorchPCGError, ValueError):
    """A knob (option key, environment variable or keyword) has a bad name or value."""


class SplitError(TorchPCGError):
    """The graph cannot be split as asked (raised under enforce instead of falling back)."""


class CaptureError(TorchPCGError):
    """A CUDA graph could not be captured (raised under enforce instead of falling back)."""


class RecompileError(TorchPCGError):
    """Dynamo recompiled a torchpcg-compiled model after warmup (raised under enforce)."""


class PaddingError(TorchPCGError):
    """A piece gave different real rows at its padded bucket than at the exact size (verify mode)."""


class StableInputError(TorchPCGError, ValueError):
    """A call passed a value that does not fit the StableBuffer declared for it, or no tensor for its token input."""
