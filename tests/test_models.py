"""Tests of the reference models: the kv_attention op against a naive loop, and the FlatDecoder."""
from __future__ import annotations

import math

import pytest
import torch

from torchpcg.models import KV_ATTENTION_OP, DecoderConfig, FlatDecoder, kv_attention, reference_config
from torchpcg.models.attention import attention_bias


def naive_kv_attention(
    q: torch.Tensor, cache: torch.Tensor, layer: int, positions: torch.Tensor
) -> torch.Tensor:
    """Per-token, per-head loop over an already-written cache; float64 for a tight reference."""
    num_tokens, num_heads, head_dim = q.shape
    groups = num_heads // cache.shape[3]
    out = torch.zeros(num_tokens, num_heads, head_dim, dtype=torch.float64)
    for t in range(num_tokens):
        end = int(positions[t]) + 1
        for h in range(num_heads):
            keys = cache[layer, 0, :end, h // groups].double()  # [end, D]
            values = cache[layer, 1, :end, h // groups].double()
            weights = torch.softmax(keys @ q[t, h].double() / math.sqrt(head_dim), dim=0)
            out[t, h] = weights @ values
    return out


def random_attention_inputs(
    num_tokens: int, num_heads: int, num_kv_heads: int, start: int, dtype: torch.dtype = torch.float32
) -> tuple[torch.Tensor, ...]:
    """q, k, v, a cache prefilled with random 'earlier' entries, and positions start..start+T-1."""
    gen = torch.Generator().manual_seed(num_tokens * 100 + start)
    head_dim, layers, max_len = 8, 3, 32
    q = torch.randn(num_tokens, num_heads, head_dim, generator=gen).to(dtype)
    k = torch.randn(num_tokens, num_kv_heads, head_dim, generator=gen).to(dtype)
    v = torch.randn(num_tokens, num_kv_heads, head_dim, generator=gen).to(dtype)
    cache = torch.randn(layers, 2, max_len, num_kv_heads, head_dim, generator=gen).to(dtype)
    positions = torch.arange(start, start + num_tokens)
    return q, k, v, cache, positions


@pytest.mark.parametrize("num_heads,num_kv_heads", [(4, 4), (4, 2), (6, 1)])
@pytest.mark.parametrize("num_tokens,start", [(1, 0), (5, 0), (1, 9), (6, 7)])
def test_kv_attention_matches_naive_loop(num_heads: int, num_kv_heads: int, num_tokens: int, start: int) -> None:
    q, k, v, cache, positions = random_attention_inputs(num_tokens, num_heads, num_kv_heads, start)
    expected_cache = cache.clone()
    expected_cache[1, 0, positions] = k
    expected_cache[1, 1, positions] = v

    out = kv_attention(q, k, v, cache, 1, positions)

    assert out.shape == q.shape and out.dtype == q.dtype
    torch.testing.assert_close(cache, expected_cache, rtol=0, atol=0)  # only layer 1 at positions changed
    expected = naive_kv_attention(q, expected_cache, 1, positions)
    torch.testing.assert_close(out.double(), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_kv_attention_with_the_bias_passed_in_equals_the_mask_made_inside(dtype: torch.dtype) -> None:
    q, k, v, cache, positions = random_attention_inputs(6, 4, 2, start=5, dtype=dtype)
    inside_cache, outside_cache = cache.clone(), cache.clone()
    inside = kv_attention(q, k, v, inside_cache, 2, positions)
    outside = kv_attention(q, k, v, outside_cache, 2, positions, attention_bias(positions, cache.shape[2], dtype))
    torch.testing.assert_close(outside, inside, rtol=0, atol=0)
    torch.testing.assert_close(outside_cache, inside_cache, rtol=0, atol=0)


def test_attention_bias_is_zero_up_to_each_position() -> None:
    bias = attention_bias(torch.tensor([0, 3]), 5, torch.float32)
    inf = float("-inf")
    torch.testing.assert_close(bias, torch.tensor([[0, inf, inf, inf, inf], [0, 0, 0, 0, inf]]))


def test_kv_attention_bf16_close_to_fp32() -> None:
    q, k, v, cache, positions = random_attention_inputs(7, 4, 2, start=3, dtype=torch.bfloat16)
    out = kv_attention(q, k, v, cache, 0, positions)
    assert out.dtype == torch.bfloat16
    expected = naive_kv_attention(q, cache, 0, positions)  # cache already holds k, v
    torch.testing.assert_close(out.double(), expected, rtol=2e-2, atol=2e-2)


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("slots", [32, 20])  # 32: the memory-efficient kernel called directly; 20: through SDPA
def test_kv_attention_on_cuda_matches_naive_loop(dtype: torch.dtype, slots: int) -> None:
    q, k, v, cache, positions = random_attention_inputs(6, 4, 2, start=7, dtype=dtype)
    cache = cache[:, :, :slots].contiguous()
    expected_cache = cache.clone()
    expected_cache[1, 0, positions] = k
    expected_cache[1, 1, positions] = v
    device_cache = cache.cuda()

    out = kv_attention(q.cuda(), k.cuda(), v.cuda(), device_cache, 1, positions.cuda(),
                       attention_bias(positions.cuda(), slots, dtype))

    assert out.shape == q.shape and out.dtype == dtype and out.is_contiguous()
    torch.testing.assert_close(device_cache.cpu(), expected_cache, rtol=0, atol=0)
    tolerance = 1e-5 if dtype == torch.float32 else 2e-2
    expected = naive_kv_attention(q, expected_cache, 1, positions)
    torch.testing.assert_close(out.cpu().double(), expected, rtol=tolerance, atol=tolerance)


def test_kv_attention_registration_and_fake() -> None:
    q, k, v, cache, positions = random_attention_inputs(4, 4, 2, start=2)
    schema = str(KV_ATTENTION_OP.default._schema)
    assert schema.startswith("torchpcg_models::kv_attention(") and "Tensor(a!) kv_cache" in schema
    assert "int layer" in schema
    torch.library.opcheck(kv_attention, (q, k, v, cache, 2, positions), test_utils=("test_schema", "test_faketensor"))
    out = KV_ATTENTION_OP(q.to("meta"), k.to("meta"), v.to("meta"), cache.to("meta"), 0, positions.to("meta"))
    assert out.shape == q.shape and out.device.type == "meta"


@pytest.mark.parametrize("backend", ["eager", "aot_eager"])
def test_kv_attention_is_one_op_under_fullgraph(backend: str) -> None:
    q, k, v, cache, positions = random_attention_inputs(5, 4, 2, start=4)
    eager_cache = cache.clone()
    expected = kv_attention(q, k, v, eager_cache, 0, positions)

    def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cache: torch.Tensor, positions: torch.Tensor):
        return kv_attention(q * 1.0, k, v, cache, 0, positions) + 0.0

    out = torch.compile(attend, backend=backend, fullgraph=True)(q, k, v, cache, positions)
    torch.testing.assert_close(out, expected)
    torch.testing.assert_close(cache, eager_cache)  # the mutation survives functionalization


def tiny_config(**overrides: int) -> DecoderConfig:
    return DecoderConfig(**{"num_layers": 2, "max_seq_len": 64, **overrides})


def run_model(model: FlatDecoder, ids: torch.Tensor, start: int, cache: torch.Tensor, **kwargs) -> torch.Tensor:
    positions = torch.arange(start, start + ids.shape[0])
    with torch.no_grad():
        return model(ids, positions, cache, **kwargs)


def test_decoder_shapes_and_cache() -> None:
    config = tiny_config()
    model = FlatDecoder(config)
    cache = model.new_kv_cache()
    assert cache.shape == (2, 2, 64, config.num_kv_heads, config.head_dim) and not cache.any()
    logits = run_model(model, torch.randint(0, config.vocab_size, (5,)), 0, cache)
    assert logits.shape == (5, config.vocab_size) and logits.dtype == torch.float32
    assert cache[:, :, :5].abs().sum(-1).gt(0).all() and not cache[:, :, 5:].any()
    assert model.new_kv_cache(dtype=torch.bfloat16).dtype == torch.bfloat16


def test_decoder_is_deterministic() -> None:
    ids = torch.randint(0, 512, (6,), generator=torch.Generator().manual_seed(0))
    a, b, c = FlatDecoder(tiny_config(), seed=3), FlatDecoder(tiny_config(), seed=3), FlatDecoder(tiny_config(), seed=4)
    logits_a = run_model(a, ids, 0, a.new_kv_cache())
    torch.testing.assert_close(logits_a, run_model(b, ids, 0, b.new_kv_cache()), rtol=0, atol=0)
    torch.testing.assert_close(logits_a, run_model(a, ids, 0, a.new_kv_cache()), rtol=0, atol=0)
    assert not torch.allclose(logits_a, run_model(c, ids, 0, c.new_kv_cache()))


@pytest.mark.parametrize("num_kv_heads", [1, 4])
def test_prefill_then_decode_matches_one_prefill(num_kv_heads: int) -> None:
    model = FlatDecoder(tiny_config(num_kv_heads=num_kv_heads))
    ids = torch.randint(0, 512, (13,), generator=torch.Generator().manual_seed(1))
    full = run_model(model, ids, 0, model.new_kv_cache())  # [13, vocab]

    cache = model.new_kv_cache()
    steps = [run_model(model, ids[:7], 0, cache), run_model(model, ids[7:10], 7, cache)]  # chunked prefill
    steps += [run_model(model, ids[t : t + 1], t, cache) for t in range(10, 13)]  # decode, T=1 each
    torch.testing.assert_close(torch.cat(steps), full, rtol=1e-5, atol=1e-5)


def test_deepstack_embeds_are_added_after_first_layers() -> None:
    config = tiny_config(deepstack_layers=1)
    model = FlatDecoder(config)
    ids = torch.randint(0, 512, (4,), generator=torch.Generator().manual_seed(2))
    plain = run_model(model, ids, 0, model.new_kv_cache())
    zeros = torch.zeros(4, config.hidden_size)
    torch.testing.assert_close(run_model(model, ids, 0, model.new_kv_cache(), input_deepstack_embeds=zeros), plain)
    embeds = torch.randn(4, config.hidden_size)
    assert not torch.allclose(run_model(model, ids, 0, model.new_kv_cache(), input_deepstack_embeds=embeds), plain)


@pytest.mark.parametrize("deepstack_layers", [0, 2])
def test_compiled_decoder_matches_eager(deepstack_layers: int) -> None:
    torch._dynamo.reset()  # fresh caches even without the conftest fixture
    config = tiny_config(deepstack_layers=deepstack_layers)
    model = FlatDecoder(config).eval()
    compiled = torch.compile(model, backend="eager", fullgraph=True, dynamic=True)
    for num_tokens in (1, 3, 17):
        ids = torch.randint(0, 512, (num_tokens,), generator=torch.Generator().manual_seed(num_tokens))
        kwargs = {}
        if deepstack_layers:
            kwargs["input_deepstack_embeds"] = torch.randn(num_tokens, deepstack_layers * config.hidden_size)
        eager_cache, compiled_cache = model.new_kv_cache(), model.new_kv_cache()
        expected = run_model(model, ids, 2, eager_cache, **kwargs)
        torch.testing.assert_close(run_model(compiled, ids, 2, compiled_cache, **kwargs), expected)
        torch.testing.assert_close(compiled_cache, eager_cache)


def test_decoder_matches_hf_llama() -> None:
    """Same weights in transformers' LlamaForCausalLM give the same logits (rotary, GQA, norms)."""
    transformers = pytest.importorskip("transformers")
    config = tiny_config()
    model = FlatDecoder(config)
    hf_config = transformers.LlamaConfig(
        vocab_size=config.vocab_size, hidden_size=config.hidden_size, intermediate_size=config.intermediate_size,
        num_hidden_layers=config.num_layers, num_attention_heads=config.num_heads,
        num_key_value_heads=config.num_kv_heads, rms_norm_eps=config.rms_eps, rope_theta=config.rope_theta,
        max_position_embeddings=config.max_seq_len, tie_word_embeddings=False, attn_implementation="eager",
    )
    hf = transformers.LlamaForCausalLM(hf_config).eval()
    hf.load_state_dict(to_hf_state_dict(model, config))
    ids = torch.randint(0, config.vocab_size, (9,), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        expected = hf(ids[None]).logits[0]
    torch.testing.assert_close(run_model(model, ids, 0, model.new_kv_cache()), expected, rtol=1e-4, atol=1e-5)


def to_hf_state_dict(model: FlatDecoder, config: DecoderConfig) -> dict[str, torch.Tensor]:
    """FlatDecoder weights renamed (and the fused qkv split) for LlamaForCausalLM."""
    q_size, kv_size = config.num_heads * config.head_dim, config.num_kv_heads * config.head_dim
    state = {"model.embed_tokens.weight": model.embed_tokens.weight, "model.norm.weight": model.norm.weight,
             "lm_head.weight": model.lm_head.weight}
    for i, layer in enumerate(model.layers):
        prefix = f"model.layers.{i}."
        q, k, v = layer.self_attn.qkv_proj.weight.split([q_size, kv_size, kv_size])
        state |= {prefix + "self_attn.q_proj.weight": q, prefix + "self_attn.k_proj.weight": k,
                  prefix + "self_attn.v_proj.weight": v, prefix + "self_attn.o_proj.weight": layer.self_attn.o_proj.weight,
                  prefix + "input_layernorm.weight": layer.input_norm.weight,
                  prefix + "post_attention_layernorm.weight": layer.post_attention_norm.weight}
        state |= {prefix + f"mlp.{name}.weight": getattr(layer.mlp, name).weight
                  for name in ("gate_proj", "up_proj", "down_proj")}
    return state


def test_config_validation_and_reference_size() -> None:
    with pytest.raises(ValueError, match="num_kv_heads"):
        DecoderConfig(num_heads=4, num_kv_heads=3)
    with pytest.raises(ValueError, match="deepstack_layers"):
        DecoderConfig(num_layers=2, deepstack_layers=3)
    ref = reference_config()
    assert (ref.num_layers, ref.hidden_size, ref.num_heads, ref.num_kv_heads) == (16, 2048, 16, 16)
    assert (ref.intermediate_size, ref.vocab_size, ref.max_seq_len) == (5632, 32000, 2048)
    assert reference_config(num_layers=2).num_layers == 2
