"""Token-dim analysis (torchpcg/padding.py, token_shapes.py) and verify mode (verify.py) on real
Dynamo graphs: one tiny model per pattern.

Graphs are captured with a backend that only records them; the token dim is marked dynamic, so
each graph has one token symbol. Unsafe patterns must be flagged with the right category; models
made only of row-wise ops must get no reasons at all (every reason costs a cut).
"""
from __future__ import annotations

import functools
import inspect
from collections.abc import Callable, Sequence

import pytest
import torch
import torch.nn.functional as F
from torch import fx

from torchpcg import padding, token_shapes, verify

HIDDEN = 16
NUM_TOKENS = 7
BUCKET_SIZE = 16


@torch.library.custom_op("torchpcg_test::mix_rows", mutates_args=())
def _mix_rows(x: torch.Tensor) -> torch.Tensor:
    """A custom op the tables do not know (it happens to mix rows: x + x.flip(0))."""
    return x + x.flip(0)


@_mix_rows.register_fake
def _(x: torch.Tensor) -> torch.Tensor:
    return torch.empty_like(x)


def capture_with_inputs(fn: Callable[..., object], *args: torch.Tensor, token_dims: Sequence[int | None] = (),
                        config: dict[str, object] | None = None) -> tuple[fx.GraphModule, list[object]]:
    """The single Dynamo graph of fn(*args) and its real inputs (token count, tensors, params).

    The token dim of ``args[i]`` is ``token_dims[i]`` (None: static), marked dynamic.
    """
    graphs: list[tuple[fx.GraphModule, list[object]]] = []

    def grab(gm: fx.GraphModule, example_inputs: list[object]) -> Callable[..., object]:
        graphs.append((gm, example_inputs))
        return gm.forward

    torch._dynamo.reset()
    for arg, dim in zip(args, token_dims):
        if dim is not None:
            torch._dynamo.mark_dynamic(arg, dim)
    with torch._dynamo.config.patch(**(config or {})), torch.no_grad():
        torch.compile(fn, backend=grab, fullgraph=True)(*args)
    assert len(graphs) == 1
    gm, example_inputs = graphs[0]
    return gm, [concrete(a) for a in example_inputs]


def concrete(value: object) -> object:
    """A real graph input for an example input: SymInts become their value (every test uses
    NUM_TOKENS tokens; an unbacked token count has no hint)."""
    if not isinstance(value, torch.SymInt):
        return value
    return value.node.hint if value.node.hint is not None else NUM_TOKENS


def capture(fn: Callable[..., object], *args: torch.Tensor, token_dims: Sequence[int | None] = (),
            config: dict[str, object] | None = None) -> fx.GraphModule:
    """The single Dynamo graph of fn(*args) (see capture_with_inputs)."""
    return capture_with_inputs(fn, *args, token_dims=token_dims, config=config)[0]


def reasons_of(gm: fx.GraphModule) -> dict[str, str]:
    """{node name: reason} of the graph's flagged nodes."""
    symbol = token_shapes.token_symbol(gm)
    assert symbol is not None
    return {node.name: reason for node, reason in padding.classify(gm, symbol).items()}


def hidden(num_tokens: int = NUM_TOKENS) -> torch.Tensor:
    return torch.randn(1, num_tokens, HIDDEN)


def assert_flagged(gm: fx.GraphModule, category: str, op: str) -> None:
    """Exactly the expected kind of reason is present (and every reason is padding-unsafe)."""
    reasons = reasons_of(gm)
    assert all(r.startswith(padding.REASON_PREFIX) for r in reasons.values()), reasons
    expected = f"{padding.REASON_PREFIX}{category}"
    assert any(r.startswith(expected) and f"({op}" in r for r in reasons.values()), reasons


# ---------------------------------------------------------------------------------------------
# Unsafe patterns: one model each
# ---------------------------------------------------------------------------------------------

