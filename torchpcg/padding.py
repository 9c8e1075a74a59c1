"""Token-dim analysis: which nodes of a Dynamo graph may run padded to a bucket size.

In: the FX GraphModule Dynamo hands a backend, with a fake tensor (symbolic sizes) in
``node.meta["example_value"]`` of every node. Out: the token-count symbol, the token dims of any
value, and ``{node: reason}`` for every node that is *not* row-wise along the token dim, so split.py
can cut it out and run it eagerly on the real rows. Also the check behind verify mode
(``TORCHPCG_VERIFY=1``): run a graph at the exact size and padded, name the first node whose real
rows differ. No CUDA here.

Why: a captured piece is replayed at bucket size B >= T with rows T..B-1 zero. That is only correct
when output row t of every op depends on input row t alone (and on non-token tensors such as
weights) and nothing outside the piece is written (DESIGN.md, "Correctness rules" 1).

How: ops are looked up by name in the module-level tables below (one handler per family, which
reads the op's dim arguments) and then checked against the fake shapes: every dim that carries the
token symbol must be a whole number of rows (``c * s``). Anything not in a table is unsafe.
"""
from __future__ import annotations

import dataclasses
import functools
import operator
from collections.abc import Callable, Sequence
from typing import Any

import sympy
import torch
import torch.fx as fx
from torch.utils._sympy.symbol import SymT, symbol_is_type

from .layout import leaves

__all__ = [
    "REASON_PREFIX",
    "token_symbol",
    "token_dims",
    "classify",
    "first_difference",
    "pad_inputs",
    "written_bases",
]

REASON_PREFIX = "padding-unsafe: "

# ---------------------------------------------------------------------------------------------
# Op tables. Names are Tensor-method / torch-function names; in-place variants (``add_``) are
# checked for writes into graph inputs first and then looked up without the trailing underscore.
# ---------------------------------------------------------------------------------------------

# Attention mixes all token rows; split.py cuts it anyway, listed so explain() shows one reason.
ATTENTION_OPS = frozenset({
    "scaled_dot_product_attention", "_scaled_dot_product_attention_math",
    "_scaled_dot_product_flash_attention", "_scaled_dot_product_flash_attention_for_cpu",
    "_scaled_dot_product_efficient_attention", "_scaled_dot_product_cudnn_attention",
    "_flash_attention_forward", "_efficient_attention_forward", "multi_head_attention_forward",
    "_native_multi_head_attention", "flex_attention",
})

# Output shape or values depend on tensor data: a graph cannot be captured around them at all.
DATA_DEPENDENT_OPS = frozenset({
    "nonzero", "nonzero_static", "argwhere", "masked_select", "unique", "unique_consecutive",
    "item", "tolist", "_local_scalar_dense", "bincount", "histc",
})

# Random ops draw a different number of values at B rows than at T rows.
RANDOM_OPS = frozenset({
    "rand", "randn", "randint", "rand_like", "randn_like", "randint_like", "randperm", "bernoulli",
    "multinomial", "normal", "uniform", "exponential", "poisson", "cauchy", "geometric",
    "log_normal", "random", "native_dropout", "alpha_dropout", "feature_alpha_dropout",
    "dropout1d", "dropout2d", "dropout3d", "rrelu",
})

# Elementwise with broadcasting: output row t reads row t of every input.
POINTWISE_OPS = frozenset({
    # arithmetic
    "add", "sub", "rsub", "mul", "div", "true_divide", "floor_divide", "remainder", "fmod", "pow",
    "float_power", "neg", "negative", "positive", "abs", "reciprocal", "square", "sqrt", "rsqrt",
    "exp", "exp2", "expm1", "log", "log2", "log10", "log1p", "sign", "sgn", "floor", "ceil",
    "round", "trunc", "frac", "clamp", "clamp_min", "clamp_max", "clip", "minimum", "maximum",
    "fmin", "fmax", "lerp", "addcmul", "addcdiv", "hypot", "atan2", "copysign", "nan_to_num",
    "xlogy", "logaddexp", "logaddexp2", "erf", "erfc", "erfinv", "lgamma", "digamma", "polar",
    "sin", "cos", "tan", "asin", "acos", "atan", "sinh", "cosh", "tanh", "asinh", "acosh", "atanh",
    "sigmoid", "logit", "sinc", "deg2rad", "rad2deg", "conj", "real", "imag", "angle",
    "view_as_real", "view_as_complex", "complex",
    # activations
    "relu", "relu6", "gelu", "silu", "mish", "elu", "selu", "celu", "leaky_relu", "prelu",
    "hardtanh", "hardswish", "hardsigmoid", "hardshrink", "softshrink", "tanhshrink", "softplus",
    "softsign", "logsigmoid", "threshold", "glu",  # glu splits the given dim in two halves
    # comparisons and logic
    "eq", "ne", "lt", "le", "gt", "ge", "greater", "less", "greater_equal", "less_equal",
    "not_equal", "isnan", "isinf", "isfinite", "isneginf", "isposinf", "signbit",
    "logical_and", "logical_or", "logical_xor", "logical_not", "bitwise_and", "bitwise_or",
    "bitwise_xor", "bitwise_not", "bitwise_left_shift", "bitwise_right_shift", "where",
    "masked_fill", "isclose",
    # casts, copies, device moves (same shape, same rows)
    "to", "type", "type_as", "float", "double", "half", "bfloat16", "int", "long", "short", "bool",
    "byte", "char", "cpu", "cuda", "clone", "contiguous", "detach", "alias", "copy", "zero",
    "fill",
    # position-wise masks: triu/tril keep element (i, j) or zero it, reading nothing else
    "triu", "tril",
    # collectives kept inside graphs (split_collectives=0): all_reduce sums element (i, j) across
    # ranks and wait_tensor returns its input, so rows stay rows. Gathers, scatters and all-to-all
    # move rows between ranks along a dim and stay unknown (cut).
    "_c10d_functional.all_reduce", "_c10d_functional.wait_tensor",
})

