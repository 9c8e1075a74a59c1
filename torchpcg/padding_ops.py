"""Op tables for padding safety: what each op does to the token dim, by name.

In: an FX node of a Dynamo graph (``op_name`` gives its op a torch-style name: ``add``,
``index_copy_``, ``mylib.foo``). Out: the op families below, frozensets of such names (pointwise,
reductions, scans, matmuls, factories, ops that alias their input, ...), which the rules in
padding_rules.py and the classification in padding.py look names up in. No CUDA here.

Why: whether an op may run padded depends on what it does along a dim, and ops that do the same
thing share one rule. Naming every op once, by family, keeps that knowledge in one table; an op
in no table is unknown and therefore unsafe (DESIGN.md, "Correctness rules" 1).

Names are Tensor-method / torch-function names; in-place variants (``add_``) are checked for
writes into graph inputs first and then looked up without the trailing underscore. This is
padding's registry only; split.py keeps the split ops (attention, collectives, user ops).
"""
from __future__ import annotations

import operator
from collections.abc import Callable
from typing import Any

import torch
import torch.fx as fx

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


def op_name(node: fx.Node) -> str:
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