UNSAFE_CASES: dict[str, tuple[Callable[..., object], str, str]] = {
    "last token x[:, -1]": (lambda x: x[:, -1] * 2, "index along the token dim", "getitem"),
    "last k x[-k:]": (lambda x: x[0][-3:] + 1, "slice along the token dim", "getitem"),
    "skip first x[:, 1:]": (lambda x: x[:, 1:].relu(), "slice along the token dim", "getitem"),
    "sum over tokens": (lambda x: x.sum(dim=1), "reduction over the token dim", "sum"),
    "mean over tokens": (lambda x: x - x.mean(1, keepdim=True), "reduction over the token dim", "mean"),
    "mean over all": (lambda x: x.mean(), "reduction over the token dim", "mean"),
    "max over tokens": (lambda x: torch.max(x, dim=1).values, "reduction over the token dim", "max"),
    "cumsum over tokens": (lambda x: x.cumsum(1), "scan over the token dim", "cumsum"),
    "softmax over tokens": (lambda x: F.softmax(x, dim=1), "softmax over the token dim", "softmax"),
    "sort over tokens": (lambda x: x.sort(dim=1).values, "sort/top-k over the token dim", "sort"),
    "topk over tokens": (lambda x: torch.topk(x, 2, dim=1).indices, "sort/top-k over the token dim", "topk"),
    "argmax over tokens": (lambda x: x.argmax(1), "reduction over the token dim", "argmax"),
    "flip tokens": (lambda x: x.flip(1), "reorder along the token dim", "flip"),
    "cat along tokens": (lambda x: torch.cat([x, x], dim=1), "cat along the token dim", "cat"),
    "index_select tokens": (lambda x: x.index_select(1, torch.tensor([0])),
                            "index along the token dim", "index_select"),
    "token count as value": (lambda x: x / x.shape[1], "token count used as a value", "div"),
    "layer_norm over tokens": (lambda x: F.layer_norm(x, x.shape[1:]), "reduction over the token dim", "layer_norm"),
    "conv over tokens": (
        lambda x: F.conv1d(x.transpose(1, 2), torch.ones(HIDDEN, HIDDEN, 3), padding=1),
        "convolution over the token dim", "conv1d"),
    "unknown custom op": (lambda x: torch.ops.torchpcg_test.mix_rows(x[0]), "unknown op", "torchpcg_test.mix_rows"),
    "unknown torch op": (lambda x: x.unfold(1, 2, 1), "unknown op", "unfold"),
    "tensor index": (lambda x: x[:, torch.tensor([0, 1])], "index along the token dim", "getitem"),
    "gather tokens": (lambda x: x.gather(1, torch.zeros(1, 2, HIDDEN, dtype=torch.long)),
                      "index along the token dim", "gather"),
    "narrow tokens": (lambda x: x.narrow(1, 0, 2), "slice along the token dim", "narrow"),
    "select token": (lambda x: x.select(1, 0), "index along the token dim", "select"),
    "repeat tokens": (lambda x: x.repeat(1, 2, 1), "repeat along the token dim", "repeat"),
    "roll tokens": (lambda x: x.roll(1, dims=1), "reorder along the token dim", "roll"),
    "reversed positions": (lambda x: torch.arange(x.shape[1] - 1, -1, -1), "token count used as a value", "arange"),
    "normalize default dim 1": (lambda x: F.normalize(x), "reduction over the token dim", "normalize"),
    "pad tokens": (lambda x: F.pad(x, (0, 0, 0, 3)), "pad along the token dim", "pad"),
    "flatten batch 2": (lambda x: x.expand(2, -1, -1).reshape(-1, HIDDEN), "reshape mixes the token dim", "reshape"),
    "split tokens": (lambda x: x.split(2, dim=1)[0], "split along the token dim", "split"),
    "chunk tokens": (lambda x: x.chunk(2, dim=1)[0], "split along the token dim", "chunk"),
    "diff": (lambda x: torch.diff(x, dim=1), "scan over the token dim", "diff"),
    "clamp by token count": (lambda x: x.clamp(max=x.shape[1]), "token count used as a value", "clamp"),
    "var of all": (lambda x: x.var(), "reduction over the token dim", "var"),
    "outer of tokens": (lambda x: torch.outer(x[0, :, 0], x[0, :, 1]), "token x token matmul", "outer"),
    "randn_like": (lambda x: torch.randn_like(x), "random", "randn_like"),
    "dropout training": (lambda x: F.dropout(x, 0.5, training=True), "random", "dropout"),
    "scatter tokens": (lambda x: x.scatter(1, torch.zeros(1, 1, HIDDEN, dtype=torch.long), 1.0),
                       "index write along the token dim", "scatter"),
    "index_fill per token": (lambda x: x.index_fill(-1, torch.arange(x.shape[1]) % 4, 0.0),
                             "index write along the token dim", "index_fill"),
}