# Identity in eval (training=False or p=0); random when training (checked in _check_dropout).
DROPOUT_OPS = frozenset({"dropout", "feature_dropout"})

# Add a new dim in front of (or between) the input dims; every token dim survives as is.
STACK_OPS = frozenset({"stack"})

# Rearrange dims without mixing them: the token dim keeps its expression (checked generically).
PERMUTE_OPS = frozenset({
    "permute", "transpose", "swapaxes", "swapdims", "movedim", "moveaxis", "t", "unsqueeze",
    "squeeze", "expand", "expand_as", "broadcast_to", "atleast_1d", "atleast_2d", "atleast_3d",
})

# Regroup dims in row-major order: safe while the token dim stays the leading factor of its group.
RESHAPE_OPS = frozenset({"view", "reshape", "flatten", "unflatten", "view_as", "reshape_as", "ravel"})

# Reductions that take a dim argument (None = all dims); safe over non-token dims only.
REDUCTION_OPS = frozenset({
    "sum", "mean", "prod", "amax", "amin", "argmax", "argmin", "std", "var", "std_mean",
    "var_mean", "all", "any", "logsumexp", "count_nonzero", "nansum", "nanmean", "aminmax",
    "max", "min", "median", "nanmedian", "mode", "norm", "vector_norm", "linalg_vector_norm",
    "normalize",
})

# Scans: row t reads rows 0..t (or t-1 for diff). Not row-wise over the token dim.
SCAN_OPS = frozenset({"cumsum", "cumprod", "cummax", "cummin", "logcumsumexp", "diff"})

# Orderings over a dim.
SORT_OPS = frozenset({"sort", "argsort", "msort", "topk", "kthvalue"})
REORDER_OPS = frozenset({"flip", "fliplr", "flipud", "roll"})

# Softmax over a dim; safe over non-token dims.
SOFTMAX_OPS = frozenset({"softmax", "log_softmax", "softmin", "_softmax", "_log_softmax"})

# Normalizations over the trailing ``len(normalized_shape)`` dims.
TRAILING_NORM_OPS = frozenset({"layer_norm", "rms_norm"})

# Matrix products; safe unless they contract over the token dim or make a [s, s] result.
MATMUL_OPS = frozenset({
    "matmul", "mm", "bmm", "linear", "baddbmm", "addmm", "addbmm", "mv", "addmv", "dot", "vdot",
    "inner", "outer", "ger", "einsum",
})

CONV_OPS = frozenset({"conv1d", "conv2d", "conv3d", "conv_transpose1d", "conv_transpose2d",
                      "conv_transpose3d", "convolution"})

CAT_OPS = frozenset({"cat", "concat", "concatenate"})
# split-like ops cut one dim into pieces (a tuple comes out; ``getitem`` on it is safe).
SPLIT_OPS = frozenset({"split", "split_with_sizes", "chunk", "unbind", "tensor_split", "unsafe_split"})
# Reads along one dim at given positions.
DIM_INDEX_OPS = frozenset({"index_select", "gather", "narrow", "select", "index_copy", "index_add",
                           "index_fill", "index_reduce", "scatter", "scatter_add", "scatter_reduce"})

# New tensors from sizes; the token count may appear in sizes but not in values.
FACTORY_OPS = frozenset({
    "arange", "zeros", "ones", "full", "empty", "eye", "zeros_like", "ones_like", "full_like",
    "empty_like", "new_zeros", "new_ones", "new_full", "new_empty", "empty_strided", "scalar_tensor",
    "tensor", "as_tensor", "linspace", "logspace",
})

# Metadata queries: return sizes or flags, read no rows.
SIZE_QUERY_OPS = frozenset({
    "size", "dim", "ndimension", "numel", "nelement", "stride", "storage_offset", "is_contiguous",
    "element_size", "get_device", "is_floating_point", "is_complex", "data_ptr", "__len__",
    "sym_size", "sym_stride", "sym_numel", "sym_storage_offset",  # aten.sym_size.int etc.
})

# In-place by name but write no tensor data.
NON_WRITING_INPLACE = frozenset({"requires_grad_", "retain_grad_", "share_memory_"})

# Ops that return a view of (alias) their first argument: writes through them reach the base.
# Casts and ``contiguous`` are here because they return ``self`` when nothing changes.
ALIAS_OPS = PERMUTE_OPS | RESHAPE_OPS | SPLIT_OPS | frozenset({
    "getitem", "__getitem__", "narrow", "select", "as_strided", "diagonal", "detach", "alias",
    "contiguous", "to", "type", "type_as", "float", "half", "bfloat16", "double", "real", "imag",
    "view_as_real", "view_as_complex", "unfold",
})

# Python operators Dynamo records as call_function targets, by their torch name
# (the ``i*`` forms write their left operand in place).
_OPERATOR_NAMES: dict[Callable[..., Any], str] = {
    operator.add: "add", operator.sub: "sub", operator.mul: "mul", operator.truediv: "div",
    operator.floordiv: "floor_divide", operator.mod: "remainder", operator.pow: "pow",
    operator.neg: "neg", operator.pos: "positive", operator.abs: "abs", operator.invert: "bitwise_not",
    operator.and_: "bitwise_and", operator.or_: "bitwise_or", operator.xor: "bitwise_xor",
    operator.lshift: "bitwise_left_shift", operator.rshift: "bitwise_right_shift",
    operator.eq: "eq", operator.ne: "ne", operator.lt: "lt", operator.le: "le", operator.gt: "gt",
    operator.ge: "ge", operator.matmul: "matmul", operator.getitem: "getitem",
    operator.setitem: "setitem", operator.iadd: "add_", operator.isub: "sub_",
    operator.imul: "mul_", operator.itruediv: "div_", operator.ifloordiv: "floor_divide_",
    operator.imod: "remainder_", operator.ipow: "pow_", operator.iand: "bitwise_and_",
    operator.ior: "bitwise_or_", operator.ixor: "bitwise_xor_", operator.ilshift: "bitwise_left_shift_",
    operator.irshift: "bitwise_right_shift_", operator.imatmul: "matmul_",
}

