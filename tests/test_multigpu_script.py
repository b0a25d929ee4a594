"""scripts/multigpu_check.py, the check on two GPUs, run here on the CPU with the built-in model and
a tiny Qwen3-MoE: its comparison logic (quantizers, logits, checkpoint bytes, amax devices, experts
without tokens, modelopt on the same device map) must pass before the GPU run. The data-parallel
mode needs torchrun; tests/test_cli_large_models.py runs torchrun."""

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

    monkeypatch.setattr(insert, "rebind_forward", lambda module: None)  # accelerate's hooks call the unquantized forwards
    code = script.main(["--device", "cpu", "--tiny", "--out", str(tmp_path), "--seq-len", "16", "--calib-batches", "2",
                        "--recipes", "fp8_default-fp8_cast_kv"])
    result = json.loads((tmp_path / "split.json").read_text())["recipes"]["fp8_default-fp8_cast_kv"]
    assert code == 1 and not result["ok"] and result["quantizers"]["equal"] < result["quantizers"]["enabled"]


TINY_MOE = ["--device", "cpu", "--moe", "--layers", "2", "--hidden", "64", "--heads", "4", "--kv-heads", "2", "--experts", "8",
            "--experts-per-token", "2", "--moe-intermediate", "32", "--vocab", "300", "--seq-len", "16", "--calib-batches", "2"]


def test_moe_check_passes_on_the_cpu_against_one_device_and_modelopt(script, modelopt, tmp_path, capsys):
    """The MoE path with its defaults (nvfp4_default-fp8_kv, the compiled backend), loaded with
    device_map="auto" over the CPU and disk, and modelopt on the same device map."""
    code = script.main([*TINY_MOE, "--out", str(tmp_path)])
    document = json.loads((tmp_path / "moe.json").read_text())
    assert code == 0 and document["ok"] and document["control"]["bit_equal"]
    assert document["quantize"] == {"backend": "compiled", "flavor": "modelopt-cpu"}
    assert set(document["device_map"].values()) == {"cpu", "disk"}  # accelerate's offload hooks in play
    result = document["recipes"]["nvfp4_default-fp8_kv"]
    # per layer: q, k, v, o (input and weight), K and V, the experts' two inputs and 2 x 8 weights
    assert result["quantizers"]["equal"] == result["quantizers"]["enabled"] == 2 * (8 + 2 + 18)
    assert result["checkpoint"] == {"files": 5, "equal": True, "differing": []} and result["experts_without_tokens"]["equal"]
    theirs = result["modelopt"]
    assert theirs["ok"] and theirs["quantizers"]["expert_amax_compared"] == 2 * 18 and not theirs["quantizers"]["amax_mismatch"]
    assert theirs["export"]["equal"] == theirs["export"]["tensors"] > 0 and "logits_skipped" in theirs  # NVFP4 on the CPU
    assert "vs modelopt's on the same device map" in capsys.readouterr().out


def test_moe_check_reports_a_difference_from_one_device(script, tmp_path, monkeypatch):
    from refquant.hf import insert

    monkeypatch.setattr(insert, "rebind_forward", lambda module: None)  # accelerate's hooks call the unquantized forwards
    code = script.main([*TINY_MOE, "--out", str(tmp_path), "--backend", "reference", "--no-modelopt"])
    result = json.loads((tmp_path / "moe.json").read_text())["recipes"]["nvfp4_default-fp8_kv"]
    assert code == 1 and not result["ok"] and result["quantizers"]["equal"] < result["quantizers"]["enabled"]
    assert "model.layers.0.mlp.experts.gate_up_proj_input_quantizer" in result["quantizers"]["differing"]


def test_moe_check_reports_a_difference_from_modelopt(script, modelopt, tmp_path, monkeypatch):
    quantize_with_modelopt = script.mc.quantize_with_modelopt
    monkeypatch.setattr(script.mc, "quantize_with_modelopt",  # modelopt calibrates on the first batch alone
                        lambda model, recipe, batches: quantize_with_modelopt(model, recipe, batches[:1]))
    code = script.main([*TINY_MOE, "--out", str(tmp_path), "--backend", "reference"])
    result = json.loads((tmp_path / "moe.json").read_text())["recipes"]["nvfp4_default-fp8_kv"]
    assert code == 1 and not result["ok"] and result["checkpoint"]["equal"] and not result["modelopt"]["ok"]
    assert result["modelopt"]["quantizers"]["amax_mismatch"] and result["modelopt"]["export"]["mismatched"]
