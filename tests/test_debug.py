"""TORCHPCG_DEBUG_DIR: the dump folder holds the plan, the pieces' code and a README."""
from __future__ import annotations

import ast
import json
import os

import pytest
import torch

import torchpcg

from torchpcg.debug import depyf_session, inductor_source
from tests.utils import decoder_inputs, tiny_decoder


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


def test_inductor_output_code_per_piece(tmp_path):
    folder = _compile_and_run(tmp_path, compiler="inductor")
    inductor_files = [p for p in os.listdir(folder) if p.endswith(".inductor.py")]
    assert len(inductor_files) == 3  # one per compute piece
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
