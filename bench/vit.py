"""Vision encoder bench: eager vs piecewise vs whole-encoder graphs on the packed-patch ViT.

In: command-line flags (`python -m bench.vit --help`). Out: a Markdown table on stdout and, in --out
(default bench/results/), <date>-<device>-vit.json and .md. Exit status 1 when a mode failed or
disagreed with eager beyond tolerance (the files are written first), 2 on bad flags.

Example::

    python -m bench.vit                                   # GPU: Qwen2-VL-2B-sized tower, bf16, 1/4/16 images
    python -m bench.vit --device cpu --quick --out /tmp/b # CPU smoke: tiny ViT, emulated graphs, seconds

Each call encodes N images of --grid patches packed along one dim (cu_seqlens on the CPU, as
serving engines keep it). Modes:

- ``eager``: the uncompiled encoder.
- ``piecewise``: ``torchpcg.vision.compile_vision(vit_cuda_graph="piecewise")``: Inductor pieces
  between the varlen attentions, one CUDA graph per piece and patch bucket, attention eager.
- ``full``: ``EncoderGraphs`` around the eager encoder: one graph per (bucket, cu_seqlens),
  attention inside.
- ``full-inductor``: ``EncoderGraphs`` around ``torch.compile(encoder, dynamic=True)``.

Note: one fixed image split per image count, so the whole-encoder modes replay after their first
call; ``first_call_ms`` shows what a new split costs them (a capture).
"""
from __future__ import annotations

import argparse
import dataclasses
import datetime
import gc
import json
import platform
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from bench import measure
from bench.cli import DEFAULT_TOL, DTYPES, UsageError, exit_status, git_commit, names_from, positive_ints
from bench.report import device_name
from torchpcg.models.vit import PackedViT, ViTConfig, pack_images, vit_reference_config

__all__ = ["main", "MODES", "QUICK_IMAGES"]

REPO_ROOT = Path(__file__).resolve().parent.parent
MODES = ("eager", "piecewise", "full", "full-inductor")
DEFAULT_IMAGES = (1, 4, 16)
QUICK_IMAGES = (1, 4, 16)
QUICK_CAPTURE_SIZES = (16, 64, 128)  # 16 images of 4x4 = 256 patches: above the largest, eager path
METHOD = ("latency: per call, synchronize; perf_counter; call; synchronize; perf_counter (host overhead included), "
          "after `warmup` untimed calls; median and p90 of `repeats`. first_call_ms: the first call of a mode at an "
          "image count (compile and capture included). correctness: each mode's output vs eager on the same inputs, "
          "rel_err = ||out-ref||/||ref|| in float64.")


@dataclasses.dataclass(frozen=True)
class Settings:
    quick: bool
    device: torch.device
    dtype: torch.dtype
    model_config: ViTConfig
    grid: tuple[int, int]
    images: tuple[int, ...]
    modes: tuple[str, ...]
    skipped: dict[str, str]
    capture_sizes: tuple[int, ...] | None
    compiler: str  # piecewise pieces
    cudagraph: str
    warmup: int
    repeats: int
    tol: float
    seed: int
    out_dir: Path
    argv: tuple[str, ...]


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.vit", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--quick", action="store_true", help="smoke run: tiny ViT, fp32, emulated graphs on CPU")
    p.add_argument("--device", default=None, help="cuda (default) or cpu (default with --quick)")
    p.add_argument("--dtype", choices=sorted(DTYPES), default=None, help="bfloat16 (default) or float32 (quick)")
    p.add_argument("--images", type=positive_ints, default=None, help="comma list of image counts (default 1,4,16)")
    p.add_argument("--grid", default=None, help="patches per image as ROWSxCOLS (default 16x16, a 224px image "
                                                "with 14px patches; quick 4x4)")
    p.add_argument("--modes", type=names_from(MODES), default=None, help=f"comma list from {','.join(MODES)} (default all)")
    p.add_argument("--layers", type=int, default=None, help="ViT blocks (default 32; quick 2)")
    p.add_argument("--capture-sizes", type=positive_ints, default=None, help="patch buckets (default torchpcg's ViT schedule)")
    p.add_argument("--compiler", choices=("inductor", "eager"), default=None,
                   help="piecewise piece compiler (default inductor; quick eager)")
    p.add_argument("--warmup", type=int, default=None, help="untimed calls per (mode, images) (default 5; quick 1)")
    p.add_argument("--repeats", type=int, default=None, help="timed calls per (mode, images) (default 30; quick 3)")
    p.add_argument("--tol", type=float, default=None, help="max rel_err vs eager (default 3e-2 bf16, 1e-4 fp32)")
    p.add_argument("--seed", type=int, default=0, help="weights and pixels")
    p.add_argument("--out", type=Path, default=REPO_ROOT / "bench" / "results", help="output directory")
    args = p.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    return args