@pytest.mark.parametrize("case", sorted(UNSAFE_CASES))
def test_unsafe_pattern_is_flagged(case: str) -> None:
    fn, category, op = UNSAFE_CASES[case]
    assert_flagged(capture(fn, hidden(), token_dims=[1]), category, op)


def test_attention_scores_are_flagged() -> None:
    """q @ k^T makes a [s, s] score matrix; p @ v contracts over the tokens; sdpa is attention."""

    def attention(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        q, k, v = x, x * 2, x * 3  # one token count for queries and keys
        scores = q @ k.transpose(-1, -2)  # [1, s, s]
        manual = scores.softmax(-1) @ v  # softmax over the key tokens, then contract them
        return manual, F.scaled_dot_product_attention(q, k, v, is_causal=True)

    gm = capture(attention, hidden(), token_dims=[1])
    reasons = sorted(reasons_of(gm).values())
    assert reasons == sorted([
        "padding-unsafe: token x token matmul (matmul)",
        "padding-unsafe: softmax over the token dim (softmax)",
        "padding-unsafe: matmul contracting over the token dim (matmul)",
        "padding-unsafe: attention (scaled_dot_product_attention)",
    ])


def test_einsum_over_tokens_is_flagged() -> None:
    gm = capture(lambda x: torch.einsum("bsh,bth->bst", x, x.sin()), hidden(), token_dims=[1])
    assert_flagged(gm, "token x token matmul", "einsum")
    gm = capture(lambda x: torch.einsum("bsh,bsk->bhk", x, x.cos()), hidden(), token_dims=[1])
    assert_flagged(gm, "matmul contracting over the token dim", "einsum")
    assert reasons_of(capture(lambda x: torch.einsum("...h,hk->...k", x, torch.ones(HIDDEN, 3)),
                              hidden(), token_dims=[1])) == {}


CACHE_WRITES: dict[str, Callable[[torch.Tensor, torch.Tensor, torch.Tensor], object]] = {
    "index_copy_": lambda cache, x, pos: cache.index_copy_(1, pos, x),
    "index_put_": lambda cache, x, pos: cache.index_put_((torch.zeros_like(pos), pos), x[0]),
    "copy_": lambda cache, x, pos: cache[:, :4].copy_(x[:, :4]),
    "setitem": lambda cache, x, pos: cache.__setitem__((slice(None), pos), x),
    "add_": lambda cache, x, pos: cache.add_(1.0),
}


@pytest.mark.parametrize("op", sorted(CACHE_WRITES))
def test_write_into_input_cache_is_flagged(op: str) -> None:
    """Writes into a graph input (a KV cache here) must run eagerly on the real rows."""
    write = CACHE_WRITES[op]

    def step(cache: torch.Tensor, x: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        write(cache, x * 2, pos)
        return x + 1

    gm = capture(step, torch.zeros(1, 32, HIDDEN), hidden(), torch.arange(NUM_TOKENS), token_dims=[None, 1, 0])
    assert_flagged(gm, "in-place write into graph input 'cache'", op)


def test_row_wise_in_place_on_intermediate_is_safe() -> None:
    def fn(x: torch.Tensor) -> torch.Tensor:
        y = x * 2
        y += 1  # operator.iadd on an intermediate
        y[..., :4] = 0.0  # setitem along hidden, every token row whole
        return y.mul_(3)

    assert reasons_of(capture(fn, hidden(), token_dims=[1])) == {}


def test_setitem_along_tokens_on_intermediate_is_flagged() -> None:
    def fn(x: torch.Tensor) -> torch.Tensor:
        y = x.clone()
        y[:, 0] = 0.0
        return y

    assert_flagged(capture(fn, hidden(), token_dims=[1]), "index along the token dim", "setitem")


def test_nonzero_is_data_dependent() -> None:
    gm = capture(lambda x: torch.nonzero(x > 0), hidden(), token_dims=[1],
                 config={"capture_dynamic_output_shape_ops": True})
    assert_flagged(gm, "data-dependent", "nonzero")


def test_second_dynamic_symbol_is_flagged() -> None:
    """A KV length that is not the token count: anything shaped by it cannot be captured once."""

    def fn(x: torch.Tensor, past: torch.Tensor) -> torch.Tensor:
        return x * 2 + past.sum()

    gm = capture(fn, hidden(), torch.randn(1, 11, HIDDEN), token_dims=[1, 1])
    symbol = token_shapes.token_symbol(gm)
    reasons = [r for r in padding.classify(gm, symbol).values()]
    assert reasons and all(r.startswith("padding-unsafe: second dynamic symbol s") for r in reasons)
    assert any("L['past'].size()[1]" in r for r in reasons), reasons


# ---------------------------------------------------------------------------------------------
# Row-wise models: zero reasons
# ---------------------------------------------------------------------------------------------


class RowWiseBlock(torch.nn.Module):
    """Embedding, RMSNorm, rotary with positions, heads reshape/transpose, gated MLP, casts."""

    def __init__(self, vocab: int = 32, heads: int = 4, max_positions: int = 64) -> None:
        super().__init__()
        self.embed = torch.nn.Embedding(vocab, HIDDEN)
        self.norm_weight = torch.nn.Parameter(torch.ones(HIDDEN))
        self.qkv = torch.nn.Linear(HIDDEN, 3 * HIDDEN)
        self.gate_up = torch.nn.Linear(HIDDEN, 4 * HIDDEN)
        self.down = torch.nn.Linear(2 * HIDDEN, HIDDEN)
        self.router = torch.nn.Linear(HIDDEN, 4)
        self.heads = heads
        angles = torch.outer(torch.arange(max_positions).float(), torch.ones(HIDDEN // heads // 2))
        self.register_buffer("cos_cached", angles.cos())
        self.register_buffer("sin_cached", angles.sin())

    def rms_norm(self, x: torch.Tensor) -> torch.Tensor:
        variance = x.float().pow(2).mean(-1, keepdim=True)  # [1, s, 1]
        return self.norm_weight * (x * torch.rsqrt(variance + 1e-6)).to(x.dtype)

    def rotary(self, x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        cos, sin = self.cos_cached[positions], self.sin_cached[positions]  # [s, D/2] table lookups
        cos, sin = torch.cat([cos, cos], -1)[None, None], torch.cat([sin, sin], -1)[None, None]
        half = x.shape[-1] // 2
        rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
        return x * cos + rotated * sin

    def forward(self, ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        x = self.embed(ids)  # [1, s, H]
        h = self.rms_norm(x)
        q, k, v = self.qkv(h).chunk(3, dim=-1)
        batch, tokens, _ = q.shape
        q = q.view(batch, tokens, self.heads, -1).transpose(1, 2)  # [1, heads, s, D]
        q = self.rotary(q, positions)
        k = self.rotary(k.reshape(batch, tokens, self.heads, -1).transpose(1, 2), positions)
        mixed = (q * k).transpose(1, 2).reshape(batch, tokens, -1) + v  # heads back into hidden
        gate, up = self.gate_up(self.rms_norm(mixed)).split(2 * HIDDEN, dim=-1)
        out = x + self.down(F.silu(gate) * up)
        weights, experts = self.router(out).softmax(-1).topk(2, dim=-1)  # MoE routing: per token
        out = out * weights.sum(-1, keepdim=True) + experts.float().mean(-1, keepdim=True)
        flat = out.flatten()  # [s*H]: each token row stays one block
        return torch.cat([flat.view(batch, tokens, HIDDEN), out.bfloat16().float()], dim=-1)


def test_row_wise_block_gets_no_reasons() -> None:
    ids, positions = torch.randint(0, 32, (1, NUM_TOKENS)), torch.arange(NUM_TOKENS)
    gm = capture(RowWiseBlock().eval(), ids, positions, token_dims=[1, 0])
    assert reasons_of(gm) == {}


def causal_mask(x: torch.Tensor, cache_position: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The Hugging Face (4.4x) causal mask built from cache_position, applied to x."""
    sequence_length = target_length = x.shape[1]
    min_value = torch.finfo(x.dtype).min
    mask = torch.full((sequence_length, target_length), fill_value=min_value, dtype=x.dtype)
    mask = torch.triu(mask, diagonal=1)
    mask *= torch.arange(target_length) > cache_position.reshape(-1, 1)
    mask = mask[None, None, :, :].expand(x.shape[0], 1, -1, -1)
    mask = mask.clone()
    padding_mask = mask[:, :, :, :target_length] == 0
    mask[:, :, :, :target_length] = mask[:, :, :, :target_length].masked_fill(padding_mask, min_value)
    return x[:, None] * 2, mask + mask.new_zeros(1)


def test_hf_causal_mask_creation_gets_no_reasons() -> None:
    gm = capture(causal_mask, hidden(), torch.arange(NUM_TOKENS), token_dims=[1, 0])
    assert reasons_of(gm) == {}


ROW_WISE_SNIPPETS: dict[str, Callable[[torch.Tensor], object]] = {
    "mlp": lambda x: F.linear(F.gelu(F.linear(x, torch.ones(32, HIDDEN))), torch.ones(HIDDEN, 32)),
    "layer_norm": lambda x: F.layer_norm(x, (HIDDEN,)),
    "softmax over hidden": lambda x: F.softmax(x, dim=-1),
    "cat along hidden": lambda x: torch.cat([x, x.sigmoid()], dim=2),
    "float and back": lambda x: x.half().float(),
    "stack at front": lambda x: torch.stack([x, x]).sum(0),
    "unbind hidden": lambda x: torch.unbind(x.view(1, -1, 2, HIDDEN // 2), 2)[0],
    "full token slice": lambda x: x[:, : x.shape[1]] + x[:, :],
    "last hidden feature": lambda x: x[:, :, -1],
    "bmm per token": lambda x: torch.bmm(x.transpose(0, 1), torch.ones(1, HIDDEN, 3).expand(x.shape[1], -1, -1)),
    "pad hidden": lambda x: F.pad(x, (0, 2)),
    "arange positions": lambda x: x + torch.arange(x.shape[1])[None, :, None],
    "dropout eval": lambda x: F.dropout(x, 0.1, training=False),
    "where mask": lambda x: torch.where(x > 0, x, torch.zeros_like(x)),
    "transpose reshape": lambda x: x.transpose(0, 1).reshape(x.shape[1], -1),
    "scatter per token": lambda x: x.scatter(-1, torch.zeros(x.shape[:-1] + (2,), dtype=torch.long), 1.0),
    "gather per token": lambda x: x.gather(-1, torch.zeros(x.shape[:-1] + (2,), dtype=torch.long)),
    "masked_fill": lambda x: x.masked_fill(x > 0, 0),
    "max over hidden": lambda x: x.max(-1).values + x.amax(-1) + x.norm(dim=-1),
    "normalize hidden": lambda x: F.normalize(x, dim=-1) + F.rms_norm(x, (HIDDEN,)),
    "unflatten hidden": lambda x: x.unflatten(-1, (4, 4)),
    "narrow hidden": lambda x: x.narrow(-1, 0, 4) + x.narrow(1, 0, x.shape[1])[..., :4],
    "select hidden": lambda x: x.select(-1, 0),
    "split sizes": lambda x: x.split([4, 12], dim=-1)[1],
    "expand batch": lambda x: x.expand(2, -1, -1),
    "repeat hidden": lambda x: x.repeat(1, 1, 2) + x.repeat_interleave(2, dim=-1),
    "roll hidden": lambda x: x.roll(1, dims=-1),
    "like factories": lambda x: torch.full_like(x, 2) + torch.zeros_like(x),
    "new_zeros sized": lambda x: x.new_zeros(x.shape[1], 3),
    "positions from 1": lambda x: torch.arange(1, x.shape[1] + 1),
    "matmul weight": lambda x: x @ torch.ones(HIDDEN, 3) + torch.matmul(x, torch.ones(HIDDEN, 3)),
    "baddbmm": lambda x: torch.baddbmm(torch.zeros(1, 1, 3), x, torch.ones(1, HIDDEN, 3)),
    "cumsum hidden": lambda x: x.cumsum(-1),
    "sort and topk hidden": lambda x: torch.sort(x, dim=-1).values + x.topk(2).values.sum(-1, keepdim=True),
    "softmax float": lambda x: F.softmax(x, -1, dtype=torch.float32).to(x.dtype),
    "flatten batch 1": lambda x: x.flatten(0, 1),
    "interleave features": lambda x: x.unsqueeze(-1).expand(-1, -1, -1, 2).reshape(1, x.shape[1], 2 * HIDDEN),
    "2d transposes": lambda x: x[0].T.sin() + x[0].mT.cos(),
    "heads into batch": lambda x: x.view(1, x.shape[1], 2, 8).permute(0, 2, 1, 3).contiguous().view(2, x.shape[1], 8),
    "std_mean hidden": lambda x: torch.std_mean(x, dim=-1)[0] + (x > 0).any(-1),
    "fill_ and zero_": lambda x: x.clone().fill_(3.0) + x.clone().zero_(),
    "stack last": lambda x: torch.stack([x, x], -1).flatten(-2),
}


@pytest.mark.parametrize("case", sorted(ROW_WISE_SNIPPETS))
def test_row_wise_snippet_gets_no_reasons(case: str) -> None:
    assert reasons_of(capture(ROW_WISE_SNIPPETS[case], hidden(), token_dims=[1])) == {}


# ---------------------------------------------------------------------------------------------
# token_symbol / token_dims
# ---------------------------------------------------------------------------------------------


def test_token_symbol_is_the_most_common_whole_dim() -> None:
    def fn(x: torch.Tensor, positions: torch.Tensor, past: torch.Tensor) -> torch.Tensor:
        return x + positions[None, :, None] + past.mean()

    gm = capture(fn, hidden(), torch.arange(NUM_TOKENS), torch.randn(11, 2), token_dims=[1, 0, 0])
    placeholders = {n.name: n.meta["example_value"] for n in gm.graph.find_nodes(op="placeholder")}
    symbol = token_shapes.token_symbol(gm)
    assert token_shapes.token_dims(placeholders["l_x_"], symbol) == (1,)
    assert token_shapes.token_dims(placeholders["l_positions_"], symbol) == (0,)
    assert token_shapes.token_dims(placeholders["l_past_"], symbol) == ()


def test_token_symbol_none_without_dynamic_dims() -> None:
    graphs: list[fx.GraphModule] = []
    torch.compile(lambda x: x + 1, backend=lambda gm, _: graphs.append(gm) or gm.forward,
                  dynamic=False, fullgraph=True)(hidden())
    assert token_shapes.token_symbol(graphs[0]) is None


def test_token_symbol_with_dynamic_true() -> None:
    graphs: list[fx.GraphModule] = []
    torch.compile(lambda ids: ids * 2, backend=lambda gm, _: graphs.append(gm) or gm.forward,
                  dynamic=True, fullgraph=True)(torch.arange(NUM_TOKENS))
    symbol = token_shapes.token_symbol(graphs[0])
    assert symbol is not None and padding.classify(graphs[0], symbol) == {}


def mark_unbacked(tensor: torch.Tensor, dim: int) -> None:
    """What torchpcg.compile does to token dims: unbacked, one shared symbol where supported."""
    mark = torch._dynamo.decorators.mark_unbacked
    if "shape_id" in inspect.signature(mark).parameters:
        mark(tensor, dim, shape_id="torchpcg_test_tokens")
    else:
        mark(tensor, dim)


def test_unbacked_token_dim() -> None:
    """torchpcg.compile marks token dims unbacked (u0): the analysis treats u0 like s0."""
    ids, positions = torch.randint(0, 32, (1, NUM_TOKENS)), torch.arange(NUM_TOKENS)
    mark_unbacked(ids, 1)
    mark_unbacked(positions, 0)
    gm, args = capture_with_inputs(RowWiseBlock().eval(), ids, positions)
    symbol = token_shapes.token_symbol(gm)
    assert str(symbol).startswith("u") and padding.classify(gm, symbol) == {}
    assert first_difference_at_bucket(gm, args) is None
    x = hidden()
    mark_unbacked(x, 1)
    gm, args = capture_with_inputs(lambda x: x[:, -1:] * 3, x)
    assert list(reasons_of(gm).values()) == ["padding-unsafe: slice along the token dim (getitem)"]
    assert first_difference_at_bucket(gm, args)[0] == "getitem"


def test_token_dims_follow_views() -> None:
    """[B, S, H] -> [B, S, heads, D] -> [B, heads, S, D] -> [S*H]: the token dim is tracked."""

    def fn(x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        heads = x.view(1, x.shape[1], 4, HIDDEN // 4)
        transposed = heads.transpose(1, 2)
        return heads, transposed, transposed.transpose(1, 2).flatten(), x.sum()

    gm = capture(fn, hidden(), token_dims=[1])
    symbol = token_shapes.token_symbol(gm)
    output = next(iter(reversed(gm.graph.nodes)))
    outputs = [a.meta["example_value"] for a in output.args[0]]
    assert [token_shapes.token_dims(v, symbol) for v in outputs] == [(1,), (2,), (0,), ()]
    assert str(outputs[2].shape[0].node.expr) == f"{HIDDEN}*{symbol}"
    assert token_shapes.token_dims(3, symbol) == ()


def test_reshape_moving_tokens_inside_a_factor_is_flagged() -> None:
    """[heads, s, D] -> [heads*s*D]: row t is no longer one block of the flat tensor."""
    gm = capture(lambda x: x.view(-1, 4, 4).transpose(0, 1).reshape(-1) + 1,
                 torch.randn(NUM_TOKENS, HIDDEN), token_dims=[0])
    assert_flagged(gm, "reshape mixes the token dim with other dims", "reshape")


# ---------------------------------------------------------------------------------------------
# first_difference (verify mode)
# ---------------------------------------------------------------------------------------------


def first_difference_at_bucket(gm: fx.GraphModule, args: list[object]) -> tuple[str, float] | None:
    symbol = token_shapes.token_symbol(gm)
    padded = verify.pad_inputs(gm, args, symbol, BUCKET_SIZE)
    return verify.first_difference(gm, args, padded, symbol, NUM_TOKENS)


def test_pad_inputs_pads_token_dims_and_token_count() -> None:
    gm, args = capture_with_inputs(lambda x, w: x @ w, hidden(), torch.randn(HIDDEN, 3), token_dims=[1, None])
    padded = verify.pad_inputs(gm, args, token_shapes.token_symbol(gm), BUCKET_SIZE)
    assert args[0] == NUM_TOKENS and padded[0] == BUCKET_SIZE
    assert padded[1].shape == (1, BUCKET_SIZE, HIDDEN)
    assert torch.equal(padded[1][:, :NUM_TOKENS], args[1]) and not padded[1][:, NUM_TOKENS:].any()
    assert padded[2] is args[2]


def test_first_difference_names_the_token_mixing_node() -> None:
    def fn(x: torch.Tensor) -> torch.Tensor:
        centered = (x * 2) - (x * 2).mean(dim=1, keepdim=True)  # mean over tokens sees padding
        return centered.relu()

    gm, args = capture_with_inputs(fn, hidden(), token_dims=[1])
    name, difference = first_difference_at_bucket(gm, args)
    mean = gm.graph.find_nodes(op="call_method", target="mean")[0]
    assert name == mean.name and difference > 1e-3
    expected = {mean: "padding-unsafe: reduction over the token dim (mean)"}
    assert padding.classify(gm, token_shapes.token_symbol(gm)) == expected


def test_first_difference_none_for_row_wise_graph() -> None:
    ids, positions = torch.randint(0, 32, (1, NUM_TOKENS)), torch.arange(NUM_TOKENS)
    gm, args = capture_with_inputs(RowWiseBlock().eval(), ids, positions, token_dims=[1, 0])
    assert first_difference_at_bucket(gm, args) is None


def test_first_difference_last_token_selection() -> None:
    gm, args = capture_with_inputs(lambda x: x[:, -1:] * 3, hidden(), token_dims=[1])
    name, difference = first_difference_at_bucket(gm, args)
    assert name.startswith("getitem") and difference > 0


# ---------------------------------------------------------------------------------------------
# Stock Hugging Face models
# ---------------------------------------------------------------------------------------------


def tiny_causal_lm(kind: str) -> torch.nn.Module:
    transformers = pytest.importorskip("transformers")
    common = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, vocab_size=128, attn_implementation="sdpa")
    if kind == "llama":
        return transformers.LlamaForCausalLM(transformers.LlamaConfig(**common)).eval()
    return transformers.Qwen3ForCausalLM(transformers.Qwen3Config(head_dim=16, **common)).eval()


def capture_hf(model: torch.nn.Module, **kwargs: object) -> tuple[fx.GraphModule, list[object]]:
    graphs: list[tuple[fx.GraphModule, list[object]]] = []

    def grab(gm: fx.GraphModule, example_inputs: list[object]) -> Callable[..., object]:
        graphs.append((gm, example_inputs))
        return gm.forward

    torch._dynamo.reset()
    ids = torch.randint(0, 128, (1, NUM_TOKENS))
    torch._dynamo.mark_dynamic(ids, 1)
    with torch.no_grad():
        torch.compile(model, backend=grab, fullgraph=True)(input_ids=ids, use_cache=False, **kwargs)
    assert len(graphs) == 1
    gm, example_inputs = graphs[0]
    return gm, [concrete(a) for a in example_inputs]


@functools.lru_cache(maxsize=None)
def hf_graph(kind: str, logits_to_keep: int) -> tuple[torch.nn.Module, fx.GraphModule, list[object]]:
    """One capture per (model, logits_to_keep), shared by the tests (a capture takes seconds)."""
    torch.manual_seed(0)
    model = tiny_causal_lm(kind)
    gm, args = capture_hf(model, logits_to_keep=logits_to_keep)
    return model, gm, args


def _depends_on(node: fx.Node, roots: set[fx.Node], memo: dict[fx.Node, bool]) -> bool:
    if node not in memo:
        memo[node] = node in roots or any(_depends_on(n, roots, memo) for n in node.all_input_nodes)
    return memo[node]


MASK_CATEGORIES = ("slice along the token dim", "index along the token dim", "scan over the token dim")


@pytest.mark.parametrize("kind", ["llama", "qwen3"])
@pytest.mark.parametrize("logits_to_keep", [0, 1])
def test_hf_causal_lm_flags_only_attention_mask_and_last_token(kind: str, logits_to_keep: int) -> None:
    """Only sdpa, the mask prologue (a function of the token count alone) and last-token selection."""
    model, gm, _ = hf_graph(kind, logits_to_keep)
    reasons = padding.classify(gm, token_shapes.token_symbol(gm))
    ids = next(n for n in gm.graph.find_nodes(op="placeholder") if "input_ids" in n.name)
    memo: dict[fx.Node, bool] = {}
    on_hidden_path = {n: r for n, r in reasons.items() if _depends_on(n, {ids}, memo)}
    attention = [n for n, r in on_hidden_path.items() if r.startswith("padding-unsafe: attention")]
    assert len(attention) == model.config.num_hidden_layers
    rest = {n.name: r for n, r in on_hidden_path.items() if n not in attention}
    if logits_to_keep:
        assert list(rest.values()) == ["padding-unsafe: slice along the token dim (getitem)"]
    else:
        assert rest == {}
    prologue = [r for n, r in reasons.items() if n not in on_hidden_path]
    assert all(any(c in r for c in MASK_CATEGORIES) for r in prologue), prologue


def test_hf_first_difference_finds_last_token_selection() -> None:
    _, gm, args = hf_graph("llama", 1)
    symbol = token_shapes.token_symbol(gm)
    result = verify.first_difference(gm, args, verify.pad_inputs(gm, args, symbol, BUCKET_SIZE), symbol, NUM_TOKENS)
    assert result is not None
    flagged = {n.name: r for n, r in padding.classify(gm, symbol).items()}
    assert flagged[result[0]] == "padding-unsafe: slice along the token dim (getitem)"
