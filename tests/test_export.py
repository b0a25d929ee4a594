"""export_checkpoint / load_checkpoint / compress_weights on tiny transformers models.

What is checked: the checkpoint's tensor names, dtypes and shapes per shipped recipe (modelopt's
unified HF layout, docs/modelopt_behaviour.md §2.4, §4.1, §4.8, §5.6), its scale values against
those sections' formulas computed here independently, the shared scales of fused NVFP4 layers, the
configs, and that a reloaded checkpoint runs bit for bit like compress_weights(model).
scripts/compare_modelopt.py compares the same checkpoints with modelopt's own export, byte for byte.
"""

from __future__ import annotations

import copy
import json
import os
import stat

import pytest
import torch

import refquant as rq
from refquant.hf import export as export_module
from refquant.hf.export import CompressedWeightQuantizer, read_checkpoint_tensors, summarise_excluded
from refquant.hf.export import write as export_write

RECIPES = (
    "fp8_default-fp8_cast_kv",
    "nvfp4_default-fp8_cast_kv",
    "nvfp4_default-nvfp4_cast_kv",
    "fp8_default-fp8_kv",
    "nvfp4_default-fp8_kv",
    "nvfp4_default-nvfp4_kv",
)
LINEARS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")
FUSED = (("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"), ("mlp.gate_proj", "mlp.up_proj"))


