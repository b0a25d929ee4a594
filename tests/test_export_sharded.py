"""Sharded export (max_shard_size), streamed a layer at a time, and sharded checkpoints read back.

A tiny model with a tiny shard size stands for a model of many GiB: the shards must hold exactly the
single file's tensors, split as huggingface_hub splits a state dict for save_pretrained, with
transformers' model.safetensors.index.json; load_checkpoint must read them back; and the writer
must write a shard before the last layer is even exported.
"""

from __future__ import annotations

import json

import pytest
import torch

import refquant as rq
from refquant.hf import export as export_module
from refquant.hf.export import parse_shard_size, read_checkpoint_tensors
from refquant.hf.export import write as export_write
from conftest import tiny_llama

pytest.importorskip("transformers")
SHARD = 12_000  # bytes: a 2-layer model of hidden 64 (75 kB) becomes several shards, the embeddings alone


@pytest.fixture(scope="module")
def model():
    model = tiny_llama()
    batches = [torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(1))]
    rq.quantize_model(model, rq.load_recipe("nvfp4_default-nvfp4_kv"), batches, progress=False)
    return model


@pytest.fixture(scope="module")
def exported(model, tmp_path_factory):
    folder = tmp_path_factory.mktemp("sharded")
    return rq.export_checkpoint(model, folder / "single"), rq.export_checkpoint(model, folder / "sharded", max_shard_size=SHARD)


def bits(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().reshape(-1).view(torch.uint8)


def test_sharded_checkpoint_holds_exactly_the_single_files_tensors(exported):
    single, sharded = exported
    assert not (single / "model.safetensors.index.json").exists()
    assert not (sharded / "model.safetensors").exists()
    one, many = read_checkpoint_tensors(single), read_checkpoint_tensors(sharded)
    assert list(sorted(one)) == list(sorted(many))
    for key, tensor in one.items():
        assert many[key].dtype == tensor.dtype and many[key].shape == tensor.shape, key
        assert torch.equal(bits(many[key]), bits(tensor)), key
    for name in ("config.json", "hf_quant_config.json", "generation_config.json", "refquant_quantizers.json"):
        assert (single / name).read_bytes() == (sharded / name).read_bytes(), name


def test_shards_and_index_are_what_save_pretrained_writes(model, exported):
    """huggingface_hub.split_torch_state_dict_into_shards (save_pretrained's split) on the whole
    state dict gives the same files with the same tensors; the index is transformers' format."""
    from huggingface_hub import split_torch_state_dict_into_shards

    _, sharded = exported
    state_dict = export_module.checkpoint_state_dict(model, export_module.plan_export(model))
    split = split_torch_state_dict_into_shards(state_dict, max_shard_size=SHARD)
    assert split.is_sharded and len(split.filename_to_tensors) > 2
    index = json.loads((sharded / "model.safetensors.index.json").read_text())
    assert set(index) == {"metadata", "weight_map"}
    assert index["metadata"] == {"total_size": sum(t.numel() * t.element_size() for t in state_dict.values())}
    assert index["weight_map"] == split.tensor_to_filename
    files = sorted(p.name for p in sharded.glob("*.safetensors"))
    assert files == sorted(split.filename_to_tensors)
    assert files[0] == f"model-00001-of-{len(files):05d}.safetensors"
    for name in files:
        size = sum(t.numel() * t.element_size() for k, t in state_dict.items() if index["weight_map"][k] == name)
        assert size <= SHARD or len(split.filename_to_tensors[name]) == 1, name  # only a lone tensor may exceed it


def test_sharded_checkpoint_loads_back_as_the_single_file_does(exported, tmp_path):
    single, sharded = exported
    a, b = rq.load_checkpoint(single), rq.load_checkpoint(sharded)
    ids = torch.randint(0, 128, (1, 12), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        assert torch.equal(bits(a(input_ids=ids).logits), bits(b(input_ids=ids).logits))
    again = rq.export_checkpoint(b, tmp_path / "again", max_shard_size=SHARD)  # the same shards again
    tensor_files = lambda folder: {p.name: p.read_bytes() for p in folder.glob("model*.safetensors*")}  # noqa: E731
    assert tensor_files(again) == tensor_files(sharded)


def test_export_streams_a_shard_out_before_the_last_layer_is_exported(model, tmp_path, monkeypatch):
    events = []
    compute = export_module.LinearExport.tensors
    write = export_write._ShardWriter._write
    monkeypatch.setattr(export_module.LinearExport, "tensors", lambda self: events.append(("layer", self.name)) or compute(self))
    monkeypatch.setattr(export_write._ShardWriter, "_write", lambda self, t: events.append(("shard", len(t))) or write(self, t))
    rq.export_checkpoint(model, tmp_path / "ckpt", max_shard_size=SHARD)
    first_shard = events.index(next(e for e in events if e[0] == "shard"))
    last_layer = max(i for i, e in enumerate(events) if e[0] == "layer")
    assert first_shard < last_layer
    assert [e[1] for e in events if e[0] == "layer"] == list(export_module.plan_export(model).linears)  # each once


def test_a_damaged_index_is_refused(exported, tmp_path):
    import shutil

    _, sharded = exported
    copy = tmp_path / "copy"
    shutil.copytree(sharded, copy)
    index = json.loads((copy / "model.safetensors.index.json").read_text())
    key = sorted(index["weight_map"])[0]
    index["weight_map"][key] = next(f for f in sorted(set(index["weight_map"].values())) if f != index["weight_map"][key])
    (copy / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(ValueError, match=r"model\.safetensors\.index\.json does not match model-000\d\d-of-000\d\d\.safetensors"):
        rq.load_checkpoint(copy)


@pytest.mark.parametrize(
    "size, expected",
    [
        (4096, 4096),
        ("4096", 4096),
        ("4096B", 4096),
        ("5GB", 5 * 10**9),  # decimal, as transformers and huggingface_hub
        ("10GB", 10 * 10**9),  # modelopt's default
        ("1.5MB", 1_500_000),
        ("2GiB", 2 * 2**30),
        (" 500 kb ", 500_000),
    ],
)
def test_shard_sizes_are_bytes_or_strings_with_units(size, expected):
    assert parse_shard_size(size) == expected


@pytest.mark.parametrize("size", ["5 parsecs", "GB", "-1GB", 0, True, 1.5, None])
def test_a_bad_shard_size_is_refused_before_anything_is_written(model, tmp_path, size):
    with pytest.raises(ValueError, match="max_shard_size="):
        rq.export_checkpoint(model, tmp_path / "ckpt", max_shard_size=size)
    assert not any(tmp_path.iterdir())
