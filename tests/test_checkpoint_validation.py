"""load_checkpoint checks what a deployment reads before it trusts a folder: one checkpoint per
format, damaged in one place per case, must give a ValueError that names the file and the tensor or
key, never a model and never a bare KeyError / TypeError / AttributeError."""

from __future__ import annotations

import json
import shutil
import warnings
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import refquant as rq

transformers = pytest.importorskip("transformers")
from test_export import batches, tiny_model  # noqa: E402

LAYER = "model.layers.0.self_attn.q_proj"
ATTENTION = "model.layers.1.self_attn"


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """recipe -> a checkpoint folder (NVFP4 W4A4 with calibrated FP8 K/V; FP8 with calibrated K/V),
    and "sharded": the NVFP4 one in several files with an index."""
    folder = tmp_path_factory.mktemp("valid")
    found = {}
    for recipe in ("nvfp4_default-fp8_kv", "fp8_default-fp8_kv"):
        model = tiny_model()
        rq.quantize_model(model, rq.load_recipe(recipe), batches(), progress=False)
        found[recipe] = rq.export_checkpoint(model, folder / recipe)
        if recipe.startswith("nvfp4"):
            found["sharded"] = rq.export_checkpoint(model, folder / "sharded", max_shard_size="40KB")
    return found


def damaged(checkpoints, tmp_path, which: str = "nvfp4_default-fp8_kv") -> Path:
    folder = tmp_path / which
    shutil.copytree(checkpoints[which], folder)
    return folder


def edit_json(path: Path, change) -> None:
    document = json.loads(path.read_text())
    change(document)
    path.write_text(json.dumps(document))


def edit_tensors(path: Path, change) -> None:
    tensors = load_file(str(path))
    change(tensors)
    save_file(tensors, str(path), metadata={"format": "pt"})


def assert_refused(folder: Path, *fragments: str) -> str:
    with pytest.raises(ValueError) as error:
        rq.load_checkpoint(folder)
    message = str(error.value)
    missing = [fragment for fragment in fragments if fragment not in message]
    assert not missing, f"{message!r} lacks {missing}"
    return message


def test_the_undamaged_checkpoints_load(checkpoints):
    for folder in checkpoints.values():
        rq.load_checkpoint(folder)


# --- tensors: (recipe, change, fragments) ------------------------------------------------------
def _set(key, value):
    return lambda tensors: tensors.__setitem__(key, value)


def _drop(key):
    return lambda tensors: tensors.pop(key)


def _nan_block_scale(tensors):
    scale = tensors[f"{LAYER}.weight_scale"].clone()
    scale.view(torch.uint8)[0, 0] = 0x7F  # E4M3's NaN
    tensors[f"{LAYER}.weight_scale"] = scale


