"""Turn a bench run into its record: the results dict (JSON), a Markdown report and the plot.

In: Settings and ModeOutcomes from bench/decoder.py. Out: a JSON-ready dict, Markdown text, files
<date>-<device-slug>.json/.md/.png. `python -m bench.report RESULTS.json` reprints the Markdown
(and redraws the PNG beside it) from a stored JSON file.
"""
from __future__ import annotations

import dataclasses
import datetime
import json
import math
import os
import platform
import re
import sys
from pathlib import Path
from typing import Any

import torch

from bench.modes import MODE_NAMES, MODES

__all__ = ["build", "markdown", "write", "file_stem"]

SUMMARIES = {mode.name: mode.summary for mode in MODES}


def build(settings: Any, outcomes: dict[str, Any], buckets: tuple[int, ...], workload: Any,
          baseline: Any, method: str, commit: str, param_count: int,
          activation_peak_mb: float | None = None, machine: dict[str, float | None] | None = None,
          activation_reserved_mb: float | None = None, stream_workspace_mb: float | None = None) -> dict[str, Any]:
    """The results dict; keys past the required ones (device..memory_mb) are extras for readers."""
    names = [name for name in MODE_NAMES if name in outcomes]
    by_status = {status: {n: outcomes[n].reason for n in names if outcomes[n].status == status}
                 for status in ("unavailable", "failed", "wrong")}
    mixed_sizes = [ids.shape[0] for ids, _ in workload.mixed]
    distinct_sizes = [ids.shape[0] for ids, _ in workload.distinct]
    return {
        "device": device_name(settings.device),
        "torch": torch.__version__,
        "commit": commit,
        "config": _config(settings, buckets, param_count),
        "results": [_result_row(outcomes[n], t) for n in names for t in settings.tokens if t in outcomes[n].latency],
        "mixed": {n: outcomes[n].mixed_s for n in names if outcomes[n].mixed_s is not None},
        "mixed_again": {n: outcomes[n].mixed_again_s for n in names if outcomes[n].mixed_again_s is not None},
        "mixed_distinct": {n: outcomes[n].distinct_s for n in names if outcomes[n].distinct_s is not None},
        "setup_s": {n: outcomes[n].setup_s for n in names if outcomes[n].setup_s is not None},
        "memory_mb": {n: outcomes[n].memory_mb for n in names if outcomes[n].memory_mb},
        **by_status,
        "baseline_memory_mb": dataclasses.asdict(baseline) if baseline is not None else None,
        # one eager call at the largest bucket: peak allocated above what was live before it
        "eager_activation_peak_mb": activation_peak_mb,
        # the same call in a private memory pool: its segments (whole, as graph memory is counted)
        "eager_activation_reserved_mb": activation_reserved_mb,
        # cuBLAS's workspace for a side stream: one sits in each graph mode's setup memory
        "stream_workspace_mb": stream_workspace_mb,
        "machine_speed": machine,  # measure.machine_speed: compare runs only on machines of one speed
        "mixed_traffic": {"calls": len(mixed_sizes), "seed": settings.seed, "tokens_total": sum(mixed_sizes),
                          "distinct_sizes": len(set(mixed_sizes)), "largest_bucket": buckets[-1],
                          "above_largest_bucket": sum(t > buckets[-1] for t in mixed_sizes)},
        "distinct_traffic": {"calls": len(distinct_sizes), "seed": settings.seed, "tokens_total": sum(distinct_sizes),
                             "distinct_sizes": len(set(distinct_sizes)), "largest_bucket": buckets[-1]},
        "info": {n: outcomes[n].info for n in names if outcomes[n].info},
        "modes": {n: SUMMARIES[n] for n in names},
        "complete": set(names) == set(settings.modes),  # False in the files written after each mode
        "method": method,
        "date": datetime.date.today().isoformat(),
        "python": platform.python_version(),
        "cuda": torch.version.cuda,
        "argv": list(settings.argv),
    }


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)"