def resolve_settings(args: argparse.Namespace) -> Settings:
    quick = args.quick
    device = torch.device(args.device or ("cpu" if quick else "cuda"))
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UsageError("no CUDA device: run with --device cpu --quick on a CPU machine")
    dtype = DTYPES[args.dtype or ("float32" if quick or device.type == "cpu" else "bfloat16")]
    config = ViTConfig() if quick else vit_reference_config()
    if args.layers is not None:
        config = dataclasses.replace(config, num_layers=args.layers)
    try:
        rows, cols = (int(v) for v in (args.grid or ("4x4" if quick else "16x16")).lower().split("x"))
    except ValueError:
        raise UsageError(f"--grid {args.grid!r}: expected ROWSxCOLS, e.g. 16x16") from None
    if rows % config.merge_size or cols % config.merge_size or rows <= 0 or cols <= 0:
        raise UsageError(f"--grid {rows}x{cols}: rows and cols must be positive multiples of {config.merge_size}")
    skipped = {}
    if quick and args.modes is None:
        skipped["full-inductor"] = "skipped by --quick: a cold CPU Inductor compile of the encoder takes 10-60 s"
    return Settings(
        quick=quick, device=device, dtype=dtype, model_config=config, grid=(rows, cols),
        images=tuple(sorted(set(args.images or (QUICK_IMAGES if quick else DEFAULT_IMAGES)))),
        modes=args.modes or MODES, skipped=skipped,
        capture_sizes=args.capture_sizes or (QUICK_CAPTURE_SIZES if quick else None),
        compiler=args.compiler or ("eager" if quick else "inductor"),
        cudagraph="cuda" if device.type == "cuda" else "emulate",
        warmup=args.warmup if args.warmup is not None else (1 if quick else 5),
        repeats=args.repeats if args.repeats is not None else (3 if quick else 30),
        tol=args.tol or DEFAULT_TOL[dtype], seed=args.seed, out_dir=args.out, argv=tuple(args.argv))


# ---- modes ---------------------------------------------------------------------------------------

Runner = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def build(mode: str, model: PackedViT, settings: Settings) -> tuple[Runner, Any]:
    """(runner, the object whose info() the record keeps, or None)."""
    from torchpcg.vision import EncoderGraphs, compile_vision

    sizes = {"vit_capture_sizes": settings.capture_sizes} if settings.capture_sizes else {}
    if mode == "eager":
        return model, None
    if mode == "piecewise":
        return compile_vision(model, vit_cuda_graph="piecewise", compiler=settings.compiler,
                              cudagraph=settings.cudagraph, **sizes), None
    graphs = EncoderGraphs(model, capture_sizes=settings.capture_sizes, max_graphs=64, cudagraph=settings.cudagraph,
                           compiler="inductor" if mode == "full-inductor" else "eager")
    return graphs, graphs


@dataclasses.dataclass
class Row:
    mode: str
    images: int
    patches: int
    bucket: int | None
    first_call_ms: float
    median_ms: float
    p90_ms: float
    min_ms: float
    rel_err: float
    max_abs_diff: float
    correct: bool


