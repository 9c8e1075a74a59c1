"""Vision encoder graphs: the reference packed-patch ViT, its varlen attention op, the piecewise path
(patch-count buckets, attention split) and whole-encoder graphs keyed by (bucket, cu_seqlens).

CPU tests use emulated graphs (same static-buffer semantics); tests marked ``cuda`` replay real
CUDA graphs and skip without a GPU. Every result is compared with the uncompiled encoder.
"""
from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import torchpcg
from torchpcg.errors import CaptureError, ConfigError
from torchpcg.graphs import EmulatedGraph
from torchpcg.models import PackedViT, ViTConfig, pack_images, varlen_attention
from torchpcg.vision import EncoderGraphs, PiecewiseEncoder, VisionConfig, compile_vision

from .utils import unique_graphs, without_graphs

BUCKETS = (16, 32, 64)
# Image grids (rows, cols of patches; multiples of the 2x2 merge) -> packed patch counts:
# exactly each bucket, between buckets, and above the largest (no graphs there).
AT_BUCKETS = ([(4, 4)], [(4, 4), (2, 8)], [(8, 8)])  # 16, 32, 64
BETWEEN = ([(2, 2)], [(4, 4), (2, 6)], [(2, 2)] * 5, [(6, 6)])  # 4, 28, 20, 36
ABOVE = ([(8, 8), (2, 2)], [(6, 6)] * 3)  # 68, 108
EAGER_OPTIONS = {"cudagraph": "emulate", "compiler": "eager"}


@pytest.fixture(scope="module")
def vit() -> PackedViT:
    return PackedViT(ViTConfig(), seed=0).eval()


