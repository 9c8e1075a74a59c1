"""Split a Dynamo FX graph at split ops.

In: the GraphModule Dynamo gives a backend, plus extra per-node reasons (padding analysis).
Out: a ``SplitGraph``: the top-level split module and one ``SplitPiece`` per compute piece or
split piece, in execution order. No CUDA here.
"""
from __future__ import annotations

import dataclasses
import operator
import threading
from collections.abc import Callable, Collection, Iterable, Mapping, Sequence
from typing import Any

import torch
import torch.fx
from torch.fx.experimental.symbolic_shapes import free_symbols
from torch.fx.passes.split_module import split_module

from .config import split_op_name
from .layout import leaves

__all__ = ["SplitPiece", "SplitGraph", "split_graph", "split_reason", "register_splitting_op", "user_split_ops",
           "capturable_ops", "is_capturable", "CAPTURABLE_OPS", "host_tensor_reason", "cache_state_reasons",
           "CACHE_STATE_PREFIX"]

# Attention: data-dependent over tokens (reads other rows, often a KV cache). Names are 'ns::op'.
ATTENTION_OPS = frozenset({
    "aten::scaled_dot_product_attention",
    "aten::_scaled_dot_product_attention_math",
    "aten::_scaled_dot_product_flash_attention",
    "aten::_scaled_dot_product_flash_attention_for_cpu",
    "aten::_scaled_dot_product_efficient_attention",
    "aten::_scaled_dot_product_cudnn_attention",
    "aten::_scaled_dot_product_fused_attention_overrideable",
    "aten::_flash_attention_forward",
    "aten::_efficient_attention_forward",
    "torchpcg_models::kv_attention",  # the reference decoder's KV-cache attention (torchpcg.models)
})
# The torch-level callables Dynamo records for SDPA (before lowering to aten).
ATTENTION_FUNCTIONS = frozenset({
    torch.nn.functional.scaled_dot_product_attention,
    torch._C._nn.scaled_dot_product_attention,
})
COLLECTIVE_OPS = frozenset({
    "_c10d_functional::all_reduce",
    "_c10d_functional::all_reduce_",
    "_c10d_functional::all_gather_into_tensor",
    "_c10d_functional::all_gather_into_tensor_out",
    "_c10d_functional::reduce_scatter_tensor",
    "_c10d_functional::all_to_all_single",
    "_c10d_functional::broadcast",
    "_c10d_functional::wait_tensor",
    "c10d_functional::all_reduce",
    "c10d_functional::all_gather_into_tensor",
    "c10d_functional::reduce_scatter_tensor",
    "c10d_functional::all_to_all_single",
    "c10d_functional::wait_tensor",
})

# Split ops that may run inside a CUDA graph at an exact token count (full-decode graphs): no host
# sync, no allocation outside the graph's pool, fixed addresses. SDPA is a pure function of its
# inputs; the reference KV-cache attention writes the cache at given positions and never syncs.
CAPTURABLE_OPS = frozenset(ATTENTION_OPS)

_USER_OPS_LOCK = threading.Lock()
_USER_OPS: dict[str, bool] = {}  # name -> capturable


def register_splitting_op(op: Any, capturable: bool = False) -> str:
    """Add ``op`` to the ops every piecewise graph is cut at; returns its ``'ns::op'`` name.

    ``capturable=True`` declares the op safe inside a CUDA graph at an exact token count: it never
    syncs with the host, allocates only through PyTorch's allocator and reads and writes the
    addresses it is given. Full-decode graphs (``cudagraph_mode="full_and_piecewise"``) need every
    split op of a model to be capturable.

    ``op`` may be an ``OpOverload`` (``torch.ops.mylib.attn.default``), an ``OpOverloadPacket``
    (``torch.ops.mylib.attn``), a ``torch.library.custom_op`` handle or the string ``"mylib::attn"``.
    A packet name matches all its overloads.

    Example::

        >>> torchpcg.register_splitting_op("mylib::paged_attention")
        'mylib::paged_attention'

    Note: affects graphs compiled afterwards, not ones already compiled.
    """
    custom = getattr(op, "_opoverload", None)  # torch.library.custom_op handle
    name = split_op_name(custom if custom is not None else op)
    with _USER_OPS_LOCK:
        _USER_OPS[name] = bool(capturable)
    return name


def user_split_ops() -> frozenset[str]:
    """The ops added with ``register_splitting_op`` so far."""
    with _USER_OPS_LOCK:
        return frozenset(_USER_OPS)