def run_mode(mode: str, model: PackedViT, inputs: dict[int, tuple], references: dict[int, torch.Tensor],
             settings: Settings, buckets: tuple[int, ...]) -> tuple[list[Row], dict[str, Any]]:
    import torchpcg

    torchpcg.reset_stats()
    runner, holder = build(mode, model, settings)
    rows = []
    with torch.no_grad():
        for images, args in inputs.items():
            measure.synchronize(settings.device)
            start = time.perf_counter()
            out = runner(*args)
            measure.synchronize(settings.device)
            first_ms = (time.perf_counter() - start) * 1e3
            check = measure.compare(out, references[images], settings.tol)
            latency = measure.time_call(lambda: runner(*args), settings.device, settings.warmup, settings.repeats)
            patches = args[0].shape[0]
            bucket = next((b for b in buckets if b >= patches), None) if mode != "eager" else None
            rows.append(Row(mode, images, patches, bucket, first_ms, latency.median_ms, latency.p90_ms, latency.min_ms,
                            check.rel_err, check.max_abs_diff, check.ok))
    info: dict[str, Any] = {"torchpcg_stats": torchpcg.stats()}
    if holder is not None:
        info["encoder_graphs"] = holder.info()
    return rows, info


# ---- the run -------------------------------------------------------------------------------------

def run(settings: Settings) -> dict[str, Any]:
    from torchpcg.vision import VisionConfig

    threads = torch.get_num_threads()
    if settings.quick:
        torch.set_num_threads(1)  # tiny matmuls on a shared 2-core box: threads only add contention
    try:
        torch.manual_seed(settings.seed)
        with torch.device(settings.device):
            model = PackedViT(settings.model_config, seed=settings.seed)
        model = model.to(settings.dtype).eval().requires_grad_(False)
        inputs = {n: pack_images([settings.grid] * n, settings.model_config, seed=settings.seed + n,
                                 device=settings.device, dtype=settings.dtype) for n in settings.images}
        with torch.no_grad():
            references = {n: model(*args) for n, args in inputs.items()}
        buckets = VisionConfig.resolve({"vit_capture_sizes": settings.capture_sizes} if settings.capture_sizes
                                       else {}).buckets
        rows: list[Row] = []
        info: dict[str, Any] = {}
        failed: dict[str, str] = {}
        unavailable = dict(settings.skipped)
        for mode in settings.modes:
            if mode in unavailable:
                continue
            try:
                mode_rows, info[mode] = run_mode(mode, model, inputs, references, settings, buckets)
                rows.extend(mode_rows)
            except Exception as err:  # noqa: BLE001 - record it, measure the other modes, exit 1 at the end
                failed[mode] = f"{type(err).__name__}: {err}".splitlines()[0]
                info[mode] = {"traceback": traceback.format_exc()}
                print(info[mode]["traceback"], file=sys.stderr)
            _free(settings.device)
    finally:
        torch.set_num_threads(threads)
    wrong = {}
    for row in rows:
        if not row.correct and row.mode not in wrong:
            wrong[row.mode] = f"{row.images} images: rel_err {row.rel_err:.3g} > tol {settings.tol:g}"
    return {
        "device": device_name(settings.device), "torch": torch.__version__, "commit": _commit(),
        "config": {"model": dataclasses.asdict(settings.model_config), "dtype": str(settings.dtype).removeprefix("torch."),
                   "grid": list(settings.grid), "images": list(settings.images), "buckets": list(buckets),
                   "piecewise_compiler": settings.compiler, "cudagraph": settings.cudagraph,
                   "param_count": sum(p.numel() for p in model.parameters()), "warmup": settings.warmup,
                   "repeats": settings.repeats, "tol_rel": settings.tol, "seed": settings.seed},
        "results": [dataclasses.asdict(row) for row in rows],
        "unavailable": unavailable, "failed": failed, "wrong": wrong, "info": info,
        "complete": not failed and all(m in info or m in unavailable for m in settings.modes),
        "method": METHOD, "date": datetime.date.today().isoformat(), "python": platform.python_version(),
        "cuda": torch.version.cuda, "argv": list(settings.argv),
    }


