"""TORCHPCG_DEBUG_DIR: the dump folder holds the plan, the pieces' code and a README."""
from __future__ import annotations

import ast
import json
import os

import pytest
import torch

import torchpcg

from torchpcg.debug import depyf_session, inductor_source, install_bytecode_dump, remove_bytecode_dump
from tests.utils import decoder_inputs, tiny_decoder


@pytest.fixture(autouse=True)
def _no_leftover_bytecode_dump(tmp_path):
    """The backend's dump hook is process-wide: take it away after each test of this file."""
    yield
    remove_bytecode_dump(str(tmp_path))


def _compile_and_run(tmp_path, compiler="eager", **extra):
    model = tiny_decoder()
    options = {"cudagraph": "emulate", "compiler": compiler, "capture_sizes": "1,2,4,8",
               "debug_dir": str(tmp_path), **extra}
    compiled = torch.compile(model, backend="piecewise", fullgraph=True, options=options)
    compiled(*decoder_inputs(model, 3))
    return tmp_path / "graph_0"


def test_debug_dir_files(tmp_path):
    folder = _compile_and_run(tmp_path)
    assert (tmp_path / "README.md").read_text().startswith("# torchpcg debug dump")
    plan = json.loads((folder / "split_plan.json").read_text())
    assert plan["num_split_ops"] == 2 and plan["split_counts"]["attention"] == 2
    assert "kv_attention" in (folder / "split_plan.txt").read_text()
    for name in ("dynamo_graph.py", "split_module.py"):
        assert "def forward" in (folder / name).read_text()
    piece_files = sorted(p for p in os.listdir(folder) if p.startswith("piece_") and p.endswith(".py"))
    assert len(piece_files) == len(plan["pieces"]) == 5
    for name in piece_files:
        source = (folder / name).read_text()
        ast.parse(source)  # valid Python
        assert "def forward" in source
    split_piece = next(p for p in plan["pieces"] if p["kind"] == "split")
    header = (folder / f"piece_{split_piece['index']}_{split_piece['name']}.py").read_text()
    assert "SPLIT OP" in header and "kv_attention" in header


def test_second_graph_gets_its_own_folder(tmp_path):
    _compile_and_run(tmp_path)
    torch._dynamo.reset()
    _compile_and_run(tmp_path)
    assert (tmp_path / "graph_1" / "split_plan.json").exists()


@pytest.mark.parametrize("entry", ["torch.compile", "torchpcg.compile"])
def test_inductor_output_code_per_piece(tmp_path, entry):
    """One Inductor file per compute piece: Dynamo's code with torch.compile and mark_dynamic (T is
    backed already); with torchpcg.compile's unbacked T the compile with T backed, which serves
    these calls (Dynamo's code waits for a call that needs it, so it is not written)."""
    if entry == "torch.compile":
        folder = _compile_and_run(tmp_path, compiler="inductor")
    else:
        model = tiny_decoder()
        compiled = torchpcg.compile(model, cudagraph="emulate", compiler="inductor", capture_sizes="1,2,4,8",
                                    debug_dir=str(tmp_path), token_inputs={"input_ids": 0, "positions": 0})
        compiled(*decoder_inputs(model, 3, mark=False))
        folder = tmp_path / "graph_0"
    inductor_files = [p for p in os.listdir(folder) if p.endswith(".inductor.py")]
    backed = [p for p in inductor_files if p.endswith(".backed.inductor.py")]
    plain = len(inductor_files) - len(backed)
    assert (plain, len(backed)) == ((0, 3) if entry == "torchpcg.compile" else (3, 0))  # one per compute piece
    assert "def call(" in (folder / sorted(inductor_files)[0]).read_text()
    assert inductor_source(None) == ""


def test_depyf_session_dumps_decompiled_code(tmp_path):
    model = tiny_decoder(num_layers=1)
    with depyf_session(str(tmp_path)):
        compiled = torch.compile(model, backend="piecewise", fullgraph=True,
                                 options={"cudagraph": "off", "compiler": "eager"})
        compiled(*decoder_inputs(model, 3))
    names = os.listdir(tmp_path / "depyf")
    assert any(n.startswith("full_code_for_forward") for n in names), names
    assert not any(n.endswith(".lock") for n in names)