def capturable_ops() -> frozenset[str]:
    """Split ops that may run inside a full-decode graph: the built-in ones and those registered so."""
    with _USER_OPS_LOCK:
        return CAPTURABLE_OPS | {name for name, capturable in _USER_OPS.items() if capturable}


def is_capturable(node: torch.fx.Node, capturable: frozenset[str]) -> bool:
    """Whether a split node's op is in ``capturable`` (a packet name covers its overloads)."""
    return node.target in ATTENTION_FUNCTIONS or any(n in capturable for n in _op_names(node.target))


@dataclasses.dataclass(frozen=True)
class SplitPiece:
    """One submodule of the split graph: a compute piece (captured) or a split piece (eager)."""

    name: str  # attribute name in the split module, e.g. "submod_3"
    index: int  # position in execution order
    is_split_op: bool
    reasons: tuple[str, ...]  # why each node of a split piece was cut (empty for compute pieces)
    node_names: tuple[str, ...]  # original Dynamo node names in this piece
    gm: torch.fx.GraphModule


@dataclasses.dataclass(frozen=True)
class SplitGraph:
    """The split module plus its pieces in execution order."""

    split_gm: torch.fx.GraphModule
    pieces: tuple[SplitPiece, ...]

    @property
    def compute_pieces(self) -> tuple[SplitPiece, ...]:
        return tuple(p for p in self.pieces if not p.is_split_op)

    @property
    def split_pieces(self) -> tuple[SplitPiece, ...]:
        return tuple(p for p in self.pieces if p.is_split_op)


def _op_names(target: Any) -> tuple[str, ...]:
    """Names under which a call target may be listed: 'ns::op.overload' and 'ns::op'."""
    if isinstance(target, torch._ops.OpOverload):
        packet = target._schema.name
        return (f"{packet}.{target._overloadname}", packet)
    if isinstance(target, torch._ops.OpOverloadPacket):
        return (target._qualified_op_name,)
    return ()


def split_reason(node: torch.fx.Node, user_ops: Iterable[str], split_collectives: bool) -> str | None:
    """Why ``node`` must run eagerly between graphs (attention / collective / user op), or None."""
    if node.op != "call_function":
        return None
    target = node.target
    names = _op_names(target)
    if target in ATTENTION_FUNCTIONS or any(n in ATTENTION_OPS for n in names):
        return f"attention ({_pretty(target)})"
    user = set(user_ops)
    if any(n in user for n in names):
        return f"user split op ({names[0]})"
    if _tagged_unsafe(target):
        return f"user split op ({names[0]}, tagged cudagraph_unsafe)"
    if split_collectives and (any(n in COLLECTIVE_OPS for n in names) or _is_collective_function(target)):
        return f"collective ({_pretty(target)})"
    return None


def host_tensor_reason(node: torch.fx.Node) -> str | None:
    """Why a node of a CUDA graph must run eagerly because it touches a CPU tensor, or None.

    A CUDA graph replays device work only: a CPU op inside a captured piece runs once, at capture,
    and its result is frozen; a CPU -> GPU copy of a pageable tensor cannot even be captured. Cache
    bookkeeping kept on the host (a ``cumulative_length`` counter) is the usual case.
    """
    if node.op not in ("call_function", "call_method", "call_module"):
        return None
    out = [v for v in leaves(node.meta.get("example_value", node.meta.get("val"))) if isinstance(v, torch.Tensor)]
    if not out:
        return None  # sizes and other scalars: nothing is executed on either device
    ins = [v for arg in leaves((node.args, node.kwargs)) if isinstance(arg, torch.fx.Node)
           for v in leaves(arg.meta.get("example_value", arg.meta.get("val"))) if isinstance(v, torch.Tensor)]
    if any(t.device.type == "cpu" for t in out + ins):
        return f"host tensor ({_pretty(node.target)} reads or makes a CPU tensor; a CUDA graph would freeze it)"
    return None


CACHE_STATE_PREFIX = "cache state"


