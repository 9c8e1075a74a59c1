"""Padding rules, one per op family: does this op, called this way, stay row-wise?

In: a call node of a Dynamo graph (fake values in ``node.meta["example_value"]``), its op's
torch-style name (padding_ops.op_name) and the token symbol. Out: ``HANDLERS``, op name ->
handler; a handler returns a category (``"reduction over the token dim"``, ...) when the call is
not row-wise along the token dim, None when it is. Also ``value_of`` / ``input_tensors``, how the
rules read a node's arguments as fake values. No CUDA here.

Why: membership in an op family is not enough: ``sum`` is safe over the hidden dim and unsafe
over tokens, ``x[:, :s]`` keeps every row and ``x[:, -1]`` does not. Each handler reads the op's
dim (or index, or size) arguments and checks them against the token dims of the fake inputs.
padding.py runs the handler of a node's op after the checks that apply to every op.
"""
from __future__ import annotations

from collections.abc import Callable

import sympy
import torch
import torch.fx as fx

from .layout import leaves
from .padding_ops import (
    CAT_OPS, CONV_OPS, DIM_INDEX_OPS, DROPOUT_OPS, FACTORY_OPS, MATMUL_OPS, NON_WRITING_INPLACE, PERMUTE_OPS,
    POINTWISE_OPS, REDUCTION_OPS, REORDER_OPS, RESHAPE_OPS, SCAN_OPS, SIZE_QUERY_OPS, SOFTMAX_OPS, SORT_OPS,
    SPLIT_OPS, STACK_OPS, TRAILING_NORM_OPS,
)
from .token_shapes import keeps_rows, shape_exprs, size_expr, token_dims, varies

__all__ = ["Handler", "HANDLERS", "value_of", "input_tensors"]

_BIG_STOP = 2**62  # ``x[:, :sys.maxsize]``-style stops mean "to the end"


def value_of(arg: object) -> object:
    """The example value of a node argument (a Node's fake value, else the constant itself)."""
    if isinstance(arg, fx.Node):
        return arg.meta.get("example_value")
    if isinstance(arg, (tuple, list)):
        return tuple(value_of(a) for a in arg)
    if isinstance(arg, slice):
        return slice(value_of(arg.start), value_of(arg.stop), value_of(arg.step))
    return arg


def _arg(node: fx.Node, index: int, name: str, default: object = None) -> object:
    """Argument ``index`` (counting ``self`` as 0) or keyword ``name`` of the node, as a value."""
    if index < len(node.args):
        return value_of(node.args[index])
    return value_of(node.kwargs.get(name, default))


def input_tensors(node: fx.Node) -> list[torch.Tensor]:
    """The fake tensors among the node's arguments (nested ones included)."""
    values = value_of(tuple(node.args) + tuple(node.kwargs.values()))
    return [leaf for leaf in leaves(values) if isinstance(leaf, torch.Tensor)]


def _dims(dim: object, ndim: int) -> set[int] | None:
    """Normalized dims of a dim argument (int or sequence); None means all dims."""
    if dim is None:
        return None
    dims = dim if isinstance(dim, (tuple, list)) else (dim,)
    if not dims:
        return None  # sum(x, dim=[]) reduces everything
    return {int(d) % max(ndim, 1) for d in dims}


def _hits(dims: set[int] | None, value: object, symbol: sympy.Symbol) -> bool:
    """Whether dims (None = all) include a token dim of value."""
    tokens = set(token_dims(value, symbol))
    return bool(tokens) if dims is None else bool(tokens & dims)


# A handler returns a category (the reason minus prefix and op) or None when the call is row-wise.
Handler = Callable[[fx.Node, str, sympy.Symbol], "str | None"]


def _check_pointwise(node: fx.Node, name: str, symbol: sympy.Symbol) -> str | None:
    """Elementwise: safe unless the token count itself is used as a value (``x / s``)."""
    for leaf in leaves(value_of(tuple(node.args[1:]) + tuple(node.kwargs.values()))):
        if isinstance(leaf, (torch.SymInt, torch.SymFloat)) and varies(size_expr(leaf), symbol):
            return "token count used as a value"
    source = value_of(node.args[0])
    if name == "glu" and _hits(_dims(_arg(node, 1, "dim", -1), source.ndim), source, symbol):
        return "halves split along the token dim"
    return None


def _check_dropout(node: fx.Node, name: str, symbol: sympy.Symbol) -> str | None:
    """Dropout is the identity in eval (``training=False`` or ``p=0``), random otherwise."""
    p = _arg(node, 1, "p", 0.5)
    training = _arg(node, 2, "training", node.kwargs.get("train", True))  # torch.dropout says train
    if training and p:
        return "random"
    return None