def _config(settings: Any, buckets: tuple[int, ...], param_count: int) -> dict[str, Any]:
    dtype_bytes = torch.empty((), dtype=settings.dtype).element_size()
    return {
        "model": dataclasses.asdict(settings.model_config),
        "param_count": param_count,
        "param_bytes": param_count * dtype_bytes,  # bytes a decode step must read at least once
        "dtype": str(settings.dtype).removeprefix("torch."),
        "context": settings.context,
        "tokens": list(settings.tokens),
        "modes": list(settings.modes),
        "buckets": list(buckets),
        "piecewise_options": {k: list(v) if isinstance(v, tuple) else v for k, v in settings.piecewise_options.items()},
        "warmup": settings.warmup,
        "repeats": settings.repeats,
        "rounds": settings.rounds,
        "mixed_calls": settings.mixed_calls,
        "seed": settings.seed,
        "tol_rel": settings.tol,
        "quick": settings.quick,
        "attention": settings.attention,
    }


def _result_row(outcome: Any, num_tokens: int) -> dict[str, Any]:
    latency, error = outcome.latency[num_tokens], outcome.errors.get(num_tokens)
    row = {"mode": outcome.name, "tokens": num_tokens, "median_ms": latency.median_ms, "p90_ms": latency.p90_ms,
           "min_ms": latency.min_ms, "repeats": latency.repeats}
    if error is not None:
        row.update(max_abs_diff=_finite(error.max_abs_diff), rel_err=_finite(error.rel_err), correct=error.ok)
    return row


def _finite(value: float) -> float | None:
    return value if math.isfinite(value) else None  # JSON has no inf/nan


# ---- files ---------------------------------------------------------------------------------------

def file_stem(results: dict[str, Any], quick: bool) -> str:
    slug = "cpu" if results["device"].startswith("cpu") else re.sub(r"[^a-z0-9]+", "-", results["device"].lower())
    return f"{results['date']}-{slug.strip('-')}" + ("-quick" if quick else "")


def write(results: dict[str, Any], out_dir: Path, quick: bool) -> list[Path]:
    """<stem>.json (written via a .tmp rename), <stem>.md and <stem>.png in out_dir."""
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = out_dir / file_stem(results, quick)
    json_path, md_path, png_path = stem.with_suffix(".json"), stem.with_suffix(".md"), stem.with_suffix(".png")
    tmp = stem.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(results, indent=2, default=str) + "\n")
    tmp.replace(json_path)
    md_path.write_text(markdown(results, plot_name=png_path.name))
    from bench.plot import plot_latency

    plot_latency(results, png_path)
    return [json_path, md_path, png_path]


# ---- Markdown ------------------------------------------------------------------------------------

def markdown(results: dict[str, Any], plot_name: str | None = None) -> str:
    cfg = results["config"]
    names = [n for n in MODE_NAMES if n in results["modes"]]  # the modes done so far
    lines = [f"# Decoder bench: {results['device']}" + ("" if results.get("complete", True) else " (partial)"), "",
             f"torch {results['torch']} (CUDA {results['cuda']}), commit `{results['commit']}`, {results['date']}.", "",
             _config_line(cfg), ""]
    speed = results.get("machine_speed")
    if speed:
        gpu = f", {speed['gpu_matmul_ms']:.2f} ms for 20 bf16 2048x2048 matmuls" if speed.get("gpu_matmul_ms") else ""
        lines += [f"Machine speed: {speed['host_op_us']:.1f} µs to issue a small op{gpu} "
                  "(compare ratios across runs only on machines of one speed).", ""]
    if plot_name:
        lines += [f"![latency vs tokens]({plot_name})", ""]
    lines += ["## Latency per call, median ms", "", *_latency_table(results, names, "median_ms"), ""]
    lines += ["## Setup, memory, mixed traffic", "", *_setup_table(results, names), ""]
    lines += _ratio_section(results)
    if any(row["mode"] == "eager" for row in results["results"]):  # a table of dashes says nothing
        lines += ["## Speedup over eager (median)", "", *_speedup_table(results, names), ""]
    lines += ["## Latency per call, p90 ms", "", *_latency_table(results, names, "p90_ms"), ""]
    lines += _notes(results, names)
    lines += ["## Modes", "", *[f"- `{n}`: {results['modes'].get(n, SUMMARIES[n])}" for n in names], ""]
    lines += ["## Method", "", results["method"], ""]
    return "\n".join(lines)