def _free(device: torch.device) -> None:
    gc.collect()
    torch._dynamo.reset()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()


def _commit() -> str:
    return git_commit(REPO_ROOT) or "unknown"


# ---- the record ----------------------------------------------------------------------------------

def markdown(results: dict[str, Any]) -> str:
    """The table (median ms per call; rows: image counts; columns: modes) and the details."""
    config = results["config"]
    modes = [m for m in MODES if any(r["mode"] == m for r in results["results"])]
    by = {(r["mode"], r["images"]): r for r in results["results"]}
    model = config["model"]
    lines = [
        f"# Vision encoder bench: {results['device']}",
        "",
        f"torch {results['torch']}, commit {results['commit']}, {config['dtype']}, "
        f"{model['num_layers']} blocks x hidden {model['hidden_size']} ({config['param_count'] / 1e6:.3g}M params), "
        f"images of {config['grid'][0]}x{config['grid'][1]} patches, piecewise pieces: {config['piecewise_compiler']}, "
        f"graphs: {config['cudagraph']}",
        "",
        "## Median ms per call (speedup over eager)",
        "",
        "| images | patches | " + " | ".join(modes) + " |",
        "|---|---|" + "---|" * len(modes),
    ]
    for images in config["images"]:
        eager = by.get(("eager", images))
        cells = []
        for mode in modes:
            row = by.get((mode, images))
            if row is None:
                cells.append("n/a")
                continue
            speedup = f" ({eager['median_ms'] / row['median_ms']:.2f}x)" if eager and mode != "eager" else ""
            cells.append(f"{row['median_ms']:.3f}{speedup}" + ("" if row["correct"] else " WRONG"))
        patches = next((r["patches"] for r in results["results"] if r["images"] == images), "")
        lines.append(f"| {images} | {patches} | " + " | ".join(cells) + " |")
    lines += ["", "## First call ms (compile + capture) / p90 ms / rel_err vs eager", "",
              "| mode | images | bucket | first call | p90 | rel_err |", "|---|---|---|---|---|---|"]
    for row in results["results"]:
        lines.append(f"| {row['mode']} | {row['images']} | {row['bucket'] or '-'} | {row['first_call_ms']:.1f} | "
                     f"{row['p90_ms']:.3f} | {row['rel_err']:.2e} |")
    for title, key in (("Not run", "unavailable"), ("Failed", "failed"), ("Wrong", "wrong")):
        if results[key]:
            lines += ["", f"{title}:", ""] + [f"- {mode}: {why}" for mode, why in results[key].items()]
    lines += ["", f"Method: {results['method']}", ""]
    return "\n".join(lines)


def write(results: dict[str, Any], out_dir: Path, quick: bool) -> list[Path]:
    """<date>-<device>-vit[-quick].json (via a .tmp rename) and .md in out_dir."""
    out_dir.mkdir(parents=True, exist_ok=True)
    slug = "cpu" if results["device"].startswith("cpu") else "".join(
        c if c.isalnum() else "-" for c in results["device"].lower()).strip("-")
    stem = out_dir / f"{results['date']}-{slug}-vit{'-quick' if quick else ''}"
    json_path, md_path = stem.with_suffix(".json"), stem.with_suffix(".md")
    tmp = stem.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(results, indent=2, default=str) + "\n")
    tmp.replace(json_path)
    md_path.write_text(markdown(results))
    return [json_path, md_path]


def main(argv: list[str] | None = None) -> int:
    try:
        settings = resolve_settings(parse_args(argv))
    except UsageError as err:
        print(f"python -m bench.vit: error: {err}", file=sys.stderr)
        return 2
    results = run(settings)
    paths = write(results, settings.out_dir, settings.quick)
    print(markdown(results))
    print("\n".join(f"wrote {path}" for path in paths))
    return exit_status(results)


if __name__ == "__main__":
    sys.exit(main())