TENSOR_DAMAGE = {
    "deleted input_scale": ("nvfp4_default-fp8_kv", _drop(f"{LAYER}.input_scale"), [f"{LAYER}.input_scale: missing"]),
    "weight_scale_2 NaN": ("nvfp4_default-fp8_kv", _set(f"{LAYER}.weight_scale_2", torch.tensor(float("nan"))),
                           [f"{LAYER}.weight_scale_2", "NaN, infinite or negative"]),
    "NaN block scale": ("nvfp4_default-fp8_kv", _nan_block_scale, [f"{LAYER}.weight_scale", "1 of its", "NaN, infinite or negative"]),
    "negative input_scale": ("nvfp4_default-fp8_kv", _set(f"{LAYER}.input_scale", torch.tensor(-0.5)),
                             [f"{LAYER}.input_scale", "NaN, infinite or negative"]),
    "input_scale in bf16": ("nvfp4_default-fp8_kv", _set(f"{LAYER}.input_scale", torch.tensor(0.5, dtype=torch.bfloat16)),
                            [f"{LAYER}.input_scale: dtype bfloat16, expected float32"]),
    "packed weight one column short": ("nvfp4_default-fp8_kv", lambda t: t.__setitem__(f"{LAYER}.weight", t[f"{LAYER}.weight"][:, :-1].clone()),
                                       [f"{LAYER}.weight: shape [64, 31], expected [64, 32]"]),
    "deleted weight": ("nvfp4_default-fp8_kv", _drop(f"{LAYER}.weight"), [f"{LAYER}.weight: missing"]),
    "deleted k_scale": ("fp8_default-fp8_kv", _drop(f"{ATTENTION}.k_proj.k_scale"), [f"{ATTENTION}.k_proj.k_scale: missing"]),
    "k_scale edited": ("fp8_default-fp8_kv", _set(f"{ATTENTION}.k_proj.k_scale", torch.tensor(0.25)),
                       [f"{ATTENTION}.k_proj.k_scale", "disagrees with refquant_quantizers.json"]),
    "FP8 weight_scale infinite": ("fp8_default-fp8_kv", _set(f"{LAYER}.weight_scale", torch.tensor(float("inf"))),
                             [f"{LAYER}.weight_scale", "NaN, infinite or negative"]),
    "FP8 weight with a NaN byte": ("fp8_default-fp8_kv",
                                   lambda t: t[f"{LAYER}.weight"].view(torch.uint8).__setitem__((0, 0), 0x7F),
                                   [f"{LAYER}.weight", "NaN or infinite"]),
    "embedding NaN": ("nvfp4_default-fp8_kv", lambda t: t["model.embed_tokens.weight"].__setitem__((0, 0), float("nan")),
                      ["model.embed_tokens.weight", "NaN or infinite"]),
    "norm of the wrong shape": ("nvfp4_default-fp8_kv", _set("model.norm.weight", torch.ones(65, dtype=torch.bfloat16)),
                                ["model.norm.weight: shape [65], expected [64]"]),
}


@pytest.mark.parametrize("case", sorted(TENSOR_DAMAGE))
def test_a_damaged_tensor_is_refused_naming_the_file_and_the_tensor(checkpoints, tmp_path, case):
    assert_tensor_damage_refused(checkpoints, tmp_path, *TENSOR_DAMAGE[case])


def assert_tensor_damage_refused(checkpoints, tmp_path, which: str, change, fragments: list[str]) -> None:
    """A copy of checkpoints[which] with `change` made to its tensors is refused with a ValueError
    naming its model.safetensors and holding every fragment."""
    folder = damaged(checkpoints, tmp_path, which)
    edit_tensors(folder / "model.safetensors", change)
    assert_refused(folder, str(folder / "model.safetensors"), *fragments)


# --- MoE experts: every tensor of every expert, checked as a dense layer's -------------------------
EXPERTS = "model.layers.0.mlp.experts"  # Qwen3-MoE's fused experts, written expert by expert
GPT_OSS = "model.layers.1.mlp.experts"  # gpt-oss's 3-D experts, written whole
MIXTRAL = "model.layers.0.block_sparse_moe.experts"  # the hub's names: w1 (gate), w3 (up), w2 (down)


@pytest.fixture(scope="module")
def moe_checkpoints(tmp_path_factory):
    """name -> a checkpoint folder of a tiny MoE model (tests/modelopt_compare.py): Qwen3-MoE NVFP4
    and FP8, gpt-oss NVFP4, Mixtral FP8, and Qwen3-MoE FP8 with its experts left unquantized."""
    import modelopt_compare as mc

    experts_off = rq.load_recipe("fp8_default-fp8_kv")
    experts_off = type(experts_off)(**{**experts_off.__dict__,
                                       "quant_cfg": [*experts_off.quant_cfg, rq.QuantRule("*experts*", enable=False)]})
    folder = tmp_path_factory.mktemp("moe")
    found = {}
    calibration, _ = mc.default_batches()
    for name, family, recipe in [("qwen3_moe-nvfp4", "qwen3_moe", rq.load_recipe("nvfp4_default-fp8_kv")),
                                 ("qwen3_moe-fp8", "qwen3_moe", rq.load_recipe("fp8_default-fp8_kv")),
                                 ("gpt_oss-nvfp4", "gpt_oss", rq.load_recipe("nvfp4_default-fp8_kv")),
                                 ("mixtral-fp8", "mixtral", rq.load_recipe("fp8_default-fp8_kv")),
                                 ("qwen3_moe-experts-off", "qwen3_moe", experts_off)]:
        model = mc.build_model(family)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the experts-off recipe warns that most weights stay unquantized
            rq.quantize_model(model, recipe, calibration, progress=False)
        found[name] = rq.export_checkpoint(model, folder / name)
    return found


