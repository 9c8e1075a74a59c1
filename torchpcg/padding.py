"""Padding safety of a Dynamo graph: which nodes may run inside a piece replayed at a bucket size.

In: the FX GraphModule Dynamo hands a backend (fake tensors with symbolic sizes in
``node.meta["example_value"]``) and its token symbol (token_shapes.token_symbol). Out:
``{node: reason}`` for every node that is *not* row-wise along the token dim, so split.py can cut
it out and run it eagerly on the real rows; and ``written_bases``, the memory a node writes in
place. No CUDA here.

Why: a captured piece is replayed at bucket size B >= T with rows T..B-1 zero. That is only correct
when output row t of every op depends on input row t alone (and on non-token tensors such as
weights) and nothing outside the piece is written (DESIGN.md, "Correctness rules" 1).

How: checks that apply to every op come first (attention, data-dependent ops, writes into graph
inputs, a second dynamic symbol); then the op's own rule, looked up by name (padding_ops.py names
the op families, padding_rules.py holds one handler per family), and a check of the fake shapes:
every dim that carries the token symbol must be a whole number of rows (``c * s``). Anything not
in a table is unsafe. Verify mode (verify.py) checks the same thing by running the graph.
"""
from __future__ import annotations

import dataclasses

import sympy
import torch
import torch.fx as fx

from .layout import leaves
from .padding_ops import (ALIAS_OPS, ATTENTION_OPS, DATA_DEPENDENT_OPS, FACTORY_OPS, NON_WRITING_INPLACE, RANDOM_OPS,
                          op_name)
from .padding_rules import HANDLERS, input_tensors, value_of
from .token_shapes import is_unbacked, mentions, row_coefficient, shape_exprs, size_symbols, token_dims

__all__ = ["REASON_PREFIX", "classify", "written_bases"]

REASON_PREFIX = "padding-unsafe: "


@dataclasses.dataclass(frozen=True)
class _Context:
    """What every check needs besides the node: the token symbol."""

    symbol: sympy.Symbol | None


def _reason(category: str, name: str) -> str:
    return f"{REASON_PREFIX}{category} ({name})"


def classify(gm: fx.GraphModule, symbol: sympy.Symbol | None) -> dict[fx.Node, str]:
    """``{node: reason}`` for every node that is not row-wise along the token dim.

    Nodes absent from the result are safe inside a piece replayed at a bucket size with zero
    padding rows. Reasons start with ``"padding-unsafe: "`` and a category (attention, reduction
    over the token dim, slice/index along the token dim, in-place write into graph input,
    data-dependent, second dynamic symbol, unknown op, ...), then the op in parentheses.

    Example::

        >>> symbol = token_symbol(gm)   # token_shapes.token_symbol
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
    name = op_name(node)
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
    symbols = size_symbols((node.meta.get("example_value"), value_of(tuple(node.args))))
    if name in DATA_DEPENDENT_OPS or any(is_unbacked(s) and s != context.symbol for s in symbols):
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
    symbols = size_symbols(node.meta.get("example_value")) | size_symbols(value_of(tuple(node.args)))
    symbols |= size_symbols(value_of(tuple(node.kwargs.values())))
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
    inputs = input_tensors(node)
    if name == "getitem" and not isinstance(value_of(node.args[0]), torch.Tensor):
        inputs = []  # picking one tensor of a tuple: only the picked one (the output) matters
    outputs = [t for t in leaves(node.meta.get("example_value")) if isinstance(t, torch.Tensor)]
    for tensor in inputs + outputs:
        for d in token_dims(tensor, symbol):
            size = shape_exprs(tensor)[d]
            if row_coefficient(size, symbol) is None:
                return _reason(f"token dim of size {size} is not whole rows", name)
    lost = any(token_dims(t, symbol) for t in inputs) and outputs
    if lost and not any(token_dims(t, symbol) for t in outputs) and name not in FACTORY_OPS:
        return _reason("drops the token dim", name)
    return None


def _touches(node: fx.Node, symbol: sympy.Symbol) -> bool:
    """Whether the token symbol appears in the node's inputs or outputs at all."""
    values = (node.meta.get("example_value"), value_of(tuple(node.args)), value_of(tuple(node.kwargs.values())))
    return mentions(values, symbol)


def _has_tensors(node: fx.Node) -> bool:
    outputs = leaves(node.meta.get("example_value"))
    return bool(input_tensors(node)) or any(isinstance(t, torch.Tensor) for t in outputs)


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
    for target in _written_args(node, op_name(node)):
        while target.op in ("call_function", "call_method") and op_name(target) in ALIAS_OPS \
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
    for leaf in leaves((node.meta.get("example_value"), value_of(tuple(node.args)))):
        shape_env = getattr(getattr(leaf, "fake_mode", None), "shape_env", None)
        if shape_env is None and isinstance(leaf, torch.SymInt):
            shape_env = leaf.node.shape_env
        sources = shape_env.var_to_sources.get(symbol) if shape_env is not None else None
        if sources:
            source_name = sources[0].name
            return source_name() if callable(source_name) else str(source_name)
    return "unknown source"

