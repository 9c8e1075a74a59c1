"""Conformance suite: the paths new users take, on every kind of model, against eager.

In: the zoo models (tests/zoo.py). Out: pass/fail per case, and one JSON line per case in the file
named by ``TORCHPCG_CONFORMANCE_LOG`` (if set) for the closing table.

GPU matrix (``pytest -m cuda tests/test_conformance.py``), 96 cases, ids like
``llama-plain-T1first-bf16``:

- model: ``flat`` (reference FlatDecoder), ``llama``, ``qwen3``, ``gpt2``, ``gemma`` (Hugging Face,
  tiny random configs, sdpa), ``packed`` (custom attention op, two token inputs);
- entry: ``plain`` = ``torch.compile(model, backend="piecewise", options=...)`` with no marking by
  the test; ``dynamic`` = the same with ``dynamic=True``; ``tpcg`` = ``torchpcg.compile(model,
  **knobs)``; ``capture`` = ``torchpcg.compile`` then ``torchpcg.capture(compiled, make_inputs)``
  before any traffic (its first-call axis is the first call after the capture);
- first call: ``T1first`` (T=1) or ``T24first`` (T=24);
- dtype: ``fp32`` or ``bf16``.

Every case: real CUDA graphs (``cudagraph="cuda"``), buckets 1, 2, 4, 8, 16, 32, twelve calls
(the first T, then 1, 5, 1, 5, 16, 1, 40, 3, 1, 32, 7: T=1 repeated, 5 repeated, 40 above the
largest bucket), new input tensors on every call, all calls under ``torch.no_grad()``. Each
output equals the uncompiled model's on identical inputs (fp32: 1e-5 with eager pieces, 1e-4
with Inductor pieces; bf16: 2e-2, the bf16 Inductor-vs-eager level) when returned and again after
the last call (a later replay must not overwrite it). Then: graphs were captured and replayed,
no capture failed, no graph was captured again (``recaptures == 0``: fresh user tensors are
copied into static buffers, never a reason to recapture); the process is healthy:
``torch.randint`` on CUDA works, no stream capture is open, and after the compiled model and
model are dropped, ``torch._dynamo.reset()`` and ``gc.collect()``, the model object is gone and
``torch.cuda.memory_allocated()`` is back within ``MEMORY_SLACK_BYTES`` of its level before the
case.

Piece compiler, a fixed rule: with indices model m (order above), entry e, first call f,
dtype d, pieces use ``compiler="inductor"`` iff ``e == (m + f) % 4 and d == (m // 2 + f) % 2``,
else ``compiler="eager"``. That is 12 Inductor cases: every model twice (once per first call,
once per dtype), every entry with each first call (flat-plain-T1first-fp32,
flat-dynamic-T24first-bf16, llama-dynamic-T1first-fp32, llama-tpcg-T24first-bf16,
qwen3-tpcg-T1first-bf16, qwen3-capture-T24first-fp32, gpt2-capture-T1first-bf16,
gpt2-plain-T24first-fp32, gemma-plain-T1first-fp32, gemma-dynamic-T24first-bf16,
packed-dynamic-T1first-fp32, packed-tpcg-T24first-bf16).

CPU subset (runs in CI, never skipped; about 40 s of CPU time): fp32, ``cudagraph="emulate"``,
``compiler="eager"``, 12 cases: both flat models (``flat``, ``packed``) through every entry with
the first call alternating (``T1first`` iff ``(m + e) % 2 == 0``), and each Hugging Face model
through one entry, the h-th (0-based) taking entry h and ``T1first`` iff h is even
(llama-plain-T1first, qwen3-dynamic-T24first, gpt2-tpcg-T1first, gemma-capture-T24first). Same
calls, tolerances and checks, minus the CUDA ones (the model must still be freed).
"""
from __future__ import annotations

import dataclasses
import gc
import json
import logging
import os
import time
import weakref
from collections.abc import Callable
from typing import Any

import pytest
import torch

import torchpcg
from tests import zoo

FLAT_MODELS = ("flat", "packed")  # fast to trace: every entry on CPU; Hugging Face ones one entry each
ENTRIES = ("plain", "dynamic", "tpcg", "capture")
FIRST_CALLS = {"T1first": 1, "T24first": 24}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
CAPTURE_SIZES = (1, 2, 4, 8, 16, 32)
LATER_CALLS = (1, 5, 1, 5, 16, 1, 40, 3, 1, 32, 7)  # after the first call; 40 > largest bucket
TOLERANCES = {  # (dtype, compiler) -> assert_close atol/rtol
    ("fp32", "eager"): {"atol": 1e-5, "rtol": 1e-5},
    ("fp32", "inductor"): {"atol": 1e-4, "rtol": 1e-4},
    ("bf16", "eager"): {"atol": 2e-2, "rtol": 2e-2},
    ("bf16", "inductor"): {"atol": 2e-2, "rtol": 2e-2},
}
MEMORY_SLACK_BYTES = 64 * 1024  # well below one leaked zoo model (~200 KiB in bf16)
LOG_ENV = "TORCHPCG_CONFORMANCE_LOG"


