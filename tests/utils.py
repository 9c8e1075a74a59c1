"""Helpers shared by tests: reference-model inputs and the eager-vs-compiled comparison."""
from __future__ import annotations

from collections.abc import Callable

import torch

from torchpcg.models import DecoderConfig, FlatDecoder


def tiny_decoder(device: str = "cpu", dtype: torch.dtype = torch.float32, **overrides) -> FlatDecoder:
    config = DecoderConfig(**{"num_layers": 2, **overrides})
    return FlatDecoder(config).to(device=device, dtype=dtype).eval()


def decoder_inputs(model: FlatDecoder, num_tokens: int, start: int = 0, seed: int | None = None,
                   mark: bool = True) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(input_ids [T], positions [T] from ``start``, a fresh KV cache); token dim marked dynamic."""
    device = next(model.parameters()).device
    generator = torch.Generator().manual_seed(num_tokens if seed is None else seed)
    ids = torch.randint(0, model.config.vocab_size, (num_tokens,), generator=generator).to(device)
    positions = torch.arange(start, start + num_tokens, device=device)
    cache = model.new_kv_cache(device=device, dtype=next(model.parameters()).dtype)
    if mark:
        torch._dynamo.mark_dynamic(ids, 0)
        torch._dynamo.mark_dynamic(positions, 0)
    return ids, positions, cache


def compare(model: FlatDecoder, compiled: Callable, num_tokens: int, atol: float, rtol: float, start: int = 0) -> None:
    """Compiled logits and KV cache equal eager's for one call of ``num_tokens`` tokens."""
    ids, positions, cache = decoder_inputs(model, num_tokens, start)
    if start:
        model(*decoder_inputs(model, start, 0, seed=99)[:2], cache)  # some context in the cache
    cache_ref = cache.clone()
    with torch.no_grad():
        expected = model(ids, positions, cache_ref)
    got = compiled(ids, positions, cache)
    torch.testing.assert_close(got, expected, atol=atol, rtol=rtol, msg=lambda m: f"T={num_tokens}: {m}")
    torch.testing.assert_close(cache, cache_ref, atol=atol, rtol=rtol, msg=lambda m: f"T={num_tokens} cache: {m}")


def run_in_threads(work: Callable[[int], None], token_counts: tuple[int, ...]) -> None:
    """Run ``work(T)`` in one thread per T at once; re-raise the first failure in the caller."""
    import threading

    errors: list[BaseException] = []

    def worker(num_tokens: int) -> None:
        try:
            work(num_tokens)
        except BaseException as exc:  # a thread's exception is otherwise lost
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(n,)) for n in token_counts]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors, errors[0]


def unique_graphs() -> int:
    """Dynamo's own count of graphs compiled in this process."""
    return torch._dynamo.utils.counters["stats"]["unique_graphs"]


class SideEffects(torch.nn.Module):
    """Non-idempotent writes: a call counter (a buffer) and ``cache += ...`` into a user input."""

    def __init__(self) -> None:
        super().__init__()
        self.proj = torch.nn.Linear(16, 16)
        self.register_buffer("calls", torch.zeros((), dtype=torch.long))

    def forward(self, x: torch.Tensor, cache: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        h = self.proj(x)
        cache += h.sum(0)
        h = torch.nn.functional.scaled_dot_product_attention(h[None], h[None], h[None])[0]
        return self.proj(h) + cache


def without_graphs(stats: dict) -> int:
    """Calls served without graphs, whatever ran them: FX code (``eager_runs``) or compiled code
    (``graphless_runs``)."""
    return stats["eager_runs"] + stats["graphless_runs"]
