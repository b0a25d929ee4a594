"""`refquant quantize`, the main job: the default run, a local model folder, and bad input that
must give a clear message, a non-zero exit, and no output at all."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from torch import nn

from refquant.cli import quantize as ptq_cli
from refquant.cli import main
from conftest import REPO

transformers = pytest.importorskip("transformers")


@pytest.fixture
def in_tmp(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    return tmp_path


def tiny_llama_folder(path, seed: int = 0):
    """A saved tiny Llama (vocab 320, enough for the byte tokenizer), without tokenizer files."""
    config = transformers.LlamaConfig(vocab_size=320, hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                                      num_attention_heads=4, num_key_value_heads=2, head_dim=16)
    torch.manual_seed(seed)
    transformers.LlamaForCausalLM(config).to(torch.bfloat16).save_pretrained(path)
    return path



def config_only_folder(path, family: str, vocab_size: int = 320):
    """A saved tiny 1-layer model of `family` (model_type), as save_pretrained writes it: config and
    weights, no tokenizer files."""
    config = transformers.AutoConfig.for_model(
        family, vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=1,
        num_attention_heads=4, num_key_value_heads=2, head_dim=16,
    )
    torch.manual_seed(0)
    transformers.AutoModelForCausalLM.from_config(config).to(torch.bfloat16).save_pretrained(path)
    return path

def test_help_names_every_option():
    result = subprocess.run([sys.executable, "-m", "refquant", "quantize", "--help"], capture_output=True, text=True, check=True)
    for option in ("--model", "--calib-text", "--recipe", "--qformat", "--kv-cache-qformat", "--device", "--backend",
                   "--out", "--report-json", "--calib-batches", "--seq-len", "nvfp4_default-fp8_cast_kv", "fp8_cast"):
        assert option in result.stdout, option


def test_no_arguments_quantizes_the_builtin_model_and_writes_checkpoint(in_tmp, capsys):
    assert main(["quantize", "--no-progress", "--calib-batches", "4", "--report-json", "report.json"]) == 0
    out = capsys.readouterr().out
    assert "recipe nvfp4_default-fp8_cast_kv" in out and "model.layers.3.self_attn.k_bmm_quantizer" in out
    assert "perplexity: original" in out
    checkpoint = in_tmp / "out" / "refquant-ckpt"
    assert (checkpoint / "config.json").is_file() and (checkpoint / "hf_quant_config.json").is_file()
    report = json.loads((in_tmp / "report.json").read_text())
    assert report["calib_batches"] == 4 and report["totals"]["quantized_linears"] == 28
    sources = {row["name"]: row["amax_source"] for row in report["quantizers"]}
    assert sources["model.layers.0.self_attn.v_bmm_quantizer"] == "constant"
    assert sources["model.layers.0.mlp.down_proj.input_quantizer"] == "calibrated"


def test_local_model_folder_with_calibration_text_and_a_recipe_that_overrides_the_kv_flag(in_tmp, capsys):
    model_dir = tiny_llama_folder(in_tmp / "tiny-llama")
    text = in_tmp / "calib.txt"
    text.write_text("A short calibration text, repeated to fill the windows. " * 8, encoding="utf-8")
    code = main(["quantize", "--model", str(model_dir), "--calib-text", str(text), "--recipe", "fp8_default-fp8_kv",
                 "--kv-cache-qformat", "fp8_cast", "--out", "ckpt", "--seq-len", "32", "--calib-batches", "2", "--no-progress"])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert "--kv-cache-qformat fp8_cast is ignored" in captured.err and "byte-level tokenizer" in captured.err
    assert "recipe fp8_default-fp8_kv" in captured.out
    assert "model.layers.0.self_attn.k_bmm_quantizer" in captured.out and "calibrated" in captured.out
    assert (in_tmp / "ckpt" / "model.safetensors").is_file()


def test_kv_flag_without_recipe_appends_the_kv_rules_to_the_qformat_body(in_tmp, capsys):
    model_dir = tiny_llama_folder(in_tmp / "tiny-llama")
    code = main(["quantize", "--model", str(model_dir), "--qformat", "fp8", "--kv-cache-qformat", "nvfp4_cast",
                 "--out", "ckpt", "--seq-len", "32", "--calib-batches", "1", "--no-progress", "--report-json", "r.json"])
    assert code == 0, capsys.readouterr().err
    rows = {row["name"]: row for row in json.loads((in_tmp / "r.json").read_text())["quantizers"]}
    assert rows["model.layers.0.self_attn.k_bmm_quantizer"]["format"] == "nvfp4"
    assert rows["model.layers.0.self_attn.k_bmm_quantizer"]["amax_source"] == "constant"
    assert rows["model.layers.0.self_attn.q_proj.weight_quantizer"]["format"] == "fp8"


def assert_failed_without_output(code, capsys, folder, message, keep=()):
    """Exit 2, the message on stderr, and nothing in `folder` but what was there (`keep`)."""
    assert code == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
    assert sorted(p.name for p in folder.iterdir()) == sorted(keep), "a failed run left files behind"


def test_existing_output_folder_is_refused_and_left_untouched(in_tmp, capsys):
    (in_tmp / "ckpt").mkdir()
    (in_tmp / "ckpt" / "mine.txt").write_text("keep me")
    assert_failed_without_output(main(["quantize", "--out", "ckpt"]), capsys, in_tmp, "--out ckpt exists", keep=["ckpt"])
    assert (in_tmp / "ckpt" / "mine.txt").read_text() == "keep me"


@pytest.mark.parametrize("args,message", [
    (["--recipe", "nvfp4_default-fp8_cats_kv"], "'nvfp4_default-fp8_cats_kv' is neither a shipped recipe"),
    (["--model", "no-such-folder"], "--model no-such-folder: no such folder"),
    (["--calib-text", "missing.txt"], "--calib-text missing.txt: no such file"),
    (["--device", "banana"], "--device banana: not a torch device. Pass cpu, cuda or cuda:N"),
    (["--device", "cuda:99"], "--device cuda:99: "),
])
def test_bad_input_gives_a_clear_message_and_no_output(in_tmp, capsys, args, message):
    assert_failed_without_output(main(["quantize", "--out", "ckpt", "--report-json", "r.json", *args]), capsys, in_tmp, message)


def test_model_without_quantizable_layers_gives_a_clear_message_and_no_output(in_tmp, capsys, monkeypatch):
    embeddings_only = nn.Sequential(nn.Embedding(320, 8))
    monkeypatch.setattr(ptq_cli, "load_model", lambda model_dir, device, device_map=None: (embeddings_only, ptq_cli.models.byte_tokenize, "embeddings"))
    code = main(["quantize", "--out", "ckpt", "--report-json", "r.json", "--no-progress"])
    assert_failed_without_output(code, capsys, in_tmp, "no quantizable layers in Sequential")


def test_failing_export_leaves_neither_checkpoint_nor_report(in_tmp, capsys, monkeypatch):
    import refquant.hf.export

    def broken_export(model, out_dir, **options):
        raise ValueError("disk full (injected)")

    monkeypatch.setattr(refquant.hf.export, "export_checkpoint", broken_export)
    model_dir = tiny_llama_folder(in_tmp / "tiny-llama")
    code = main(["quantize", "--model", str(model_dir), "--out", "ckpt", "--report-json", "r.json",
                 "--seq-len", "32", "--calib-batches", "1", "--no-progress"])
    assert_failed_without_output(code, capsys, in_tmp, "disk full (injected)", keep=["tiny-llama"])


def test_a_truncated_safetensors_file_in_the_model_folder_is_named_and_nothing_written(in_tmp, capsys):
    model_dir = tiny_llama_folder(in_tmp / "tiny-llama")
    weights = model_dir / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-1000])
    code = main(["quantize", "--model", str(model_dir), "--out", "ckpt", "--no-progress"])
    assert_failed_without_output(code, capsys, in_tmp, f"--model {model_dir}: {weights}: truncated", keep=["tiny-llama"])


def test_a_write_that_fails_for_want_of_space_exits_1_with_one_line_naming_the_file(in_tmp):
    """A real failed write: the process may write files of at most 64 KB (RLIMIT_FSIZE, as a nearly
    full disk), so safetensors' write of the checkpoint fails inside its Rust writer."""
    model_dir = tiny_llama_folder(in_tmp / "tiny-llama")
    script = (
        "import resource, signal, sys\n"
        "signal.signal(signal.SIGXFSZ, signal.SIG_IGN)\n"
        "resource.setrlimit(resource.RLIMIT_FSIZE, (64000, 64000))\n"
        "from refquant.cli import main\n"
        f"sys.exit(main(['quantize', '--model', {str(model_dir)!r}, '--out', 'ckpt', '--seq-len', '16', "
        "'--calib-batches', '1', '--no-progress']))\n"
    )
    result = subprocess.run([sys.executable, "-c", script], cwd=in_tmp, capture_output=True, text=True, timeout=300,
                            env={**os.environ, "PYTHONPATH": str(REPO)})
    lines = [line for line in result.stderr.splitlines() if "error" in line]
    assert result.returncode == 1, result.stderr[-3000:]
    assert "Traceback" not in result.stderr and len(lines) == 1, result.stderr[-3000:]
    assert lines[0].startswith("refquant quantize: error: [Errno 27] writing the checkpoint ckpt failed: ")
    assert ".shard-0" in lines[0] and "File too large" in lines[0] and "Nothing was written" in lines[0]
    assert sorted(p.name for p in in_tmp.iterdir()) == ["tiny-llama"]


