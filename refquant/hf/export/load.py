"""compress_weights (the model as its checkpoint holds it) and load_checkpoint (a runnable model
from a checkpoint written by export_checkpoint)."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Optional

import torch
from torch import nn

from ...quant.quantizer import QuantizerConfig, child_quantizer, named_quantizers
from ..dispatch import has_offloaded_weights
from .plan import CompressedWeightQuantizer, ExportPlan, plan_export
from .experts import checkpoint_experts_tensors, compress_experts, plan_experts
from .names import checkpoint_names
from .state import STATE_FILE, STATE_FORMAT, STATE_VERSION, _restore_buffer_dtypes, decode_amax
from .tensors import dequantize_linear_weight


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
        tensors = linear.tensors()
        weight = dequantize_linear_weight(linear.layer_format, tensors, module.weight.shape, module.weight.dtype)
        with torch.no_grad():
            module.weight.copy_(weight.to(module.weight.device))
        module.weight_quantizer = CompressedWeightQuantizer(weight_q, linear.layer_format, tensors)
    return list(plan.linears) + list(plan.experts)


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


def _read_json(path: Path, what: str) -> dict:
    if not path.is_file():
        raise ValueError(f"{path} is missing: {what}")
    return json.loads(path.read_text())


def read_checkpoint_tensors(folder: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Every tensor of the checkpoint's safetensors files: model.safetensors, or the shards that
    model.safetensors.index.json lists (its weight_map must name each tensor's file exactly)."""
    from safetensors.torch import load_file

    folder = Path(folder)
    index_path = folder / "model.safetensors.index.json"
    weight_map = json.loads(index_path.read_text())["weight_map"] if index_path.is_file() else None
    files = sorted(set(weight_map.values())) if weight_map is not None else ["model.safetensors"]
    tensors: dict[str, torch.Tensor] = {}
    for filename in files:
        if not (folder / filename).is_file():
            raise ValueError(f"{folder / filename} is missing; the checkpoint is incomplete.")
        shard = load_file(str(folder / filename))
        if weight_map is not None:
            listed = {key for key, name in weight_map.items() if name == filename}
            if set(shard) != listed:
                wrong = sorted(set(shard) ^ listed)
                raise ValueError(
                    f"{index_path} does not match {filename}: {wrong[:3]} are listed for it but not in "
                    "it, or in it but not listed. The checkpoint is damaged; export it again."
                )
        tensors.update(shard)
    return tensors


def _model_from_config(folder: Path, attn_implementation: Optional[str]) -> nn.Module:
    from transformers import AutoConfig, AutoModelForCausalLM

    document = _read_json(folder / "config.json", "a Hugging Face checkpoint has a config.json.")
    document.pop("quantization_config", None)  # refquant rebuilds the quantizers itself
    model_type = document.pop("model_type", None)
    if model_type is None:
        raise ValueError(f"{folder / 'config.json'} has no model_type; it is not a transformers config.")
    config = AutoConfig.for_model(model_type, **document)
    dtype = getattr(torch, document.get("dtype") or "float32")
    kwargs = {"attn_implementation": attn_implementation} if attn_implementation else {}
    with torch.random.fork_rng(devices=[]):  # the random init is overwritten; keep the caller's RNG
        model = AutoModelForCausalLM.from_config(config, dtype=dtype, **kwargs)
    return model.eval()


