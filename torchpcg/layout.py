"""Symbolic layouts: a fake tensor's sizes and strides as functions of the token count.

In: example values Dynamo records on FX nodes (FakeTensors with SymInt sizes, SymInts).
Out: ``Layout`` objects that give concrete sizes/strides at any token count (a bucket B or the
real T), and helpers to find symbols. No CUDA here.
"""
from __future__ import annotations

import dataclasses
import functools
from collections.abc import Iterator, Sequence
from typing import Any

import sympy
import torch

__all__ = ["Layout", "expr_of", "symbols_of", "evaluate", "leaves", "token_source", "tokens_at"]


def leaves(value: object) -> Iterator[object]:
    """Tensors, sym numbers and other leaves inside nested tuples/lists/dicts/slices (FX args, example values)."""
    if isinstance(value, (tuple, list)) and not isinstance(value, torch.Size):
        for item in value:
            yield from leaves(item)
    elif isinstance(value, dict):
        for item in value.values():
            yield from leaves(item)
    elif isinstance(value, slice):
        yield from leaves((value.start, value.stop, value.step))
    else:
        yield value


def expr_of(value: Any) -> sympy.Expr | int:
    """The sympy expression behind a SymInt (or the int itself)."""
    if isinstance(value, torch.SymInt):
        return value.node.expr
    return int(value)


def symbols_of(value: Any) -> set[sympy.Symbol]:
    """Free symbols in a SymInt, a fake tensor's sizes and strides, or a tuple of those."""
    if isinstance(value, (tuple, list)):
        return set().union(*(symbols_of(v) for v in value)) if value else set()
    if isinstance(value, torch.Tensor):
        return symbols_of(tuple(value.size()) + tuple(value.stride()))
    if isinstance(value, torch.SymInt):
        return set(value.node.expr.free_symbols)
    return set()


def token_source(values: Sequence[Any], symbol: sympy.Symbol | None) -> tuple[int, int | None] | None:
    """(index, dim) of the first tensor in ``values`` with a dim of size T itself, else (index,
    None) of a SymInt that is T; None when no value carries T (or there is no symbol)."""
    if symbol is None:
        return None
    for index, value in enumerate(values):
        if isinstance(value, torch.Tensor):
            for dim, size in enumerate(value.size()):
                if expr_of(size) == symbol:
                    return index, dim
    for index, value in enumerate(values):
        if isinstance(value, torch.SymInt) and expr_of(value) == symbol:
            return index, None
    return None


def tokens_at(args: Sequence[Any], source: tuple[int, int | None]) -> int:
    """T of a call, read where ``token_source`` found it: a dim of a tensor, or a SymInt input."""
    index, dim = source
    return int(args[index]) if dim is None else args[index].size(dim)


@functools.lru_cache(maxsize=65536)
def evaluate(expr: sympy.Expr | int, symbol: sympy.Symbol, num_tokens: int) -> int:
    """``expr`` with the token symbol set to ``num_tokens`` (cached: few exprs, few sizes)."""
    if isinstance(expr, int):
        return expr
    return int(expr.subs(symbol, num_tokens))


@dataclasses.dataclass(frozen=True)
class Layout:
    """Sizes and strides of a token-dim tensor as expressions of the token symbol."""

    sizes: tuple[sympy.Expr | int, ...]
    strides: tuple[sympy.Expr | int, ...]
    dtype: torch.dtype
    device: torch.device
    token_dims: tuple[int, ...]  # dims whose size depends on the token symbol
    symbol: sympy.Symbol

    @classmethod
    def of(cls, fake: torch.Tensor, symbol: sympy.Symbol) -> Layout:
        sizes = tuple(expr_of(s) for s in fake.size())
        strides = tuple(expr_of(s) for s in fake.stride())
        dims = tuple(d for d, e in enumerate(sizes) if not isinstance(e, int) and symbol in e.free_symbols)
        return cls(sizes, strides, fake.dtype, fake.device, dims, symbol)

    def sizes_at(self, num_tokens: int) -> tuple[int, ...]:
        return tuple(evaluate(e, self.symbol, num_tokens) for e in self.sizes)

    def strides_at(self, num_tokens: int) -> tuple[int, ...]:
        return tuple(evaluate(e, self.symbol, num_tokens) for e in self.strides)

    def storage_numel_at(self, num_tokens: int) -> int:
        sizes = self.sizes_at(num_tokens)
        if 0 in sizes:
            return 0
        return 1 + sum((n - 1) * s for n, s in zip(sizes, self.strides_at(num_tokens)))

    def real_rows(self, tensor: torch.Tensor, num_tokens: int) -> torch.Tensor:
        """Narrow every token dim of a bucket-sized ``tensor`` to its extent at ``num_tokens``."""
        for dim in self.token_dims:
            tensor = tensor.narrow(dim, 0, evaluate(self.sizes[dim], self.symbol, num_tokens))
        return tensor