@pytest.mark.parametrize("family", ["qwen3", "gemma3_text"])
def test_folder_for_which_transformers_builds_an_empty_tokenizer_falls_back_to_the_byte_tokenizer(family, in_tmp, capsys):
    model_dir = config_only_folder(in_tmp / family, family)
    # what this test is about: no error from transformers, a tokenizer that finds no tokens in text
    assert len(transformers.AutoTokenizer.from_pretrained(model_dir)("Some text to split")["input_ids"]) <= 1
    code = main(["quantize", "--model", str(model_dir), "--out", "ckpt", "--seq-len", "32", "--calib-batches", "1",
                 "--no-progress"])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert "has no usable tokenizer" in captured.err and "using the built-in byte-level tokenizer" in captured.err
    assert (in_tmp / "ckpt" / "model.safetensors").is_file()


def test_no_usable_tokenizer_and_a_vocabulary_too_small_for_bytes_is_a_clear_error_and_no_output(in_tmp, capsys):
    model_dir = config_only_folder(in_tmp / "qwen3", "qwen3", vocab_size=128)
    code = main(["quantize", "--model", str(model_dir), "--out", "ckpt", "--seq-len", "32", "--calib-batches", "1",
                 "--no-progress"])
    error = capsys.readouterr().err
    assert code == 2
    assert "has no usable tokenizer" in error and "vocabulary of 128 ids is too small for the built-in byte tokenizer (259)" in error
    assert "Add its tokenizer files" in error and not (in_tmp / "ckpt").exists()