def _nan_byte(key):
    return lambda tensors: tensors[key].view(torch.uint8).view(-1).__setitem__(0, 0x7F)  # E4M3's NaN


EXPERT_DAMAGE = {
    "expert weight_scale deleted": ("qwen3_moe-nvfp4", _drop(f"{EXPERTS}.2.up_proj.weight_scale"),
                                    [f"{EXPERTS}.2.up_proj.weight_scale: missing"]),
    "expert input_scale deleted": ("qwen3_moe-nvfp4", _drop(f"{EXPERTS}.3.down_proj.input_scale"),
                                   [f"{EXPERTS}.3.down_proj.input_scale: missing"]),
    "expert weight deleted": ("qwen3_moe-fp8", _drop(f"{EXPERTS}.1.gate_proj.weight"), [f"{EXPERTS}.1.gate_proj.weight: missing"]),
    "expert weight_scale_2 NaN": ("qwen3_moe-nvfp4", _set(f"{EXPERTS}.1.gate_proj.weight_scale_2", torch.tensor(float("nan"))),
                                  [f"{EXPERTS}.1.gate_proj.weight_scale_2", "NaN, infinite or negative"]),
    "expert block scale NaN": ("qwen3_moe-nvfp4", _nan_byte(f"{EXPERTS}.0.down_proj.weight_scale"),
                               [f"{EXPERTS}.0.down_proj.weight_scale", "1 of its", "NaN, infinite or negative"]),
    "expert input_scale negative": ("qwen3_moe-fp8", _set(f"{EXPERTS}.2.down_proj.input_scale", torch.tensor(-1.0)),
                                    [f"{EXPERTS}.2.down_proj.input_scale", "NaN, infinite or negative"]),
    "expert packed weight reshaped": ("qwen3_moe-nvfp4", lambda t: t.__setitem__(f"{EXPERTS}.0.down_proj.weight",
                                                                                 t[f"{EXPERTS}.0.down_proj.weight"].reshape(32, 32).clone()),
                                      [f"{EXPERTS}.0.down_proj.weight: shape [32, 32], expected [64, 16]"]),
    "expert FP8 weight in bf16": ("qwen3_moe-fp8", lambda t: t.__setitem__(f"{EXPERTS}.3.up_proj.weight",
                                                                         t[f"{EXPERTS}.3.up_proj.weight"].to(torch.bfloat16)),
                                  [f"{EXPERTS}.3.up_proj.weight: dtype bfloat16, expected float8_e4m3fn"]),
    "expert FP8 weight with a NaN byte": ("qwen3_moe-fp8", _nan_byte(f"{EXPERTS}.0.gate_proj.weight"),
                                          [f"{EXPERTS}.0.gate_proj.weight", "NaN or infinite"]),
    "unquantized expert weight NaN": ("qwen3_moe-experts-off",
                                      lambda t: t[f"{EXPERTS}.1.down_proj.weight"].__setitem__((0, 0), float("nan")),
                                      [f"{EXPERTS}.1.down_proj.weight", "NaN or infinite"]),
    "unquantized expert weight deleted": ("qwen3_moe-experts-off", _drop(f"{EXPERTS}.1.gate_proj.weight"),
                                          [f"{EXPERTS}.1.gate_proj.weight: missing"]),
    "gpt-oss weight_scale_2 deleted": ("gpt_oss-nvfp4", _drop(f"{GPT_OSS}.down_proj_weight_scale_2"),
                                       [f"{GPT_OSS}.down_proj_weight_scale_2: missing"]),
    "gpt-oss input_scale NaN": ("gpt_oss-nvfp4", _set(f"{GPT_OSS}.gate_up_proj_input_scale", torch.tensor(float("nan"))),
                                [f"{GPT_OSS}.gate_up_proj_input_scale", "NaN, infinite or negative"]),
    "gpt-oss packed weight one expert short": ("gpt_oss-nvfp4", lambda t: t.__setitem__(f"{GPT_OSS}.gate_up_proj",
                                                                                      t[f"{GPT_OSS}.gate_up_proj"][:-1].clone()),
                                               [f"{GPT_OSS}.gate_up_proj: shape [3, 32, 128], expected [4, 32, 128]"]),
    "Mixtral w3 input_scale deleted": ("mixtral-fp8", _drop(f"{MIXTRAL}.1.w3.input_scale"), [f"{MIXTRAL}.1.w3.input_scale: missing"]),
    "Mixtral w2 weight_scale infinite": ("mixtral-fp8", _set(f"{MIXTRAL}.2.w2.weight_scale", torch.tensor(float("inf"))),
                                         [f"{MIXTRAL}.2.w2.weight_scale", "NaN, infinite or negative"]),
}