def load_checkpoint(out_dir: str | os.PathLike, *, attn_implementation: Optional[str] = None) -> nn.Module:
    """Rebuild a runnable quantized model from a checkpoint written by export_checkpoint (on CPU).

    The model comes from config.json (AutoModelForCausalLM.from_config, no download), gets
    refquant's quantizers (rq.insert_quantizers) with the configs and exact amaxes of
    refquant_quantizers.json, and the checkpoint's weights: quantized layers dequantized from
    their stored tensors, with CompressedWeightQuantizers. Its outputs equal those of
    rq.compress_weights(model) on the exported model, bit for bit, with the same attention
    implementation (the exported one unless `attn_implementation` is given).
    Raises ValueError for a folder that is not such a checkpoint, or whose tensors and quantizer
    state do not match the model its config builds.
    """
    from ..ptq import insert_quantizers

    folder = Path(out_dir)
    if not folder.is_dir():
        raise ValueError(f"checkpoint folder {str(folder)!r} does not exist.")
    state = _read_json(
        folder / STATE_FILE,
        "load_checkpoint reads checkpoints written by rq.export_checkpoint, which keep refquant's "
        "exact quantizer state there (a modelopt checkpoint's scales cannot give back the amaxes).",
    )
    if state.get("format") != STATE_FORMAT or state.get("version") != STATE_VERSION:
        raise ValueError(
            f"{folder / STATE_FILE} is format {state.get('format')!r} version {state.get('version')!r}; "
            f"this refquant reads {STATE_FORMAT!r} version {STATE_VERSION}."
        )
    model = _model_from_config(folder, attn_implementation or state.get("attn_implementation"))
    _restore_buffer_dtypes(model, state.get("buffer_dtypes", {}))
    insert_quantizers(model, backend=state["backend"], flavor=state["flavor"])

    quantizers = dict(named_quantizers(model))
    stored = state["quantizers"]
    if set(stored) != set(quantizers):
        missing, extra = sorted(set(quantizers) - set(stored)), sorted(set(stored) - set(quantizers))
        raise ValueError(
            f"{folder / STATE_FILE} does not match the model config.json builds: quantizers missing "
            f"from the file {missing[:3]}, in the file but not in the model {extra[:3]}."
        )
    for name, entry in stored.items():
        quantizer = quantizers[name]
        quantizer.set_config(QuantizerConfig.from_dict(entry["config"]))
        amax = decode_amax(entry["amax"])
        if amax is not None:
            quantizer.set_amax(amax)

    tensors = read_checkpoint_tensors(folder)
    layers: dict[str, str] = state["layers"]
    modules = dict(model.named_modules())
    experts = plan_experts(model, state["flavor"])
    names = checkpoint_names(model, {f"{name}.{p}" for name, e in experts.items() if e.layout.kind == "fused" for p in e.parameters})
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
        if names.tensor(key) in tensors:
            plain[key] = tensors[names.tensor(key)]
            used.add(names.tensor(key))
    missing_keys = [k for k in model.load_state_dict(plain, strict=False).missing_keys if not k.startswith(quantizer_prefixes)]
    tied = getattr(model, "all_tied_weights_keys", None) or {}
    missing_keys = [k for k in missing_keys if k not in tied and k not in experts_parameters
                    and not (k.rpartition(".")[0] in layers and k.endswith(".weight"))]
    if missing_keys:
        raise ValueError(f"the checkpoint in {folder} lacks tensors the model needs: {missing_keys[:5]}.")

    for name, export in experts.items():
        compress_experts(modules[name], export, checkpoint_experts_tensors(export, tensors, names.tensor, used))
    for name, fmt in layers.items():
        module = modules[name]
        keys = {suffix: names.tensor(f"{name}.{suffix}") for suffix in ("weight", "weight_scale", "weight_scale_2", "input_scale")}
        layer_tensors = {suffix: tensors[key] for suffix, key in keys.items() if key in tensors}
        used.update(key for key in keys.values() if key in tensors)
        weight = dequantize_linear_weight(fmt, layer_tensors, module.weight.shape, module.weight.dtype)
        with torch.no_grad():
            module.weight.copy_(weight)
        module.weight_quantizer = CompressedWeightQuantizer(module.weight_quantizer, fmt, layer_tensors)
    used.update(key for key in tensors if key.endswith((".k_scale", ".v_scale")))
    unknown = sorted(set(tensors) - used)
    if unknown:
        raise ValueError(f"the checkpoint in {folder} holds tensors the model has no place for: {unknown[:5]}.")
    return model
