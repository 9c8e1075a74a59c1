"""Tokens per second of Hugging Face ``generate()``: eager vs transformers' compile vs piecewise graphs.

In: a random-weight Llama, Qwen3 or Mixtral config (no downloads), a prompt length and a number of new
tokens. Out: a JSON record (``--out``) and a Markdown table on stdout, one row per mode:

=================  ===================================================================================
mode               what runs
=================  ===================================================================================
``eager``          ``model.generate(ids)``: default dynamic cache, no compile
``hf-compile``     transformers' default compile: ``cache_implementation="static"``,
                   ``compile_config=CompileConfig()`` (Inductor, ``mode="reduce-overhead"``, decode only)
``forward``        recipe (a): ``model.forward = torch.compile(model.forward, backend="piecewise")``
``compile_config`` recipe (b): ``cache_implementation="static"``, ``CompileConfig(backend="piecewise")``
``compile_config-  recipe (b) as served: one ``StaticCache`` passed to every call, ``reset()`` in place
own-cache``        (the default builds a new cache per call; the cache stays out of the graphs either way)
``torchpcg``       recipe (c): ``model.forward = torchpcg.compile(model.forward)``
=================  ===================================================================================

Method: greedy decoding of exactly ``--new-tokens`` tokens (``min_new_tokens`` = ``max_new_tokens``)
after a prompt of ``--prompt-len`` random ids. Per mode: compile (if any), ``--warmup`` untimed
generate() calls (the first compiles and captures), then ``--repeats`` timed calls, each
synchronised at both ends; tokens/s = batch x new tokens / median seconds. ``same_tokens_as_eager``
compares each mode's tokens with eager's (bf16 Inductor numerics may differ legitimately).
``recompiles``: Dynamo graphs compiled during the timed calls (0 = warm).

    python -m bench.generate --out bench/results/generate-h200.json             # GPU, 1B-class Llama
    python -m bench.generate --device cpu --size tiny --new-tokens 4 --out /tmp/g.json   # smoke

On CPU the piecewise modes use emulated graphs and eager pieces (``hf-compile`` needs Inductor's
C++ toolchain and takes minutes there); on CUDA everything uses its defaults (Inductor pieces,
real CUDA graphs).
"""
from __future__ import annotations

import argparse
import dataclasses
import datetime
import inspect
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

MODES = ("eager", "hf-compile", "forward", "compile_config", "compile_config-own-cache", "torchpcg")
SIZES = {  # random-weight configs; "1b" is a Llama-3.2-1B-like shape
    "tiny": dict(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, head_dim=16),
    "small": dict(vocab_size=32000, hidden_size=1024, intermediate_size=2816, num_hidden_layers=8,
                  num_attention_heads=16, num_key_value_heads=8, head_dim=64),
    "1b": dict(vocab_size=32000, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
               num_attention_heads=32, num_key_value_heads=8, head_dim=64),
}
CPU_PIECEWISE = {"cudagraph": "emulate", "compiler": "eager"}


@dataclasses.dataclass(frozen=True)
class Settings:
    model: str
    size: str
    device: str
    dtype: str
    batch: int
    prompt_len: int
    new_tokens: int
    warmup: int
    repeats: int
    modes: tuple[str, ...]
    seed: int
    varied_prompts: int = 0