def _check_reshape(node: fx.Node, name: str, symbol: sympy.Symbol) -> str | None:
    """view/reshape/flatten/unflatten: the token dim must stay the leading factor of its group."""
    before, after = shape_exprs(value_of(node.args[0])), shape_exprs(node.meta.get("example_value"))
    if not keeps_rows(before, after, symbol):
        return "reshape mixes the token dim with other dims"
    return None


# (position, default) of the dim argument where it is not (1, None)
_REDUCTION_DIM_ARGS = {"norm": (2, None), "vector_norm": (2, None), "linalg_vector_norm": (2, None),
                       "normalize": (2, 1)}


def _check_reduction(node: fx.Node, name: str, symbol: sympy.Symbol) -> str | None:
    """sum/mean/max/...: safe over non-token dims; ``max(x, y)`` of two tensors is pointwise."""
    source = value_of(node.args[0])
    other = _arg(node, 1, "other")
    if name in ("max", "min") and isinstance(other, torch.Tensor):
        return None
    dim_index, dim_default = _REDUCTION_DIM_ARGS.get(name, (1, None))
    dims = _dims(_arg(node, dim_index, "dim", dim_default), getattr(source, "ndim", 0))
    if _hits(dims, source, symbol):
        return "reduction over the token dim"
    return None


def _dim_check(category: str, dim_index: int, default: object) -> Handler:
    """A handler flagging ops whose ``dim`` argument (position dim_index) is a token dim."""

    def check(node: fx.Node, name: str, symbol: sympy.Symbol) -> str | None:
        source = value_of(node.args[0])
        dims = _dims(_arg(node, dim_index, "dim", default), getattr(source, "ndim", 0))
        return category if _hits(dims, source, symbol) else None

    return check


def _check_reorder(node: fx.Node, name: str, symbol: sympy.Symbol) -> str | None:
    """flip/roll move rows around along the given dims (all dims when none given)."""
    source = value_of(node.args[0])
    if name in ("fliplr", "flipud"):
        dims: set[int] | None = {1 if name == "fliplr" else 0}
    elif name == "roll":
        dims = _dims(_arg(node, 2, "dims"), source.ndim)
    else:
        flip_dims = _arg(node, 1, "dims")
        if len(node.args) > 2:  # x.flip(0, 1) varargs form
            flip_dims = [value_of(a) for a in node.args[1:]]
        dims = _dims(flip_dims, source.ndim)
    return "reorder along the token dim" if _hits(dims, source, symbol) else None


def _check_trailing_norm(node: fx.Node, name: str, symbol: sympy.Symbol) -> str | None:
    """layer_norm/rms_norm normalize over the last ``len(normalized_shape)`` dims."""
    source = value_of(node.args[0])
    normalized = _arg(node, 1, "normalized_shape", ())
    count = len(normalized) if isinstance(normalized, (tuple, list, torch.Size)) else 1
    if _hits(set(range(source.ndim - count, source.ndim)), source, symbol):
        return "reduction over the token dim"
    return None


def _check_group_norm(node: fx.Node, name: str, symbol: sympy.Symbol) -> str | None:
    """group_norm/instance_norm reduce over every dim but the batch dim (group_norm) or 0, 1."""
    source = value_of(node.args[0])
    first = 1 if name == "group_norm" else 2
    if _hits(set(range(first, source.ndim)), source, symbol):
        return "reduction over the token dim"
    return None


def _check_batch_norm(node: fx.Node, name: str, symbol: sympy.Symbol) -> str | None:
    """batch_norm with running stats is a per-channel affine map; in training it reduces."""
    source = value_of(node.args[0])
    if _arg(node, 5, "training", False) and _hits(set(range(source.ndim)) - {1}, source, symbol):
        return "reduction over the token dim"
    return None


def _check_matmul(node: fx.Node, name: str, symbol: sympy.Symbol) -> str | None:
    """Matrix products: flag contraction over the token dim and token x token results."""
    if name == "einsum":
        return _check_einsum(node, name, symbol)
    left, right = _matmul_operands(node, name)
    contracted = [(left, left.ndim - 1)] if left.ndim and name not in ("outer", "ger") else []
    if name in ("linear", "inner"):  # both contract their last dims
        contracted.append((right, right.ndim - 1))
    elif contracted and right.ndim:
        contracted.append((right, max(right.ndim - 2, 0)))
    if any(d in token_dims(t, symbol) for t, d in contracted):
        return "matmul contracting over the token dim"
    if name == "addbmm" and 0 in token_dims(left, symbol):
        return "reduction over the token dim"
    if name == "linear" and token_dims(right, symbol):
        return "matmul with a token-dim weight"
    out_tokens = sum(len(token_dims(t, symbol)) for t in leaves(node.meta.get("example_value")))
    if out_tokens > max(len(token_dims(left, symbol)), len(token_dims(right, symbol))):
        return "token x token matmul"
    return None


