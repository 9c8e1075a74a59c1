"""Split ops defined with ``torch.library.custom_op``, called as their Python body between graphs.

Split ops run eagerly between graph replays, once per layer and call, so every microsecond of
their host time is paid 16-80 times a call. An op defined with ``torch.library.custom_op`` (the
way model authors are told to write one) reaches its Python body through the dispatcher, the
autograd and ADInplaceOrView keys, and the custom-op wrapper's checks. For an op with one
implementation for every device and nothing else registered (no per-device kernels, autocast,
torch_dispatch rules or disabled kernels), that path ends in the very function the author wrote:
under ``no_grad`` it computes the same thing. ``direct_custom_ops`` rewrites such calls in a split
piece to call that function.

Measured on the CPU box (torch 2.13, ``BufferDecoder``'s op at T=1): 103 µs through
``torch.ops`` against 62 µs for its body.

Not rewritten: ops with a kernel per device or an autocast rule (the dispatcher picks among
them), ops defined through ``torch.library.Library`` (their impl is registered per dispatch key,
already without the Python wrapper), and every ATen op. ``TORCHPCG_DIRECT_OPS=0``
(``direct_ops=False``) keeps every call through the dispatcher.

Note: a direct call skips the version-counter bump of the op's mutated arguments; nothing in
inference reads it (no autograd under ``no_grad``).
"""
from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import torch
import torch.fx

__all__ = ["custom_op_body", "direct_custom_ops"]

log = logging.getLogger(__name__)

try:
    from torch._library.custom_ops import OPDEFS as _OPDEFS, CustomOpDef as _CustomOpDef
except ImportError:  # a torch without torch.library.custom_op
    _OPDEFS, _CustomOpDef = {}, None


def custom_op_body(target: Any) -> Callable[..., Any] | None:
    """The Python function behind the custom op ``target`` (an OpOverload), or None when the
    dispatcher may do anything else for it (see the module docstring)."""
    if isinstance(target, torch._ops.OpOverloadPacket) and target.overloads() == ["default"]:
        target = target.default  # a custom op has the default overload alone
    if _CustomOpDef is None or not isinstance(target, torch._ops.OpOverload):
        return None
    definition = _OPDEFS.get(f"{target.namespace}::{target._opname}")
    if not isinstance(definition, _CustomOpDef) or definition._opoverload is not target:
        return None
    only_default = set(getattr(definition, "_backend_fns", {None: None})) == {None}
    extras = (getattr(definition, "_torch_dispatch_fns", None), getattr(definition, "_disabled_kernel", None),
              getattr(definition, "_autocast_cuda_dtype", None), getattr(definition, "_autocast_cpu_dtype", None),
              getattr(definition, "_autocast_dtype", None))
    body = getattr(definition, "_init_fn", None)
    if not only_default or any(extras) or not callable(body):
        return None
    return body


def direct_custom_ops(gm: torch.fx.GraphModule) -> torch.fx.GraphModule:
    """``gm``, or a copy of it whose custom-op calls call their Python bodies when it has any.

    A copy, so the split plan (explain, debug dumps, full graphs' own pieces) still names the ops."""
    bodies = {node: custom_op_body(node.target) for node in gm.graph.nodes if node.op == "call_function"}
    bodies = {node: body for node, body in bodies.items() if body is not None}
    if not bodies:
        return gm
    graph = torch.fx.Graph()
    mapping: dict[torch.fx.Node, torch.fx.Node] = {}
    graph.output(graph.graph_copy(gm.graph, mapping))
    for node, body in bodies.items():
        log.debug("split op %s is called as its Python body", node.target)
        mapping[node].target = body
    return torch.fx.GraphModule(gm, graph)
