"""Stable buffers: optional tensor inputs that always reach the compiled model as tensors.

In: ``stable_kwargs`` declarations (``StableBuffer``, or dicts of them for nested inputs) and, per
call, the caller's value (a tensor, a dict of tensors, or None) and the token count T. Out: the
first T rows of a preallocated buffer per declaration, holding the caller's tensor or zeros.

Why: Dynamo guards on whether an optional kwarg is None or a tensor, so a kwarg that comes and goes
under serving traffic (Qwen3-VL's deepstack features: images in some batches only) would recompile.
Passed as a slice of a buffer zeroed every pass, it is always a tensor with the dynamic token dim,
and no call sees an earlier call's values. ``stable.StableModel`` fills them; ``vlm.py`` declares
the deepstack one. Imports only errors; no CUDA here.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Iterator, Mapping
from typing import Any, Union

import torch

from .errors import ConfigError, StableInputError

__all__ = ["StableBuffer", "StableSpec", "StableTree"]


@dataclasses.dataclass(frozen=True)
class StableBuffer:
    """Declares an optional tensor input that must always reach the model as a tensor.

    ``shape`` has exactly one ``-1``: the token dim. torchpcg preallocates a buffer with room for
    the largest token count seen, and every call passes its first ``T`` rows: zeroed when the
    caller gives ``None`` (or leaves the kwarg out), the caller's tensor copied in otherwise.

    Example::

        torchpcg.compile(model, stable_kwargs={
            "input_deepstack_embeds": torchpcg.StableBuffer(shape=(-1, 3 * hidden), dtype=torch.bfloat16)})

    Note: the buffer is reused, so the model must not keep references to the input across calls.
    """

    shape: tuple[int, ...]
    """Full shape with ``-1`` at the token dim, e.g. ``(-1, 3 * hidden)``."""

    dtype: torch.dtype = torch.float32
    """Dtype of the buffer; a caller's tensor must have exactly this dtype."""

    device: torch.device | str | None = None
    """Where to allocate; ``None`` = the model's device (its first parameter or buffer)."""

    def __post_init__(self) -> None:
        shape = tuple(self.shape)
        if shape.count(-1) != 1 or any(not isinstance(s, int) or (s <= 0 and s != -1) for s in shape):
            raise ConfigError(f"StableBuffer(shape={self.shape!r}): expected positive ints and exactly one -1 "
                              "marking the token dim, e.g. (-1, 3 * hidden)")
        if not isinstance(self.dtype, torch.dtype):
            raise ConfigError(f"StableBuffer(dtype={self.dtype!r}): expected a torch.dtype, e.g. torch.float32")
        object.__setattr__(self, "shape", shape)

    @property
    def token_dim(self) -> int:
        return self.shape.index(-1)

    def shape_for(self, num_tokens: int) -> tuple[int, ...]:
        return tuple(num_tokens if s == -1 else s for s in self.shape)


StableSpec = Union[StableBuffer, Mapping[str, "StableSpec"]]


class _StableSlot:
    """The buffer behind one StableBuffer: allocated on first use, grown when T exceeds it."""

    def __init__(self, name: str, spec: StableBuffer, initial_tokens: int) -> None:
        self.name = name
        self.spec = spec
        self.initial_tokens = initial_tokens
        self.buffer: torch.Tensor | None = None  # [.., capacity at token dim, ..]

    @property
    def capacity(self) -> int:
        return 0 if self.buffer is None else self.buffer.shape[self.spec.token_dim]

    def fill(self, value: Any, num_tokens: int, device: torch.device) -> torch.Tensor:
        """The first ``num_tokens`` rows of the buffer, holding ``value`` or zeros."""
        rows = self._rows(num_tokens, device)
        if value is None:
            rows.zero_()  # every pass: a text-only call never sees an earlier call's features
            return rows
        if not isinstance(value, torch.Tensor):
            raise StableInputError(f"stable kwarg {self.name!r}: expected a Tensor or None, got {type(value).__name__}")
        if tuple(value.shape) != tuple(rows.shape) or value.dtype != self.spec.dtype:
            raise StableInputError(
                f"stable kwarg {self.name!r}: got shape {tuple(value.shape)} dtype {value.dtype}, expected shape "
                f"{tuple(rows.shape)} dtype {self.spec.dtype} (StableBuffer shape={self.spec.shape}, "
                f"T={num_tokens}); fix the input or the StableBuffer declaration")
        rows.copy_(value)
        return rows

    def _rows(self, num_tokens: int, device: torch.device) -> torch.Tensor:
        if num_tokens > self.capacity:
            # Growing never recompiles: the slice passed below has the (dynamic) token dim.
            size = max(num_tokens, self.initial_tokens)
            target = torch.device(self.spec.device) if self.spec.device is not None else device
            self.buffer = torch.zeros(self.spec.shape_for(size), dtype=self.spec.dtype, device=target)
        assert self.buffer is not None
        return self.buffer.narrow(self.spec.token_dim, 0, num_tokens)


class StableTree:
    """A stable kwarg: one slot, or a dict of them (nested optional inputs)."""

    def __init__(self, name: str, spec: StableSpec, initial_tokens: int) -> None:
        self.name = name
        if isinstance(spec, StableBuffer):
            self.slot: _StableSlot | None = _StableSlot(name, spec, initial_tokens)
            self.children: dict[str, StableTree] = {}
        elif isinstance(spec, Mapping) and spec:
            self.slot = None
            self.children = {str(k): StableTree(f"{name}[{k!r}]", v, initial_tokens) for k, v in spec.items()}
        else:
            raise ConfigError(f"stable_kwargs[{name!r}]={spec!r}: expected a torchpcg.StableBuffer or a "
                              "non-empty dict of them")

    def fill(self, value: Any, num_tokens: int, device: torch.device) -> Any:
        if self.slot is not None:
            return self.slot.fill(value, num_tokens, device)
        if value is not None and not isinstance(value, Mapping):
            raise StableInputError(f"stable kwarg {self.name!r}: expected a dict of tensors or None, "
                                   f"got {type(value).__name__}")
        given = dict(value or {})
        unknown = sorted(set(given) - set(self.children))
        if unknown:
            raise StableInputError(f"stable kwarg {self.name!r}: keys {unknown} are not declared; declared: "
                                   f"{sorted(self.children)}")
        return {key: child.fill(given.get(key), num_tokens, device) for key, child in self.children.items()}

    def leaves(self, value: Any) -> Iterator[tuple[torch.Tensor, int]]:
        """(tensor, token dim) of every leaf of a filled value."""
        if self.slot is not None:
            yield value, self.slot.spec.token_dim
            return
        for key, child in self.children.items():
            yield from child.leaves(value[key])
