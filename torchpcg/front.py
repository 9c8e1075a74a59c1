"""The public ``torchpcg.compile``: one entry for every model, dispatched by kind.

In: a model (``nn.Module`` or any callable) and ``torchpcg.compile``'s knobs. Out: a
``vlm.CompiledVLM`` for a vision-language model (``vlm.is_vlm``: its language model compiled, the
vision tower eager), else a ``stable.StableModel`` (``stable.compile_model``: the whole callable,
guard-stable). Nothing is compiled here; it only chooses.

A front end, at the top of the imports: imports stable, stable_buffers, token_inputs and vlm;
nothing in torchpcg imports it but the package's ``__init__``.
"""
from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from .config import PiecewiseConfig
from .stable import StableModel, compile_model
from .stable_buffers import StableSpec
from .token_inputs import check_dynamic_dim
from .vlm import CompiledVLM, compile_vlm, is_vlm

__all__ = ["compile"]


def compile(  # noqa: A001 - torchpcg.compile mirrors torch.compile on purpose
    model: Callable[..., Any],
    config: PiecewiseConfig | None = None,
    *,
    backend: str | Callable[..., Any] = "piecewise",
    stable_kwargs: Mapping[str, StableSpec] | None = None,
    token_inputs: Mapping[str, int] | None = None,
    inference_mode: bool = False,
    dynamic_dim: str = "auto",
    fullgraph: bool = True,
    **knobs: Any,
) -> StableModel | CompiledVLM:
    """Compile ``model`` once so that serving traffic never recompiles it.

    Example::

        compiled = torchpcg.compile(model, cudagraph="emulate", stable_kwargs={
            "input_deepstack_embeds": torchpcg.StableBuffer(shape=(-1, 3 * hidden))})
        logits = compiled(input_ids, positions, kv_cache)                 # deepstack: zeros
        logits = compiled(input_ids, positions, kv_cache, deepstack)      # copied in, same graph

    What each call does: runs forward under ``torch.no_grad()`` (``torch.inference_mode()`` with
    ``inference_mode=True``) whatever the caller's grad mode; marks the token dim of the token
    inputs dynamic (``dynamic_dim="auto"``, the default: unbacked, and if the model cannot be traced
    with an unbacked size (e.g. Hugging Face mask helpers), one logged retry as backed;
    ``"unbacked"``: one symbol for every T, T=1 included;
    ``"backed"``: ``mark_dynamic``, which cannot hold T=1, so T=1 gets a second graph, whose
    first call is warmup like the first call of all; ``"off"``); passes
    each ``stable_kwargs`` entry as the first T rows of a preallocated buffer, zeroed when the
    caller gives None; and watches for recompiles (``RecompileMonitor``; raises under enforce).

    Token inputs, unless ``token_inputs={"name": dim}`` names them, are inferred from the *shapes*
    of the first call with T > 1 (names do not matter): the first tensor argument is the primary
    (T on dim 1 if it is 2-D integer ids ``[B, S]``, else dim 0); every other tensor argument with
    T at the primary's token dim (dim 0 for a 1-D tensor, e.g. ``cache_position [S]``) is a token
    input, except parameters and buffers of the model, ``mark_static_address`` tensors (Hugging
    Face ``StaticCache``), tensors with more dims than the primary's + 1 (a KV cache
    ``[L, 2, S, H, D]`` whose L equals T) and names of per-layer or per-sequence state (a word
    ``past`` or ``kv``, or a last word ``cache``, ``caches``, ``len``, ``lens``, ``lengths``,
    ``seqlen``, ``seqlens``, ``table``, ``tables``, ``loc``: ``seq_lens [B]`` of a decode batch
    with B == T). Tensors inside dict arguments count like arguments, named by their path
    (``inputs['hidden_states']`` of a pipeline stage). At T = 1 every ``[1, ...]`` tensor
    matches, so calls with T <= 1 before the first T > 1 call run the uncompiled model (same
    answer, logged once, counted in
    ``.eager_calls``); with ``token_inputs=`` the first call compiles whatever its T. A token
    input whose size at its dim is not T on a later call is passed unmarked, with a warning
    (Dynamo then compiles that shape; the monitor reports it).

    Knobs (``**knobs``, ``config``) are ``PiecewiseConfig`` fields, passed as ``options=`` to the
    piecewise backend; other backends accept only ``enforce``.

    A vision-language model (``vlm.is_vlm``: decoder layers in a language model beside a vision
    tower) returns a ``CompiledVLM`` instead: its language model is compiled as above, its vision
    tower stays eager (``vlm.compile_vlm``; ``stable_kwargs`` and ``token_inputs`` are chosen there).

    Note: it cannot stabilise Python scalar arguments or model attributes that change between
    calls; the monitor names them. ``dynamic_dim="unbacked"`` fails to compile models that branch
    on the token count (``if T == 1``); use ``"backed"`` for those.
    """
    check_dynamic_dim(dynamic_dim)
    if is_vlm(model):  # a vision-language model: its language model is compiled, the vision tower stays eager
        return compile_vlm(model, config, backend=backend, stable_kwargs=stable_kwargs, token_inputs=token_inputs,
                           inference_mode=inference_mode, dynamic_dim=dynamic_dim, fullgraph=fullgraph, **knobs)
    return compile_model(model, config, backend=backend, stable_kwargs=stable_kwargs, token_inputs=token_inputs,
                         inference_mode=inference_mode, dynamic_dim=dynamic_dim, fullgraph=fullgraph, **knobs)
