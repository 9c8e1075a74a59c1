"""Compile the language model of a vision-language model; the vision tower stays eager.

In: a Hugging Face style VLM (``Qwen3VLForConditionalGeneration``, ``LlavaForConditionalGeneration``,
...) and the usual ``torchpcg.compile`` knobs. Out: a ``CompiledVLM``, called exactly like the
model (``forward``, ``generate``), whose language model (the owner of the decoder layers that
``find_transformer_layers`` finds) runs through ``stable.compile_model`` (``torchpcg.compile``'s
plain-model path) with the piecewise backend.

What a VLM hands its language model changes from request to request; each change that would
flip a Dynamo guard is made stable before the compiled call (``_Router``):

==================================  ===========================================================
what varies                         what the compiled language model gets
==================================  ===========================================================
``input_ids`` or ``inputs_embeds``  always ``inputs_embeds`` (ids are embedded eagerly)
deepstack (Qwen3-VL): a boolean     ``input_deepstack_embeds``: dense ``[B*S, n, H]`` rows, the
mask + ``N_visual`` feature rows    features at image tokens, zeros elsewhere; a ``StableBuffer``
(data-dependent shapes), or None    (zeroed on text-only calls, so no stale features leak)
mrope ``position_ids``: None,       always ``[3, B, S]`` (the text row of a 4-row input only
``[1|3|4, B, S]`` or ``[B, S]``     feeds packed-sequence masks, which need no cache and no mask)
==================================  ===========================================================

The compiled language model is installed as the language model's ``forward`` for the duration
of each ``CompiledVLM`` call and removed afterwards: the original model object stays eager when
called directly. A front end: imports stable, stable_buffers, backend, layers and split;
``front.compile`` (``torchpcg.compile``) dispatches here. No CUDA here.
"""
from __future__ import annotations

import contextlib
import dataclasses
import inspect
import logging
import re
import threading
import types
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import torch
from torch import nn

from .backend import collect_runtimes
from .config import PiecewiseConfig
from .errors import CaptureError, ConfigError, SplitError
from .layers import find_transformer_layers, is_vision_path
from .split import split_reason, user_split_ops
from .stable import compile_model
from .stable_buffers import StableBuffer
from .stats import COUNTERS

__all__ = ["CompiledVLM", "LanguageModelSpec", "compile_vlm", "is_vlm", "language_model_spec"]

log = logging.getLogger(__name__)

DEEPSTACK_KWARG = "input_deepstack_embeds"
_MISSING = object()
_CACHE_KWARGS = ("cache", "past_key_values")  # transformers >= 5.2x renamed past_key_values to cache


@dataclasses.dataclass(frozen=True)
class LanguageModelSpec:
    """Where a VLM keeps its language model and what its inputs look like."""

    path: str
    """Dotted path of the language model, the owner of the layers (``model.language_model``)."""
    layers_path: str
    """Dotted path of its decoder layers (``model.language_model.layers``)."""
    num_layers: int
    """Decoder layers: each must get its attention split under enforce."""
    layer_class: type
    """Class of one decoder layer, to find a layer in Dynamo's module stacks."""
    hidden_size: int
    """Width of ``inputs_embeds``."""
    deepstack_layers: int = 0
    """Qwen3-VL style deepstack: features added to the first ``n`` layers' outputs (0: none)."""
    mrope: bool = False
    """Multimodal rotary positions ``[3, B, S]`` (Qwen-VL family) instead of ``[B, S]``."""

    @property
    def token_inputs(self) -> dict[str, int]:
        """Token dims of the compiled call: ``inputs_embeds [B, S, H]`` and the positions."""
        return {"inputs_embeds": 1, "position_ids": 2 if self.mrope else 1}


def is_vlm(model: Any) -> bool:
    """Whether ``model`` is a vision-language model whose language model torchpcg compiles alone.

    True for an ``nn.Module`` whose decoder layers (``find_transformer_layers``) sit below the
    root in a language model that has a vision (or audio) tower beside it, e.g.
    ``Qwen3VLForConditionalGeneration`` (``model.visual``) or ``LlavaForConditionalGeneration``
    (``model.vision_tower``).
    """
    if not isinstance(model, nn.Module) or isinstance(model, _LanguageModelCall):
        return False
    try:
        layers_path, _ = find_transformer_layers(model)
    except SplitError:
        return False
    if "." not in layers_path:
        return False
    text_path = layers_path.rsplit(".", 1)[0]
    return any(is_vision_path(path) and not (path + ".").startswith(text_path + ".")
               for path, _ in model.named_modules() if path)


