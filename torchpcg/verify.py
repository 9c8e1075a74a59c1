"""Verify mode: run a graph at the exact size and padded to a bucket, name the first node that differs.

In: a Dynamo GraphModule, its exact-size inputs, the token symbol and a bucket size. Out: the
inputs padded to the bucket (``pad_inputs``: token dims zero-padded, token SymInts raised) and
``first_difference``: the first node whose real rows differ between the two runs, with the max
abs difference, or None. Under ``TORCHPCG_VERIFY=1`` the runtime calls it for a piece the first
time it captures it at a bucket (a difference raises ``PaddingError``). Runs the graph on the
device of its inputs; captures nothing.

Why: padding.py decides padding safety from op tables and fake shapes; an op it gets wrong would
give silently wrong rows. Running both sizes side by side and comparing every node's real rows
checks that decision on the model itself and names the node to fix (DESIGN.md, "Correctness
rules" 1 and 5).
"""
from __future__ import annotations

from collections.abc import Sequence

import sympy
import torch
import torch.fx as fx

from .layout import leaves
from .token_shapes import mentions, shape_exprs, size_expr, token_dims

__all__ = ["pad_inputs", "first_difference"]


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
    if isinstance(example, torch.SymInt) and mentions(example, symbol):
        return int(size_expr(example).subs(symbol, bucket_size))
    if not isinstance(arg, torch.Tensor):
        return arg
    sizes = list(arg.shape)
    for d in token_dims(example, symbol):
        sizes[d] = int(shape_exprs(example)[d].subs(symbol, bucket_size))
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
        sizes = {d: int(shape_exprs(example)[d].subs(symbol, num_tokens)) for d in token_dims(example, symbol)}
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
