"""`refquant quantize` for models beyond one device: --device-map (accelerate), --max-shard-size, and
torchrun data-parallel calibration, each against the plain run's checkpoint, byte for byte."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import pytest
import torch

from conftest import REPO, folder_files
from refquant.cli import main

transformers = pytest.importorskip("transformers")
ARGS = ["quantize", "--recipe", "nvfp4_default-fp8_kv", "--calib-batches", "4", "--seq-len", "64", "--no-progress"]


def tiny_llama_folder(path):
    """A saved tiny 2-layer Llama (vocab 320, enough for the byte tokenizer), without tokenizer files."""
    config = transformers.LlamaConfig(vocab_size=320, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, head_dim=16)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        transformers.LlamaForCausalLM(config).to(torch.bfloat16).save_pretrained(path)
    return path


def test_device_map_auto_writes_the_checkpoint_of_the_plain_run(tmp_path):
    pytest.importorskip("accelerate")
    model_dir = tiny_llama_folder(tmp_path / "tiny")
    assert main([*ARGS, "--model", str(model_dir), "--out", str(tmp_path / "plain")]) == 0
    assert main([*ARGS, "--model", str(model_dir), "--device-map", "auto", "--out", str(tmp_path / "mapped")]) == 0
    assert folder_files(tmp_path / "mapped") == folder_files(tmp_path / "plain")


def test_max_shard_size_shards_the_checkpoint(tmp_path):
    assert main([*ARGS, "--max-shard-size", "200KB", "--out", str(tmp_path / "ckpt")]) == 0
    index = json.loads((tmp_path / "ckpt" / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 3 and shards[0] == f"model-00001-of-{len(shards):05d}.safetensors"


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--device-map", "auto"], "--device-map needs --model DIR"),
        (["--max-shard-size", "ten gigs"], "--max-shard-size ten gigs: max_shard_size='ten gigs' is not a size"),
    ],
)
def test_bad_large_model_options_give_a_clear_message_and_no_output(tmp_path, capsys, extra, message):
    assert main([*ARGS, *extra, "--out", str(tmp_path / "ckpt")]) == 2
    assert message in capsys.readouterr().err
    assert not any(tmp_path.iterdir())


def test_device_map_without_accelerate_says_how_to_install_it(tmp_path, capsys, monkeypatch):
    import importlib.util

    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "accelerate" else find_spec(name, *a))
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "config.json").write_text("{}")
    assert main([*ARGS, "--model", str(tmp_path / "m"), "--device-map", "auto", "--out", str(tmp_path / "ckpt")]) == 2
    err = capsys.readouterr().err
    assert "--device-map auto needs accelerate" in err and "pip install accelerate==1.15.0" in err
    assert not (tmp_path / "ckpt").exists()


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_torchrun_with_two_ranks_writes_the_single_process_checkpoint(tmp_path):
    """torchrun --nproc-per-node 2 -m refquant quantize: gloo, every 2nd batch a rank; rank 0 prints
    the one report and writes the checkpoint of one process over all batches."""
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}  # torchrun's default, for both runs
    single = subprocess.run([sys.executable, "-m", "refquant", *ARGS, "--out", str(tmp_path / "single")],
                            env=env, capture_output=True, text=True, timeout=300)
    assert single.returncode == 0, single.stderr
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-addr", "127.0.0.1",
                "--master-port", str(_free_port()), "-m", "refquant"]
    ranks = subprocess.run([*torchrun, *ARGS, "--out", str(tmp_path / "ranks")],
                           env=env, capture_output=True, text=True, timeout=300)
    assert ranks.returncode == 0, ranks.stderr
    assert folder_files(tmp_path / "ranks") == folder_files(tmp_path / "single")
    assert ranks.stdout.count("refquant PTQ of LlamaForCausalLM") == 1  # rank 0 alone reports
    assert "4 batches, 256 tokens over 2 ranks" in ranks.stdout
    assert "2 ranks (data parallel: each calibrates 1 batch in 2)" in ranks.stderr