def language_model_spec(model: nn.Module) -> LanguageModelSpec:
    """The ``LanguageModelSpec`` of a VLM (raises ``SplitError`` if it has no decoder layers)."""
    layers_path, layers = find_transformer_layers(model)
    path = layers_path.rsplit(".", 1)[0] if "." in layers_path else ""
    text = model.get_submodule(path)
    embed = _input_embeddings(text)
    deepstack = 0
    if callable(getattr(text, "_deepstack_process", None)):
        indexes = getattr(getattr(getattr(model, "config", None), "vision_config", None), "deepstack_visual_indexes", None)
        if not indexes:
            raise ConfigError(f"{type(model).__name__}: its language model has deepstack "
                              "(_deepstack_process) but config.vision_config.deepstack_visual_indexes is missing; "
                              "torchpcg needs it to size the deepstack buffer")
        deepstack = len(indexes)
    rotary = getattr(text, "rotary_emb", None)
    mrope = getattr(rotary, "mrope_section", None) is not None
    return LanguageModelSpec(path=path, layers_path=layers_path, num_layers=len(layers), layer_class=type(layers[0]),
                             hidden_size=embed.embedding_dim, deepstack_layers=deepstack, mrope=mrope)


def _input_embeddings(text: nn.Module) -> nn.Embedding:
    embed = text.get_input_embeddings() if hasattr(text, "get_input_embeddings") else getattr(text, "embed_tokens", None)
    if not isinstance(embed, nn.Embedding):
        raise ConfigError(f"{type(text).__name__}: cannot find the language model's input embedding "
                          "(get_input_embeddings() or .embed_tokens); torchpcg needs it to embed input_ids")
    return embed


# ---- the compiled call ---------------------------------------------------------------------------

class _LanguageModelCall(nn.Module):
    """What Dynamo compiles: the language model's own forward on guard-stable inputs.

    ``forward(inputs_embeds [B, S, H], position_ids, attention_mask, input_deepstack_embeds
    [B*S, n, H] or None, **kwargs)`` calls the language model's original forward with the dense
    deepstack rows as ``deepstack_visual_embeds`` (n x [B, S, H]) and no mask.
    """

    def __init__(self, text: nn.Module, spec: LanguageModelSpec) -> None:
        super().__init__()
        self.text = text
        self.spec = spec
        # The forward in place now (the class's, or an instance-level one such as accelerate's
        # hook), taken before CompiledVLM installs its router as text.forward.
        self.__dict__["text_forward"] = text.forward

    def forward(self, inputs_embeds: torch.Tensor, position_ids: torch.Tensor | None = None,
                attention_mask: torch.Tensor | None = None, input_deepstack_embeds: torch.Tensor | None = None,
                **kwargs: Any) -> Any:
        if input_deepstack_embeds is not None:
            batch, seq = inputs_embeds.shape[:2]
            dense = input_deepstack_embeds.view(batch, seq, *input_deepstack_embeds.shape[1:])  # [B, S, n, H]
            kwargs["deepstack_visual_embeds"] = list(dense.unbind(2))  # n x [B, S, H]
            kwargs["visual_pos_masks"] = None
        return self.text_forward(inputs_embeds=inputs_embeds, position_ids=position_ids,
                                 attention_mask=attention_mask, **kwargs)


def _dense_deepstack(self: nn.Module, hidden_states: torch.Tensor, visual_pos_masks: Any,
                     visual_embeds: torch.Tensor) -> torch.Tensor:
    """Deepstack as a row-wise add: ``visual_embeds`` [B, S, H] holds zeros off image tokens.

    Replaces ``hidden[mask] += feats`` (a data-dependent scatter) while CompiledVLM runs; equal to
    it value for value (x + 0 == x). With a mask (an eager fallback call passes the model's own
    arguments) it is the model's own method.
    """
    if visual_pos_masks is not None:
        return type(self)._deepstack_process(self, hidden_states, visual_pos_masks, visual_embeds)
    return hidden_states + visual_embeds.to(hidden_states.dtype)