def _config_line(cfg: dict[str, Any]) -> str:
    m = cfg["model"]
    buckets = cfg["buckets"]
    return (f"Model: {m['num_layers']} layers, hidden {m['hidden_size']}, {m['num_heads']} heads "
            f"({m['num_kv_heads']} kv), intermediate {m['intermediate_size']}, vocab {m['vocab_size']}, "
            f"{cfg['param_count'] / 1e6:.0f}M params, {cfg['dtype']}; cache context {cfg['context']}. "
            f"Buckets: {len(buckets)} ({buckets[0]}..{buckets[-1]}). {cfg['warmup']} warmup + {cfg['repeats']} "
            f"timed calls per cell. Piecewise options: {cfg['piecewise_options'] or 'defaults'}."
            + (f" Attention op: {cfg['attention']} (`--attention`)." if cfg.get("attention", "reference") != "reference"
               else ""))


def _rows_by_mode(results: dict[str, Any]) -> dict[tuple[str, int], dict[str, Any]]:
    return {(row["mode"], row["tokens"]): row for row in results["results"]}


def _status_cell(results: dict[str, Any], name: str) -> str | None:
    if name in results.get("unavailable", {}):
        return "n/a"
    if name in results.get("failed", {}):
        return "failed"
    return None


def _latency_table(results: dict[str, Any], names: list[str], key: str) -> list[str]:
    rows = _rows_by_mode(results)
    lines = ["| T | " + " | ".join(names) + " |", "|---:|" + "---:|" * len(names)]
    for num_tokens in results["config"]["tokens"]:
        cells = []
        for name in names:
            row = rows.get((name, num_tokens))
            if row is None:
                cells.append(_status_cell(results, name) or "-")
            else:
                cells.append(f"{row[key]:.3f}" + ("" if row.get("correct", True) else " (wrong)"))
        lines.append(f"| {num_tokens} | " + " | ".join(cells) + " |")
    return lines


def _speedup_table(results: dict[str, Any], names: list[str]) -> list[str]:
    rows = _rows_by_mode(results)
    lines = ["| T | " + " | ".join(names) + " |", "|---:|" + "---:|" * len(names)]
    for num_tokens in results["config"]["tokens"]:
        eager = rows.get(("eager", num_tokens))
        cells = []
        for name in names:
            row = rows.get((name, num_tokens))
            cells.append(f"{eager['median_ms'] / row['median_ms']:.2f}x" if row and eager else
                         (_status_cell(results, name) or "-"))
        lines.append(f"| {num_tokens} | " + " | ".join(cells) + " |")
    return lines


