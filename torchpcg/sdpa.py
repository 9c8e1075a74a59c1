"""SDPA's kernel order while a compiled call runs: cuDNN attention last.

Split ops (attention, and whatever a user registers) run eagerly between graph replays, on the
call's *real* token count, so a server's traffic hands them a new shape on almost every call. A
model whose attention op calls ``F.scaled_dot_product_attention`` with a mask gets cuDNN attention
on Hopper and Blackwell: torch puts cuDNN first there (``check_prefer_cudnn_attention`` in
``sdp_utils.cpp``), and cuDNN builds an execution plan for every new shape. Measured on an H100
(torch 2.11, bf16, 16 heads of 128, 2,048 cache slots; ``python scripts/mixed_probe.py``): 35 ms
for the first call at a new T, 0.40 ms for a repeat; with cuDNN moved last SDPA picks the
memory-efficient kernel: 0.25 ms at a new T and at a repeat. The layers share one shape, so a call
at a new T paid one plan build: on top of a 3 ms call, mixed traffic ran at eager speed whatever
the graphs saved.

So while a compiled call runs, ``SdpaOrder`` moves cuDNN to the end of SDPA's priority order
(flash and memory-efficient attention need no per-shape plan), and puts the caller's order back
when the call returns: eager code outside compiled calls keeps torch's choice, and so do full
decode graphs (captured once per exact T, their plans built once; the runtime skips the order
for them). Knob ``sdpa_order`` (``TORCHPCG_SDPA_ORDER``): ``auto`` (this) or ``torch`` (leave
SDPA's order alone).

Note: the order is process state in torch, not per thread: another thread's eager SDPA call made
while a compiled call runs sees the compiled call's order.
"""
from __future__ import annotations

import logging

import torch

__all__ = ["SdpaOrder", "cudnn_last"]

log = logging.getLogger(__name__)

_GET = getattr(torch._C, "_get_sdp_priority_order", None)  # -> list[int] of SDPBackend values
_SET = getattr(torch._C, "_set_sdp_priority_order", None)
_CHOICE = getattr(torch, "_fused_sdp_choice", None)
try:
    from torch.nn.attention import SDPBackend

    _CUDNN: int | None = int(SDPBackend.CUDNN_ATTENTION)
except (ImportError, AttributeError):  # a torch without the cuDNN backend
    _CUDNN = None

_settled: set[int] = set()  # CUDA device indices whose default order torch has already chosen


def cudnn_last(order: list[int]) -> list[int]:
    """``order`` with cuDNN attention moved to the end (the same list if it is there already).

    Example::

        >>> cudnn_last([3, 1, 2, 0, 4])   # cudnn, flash, efficient, math, overrideable
        [1, 2, 0, 4, 3]
    """
    if _CUDNN is None or _CUDNN not in order:
        return order
    return [b for b in order if b != _CUDNN] + [_CUDNN]


class SdpaOrder:
    """Sets cuDNN-last around a call on a CUDA device (``enter``/``exit``); a no-op elsewhere.

    ``enter`` returns what ``exit`` needs: the caller's order, or None when nothing was changed.
    Two C++ calls a call when the order must change, one when it is already cuDNN-last.
    """

    def __init__(self, enabled: bool, device: torch.device | None) -> None:
        supported = _GET is not None and _SET is not None and _CUDNN is not None
        self.active = enabled and supported and device is not None and device.type == "cuda"
        self.device = device
        self._settled = False  # _settle ran for this device (a set lookup per call otherwise)

    def enter(self) -> list[int] | None:
        if not self.active:
            return None
        if not self._settled:
            _settle(self.device)
            self._settled = True
        current = _GET()
        wanted = cudnn_last(current)
        if wanted == current:
            return None
        _SET(wanted)
        return current

    @staticmethod
    def exit(previous: list[int] | None) -> None:
        if previous is not None:
            _SET(previous)


def _settle(device: torch.device) -> None:
    """Let torch choose its default order before we read it, once per device.

    torch picks the default (cuDNN first on sm90/sm100) lazily, on the first SDPA backend
    selection of the process. Were that first selection inside a compiled call, the order read
    before it would be the pre-choice one, and restoring it afterwards would keep torch from ever
    choosing: eager SDPA outside compiled calls would change kernels because of us. A backend
    query on tiny tensors makes torch choose now; it runs no kernel and builds no plan.
    """
    index = device.index if device.index is not None else torch.cuda.current_device()
    if index in _settled:
        return
    _settled.add(index)
    if _CHOICE is None:
        return
    try:
        probe = torch.zeros(1, 1, 1, 8, device=device, dtype=torch.float16)
        _CHOICE(probe, probe, probe)
    except RuntimeError as exc:  # a build without fused SDPA kernels: nothing to settle
        log.debug("SDPA backend query failed on %s (%s); its order is read as it is", device, exc)
