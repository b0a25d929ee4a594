"""compress_weights (the model as its checkpoint holds it) and load_checkpoint (a runnable model
from a checkpoint written by export_checkpoint)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Optional

import torch
from torch import nn

from ...quant.quantizer import QuantizerConfig, child_quantizer, named_quantizers
from ..dispatch import has_offloaded_weights
from .configs import LAYER_QUANT_ALGO
from .experts import checkpoint_experts_tensors, compress_experts, model_checkpoint_names, plan_experts
from .plan import CompressedWeightQuantizer, ExportPlan, kv_scale_quantizers, plan_export, uncalibrated_scale_quantizers
from .state import STATE_FILE, STATE_FORMAT, STATE_VERSION, decode_amax, restore_buffer_dtypes
from .tensors import dequantize_linear_weight
from .validate import (
    check_configs_agree, check_dequantized, check_layer_formats, check_state_document, check_tensor, check_weight_map,
    checked_tensors, expected_layer_tensors, float_dtype, read_json, read_safetensors,
)


def _apply_plan(model: nn.Module, plan: ExportPlan) -> list[str]:
    """Give `model` the state its checkpoint describes: fused amaxes, each quantized weight replaced
    by its dequantized checkpoint tensors, weight quantizers that pass the weight through."""
    modules = dict(model.named_modules())
    offloaded = [name for name in plan.linears if has_offloaded_weights(modules[name])]
    if offloaded:
        raise ValueError(
            f"compress_weights replaces each quantized weight in place, but {offloaded[0]} (and "
            f"{len(offloaded) - 1} more) keeps its weight offloaded by accelerate (on the meta device), "
            "where a change would be lost at its next forward. Load the model without offload "
            "(enough max_memory), or export it (rq.export_checkpoint) and rq.load_checkpoint it."
        )
    offloaded = [name for name in plan.experts if has_offloaded_weights(modules[name])]
    if offloaded:
        raise ValueError(
            f"compress_weights replaces each quantized weight in place, but the experts {offloaded[0]} keep "
            "their weights offloaded by accelerate (on the meta device). Load the model without offload, "
            "or export it (rq.export_checkpoint) and rq.load_checkpoint it."
        )
    for name, experts in plan.experts.items():
        compress_experts(modules[name], experts, experts.tensors())
    for name, linear in plan.linears.items():
        module = modules[name]
        weight_q = module.weight_quantizer
        if isinstance(weight_q, CompressedWeightQuantizer):
            continue
        if weight_q.is_calibrated:
            weight_q.set_amax(linear.weight_amax)
        input_q = child_quantizer(module, "input_quantizer")
        if input_q is not None and input_q.is_calibrated and linear.input_amax is not None:
            input_q.set_amax(linear.input_amax)
        compress_linear(module, linear.layer_format, linear.tensors())
    return list(plan.linears) + list(plan.experts)


def compress_linear(module: nn.Module, fmt: str, tensors: dict[str, torch.Tensor]) -> None:
    """Give a quantized linear, in place, what its checkpoint `tensors` (suffix -> tensor) hold: its
    weight the dequantized value, its weight quantizer a CompressedWeightQuantizer holding them."""
    weight = dequantize_linear_weight(fmt, tensors, module.weight.shape, module.weight.dtype)
    with torch.no_grad():
        module.weight.copy_(weight.to(module.weight.device))
    module.weight_quantizer = CompressedWeightQuantizer(module.weight_quantizer, fmt, tensors)


def compress_weights(model: nn.Module) -> list[str]:
    """Turn `model`, in place, into what its checkpoint holds (modelopt's mtq.compress, plus the
    export's fusion of shared-input NVFP4 scales); returns the names of the compressed layers.

    Each quantized weight becomes the dequantized value of its exported real quantization and its
    weight quantizer a CompressedWeightQuantizer (same config and amax; passes the weight
    through); input, K/V and other quantizers keep working as before. load_checkpoint(out_dir)
    equals compress_weights(model) bit for bit; the fake-quantized model differs from both where
    fake and real quantization round differently (docs/export.md).
    """
    return _apply_plan(model, plan_export(model))


def read_checkpoint_tensors(folder: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Every tensor of the checkpoint's safetensors files: model.safetensors, or the shards that
    model.safetensors.index.json lists (its weight_map must name each tensor's file exactly, files
    inside the folder). Raises ValueError naming the file for a damaged or truncated one."""
    return _read_tensor_files(Path(folder))[0]


def _read_tensor_files(folder: Path) -> tuple[dict[str, torch.Tensor], dict[str, Path]]:
    """(tensors, the file each came from)."""
    index_path = folder / "model.safetensors.index.json"
    weight_map = None
    if index_path.is_file():
        weight_map = check_weight_map(index_path, read_json(index_path, "the index of a sharded checkpoint."))
    files = sorted(set(weight_map.values())) if weight_map is not None else ["model.safetensors"]
    tensors: dict[str, torch.Tensor] = {}
    file_of: dict[str, Path] = {}
    for filename in files:
        if not (folder / filename).is_file():
            raise ValueError(f"{folder / filename} is missing; the checkpoint is incomplete.")
        shard = read_safetensors(folder / filename)
        if weight_map is not None:
            listed = {key for key, name in weight_map.items() if name == filename}
            if set(shard) != listed:
                wrong = sorted(set(shard) ^ listed)
                raise ValueError(
                    f"{index_path} does not match {filename}: {wrong[:3]} are listed for it but not in "
                    "it, or in it but not listed. The checkpoint is damaged; export it again."
                )
        tensors.update(shard)
        file_of.update(dict.fromkeys(shard, folder / filename))
    return tensors, file_of


def _model_from_config(folder: Path, attn_implementation: Optional[str], attn_source: str) -> nn.Module:
    from transformers import AutoConfig, AutoModelForCausalLM

    path = folder / "config.json"
    document = read_json(path, "a Hugging Face checkpoint has a config.json.")
    document.pop("quantization_config", None)  # refquant rebuilds the quantizers itself
    model_type = document.pop("model_type", None)
    if not isinstance(model_type, str):
        raise ValueError(f"{path}: model_type: missing or not a string; it is not a transformers config.")
    dtype = float_dtype(path, "dtype", document.get("dtype") or "float32")
    try:
        config = AutoConfig.for_model(model_type, **document)
    except Exception as error:  # noqa: BLE001 - whatever transformers raises for a bad config, name the file
        raise ValueError(f"{path}: transformers cannot build a config from it ({type(error).__name__}: {error}). "
                         "The checkpoint is damaged; export it again.") from None
    kwargs = {"attn_implementation": attn_implementation} if attn_implementation else {}
    try:
        with torch.random.fork_rng(devices=[]):  # the random init is overwritten; keep the caller's RNG
            model = AutoModelForCausalLM.from_config(config, dtype=dtype, **kwargs)
    except Exception as error:  # noqa: BLE001
        cause = f"{path}" if not attn_implementation else f"{path} with attn_implementation={attn_implementation!r} ({attn_source})"
        raise ValueError(f"{cause}: transformers cannot build a causal LM from it ({type(error).__name__}: {error}).") from None
    return model.eval()


def load_checkpoint(out_dir: str | os.PathLike, *, attn_implementation: Optional[str] = None) -> nn.Module:
    """Rebuild a runnable quantized model from a checkpoint written by export_checkpoint (on CPU).

    The model comes from config.json (AutoModelForCausalLM.from_config, no download), gets
    refquant's quantizers (rq.insert_quantizers) with the configs and exact amaxes of
    refquant_quantizers.json, and the checkpoint's weights: quantized layers dequantized from
    their stored tensors, with CompressedWeightQuantizers. Its outputs equal those of
    rq.compress_weights(model) on the exported model, bit for bit, with the same attention
    implementation (the exported one unless `attn_implementation` is given).
    Before it trusts the folder it checks what a deployment reads (refquant.hf.export.validate):
    the JSON documents' keys and types, every tensor a quantized layer and the K/V cache need
    (present, dtype, shape, finite), the configs against the tensors and the quantizer state, and
    that the files are complete and inside the folder. Raises ValueError naming the file and the
    key or tensor for a folder that is not such a checkpoint or is damaged.
    """
    from ..insert import insert_quantizers

    folder = Path(out_dir)
    if not folder.is_dir():
        raise ValueError(f"checkpoint folder {str(folder)!r} does not exist.")
    state_path = folder / STATE_FILE
    state = read_json(
        state_path,
        "load_checkpoint reads checkpoints written by rq.export_checkpoint, which keep refquant's "
        "exact quantizer state there (a modelopt checkpoint's scales cannot give back the amaxes).",
    )
    if state.get("format") != STATE_FORMAT or state.get("version") != STATE_VERSION:
        raise ValueError(
            f"{state_path} is format {state.get('format')!r} version {state.get('version')!r}; "
            f"this refquant reads {STATE_FORMAT!r} version {STATE_VERSION}."
        )
    check_state_document(state_path, state)
    attn_source = "the attn_implementation argument" if attn_implementation else f"{state_path}: attn_implementation"
    model = _model_from_config(folder, attn_implementation or state.get("attn_implementation"), attn_source)
    try:
        restore_buffer_dtypes(model, state["buffer_dtypes"])
    except AttributeError as error:
        raise ValueError(f"{state_path}: buffer_dtypes: {error}; the model config.json builds has no such buffer.") from None
    insert_quantizers(model, backend=state["backend"], flavor=state["flavor"])

    quantizers = dict(named_quantizers(model))
    stored = state["quantizers"]
    if set(stored) != set(quantizers):
        missing, extra = sorted(set(quantizers) - set(stored)), sorted(set(stored) - set(quantizers))
        raise ValueError(
            f"{state_path} does not match the model config.json builds: quantizers missing "
            f"from the file {missing[:3]}, in the file but not in the model {extra[:3]}."
        )
    for name, entry in stored.items():
        try:
            quantizer = quantizers[name]
            quantizer.set_config(QuantizerConfig.from_dict(entry["config"]))
            amax = decode_amax(entry.get("amax"))
            if amax is not None:
                quantizer.set_amax(amax)
        except (ValueError, TypeError, KeyError, AttributeError, RuntimeError) as error:
            raise ValueError(f"{state_path}: quantizers.{name}: {error}. The checkpoint is damaged; export it again.") from None
    layers: dict[str, str] = state["layers"]
    check_layer_formats(state_path, layers, model)
    uncalibrated = uncalibrated_scale_quantizers(model, layers)
    if uncalibrated:
        raise ValueError(
            f"{state_path}: quantizers.{uncalibrated[0]} (and {len(uncalibrated) - 1} more): enabled without a "
            "calibrated amax, so the checkpoint has none of the scales it promises for them: it was exported from "
            "a model whose calibration did not finish. Quantize (to the end) and export again."
        )

    tensors, file_of = _read_tensor_files(folder)
    where = lambda key: file_of.get(key, folder / "model.safetensors")  # noqa: E731
    modules = dict(model.named_modules())
    experts = plan_experts(model, state["flavor"])
    names = model_checkpoint_names(model, experts)
    experts_parameters = {f"{name}.{p}" for name, e in experts.items() for p in e.parameters}
    quantizer_prefixes = tuple(f"{name}." for name in quantizers)
    used: set[str] = set()
    plain: dict[str, torch.Tensor] = {}
    for key, value in model.state_dict().items():
        if key.startswith(quantizer_prefixes) or key in experts_parameters:
            continue
        layer, _, suffix = key.rpartition(".")
        if layer in layers and suffix == "weight":
            continue
        stored_key = names.tensor(key)
        if stored_key in tensors:
            check_tensor(where(stored_key), stored_key, tensors[stored_key], None, tuple(value.shape))
            plain[key] = tensors[stored_key]
            used.add(stored_key)
    missing_keys = [k for k in model.load_state_dict(plain, strict=False).missing_keys if not k.startswith(quantizer_prefixes)]
    tied = getattr(model, "all_tied_weights_keys", None) or {}
    missing_keys = [k for k in missing_keys if k not in tied and k not in experts_parameters
                    and not (k.rpartition(".")[0] in layers and k.endswith(".weight"))]
    if missing_keys:
        raise ValueError(f"the checkpoint in {folder} lacks tensors the model needs: {missing_keys[:5]}.")

    kv_expected = {key: (key, torch.float32, (), True) for key in kv_scale_quantizers(model)}
    checked_tensors(tensors, kv_expected, where, used, "missing: the quantizer state has a calibrated K/V amax for it")
    for name, export in experts.items():
        module = modules[name]
        compress_experts(module, export, checkpoint_experts_tensors(export, module, tensors, names.tensor, where, used))
        for parameter in export.parameters:
            check_dequantized(where(names.tensor(f"{name}.{parameter}")), f"{name}.{parameter}", getattr(module, parameter))
    for name, fmt in layers.items():
        module = modules[name]
        expected = {suffix: (names.tensor(f"{name}.{suffix}"), dtype, shape, suffix != "weight")
                    for suffix, (dtype, shape) in expected_layer_tensors(fmt, module).items()}
        layer_tensors = checked_tensors(tensors, expected, where, used, f"missing: a {LAYER_QUANT_ALGO[fmt]} layer's checkpoint holds it")
        compress_linear(module, fmt, layer_tensors)
        check_dequantized(where(f"{name}.weight"), f"{name}.weight", module.weight)
    unknown = sorted(set(tensors) - used)
    if unknown:
        raise ValueError(f"the checkpoint in {folder} holds tensors the model has no place for: {unknown[:5]}.")
    check_configs_agree(folder, plan_export(model), tensors, file_of)
    return model