# Tensor attributes Dynamo may record as ``getattr(x, name)``, by the op they amount to.
_ATTRIBUTE_NAMES = {"T": "permute", "mT": "transpose", "H": "permute", "mH": "transpose",
                    "real": "real", "imag": "imag", "data": "detach", "shape": "size"}

_BIG_STOP = 2**62  # ``x[:, :sys.maxsize]``-style stops mean "to the end"


@dataclasses.dataclass(frozen=True)
class _Context:
    """What every check needs besides the node: the token symbol."""

    symbol: sympy.Symbol | None


# ---------------------------------------------------------------------------------------------
# Symbols and shapes
# ---------------------------------------------------------------------------------------------


def _expr(size: object) -> sympy.Expr:
    """The sympy expression of a size (SymInt/SymFloat/SymBool or plain number)."""
    if isinstance(size, (torch.SymInt, torch.SymFloat, torch.SymBool)):
        return size.node.expr
    return sympy.sympify(size)


def _free_symbols(value: object) -> set[sympy.Symbol]:
    """Every sympy symbol in the sizes of the tensors (and in the sym numbers) inside value."""
    symbols: set[sympy.Symbol] = set()
    for leaf in leaves(value):
        if isinstance(leaf, torch.Tensor):
            for size in leaf.shape:
                symbols |= _expr(size).free_symbols
        elif isinstance(leaf, torch.Size):
            for size in leaf:
                symbols |= _expr(size).free_symbols
        elif isinstance(leaf, (torch.SymInt, torch.SymFloat, torch.SymBool)):
            symbols |= _expr(leaf).free_symbols
    return symbols


def _is_unbacked(symbol: sympy.Symbol) -> bool:
    return symbol_is_type(symbol, (SymT.UNBACKED_INT, SymT.UNBACKED_FLOAT))


# Token counts at which size expressions are compared when they are not plainly ``c * s``;
# unbacked sizes read like ``Max(1, u0)`` or ``Max(0, u0 - Max(0, u0 - 1))`` (= 1 for u0 >= 1).
_SAMPLE_TOKENS = (1, 2, 3, 5, 8, 13, 64, 1000, 4099)


def _row_coefficient(expr: sympy.Expr, symbol: sympy.Symbol) -> int | None:
    """c when ``expr == c * symbol`` for every token count >= 1 (c values per row), else None."""
    coefficient, rest = expr.as_coeff_Mul()
    if rest == symbol and coefficient.is_Integer and coefficient > 0:
        return int(coefficient)
    values = _sampled(expr, symbol)
    if values is None or values[0] <= 0:
        return None
    return values[0] if all(v == values[0] * t for v, t in zip(values, _SAMPLE_TOKENS)) else None


@functools.lru_cache(maxsize=4096)
def _sampled(expr: sympy.Expr, symbol: sympy.Symbol) -> tuple[int, ...] | None:
    """expr at each of _SAMPLE_TOKENS when symbol is its only free symbol, else None."""
    if expr.free_symbols != {symbol}:
        return None
    try:
        return tuple(int(expr.subs(symbol, t)) for t in _SAMPLE_TOKENS)
    except (TypeError, ValueError, ZeroDivisionError):  # x // (s // 4) at s = 1: not a plain size
        return None


def _settled(expr: sympy.Expr, symbol: sympy.Symbol) -> sympy.Expr:
    """expr, or its constant value when it mentions the symbol but does not vary with it."""
    if symbol in expr.free_symbols and not _varies(expr, symbol):
        return sympy.Integer(_sampled(expr, symbol)[0])
    return expr


def _varies(expr: sympy.Expr, symbol: sympy.Symbol) -> bool:
    """Whether a size changes with the token count (``Max(0, u0 - Max(0, u0 - 1))`` does not)."""
    if symbol not in expr.free_symbols:
        return False
    values = _sampled(expr, symbol)
    return values is None or len(set(values)) > 1


def _shape(value: object) -> tuple[sympy.Expr, ...]:
    return tuple(_expr(size) for size in value.shape) if isinstance(value, torch.Tensor) else ()


def token_symbol(gm: fx.GraphModule) -> sympy.Symbol | None:
    """The token-count symbol of a Dynamo graph, or None when its shapes are all static.

    It is the symbol that is a whole dim (``size == s``) of the most tensor placeholders; ties go
    to the one seen first. Falls back to any symbol in placeholder shapes. Backed (``mark_dynamic``)
    and unbacked (``mark_unbacked``, what torchpcg.compile uses) token dims both count: a
    data-dependent symbol never sizes a graph input.

    Example::

        >>> torch._dynamo.mark_dynamic(ids, 1)   # ids: [1, 7]; Dynamo names the size s27
        >>> token_symbol(gm)                      # gm: the graph the backend received
        s27

    Note: the choice is heuristic when several symbols qualify; split.py treats every other
    symbol as a second dynamic symbol.
    """
    whole: dict[sympy.Symbol, int] = {}
    anywhere: dict[sympy.Symbol, int] = {}
    for node in gm.graph.find_nodes(op="placeholder"):
        value = node.meta.get("example_value")
        for symbol in sorted(_free_symbols(value), key=str):
            anywhere[symbol] = anywhere.get(symbol, 0) + 1
        if isinstance(value, torch.Tensor):
            for symbol in sorted({e for e in _shape(value) if isinstance(e, sympy.Symbol)}, key=str):
                whole[symbol] = whole.get(symbol, 0) + 1
    counts = whole or anywhere
    return max(counts, key=counts.__getitem__) if counts else None


def token_dims(value: object, symbol: sympy.Symbol | None) -> tuple[int, ...]:
    """Dims of a (fake) tensor whose size expression contains ``symbol``; () for non-tensors.

    A size that contains the symbol but is the same for every token count >= 1 (unbacked
    ``x[:, -1:]`` reads ``Max(0, u0 - Max(0, u0 - 1))``) is not a token dim.

    Example::

        >>> token_dims(fake_q, s0)   # fake_q: [1, 4, s0, 16]
        (2,)
        >>> token_dims(fake_flat, s0)   # fake_flat: [64*s0]
        (0,)
    """
    if symbol is None or not isinstance(value, torch.Tensor):
        return ()
    return tuple(d for d, e in enumerate(_shape(value)) if _varies(e, symbol))


