"""scripts/multigpu_check.py, the check beyond one GPU, run here on the CPU with the built-in model:
its comparison logic (quantizers, logits, checkpoint bytes, amax devices) must pass before the GPU
run. The data-parallel mode needs torchrun; tests/test_cli_large_models.py runs torchrun."""

from __future__ import annotations

import importlib.util
import json
import os

import pytest

from conftest import REPO

pytest.importorskip("accelerate")


@pytest.fixture
def script(monkeypatch):
    for name in ("NCCL_NVLS_ENABLE", "TORCH_SYMM_MEM_DISABLE_MULTICAST"):  # the script sets them on import
        monkeypatch.setenv(name, os.environ.get(name, ""))
    spec = importlib.util.spec_from_file_location("multigpu_check", REPO / "scripts" / "multigpu_check.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert os.environ["NCCL_NVLS_ENABLE"] == "0" and os.environ["TORCH_SYMM_MEM_DISABLE_MULTICAST"] == "1"
    return module


def test_split_check_passes_on_the_cpu_and_writes_its_json(script, tmp_path, capsys):
    code = script.main(["--device", "cpu", "--tiny", "--out", str(tmp_path), "--seq-len", "16", "--calib-batches", "2",
                        "--recipes", "nvfp4_default-fp8_kv"])
    document = json.loads((tmp_path / "split.json").read_text())
    assert code == 0 and document["ok"] and document["control"]["bit_equal"]
    result = document["recipes"]["nvfp4_default-fp8_kv"]
    assert result["quantizers"]["equal"] == result["quantizers"]["enabled"] == 64
    assert result["checkpoint"] == {"files": 5, "equal": True, "differing": []}
    assert "nvfp4_default-fp8_kv" in capsys.readouterr().out


def test_split_check_reports_a_difference(script, tmp_path, monkeypatch):
    """A check that cannot fail checks nothing: break the quantized forward under the hooks."""
    from refquant.hf import insert

    monkeypatch.setattr(insert, "rebind_forward", lambda module: None)  # the issue-12 bug, back
    code = script.main(["--device", "cpu", "--tiny", "--out", str(tmp_path), "--seq-len", "16", "--calib-batches", "2",
                        "--recipes", "fp8_default-fp8_cast_kv"])
    result = json.loads((tmp_path / "split.json").read_text())["recipes"]["fp8_default-fp8_cast_kv"]
    assert code == 1 and not result["ok"] and result["quantizers"]["equal"] < result["quantizers"]["enabled"]