def test_the_undamaged_moe_checkpoints_load(moe_checkpoints):
    for folder in moe_checkpoints.values():
        rq.load_checkpoint(folder)


@pytest.mark.parametrize("case", sorted(EXPERT_DAMAGE))
def test_a_damaged_expert_tensor_is_refused_naming_the_file_and_the_tensor(moe_checkpoints, tmp_path, case):
    assert_tensor_damage_refused(moe_checkpoints, tmp_path, *EXPERT_DAMAGE[case])


# --- configs and quantizer state: (file, change, fragments) ---------------------------------------
def _quantizer(state, name=f"{LAYER}.input_quantizer"):
    return state["quantizers"][name]


JSON_DAMAGE = {
    "quant_algo edited": ("hf_quant_config.json", lambda d: d["quantization"].update(quant_algo="FP8"),
                          ["quantization.quant_algo", "'FP8'", "'NVFP4'"]),
    "group_size edited": ("hf_quant_config.json", lambda d: d["quantization"].update(group_size=32),
                          ["quantization.group_size", "32"]),
    "kv_cache_quant_algo edited": ("hf_quant_config.json", lambda d: d["quantization"].update(kv_cache_quant_algo="NVFP4"),
                                   ["quantization.kv_cache_quant_algo"]),
    "lm_head no longer excluded": ("hf_quant_config.json", lambda d: d["quantization"].update(exclude_modules=["model.embed_tokens"]),
                                   ["quantization.exclude_modules"]),
    "quantization missing": ("hf_quant_config.json", lambda d: d.pop("quantization"), ["quantization: missing"]),
    "config.json quant_algo edited": ("config.json", lambda d: d["quantization_config"].update(quant_algo="FP8"),
                                      ["quantization_config.quant_algo"]),
    "config.json group size edited": ("config.json",
                                      lambda d: d["quantization_config"]["config_groups"]["group_0"]["weights"].update(group_size=32),
                                      ["quantization_config.config_groups"]),
    "config.json dtype unknown": ("config.json", lambda d: d.update(dtype="banana"), ["dtype: 'banana' is not a torch floating-point dtype"]),
    "config.json layers as text": ("config.json", lambda d: d.update(num_hidden_layers="two"),
                                   ["transformers cannot build a config", "num_hidden_layers"]),
    "config.json without model_type": ("config.json", lambda d: d.pop("model_type"), ["model_type: missing"]),
    "layer format edited": ("refquant_quantizers.json", lambda d: d["layers"].update({LAYER: "fp8"}),
                            [f"layers.{LAYER}: says 'fp8', but the file's quantizer configs make the layer 'nvfp4'"]),
    "layer format unknown": ("refquant_quantizers.json", lambda d: d["layers"].update({LAYER: "int4"}),
                             [f"layers.{LAYER}: 'int4' is not a layer format"]),
    "a layer that does not exist": ("refquant_quantizers.json", lambda d: d["layers"].update({"model.layers.9.mlp": "nvfp4"}),
                                    ["layers.model.layers.9.mlp"]),
    "quantizers missing": ("refquant_quantizers.json", lambda d: d.pop("quantizers"), ["quantizers: missing"]),
    "layers a list": ("refquant_quantizers.json", lambda d: d.update(layers=[]), ["layers: expected an object, got list"]),
    "backend a number": ("refquant_quantizers.json", lambda d: d.update(backend=3), ["backend: expected a string, got int"]),
    "backend unknown": ("refquant_quantizers.json", lambda d: d.update(backend="triton"), ["backend: 'triton' is not one of"]),
    "flavor unknown": ("refquant_quantizers.json", lambda d: d.update(flavor="cuda"), ["flavor: 'cuda' is not one of"]),
    "buffer dtype unknown": ("refquant_quantizers.json", lambda d: d["buffer_dtypes"].update({"model.rotary_emb.inv_freq": "int8"}),
                             ["buffer_dtypes.model.rotary_emb.inv_freq: 'int8' is not a torch floating-point dtype"]),
    "buffer that does not exist": ("refquant_quantizers.json", lambda d: d["buffer_dtypes"].update({"model.nothing.here": "float32"}),
                                   ["buffer_dtypes"]),
    "amax not hex": ("refquant_quantizers.json", lambda d: _quantizer(d)["amax"].update(values=["zz"]),
                     [f"quantizers.{LAYER}.input_quantizer.amax.values: 'zz' is not a hex float"]),
    "amax values a number": ("refquant_quantizers.json", lambda d: _quantizer(d)["amax"].update(values=3),
                             [f"quantizers.{LAYER}.input_quantizer.amax.values: expected a list of hex floats"]),
    "amax of the wrong count": ("refquant_quantizers.json", lambda d: _quantizer(d)["amax"].update(shape=[2]),
                                [f"quantizers.{LAYER}.input_quantizer.amax.values: 1 values for the shape [2]"]),
    "amax dtype int": ("refquant_quantizers.json", lambda d: _quantizer(d)["amax"].update(dtype="int32"),
                       [f"quantizers.{LAYER}.input_quantizer.amax.dtype: 'int32'"]),
    "amax infinite": ("refquant_quantizers.json", lambda d: _quantizer(d)["amax"].update(values=[float("inf").hex()]),
                      ["amax.values: 'inf' is not a finite amax >= 0"]),
    "config format a number": ("refquant_quantizers.json", lambda d: _quantizer(d)["config"].update(format=5),
                               [f"quantizers.{LAYER}.input_quantizer.config.format: expected a string, got int"]),
    "config format unknown": ("refquant_quantizers.json", lambda d: _quantizer(d)["config"].update(format="fp9"),
                              [f"quantizers.{LAYER}.input_quantizer: format='fp9' is not known"]),
    "attention implementation unknown": ("refquant_quantizers.json", lambda d: d.update(attn_implementation="warp_speed"),
                                         ["attn_implementation='warp_speed'", "refquant_quantizers.json: attn_implementation"]),
    "config missing": ("refquant_quantizers.json", lambda d: _quantizer(d).pop("config"),
                       [f"quantizers.{LAYER}.input_quantizer.config: missing"]),
    "entry a string": ("refquant_quantizers.json", lambda d: d["quantizers"].update({f"{LAYER}.input_quantizer": "x"}),
                       [f"quantizers.{LAYER}.input_quantizer: expected an object, got str"]),
    # what a model whose calibration did not finish exported: input quantizers on, no amax, no input_scale
    "input amax dropped": ("refquant_quantizers.json", lambda d: _quantizer(d).update(amax=None),
                           [f"quantizers.{LAYER}.input_quantizer (and 0 more): enabled without a calibrated amax"]),
}