# ---------------------------------------------------------------------------------------------
# Node helpers
# ---------------------------------------------------------------------------------------------


def _op_name(node: fx.Node) -> str:
    """A torch-style name for the node's op (``add``, ``index_copy_``, ``mylib.foo``)."""
    target = node.target
    if node.op == "call_method":
        return str(target)
    if node.op != "call_function":
        return f"{node.op} {target}"
    if target in _OPERATOR_NAMES:
        return _OPERATOR_NAMES[target]
    if target is getattr and len(node.args) == 2:  # x.T, x.mT, x.real recorded as getattr(x, name)
        return _ATTRIBUTE_NAMES.get(str(node.args[1]), f"getattr.{node.args[1]}")
    if isinstance(target, (torch._ops.OpOverload, torch._ops.OpOverloadPacket)):
        qualified = target.name() if isinstance(target, torch._ops.OpOverload) else target._qualified_op_name
        namespace, _, name = qualified.partition("::")
        name = name.split(".")[0]  # drop the overload: index_copy_.default -> index_copy_
        return name if namespace == "aten" else f"{namespace}.{name}"
    if isinstance(target, torch._ops.HigherOrderOperator):
        return target.__name__ if target.__name__ in ATTENTION_OPS else f"higher_order.{target.__name__}"
    name = getattr(target, "__name__", repr(target))
    module = getattr(target, "__module__", None) or ""
    objclass = getattr(target, "__objclass__", None)
    if module.startswith("torch") or objclass in (torch.Tensor, torch._C.TensorBase):
        return name
    return f"{module}.{name}" if module else name


def _value(arg: object) -> object:
    """The example value of a node argument (a Node's fake value, else the constant itself)."""
    if isinstance(arg, fx.Node):
        return arg.meta.get("example_value")
    if isinstance(arg, (tuple, list)):
        return tuple(_value(a) for a in arg)
    if isinstance(arg, slice):
        return slice(_value(arg.start), _value(arg.stop), _value(arg.step))
    return arg


def _arg(node: fx.Node, index: int, name: str, default: object = None) -> object:
    """Argument ``index`` (counting ``self`` as 0) or keyword ``name`` of the node, as a value."""
    if index < len(node.args):
        return _value(node.args[index])
    return _value(node.kwargs.get(name, default))


def _input_tensors(node: fx.Node) -> list[torch.Tensor]:
    values = _value(tuple(node.args) + tuple(node.kwargs.values()))
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


def _mentions(expr_or_value: object, symbol: sympy.Symbol) -> bool:
    return symbol in _free_symbols(expr_or_value)


def _reason(category: str, name: str) -> str:
    return f"{REASON_PREFIX}{category} ({name})"


# ---------------------------------------------------------------------------------------------
# Handlers, one per op family: each returns a category (the reason minus prefix and op) or None.
# ---------------------------------------------------------------------------------------------

Handler = Callable[[fx.Node, str, sympy.Symbol], "str | None"]


def _check_pointwise(node: fx.Node, name: str, symbol: sympy.Symbol) -> str | None:
    """Elementwise: safe unless the token count itself is used as a value (``x / s``)."""
    for leaf in leaves(_value(tuple(node.args[1:]) + tuple(node.kwargs.values()))):
        if isinstance(leaf, (torch.SymInt, torch.SymFloat)) and _varies(_expr(leaf), symbol):
            return "token count used as a value"
    source = _value(node.args[0])
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
    before, after = _shape(_value(node.args[0])), _shape(node.meta.get("example_value"))
    if not _keeps_rows(before, after, symbol):
        return "reshape mixes the token dim with other dims"
    return None


def _keeps_rows(before: Sequence[sympy.Expr], after: Sequence[sympy.Expr], symbol: sympy.Symbol) -> bool:
    """Whether a row-major reshape before -> after keeps each token row a contiguous block.

    Dims are grouped into runs with equal products (``[s, 64] -> [64*s]``, ``[64] -> [4, 16]``);
    a group holding the token symbol must have it in the first dim on both sides, once.
    """
    left = [e for e in map(functools.partial(_settled, symbol=symbol), before) if e != 1]
    right = [e for e in map(functools.partial(_settled, symbol=symbol), after) if e != 1]
    i = j = 0
    while i < len(left) and j < len(right):
        group_in, group_out = [left[i]], [right[j]]
        i, j = i + 1, j + 1
        while sympy.expand(sympy.Mul(*group_in) - sympy.Mul(*group_out)) != 0:
            grow_in = _order_key(sympy.Mul(*group_in), symbol) < _order_key(sympy.Mul(*group_out), symbol)
            if grow_in and i < len(left):
                group_in.append(left[i])
                i += 1
            elif not grow_in and j < len(right):
                group_out.append(right[j])
                j += 1
            else:
                return False
        if not (_token_leads(group_in, symbol) and _token_leads(group_out, symbol)):
            return False
    return i == len(left) and j == len(right)


def _order_key(expr: sympy.Expr, symbol: sympy.Symbol) -> tuple[float, float]:
    """Size order of ``c * symbol**k`` for large token counts: by k, then c."""
    coefficient, power = expr.as_coeff_exponent(symbol)
    if coefficient.free_symbols or not power.is_number:
        return (float("inf"), float("inf"))
    return (float(power), float(coefficient))


def _token_leads(group: list[sympy.Expr], symbol: sympy.Symbol) -> bool:
    holders = [k for k, e in enumerate(group) if symbol in e.free_symbols]
    return not holders or holders == [0]


# (position, default) of the dim argument where it is not (1, None)
_REDUCTION_DIM_ARGS = {"norm": (2, None), "vector_norm": (2, None), "linalg_vector_norm": (2, None),
                       "normalize": (2, 1)}