def parse_args(argv: list[str] | None) -> tuple[Path, Settings]:
    p = argparse.ArgumentParser(prog="python -m bench.generate", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--out", type=Path, required=True, help="JSON file to write")
    p.add_argument("--model", choices=("llama", "qwen3", "mixtral"), default="llama",
                   help="mixtral: the size's shape with 8 experts, top-2, each expert of the size's MLP width / 4")
    p.add_argument("--size", choices=sorted(SIZES), default=None, help="1b on CUDA, tiny on CPU")
    p.add_argument("--device", default=None, help="cuda (default if available) or cpu")
    p.add_argument("--dtype", choices=("bfloat16", "float32"), default=None, help="bfloat16 on CUDA, float32 on CPU")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--prompt-len", type=int, default=128)
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--warmup", type=int, default=2, help="untimed generate() calls per mode")
    p.add_argument("--repeats", type=int, default=5, help="timed generate() calls per mode")
    p.add_argument("--modes", default=None, help=f"comma list from {','.join(MODES)} (default: all; on CPU all "
                                                 "but hf-compile)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--varied-prompts", type=int, default=0,
                   help="after the timed calls, this many generate() calls with other (shorter) prompt lengths; "
                        "their recompiles and recaptures are recorded")
    args = p.parse_args(argv)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    on_cuda = device.startswith("cuda")
    modes = tuple(m.strip() for m in args.modes.split(",")) if args.modes else \
        (MODES if on_cuda else tuple(m for m in MODES if m != "hf-compile"))
    unknown = sorted(set(modes) - set(MODES))
    if unknown:
        p.error(f"--modes: unknown {unknown}; choose from {','.join(MODES)}")
    if not 0 <= args.varied_prompts < args.prompt_len:
        p.error(f"--varied-prompts={args.varied_prompts}: expected 0 .. --prompt-len - 1 = {args.prompt_len - 1} "
                "(each call a different, shorter prompt)")
    for name in ("batch", "prompt_len", "new_tokens", "repeats"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')}={getattr(args, name)}: expected a positive integer")
    return args.out, Settings(model=args.model, size=args.size or ("1b" if on_cuda else "tiny"), device=device,
                              dtype=args.dtype or ("bfloat16" if on_cuda else "float32"), batch=args.batch,
                              prompt_len=args.prompt_len, new_tokens=args.new_tokens, warmup=args.warmup,
                              repeats=args.repeats, modes=modes, seed=args.seed, varied_prompts=args.varied_prompts)


def build_model(settings: Settings) -> Any:
    import transformers

    shape = dict(SIZES[settings.size])
    max_positions = settings.prompt_len + settings.new_tokens + 64
    if settings.model == "llama":
        shape.pop("head_dim")
        config = transformers.LlamaConfig(max_position_embeddings=max_positions, **shape)
        cls = transformers.LlamaForCausalLM
    elif settings.model == "mixtral":
        shape.pop("head_dim")
        shape["intermediate_size"] = max(shape["intermediate_size"] // 4, 8)  # 8 experts, 2 active per token
        config = transformers.MixtralConfig(max_position_embeddings=max_positions, num_local_experts=8,
                                            num_experts_per_tok=2, **shape)
        cls = transformers.MixtralForCausalLM
    else:
        config = transformers.Qwen3Config(max_position_embeddings=max_positions, **shape)
        cls = transformers.Qwen3ForCausalLM
    config._attn_implementation = "sdpa"
    torch.manual_seed(settings.seed)
    return cls(config).to(device=settings.device, dtype=getattr(torch, settings.dtype)).eval()


def generation_kwargs(settings: Settings) -> dict[str, Any]:
    return {"max_new_tokens": settings.new_tokens, "min_new_tokens": settings.new_tokens, "do_sample": False}


# ---- modes -----------------------------------------------------------------------------------------

def make_mode(name: str, model: Any, settings: Settings) -> Callable[..., torch.Tensor]:
    """A ``generate(ids, **extra) -> tokens`` for one mode (``extra``: more ``generate()`` keywords, a
    streamer); compiles lazily on its first call."""
    import transformers

    import torchpcg

    on_cpu = settings.device == "cpu"
    options = CPU_PIECEWISE if on_cpu else None
    greedy = generation_kwargs(settings)

    def compile_config(**fields: Any) -> Any:
        config = transformers.CompileConfig(**fields)
        if on_cpu:
            config._compile_all_devices = True  # transformers compiles only on accelerators otherwise
        return config

    def with_forward(forward: Callable[..., Any]) -> Callable[..., torch.Tensor]:
        def generate(ids: torch.Tensor, **extra: Any) -> torch.Tensor:
            model.forward = forward
            try:
                return model.generate(ids, **greedy, **extra)
            finally:
                del model.forward
        return generate

    if name == "eager":
        return lambda ids, **extra: model.generate(ids, **greedy, **extra)
    if name == "hf-compile":
        config = compile_config()
        return lambda ids, **extra: model.generate(ids, cache_implementation="static", compile_config=config,
                                                   **greedy, **extra)
    if name == "compile_config":
        if on_cpu:  # CompileConfig passes mode=, and transformers refuses options next to a mode
            os.environ.update({f"TORCHPCG_{k.upper()}": v for k, v in CPU_PIECEWISE.items()})
        config = compile_config(backend="piecewise")
        return lambda ids, **extra: model.generate(ids, cache_implementation="static", compile_config=config,
                                                   **greedy, **extra)
    if name == "compile_config-own-cache":
        if on_cpu:
            os.environ.update({f"TORCHPCG_{k.upper()}": v for k, v in CPU_PIECEWISE.items()})
        config = compile_config(backend="piecewise")
        cache = transformers.StaticCache(config=model.config, max_cache_len=settings.prompt_len + settings.new_tokens)
        cache_name = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"

        def generate_with_cache(ids: torch.Tensor, **extra: Any) -> torch.Tensor:
            cache.reset()  # in place: the graphs keep reading the same addresses
            return model.generate(ids, compile_config=config, **{cache_name: cache}, **greedy, **extra)
        return generate_with_cache
    if name == "forward":
        return with_forward(torch.compile(model.forward, backend="piecewise", options=options))
    if name == "torchpcg":
        return with_forward(torchpcg.compile(model.forward, **(options or {})))
    raise ValueError(f"mode={name!r}: expected one of {MODES}")


def synchronize(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def unique_graphs() -> int:
    return torch._dynamo.utils.counters["stats"]["unique_graphs"]


class TokenClock:
    """A ``generate(streamer=...)`` streamer that stamps the host clock at each ``put``.

    transformers calls ``put`` with the prompt, then with each new token after copying it to the
    host (a sync), so the second stamp is the first token's arrival: time to first token is
    ``stamps[1] - start``, and the decode steps run from there to the last stamp.
    """

    def __init__(self) -> None:
        self.stamps: list[float] = []

    def put(self, value: torch.Tensor) -> None:
        self.stamps.append(time.perf_counter())

    def end(self) -> None:
        pass


def varied_prompt_lengths(prompt_len: int, calls: int) -> list[int]:
    """``calls`` prompt lengths near ``prompt_len``, all different (the recompile/recapture check)."""
    step = max(1, min(7, (prompt_len - 1) // max(calls, 1)))
    return [max(1, prompt_len - step * (i + 1)) for i in range(calls)]


def run_mode(name: str, model: Any, ids: torch.Tensor, reference: torch.Tensor | None,
             settings: Settings) -> tuple[dict[str, Any], torch.Tensor]:
    """One mode: (its JSON row, the tokens of its last timed generate()).

    Timed calls: wall time of the whole call, time to first token and decode tokens/s (from the
    first token to the last, ``TokenClock``). Then ``settings.varied_prompts`` more calls, each with
    a shorter prompt; the recompiles and recaptures they cause are recorded."""
    import torchpcg

    torch._dynamo.reset()
    torchpcg.reset_stats()
    generate = make_mode(name, model, settings)
    row: dict[str, Any] = {"mode": name}
    with torch.no_grad():
        start = time.perf_counter()
        tokens = generate(ids)
        synchronize(settings.device)
        row["first_call_s"] = time.perf_counter() - start
        for _ in range(max(settings.warmup - 1, 0)):
            generate(ids)
        graphs_before = unique_graphs()
        times, ttft, decode = [], [], []
        for _ in range(settings.repeats):
            clock = TokenClock()
            synchronize(settings.device)
            start = time.perf_counter()
            tokens = generate(ids, streamer=clock)
            synchronize(settings.device)
            end = time.perf_counter()
            times.append(end - start)
            if len(clock.stamps) >= 3:
                ttft.append(clock.stamps[1] - start)
                decode.append(settings.batch * (len(clock.stamps) - 2) / (clock.stamps[-1] - clock.stamps[1]))
        row.update(recompiles=unique_graphs() - graphs_before, torchpcg_stats=torchpcg.stats())
        if settings.varied_prompts:
            torchpcg.reset_stats()
            graphs_before = unique_graphs()
            lengths = varied_prompt_lengths(settings.prompt_len, settings.varied_prompts)
            for length in lengths:  # each shorter than the prompt: its first tokens
                generate(ids[:, :length])
            stats = torchpcg.stats()
            row["varied_prompts"] = {"prompt_lens": lengths, "recompiles": unique_graphs() - graphs_before,
                                     "recaptures": stats["recaptures"], "captured": stats["captured"]}
    median = statistics.median(times)
    row.update(median_s=median, times_s=times, tokens_per_s=settings.batch * settings.new_tokens / median)
    if ttft:
        row.update(ttft_s=statistics.median(ttft), decode_tokens_per_s=statistics.median(decode))
    row["same_tokens_as_eager"] = None if reference is None else bool(torch.equal(tokens.cpu(), reference))
    return row, tokens.cpu()


def environment(settings: Settings) -> dict[str, Any]:
    import transformers

    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True,
                                cwd=Path(__file__).resolve().parent).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        commit = "unknown"
    device_name = torch.cuda.get_device_name() if settings.device.startswith("cuda") else platform.processor() or "cpu"
    return {"torch": torch.__version__, "transformers": transformers.__version__, "python": platform.python_version(),
            "device_name": device_name, "commit": commit, "date": datetime.date.today().isoformat(),
            "argv": sys.argv[1:]}


def markdown(record: dict[str, Any]) -> str:
    """One row per mode; the ratio reads the mode's tokens/s ÷ eager's (higher is better)."""
    rows = [r for r in record["results"] if "tokens_per_s" in r]
    eager = next((r for r in rows if r["mode"] == "eager"), None)
    lines = ["| mode | tokens/s | ÷ eager | decode tokens/s | time to first token ms | first call s "
             "| same tokens as eager | recompiles (timed) | varied prompts: recompiles / recaptures |",
             "|---|---:|---:|---:|---:|---:|---|---:|---|"]
    for row in record["results"]:
        if "error" in row:
            lines.append(f"| {row['mode']} | error: {row['error'][:80]} | | | | | | | |")
            continue
        ratio = f"{row['tokens_per_s'] / eager['tokens_per_s']:.2f}" if eager else "n/a"
        decode = f"{row['decode_tokens_per_s']:.1f}" if "decode_tokens_per_s" in row else "n/a"
        ttft = f"{row['ttft_s'] * 1e3:.1f}" if "ttft_s" in row else "n/a"
        varied = row.get("varied_prompts")
        varied_cell = f"{varied['recompiles']} / {varied['recaptures']}" if varied else "not run"
        lines.append(f"| {row['mode']} | {row['tokens_per_s']:.1f} | {ratio} | {decode} | {ttft} | "
                     f"{row['first_call_s']:.1f} | {row['same_tokens_as_eager']} | {row['recompiles']} | {varied_cell} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    out, settings = parse_args(argv)
    torch.set_num_threads(int(os.environ.get("TORCH_NUM_THREADS", torch.get_num_threads())))
    model = build_model(settings)
    ids = torch.randint(0, model.config.vocab_size - 1, (settings.batch, settings.prompt_len),
                        generator=torch.Generator().manual_seed(settings.seed)).to(settings.device)
    record: dict[str, Any] = {"env": environment(settings), "config": dataclasses.asdict(settings), "results": []}
    reference = None
    failed = False
    for name in sorted(settings.modes, key=lambda m: m != "eager"):  # eager first: the reference tokens
        try:
            row, tokens = run_mode(name, model, ids, reference, settings)
        except Exception as exc:  # noqa: BLE001 - a benchmark records a failing mode and goes on
            row, tokens, failed = {"mode": name, "error": f"{type(exc).__name__}: {exc}"}, None, True
        if name == "eager" and tokens is not None:
            reference = tokens
            row["same_tokens_as_eager"] = True
        record["results"].append(row)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(record, indent=1, default=str))  # rewritten per mode: partial runs keep rows
    print(markdown(record))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