def _setup_table(results: dict[str, Any], names: list[str]) -> list[str]:
    calls = results["mixed_traffic"]["calls"]
    rows = _rows_by_mode(results)
    lines = [f"| mode | setup s | reserved Δ setup MiB | allocated Δ setup MiB | peak MiB | mixed s ({calls} calls) "
             f"| mixed again s | every T new s ({results.get('distinct_traffic', {}).get('calls', '-')} calls) "
             "| max rel_err | status |", "|---|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
    for name in names:
        memory = results["memory_mb"].get(name, {})
        errors = [row.get("rel_err") for (mode, _), row in rows.items() if mode == name and "rel_err" in row]
        worst = "inf" if None in errors else (f"{max(errors):.2e}" if errors else "-")
        status = next((s for s in ("unavailable", "failed", "wrong") if name in results.get(s, {})), "ok")
        cells = [_num(results["setup_s"].get(name), 1), _num(memory.get("setup_reserved_delta"), 0),
                 _num(memory.get("setup_allocated_delta"), 0), _num(memory.get("peak_allocated"), 0),
                 _num(results["mixed"].get(name), 3), _num(results.get("mixed_again", {}).get(name), 3),
                 _num(results.get("mixed_distinct", {}).get(name), 3), worst,
                 status]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return lines


# The whole-model graph is the decode upper bound; the others are what a user would otherwise run.
_UPPER_BOUND = "inductor-cudagraph"
_OTHERS = ("eager", "inductor", "reduce-overhead", "reduce-overhead-unmarked", "eager-cudagraph")


# Mixed-traffic results keys and their row labels: the first pass (first-sight costs included) and
# the same calls again (every size seen once).
_MIXED_ROWS = (("mixed", "mixed"), ("mixed_again", "mixed, again"), ("mixed_distinct", "every T new"))


def ratios(results: dict[str, Any], name: str) -> dict[str, dict[Any, float]]:
    """``name``'s median over the upper bound and over the best other mode, per T and for mixed traffic."""
    rows = _rows_by_mode(results)
    out: dict[str, dict[Any, float]] = {"vs_upper_bound": {}, "vs_best_other": {}}
    for num_tokens in results["config"]["tokens"]:
        mine = rows.get((name, num_tokens))
        if mine is None:
            continue
        bound = rows.get((_UPPER_BOUND, num_tokens))
        if bound:
            out["vs_upper_bound"][num_tokens] = mine["median_ms"] / bound["median_ms"]
        others = [rows[(o, num_tokens)]["median_ms"] for o in _OTHERS if (o, num_tokens) in rows]
        if others:
            out["vs_best_other"][num_tokens] = mine["median_ms"] / min(others)
    for key, label in _MIXED_ROWS:
        mixed = results.get(key, {})
        if not mixed.get(name):
            continue
        if mixed.get(_UPPER_BOUND):
            out["vs_upper_bound"][label] = mixed[name] / mixed[_UPPER_BOUND]
        others = [mixed[o] for o in _OTHERS if mixed.get(o)]
        if others:
            out["vs_best_other"][label] = mixed[name] / min(others)
    return out


def _ratio_section(results: dict[str, Any]) -> list[str]:
    """torchpcg's modes as a fraction of the whole-model graph and of the best other mode (lower is better)."""
    mine = [n for n in ("piecewise", "piecewise-full-decode") if n in results["modes"]]
    if not mine or not any((_UPPER_BOUND, t) in _rows_by_mode(results) for t in results["config"]["tokens"]):
        return []
    found = {n: ratios(results, n) for n in mine}
    keys = [*results["config"]["tokens"], *(label for _, label in _MIXED_ROWS)]
    header = " | ".join(f"{n} / {_UPPER_BOUND} | {n} / best other" for n in mine)
    lines = ["## torchpcg vs the others (median ratio, lower is better)", "",
             f"| T | {header} |", "|---:|" + "---:|" * (2 * len(mine))]
    for key in keys:
        cells = []
        for n in mine:
            for kind in ("vs_upper_bound", "vs_best_other"):
                value = found[n][kind].get(key)
                cells.append("-" if value is None else f"{value:.2f}")
        lines.append(f"| {key} | " + " | ".join(cells) + " |")
    lines.append("")
    lines.append(f"Best other = the fastest of {', '.join(f'`{o}`' for o in _OTHERS)} at that T.")
    return lines + [""]


def _num(value: float | None, digits: int) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def _notes(results: dict[str, Any], names: list[str]) -> list[str]:
    lines = []
    for status, label in (("unavailable", "n/a"), ("failed", "failed"), ("wrong", "wrong vs eager")):
        for name, reason in results.get(status, {}).items():
            lines.append(f"- `{name}`: {label} ({reason})")
    mixed = results["mixed_traffic"]
    lines.append(f"- Mixed traffic: {mixed['calls']} calls, seed {mixed['seed']}, {mixed['tokens_total']} tokens, "
                 f"{mixed['distinct_sizes']} distinct T, {mixed['above_largest_bucket']} above the largest bucket "
                 f"({mixed['largest_bucket']}); total wall seconds per mode, graphs captured lazily included. "
                 f"'mixed again' replays the same calls once more: what is left once every size was seen.")
    distinct = results.get("distinct_traffic")
    if distinct:
        lines.append(f"- Every T new: {distinct['calls']} calls, {distinct['distinct_sizes']} distinct T drawn uniformly "
                     f"from 1..{distinct['largest_bucket']} without repeats (seed {distinct['seed']}), "
                     f"{distinct['tokens_total']} tokens: a server's traffic, where nearly every call brings a token "
                     f"count not seen before; timed after the mixed runs.")
    peak, reserved = results.get("eager_activation_peak_mb"), results.get("eager_activation_reserved_mb")
    if peak:
        lines.append(f"- Eager activation peak of one call at the largest bucket ({results['mixed_traffic']['largest_bucket']}): "
                     f"{peak:.0f} MiB. Memory reserved during setup over it: {_over(results, names, peak)}.")
    if reserved:
        lines.append(f"- The same eager call in a private memory pool (as a graph's allocations are) reserved "
                     f"{reserved:.0f} MiB of allocator segments (graph memory is counted in whole segments too). "
                     f"Memory reserved during setup over it: "
                     f"{_over(results, names, reserved)}.")
    workspace = results.get("stream_workspace_mb")
    if reserved and workspace:
        # torchpcg's modes share one capture stream per process: in one process only the first of them made it.
        isolated = "--isolate" in results.get("argv", [])
        first = next((n for n in names if n.startswith("piecewise")), None)
        paid = [n for n in names if isolated or not n.startswith("piecewise") or n == first]
        lines.append(f"- {workspace:.0f} MiB of a graph mode's setup memory is cuBLAS's workspace for the side stream "
                     f"it captures on (made by the first captured matmul, kept for the process; measured as one "
                     f"matmul on a side stream). torchpcg captures on one stream per device, so in one process only "
                     f"its first mode pays it. Less it, over the private-pool yardstick: "
                     f"{_over(results, paid, reserved, less=workspace)}.")
    info = results.get("info", {})
    hosts = [f"`{n}` {info[n]['host_op_us']:.1f}" for n in names if info.get(n, {}).get("host_op_us")]
    if hosts:
        lines.append(f"- Host speed just before each mode was timed, µs to issue a small op: {', '.join(hosts)}. "
                     f"A mode timed while the host ran slower reads slower by its host share of a call.")
    direct = [f"`{n}` {info[n]['direct_calls']}" for n in names if "direct_calls" in info.get(n, {})]
    if direct and "skip_guard_check" in (results.get("config", {}).get("piecewise_options") or {}):
        lines.append(f"- Calls that ran Dynamo's compiled code directly (`skip_guard_check`): {', '.join(direct)}.")
    guarded = [f"`{n}` {info[n]['guarded_calls']}" for n in names if info.get(n, {}).get("guarded_calls")]
    if guarded:
        lines.append(f"- Calls that ran Dynamo's compiled code directly after its guards passed (`guarded_direct`, "
                     f"the default): {', '.join(guarded)}.")
    skips = info.get("reduce-overhead", {}).get("cudagraph_skip_messages")
    if skips:
        lines.append(f"- `reduce-overhead` ran without CUDA graphs: {skips[0]}")
    return ["## Notes", "", *lines, ""]


def _over(results: dict[str, Any], names: list[str], yardstick: float, less: float = 0.0) -> str:
    """Each mode's memory reserved during setup, ``less`` MiB, over ``yardstick`` MiB, as "`mode` 2.51x, ..."."""
    graphs = [f"`{n}` {(memory['setup_reserved_delta'] - less) / yardstick:.2f}x" for n in names
              if (memory := results["memory_mb"].get(n, {})).get("setup_reserved_delta") is not None]
    return ", ".join(graphs) or "-"


def main(argv: list[str] | None = None) -> int:
    paths = [Path(arg) for arg in (argv if argv is not None else sys.argv[1:])]
    if not paths:
        print("usage: python -m bench.report RESULTS.json [...]", file=sys.stderr)
        return 2
    from bench.plot import plot_latency

    for path in paths:
        results = json.loads(path.read_text())
        try:
            plot_latency(results, path.with_suffix(".png"))
        except OSError as err:  # a read-only results folder: the table still prints
            print(f"plot not redrawn: {err}", file=sys.stderr)
        print(markdown(results, plot_name=path.with_suffix(".png").name))
    return 0


if __name__ == "__main__":
    sys.exit(main())