def _check_reduction(node: fx.Node, name: str, symbol: sympy.Symbol) -> str | None:
    """sum/mean/max/...: safe over non-token dims; ``max(x, y)`` of two tensors is pointwise."""
    source = _value(node.args[0])
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
        source = _value(node.args[0])
        dims = _dims(_arg(node, dim_index, "dim", default), getattr(source, "ndim", 0))
        return category if _hits(dims, source, symbol) else None

    return check


def _check_reorder(node: fx.Node, name: str, symbol: sympy.Symbol) -> str | None:
    """flip/roll move rows around along the given dims (all dims when none given)."""
    source = _value(node.args[0])
    if name in ("fliplr", "flipud"):
        dims: set[int] | None = {1 if name == "fliplr" else 0}
    elif name == "roll":
        dims = _dims(_arg(node, 2, "dims"), source.ndim)
    else:
        flip_dims = _arg(node, 1, "dims")
        if len(node.args) > 2:  # x.flip(0, 1) varargs form
            flip_dims = [_value(a) for a in node.args[1:]]
        dims = _dims(flip_dims, source.ndim)
    return "reorder along the token dim" if _hits(dims, source, symbol) else None


def _check_trailing_norm(node: fx.Node, name: str, symbol: sympy.Symbol) -> str | None:
    """layer_norm/rms_norm normalize over the last ``len(normalized_shape)`` dims."""
    source = _value(node.args[0])
    normalized = _arg(node, 1, "normalized_shape", ())
    count = len(normalized) if isinstance(normalized, (tuple, list, torch.Size)) else 1
    if _hits(set(range(source.ndim - count, source.ndim)), source, symbol):
        return "reduction over the token dim"
    return None


def _check_group_norm(node: fx.Node, name: str, symbol: sympy.Symbol) -> str | None:
    """group_norm/instance_norm reduce over every dim but the batch dim (group_norm) or 0, 1."""
    source = _value(node.args[0])
    first = 1 if name == "group_norm" else 2
    if _hits(set(range(first, source.ndim)), source, symbol):
        return "reduction over the token dim"
    return None


def _check_batch_norm(node: fx.Node, name: str, symbol: sympy.Symbol) -> str | None:
    """batch_norm with running stats is a per-channel affine map; in training it reduces."""
    source = _value(node.args[0])
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
    return _value(node.args[first]), _value(node.args[first + 1])


def _check_einsum(node: fx.Node, name: str, symbol: sympy.Symbol) -> str | None:
    """einsum: a contracted letter must not be a token dim; the output has at most one per input."""
    equation = _value(node.args[0])
    operands = _value(node.args[1]) if isinstance(node.args[1], (tuple, list)) else _value(node.args[1:])
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
    source = _value(node.args[0])
    if set(token_dims(source, symbol)) - {0}:
        return "convolution over the token dim"
    return None


def _check_cat(node: fx.Node, name: str, symbol: sympy.Symbol) -> str | None:
    """cat along the token dim puts padding rows of the first input between real rows."""
    tensors = [t for t in leaves(_value(node.args[0])) if isinstance(t, torch.Tensor)]
    dim = _arg(node, 1, "dim", node.kwargs.get("axis", 0))
    for tensor in tensors:
        if tensor.ndim and _hits(_dims(dim, tensor.ndim), tensor, symbol):
            return "cat along the token dim"
    return None


def _check_split(node: fx.Node, name: str, symbol: sympy.Symbol) -> str | None:
    """split/chunk/unbind along the token dim hand out row ranges."""
    dim_index, default = (1, 0) if name == "unbind" else (2, 0)
    source = _value(node.args[0])
    if _hits(_dims(_arg(node, dim_index, "dim", default), source.ndim), source, symbol):
        return "split along the token dim"
    return None


def _check_dim_index(node: fx.Node, name: str, symbol: sympy.Symbol) -> str | None:
    """index_select/gather/narrow/select/index_copy/scatter...: a dim argument at position 1.

    The ``index_*`` writes also count as along the token dim when their 1-D index is per token
    (``cache.index_copy_(2, positions, k)``): padding positions are 0 and would write padding
    rows into row 0. A scatter's index has the source's shape, so only its ``dim`` matters.
    """
    source, index = _value(node.args[0]), _arg(node, 2, "index")
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
    size = _shape(source)[min(dims or {0})]
    return _expr(start) == 0 and sympy.expand(_expr(length) - size) == 0


def _check_take_along_dim(node: fx.Node, name: str, symbol: sympy.Symbol) -> str | None:
    source = _value(node.args[0])
    if _hits(_dims(_arg(node, 2, "dim"), source.ndim), source, symbol):
        return "index along the token dim"
    return None


def _check_take(node: fx.Node, name: str, symbol: sympy.Symbol) -> str | None:
    """take/put/masked_scatter address the flattened tensor: every token dim is indexed."""
    if token_dims(_value(node.args[0]), symbol):
        return "index along the token dim"
    return None


def _check_index_put(node: fx.Node, name: str, symbol: sympy.Symbol) -> str | None:
    """index_put(x, (i0, i1, ...), v) indexes dims 0, 1, ... with tensors (per-token ones too)."""
    source, indices = _value(node.args[0]), _arg(node, 1, "indices", ())
    dims = {d for d, index in enumerate(indices) if index is not None}
    if _hits(dims, source, symbol) or any(token_dims(index, symbol) for index in indices):
        return "index write along the token dim"
    return None


def _check_embedding(node: fx.Node, name: str, symbol: sympy.Symbol) -> str | None:
    """embedding(ids, table) (F.) or embedding(table, ids) (torch.): the table is not per-token."""
    first, second = _value(node.args[0]), _value(node.args[1])
    table = first if first.is_floating_point() else second
    if token_dims(table, symbol):
        return "index along the token dim"
    return None