def _matmul_operands(node: fx.Node, name: str) -> tuple[torch.Tensor, torch.Tensor]:
    """The two multiplied tensors (``addmm(bias, a, b)``-style ops carry them at 1 and 2)."""
    first = 1 if name in ("baddbmm", "addmm", "addbmm", "addmv") else 0
    return value_of(node.args[first]), value_of(node.args[first + 1])


def _check_einsum(node: fx.Node, name: str, symbol: sympy.Symbol) -> str | None:
    """einsum: a contracted letter must not be a token dim; the output has at most one per input."""
    equation = value_of(node.args[0])
    operands = value_of(node.args[1]) if isinstance(node.args[1], (tuple, list)) else value_of(node.args[1:])
    inputs, output = _einsum_letters(str(equation), [t.ndim for t in operands])
    token_letters = {
        letters[d] for letters, t in zip(inputs, operands) for d in token_dims(t, symbol)
    }
    if token_letters - set(output):
        return "matmul contracting over the token dim"
    most = max((len(token_dims(t, symbol)) for t in operands), default=0)
    if sum(letter in token_letters for letter in output) > most:
        return "token x token matmul"
    return None


def _einsum_letters(equation: str, ndims: list[int]) -> tuple[list[str], str]:
    """Per-operand letter strings and the output letters, with ``...`` spelled out."""
    equation = equation.replace(" ", "")
    lhs, _, rhs = equation.partition("->")
    specs = lhs.split(",")
    widest = max((n - len(s.replace("...", "")) for s, n in zip(specs, ndims) if "..." in s), default=0)
    ellipsis = "".join(chr(0x100 + k) for k in range(widest))  # letters no equation uses

    def spell(spec: str, ndim: int) -> str:
        extra = ndim - len(spec.replace("...", ""))
        return spec.replace("...", ellipsis[widest - extra:] if extra else "")

    inputs = [spell(s, n) for s, n in zip(specs, ndims)]
    if "->" not in equation:
        letters = "".join(inputs)
        rhs = ellipsis + "".join(sorted(c for c in set(letters) if letters.count(c) == 1 and c not in ellipsis))
    return inputs, spell(rhs, len(rhs.replace("...", "")) + widest)


def _check_conv(node: fx.Node, name: str, symbol: sympy.Symbol) -> str | None:
    """Convolutions slide over every dim but batch (0) and channels (1)."""
    source = value_of(node.args[0])
    if set(token_dims(source, symbol)) - {0}:
        return "convolution over the token dim"
    return None


def _check_cat(node: fx.Node, name: str, symbol: sympy.Symbol) -> str | None:
    """cat along the token dim puts padding rows of the first input between real rows."""
    tensors = [t for t in leaves(value_of(node.args[0])) if isinstance(t, torch.Tensor)]
    dim = _arg(node, 1, "dim", node.kwargs.get("axis", 0))
    for tensor in tensors:
        if tensor.ndim and _hits(_dims(dim, tensor.ndim), tensor, symbol):
            return "cat along the token dim"
    return None


def _check_split(node: fx.Node, name: str, symbol: sympy.Symbol) -> str | None:
    """split/chunk/unbind along the token dim hand out row ranges."""
    dim_index, default = (1, 0) if name == "unbind" else (2, 0)
    source = value_of(node.args[0])
    if _hits(_dims(_arg(node, dim_index, "dim", default), source.ndim), source, symbol):
        return "split along the token dim"
    return None


def _check_dim_index(node: fx.Node, name: str, symbol: sympy.Symbol) -> str | None:
    """index_select/gather/narrow/select/index_copy/scatter...: a dim argument at position 1.

    The ``index_*`` writes also count as along the token dim when their 1-D index is per token
    (``cache.index_copy_(2, positions, k)``): padding positions are 0 and would write padding
    rows into row 0. A scatter's index has the source's shape, so only its ``dim`` matters.
    """
    source, index = value_of(node.args[0]), _arg(node, 2, "index")
    dims = _dims(_arg(node, 1, "dim"), source.ndim)
    kind = _DIM_INDEX_KINDS.get(name, "index write")
    per_token_index = name.startswith("index_") and name != "index_select" and token_dims(index, symbol)
    if per_token_index or (name.startswith("scatter") and _hits(dims, index, symbol)):
        return f"{kind} along the token dim"
    if not _hits(dims, source, symbol):
        return None
    if name == "narrow" and _whole_range(_arg(node, 2, "start"), _arg(node, 3, "length"), source, dims):
        return None
    return f"{kind} along the token dim"