def test_depyf_session_without_dir_is_a_no_op():
    with depyf_session(None):
        pass


def test_torchpcg_compile_debug_dir_gets_depyf_dump_of_the_first_call(tmp_path):
    pytest.importorskip("depyf")
    from torchpcg.models import DecoderConfig, FlatDecoder

    model = FlatDecoder(DecoderConfig()).eval()
    compiled = torchpcg.compile(model, cudagraph="emulate", compiler="eager", capture_sizes=(4,),
                                debug_dir=str(tmp_path))
    cache = model.new_kv_cache()
    got = compiled(torch.arange(3), torch.arange(3), cache)
    with torch.no_grad():
        expected = model(torch.arange(3), torch.arange(3), model.new_kv_cache())
    torch.testing.assert_close(got, expected)
    dumped = os.listdir(tmp_path / "depyf")
    assert any(name.startswith("full_code_for_forward") for name in dumped), dumped
    assert (tmp_path / "graph_0" / "split_plan.json").exists()


def _transformed_code_files(debug_dir):
    folder = debug_dir / "depyf"
    return sorted(folder.glob("__transformed_code_*_for_forward.py")) if folder.exists() else []


def test_bytecode_dump_writes_the_first_frames_transformed_code(tmp_path):
    pytest.importorskip("depyf")
    assert install_bytecode_dump(str(tmp_path)) and install_bytecode_dump(str(tmp_path))  # idempotent
    model = tiny_decoder(num_layers=1)
    compiled = torch.compile(model, backend="piecewise", fullgraph=True,
                             options={"cudagraph": "emulate", "compiler": "eager"})
    compiled(*decoder_inputs(model, 3))
    files = _transformed_code_files(tmp_path)
    assert [f.name for f in files] == ["__transformed_code_0_for_forward.py"]  # one hook, one file
    source = files[0].read_text()
    ast.parse(source)
    assert "def forward(" in source and "__compiled_fn" in source  # the frame calls the compiled graph


def test_bytecode_dump_registered_from_inside_a_backend_catches_that_frame(tmp_path):
    pytest.importorskip("depyf")

    def backend(gm, example_inputs):  # Dynamo runs bytecode hooks after the backend returns
        install_bytecode_dump(str(tmp_path))
        return gm.forward

    torch.compile(lambda x: x.sin() + 1, backend=backend, fullgraph=True)(torch.ones(3))
    assert len(list((tmp_path / "depyf").glob("__transformed_code_0_for_*.py"))) == 1


def test_plain_torch_compile_with_debug_dir_writes_transformed_code(tmp_path):
    """The default path: the backend installs the dump itself when debug_dir is set."""
    pytest.importorskip("depyf")
    model = tiny_decoder(num_layers=1)
    compiled = torch.compile(model, backend="piecewise",
                             options={"debug_dir": str(tmp_path), "cudagraph": "emulate", "compiler": "eager"})
    compiled(*decoder_inputs(model, 3, mark=False))
    assert (tmp_path / "graph_0" / "split_plan.json").exists()
    files = _transformed_code_files(tmp_path)
    assert files, sorted(os.listdir(tmp_path))
    ast.parse(files[0].read_text())


def test_bytecode_dump_without_depyf_logs_once_and_returns_false(tmp_path, monkeypatch, caplog):
    import sys

    from torchpcg import debug

    monkeypatch.setitem(sys.modules, "depyf", None)  # import depyf -> ImportError
    debug._depyf_installed.cache_clear()
    try:
        with caplog.at_level("WARNING", logger="torchpcg.debug"):
            assert not install_bytecode_dump(str(tmp_path)) and not install_bytecode_dump(str(tmp_path))
    finally:
        debug._depyf_installed.cache_clear()
    assert sum("depyf is not installed" in r.getMessage() for r in caplog.records) == 1