def _check_factory(node: fx.Node, name: str, symbol: sympy.Symbol) -> str | None:
    """Factories may take the token count as a size, never as a value (start, fill, steps)."""
    values = leaves(_factory_values(node, name))
    if any(isinstance(v, (torch.SymInt, torch.SymFloat)) and _varies(_expr(v), symbol) for v in values):
        return "token count used as a value"
    return None


def _factory_values(node: fx.Node, name: str) -> list[object]:
    """The arguments of a factory that become tensor values (not sizes)."""
    if name == "arange":  # arange(end) | arange(start, end, step): only end is a size
        return [_arg(node, 0, "start"), _arg(node, 2, "step")] if len(node.args) > 1 else [node.kwargs.get("start")]
    if name in ("full", "full_like", "new_full"):
        return [_arg(node, 2 if name == "new_full" else 1, "fill_value")]
    if name in ("linspace", "logspace"):  # the step count changes every value
        return [_value(a) for a in node.args[:3]] + [_value(node.kwargs.get("steps"))]
    if name in ("scalar_tensor", "tensor", "as_tensor"):
        return [_value(node.args[0]) if node.args else None]
    return []


def _check_getitem(node: fx.Node, name: str, symbol: sympy.Symbol) -> str | None:
    """``x[idx]``: safe while every token dim is taken whole (``:`` or ``:s``)."""
    source = _value(node.args[0])
    if not isinstance(source, torch.Tensor):
        return None  # tuple/list/Size indexing
    return _index_reason(source, _value(node.args[1]), symbol, scalar_value=False)


def _check_setitem(node: fx.Node, name: str, symbol: sympy.Symbol) -> str | None:
    """``x[idx] = v`` on an intermediate: safe while every token dim is written whole."""
    source, value = _value(node.args[0]), _value(node.args[2])
    scalar = not isinstance(value, torch.Tensor) or value.ndim == 0
    return _index_reason(source, _value(node.args[1]), symbol, scalar_value=scalar)


def _index_reason(source: torch.Tensor, index: object, symbol: sympy.Symbol, scalar_value: bool) -> str | None:
    """Walk a basic/advanced index over source's dims; name the first token dim it narrows."""
    entries = index if isinstance(index, tuple) else (index,)
    consumed = sum(_index_width(e) for e in entries)
    tokens, shape = set(token_dims(source, symbol)), _shape(source)
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
        start, stop, step = (None if e is None else _expr(e) for e in (entry.start, entry.stop, entry.step))
        return (start in (None, 0) and step in (None, 1)
                and (stop is None or (stop.is_number and stop >= _BIG_STOP) or sympy.expand(stop - size) == 0))
    # a boolean mask with a scalar value is an elementwise masked fill (setitem only)
    return isinstance(entry, torch.Tensor) and entry.dtype == torch.bool and scalar_value


def _check_pad(node: fx.Node, name: str, symbol: sympy.Symbol) -> str | None:
    """F.pad keeps dim order; padding a token dim changes its size (checked in _check_forms)."""
    before, after = _shape(_value(node.args[0])), _shape(node.meta.get("example_value"))
    for d in token_dims(_value(node.args[0]), symbol):
        if sympy.expand(before[d] - after[d]) != 0:
            return "pad along the token dim"
    return None


def _check_repeat(node: fx.Node, name: str, symbol: sympy.Symbol) -> str | None:
    """repeat/tile/repeat_interleave along the token dim interleave padding rows."""
    source, result = _value(node.args[0]), node.meta.get("example_value")
    if name == "repeat_interleave" and isinstance(_arg(node, 1, "repeats"), torch.Tensor):
        return "data-dependent"
    offset = result.ndim - source.ndim  # repeat may add leading dims
    for d in token_dims(source, symbol):
        if sympy.expand(_shape(source)[d] - _shape(result)[d + offset]) != 0:
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


# ---------------------------------------------------------------------------------------------
# Classification
# ---------------------------------------------------------------------------------------------


def classify(gm: fx.GraphModule, symbol: sympy.Symbol | None) -> dict[fx.Node, str]:
    """``{node: reason}`` for every node that is not row-wise along the token dim.

    Nodes absent from the result are safe inside a piece replayed at a bucket size with zero
    padding rows. Reasons start with ``"padding-unsafe: "`` and a category (attention, reduction
    over the token dim, slice/index along the token dim, in-place write into graph input,
    data-dependent, second dynamic symbol, unknown op, ...), then the op in parentheses.

    Example::

        >>> symbol = token_symbol(gm)
        >>> for node, reason in classify(gm, symbol).items():
        ...     print(node.name, reason)
        attn_output padding-unsafe: attention (scaled_dot_product_attention)
        hidden_states_31 padding-unsafe: slice along the token dim (getitem)

    Note: it reads only the graph and its fake shapes; it does not run anything. With
    ``symbol=None`` (static shapes) only attention, data-dependent ops and writes into graph
    inputs are reported.
    """
    context = _Context(symbol=symbol)
    reasons = {}
    for node in gm.graph.nodes:
        if node.op in ("call_function", "call_method", "call_module"):
            reason = _classify_node(node, context)
            if reason is not None:
                reasons[node] = reason
    return reasons


def _classify_node(node: fx.Node, context: _Context) -> str | None:
    """The first reason that applies to one call node, or None when it is row-wise."""
    name = _op_name(node)
    for check in (_check_attention, _check_data_dependent, _check_input_write, _check_other_symbols):
        reason = check(node, name, context)
        if reason is not None:
            return reason
    symbol = context.symbol
    if symbol is None or not _touches(node, symbol) or not _has_tensors(node):
        return None  # static, or sym-int arithmetic (its tensor consumers are checked)
    try:
        return _check_op(node, name, symbol) or _check_forms(node, name, symbol)
    except (AttributeError, TypeError, ValueError, IndexError, KeyError):
        # arguments in a form the handler does not know (or missing fake values): not provably safe
        return _reason("unknown op form", name)


def _check_attention(node: fx.Node, name: str, context: _Context) -> str | None:
    base = name.rstrip("_").split(".")[-1]
    custom_attention = "." in name and ("attention" in base or "attn" in base)
    if base in ATTENTION_OPS or custom_attention:
        return _reason("attention", name)
    return None