def tiny_model(family: str = "llama", tie: bool = False):
    """A 2-layer model of `family`, seeded, bf16, built as from_pretrained(dtype=bf16) builds it."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.for_model(
        family,
        vocab_size=128,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        max_position_embeddings=64,
        tie_word_embeddings=tie,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    return model.eval()


def batches(count: int = 2, seed: int = 1) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 128, (2, 16), generator=generator) for _ in range(count)]


EVAL = batches(1, seed=7)[0]


def quantized(recipe: str, family: str = "llama", tie: bool = False):
    model = tiny_model(family, tie)
    rq.quantize_model(model, rq.load_recipe(recipe), batches(), progress=False)
    return model


def logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=EVAL).logits


def bits(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().reshape(-1).view(torch.uint8)


def assert_same_bits(a: torch.Tensor, b: torch.Tensor, what: str = "") -> None:
    assert a.dtype == b.dtype and a.shape == b.shape, f"{what}: {a.dtype}{tuple(a.shape)} vs {b.dtype}{tuple(b.shape)}"
    assert torch.equal(bits(a), bits(b)), what


@pytest.fixture(scope="module", params=RECIPES)
def exported(request, tmp_path_factory):
    model = quantized(request.param)
    folder = rq.export_checkpoint(model, tmp_path_factory.mktemp("ckpt") / request.param)
    return request.param, model, folder


# --- layout -------------------------------------------------------------------------------------


def test_checkpoint_tensor_names_dtypes_and_shapes_follow_modelopt_per_recipe(exported):
    recipe, model, folder = exported
    tensors = read_checkpoint_tensors(folder)
    nvfp4_body, calibrated_kv = recipe.startswith("nvfp4"), not recipe.endswith("cast_kv")
    expected = {"model.embed_tokens.weight", "lm_head.weight", "model.norm.weight"}
    for layer in range(2):
        prefix = f"model.layers.{layer}"
        expected |= {f"{prefix}.input_layernorm.weight", f"{prefix}.post_attention_layernorm.weight"}
        for linear in LINEARS:
            module = model.get_submodule(f"{prefix}.{linear}")
            out_features, in_features = module.weight.shape
            name = f"{prefix}.{linear}"
            suffixes = ("weight", "weight_scale", "input_scale") + (("weight_scale_2",) if nvfp4_body else ())
            expected |= {f"{name}.{s}" for s in suffixes}
            if nvfp4_body:
                assert tensors[f"{name}.weight"].dtype == torch.uint8
                assert tensors[f"{name}.weight"].shape == (out_features, in_features // 2)
                assert tensors[f"{name}.weight_scale"].dtype == torch.float8_e4m3fn
                assert tensors[f"{name}.weight_scale"].shape == (out_features, in_features // 16)
                assert tensors[f"{name}.weight_scale_2"].dtype == torch.float32
                assert tensors[f"{name}.weight_scale_2"].shape == ()
            else:
                assert tensors[f"{name}.weight"].dtype == torch.float8_e4m3fn
                assert tensors[f"{name}.weight"].shape == (out_features, in_features)
                assert tensors[f"{name}.weight_scale"].dtype == torch.float32
                assert tensors[f"{name}.weight_scale"].shape == ()
            assert tensors[f"{name}.input_scale"].dtype == torch.float32
            assert tensors[f"{name}.input_scale"].shape == ()
        if calibrated_kv:  # cast KV has no amax to export (docs/modelopt_behaviour.md §5.6)
            expected |= {f"{prefix}.self_attn.k_proj.k_scale", f"{prefix}.self_attn.v_proj.v_scale"}
    assert set(tensors) == expected
    for key in ("model.embed_tokens.weight", "lm_head.weight", "model.norm.weight"):
        assert_same_bits(tensors[key], model.state_dict()[key], key)  # unquantized layers as they are


def test_configs_describe_the_recipe_as_modelopt_does(exported):
    recipe, _, folder = exported
    hf_quant_config = json.loads((folder / "hf_quant_config.json").read_text())
    body = "NVFP4" if recipe.startswith("nvfp4") else "FP8"
    kv = "NVFP4" if "nvfp4_kv" in recipe or "nvfp4_cast_kv" in recipe else "FP8"
    quantization = {"quant_algo": body, "kv_cache_quant_algo": kv, "exclude_modules": ["lm_head", "model.embed_tokens"]}
    if body == "NVFP4":
        quantization["group_size"] = 16
    assert hf_quant_config == {"producer": {"name": "modelopt", "version": "0.47.0"}, "quantization": quantization}
    config = json.loads((folder / "config.json").read_text())
    quantization_config = config["quantization_config"]
    assert quantization_config["quant_method"] == "modelopt"
    assert quantization_config["quant_algo"] == body
    assert quantization_config["ignore"] == ["lm_head", "model.embed_tokens"]
    bits_expected = 4 if body == "NVFP4" else 8
    assert quantization_config["config_groups"]["group_0"]["weights"]["num_bits"] == bits_expected
    expected_kv = {"dynamic": False, "num_bits": 8, "type": "float"} if kv == "FP8" else "NVFP4"
    assert quantization_config["kv_cache_scheme"] == expected_kv
    assert config["architectures"] == ["LlamaForCausalLM"] and config["dtype"] == "bfloat16"
    state = json.loads((folder / "refquant_quantizers.json").read_text())
    assert state["flavor"] == "modelopt-cpu" and len(state["layers"]) == 14


# --- values: modelopt's formulas, computed here --------------------------------------------


def _ieee_scale(amax: torch.Tensor, denominator: float) -> torch.Tensor:
    return amax.float() / torch.tensor(denominator, dtype=torch.float32)  # CPU flavor: IEEE


def test_fp8_checkpoint_values_are_amax_over_448_and_the_fp8qtensor_division():
    model = quantized("fp8_default-fp8_kv")
    folder_tensors = _export_tensors(model)
    for layer in range(2):
        for linear in LINEARS:
            name = f"model.layers.{layer}.{linear}"
            module = model.get_submodule(name)
            weight_scale = _ieee_scale(module.weight_quantizer.amax, 448.0)
            assert_same_bits(folder_tensors[f"{name}.weight_scale"], weight_scale, name)
            assert_same_bits(folder_tensors[f"{name}.input_scale"], _ieee_scale(module.input_quantizer.amax, 448.0), name)
            # FP8 export: (bf16 W / fp32 scale) rounds to bf16 first, then to E4M3
            # (docs/modelopt_behaviour.md §2.2, §2.4)
            codes = (module.weight.float() / weight_scale).to(torch.bfloat16).float().clamp(-448, 448).to(torch.float8_e4m3fn)
            assert_same_bits(folder_tensors[f"{name}.weight"], codes, name)
        attention = model.get_submodule(f"model.layers.{layer}.self_attn")
        for kv in ("k", "v"):
            scale = _ieee_scale(getattr(attention, f"{kv}_bmm_quantizer").amax, 448.0)
            assert_same_bits(folder_tensors[f"model.layers.{layer}.self_attn.{kv}_proj.{kv}_scale"], scale)


def test_an_fp8_layer_whose_weight_is_all_zeros_exports_scale_one_and_zero_bytes_and_reloads(tmp_path):
    """modelopt's export writes weight_scale 0 and NaN bytes for it (0 / 0); refquant takes the
    weight amax through modelopt's own export_amax rule (0 becomes 448), as for input scales."""
    model = tiny_model("llama", False)
    name = "model.layers.0.mlp.down_proj"
    with torch.no_grad():
        model.get_submodule(name).weight.zero_()
    rq.quantize_model(model, rq.load_recipe("fp8_default-fp8_kv"), batches(), progress=False)
    tensors = _export_tensors(model)
    assert_same_bits(tensors[f"{name}.weight_scale"], torch.tensor(1.0), name)
    assert not bits(tensors[f"{name}.weight"]).any(), "zero bytes"
    rq.export_checkpoint(model, tmp_path / "ckpt")
    reloaded = rq.load_checkpoint(tmp_path / "ckpt")
    assert not reloaded.get_submodule(name).weight.any()