@pytest.mark.parametrize("case", sorted(JSON_DAMAGE))
def test_a_damaged_json_document_is_refused_naming_the_file_and_the_key(checkpoints, tmp_path, case):
    filename, change, fragments = JSON_DAMAGE[case]
    folder = damaged(checkpoints, tmp_path)
    edit_json(folder / filename, change)
    assert_refused(folder, str(folder / filename), *fragments)


@pytest.mark.parametrize("filename", ["refquant_quantizers.json", "config.json", "hf_quant_config.json", "model.safetensors.index.json"])
@pytest.mark.parametrize("text, fragment", [("{not json", "not valid JSON"), ("[1, 2]", "expected a JSON object, got list")])
def test_a_json_file_that_is_not_a_json_object_is_refused_naming_it(checkpoints, tmp_path, filename, text, fragment):
    folder = damaged(checkpoints, tmp_path, "sharded")
    (folder / filename).write_text(text)
    assert_refused(folder, str(folder / filename), fragment)


def test_every_key_of_the_quantizer_state_deleted_or_of_another_type_gives_a_value_error(checkpoints, tmp_path):
    """Whatever key is tampered with, the answer is a model or a ValueError naming the file; never
    another exception. Keys that only describe the writer (writer, modelopt_format, fused_groups)
    may be dropped; the others are refused."""
    folder = damaged(checkpoints, tmp_path)
    path = folder / "refquant_quantizers.json"
    original = path.read_text()
    state = json.loads(original)
    tampered = [(key, None) for key in state] + [(key, 3) for key in state] + [(key, "x") for key in state]
    entry = _quantizer(state)
    tampered += [((key, inner), value) for key in ("config", "amax") for inner in entry[key] for value in (None, 3)]
    ignored = {"writer", "modelopt_format", "fused_groups"}
    for key, value in tampered:
        document = json.loads(original)
        target, name = (document, key) if isinstance(key, str) else (_quantizer(document)[key[0]], key[1])
        if value is None:
            target.pop(name)
        else:
            target[name] = value
        path.write_text(json.dumps(document))
        try:
            rq.load_checkpoint(folder)
        except ValueError as error:
            assert str(path) in str(error), (key, value, str(error))
            continue
        assert key in ignored or key == "attn_implementation" and value is None, f"{key} = {value!r} was accepted"