def _check_data_dependent(node: fx.Node, name: str, context: _Context) -> str | None:
    symbols = _free_symbols((node.meta.get("example_value"), _value(tuple(node.args))))
    if name in DATA_DEPENDENT_OPS or any(_is_unbacked(s) and s != context.symbol for s in symbols):
        return _reason("data-dependent", name)
    return None


def _check_input_write(node: fx.Node, name: str, context: _Context) -> str | None:
    """Writes into graph inputs (or views of them) would hit static copies, and padding rows."""
    for base in written_bases(node):
        if base.op in ("placeholder", "get_attr"):
            return _reason(f"in-place write into graph input '{_input_name(base)}'", name)
    return None


def _check_other_symbols(node: fx.Node, name: str, context: _Context) -> str | None:
    """A graph is captured for one value of every symbol but the token count."""
    symbols = _free_symbols(node.meta.get("example_value")) | _free_symbols(_value(tuple(node.args)))
    symbols |= _free_symbols(_value(tuple(node.kwargs.values())))
    others = sorted((s for s in symbols if s != context.symbol), key=str)
    if others:
        return f"{REASON_PREFIX}second dynamic symbol {others[0]} ({_symbol_source(node, others[0])}; {name})"
    return None


def _check_op(node: fx.Node, name: str, symbol: sympy.Symbol) -> str | None:
    """The op family's own rule; unknown ops (and random ones) touching tokens are unsafe."""
    functional = name
    if name.endswith("_") and not name.startswith("_") and name not in NON_WRITING_INPLACE:
        functional = name[:-1]  # in-place on an intermediate: same rows as the functional form
    if functional in RANDOM_OPS:
        return _reason("random", name)
    handler = HANDLERS.get(functional)
    if handler is None:
        return _reason("unknown op", name)
    category = handler(node, functional, symbol)
    return None if category is None else _reason(category, name)


def _check_forms(node: fx.Node, name: str, symbol: sympy.Symbol) -> str | None:
    """Every token dim in and out must be a whole number of rows; none may vanish."""
    inputs = _input_tensors(node)
    if name == "getitem" and not isinstance(_value(node.args[0]), torch.Tensor):
        inputs = []  # picking one tensor of a tuple: only the picked one (the output) matters
    outputs = [t for t in leaves(node.meta.get("example_value")) if isinstance(t, torch.Tensor)]
    for tensor in inputs + outputs:
        for d in token_dims(tensor, symbol):
            size = _shape(tensor)[d]
            if _row_coefficient(size, symbol) is None:
                return _reason(f"token dim of size {size} is not whole rows", name)
    lost = any(token_dims(t, symbol) for t in inputs) and outputs
    if lost and not any(token_dims(t, symbol) for t in outputs) and name not in FACTORY_OPS:
        return _reason("drops the token dim", name)
    return None


def _touches(node: fx.Node, symbol: sympy.Symbol) -> bool:
    """Whether the token symbol appears in the node's inputs or outputs at all."""
    values = (node.meta.get("example_value"), _value(tuple(node.args)), _value(tuple(node.kwargs.values())))
    return _mentions(values, symbol)


def _has_tensors(node: fx.Node) -> bool:
    outputs = leaves(node.meta.get("example_value"))
    return bool(_input_tensors(node)) or any(isinstance(t, torch.Tensor) for t in outputs)


def _written_args(node: fx.Node, name: str) -> list[fx.Node]:
    """The argument nodes an op writes to: ``self`` of in-place ops, ``out=``, schema writes."""
    written: list[fx.Node] = []
    if name == "setitem" or (name.endswith("_") and not name.startswith("_") and name not in NON_WRITING_INPLACE):
        written.append(node.args[0])
    elif isinstance(node.target, (torch._ops.OpOverload, torch._ops.OpOverloadPacket)):
        overload = getattr(node.target, "default", node.target)  # a packet: its default overload's schema
        schema = getattr(overload, "_schema", None)
        for arg, schema_arg in zip(node.args, schema.arguments if schema is not None else ()):
            if schema_arg.alias_info is not None and schema_arg.alias_info.is_write:
                written.append(arg)
    written.extend(a for a in leaves(node.kwargs.get("out")) if isinstance(a, fx.Node))
    return [a for a in written if isinstance(a, fx.Node)]


def written_bases(node: fx.Node) -> list[fx.Node]:
    """The nodes whose memory ``node`` writes in place: each written argument, through its views.

    ``h.view(-1).add_(x)`` writes ``h``. Used by the splitter: a write into a value that another
    piece produced (or a graph input) must run eagerly, or it would hit a static copy.
    """
    bases = []
    for target in _written_args(node, _op_name(node)):
        while target.op in ("call_function", "call_method") and _op_name(target) in ALIAS_OPS \
                and target.args and isinstance(target.args[0], fx.Node):
            target = target.args[0]
        bases.append(target)
    return bases


def _input_name(node: fx.Node) -> str:
    """A readable input name: ``L_kv_cache_`` -> ``kv_cache``."""
    name = str(node.target)
    if name[:2] in ("L_", "l_"):
        name = name[2:]
    return name[:-1] if name.endswith("_") and len(name) > 1 else name


def _symbol_source(node: fx.Node, symbol: sympy.Symbol) -> str:
    """Where Dynamo first saw a symbol (``L['past'].size()[2]``), for error messages."""
    for leaf in leaves((node.meta.get("example_value"), _value(tuple(node.args)))):
        shape_env = getattr(getattr(leaf, "fake_mode", None), "shape_env", None)
        if shape_env is None and isinstance(leaf, torch.SymInt):
            shape_env = leaf.node.shape_env
        sources = shape_env.var_to_sources.get(symbol) if shape_env is not None else None
        if sources:
            source_name = sources[0].name
            return source_name() if callable(source_name) else str(source_name)
    return "unknown source"


# ---------------------------------------------------------------------------------------------
# Verify mode
# ---------------------------------------------------------------------------------------------