def test_nvfp4_fused_layers_share_the_group_max_amax_and_fp8_layers_do_not():
    model = quantized("nvfp4_default-fp8_kv")
    tensors = _export_tensors(model)
    for layer in range(2):
        for group in FUSED:
            names = [f"model.layers.{layer}.{linear}" for linear in group]
            weight_amax = max(model.get_submodule(n).weight_quantizer.amax.float() for n in names)
            input_amax = max(model.get_submodule(n).input_quantizer.amax.float() for n in names)
            for name in names:
                assert_same_bits(tensors[f"{name}.weight_scale_2"], _ieee_scale(weight_amax, 2688.0), name)
                assert_same_bits(tensors[f"{name}.input_scale"], _ieee_scale(input_amax, 2688.0), name)
                # the packed weight is NVFP4QTensor.quantize with the shared global amax
                expected = rq.nvfp4_quantize(model.get_submodule(name).weight, amax=weight_amax)
                assert_same_bits(tensors[f"{name}.weight"], expected.packed, name)
                assert_same_bits(tensors[f"{name}.weight_scale"], expected.block_scale, name)
        o_proj = f"model.layers.{layer}.self_attn.o_proj"  # reads its own input: not fused
        own = model.get_submodule(o_proj).weight_quantizer.amax
        assert_same_bits(tensors[f"{o_proj}.weight_scale_2"], _ieee_scale(own, 2688.0))

    fp8 = quantized("fp8_default-fp8_kv")
    fp8_tensors = _export_tensors(fp8)
    scales = [fp8_tensors[f"model.layers.0.{linear}.weight_scale"] for linear in FUSED[0]]
    assert len({float(s) for s in scales}) == 3, "modelopt does not fuse FP8 per-tensor scales"


def _export_tensors(model) -> dict[str, torch.Tensor]:
    plan = export_module.plan_export(model)
    return export_module.checkpoint_state_dict(model, plan)


# --- round trip -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "recipe, family, tie",
    [
        ("fp8_default-fp8_kv", "llama", False),
        ("nvfp4_default-fp8_cast_kv", "llama", True),
        ("nvfp4_default-nvfp4_kv", "qwen2", False),  # q/k/v biases
        ("fp8_default-fp8_cast_kv", "qwen3", False),  # q/k norms
    ],
)
def test_reloaded_checkpoint_runs_bit_for_bit_like_the_compressed_model(recipe, family, tie, tmp_path):
    model = quantized(recipe, family, tie)
    folder = rq.export_checkpoint(model, tmp_path / "ckpt")
    compressed = copy.deepcopy(model)
    rq.compress_weights(compressed)
    reloaded = rq.load_checkpoint(folder)

    assert_same_bits(logits(reloaded), logits(compressed), "logits")
    ours = dict(compressed.named_modules())
    for name, quantizer in reloaded.named_modules():
        if isinstance(quantizer, rq.TensorQuantizer):
            twin = ours[name]
            assert type(quantizer) is type(twin) and quantizer.config == twin.config, name
            if twin.is_calibrated:
                assert_same_bits(quantizer.amax, twin.amax, name)
            else:
                assert not quantizer.is_calibrated, name
    # exporting the reloaded model writes the same tensors again
    again = rq.export_checkpoint(reloaded, tmp_path / "again")
    first, second = read_checkpoint_tensors(folder), read_checkpoint_tensors(again)
    assert set(first) == set(second)
    for key in first:
        assert_same_bits(first[key], second[key], key)


def test_compressed_weights_are_the_dequantized_checkpoint_and_pass_through():
    model = quantized("nvfp4_default-fp8_cast_kv")
    tensors = _export_tensors(model)
    rq.compress_weights(model)
    name = "model.layers.1.mlp.gate_proj"
    module = model.get_submodule(name)
    assert isinstance(module.weight_quantizer, CompressedWeightQuantizer) and module.weight_quantizer.is_enabled
    packed = rq.NVFP4Tensor(
        packed=tensors[f"{name}.weight"],
        block_scale=tensors[f"{name}.weight_scale"],
        global_scale=tensors[f"{name}.weight_scale_2"],
        shape=module.weight.shape,
        dtype=torch.bfloat16,
    )
    assert_same_bits(module.weight.detach(), packed.dequantize())
    assert module.weight_quantizer(module.weight) is module.weight


def test_export_leaves_the_model_unchanged(tmp_path):
    model = quantized("nvfp4_default-nvfp4_kv")
    before_logits, before_state = logits(model), copy.deepcopy(model.state_dict())
    rq.export_checkpoint(model, tmp_path / "ckpt")
    assert_same_bits(logits(model), before_logits)
    after = model.state_dict()
    assert set(after) == set(before_state)
    for key, value in before_state.items():
        assert_same_bits(after[key], value, key)