def cache_state_reasons(gm: torch.fx.GraphModule, state: Collection[str]) -> dict[torch.fx.Node, str]:
    """Nodes that read per-request state in place, with why: they run eagerly, not in graphs.

    ``state`` names placeholders of ``mark_static_address`` tensors that are neither parameters nor
    module buffers (a static KV cache's keys and values). A graph reading one would be keyed by its
    address, and transformers makes a new cache per ``generate()`` call: new graphs every call, or
    the cache copied on every replay. Engines keep the cache inside the attention op for this
    reason; here every node that reads such a tensor, or a view of it (``repeat_kv``'s expand and
    reshape), runs eagerly beside the attention instead.
    """
    reading = {n for n in gm.graph.nodes if n.op == "placeholder" and n.name in state}
    reasons: dict[torch.fx.Node, str] = {}
    for node in gm.graph.nodes:
        if node.op not in ("call_function", "call_method", "call_module"):
            continue
        read = [a for a in leaves((node.args, node.kwargs)) if isinstance(a, torch.fx.Node) and a in reading]
        if not read:
            continue
        reasons[node] = f"{CACHE_STATE_PREFIX} ({_pretty(node.target)} reads {read[0].name} in place)"
        if _views_of(node, read):
            reading.add(node)  # its users read the state too
    return reasons


def _views_of(node: torch.fx.Node, inputs: Sequence[torch.fx.Node]) -> bool:
    """Whether ``node``'s value shares storage with one of ``inputs``' values (fake storages compare)."""
    def storage(value: Any) -> Any:
        if not isinstance(value, torch.Tensor):
            return None
        try:
            return value.untyped_storage()._cdata
        except Exception:  # noqa: BLE001 - a tensor without storage (sparse, opaque): no view of anything
            return None
    outs = {storage(v) for v in leaves(node.meta.get("example_value", node.meta.get("val")))} - {None}
    ins = {storage(v) for a in inputs for v in leaves(a.meta.get("example_value", a.meta.get("val")))} - {None}
    return bool(outs & ins)


def _tagged_unsafe(target: Any) -> bool:
    """Custom ops tagged ``torch.Tag.cudagraph_unsafe`` (Inductor's own marker) are split ops too."""
    tag = getattr(torch.Tag, "cudagraph_unsafe", None)
    return tag is not None and isinstance(target, torch._ops.OpOverload) and tag in target.tags


def _is_collective_function(target: Any) -> bool:
    module = getattr(target, "__module__", "") or ""
    return module.startswith("torch.distributed._functional_collectives")


def _pretty(target: Any) -> str:
    names = _op_names(target)
    if names:
        return names[0]
    return getattr(target, "__name__", str(target))


def _is_tensor_node(node: torch.fx.Node) -> bool:
    value = node.meta.get("example_value", node.meta.get("val"))
    if isinstance(value, (tuple, list)):
        return any(isinstance(v, torch.Tensor) for v in value)
    return isinstance(value, torch.Tensor)


def _partition_ids(gm: torch.fx.GraphModule, reasons: Mapping[torch.fx.Node, str]) -> tuple[dict[torch.fx.Node, int], set[int]]:
    """Give each node a partition id in graph order; runs of split nodes share one id.

    Non-tensor nodes (SymInt arithmetic, ``getitem`` of a split op's tuple) join whatever
    partition is open, so they never create tiny pieces of their own.
    """
    ids: dict[torch.fx.Node, int] = {}
    split_ids: set[int] = set()
    split_nodes: set[torch.fx.Node] = set()
    current, in_split = 0, False
    for node in gm.graph.nodes:
        if node.op in ("placeholder", "output"):
            continue
        from_split = (node.target is operator.getitem and node.args[0] in split_nodes
                      and isinstance(node.args[0].meta.get("example_value"), (tuple, list)))
        if node in reasons or from_split:
            if not in_split:
                current, in_split = current + 1, True
                split_ids.add(current)
            split_nodes.add(node)
        elif in_split and _is_tensor_node(node):
            current, in_split = current + 1, False
        ids[node] = current
    return ids, split_ids


# A compute piece this small between two split pieces costs more to replay (copy-in, replay,
# real-row views) than to run eagerly; Hugging Face mask prologues make several of them.
TINY_PIECE_OPS = 4
_HEAVY_OPS = frozenset({"linear", "matmul", "mm", "bmm", "addmm", "baddbmm", "einsum", "embedding",
                        "conv1d", "conv2d", "conv3d", "conv_transpose1d", "conv_transpose2d"})