def pad_inputs(gm: fx.GraphModule, args: Sequence[object], symbol: sympy.Symbol,
               bucket_size: int) -> list[object]:
    """The graph's inputs at ``bucket_size`` tokens: token dims zero-padded, token SymInts raised.

    Example::

        >>> padded = pad_inputs(gm, [7, ids], symbol, 16)   # ids [1, 7] -> [1, 16], 7 -> 16

    Note: returns new tensors only where padding was needed; other args are passed through.
    """
    placeholders = list(gm.graph.find_nodes(op="placeholder"))
    return [_pad_one(arg, node.meta.get("example_value"), symbol, bucket_size)
            for arg, node in zip(args, placeholders)]


def _pad_one(arg: object, example: object, symbol: sympy.Symbol, bucket_size: int) -> object:
    if isinstance(example, torch.SymInt) and _mentions(example, symbol):
        return int(_expr(example).subs(symbol, bucket_size))
    if not isinstance(arg, torch.Tensor):
        return arg
    sizes = list(arg.shape)
    for d in token_dims(example, symbol):
        sizes[d] = int(_shape(example)[d].subs(symbol, bucket_size))
    if sizes == list(arg.shape):
        return arg
    padded = arg.new_zeros(sizes)  # rows T..B-1 stay zero, like the runtime's static buffers
    padded[tuple(slice(0, n) for n in arg.shape)] = arg
    return padded


def first_difference(gm: fx.GraphModule, exact_args: Sequence[object], padded_args: Sequence[object],
                     symbol: sympy.Symbol, num_tokens: int, *, rtol: float = 1e-4,
                     atol: float = 1e-5) -> tuple[str, float] | None:
    """Run gm on exact-size and padded inputs in lockstep; name the first node whose real rows differ.

    Real rows: each token dim narrowed to its size at ``num_tokens`` (``64*s`` -> ``64*T``).
    Returns ``(node name, max abs difference)`` (``inf`` for a shape or NaN mismatch), or None
    when every node agrees within ``rtol``/``atol``. Used by verify mode (``TORCHPCG_VERIFY=1``).

    Example::

        >>> exact = [7, ids]
        >>> first_difference(gm, exact, pad_inputs(gm, exact, symbol, 16), symbol, 7)
        ('hidden_states_31', 2.75)

    Note: args are used as given; in-place ops in gm mutate them, so pass copies you can spare.
    Every intermediate of the exact run is compared as it is made and freed after its last use.
    """
    runs = [_Lockstep(gm, exact_args), _Lockstep(gm, padded_args)]
    last_use = _last_uses(gm)
    for node in gm.graph.nodes:
        if node.op == "output":
            break
        exact, padded = (run.step(node) for run in runs)
        difference = _real_row_difference(node, exact, padded, symbol, num_tokens, rtol, atol)
        if difference is not None:
            return node.name, difference
        for run in runs:
            run.free(last_use.get(node, ()))
    return None


class _Lockstep(fx.Interpreter):
    """An Interpreter driven one node at a time, so two runs can be compared node by node."""

    def __init__(self, gm: fx.GraphModule, args: Sequence[object]) -> None:
        super().__init__(gm, garbage_collect_values=False)
        self.args_iter = iter(args)

    def step(self, node: fx.Node) -> object:
        self.env[node] = self.run_node(node)
        return self.env[node]

    def free(self, nodes: Sequence[fx.Node]) -> None:
        for node in nodes:
            self.env.pop(node, None)


def _last_uses(gm: fx.GraphModule) -> dict[fx.Node, list[fx.Node]]:
    """node -> the inputs whose last reader it is (freed after it runs)."""
    last: dict[fx.Node, fx.Node] = {}
    for node in gm.graph.nodes:
        for used in node.all_input_nodes:
            last[used] = node
    freed: dict[fx.Node, list[fx.Node]] = {}
    for used, reader in last.items():
        freed.setdefault(reader, []).append(used)
    return freed


def _real_row_difference(node: fx.Node, exact: object, padded: object, symbol: sympy.Symbol,
                         num_tokens: int, rtol: float, atol: float) -> float | None:
    """Max abs difference of the real rows of two results of one node, or None if they match."""
    wants, gots = list(leaves(exact)), list(leaves(padded))
    examples = list(leaves(node.meta.get("example_value")))
    if len(examples) != len(wants):
        examples = [None] * len(wants)  # no fake metadata: fall back to the exact shapes
    differences = [
        _tensor_difference(want, _real_rows(got, example, symbol, num_tokens, want), rtol, atol)
        for want, got, example in zip(wants, gots, examples)
        if isinstance(want, torch.Tensor) and isinstance(got, torch.Tensor)
    ]
    differences = [d for d in differences if d is not None]
    return max(differences) if differences else None


def _real_rows(padded: torch.Tensor, example: object, symbol: sympy.Symbol, num_tokens: int,
               exact: torch.Tensor) -> torch.Tensor:
    """padded narrowed along each token dim to its size at num_tokens (else to exact's shape)."""
    if isinstance(example, torch.Tensor) and example.ndim == padded.ndim:
        sizes = {d: int(_shape(example)[d].subs(symbol, num_tokens)) for d in token_dims(example, symbol)}
    else:
        sizes = {d: exact.shape[d] for d in range(min(padded.ndim, exact.ndim))}
    for d, size in sizes.items():
        padded = padded.narrow(d, 0, min(size, padded.shape[d]))
    return padded


def _tensor_difference(want: torch.Tensor, got: torch.Tensor, rtol: float, atol: float) -> float | None:
    if want.shape != got.shape:
        return float("inf")
    if want.is_complex():
        want, got = torch.view_as_real(want), torch.view_as_real(got)
    want, got = want.detach().double(), got.detach().double()
    if not torch.equal(torch.isnan(want), torch.isnan(got)):
        return float("inf")
    want, got = want.nan_to_num(0.0), got.nan_to_num(0.0)
    if torch.allclose(got, want, rtol=rtol, atol=atol):
        return None
    return float((got - want).abs().max())