# --- atomic writing and bad input ------------------------------------------------------------


def test_existing_output_folder_is_refused_and_left_alone(tmp_path):
    model = quantized("fp8_default-fp8_cast_kv")
    target = tmp_path / "ckpt"
    target.mkdir()
    (target / "keep.txt").write_text("mine")
    with pytest.raises(ValueError, match="already exists"):
        rq.export_checkpoint(model, target)
    assert [p.name for p in target.iterdir()] == ["keep.txt"]


def test_interrupted_export_leaves_no_checkpoint_behind(tmp_path, monkeypatch):
    model = quantized("fp8_default-fp8_cast_kv")

    def fail_midway(tensors, folder, *args):
        (folder / "model.safetensors").write_bytes(b"half")  # a partial file, then the failure
        raise OSError("disk full (injected)")

    monkeypatch.setattr(export_write, "_write_safetensors", fail_midway)
    with pytest.raises(OSError, match="injected"):
        rq.export_checkpoint(model, tmp_path / "ckpt")
    assert list(tmp_path.iterdir()) == []  # neither the checkpoint nor its temporary sibling


def test_model_without_enabled_quantizers_is_refused(tmp_path):
    model = tiny_model()
    rq.insert_quantizers(model)
    with pytest.raises(ValueError, match="no enabled quantizer"):
        rq.export_checkpoint(model, tmp_path / "ckpt")
    assert not (tmp_path / "ckpt").exists()


def test_load_refuses_a_folder_without_refquant_state(tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        rq.load_checkpoint(tmp_path / "missing")
    (tmp_path / "modelopt_ckpt").mkdir()
    with pytest.raises(ValueError, match="refquant_quantizers.json"):
        rq.load_checkpoint(tmp_path / "modelopt_ckpt")


@pytest.mark.parametrize(
    "unquantized, quantized_layers, expected",
    [
        (["lm_head", "model.embed_tokens"], ["model.layers.0.mlp.up_proj"], {"lm_head", "model.embed_tokens"}),
        # a whole subtree unquantized -> one wildcard; a sibling of a quantized layer stays exact
        # (expected values: modelopt 0.47's _prefix_wildcard_summarize_exclude_modules on these inputs)
        (
            ["model.layers.1.mlp.up_proj", "model.layers.1.mlp.down_proj", "model.layers.0.mlp.down_proj"],
            ["model.layers.0.mlp.up_proj"],
            {"model.layers.1*", "model.layers.0.mlp.down_proj"},
        ),
    ],
)
def test_excluded_layers_are_summarised_with_modelopt_prefix_wildcards(unquantized, quantized_layers, expected):
    assert summarise_excluded(unquantized, quantized_layers) == expected


def test_an_input_amax_calibration_never_raised_exports_as_the_format_maxbound():
    """modelopt's export_amax: a zero amax (the layer saw only zeros) exports as 448 for FP8 and
    as 6 for NVFP4, so the scale stays positive: input_scale 1.0 and 6 / 2688."""
    for recipe, expected in (("fp8_default-fp8_cast_kv", 1.0), ("nvfp4_default-fp8_cast_kv", _ieee_scale(torch.tensor(6.0), 2688.0))):
        model = quantized(recipe)
        name = "model.layers.1.self_attn.o_proj"
        model.get_submodule(name).input_quantizer.set_amax(torch.tensor(0.0, dtype=torch.bfloat16))
        scale = _export_tensors(model)[f"{name}.input_scale"]
        assert_same_bits(scale, torch.as_tensor(expected, dtype=torch.float32).reshape(()), recipe)


@pytest.mark.parametrize("umask", [0o022, 0o027])
@pytest.mark.parametrize("max_shard_size", ["10GB", "20KB"])
def test_checkpoint_files_and_folder_get_the_mode_the_users_umask_gives_new_files(umask, max_shard_size, tmp_path):
    model = quantized("nvfp4_default-fp8_cast_kv")
    previous = os.umask(umask)
    try:
        out = rq.export_checkpoint(model, tmp_path / "ckpt", max_shard_size=max_shard_size)
        (tmp_path / "written_by_the_user").write_text("")  # what any file the user writes gets
    finally:
        os.umask(previous)
    user_file_mode = stat.S_IMODE((tmp_path / "written_by_the_user").stat().st_mode)
    assert user_file_mode == 0o666 & ~umask
    modes = {path.name: stat.S_IMODE(path.stat().st_mode) for path in out.iterdir()}
    shards = [name for name in modes if name.endswith(".safetensors")]
    assert len(shards) == 1 if max_shard_size == "10GB" else len(shards) > 1 and "model.safetensors.index.json" in modes
    assert modes == dict.fromkeys(modes, user_file_mode)
    assert stat.S_IMODE(out.stat().st_mode) == 0o777 & ~umask