@dataclasses.dataclass(frozen=True)
class Case:
    """One cell of the matrix."""

    model: str
    entry: str
    first: str
    dtype: str
    compiler: str
    device: str

    @property
    def id(self) -> str:
        return f"{self.model}-{self.entry}-{self.first}-{self.dtype}"

    @property
    def token_counts(self) -> tuple[int, ...]:
        return (FIRST_CALLS[self.first], *LATER_CALLS)

    @property
    def options(self) -> dict[str, Any]:
        cudagraph = "cuda" if self.device == "cuda" else "emulate"
        return {"capture_sizes": CAPTURE_SIZES, "cudagraph": cudagraph, "compiler": self.compiler}


def _uses_inductor(model: int, entry: int, first: int, dtype: int) -> bool:
    return entry == (model + first) % len(ENTRIES) and dtype == (model // 2 + first) % 2


def gpu_cases() -> list[Case]:
    cases = []
    for m, model in enumerate(zoo.MODELS):
        for e, entry in enumerate(ENTRIES):
            for f, first in enumerate(FIRST_CALLS):
                for d, dtype in enumerate(DTYPES):
                    compiler = "inductor" if _uses_inductor(m, e, f, d) else "eager"
                    cases.append(Case(model, entry, first, dtype, compiler, "cuda"))
    return cases


def cpu_cases() -> list[Case]:
    firsts = list(FIRST_CALLS)
    cases = [Case(model, entry, firsts[(m + e) % 2], "fp32", "eager", "cpu")
             for m, model in enumerate(zoo.MODELS) if model in FLAT_MODELS for e, entry in enumerate(ENTRIES)]
    hf_models = [model for model in zoo.MODELS if model not in FLAT_MODELS]
    cases += [Case(model, ENTRIES[h], firsts[h % 2], "fp32", "eager", "cpu") for h, model in enumerate(hf_models)]
    return cases


# ---- one case ------------------------------------------------------------------------------------

def _compile(case: Case, zoo_model: zoo.ZooModel) -> Callable[..., Any]:
    """The compiled model through ``case.entry``; ``capture`` also captures every bucket."""
    model, options = zoo_model.model, case.options
    if case.entry == "plain":
        return torch.compile(model, backend="piecewise", options=options)
    if case.entry == "dynamic":
        return torch.compile(model, backend="piecewise", dynamic=True, options=options)
    compiled = torchpcg.compile(model, **options)
    if case.entry == "capture":
        with torch.no_grad():
            torchpcg.capture(compiled, zoo_model.inputs, progress=False)
    return compiled


def _serve(case: Case, zoo_model: zoo.ZooModel, compiled: Callable[..., Any]) -> None:
    """Every call of the case vs eager on identical fresh inputs; outputs checked again at the end."""
    tolerance = TOLERANCES[(case.dtype, case.compiler)]
    kept: list[tuple[int, torch.Tensor, torch.Tensor]] = []
    with torch.no_grad():
        for call, num_tokens in enumerate(case.token_counts):
            got = zoo_model.logits(compiled(*zoo_model.inputs(num_tokens, seed=call)))
            expected = zoo_model.logits(zoo_model.model(*zoo_model.inputs(num_tokens, seed=call)))
            torch.testing.assert_close(got, expected, **tolerance,
                                       msg=lambda m: f"{case.id} call {call} (T={num_tokens}): {m}")
            kept.append((num_tokens, got, expected))
    for call, (num_tokens, got, expected) in enumerate(kept):
        torch.testing.assert_close(got, expected, **tolerance,
                                   msg=lambda m: f"{case.id} call {call} (T={num_tokens}) after all calls: {m}")


def _check_counters(case: Case, stats: dict[str, Any]) -> None:
    assert stats["captured"] > 0, f"{case.id}: no graph captured: {stats}"
    assert stats["replays"] > 0, f"{case.id}: no graph replayed: {stats}"
    assert stats["capture_failures"] == 0, f"{case.id}: capture failures: {stats}"
    # New user tensors on every call are normal serving: copied into static buffers, never a recapture.
    assert stats["recaptures"] == 0, f"{case.id}: graphs captured again for fresh input tensors: {stats}"
    if case.entry in ("tpcg", "capture"):  # torchpcg.compile's monitor counts recompiles after warmup
        assert stats["recompiles"] == 0, f"{case.id}: recompiled after warmup: {stats}"


def _run(case: Case) -> weakref.ref:
    """Build, compile, serve, check counters; returns a weak reference to the model."""
    zoo_model = zoo.build(case.model, case.device, DTYPES[case.dtype])
    compiled = _compile(case, zoo_model)
    _serve(case, zoo_model, compiled)
    _check_counters(case, torchpcg.stats())
    return weakref.ref(zoo_model.model)  # every strong reference dies with this frame


# ---- process health ------------------------------------------------------------------------------

def _settle(device: str) -> None:
    """Drop what Dynamo and Python still hold; on CUDA also torch's per-stream cuBLAS workspaces."""
    torch._dynamo.reset()
    gc.collect()
    if device == "cuda":
        torch.cuda.synchronize()
        clear = getattr(torch._C, "_cuda_clearCublasWorkspaces", None)
        if clear is not None:
            clear()  # workspaces of the capture stream are torch's cache, not a leak


def _drop_logged_tracebacks() -> None:
    """Forget the tracebacks pytest's log handlers keep with captured records.

    A warning logged with ``exc_info`` during compile (torch 2.11's Inductor logs "Failed to pickle
    cache key" so for one case) keeps its traceback, and through the frames' ``f_back`` chain
    Dynamo's frames and the model, in every capturing handler (caplog's and the report's). The
    formatted text stays; only the live frames go, so the model-freed check below tests torchpcg.
    """
    for handler in logging.getLogger().handlers:
        for record in getattr(handler, "records", ()):
            record.exc_info = None


def _check_health(case: Case, model_ref: weakref.ref, allocated_before: int) -> None:
    if case.device == "cuda":
        torch.randint(0, 10, (4,), device="cuda")  # fails if the CUDA generator was left in capture mode
        assert not torch.cuda.is_current_stream_capturing(), f"{case.id}: a stream capture is still open"
    _settle(case.device)
    assert model_ref() is None, f"{case.id}: the model outlives its compiled wrapper and torch._dynamo.reset()"
    if case.device == "cuda":
        allocated = torch.cuda.memory_allocated()
        assert allocated <= allocated_before + MEMORY_SLACK_BYTES, (
            f"{case.id}: CUDA memory not released: {allocated_before} B before the case, {allocated} B after "
            f"(+{allocated - allocated_before} B, slack {MEMORY_SLACK_BYTES} B)")


# ---- the log -------------------------------------------------------------------------------------

def _log(record: dict[str, Any]) -> None:
    path = os.environ.get(LOG_ENV)
    if path:
        with open(path, "a", encoding="utf-8") as log_file:
            log_file.write(json.dumps(record) + "\n")


def _record(case: Case, outcome: str, seconds: float, error: BaseException | None) -> dict[str, Any]:
    stats = torchpcg.stats()
    record = {"case": case.id, "device": case.device, "compiler": case.compiler, "outcome": outcome,
              "seconds": round(seconds, 3)}
    record.update({key: stats[key] for key in ("dynamo_graphs", "recompiles", "captured", "replays",
                                               "eager_runs", "graphless_runs", "recaptures", "capture_failures",
                                               "fallbacks")})
    if error is not None:
        record["error"] = f"{type(error).__name__}: {str(error).splitlines()[0][:300] if str(error) else ''}"
    return record


def _conformance(case: Case) -> None:
    _settle(case.device)
    allocated_before = torch.cuda.memory_allocated() if case.device == "cuda" else 0
    start = time.perf_counter()
    outcome, error = "failed", None
    try:
        model_ref = _run(case)
        _drop_logged_tracebacks()
        _check_health(case, model_ref, allocated_before)
        outcome = "passed"
    except BaseException as exc:
        error = exc
        raise
    finally:
        _log(_record(case, outcome, time.perf_counter() - start, error))


# ---- tests ---------------------------------------------------------------------------------------


@pytest.mark.cuda
@pytest.mark.parametrize("case", gpu_cases(), ids=lambda case: case.id)
def test_conformance_cuda(case: Case) -> None:
    _conformance(case)


@pytest.mark.parametrize("case", cpu_cases(), ids=lambda case: case.id)
def test_conformance_cpu(case: Case, one_cpu_thread) -> None:
    _conformance(case)


def test_case_subsets_cover_what_the_docstring_says() -> None:
    inductor = [case for case in gpu_cases() if case.compiler == "inductor"]
    assert len(gpu_cases()) == 96 and len(inductor) == 12
    assert {(case.model, case.first) for case in inductor} == {(m, f) for m in zoo.MODELS for f in FIRST_CALLS}
    assert {(case.model, case.dtype) for case in inductor} == {(m, d) for m in zoo.MODELS for d in DTYPES}
    assert {(case.entry, case.first) for case in inductor} == {(e, f) for e in ENTRIES for f in FIRST_CALLS}
    assert all(case.id in __doc__ for case in inductor)
    cpu = cpu_cases()
    assert len(cpu) == 12 and {case.model for case in cpu} == set(zoo.MODELS)
    assert {(case.entry, case.first) for case in cpu} == {(e, f) for e in ENTRIES for f in FIRST_CALLS}