# ---- the router installed as the language model's forward ---------------------------------------

class _Router:
    """Runs in place of the language model's forward: stabilises the inputs, calls the compiled one."""

    def __init__(self, text: nn.Module, spec: LanguageModelSpec, compiled: Callable[..., Any],
                 check: _EnforceCheck | None) -> None:
        self.text = text
        self.spec = spec
        self.compiled = compiled  # the StableModel of _LanguageModelCall
        self.check = check
        self.text_forward = text.forward  # the original (taken before CompiledVLM installs this router)
        self.signature = inspect.signature(text.forward)
        self.embed = _input_embeddings(text)
        self.logged: set[str] = set()

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        if args:  # VLMs call their language model with keywords; bind positionals the same way
            kwargs = self._keywords(args, kwargs)
        batch = _batch_size(kwargs)
        if self.spec.deepstack_layers and batch != 1:
            return self._run_eager(kwargs, f"batch size {batch}: the deepstack buffer holds one sequence")
        input_ids = kwargs.pop("input_ids", None)
        embeds = kwargs.pop("inputs_embeds", None)
        if embeds is None:
            if input_ids is None:
                raise ValueError(f"{type(self.text).__name__}: pass input_ids or inputs_embeds")
            embeds = self.embed(input_ids)  # [B, S] -> [B, S, H]: the compiled call always gets embeds
        masks = kwargs.pop("visual_pos_masks", None)
        features = kwargs.pop("deepstack_visual_embeds", None)
        if self.spec.deepstack_layers:
            kwargs[DEEPSTACK_KWARG] = self._dense_deepstack(embeds, masks, features)
        elif features is not None:
            raise ConfigError(f"{type(self.text).__name__} got deepstack_visual_embeds but has no _deepstack_process")
        if self.spec.mrope:
            kwargs["position_ids"] = _own_layout(self._mrope_positions(embeds, kwargs))
        if self.check is None:
            return self.compiled(inputs_embeds=embeds, **kwargs)
        return self.check.run(self.compiled, embeds.shape[1], inputs_embeds=embeds, **kwargs)

    def _run_eager(self, kwargs: dict[str, Any], reason: str) -> Any:
        """The language model's own forward, uncompiled: logged once, counted; an error under enforce."""
        message = f"{type(self.text).__name__}: {reason}; this call runs the language model without graphs"
        if self.check is not None:
            raise ConfigError(message + " (TORCHPCG_ENFORCE=1)")
        if reason not in self.logged:
            self.logged.add(reason)
            log.warning("%s", message)
        COUNTERS.add("fallbacks")
        COUNTERS.add("eager_runs")
        return self.text_forward(**kwargs)

    def _keywords(self, args: tuple, kwargs: dict[str, Any]) -> dict[str, Any]:
        arguments = dict(self.signature.bind_partial(*args, **kwargs).arguments)
        for name, param in self.signature.parameters.items():
            if param.kind == inspect.Parameter.VAR_KEYWORD and name in arguments:
                arguments.update(arguments.pop(name))
        return arguments

    def _dense_deepstack(self, embeds: torch.Tensor, masks: torch.Tensor | None,
                         features: list[torch.Tensor] | None) -> torch.Tensor | None:
        """n x [N_visual, H] rows at ``masks`` [B, S] -> [B*S, n, H] (None: the StableBuffer's zeros)."""
        if features is None:
            return None
        if masks is None or len(features) != self.spec.deepstack_layers:
            raise ConfigError(f"deepstack_visual_embeds: expected {self.spec.deepstack_layers} feature tensors and "
                              f"visual_pos_masks, got {len(features)} tensors and masks={type(masks).__name__}")
        batch, seq = embeds.shape[:2]
        dense = embeds.new_zeros(batch * seq, self.spec.deepstack_layers, self.spec.hidden_size)
        rows = torch.stack([f.to(device=embeds.device, dtype=embeds.dtype) for f in features], dim=1)  # [N, n, H]
        dense[masks.to(embeds.device).reshape(-1)] = rows
        return dense

    def _mrope_positions(self, embeds: torch.Tensor, kwargs: Mapping[str, Any]) -> torch.Tensor:
        """Any position layout the language model accepts -> [3, B, S], the one it computes with.

        Equal to what the model does with each layout: None -> arange from the cache length; [B, S]
        and [1, B, S] broadcast to the three rows; [4, B, S] = text row + three mrope rows, and the
        text row only feeds packed-sequence detection, which runs without a cache and a mask only.
        """
        positions = kwargs.get("position_ids")
        batch, seq = embeds.shape[:2]
        cache = next((kwargs[k] for k in _CACHE_KWARGS if kwargs.get(k) is not None), None)
        if positions is None:
            past = cache.get_seq_length() if cache is not None else 0  # an int or a 0-d tensor: no sync
            return (torch.arange(seq, device=embeds.device) + past).view(1, 1, -1).expand(3, batch, -1)
        if positions.ndim == 2:
            return positions[None].expand(3, -1, -1)
        if positions.shape[0] == 1:
            return positions.expand(3, -1, -1)
        if positions.shape[0] == 4 and (cache is not None or kwargs.get("attention_mask") is not None):
            return positions[1:]
        return positions