_DIM_INDEX_KINDS = {"narrow": "slice", "select": "index", "index_select": "index", "gather": "index"}


def _whole_range(start: object, length: object, source: torch.Tensor, dims: set[int] | None) -> bool:
    """Whether ``narrow(dim, start, length)`` keeps the whole dim (``narrow(1, 0, s)``)."""
    size = shape_exprs(source)[min(dims or {0})]
    return size_expr(start) == 0 and sympy.expand(size_expr(length) - size) == 0


def _check_take_along_dim(node: fx.Node, name: str, symbol: sympy.Symbol) -> str | None:
    source = value_of(node.args[0])
    if _hits(_dims(_arg(node, 2, "dim"), source.ndim), source, symbol):
        return "index along the token dim"
    return None


def _check_take(node: fx.Node, name: str, symbol: sympy.Symbol) -> str | None:
    """take/put/masked_scatter address the flattened tensor: every token dim is indexed."""
    if token_dims(value_of(node.args[0]), symbol):
        return "index along the token dim"
    return None


def _check_index_put(node: fx.Node, name: str, symbol: sympy.Symbol) -> str | None:
    """index_put(x, (i0, i1, ...), v) indexes dims 0, 1, ... with tensors (per-token ones too)."""
    source, indices = value_of(node.args[0]), _arg(node, 1, "indices", ())
    dims = {d for d, index in enumerate(indices) if index is not None}
    if _hits(dims, source, symbol) or any(token_dims(index, symbol) for index in indices):
        return "index write along the token dim"
    return None


def _check_embedding(node: fx.Node, name: str, symbol: sympy.Symbol) -> str | None:
    """embedding(ids, table) (F.) or embedding(table, ids) (torch.): the table is not per-token."""
    first, second = value_of(node.args[0]), value_of(node.args[1])
    table = first if first.is_floating_point() else second
    if token_dims(table, symbol):
        return "index along the token dim"
    return None


def _check_factory(node: fx.Node, name: str, symbol: sympy.Symbol) -> str | None:
    """Factories may take the token count as a size, never as a value (start, fill, steps)."""
    values = leaves(_factory_values(node, name))
    if any(isinstance(v, (torch.SymInt, torch.SymFloat)) and varies(size_expr(v), symbol) for v in values):
        return "token count used as a value"
    return None


def _factory_values(node: fx.Node, name: str) -> list[object]:
    """The arguments of a factory that become tensor values (not sizes)."""
    if name == "arange":  # arange(end) | arange(start, end, step): only end is a size
        return [_arg(node, 0, "start"), _arg(node, 2, "step")] if len(node.args) > 1 else [node.kwargs.get("start")]
    if name in ("full", "full_like", "new_full"):
        return [_arg(node, 2 if name == "new_full" else 1, "fill_value")]
    if name in ("linspace", "logspace"):  # the step count changes every value
        return [value_of(a) for a in node.args[:3]] + [value_of(node.kwargs.get("steps"))]
    if name in ("scalar_tensor", "tensor", "as_tensor"):
        return [value_of(node.args[0]) if node.args else None]
    return []


def _check_getitem(node: fx.Node, name: str, symbol: sympy.Symbol) -> str | None:
    """``x[idx]``: safe while every token dim is taken whole (``:`` or ``:s``)."""
    source = value_of(node.args[0])
    if not isinstance(source, torch.Tensor):
        return None  # tuple/list/Size indexing
    return _index_reason(source, value_of(node.args[1]), symbol, scalar_value=False)


def _check_setitem(node: fx.Node, name: str, symbol: sympy.Symbol) -> str | None:
    """``x[idx] = v`` on an intermediate: safe while every token dim is written whole."""
    source, value = value_of(node.args[0]), value_of(node.args[2])
    scalar = not isinstance(value, torch.Tensor) or value.ndim == 0
    return _index_reason(source, value_of(node.args[1]), symbol, scalar_value=scalar)


def _index_reason(source: torch.Tensor, index: object, symbol: sympy.Symbol, scalar_value: bool) -> str | None:
    """Walk a basic/advanced index over source's dims; name the first token dim it narrows."""
    entries = index if isinstance(index, tuple) else (index,)
    consumed = sum(_index_width(e) for e in entries)
    tokens, shape = set(token_dims(source, symbol)), shape_exprs(source)
    dim = 0
    for entry in entries:
        if entry is None:
            continue
        if entry is Ellipsis:
            dim += source.ndim - consumed
            continue
        width = _index_width(entry)
        covered = set(range(dim, dim + width)) & tokens
        if covered and not _takes_whole(entry, shape[dim], scalar_value):
            kind = "slice" if isinstance(entry, slice) else "index"
            return f"{kind} along the token dim"
        dim += width
    return None


