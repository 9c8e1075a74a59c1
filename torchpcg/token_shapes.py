"""Where the token count lives in a Dynamo graph's shapes: the token symbol and the token dims.

In: the FX GraphModule Dynamo hands a backend, with a fake tensor (symbolic sizes) in
``node.meta["example_value"]`` of every node, and such fake values. Out: the token-count symbol
of the graph (``token_symbol``), the dims of a value that grow with it (``token_dims``) and the
sympy helpers the padding rules, the classification and verify mode read sizes with (whole rows
``c * s``, sizes that vary with the token count, reshapes that keep rows together). No CUDA here.

Why: padding a piece to a bucket B >= T changes exactly the dims whose size is an expression of
the token symbol; every padding decision starts by finding them. Sizes are sympy expressions
(``s27``, ``64*s27``, ``Max(1, u0)`` for unbacked symbols), compared symbolically where they are
plainly ``c * s`` and at sampled token counts otherwise.
"""
from __future__ import annotations

import functools
from collections.abc import Sequence

import sympy
import torch
import torch.fx as fx
from torch.utils._sympy.symbol import SymT, symbol_is_type

from .layout import leaves

__all__ = [
    "token_symbol",
    "token_dims",
    "size_expr",
    "size_symbols",
    "shape_exprs",
    "is_unbacked",
    "row_coefficient",
    "varies",
    "mentions",
    "keeps_rows",
]


def size_expr(size: object) -> sympy.Expr:
    """The sympy expression of a size (SymInt/SymFloat/SymBool or plain number)."""
    if isinstance(size, (torch.SymInt, torch.SymFloat, torch.SymBool)):
        return size.node.expr
    return sympy.sympify(size)


def size_symbols(value: object) -> set[sympy.Symbol]:
    """Every sympy symbol in the sizes of the tensors (and in the sym numbers) inside value."""
    symbols: set[sympy.Symbol] = set()
    for leaf in leaves(value):
        if isinstance(leaf, torch.Tensor):
            for size in leaf.shape:
                symbols |= size_expr(size).free_symbols
        elif isinstance(leaf, torch.Size):
            for size in leaf:
                symbols |= size_expr(size).free_symbols
        elif isinstance(leaf, (torch.SymInt, torch.SymFloat, torch.SymBool)):
            symbols |= size_expr(leaf).free_symbols
    return symbols


def is_unbacked(symbol: sympy.Symbol) -> bool:
    """Whether a symbol is data-dependent (``u0``: ``mark_unbacked`` or a size read from data)."""
    return symbol_is_type(symbol, (SymT.UNBACKED_INT, SymT.UNBACKED_FLOAT))


# Token counts at which size expressions are compared when they are not plainly ``c * s``;
# unbacked sizes read like ``Max(1, u0)`` or ``Max(0, u0 - Max(0, u0 - 1))`` (= 1 for u0 >= 1).
_SAMPLE_TOKENS = (1, 2, 3, 5, 8, 13, 64, 1000, 4099)


def row_coefficient(expr: sympy.Expr, symbol: sympy.Symbol) -> int | None:
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
    if symbol in expr.free_symbols and not varies(expr, symbol):
        return sympy.Integer(_sampled(expr, symbol)[0])
    return expr


def varies(expr: sympy.Expr, symbol: sympy.Symbol) -> bool:
    """Whether a size changes with the token count (``Max(0, u0 - Max(0, u0 - 1))`` does not)."""
    if symbol not in expr.free_symbols:
        return False
    values = _sampled(expr, symbol)
    return values is None or len(set(values)) > 1


def shape_exprs(value: object) -> tuple[sympy.Expr, ...]:
    """The sympy expression of each size of a (fake) tensor; () for non-tensors."""
    return tuple(size_expr(size) for size in value.shape) if isinstance(value, torch.Tensor) else ()


def mentions(expr_or_value: object, symbol: sympy.Symbol) -> bool:
    """Whether symbol appears in the sizes (or sym numbers) inside a value."""
    return symbol in size_symbols(expr_or_value)


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
        for symbol in sorted(size_symbols(value), key=str):
            anywhere[symbol] = anywhere.get(symbol, 0) + 1
        if isinstance(value, torch.Tensor):
            for symbol in sorted({e for e in shape_exprs(value) if isinstance(e, sympy.Symbol)}, key=str):
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
    return tuple(d for d, e in enumerate(shape_exprs(value)) if varies(e, symbol))


def keeps_rows(before: Sequence[sympy.Expr], after: Sequence[sympy.Expr], symbol: sympy.Symbol) -> bool:
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

