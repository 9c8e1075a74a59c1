"""Where a mode's setup time goes, from a cold Inductor cache: one fresh process per mode.

Each mode of the decoder bench (``bench/modes.py``) is built in a fresh Python process whose
``TORCHINDUCTOR_CACHE_DIR`` (and Triton's cache inside it) is a new empty folder, so every mode
pays its own compiles, as a first-time user does. The bench itself runs its modes in one process
on one cache folder, so a later mode may find an earlier one's kernels.

Per mode it prints the build's wall seconds (compile + capture of every default bucket), the FX
graph cache counters, torchpcg's compiles by kind with their seconds (from the
``torchpcg.compilers`` log), and the functions with the most cumulative time (cProfile):

    python scripts/setup_breakdown.py --modes inductor-cudagraph,piecewise
    python scripts/setup_breakdown.py --modes piecewise --piecewise-option backed_compile=0
    python scripts/setup_breakdown.py --quick --modes piecewise     # CPU smoke, tiny model
    python scripts/setup_breakdown.py --modes piecewise --warm      # then a second process on that cache:
                                                                    # where a warm start's time goes
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

CHILD_FLAG = "--child"
_COMPILED = re.compile(r"inductor compiled (?P<name>.*) in (?P<seconds>[0-9.]+)s")


class _CompileLog(logging.Handler):
    """Collects torchpcg.compilers' "inductor compiled <piece> in <s>s" records."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.compiles: list[tuple[str, float]] = []

    def emit(self, record: logging.LogRecord) -> None:
        found = _COMPILED.search(record.getMessage())
        if found:
            self.compiles.append((found["name"], float(found["seconds"])))


def _kind(name: str) -> str:
    for kind in ("exact shapes", "T backed"):
        if kind in name:
            return kind
    return "Dynamo's T"


def child(mode_name: str, flags: list[str]) -> dict[str, Any]:
    """Build one mode on the cache the parent set; its setup seconds, compiles and top functions."""
    import cProfile
    import dataclasses
    import pstats

    import torch

    from bench import decoder
    from bench.modes import MODES

    settings = decoder.resolve_settings(decoder.parse_args(flags + ["--no-progress"]))
    handler = _CompileLog()
    compilers_log = logging.getLogger("torchpcg.compilers")
    compilers_log.addHandler(handler)
    compilers_log.setLevel(logging.DEBUG)
    mode = {m.name: m for m in MODES}[mode_name]
    with torch.no_grad():
        ctx = decoder.prefilled_context(settings)
        profiler = cProfile.Profile()
        start = time.perf_counter()
        profiler.enable()
        mode.build(dataclasses.replace(ctx, info={}))
        if settings.device.type == "cuda":
            torch.cuda.synchronize()
        profiler.disable()
        seconds = time.perf_counter() - start
    stats = pstats.Stats(profiler)
    rows = sorted(((func, entry[3]) for func, entry in stats.stats.items()), key=lambda r: -r[1])
    interesting = [f"{cum:7.2f} s  {Path(func[0]).name}:{func[1]}({func[2]})" for func, cum in rows
                   if "torch/" in func[0] or "torchpcg" in func[0] or "bench" in func[0]][:40]
    own = sorted(stats.stats.items(), key=lambda item: -item[1][2])[:25]  # (file, line, name) -> (.., tottime, ..)
    top_own = [f"{entry[2]:7.2f} s  {Path(func[0]).name}:{func[1]}({func[2]})" for func, entry in own]
    by_kind: dict[str, list[float]] = {}
    for name, secs in handler.compiles:
        by_kind.setdefault(_kind(name), []).append(secs)
    counters = torch._dynamo.utils.counters["inductor"]
    return {"mode": mode_name, "setup_s": seconds, "fxgraph_cache_hit": counters["fxgraph_cache_hit"],
            "fxgraph_cache_miss": counters["fxgraph_cache_miss"],
            "compiles": {k: {"count": len(v), "seconds": sum(v), "max_s": max(v)} for k, v in by_kind.items()},
            "dynamo_compile_times": torch._dynamo.utils.compile_times(repr="str", aggregate=True),
            "top_cumulative": interesting, "top_own": top_own}


def _print_result(result: dict[str, Any]) -> None:
    cache = "a cold cache" if result["start"] == "cold" else "the cache the cold process filled"
    print(f"## {result['mode']}, {result['start']}: setup {result['setup_s']:.1f} s from {cache}; FX graph cache "
          f"{result['fxgraph_cache_miss']} miss, {result['fxgraph_cache_hit']} hit")
    for kind, c in result["compiles"].items():
        print(f"- torchpcg compiles, {kind}: {c['count']}, {c['seconds']:.1f} s (longest {c['max_s']:.1f} s)")
    print("\n```\n" + result["dynamo_compile_times"] + "\n```\n\nTop cumulative:\n```")
    print("\n".join(result["top_cumulative"]) + "\n```\n\nTop own time:\n```")
    print("\n".join(result.get("top_own", [])) + "\n```\n")


def main(argv: list[str] | None = None) -> int:
    from bench.cli import names_from
    from bench.modes import MODE_NAMES

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(CHILD_FLAG, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--modes", default="inductor-cudagraph,piecewise", type=names_from(MODE_NAMES),
                        help="comma list of bench modes, each set up in a fresh process")
    parser.add_argument("--quick", action="store_true", help="CPU smoke: the bench's tiny model")
    parser.add_argument("--piecewise-option", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--warm", action="store_true",
                        help="after each cold process, a second one on the same cache (a warm start), reported too")
    parser.add_argument("--out", type=Path, default=None, help="JSON output path")
    args = parser.parse_args(argv)
    flags = ["--quick"] if args.quick else []
    for item in args.piecewise_option:
        flags += ["--piecewise-option", item]
    if args.child:
        print(json.dumps(child(args.child, flags)))
        return 0
    results = []
    for name in args.modes:
        with tempfile.TemporaryDirectory() as cache:
            env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": cache, "TRITON_CACHE_DIR": os.path.join(cache, "triton")}
            command = [sys.executable, __file__, CHILD_FLAG, name, "--modes", name, *flags]
            for start in ("cold", "warm") if args.warm else ("cold",):
                done = subprocess.run(command, env=env, capture_output=True, text=True)
                if done.returncode != 0:
                    print(f"## {name}, {start}: failed (exit {done.returncode})\n{done.stderr[-3000:]}")
                    break
                result = {**json.loads(done.stdout.strip().splitlines()[-1]), "start": start}
                results.append(result)
                _print_result(result)
    if args.out:
        args.out.write_text(json.dumps({"options": args.piecewise_option, "results": results}, indent=1))
    return 0 if results else 1


if __name__ == "__main__":
    sys.exit(main())