def _tiny_pieces(ids: Mapping[torch.fx.Node, int], split_ids: set[int]) -> dict[torch.fx.Node, str]:
    """Nodes of compute pieces with <= TINY_PIECE_OPS tensor ops and no matmul-like op, between splits."""
    groups: dict[int, list[torch.fx.Node]] = {}
    for node, pid in ids.items():
        groups.setdefault(pid, []).append(node)
    order = sorted(groups)
    absorbed: dict[torch.fx.Node, str] = {}
    for before, pid, after in zip(order, order[1:], order[2:]):
        if pid in split_ids or before not in split_ids or after not in split_ids:
            continue
        tensor_ops = [n for n in groups[pid] if _is_tensor_node(n)]
        heavy = any(_target_name(n.target) in _HEAVY_OPS for n in tensor_ops)
        if len(tensor_ops) <= TINY_PIECE_OPS and not heavy:
            why = f"merged: {len(tensor_ops)}-op piece between split ops runs eagerly"
            absorbed.update(dict.fromkeys(groups[pid], why))
    return absorbed


def _target_name(target: Any) -> str:
    names = _op_names(target)
    name = names[-1].split("::")[-1] if names else getattr(target, "__name__", str(target))
    return name.lstrip("_")


def _foreign_writes(ids: Mapping[torch.fx.Node, int], split_ids: set[int],
                    written_bases: Callable[[torch.fx.Node], list[torch.fx.Node]]) -> dict[torch.fx.Node, str]:
    """In-place writes in a compute piece into a value made elsewhere (another piece, a split op).

    Inside a graph such a write would land in the piece's static copy of its input, so readers
    outside the piece would miss it; and capture would apply it once more than eager does.
    Cut, it runs eagerly on the real tensor, once per call.
    """
    found = {}
    for node, pid in ids.items():
        if pid in split_ids:
            continue
        for base in written_bases(node):
            if ids.get(base) != pid:  # a placeholder, or a node of another piece
                found[node] = (f"side effect: in-place write into '{base.name}', made outside this piece "
                               f"({_target_name(node.target)})")
    return found


def _drop_opaque_attr_values(gm: torch.fx.GraphModule) -> None:
    """Forget the example value of a ``get_attr`` that holds a plain Python object.

    ``split_module`` reads the symbols of the example value of every value used across pieces,
    and fails on an object that is not a tensor, a size or a number ("cannot extract sympy
    expressions from <function ...>"). torch 2.11's Dynamo lifts ``torch._check(cond, lambda:
    msg)``'s message function into such a node when ``cond`` is symbolic: the vision encoder's
    ``PatchMerger`` has one. Such an object has no shape to track; the pieces receive it as it is.
    """
    for node in gm.graph.nodes:
        if node.op != "get_attr" or node.meta.get("example_value") is None:
            continue
        try:
            free_symbols(node.meta["example_value"])  # what split_module will ask of it
        except AssertionError:
            del node.meta["example_value"]


def split_graph(gm: torch.fx.GraphModule, reasons: Mapping[torch.fx.Node, str],
                written_bases: Callable[[torch.fx.Node], list[torch.fx.Node]] | None = None) -> SplitGraph:
    """Cut ``gm`` before and after every node in ``reasons`` (node -> why it is cut).

    ``keep_original_order=True`` because reordering could move an in-place op (a KV-cache write)
    past a reader of the same buffer. ``written_bases(node)`` (the nodes an op writes in place)
    lets the splitter cut writes into values of other pieces too.
    """
    ids, split_ids = _partition_ids(gm, reasons)
    tiny = _tiny_pieces(ids, split_ids)
    if tiny:  # run them eagerly with their neighbours: one split piece instead of three pieces
        reasons = {**reasons, **tiny}
        ids, split_ids = _partition_ids(gm, reasons)
    while written_bases is not None:
        foreign = _foreign_writes(ids, split_ids, written_bases)
        if not foreign:
            break
        reasons = {**reasons, **foreign}
        ids, split_ids = _partition_ids(gm, reasons)
    names_by_id: dict[int, list[str]] = {}
    reasons_by_id: dict[int, list[str]] = {}
    for node, pid in ids.items():
        names_by_id.setdefault(pid, []).append(node.name)
        if node in reasons and reasons[node] not in reasons_by_id.setdefault(pid, []):
            reasons_by_id[pid].append(reasons[node])
    _drop_opaque_attr_values(gm)
    split_gm = split_module(gm, None, lambda node: ids[node], keep_original_order=True)
    pieces = []
    for node in split_gm.graph.nodes:
        if node.op != "call_module":
            continue
        pid = int(node.target.rsplit("_", 1)[1])
        pieces.append(SplitPiece(
            name=node.target, index=len(pieces), is_split_op=pid in split_ids,
            reasons=tuple(reasons_by_id.get(pid, ())), node_names=tuple(names_by_id.get(pid, ())),
            gm=getattr(split_gm, node.target),
        ))
    return SplitGraph(split_gm=split_gm, pieces=tuple(pieces))