def _batch_size(kwargs: Mapping[str, Any]) -> int:
    for name in ("inputs_embeds", "input_ids"):
        value = kwargs.get(name)
        if isinstance(value, torch.Tensor):
            return value.shape[0]
    return 1


def _own_layout(tensor: torch.Tensor) -> torch.Tensor:
    """Contiguous at offset 0: one input layout on every call. An expanded view (stride 0) or a
    slice (``positions[1:]``: storage offset B*S, a second dynamic symbol) would be another."""
    if tensor.is_contiguous() and tensor.storage_offset() == 0:
        return tensor
    return tensor.clone(memory_format=torch.contiguous_format)


# ---- enforce: every layer split, graphs captured --------------------------------------------------

class _EnforceCheck:
    """Under enforce: each Dynamo graph of the language model must split every layer's attention, and
    each call that fits a bucket must run on graphs. Raises SplitError / CaptureError otherwise."""

    def __init__(self, spec: LanguageModelSpec, config: PiecewiseConfig) -> None:
        self.spec = spec
        self.config = config

    def run(self, compiled: Callable[..., Any], num_tokens: int, **kwargs: Any) -> Any:
        graph_calls = COUNTERS.snapshot()["graph_calls"]
        with collect_runtimes() as runtimes:
            out = compiled(**kwargs)
        for runtime in runtimes:  # graphs compiled by this call
            self.check_split(runtime)
        if num_tokens <= self.config.largest_bucket and COUNTERS.snapshot()["graph_calls"] == graph_calls:
            raise CaptureError(
                f"language model call with T={num_tokens} tokens (buckets up to {self.config.largest_bucket}) ran "
                f"without graphs (cudagraph={self.config.cudagraph!r}; on CPU use cudagraph='emulate'), so piecewise "
                "graphs were not exercised (TORCHPCG_ENFORCE=1)")
        return out

    def check_split(self, runtime: Any) -> None:
        split_layers = attention_layers(runtime.split, self.spec.layer_class)
        missing = sorted(set(range(self.spec.num_layers)) - split_layers)
        if missing:
            reasons = sorted({r for p in runtime.split.split_pieces for r in p.reasons})
            raise SplitError(
                f"{self.spec.layers_path}: attention of layer(s) {missing} of {self.spec.num_layers} was not split "
                f"(split ops found: {reasons or 'none'}); load the model with attn_implementation='sdpa' or "
                "register its attention op with torchpcg.register_splitting_op (TORCHPCG_ENFORCE=1)")


