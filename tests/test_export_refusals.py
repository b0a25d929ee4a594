"""What export_checkpoint refuses or cleans up instead of writing a checkpoint that is wrong: a
quantized tied weight (lm_head under tie_word_embeddings), a model whose calibration did not
finish, a failed write (a full disk), and the partial folders that killed exports leave behind."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import textwrap

import pytest
import torch

import refquant as rq
from refquant.quant.recipe import QuantRule

transformers = pytest.importorskip("transformers")
from conftest import REPO  # noqa: E402
from test_export import batches, quantized, tiny_model  # noqa: E402


def recipe_quantizing_lm_head():
    """A shipped NVFP4 recipe, then rules that enable lm_head's weight and input quantizers."""
    recipe = rq.load_recipe("nvfp4_default-fp8_cast_kv")
    recipe.quant_cfg += [QuantRule("*lm_head.weight_quantizer", enable=True), QuantRule("*lm_head.input_quantizer", enable=True)]
    return recipe


# --- tied weights -----------------------------------------------------------------------------------


def test_quantizing_a_tied_lm_head_is_refused_before_calibration_naming_the_rule(tmp_path):
    model = tiny_model(tie=True)
    recipe = recipe_quantizing_lm_head()
    with pytest.raises(ValueError) as error:
        rq.quantize_model(model, recipe, batches(), progress=False)
    message = str(error.value)
    rule = len(recipe.quant_cfg) - 2
    for fragment in ("lm_head shares its weight with model.embed_tokens", "tie_word_embeddings",
                     f"quant_cfg[{rule}]", "quantizer_name='*lm_head.weight_quantizer'", "drop that rule",
                     "Nothing was calibrated"):
        assert fragment in message, (fragment, message)
    assert all(q.amax is None or q.config.use_constant_amax for _, q in rq.hf.ptq.named_quantizers(model))


def test_a_tied_lm_head_quantized_by_hand_is_refused_by_the_export(tmp_path):
    model = tiny_model(tie=True)
    rq.quantize_model(model, rq.load_recipe("nvfp4_default-fp8_cast_kv"), batches(), progress=False)
    lm_head_q = model.lm_head.weight_quantizer
    lm_head_q.set_config(model.model.layers[0].mlp.up_proj.weight_quantizer.config)
    lm_head_q.set_amax(model.lm_head.weight.detach().abs().amax().float())
    for call in (lambda: rq.export_checkpoint(model, tmp_path / "ckpt"), lambda: rq.compress_weights(model)):
        with pytest.raises(ValueError, match="lm_head shares its weight with model.embed_tokens.*lm_head.weight_quantizer off"):
            call()
    assert list(tmp_path.iterdir()) == []


def test_an_untied_lm_head_may_be_quantized_and_loads_back(tmp_path):
    model = tiny_model(tie=False)
    rq.quantize_model(model, recipe_quantizing_lm_head(), batches(), progress=False)
    folder = rq.export_checkpoint(model, tmp_path / "ckpt")
    reloaded = rq.load_checkpoint(folder)
    assert reloaded.lm_head.weight_quantizer.layer_format == "nvfp4"


# --- calibration that did not finish ----------------------------------------------------------------


@pytest.mark.parametrize("recipe, enabled", [("nvfp4_default-fp8_cast_kv", 14), ("fp8_default-fp8_kv", 18)])
def test_a_model_whose_calibration_got_no_batch_cannot_be_exported(tmp_path, recipe, enabled):
    model = tiny_model()
    with pytest.raises(ValueError, match="calib_batches gave no batch"):
        rq.quantize_model(model, rq.load_recipe(recipe), [], progress=False)
    for call in (lambda: rq.export_checkpoint(model, tmp_path / "ckpt"), lambda: rq.compress_weights(model)):
        with pytest.raises(ValueError, match=rf"q_proj\.input_quantizer \(and {enabled - 1} more\) is enabled but holds no calibrated amax"):
            call()
    assert list(tmp_path.iterdir()) == []


def test_a_model_whose_calibration_stopped_at_a_bad_batch_cannot_be_exported(tmp_path):
    model = tiny_model()
    with pytest.raises(ValueError, match="must be a dict"):
        rq.quantize_model(model, rq.load_recipe("fp8_default-fp8_kv"), [batches()[0], "not a batch"], progress=False)
    with pytest.raises(ValueError, match="still calibrating"):
        rq.export_checkpoint(model, tmp_path / "ckpt")


# --- a write that fails -------------------------------------------------------------------------------


def test_a_full_disk_gives_an_os_error_naming_the_checkpoint_and_file_and_leaves_nothing(tmp_path, monkeypatch):
    from safetensors import SafetensorError

    def full_disk(tensors, filename, metadata=None):
        with open(filename, "wb") as handle:
            handle.write(b"partial")
        raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")

    monkeypatch.setattr("safetensors.torch.save_file", full_disk)
    with pytest.raises(OSError) as error:
        rq.export_checkpoint(quantized("fp8_default-fp8_cast_kv"), tmp_path / "ckpt")
    message = str(error.value)
    assert error.value.errno == 28
    assert f"writing the checkpoint {tmp_path / 'ckpt'} failed" in message and "No space left on device" in message
    assert ".shard-0" in message and "Nothing was written" in message
    assert list(tmp_path.iterdir()) == []


# --- partial folders of killed exports ----------------------------------------------------------------


def _partial(parent, name: str):
    folder = parent / name
    folder.mkdir()
    (folder / "model.safetensors").write_bytes(b"half")
    return folder


def test_a_sigkilled_export_leaves_a_partial_folder_that_the_next_export_removes(tmp_path):
    script = textwrap.dedent(f"""
        import os, signal, sys
        sys.path.insert(0, {str(REPO / 'tests')!r})
        from test_export import quantized
        import refquant as rq
        from refquant.hf.export import write
        def killed(self, tensors):
            (self.folder / ".shard-0").write_bytes(b"half a shard")
            os.kill(os.getpid(), signal.SIGKILL)
        write._ShardWriter._write = killed
        rq.export_checkpoint(quantized("fp8_default-fp8_cast_kv"), {str(tmp_path / 'first')!r})
    """)
    result = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, timeout=300,
                            env={**os.environ, "PYTHONPATH": str(REPO)})
    assert result.returncode == -9, result.stderr.decode()[-2000:]
    (left,) = tmp_path.iterdir()
    assert left.name.startswith(".first.partial-")

    with pytest.warns(UserWarning, match=rf"removed {left}: a partial checkpoint left by an export that was killed"):
        rq.export_checkpoint(quantized("fp8_default-fp8_cast_kv"), tmp_path / "second")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["second"]


def test_a_live_writers_partial_folder_is_left_alone_and_an_unknown_one_is_reported(tmp_path):
    live = _partial(tmp_path, f".other.partial-{socket.gethostname()}-{os.getpid()}-0a1b2c3d")
    foreign = _partial(tmp_path, ".old.partial-0a1b2c3d")  # no writer in its name
    with pytest.warns(UserWarning) as caught:
        rq.export_checkpoint(quantized("fp8_default-fp8_cast_kv"), tmp_path / "ckpt")
    messages = [str(w.message) for w in caught]
    assert any(str(foreign) in m and "cannot tell whether its writer still runs" in m for m in messages), messages
    assert not any(str(live) in m for m in messages), messages
    assert live.is_dir() and foreign.is_dir() and (tmp_path / "ckpt").is_dir()