def _index_width(entry: object) -> int:
    """How many source dims one index entry consumes (a bool mask consumes its ndim)."""
    if entry is None or entry is Ellipsis:
        return 0
    if isinstance(entry, torch.Tensor) and entry.dtype == torch.bool:
        return max(entry.ndim, 1)
    return 1


def _takes_whole(entry: object, size: sympy.Expr, scalar_value: bool) -> bool:
    """Whether an index entry keeps every row of a token dim of this size in place."""
    if isinstance(entry, slice):
        start, stop, step = (None if e is None else size_expr(e) for e in (entry.start, entry.stop, entry.step))
        return (start in (None, 0) and step in (None, 1)
                and (stop is None or (stop.is_number and stop >= _BIG_STOP) or sympy.expand(stop - size) == 0))
    # a boolean mask with a scalar value is an elementwise masked fill (setitem only)
    return isinstance(entry, torch.Tensor) and entry.dtype == torch.bool and scalar_value


def _check_pad(node: fx.Node, name: str, symbol: sympy.Symbol) -> str | None:
    """F.pad keeps dim order; padding a token dim changes its size (whole rows: padding.py)."""
    before, after = shape_exprs(value_of(node.args[0])), shape_exprs(node.meta.get("example_value"))
    for d in token_dims(value_of(node.args[0]), symbol):
        if sympy.expand(before[d] - after[d]) != 0:
            return "pad along the token dim"
    return None


def _check_repeat(node: fx.Node, name: str, symbol: sympy.Symbol) -> str | None:
    """repeat/tile/repeat_interleave along the token dim interleave padding rows."""
    source, result = value_of(node.args[0]), node.meta.get("example_value")
    if name == "repeat_interleave" and isinstance(_arg(node, 1, "repeats"), torch.Tensor):
        return "data-dependent"
    offset = result.ndim - source.ndim  # repeat may add leading dims
    for d in token_dims(source, symbol):
        if sympy.expand(shape_exprs(source)[d] - shape_exprs(result)[d + offset]) != 0:
            return "repeat along the token dim"
    return None


_NO_CHECK: Handler = lambda node, name, symbol: None  # noqa: E731  (row-wise by construction)

HANDLERS: dict[str, Handler] = {
    **{n: _check_pointwise for n in POINTWISE_OPS},
    **{n: _NO_CHECK for n in PERMUTE_OPS | SIZE_QUERY_OPS | STACK_OPS | NON_WRITING_INPLACE},
    **{n: _check_dropout for n in DROPOUT_OPS},
    **{n: _check_reshape for n in RESHAPE_OPS},
    **{n: _check_reduction for n in REDUCTION_OPS},
    **{n: _dim_check("scan over the token dim", 1, None) for n in SCAN_OPS - {"diff"}},
    "diff": _dim_check("scan over the token dim", 2, -1),  # diff(x, n=1, dim=-1)
    **{n: _dim_check("sort/top-k over the token dim", 2 if n in ("topk", "kthvalue") else 1, 0 if n == "msort" else -1)
       for n in SORT_OPS},
    **{n: _check_reorder for n in REORDER_OPS},
    **{n: _dim_check("softmax over the token dim", 1, None) for n in SOFTMAX_OPS},
    **{n: _check_trailing_norm for n in TRAILING_NORM_OPS},
    **{n: _check_matmul for n in MATMUL_OPS},
    **{n: _check_conv for n in CONV_OPS},
    **{n: _check_cat for n in CAT_OPS},
    **{n: _check_split for n in SPLIT_OPS},
    **{n: _check_dim_index for n in DIM_INDEX_OPS},
    **{n: _check_factory for n in FACTORY_OPS},
    "group_norm": _check_group_norm, "instance_norm": _check_group_norm, "batch_norm": _check_batch_norm,
    "take_along_dim": _check_take_along_dim, "take": _check_take, "put": _check_take,
    "masked_scatter": _check_take,
    "index_put": _check_index_put, "embedding": _check_embedding,
    "getitem": _check_getitem, "__getitem__": _check_getitem, "setitem": _check_setitem,
    "__setitem__": _check_setitem, "pad": _check_pad,
    "repeat": _check_repeat, "tile": _check_repeat, "repeat_interleave": _check_repeat,
}

