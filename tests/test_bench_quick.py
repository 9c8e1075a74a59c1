"""Smoke tests of the decoder bench (`python -m bench.decoder --quick`): it runs on CPU, writes its
record (JSON schema, Markdown, PNG), prints the table, checks every mode against eager and fails
loudly when a mode is wrong. The numbers themselves are not tested: benchmarks are scripts."""
from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))  # bench/ is a repo script package, not installed with torchpcg

from bench import decoder  # noqa: E402
from bench.modes import MODE_NAMES, MODES, Mode  # noqa: E402
from bench.profile_decode import _call_ranges, _idle_by_decile, _is_gpu_work  # noqa: E402
from tests.utils import without_graphs  # noqa: E402

REQUIRED_KEYS = {"device", "torch", "commit", "config", "results", "mixed", "setup_s", "memory_mb"}
ROW_KEYS = {"mode", "tokens", "median_ms", "p90_ms", "max_abs_diff", "rel_err", "correct"}
CUDA_MODES = ("reduce-overhead", "eager-cudagraph", "inductor-cudagraph")


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[subprocess.CompletedProcess[str], Path]:
    out = tmp_path_factory.mktemp("bench")
    proc = subprocess.run(
        [sys.executable, "-m", "bench.decoder", "--quick", "--no-progress", "--out", str(out)],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=600,
    )
    return proc, out


def _results(out: Path) -> dict:
    (path,) = out.glob("*.json")
    return json.loads(path.read_text())


@pytest.mark.slow
def test_quick_bench_exits_zero_and_prints_table(quick_run) -> None:
    proc, _ = quick_run
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "| T | " + " | ".join(MODE_NAMES) + " |" in proc.stdout
    for num_tokens in decoder.QUICK_TOKENS:
        assert f"\n| {num_tokens} | " in proc.stdout
    assert "## Setup, memory, mixed traffic" in proc.stdout


@pytest.mark.slow
def test_quick_bench_json_schema(quick_run) -> None:
    _, out = quick_run
    results = _results(out)
    assert REQUIRED_KEYS <= set(results)
    assert results["torch"] == torch.__version__ and results["device"].startswith("cpu")
    assert results["config"]["tokens"] == list(decoder.QUICK_TOKENS)
    for row in results["results"]:
        assert ROW_KEYS <= set(row) and row["mode"] in MODE_NAMES
        assert 0 < row["median_ms"] <= row["p90_ms"]
    ran = {row["mode"] for row in results["results"]}
    assert {"eager", "piecewise"} <= ran
    for mode in ran:
        assert {row["tokens"] for row in results["results"] if row["mode"] == mode} == set(decoder.QUICK_TOKENS)
        assert results["setup_s"][mode] >= 0 and results["mixed"][mode] > 0 and mode in results["memory_mb"]
        assert results["mixed_again"][mode] > 0
    for mode in CUDA_MODES:  # skipped on CPU, with the reason on record
        assert mode not in ran and "CUDA" in results["unavailable"][mode]
    assert results["mixed_traffic"]["calls"] >= 200 and results["mixed_traffic"]["above_largest_bucket"] > 0
    assert results["failed"] == {} and results["wrong"] == {} and results["complete"]
    # the machine's speed, to compare runs on different machines: a host op timing; no GPU number on CPU
    assert results["machine_speed"]["host_op_us"] > 0 and results["machine_speed"]["gpu_matmul_ms"] is None


@pytest.mark.slow
def test_quick_bench_piecewise_matches_eager(quick_run) -> None:
    _, out = quick_run
    results = _results(out)
    rows = [row for row in results["results"] if row["mode"] == "piecewise"]
    assert rows, results.get("unavailable", {}).get("piecewise") or results.get("failed")
    for row in rows:
        assert row["correct"] and row["rel_err"] <= results["config"]["tol_rel"], row
    stats = results["info"]["piecewise"]["torchpcg_stats"]
    assert stats["captured"] > 0 and stats["replays"] > 0 and without_graphs(stats) > 0  # T=16 > bucket 8