def reference(model: PackedViT, *inputs: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(*inputs)


# ---- the op and the model ------------------------------------------------------------------------

def naive_varlen(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bounds: list[int]) -> torch.Tensor:
    """Per segment, per head softmax(q k^T / sqrt(D)) v in float64."""
    out = torch.zeros(q.shape, dtype=torch.float64)
    for begin, end in zip(bounds, bounds[1:]):
        for h in range(q.shape[1]):
            scores = q[begin:end, h].double() @ k[begin:end, h].double().T / math.sqrt(q.shape[2])
            out[begin:end, h] = torch.softmax(scores, dim=-1) @ v[begin:end, h].double()
    return out


@pytest.mark.parametrize("bounds", [[0, 5], [0, 4, 8, 12, 15], [0, 3, 3, 7, 11, 11], [0, 6, 6]])
def test_varlen_attention_matches_per_segment_loop(bounds: list[int]) -> None:
    gen = torch.Generator().manual_seed(len(bounds))
    q, k, v = (torch.randn(bounds[-1], 2, 8, generator=gen) for _ in range(3))
    out = varlen_attention(q, k, v, torch.tensor(bounds, dtype=torch.int32))
    torch.testing.assert_close(out.double(), naive_varlen(q, k, v, bounds), rtol=1e-5, atol=1e-5)


def test_varlen_attention_rejects_bad_cu_seqlens_and_has_a_fake() -> None:
    q = torch.randn(6, 2, 8)
    for bad in ([0, 5], [1, 6], [0, 4, 2, 6]):
        with pytest.raises(ValueError, match="cu_seqlens"):
            varlen_attention(q, q, q, torch.tensor(bad, dtype=torch.int32))
    cu = torch.tensor([0, 2, 6], dtype=torch.int32)
    torch.library.opcheck(varlen_attention, (q, q, q, cu), test_utils=("test_schema", "test_faketensor"))


def test_pack_images_orders_patches_block_by_block() -> None:
    patches, cu, positions = pack_images([(2, 4), (2, 2)], ViTConfig())
    assert cu.tolist() == [0, 8, 12] and cu.dtype == torch.int32 and cu.device.type == "cpu"
    assert patches.shape == (12, 48)
    # first 2x2 block of image 0, then its second block, then image 1
    assert positions[:8].tolist() == [[0, 0], [0, 1], [1, 0], [1, 1], [0, 2], [0, 3], [1, 2], [1, 3]]
    assert positions[8:].tolist() == [[0, 0], [0, 1], [1, 0], [1, 1]]
    with pytest.raises(ValueError, match="multiples of merge_size"):
        pack_images([(3, 4)], ViTConfig())


def test_images_never_attend_to_each_other(vit: PackedViT) -> None:
    """Each image's features are the same alone and packed with others: attention stays inside."""
    packed = reference(vit, *pack_images([(4, 4), (2, 6)], vit.config, seed=3))
    patches, _, positions = pack_images([(4, 4), (2, 6)], vit.config, seed=3)
    alone_first = reference(vit, patches[:16], torch.tensor([0, 16], dtype=torch.int32), positions[:16])
    alone_second = reference(vit, patches[16:], torch.tensor([0, 12], dtype=torch.int32), positions[16:])
    torch.testing.assert_close(packed, torch.cat([alone_first, alone_second]), rtol=1e-5, atol=1e-5)


# ---- configuration -------------------------------------------------------------------------------

def test_vision_config_from_env_and_aliases() -> None:
    config = VisionConfig.from_env({"TORCHPCG_VIT_CUDA_GRAPH": "1", "TORCHPCG_VIT_CAPTURE_SIZES": "128, 64,64",
                                    "TORCHPCG_VIT_MAX_GRAPHS": "5"})
    assert (config.vit_cuda_graph, config.buckets, config.vit_max_graphs) == ("piecewise", (64, 128), 5)
    assert VisionConfig.from_env({"TORCHPCG_VIT_CUDA_GRAPH": "0"}).vit_cuda_graph == "off"
    assert VisionConfig.from_env({"TORCHPCG_VIT_CUDA_GRAPH": "FULL"}).vit_cuda_graph == "full"
    assert VisionConfig.from_env({}).buckets[0] == 64 and VisionConfig().vit_cuda_graph == "off"
    # options beat the environment
    assert VisionConfig.resolve({"vit_max_graphs": 2}, {"TORCHPCG_VIT_MAX_GRAPHS": "5"}).vit_max_graphs == 2


@pytest.mark.parametrize("variable,value,allowed", [
    ("TORCHPCG_VIT_CUDA_GRAPH", "maybe", "off, piecewise, full"),
    ("TORCHPCG_VIT_CAPTURE_SIZES", "64,abc", "comma-separated positive ints"),
    ("TORCHPCG_VIT_CAPTURE_SIZES", "0", "comma-separated positive ints"),
    ("TORCHPCG_VIT_MAX_GRAPHS", "0", "positive integer"),
])
def test_bad_vision_variables_name_variable_value_and_what_is_allowed(variable: str, value: str, allowed: str) -> None:
    with pytest.raises(ConfigError) as info:
        VisionConfig.from_env({variable: value})
    assert variable in str(info.value) and repr(value) in str(info.value) and allowed in str(info.value)


def test_unknown_vision_option_lists_the_known_ones() -> None:
    with pytest.raises(ConfigError, match="vit_max_graphs"):
        VisionConfig.resolve({"vit_graphs": 3})


def test_compile_vision_follows_the_switch(vit: PackedViT, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("TORCHPCG_VIT_CUDA_GRAPH", raising=False)
    assert compile_vision(vit) is vit  # off by default
    monkeypatch.setenv("TORCHPCG_VIT_CUDA_GRAPH", "1")
    monkeypatch.setenv("TORCHPCG_VIT_CAPTURE_SIZES", "16,32")
    piecewise = compile_vision(vit, **EAGER_OPTIONS)
    assert isinstance(piecewise, PiecewiseEncoder) and piecewise.config.buckets == (16, 32)
    full = compile_vision(vit, vit_cuda_graph="full", vit_max_graphs=3, **EAGER_OPTIONS)
    assert isinstance(full, EncoderGraphs) and full.buckets == (16, 32) and full.max_graphs == 3
    with pytest.raises(ConfigError, match="cu_seqlens_arg"):
        compile_vision(vit, cu_seqlens_arg="boundaries", **EAGER_OPTIONS)
    with pytest.raises(ConfigError, match="second dynamic size"):
        compile_vision(vit, enforce=True, **EAGER_OPTIONS)  # piecewise (from the environment) + enforce


# ---- piecewise -----------------------------------------------------------------------------------

def test_piecewise_equals_eager_everywhere_with_zero_recompiles(vit: PackedViT, one_cpu_thread) -> None:
    encoder = compile_vision(vit, vit_cuda_graph="piecewise", vit_capture_sizes=BUCKETS, **EAGER_OPTIONS)
    graphs_before = unique_graphs()
    for seed, grids in enumerate(AT_BUCKETS + BETWEEN + ABOVE):
        inputs = pack_images(grids, vit.config, seed=seed)
        out = encoder(*inputs)
        torch.testing.assert_close(out, reference(vit, *inputs), rtol=1e-5, atol=1e-5,
                                   msg=lambda m, g=grids: f"{g}: {m}")
    stats = torchpcg.stats()
    assert unique_graphs() - graphs_before == 1 and stats["recompiles"] == 0  # 1..5 images, 4..108 patches
    assert stats["split_ops"] >= vit.config.num_layers  # every block's attention is cut
    assert stats["capture_sizes"] == list(BUCKETS) and stats["replays"] > 0
    assert without_graphs(stats) == len(ABOVE) and stats["graphless_pieces"] == 0
    assert encoder.compiled.token_inputs == {"patches": 0, "positions": 0}


def test_plain_torch_compile_with_marked_dims(vit: PackedViT, one_cpu_thread) -> None:
    """The backend alone: mark the patch dim and cu_seqlens dynamic and it is the normal path."""
    compiled = torch.compile(vit, backend="piecewise", fullgraph=True,
                             options={**EAGER_OPTIONS, "capture_sizes": BUCKETS, "max_capture_size": 64})
    for seed, grids in enumerate([[(4, 4), (2, 6)], [(2, 2)] * 3, [(2, 6), (4, 4)], [(8, 8), (2, 2)]]):
        patches, cu, positions = pack_images(grids, vit.config, seed=seed)
        for tensor in (patches, cu, positions):
            torch._dynamo.mark_dynamic(tensor, 0)
        with torch.no_grad():
            out = compiled(patches, cu, positions)
        torch.testing.assert_close(out, reference(vit, patches, cu, positions), rtol=1e-5, atol=1e-5)
    stats = torchpcg.stats()
    assert stats["dynamo_graphs"] == 1 and stats["replays"] > 0 and without_graphs(stats) == 1


# ---- whole-encoder graphs ------------------------------------------------------------------------

def full_graphs(model: PackedViT, **kwargs) -> EncoderGraphs:
    return EncoderGraphs(model, capture_sizes=kwargs.pop("capture_sizes", BUCKETS), cudagraph="emulate",
                         compiler="eager", **kwargs)


def test_full_graphs_equal_eager_at_every_bucket_and_above(vit: PackedViT, one_cpu_thread) -> None:
    graphs = full_graphs(vit, max_graphs=16)
    for seed, grids in enumerate(AT_BUCKETS + BETWEEN + ABOVE):
        inputs = pack_images(grids, vit.config, seed=seed)
        torch.testing.assert_close(graphs(*inputs), reference(vit, *inputs), rtol=1e-5, atol=1e-5,
                                   msg=lambda m, g=grids: f"{g}: {m}")
    info = graphs.info()
    assert info["captures"] == len(AT_BUCKETS + BETWEEN) and info["eager_runs"] == len(ABOVE)
    again = pack_images(BETWEEN[1], vit.config, seed=42)  # a known split, new pixels: a replay
    torch.testing.assert_close(graphs(*again), reference(vit, *again), rtol=1e-5, atol=1e-5)
    assert graphs.info()["replays"] == 1 and graphs.info()["captures"] == info["captures"]
    assert torchpcg.stats()["capture_sizes"] == list(BUCKETS)


def test_same_length_different_splits_get_their_own_graphs(vit: PackedViT, one_cpu_thread) -> None:
    graphs = full_graphs(vit, max_graphs=8)
    splits = ([(4, 4), (2, 6)], [(2, 6), (4, 4)], [(2, 2)] * 7)  # 28 patches each, bucket 32
    for round_ in range(2):
        for seed, grids in enumerate(splits):
            inputs = pack_images(grids, vit.config, seed=10 * round_ + seed)
            torch.testing.assert_close(graphs(*inputs), reference(vit, *inputs), rtol=1e-5, atol=1e-5)
    assert graphs.info()["captures"] == 3 and graphs.info()["replays"] == 3
    assert graphs.keys() == [(32, (0, 16, 28, 32)), (32, (0, 12, 28, 32)), (32, (0, 4, 8, 12, 16, 20, 24, 28, 32))]


class LengthOnlyKey(EncoderGraphs):
    """The bug SGLang #16902 fixed: graphs keyed by the padded length alone."""

    def graph_key(self, bucket, padded_cu_seqlens):
        return bucket


def test_a_key_of_the_length_alone_replays_the_wrong_split(vit: PackedViT, one_cpu_thread) -> None:
    first = pack_images([(4, 4), (2, 6)], vit.config, seed=1)  # 16 + 12 patches
    second = pack_images([(2, 6), (4, 4)], vit.config, seed=2)  # 12 + 16: same length, other split
    wrong, right = LengthOnlyKey(vit, capture_sizes=BUCKETS, cudagraph="emulate", compiler="eager"), full_graphs(vit)
    for graphs in (wrong, right):
        torch.testing.assert_close(graphs(*first), reference(vit, *first), rtol=1e-5, atol=1e-5)
    expected = reference(vit, *second)
    bad = wrong(*second)  # replays the graph captured for 16 + 12
    # wrong boundaries: each image attends over the other's patches (100x our tolerance at least)
    assert wrong.info()["replays"] == 1 and (bad - expected).abs().max() > 1e-3
    torch.testing.assert_close(right(*second), expected, rtol=1e-5, atol=1e-5)
    assert right.info()["captures"] == 2


def test_lru_bound_evicts_and_releases_the_oldest_graph(vit: PackedViT, one_cpu_thread) -> None:
    graphs = full_graphs(vit, max_graphs=2)
    calls = [[(4, 4)], [(2, 2)] * 4, [(4, 4), (2, 6)]]  # three keys
    graphs(*pack_images(calls[0], vit.config))
    oldest = graphs._graphs[graphs.keys()[0]].graph  # noqa: SLF001 - the graph object, to see it released
    assert isinstance(oldest, EmulatedGraph) and oldest.fn is not None
    graphs(*pack_images(calls[1], vit.config))
    graphs(*pack_images(calls[0], vit.config))  # a hit: now the most recently used
    graphs(*pack_images(calls[2], vit.config))  # evicts calls[1], not calls[0]
    info = graphs.info()
    assert info["graphs"] == 2 and info["evictions"] == 1 and info["captures"] == 3 and info["replays"] == 1
    assert graphs.keys() == [(16, (0, 16)), (32, (0, 16, 28, 32))]
    graphs(*pack_images(calls[2], vit.config))
    graphs(*pack_images(calls[1], vit.config))  # evicted earlier: captured again, evicts calls[0]
    assert oldest.fn is None  # released: a real graph's pool memory serves later captures
    inputs = pack_images(calls[1], vit.config, seed=5)
    torch.testing.assert_close(graphs(*inputs), reference(vit, *inputs), rtol=1e-5, atol=1e-5)
    assert graphs.info()["evictions"] == 2 and len(graphs.keys()) == 2
    graphs.clear()
    assert graphs.info()["graphs"] == 0


def test_outputs_are_copies_and_padding_rows_are_zeroed(vit: PackedViT, one_cpu_thread) -> None:
    graphs = full_graphs(vit)
    first_inputs = pack_images([(4, 4), (2, 6)], vit.config, seed=1)  # 28 of bucket 32
    first = graphs(*first_inputs)
    kept = first.clone()
    big = pack_images([(4, 4), (4, 4)], vit.config, seed=2)  # 32: fills every row of the bucket
    graphs(big[0] * 1e4, big[1], big[2])
    assert torch.equal(first, kept)  # not overwritten by the next replay
    static = graphs._buckets[(32, ())].token_buffers  # noqa: SLF001
    graphs(*pack_images([(2, 2)] * 6, vit.config, seed=3))  # 24 of bucket 32
    assert not static["patches"][24:].any() and not static["positions"][24:].any()


def test_other_inputs_and_row_layouts_are_part_of_the_key(vit: PackedViT, one_cpu_thread) -> None:
    class Scaled(torch.nn.Module):
        def forward(self, patches, cu_seqlens, positions, scale: float = 1.0, bias: torch.Tensor | None = None):
            out = vit(patches, cu_seqlens, positions) * scale
            return out if bias is None else out + bias

    graphs = full_graphs(Scaled())
    patches, cu, positions = pack_images([(4, 4), (2, 6)], vit.config, seed=1)
    expected = reference(vit, patches, cu, positions)
    bias = torch.randn(64)
    calls = [((patches, cu, positions), expected), ((patches, cu, positions, 2.0), 2 * expected),
             ((patches.double(), cu, positions), expected), ((patches, cu, positions, 1.0, bias), expected + bias)]
    for _ in range(2):
        for args, want in calls:
            torch.testing.assert_close(graphs(*args), want, rtol=1e-5, atol=1e-5)
    assert graphs.info()["captures"] == 4 and graphs.info()["replays"] == 4
    torch.testing.assert_close(graphs(patches, cu, positions, 1.0, bias * 3), expected + 3 * bias)  # copied in


def test_window_boundaries_are_baked_and_keyed_like_cu_seqlens(vit: PackedViT, one_cpu_thread) -> None:
    """Qwen2.5-VL style: some blocks attend inside windows (cu_window_seqlens), others per image."""
    class Windowed(torch.nn.Module):
        def forward(self, patches, cu_seqlens, positions, cu_window_seqlens):
            return vit(patches, cu_window_seqlens, positions) + vit(patches, cu_seqlens, positions)

    model, graphs = Windowed(), full_graphs(Windowed())
    patches, cu, positions = pack_images([(4, 4), (2, 6)], vit.config, seed=1)  # 28 of bucket 32
    windows = [torch.arange(0, 29, 4, dtype=torch.int32), torch.tensor([0, 8, 16, 28], dtype=torch.int32)]
    for _ in range(2):
        for window in windows:
            torch.testing.assert_close(graphs(patches, cu, positions, window),
                                       reference(model, patches, cu, positions, window), rtol=1e-5, atol=1e-5)
    assert graphs.info()["captures"] == 2 and graphs.info()["replays"] == 2
    assert graphs.keys()[1] == ((32, (0, 16, 28, 32)), (("cu_window_seqlens", (0, 8, 16, 28, 32)),))
    with pytest.raises(torchpcg.TorchPCGError, match="cu_window_seqlens"):
        graphs(patches, cu, positions, torch.tensor([0, 8, 16], dtype=torch.int32))  # ends before P = 28


def test_capture_failure_falls_back_and_enforce_raises(vit: PackedViT, one_cpu_thread) -> None:
    class FailsOnce(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.inner, self.fail = vit, True

        def forward(self, patches, cu_seqlens, positions):
            if self.fail:
                self.fail = False
                raise RuntimeError("operation not permitted when stream is capturing")
            return self.inner(patches, cu_seqlens, positions)

    inputs = pack_images([(4, 4)], vit.config)
    graphs = full_graphs(FailsOnce())
    torch.testing.assert_close(graphs(*inputs), reference(vit, *inputs))
    assert graphs.info()["buckets"] == [32, 64] and torchpcg.stats()["capture_failures"] == 1
    torch.testing.assert_close(graphs(*inputs), reference(vit, *inputs))  # now at bucket 32
    assert graphs.info()["eager_runs"] == 1 and graphs.info()["captures"] == 1 and not graphs.info()["disabled"]
    with pytest.raises(CaptureError, match="enforce"):
        full_graphs(FailsOnce(), enforce=True)(*inputs)


def test_bad_calls_are_clear_errors(vit: PackedViT) -> None:
    graphs = full_graphs(vit)
    patches, cu, positions = pack_images([(4, 4)], vit.config)
    with pytest.raises(torchpcg.TorchPCGError, match="no tensor argument has 20 rows"):
        graphs(patches, torch.tensor([0, 20], dtype=torch.int32), positions)
    with pytest.raises(torchpcg.TorchPCGError, match="non-decreasing"):
        graphs(patches, torch.tensor([0, 12, 8, 16], dtype=torch.int32), positions)
    class PerImage(torch.nn.Module):  # one row per image: the padding segment would add one
        def forward(self, patches, cu_seqlens):
            return patches[: cu_seqlens.shape[0] - 1] * 2

    per_image = EncoderGraphs(PerImage(), capture_sizes=(32,), cudagraph="emulate", compiler="eager")
    with pytest.raises(torchpcg.TorchPCGError, match="not whole"):
        per_image(torch.randn(28, 2), torch.tensor([0, 16, 28]))  # 3 rows at bucket 32: 2.6 for 28 patches


def test_a_bucket_the_encoder_rejects_is_dropped(vit: PackedViT, one_cpu_thread) -> None:
    graphs = full_graphs(vit, capture_sizes=(18, 32))  # 18 patches are no whole number of 2x2 blocks
    inputs = pack_images([(4, 4)], vit.config)
    torch.testing.assert_close(graphs(*inputs), reference(vit, *inputs), rtol=1e-5, atol=1e-5)
    assert graphs.info()["buckets"] == [32] and graphs.info()["eager_runs"] == 1
    torch.testing.assert_close(graphs(*inputs), reference(vit, *inputs), rtol=1e-5, atol=1e-5)
    assert graphs.info()["captures"] == 1 and torchpcg.stats()["capture_failures"] == 1


# ---- the bench (CPU smoke, as tests/test_bench_quick.py runs bench/decoder.py) -------------------

REPO_ROOT = Path(__file__).resolve().parent.parent


def test_vit_bench_quick_runs_on_cpu_and_records_every_mode(tmp_path: Path) -> None:
    proc = subprocess.run([sys.executable, "-m", "bench.vit", "--device", "cpu", "--quick", "--out", str(tmp_path)],
                          cwd=REPO_ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "| images | patches | eager | piecewise | full |" in proc.stdout
    (json_path,) = tmp_path.glob("*-vit-quick.json")
    results = json.loads(json_path.read_text())
    assert json_path.with_suffix(".md").read_text().startswith("# Vision encoder bench")
    assert {"device", "torch", "commit", "config", "results", "failed", "wrong", "unavailable"} <= set(results)
    assert results["device"].startswith("cpu") and results["torch"] == torch.__version__
    assert results["failed"] == {} and results["wrong"] == {} and "full-inductor" in results["unavailable"]
    rows = results["results"]
    assert {(r["mode"], r["images"]) for r in rows} == {(m, n) for m in ("eager", "piecewise", "full") for n in (1, 4, 16)}
    for row in rows:
        assert row["correct"] and 0 < row["median_ms"] <= row["p90_ms"], row
    assert results["info"]["full"]["encoder_graphs"]["captures"] == 2  # 16 images: above the largest bucket
    assert results["info"]["piecewise"]["torchpcg_stats"]["replays"] > 0


def test_vit_bench_fails_loudly_when_a_mode_is_wrong(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    if str(REPO_ROOT) not in sys.path:
        monkeypatch.syspath_prepend(str(REPO_ROOT))  # bench/ is a repo script package, not installed
    from bench import vit as bench_vit

    real_build = bench_vit.build

    def off_by_one(mode, model, settings):
        runner, holder = real_build(mode, model, settings)
        return ((lambda *args: runner(*args) + 1.0) if mode == "full" else runner), holder

    monkeypatch.setattr(bench_vit, "build", off_by_one)
    status = bench_vit.main(["--device", "cpu", "--quick", "--images", "1", "--modes", "eager,full",
                             "--out", str(tmp_path)])
    assert status == 1
    results = json.loads(next(tmp_path.glob("*.json")).read_text())
    assert "full" in results["wrong"] and "eager" not in results["wrong"]


# ---- real CUDA graphs (GPU conformance suite) ----------------------------------------------------

CUDA_BUCKETS = (64, 128, 256)
CUDA_CALLS = ([(8, 8)], [(8, 8), (4, 8)], [(4, 4)] * 5, [(8, 16)], [(8, 8)] * 4, [(16, 16), (4, 4)])  # 64..272


def cuda_vit(dtype: torch.dtype = torch.float32) -> PackedViT:
    return PackedViT(ViTConfig(num_layers=3), seed=0).to(device="cuda", dtype=dtype).eval()


def cuda_inputs(model: PackedViT, grids, seed: int = 0):
    patches, cu, positions = pack_images(grids, model.config, seed=seed, device="cuda",
                                         dtype=next(model.parameters()).dtype)
    return patches, cu, positions  # cu_seqlens stays on the CPU: the op reads it without a sync


def tolerance(dtype: torch.dtype) -> dict[str, float]:
    return {"rtol": 2e-2, "atol": 2e-2} if dtype == torch.bfloat16 else {"rtol": 1e-4, "atol": 1e-4}


@pytest.mark.cuda
@pytest.mark.parametrize("compiler", ["eager", "inductor"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_piecewise_equals_eager(compiler: str, dtype: torch.dtype) -> None:
    model = cuda_vit(dtype)
    encoder = compile_vision(model, vit_cuda_graph="piecewise", vit_capture_sizes=CUDA_BUCKETS, compiler=compiler,
                             cudagraph="cuda")
    for seed, grids in enumerate(CUDA_CALLS + CUDA_CALLS[:2]):
        inputs = cuda_inputs(model, grids, seed)
        torch.testing.assert_close(encoder(*inputs), reference(model, *inputs), **tolerance(dtype))
    stats = torchpcg.stats()
    assert stats["recompiles"] == 0 and stats["dynamo_graphs"] == 1 and stats["graphless_pieces"] == 0
    assert stats["capture_sizes"] == list(CUDA_BUCKETS) and stats["replays"] > 0 and without_graphs(stats) == 1


@pytest.mark.cuda
@pytest.mark.parametrize("compiler", ["eager", "inductor"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_full_graphs_equal_eager(compiler: str, dtype: torch.dtype) -> None:
    model = cuda_vit(dtype)
    graphs = EncoderGraphs(model, capture_sizes=CUDA_BUCKETS, max_graphs=4, cudagraph="cuda", compiler=compiler)
    for seed, grids in enumerate(CUDA_CALLS + CUDA_CALLS[1:4]):  # 5 splits with graphs, then 3 of them again
        inputs = cuda_inputs(model, grids, seed)
        torch.testing.assert_close(graphs(*inputs), reference(model, *inputs), **tolerance(dtype))
    info = graphs.info()
    assert info["graphs"] == 4 and info["evictions"] == 1 and info["eager_runs"] == 1 and info["replays"] == 3
    assert not info["disabled"]


@pytest.mark.cuda
def test_cuda_wrong_key_gives_wrong_output_ours_does_not() -> None:
    model = cuda_vit()
    first, second = cuda_inputs(model, [(8, 8), (4, 8)], 1), cuda_inputs(model, [(4, 8), (8, 8)], 2)  # 96 each
    wrong = LengthOnlyKey(model, capture_sizes=CUDA_BUCKETS, cudagraph="cuda", compiler="eager")
    right = EncoderGraphs(model, capture_sizes=CUDA_BUCKETS, cudagraph="cuda", compiler="eager")
    for graphs in (wrong, right):
        torch.testing.assert_close(graphs(*first), reference(model, *first), **tolerance(torch.float32))
    expected = reference(model, *second)
    assert (wrong(*second) - expected).abs().max() > 1e-3  # 10x the tolerance our graphs meet
    torch.testing.assert_close(right(*second), expected, **tolerance(torch.float32))


@pytest.mark.cuda
def test_cuda_lru_releases_graphs_and_memory_stays_flat() -> None:
    model = cuda_vit()
    graphs = EncoderGraphs(model, capture_sizes=CUDA_BUCKETS, max_graphs=2, cudagraph="cuda", compiler="eager")
    splits = [[(4, 4)] * n + [(8, 8)] for n in range(1, 9)]  # 8 keys, all in bucket 256 or below
    graphs(*cuda_inputs(model, splits[0]))
    oldest = graphs._graphs[graphs.keys()[0]].graph  # noqa: SLF001
    reserved = []
    for seed, grids in enumerate(splits * 2):
        inputs = cuda_inputs(model, grids, seed)
        torch.testing.assert_close(graphs(*inputs), reference(model, *inputs), **tolerance(torch.float32))
        reserved.append(torch.cuda.memory_reserved())
    assert oldest.graph is None and graphs.info()["graphs"] == 2 and graphs.info()["evictions"] >= 14
    assert reserved[-1] <= reserved[len(splits) - 1] * 1.5  # evicted graphs give their memory back to the pool


@pytest.mark.cuda
def test_cuda_cu_seqlens_on_the_gpu_cannot_be_captured_and_falls_back() -> None:
    """The reference op reads cu_seqlens on the host: on the GPU that is a sync, illegal in a capture."""
    model = cuda_vit()
    patches, cu, positions = cuda_inputs(model, [(8, 8), (4, 4)])
    graphs = EncoderGraphs(model, capture_sizes=(128,), cudagraph="cuda", compiler="eager")
    torch.testing.assert_close(graphs(patches, cu.cuda(), positions), reference(model, patches, cu, positions))
    assert graphs.info()["disabled"] and torchpcg.stats()["capture_failures"] == 1  # its only bucket dropped
    torch.ones(1, device="cuda").add_(1).item()  # the CUDA context is still healthy
    piecewise = compile_vision(model, vit_cuda_graph="piecewise", vit_capture_sizes=CUDA_BUCKETS, compiler="eager")
    torch.testing.assert_close(piecewise(patches, cu.cuda(), positions), reference(model, patches, cu, positions))
