"""A warm start for a fresh machine: the compile caches of one process, saved to a file and loaded
into another before it compiles.

In: after a process compiled and captured its models, ``save_warm_start(path)``; in a later
process (another machine, an empty ``TORCHINDUCTOR_CACHE_DIR``), ``load_warm_start(path)`` before
the first compiled call. Out: a file of torch's cache artifacts, and a summary dict per call.

Why: every compute piece is compiled by Inductor's ``compile_fx``, so its code goes through
Inductor's FX graph cache and AOTAutograd's cache, and a process on a warm cache directory skips
those compiles (docs/tuning.md, "Warm start"). A fresh machine has no such directory. torch's
"mega-cache" (``torch.compiler.save_cache_artifacts`` / ``load_cache_artifacts``) records the
artifacts a process created or loaded (FX graph, AOTAutograd, Triton kernels, autotuning) and
hot-loads them in another, so the pieces' compiles become cache hits there too. What is never
saved: Dynamo's trace, torchpcg's split, and graph capture (CUDA graphs belong to a process).

Example::

    compiled = torchpcg.compile(model); torchpcg.capture(compiled, make_inputs)
    torchpcg.save_warm_start("model.warm")          # {'bytes': ..., 'artifacts': {...}}
    # another process, same torch, model and options:
    torchpcg.load_warm_start("model.warm")          # before the first compiled call
    compiled = torchpcg.compile(model); torchpcg.capture(compiled, make_inputs)

Note: the artifacts are keyed like the caches they come from (torch version, device, graph,
Inductor options); a process that differs compiles as it would without them.
"""
from __future__ import annotations

import logging
import os
from typing import Any

import torch

from .errors import TorchPCGError

__all__ = ["save_warm_start", "load_warm_start"]

log = logging.getLogger(__name__)


def save_warm_start(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Write the compile-cache artifacts this process created or loaded so far to ``path``.

    Returns ``{"path", "bytes", "artifacts"}`` (artifacts: count per kind, e.g. ``inductor``,
    ``aot_autograd``, ``triton``). Raises ``TorchPCGError`` when this torch has no mega-cache or
    nothing was compiled yet (nothing to save: compile and run the model first).
    """
    save = getattr(torch.compiler, "save_cache_artifacts", None)
    if save is None:
        raise TorchPCGError(f"torch {torch.__version__} has no torch.compiler.save_cache_artifacts; "
                            "share TORCHINDUCTOR_CACHE_DIR instead")
    saved = save()
    if saved is None or not saved[0]:
        raise TorchPCGError("save_warm_start: no compile-cache artifacts in this process yet; compile and call "
                            "the model (torchpcg.capture) before saving")
    data, info = saved
    target = os.fspath(path)
    tmp = f"{target}.tmp{os.getpid()}"
    with open(tmp, "wb") as out:
        out.write(data)
    os.replace(tmp, target)  # atomic: a reader never sees half a file
    summary = {"path": target, "bytes": len(data), "artifacts": _counts(info)}
    log.info("saved a warm start to %s: %d bytes, %s", target, len(data), summary["artifacts"])
    return summary


def load_warm_start(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Hot-load the artifacts in ``path`` (written by ``save_warm_start``) into torch's compile
    caches; call it before the first compiled call. Returns ``{"path", "bytes", "artifacts"}``.

    Raises ``TorchPCGError`` naming the path when the file is missing or torch cannot read it.
    """
    load = getattr(torch.compiler, "load_cache_artifacts", None)
    if load is None:
        raise TorchPCGError(f"torch {torch.__version__} has no torch.compiler.load_cache_artifacts")
    source = os.fspath(path)
    try:
        with open(source, "rb") as file:
            data = file.read()
    except OSError as exc:
        raise TorchPCGError(f"load_warm_start({source!r}): {exc.strerror or exc}") from exc
    try:
        info = load(data)
    except Exception as exc:  # noqa: BLE001 - torch raises many types for a foreign or damaged file
        raise TorchPCGError(f"load_warm_start({source!r}): torch could not load it ({type(exc).__name__}: {exc}); "
                            "was it written by save_warm_start with this torch version?") from exc
    summary = {"path": source, "bytes": len(data), "artifacts": _counts(info)}
    log.info("loaded a warm start from %s: %d bytes, %s", source, len(data), summary["artifacts"])
    return summary


def _counts(info: Any) -> dict[str, int]:
    """Artifacts per kind from torch's CacheInfo (its ``artifacts`` maps kind -> keys)."""
    artifacts = getattr(info, "artifacts", None) or {}
    return {str(kind): len(keys) for kind, keys in artifacts.items() if keys}