# --- files: index paths, truncation ---------------------------------------------------------------


def test_an_index_that_points_outside_the_folder_is_refused_before_any_read(checkpoints, tmp_path, monkeypatch):
    from refquant.hf.export import load as load_module

    folder = damaged(checkpoints, tmp_path, "sharded")
    shard = sorted(folder.glob("model-*.safetensors"))[0]
    outside = tmp_path / "outside.safetensors"
    shutil.copy(shard, outside)  # the very tensors the index lists: only the path is wrong
    index = folder / "model.safetensors.index.json"
    reads = []
    monkeypatch.setattr(load_module, "read_safetensors", lambda path: reads.append(path) or load_file(str(path)))
    for bad in (str(outside), f"../{outside.name}", f"sub/{shard.name}"):
        edit_json(index, lambda d: d["weight_map"].update({k: bad for k, name in d["weight_map"].items() if name == shard.name}))
        assert_refused(folder, str(index), f"{bad!r} is not a file name in the checkpoint folder")
        shutil.copy(checkpoints["sharded"] / index.name, index)
    assert reads == []


def test_an_index_without_weight_map_is_refused(checkpoints, tmp_path):
    folder = damaged(checkpoints, tmp_path, "sharded")
    edit_json(folder / "model.safetensors.index.json", lambda d: d.pop("weight_map"))
    assert_refused(folder, "model.safetensors.index.json: weight_map: missing")


@pytest.mark.parametrize("keep", [0, 5, 100, -50])
def test_a_truncated_safetensors_file_is_refused_naming_it(checkpoints, tmp_path, keep):
    folder = damaged(checkpoints, tmp_path)
    path = folder / "model.safetensors"
    data = path.read_bytes()
    path.write_bytes(data[:keep] if keep >= 0 else data[:keep])
    assert_refused(folder, str(path), "truncated")


def test_a_safetensors_file_with_a_garbage_header_is_refused_naming_it(tmp_path):
    from refquant.hf.export.validate import check_safetensors_file

    path = tmp_path / "model.safetensors"
    path.write_bytes((8).to_bytes(8, "little") + b"not json" + b"\0" * 64)
    with pytest.raises(ValueError, match=r"model\.safetensors: not a safetensors file"):
        check_safetensors_file(path)