def attention_layers(split: Any, layer_class: type) -> set[int]:
    """Indices of the decoder layers (instances of ``layer_class``) whose attention is a split op.

    The layer of a split node is read from Dynamo's ``nn_module_stack`` (its entry of class
    ``layer_class``, e.g. ``L['self'].text.layers.3`` or ``...layers[3]``: the last integer).
    Where Dynamo recorded no stack, the attention split nodes count for layers 0, 1, ... in order.
    """
    found: set[int] = set()
    unplaced = 0
    user_ops = user_split_ops()
    for piece in split.split_pieces:
        for node in piece.gm.graph.nodes:
            why = split_reason(node, user_ops, split_collectives=False)
            if not why or not why.startswith(("attention", "user split op")):
                continue
            indices = [int(re.findall(r"\d+", str(path))[-1]) for path, cls in
                       (node.meta.get("nn_module_stack") or {}).values()
                       if isinstance(cls, type) and issubclass(cls, layer_class) and re.search(r"\d", str(path))]
            found.update(indices)
            unplaced += not indices
    return found or set(range(unplaced))


# ---- the wrapper users get -------------------------------------------------------------------------

class CompiledVLM:
    """What ``torchpcg.compile(vlm)`` returns: call it (and ``.generate``) like the model.

    Each call installs the compiled language model as ``<spec.path>.forward`` (plus the dense
    deepstack add for Qwen3-VL), runs the original model under ``torch.no_grad()``
    (``inference_mode=True``: ``torch.inference_mode()``), and removes them again; the vision
    tower and everything around the language model run eagerly. Calls are serialised (one lock), like
    ``StableModel`` calls, because the static buffers are shared.

    Attributes: ``model`` (the VLM), ``spec`` (``LanguageModelSpec``), ``language_model`` (the
    ``StableModel`` of the language model: ``.monitor``, ``.recompiles``, ``.token_inputs``),
    ``config`` (the ``PiecewiseConfig``). Other attributes are read from the model.

    Note: ``generate`` turns off transformers' own auto-compile (``disable_compile=True``): the
    language model is compiled already, and Dynamo must not trace the wrapper.
    """

    def __init__(self, model: nn.Module, spec: LanguageModelSpec, language_model: Any, router: _Router,
                 inference_mode: bool = False) -> None:
        self.model = model
        self.spec = spec
        self.language_model = language_model
        self.config: PiecewiseConfig = language_model.config
        self._router = router
        self._text = model.get_submodule(spec.path)
        self._deepstack = types.MethodType(_dense_deepstack, self._text) if spec.deepstack_layers else None
        self._grad_mode = torch.inference_mode if inference_mode else torch.no_grad
        self._lock = threading.RLock()
        self._depth = 0
        self._saved: dict[str, Any] = {}

    @property
    def monitor(self) -> Any:
        return self.language_model.monitor

    @property
    def recompiles(self) -> list[str]:
        return self.language_model.recompiles

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        # The whole model under no_grad, as torchpcg.compile runs its model: embeddings computed by
        # the eager part must not require grad on one call and not on the next (a guard).
        with self._installed(), self._grad_mode():
            return self.model(*args, **kwargs)

    forward = __call__

    def generate(self, *args: Any, **kwargs: Any) -> Any:
        """``model.generate(...)`` with the compiled language model (transformers' auto-compile off).

        Unless the caller brings a cache (``past_key_values``, ``cache_implementation`` or the
        model's generation config), generation uses a static cache: its length is fixed, so prefill
        and every decode step share the graphs. The default dynamic cache adds a second dynamic
        size (the cache length) that Dynamo ties to the token count at prefill (transformers 5.17
        then fails to compile: "marked as dynamic but your code specialized it").
        """
        kwargs.setdefault("disable_compile", True)
        brought = "past_key_values" in kwargs or "cache_implementation" in kwargs or \
            getattr(getattr(self.model, "generation_config", None), "cache_implementation", None)
        if not brought:
            kwargs["cache_implementation"] = "static"
        with self._installed(), self._grad_mode():
            return self.model.generate(*args, **kwargs)

    @contextlib.contextmanager
    def _installed(self) -> Iterator[None]:
        with self._lock:
            if self._depth == 0:
                self._install()
            self._depth += 1
            try:
                yield
            finally:
                self._depth -= 1
                if self._depth == 0:
                    self._uninstall()

    def _install(self) -> None:
        # nn.Module.__call__ looks up self.forward: an instance attribute wins over the class's.
        # Whatever instance-level entries were there (an accelerate hook) are put back afterwards.
        patches = {"forward": self._router}
        if self._deepstack is not None:
            patches["_deepstack_process"] = self._deepstack
        self._saved = {name: self._text.__dict__.get(name, _MISSING) for name in patches}
        self._text.__dict__.update(patches)

    def _uninstall(self) -> None:
        for name, value in self._saved.items():
            if value is _MISSING:
                self._text.__dict__.pop(name, None)
            else:
                self._text.__dict__[name] = value

    def __getattr__(self, name: str) -> Any:
        if name.startswith("_") or name in ("model",):
            raise AttributeError(name)
        return getattr(self.model, name)

    def __repr__(self) -> str:
        return (f"CompiledVLM({type(self.model).__name__}, language model {self.spec.path!r}, "
                f"{self.spec.num_layers} layers, deepstack={self.spec.deepstack_layers})")