@pytest.mark.slow
def test_quick_bench_writes_markdown_and_png(quick_run) -> None:
    _, out = quick_run
    (json_path,) = out.glob("*.json")
    assert json_path.with_suffix(".md").read_text().startswith("# Decoder bench")
    assert json_path.with_suffix(".png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.slow
def test_report_shows_speedup_over_eager_only_when_eager_ran(quick_run) -> None:
    from bench import report

    _, out = quick_run
    results = _results(out)
    eager = {row["tokens"]: row["median_ms"] for row in results["results"] if row["mode"] == "eager"}
    piecewise = {row["tokens"]: row["median_ms"] for row in results["results"] if row["mode"] == "piecewise"}
    text = report.markdown(results)
    assert "## Speedup over eager (median)" in text
    speedups = text.split("## Speedup over eager (median)")[1]
    assert f"{eager[1] / piecewise[1]:.2f}x" in speedups.split("\n| 1 | ")[1].split("\n")[0]
    results["results"] = [row for row in results["results"] if row["mode"] != "eager"]
    assert "Speedup over eager" not in report.markdown(results)  # a bench run without eager (the GPU stage)


@pytest.mark.slow
def test_report_shows_host_speed_per_mode_and_direct_calls_guarded_and_not(quick_run) -> None:
    from bench import report

    _, out = quick_run
    results = _results(out)
    ran = sorted({row["mode"] for row in results["results"]})
    for mode in ran:  # measured just before the mode's timing, beside the run's one machine_speed
        assert results["info"][mode]["host_op_us"] > 0, mode
    text = report.markdown(results)
    line = next(line for line in text.splitlines() if line.startswith("- Host speed just before each mode"))
    for mode in ran:
        assert f"`{mode}` {results['info'][mode]['host_op_us']:.1f}" in line
    assert results["info"]["piecewise"]["direct_calls"] == 0  # read off the compiled model; option off
    assert "directly (`skip_guard_check`)" not in text
    guarded = results["info"]["piecewise"]["guarded_calls"]  # the default: Dynamo's guards, then its code
    assert guarded > 0
    assert f"directly after its guards passed (`guarded_direct`, the default): `piecewise` {guarded}." in text
    results["config"]["piecewise_options"] = {"skip_guard_check": "1"}
    results["info"]["piecewise"]["direct_calls"] = 7
    assert "ran Dynamo's compiled code directly (`skip_guard_check`): `piecewise` 7." in report.markdown(results)


def test_bench_fails_loudly_when_a_mode_is_wrong(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def build_off_by_one(ctx):
        return lambda ids, positions: ctx.model(ids, positions, ctx.kv_cache) + 1.0

    broken = tuple(Mode(m.name, m.summary, build_off_by_one) if m.name == "piecewise" else m for m in MODES)
    monkeypatch.setattr(decoder, "MODES", broken)
    status = decoder.main(["--quick", "--no-progress", "--modes", "eager,piecewise", "--out", str(tmp_path)])
    assert status == 1
    results = _results(tmp_path)
    assert "piecewise" in results["wrong"] and "eager" not in results["wrong"]
    assert not any(row["correct"] for row in results["results"] if row["mode"] == "piecewise")


def test_mixed_traffic_is_seeded_and_goes_above_the_largest_bucket() -> None:
    sizes = decoder.mixed_traffic_sizes(200, seed=0, largest_bucket=8, max_tokens=64)
    assert sizes == decoder.mixed_traffic_sizes(200, seed=0, largest_bucket=8, max_tokens=64)
    assert len(sizes) == 200 and max(sizes) <= 64 and min(sizes) >= 1
    assert any(size > 8 for size in sizes) and sum(size <= 8 for size in sizes) > len(sizes) // 2


def test_distinct_traffic_repeats_no_size_until_every_size_was_drawn() -> None:
    sizes = decoder.distinct_traffic_sizes(200, seed=0, largest_bucket=512, max_tokens=512)
    assert len(sizes) == 200 and len(set(sizes)) == 200 and 1 <= min(sizes) and max(sizes) <= 512
    assert sizes == decoder.distinct_traffic_sizes(200, seed=0, largest_bucket=512, max_tokens=512)
    few = decoder.distinct_traffic_sizes(20, seed=1, largest_bucket=8, max_tokens=64)  # 8 sizes, 20 calls
    assert len(few) == 20 and set(few[:8]) == set(range(1, 9)) and set(few[8:16]) == set(range(1, 9))


def test_context_too_long_for_the_cache_is_a_clear_error() -> None:
    with pytest.raises(decoder.UsageError, match="max_seq_len"):
        decoder.resolve_settings(decoder.parse_args(["--quick", "--context", "250", "--tokens", "16"]))


@pytest.mark.slow
def test_isolate_runs_each_mode_in_its_own_process_and_merges_them(tmp_path: Path) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "bench.decoder", "--quick", "--no-progress", "--isolate", "--modes", "eager,piecewise",
         "--tokens", "1,4", "--repeats", "2", "--out", str(tmp_path)],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert proc.stderr.count("[isolate] ") == 2
    results = _results(tmp_path)
    assert [(row["mode"], row["tokens"]) for row in results["results"]] == [
        ("eager", 1), ("eager", 4), ("piecewise", 1), ("piecewise", 4)]
    assert all(row["correct"] for row in results["results"]) and results["complete"]
    assert set(results["setup_s"]) == {"eager", "piecewise"} and "--isolate" in results["argv"]
    assert results["method"].endswith("(--isolate).")


def test_repeats_are_spread_over_rounds_of_every_token_count() -> None:
    from bench import measure

    order: list[str] = []
    calls = {key: (lambda key=key: order.append(key)) for key in ("a", "b")}
    latency = measure.time_calls(calls, torch.device("cpu"), warmup=1, repeats=5, rounds=2)
    assert order == ["a", "b"] + ["a"] * 3 + ["b"] * 3 + ["a"] * 2 + ["b"] * 2  # warm-up, round 1, round 2
    assert [latency[k].repeats for k in ("a", "b")] == [5, 5]


def test_rounds_below_one_is_a_clear_error() -> None:
    with pytest.raises(decoder.UsageError, match="--rounds 0"):
        decoder.resolve_settings(decoder.parse_args(["--quick", "--rounds", "0"]))


@pytest.mark.slow
def test_graph_memory_is_reported_against_both_eager_yardsticks(quick_run) -> None:
    """Graph memory (reserved) over the eager call's allocated peak and over its reserved peak."""
    from bench import report

    _, out = quick_run
    results = _results(out)
    assert "eager_activation_reserved_mb" in results  # None on CPU
    results["eager_activation_peak_mb"], results["eager_activation_reserved_mb"] = 40.0, 64.0
    results["memory_mb"]["piecewise"] = {"setup_reserved_delta": 96.0}
    text = report.markdown(results)
    assert "Memory reserved during setup over it: `piecewise` 2.40x" in text
    assert "reserved 64 MiB" in text and "`piecewise` 1.50x" in text


@pytest.mark.slow
def test_graph_memory_less_the_capture_streams_workspace_counts_it_once_for_torchpcg(quick_run) -> None:
    """cuBLAS's side-stream workspace is taken off each mode that paid it: every other graph mode,
    and only the first torchpcg mode (torchpcg's modes share one capture stream per process)."""
    from bench import report

    _, out = quick_run
    results = _results(out)
    assert "stream_workspace_mb" in results  # None on CPU
    results["eager_activation_peak_mb"], results["eager_activation_reserved_mb"] = 40.0, 64.0
    results["stream_workspace_mb"] = 32.0
    results["memory_mb"]["piecewise"] = {"setup_reserved_delta": 96.0}
    results["memory_mb"]["inductor-cudagraph"] = {"setup_reserved_delta": 160.0}
    results["memory_mb"]["piecewise-full-decode"] = {"setup_reserved_delta": 64.0}
    results["modes"] = {name: "" for name in ("inductor-cudagraph", "piecewise", "piecewise-full-decode")}
    line = next(line for line in report.markdown(results).splitlines() if "cuBLAS" in line)
    assert "`inductor-cudagraph` 2.00x" in line and "`piecewise` 1.00x" in line  # (160 - 32) / 64, (96 - 32) / 64
    assert "piecewise-full-decode" not in line
    results["argv"] = [*results.get("argv", []), "--isolate"]  # a process per mode: each paid its own
    line = next(line for line in report.markdown(results).splitlines() if "cuBLAS" in line)
    assert "`piecewise-full-decode` 0.50x" in line  # (64 - 32) / 64


def test_profile_counts_idle_gaps_per_tenth_of_the_span_and_skips_annotations() -> None:
    # Span 0..100 µs: a 10 µs gap in the second tenth, a 60 µs one over the fourth to ninth.
    kernels = [(0.0, 10.0, "a"), (20.0, 30.0, "b"), (90.0, 100.0, "c")]
    assert _idle_by_decile(kernels) == [0.0, 10.0, 0.0, 10.0, 10.0, 10.0, 10.0, 10.0, 10.0, 0.0]
    # A kernel inside another's interval adds no idle time; the gap after both is measured from the later end.
    assert sum(_idle_by_decile([(0.0, 50.0, "a"), (10.0, 20.0, "b"), (60.0, 100.0, "c")])) == 10.0
    cuda, cpu = torch.autograd.DeviceType.CUDA, torch.autograd.DeviceType.CPU
    event = lambda name, device, annotation=False: SimpleNamespace(name=name, device_type=device,  # noqa: E731
                                                                  is_user_annotation=annotation)
    assert _is_gpu_work(event("triton_poi_fused_0", cuda))
    assert not _is_gpu_work(event("Torch-Compiled Region", cuda, annotation=True))
    assert not _is_gpu_work(event("call_3", cuda))
    assert not _is_gpu_work(event("cudaGraphLaunch", cpu))


def test_profile_takes_each_call_once_from_its_host_range_not_its_gpu_mirror() -> None:
    cuda, cpu = torch.autograd.DeviceType.CUDA, torch.autograd.DeviceType.CPU
    event = lambda name, device, start, end: SimpleNamespace(  # noqa: E731
        name=name, device_type=device, time_range=SimpleNamespace(start=start, end=end))
    events = [event("call_1", cpu, 500.0, 520.0), event("call_0", cpu, 0.0, 40.0),
              event("call_0", cuda, 35.0, 300.0), event("call_1", cuda, 515.0, 800.0),
              event("aten::mm", cpu, 5.0, 9.0)]
    assert _call_ranges(events) == [(0.0, 40.0), (500.0, 520.0)]


def test_packed_attention_gives_the_reference_decoders_logits_and_cache() -> None:
    import copy

    import torchpcg
    from bench.packed_attention import PackedAttention, use_packed_attention
    from torchpcg.models import DecoderConfig, FlatDecoder

    reference = FlatDecoder(DecoderConfig(), seed=0).eval()
    packed = use_packed_attention(copy.deepcopy(reference))
    assert all(type(layer.self_attn) is PackedAttention for layer in packed.layers)
    assert not any(p.is_meta for p in packed.parameters())  # the reference weights, taken over
    compiled = torch.compile(packed, backend="piecewise",
                             options={"compiler": "eager", "cudagraph": "emulate", "capture_sizes": "1,2,4,8"})
    caches = [reference.new_kv_cache() for _ in range(3)]
    torchpcg.reset_stats()
    with torch.no_grad():
        for start, num_tokens in ((0, 5), (5, 1), (6, 3), (9, 12)):  # 12: above the largest bucket
            ids, positions = torch.arange(1, num_tokens + 1), torch.arange(start, start + num_tokens)
            expected = reference(ids, positions, caches[0])
            torch.testing.assert_close(packed(ids, positions, caches[1]), expected, rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(compiled(ids, positions, caches[2]), expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(caches[1], caches[0], rtol=0, atol=0)  # k/v written at the same slots
    torch.testing.assert_close(caches[2], caches[0], rtol=1e-5, atol=1e-5)
    stats = torchpcg.stats()
    # cut at the packed op once per layer in each Dynamo graph (plain torch.compile: static sizes first)
    assert stats["split_ops"] == DecoderConfig().num_layers * stats["dynamo_graphs"] and stats["recompiles"] == 0
    with pytest.raises(TypeError, match="layer 0 has PackedAttention"):
        use_packed_attention(packed)  # swapped already: not the reference Attention


def test_modes_are_measured_one_after_another_and_unavailable_ones_say_why() -> None:
    """``decoder.measure_modes`` (the loop bench.profile_decode and scripts/gpu_side.py share):
    each buildable mode's runner is measured, CUDA-only modes on CPU are recorded as unavailable,
    and the cache is left unmarked for the next mode."""
    settings = decoder.resolve_settings(decoder.parse_args(["--quick", "--tokens", "1,3", "--no-progress"]))
    with torch.no_grad():
        model, kv_cache = decoder.build_model(settings)
        ctx = decoder.bench_context(settings, model, kv_cache)
        seen = []

        def measure(runner) -> int:
            ids, positions = ctx.make_inputs(3)
            seen.append(runner(ids, positions).shape[0])
            return len(seen)

        results = decoder.measure_modes(ctx, ("eager", "piecewise", "inductor-cudagraph"), measure)
    assert results["eager"] == 1 and results["piecewise"] == 2 and seen == [3, 3]
    assert "CUDA" in results["inductor-cudagraph"]["unavailable"]
    assert not hasattr(kv_cache, "_dynamo_static_input_type")


def test_a_script_record_names_torch_device_and_commit_and_is_written_as_json(tmp_path: Path, capsys) -> None:
    """``decoder.script_record`` / ``write_script_record``, what the profiling scripts write."""
    settings = decoder.script_settings("1,3", [], quick=True)
    settings = dataclasses.replace(settings, commit="abc1234")
    record = decoder.script_record(settings, calls=3, modes={})
    assert list(record) == ["torch", "device", "commit", "calls", "modes"]
    assert (record["torch"], record["device"], record["commit"]) == (torch.__version__, "cpu", "abc1234")
    path = tmp_path / "deeper" / "record.json"
    decoder.write_script_record(path, record, lambda r: f"table of {r['calls']} calls")
    assert json.loads(path.read_text()) == record
    assert capsys.readouterr().out == "table of 3 calls\n"


def test_setup_breakdown_warm_runs_a_second_process_on_the_first_ones_cache(tmp_path: Path) -> None:
    out = tmp_path / "setup.json"
    proc = subprocess.run([sys.executable, "scripts/setup_breakdown.py", "--quick", "--modes", "piecewise", "--warm",
                           "--out", str(out)], cwd=REPO_ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    results = json.loads(out.read_text())["results"]
    assert [(r["mode"], r["start"]) for r in results] == [("piecewise", "cold"), ("piecewise", "warm")]
    assert all(r["setup_s"] > 0 and r["top_own"] for r in results)
    assert "## piecewise, warm: setup" in proc.stdout


def test_gpu_side_times_each_call_idle_then_queued_and_reports_the_host_bound_part(monkeypatch) -> None:
    """scripts/gpu_side.py's bookkeeping, with CUDA's events, sync and sleep faked on CPU: each
    round times one call with the GPU idle, then one behind the sleep; the table's host-bound
    column is latency minus the GPU-alone span."""
    monkeypatch.syspath_prepend(str(REPO_ROOT / "scripts"))
    import gpu_side

    spans = iter([2.0, 1.5] * 3)  # ms: idle call, queued call, per round
    calls = []

    class Event:
        def __init__(self, enable_timing: bool = False) -> None:
            pass

        def record(self) -> None:
            pass

        def elapsed_time(self, other) -> float:
            return next(spans)

    monkeypatch.setattr(torch.cuda, "Event", Event)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: None)
    monkeypatch.setattr(torch.cuda, "_sleep", lambda cycles: calls.append("sleep"))
    row = gpu_side.time_mode(lambda ids, positions: calls.append("call"), None, None, "cpu", rounds=3, sleep_cycles=1)
    assert calls == ["call"] * 5 + ["call", "sleep", "call"] * 3  # 5 warm-up calls, then the rounds
    assert row["latency_us"] == 2000.0 and row["queued_us"] == 1500.0 and row["issue_us"] >= 0
    table = gpu_side.markdown({"device": "fake", "torch": "x", "commit": "c", "rounds": 3, "host_op_us": 7.0,
                               "sleep_ms": 15.0, "modes": {"inductor-cudagraph": {1: dict(row, queued_us=1400.0)},
                                                           "piecewise": {1: row}}})
    assert "| piecewise | 1 | 2000 | 1500 | 500 |" in table and "| 100 |" in table and table.rstrip().endswith("in the JSON).")


def test_mixed_bench_quick_records_every_mode_against_eager(tmp_path: Path) -> None:
    """bench.mixed on CPU: each mode checked against eager at every fixed T, counters over the timed
    calls, the every-T-new sequence of distinct sizes; the CUDA-only modes say why they are missing."""
    from bench import mixed

    status = mixed.main(["--quick", "--calls", "12", "--modes", "eager,inductor-cudagraph,piecewise,torchpcg",
                         "--out", str(tmp_path)])
    assert status == 0
    results = json.loads(next(tmp_path.glob("*-mixed-*.json")).read_text())
    assert results["traffic"]["distinct"]["distinct_T"] == 12
    assert results["modes"]["inductor-cudagraph"]["status"] == "unavailable"
    for name in ("piecewise", "torchpcg"):
        row = results["modes"][name]
        assert row["status"] == "ok" and max(row["rel_err"].values()) <= mixed.TOL[torch.float32]
        assert row["counters"]["recompiles"] == 0 and row["counters"]["recaptures"] == 0
        assert row["counters"]["captured"] == 0 and row["counters"]["replays"] > 0  # every bucket captured in setup
        assert row["host_us"]["calls"] == 12
    assert "| torchpcg |" in next(tmp_path.glob("*-mixed-*.md")).read_text()


def test_moe_bench_quick_runs_every_cpu_mode_against_eager(tmp_path: Path) -> None:
    """bench.moe on CPU: the graph-breaking MoE decoder through eager, Inductor and piecewise; after
    warm-up the timed calls compile and capture nothing and match eager."""
    from bench import moe

    assert moe.main(["--quick", "--repeats", "2", "--tokens", "1,4", "--out", str(tmp_path)]) == 0
    results = json.loads(next(tmp_path.glob("*-moe-*.json")).read_text())
    assert results["modes"]["reduce-overhead"]["status"] == "unavailable"
    piecewise = results["modes"]["piecewise"]
    assert piecewise["setup_counters"]["dynamo_graphs"] > 1  # the dispatch broke the graph
    assert piecewise["counters"]["recaptures"] == 0 and piecewise["counters"]["captured"] == 0
    assert piecewise["counters"]["replays"] > 0 and max(piecewise["max_abs_diff"].values()) < 1e-4
