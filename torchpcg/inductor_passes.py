"""Inductor graph passes for pieces: where a piece should compile as the whole model would.

In: the post-grad FX graph Inductor builds for one piece. Out: the same graph, rewritten in place.

``UnfuseOutputAddmm``: Inductor turns ``inp + a @ b`` into one cuBLAS ``addmm`` unless every use of
the sum is a pointwise op it can fuse the add into (``should_prefer_unfused_addmm``). A decoder's
residual stream, ``h + down_proj(x)``, has such uses only, in a whole-model graph: the next
RMSNorm. Cut into pieces, the same sum is also a piece *output* (the next piece, after the
attention op, reads it), and that one non-pointwise use makes Inductor fuse. The GPU then runs a
beta=1 GEMM and two ``memcpy32_post`` kernels per fused sum. The profile of the 16-layer bench
decoder at T=32 showed 30 such copies and 37 µs per call, on an H200 at ``de58004``. A whole
graph of the same model ran none. This pass undoes the fusion where the graph output is the only
non-pointwise use: ``mm`` with beta=0, the add fused into the norm's kernel, which also writes the
sum out. It also rounds as eager does (GEMM to the dtype, then the add), not in the GEMM's epilogue.

Only on CUDA (Inductor keeps ``addmm`` on CPU on purpose), only for a same-shape ``inp`` (a
broadcast bias from ``nn.Linear(bias=True)`` stays fused, as Inductor keeps it for half dtypes)
and only where at least one use is pointwise (else the add would be a kernel of its own).
"""
from __future__ import annotations

import logging
import operator
from collections.abc import Collection, Sequence
from typing import Any

import torch
import torch.fx
from torch.fx.experimental.symbolic_shapes import statically_known_true

__all__ = ["UnfuseOutputAddmm", "piece_passes"]

log = logging.getLogger(__name__)

_aten = torch.ops.aten

try:  # torch >= 2.6: a pass with a uuid keeps Inductor's FX graph cache on
    from torch._inductor.custom_graph_pass import CustomGraphPass as _PassBase
except ImportError:  # pragma: no cover - older torch: no pass, the pieces compile as before
    _PassBase = None  # type: ignore[assignment,misc]


def _is_view(target: Any) -> bool:
    return isinstance(target, torch._ops.OpOverload) and getattr(target, "is_view", False)


def _uses(node: torch.fx.Node) -> tuple[bool, bool]:
    """(every use is pointwise or the graph output, at least one is pointwise), views followed."""
    fusable_only, pointwise = True, False
    for use in node.users:
        if use.op == "output":
            continue
        if use.op == "call_function" and (_is_view(use.target) or use.target is operator.getitem):
            inner_ok, inner_pointwise = _uses(use)
            fusable_only, pointwise = fusable_only and inner_ok, pointwise or inner_pointwise
        elif use.op == "call_function" and isinstance(use.target, torch._ops.OpOverload) \
                and torch.Tag.pointwise in use.target.tags:
            pointwise = True
        else:
            fusable_only = False
    return fusable_only, pointwise


def _same_sizes(a: Sequence[Any], b: Sequence[Any]) -> bool:
    """Equal for every value of their symbols, decided without a guard. ``a != b`` on symbolic
    sizes adds one: ``[8, 8] != [T, 8]`` guarded ``T == 8``, which specialized the vision
    encoder's patch count and made it compile again on the next call (H200, ``1cc797a``)."""
    return len(a) == len(b) and all(statically_known_true(x == y) for x, y in zip(a, b))


def _unfusable(node: torch.fx.Node, device_types: Collection[str]) -> bool:
    """Whether ``node`` is an ``addmm`` this pass rewrites (see the module docstring)."""
    if node.op != "call_function" or node.target is not _aten.addmm.default:
        return False
    if any(node.kwargs.get(k, 1) != 1 for k in ("beta", "alpha")) or len(node.args) != 3:
        return False
    inp, out = node.args[0], node.meta.get("val")
    value = inp.meta.get("val") if isinstance(inp, torch.fx.Node) else None
    if not isinstance(value, torch.Tensor) or not isinstance(out, torch.Tensor) or out.device.type not in device_types:
        return False
    if not _same_sizes(value.shape, out.shape) or value.dtype != out.dtype:
        return False
    fusable_only, pointwise = _uses(node)
    return fusable_only and pointwise


def unfuse_output_addmm(graph: torch.fx.Graph, device_types: Collection[str] = ("cuda",)) -> int:
    """Rewrite each such ``addmm(inp, a, b)`` on ``device_types`` to ``inp + mm(a, b)``; returns how many."""
    count = 0
    # Last node first: a residual stream chains its sums (h1 = addmm(h0, ...); h2 = addmm(h1, ...)),
    # and h1's use by h2's addmm is not pointwise until h2 is rewritten to an add. Inductor's
    # pattern pass fused the chain the same way round, from the piece's output back.
    for node in reversed(list(graph.nodes)):
        if not _unfusable(node, device_types):
            continue
        inp, mat1, mat2 = node.args
        with graph.inserting_before(node):
            product = graph.call_function(_aten.mm.default, (mat1, mat2))
            total = graph.call_function(_aten.add.Tensor, (inp, product))
        product.meta = {**node.meta, "val": node.meta["val"]}  # same sizes, strides and dtype as the sum
        total.meta = dict(node.meta)
        node.replace_all_uses_with(total)
        graph.erase_node(node)
        count += 1
    if count:
        log.debug("unfused %d addmm(s) whose only non-pointwise use is the piece's output", count)
    return count


if _PassBase is not None:
    class UnfuseOutputAddmm(_PassBase):
        """``unfuse_output_addmm`` as an Inductor post-grad pass (``post_grad_custom_post_pass``)."""

        def __call__(self, graph: torch.fx.Graph) -> None:
            unfuse_output_addmm(graph)

        def uuid(self) -> Any:
            return "torchpcg.unfuse_output_addmm.v2"  # bump when the rewrite changes: cached code differs
else:  # pragma: no cover
    UnfuseOutputAddmm = None  # type: ignore[assignment,misc]


def piece_passes() -> dict[str, Any]:
    """Inductor config patches that install the pieces' passes: none if the user set a post-grad
    custom post pass of their own (theirs runs, ours does not), or on a torch without the API."""
    import torch._inductor.config

    if _PASS is None or torch._inductor.config.post_grad_custom_post_pass is not None:
        return {}
    return {"post_grad_custom_post_pass": _PASS}


_PASS = UnfuseOutputAddmm() if UnfuseOutputAddmm is not None else None