def compile_vlm(model: nn.Module, config: PiecewiseConfig | None = None, *, backend: str | Callable[..., Any] = "piecewise",
                stable_kwargs: Mapping[str, Any] | None = None, token_inputs: Mapping[str, int] | None = None,
                inference_mode: bool = False, dynamic_dim: str = "auto", fullgraph: bool = True,
                **knobs: Any) -> CompiledVLM:
    """Compile the language model of ``model`` with ``torchpcg.compile``; the vision tower stays eager.

    ``torchpcg.compile(vlm, ...)`` lands here for every model ``is_vlm`` accepts; the arguments
    are ``torchpcg.compile``'s. Example::

        compiled = torchpcg.compile(qwen3_vl, cudagraph="emulate")       # CPU; on a GPU: no knobs
        logits = compiled(**processor(text=..., images=...)).logits      # image request
        logits = compiled(input_ids=ids).logits                          # text-only: same graph
        out = compiled.generate(**inputs, max_new_tokens=32)

    ``dynamic_dim="auto"`` means ``"backed"`` here (Hugging Face mask code branches on the token
    count); T=1 decode calls then get a graph of their own, compiled on first use (warmup, not a
    recompile). Under ``enforce`` each Dynamo graph must split the attention of every decoder
    layer (``SplitError``) and every call of at most the largest bucket must run on graphs
    (``CaptureError``), so a test suite can prove piecewise graphs were exercised.

    Note: ``stable_kwargs`` and ``token_inputs`` are chosen here (the language model's
    ``inputs_embeds`` and ``position_ids``, and the deepstack buffer); passing them is an error.
    Vision encoders are not compiled.
    """
    if stable_kwargs or token_inputs:
        raise ConfigError(f"torchpcg.compile({type(model).__name__}): stable_kwargs={dict(stable_kwargs or {})} / "
                          f"token_inputs={dict(token_inputs or {})}: for a vision-language model torchpcg compiles "
                          "its language model and chooses these itself; leave them out")
    spec = language_model_spec(model)
    text = model.get_submodule(spec.path)
    call = _LanguageModelCall(text, spec)
    stable: dict[str, Any] = {}
    if spec.deepstack_layers:
        dtype = _input_embeddings(text).weight.dtype
        stable[DEEPSTACK_KWARG] = StableBuffer(shape=(-1, spec.deepstack_layers, spec.hidden_size), dtype=dtype)
    language_model = compile_model(call, config, backend=backend, stable_kwargs=stable, token_inputs=spec.token_inputs,
                                   inference_mode=inference_mode, fullgraph=fullgraph,
                                   dynamic_dim="backed" if dynamic_dim == "auto" else dynamic_dim, **knobs)
    resolved = language_model.config
    check = _EnforceCheck(spec, resolved) if resolved.enforce and backend == "piecewise" else None
    router = _Router(text, spec, language_model, check)
    log.info("%s: compiling its language model %s (%d layers, deepstack %d, mrope %s); vision tower eager",
             type(model).__name__, spec.path, spec.num_layers, spec.deepstack_layers, spec.mrope)
    return CompiledVLM(model, spec, language_model, router, inference_mode=inference_mode)
