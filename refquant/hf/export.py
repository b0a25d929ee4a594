"""Export a quantized model as modelopt's unified Hugging Face checkpoint, and load one back.

    rq.export_checkpoint(model, out_dir)      # what TensorRT-LLM, vLLM and SGLang load
    model2 = rq.load_checkpoint(out_dir)      # a runnable model again (== rq.compress_weights(model))

The checkpoint is what modelopt 0.47's `export_hf_checkpoint` writes (SPEC.md 2.4, 4.1, 4.8, 5.6;
modelopt/torch/export/unified_export_hf.py, quant_utils.py), every number computed by refquant's
own numerics in the quantizers' flavor:

  FP8 layer    weight        float8_e4m3fn [out, in]   E4M3(W / weight_scale), the FP8QTensor division
               weight_scale  fp32 0-d                  weight amax / 448
               input_scale   fp32 0-d                  input amax / 448 (when the input was calibrated)
  NVFP4 layer  weight        uint8 [out, in/2]         two E2M1 codes per byte, even element low nibble
               weight_scale  float8_e4m3fn [out, in/16]  NVFP4QTensor's per-block scale
               weight_scale_2 fp32 0-d                 weight amax / 2688
               input_scale   fp32 0-d                  input amax / 2688
  attention    k_proj.k_scale, v_proj.v_scale fp32 0-d   calibrated K / V amax / 448; none for the
                                                       constant-amax ("cast") KV modes
  files        config.json (+ quantization_config), hf_quant_config.json, generation_config.json,
               model.safetensors (sharded with an index past 10 GB, as modelopt), and
               refquant_quantizers.json: refquant's exact quantizer state, which runtimes ignore.

"a / c" above is the flavor's division (CONTRACT.md point 2): IEEE on "modelopt-cpu", a multiply by
fp32(1 / c) on "modelopt-cuda" (modelopt's `tensor / python_float` on a GPU).

Layers that deployment fuses (inputs shared, found as modelopt finds them: one forward of two
tokens with every quantizer off, grouping the quantized linears that receive the same input tensor,
e.g. q/k/v and gate/up) share their input and global weight scales when they are NVFP4: each takes
the group's largest amax. FP8 layers are not fused (modelopt's rule). The export leaves the model
untouched; `compress_weights(model)` applies the same rule and replaces each weight by its exported
round trip, in place, and is what `load_checkpoint` gives back bit for bit (docs/export.md).
"""

from __future__ import annotations

import json
import os
import shutil
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import torch
from torch import nn

from ..numerics.fp8 import FP8Tensor, _divide_by_448, fp8_quantize
from ..numerics.formats import E2M1_MAX, E4M3_MAX, NVFP4_BLOCK_SIZE
from ..numerics.nvfp4 import NVFP4Tensor, global_scale_from_amax, nvfp4_quantize
from ..quant.quantizer import QuantizerConfig, TensorQuantizer, all_quantizers_off, named_quantizers

# The modelopt release whose checkpoint layout we write. hf_quant_config.json names modelopt as the
# producer because the runtimes pick their modelopt loader by that name; refquant_quantizers.json
# records that refquant wrote it.
MODELOPT_FORMAT_VERSION = "0.47.0"
STATE_FILE = "refquant_quantizers.json"
STATE_FORMAT = "refquant-quantizers"
STATE_VERSION = 1
MAX_SHARD_SIZE = "10GB"  # modelopt's default

# modelopt's per-layer format names (quant_utils.py, get_quantization_format) -> hf_quant_config.
LAYER_QUANT_ALGO = {"fp8": "FP8", "nvfp4": "NVFP4", "w4a16_nvfp4": "W4A16_NVFP4"}
# Formats whose shared-input layers get one input / global weight scale (modelopt fuses every
# format except FP8 per-tensor, unified_export_hf.py `_fuse_shared_input_modules`).
FUSED_FORMATS = ("nvfp4", "w4a16_nvfp4")
KV_QUANTIZERS = {"k_bmm_quantizer": "k_proj.k_scale", "v_bmm_quantizer": "v_proj.v_scale"}


# ---------------------------------------------------------------------------------------------
# What a model exports: layers, formats, fusion groups, tensors
# ---------------------------------------------------------------------------------------------


@dataclass
class LinearExport:
    """One quantized linear as the checkpoint holds it.

    layer_format: "fp8", "nvfp4" or "w4a16_nvfp4" (modelopt's names).
    weight_amax / input_amax: the amax the export used (after fusion), in the quantizer's dtype.
    tensors: checkpoint suffix ("weight", "weight_scale", "weight_scale_2", "input_scale") -> tensor.
    """

    name: str
    layer_format: str
    weight_amax: torch.Tensor
    input_amax: Optional[torch.Tensor]
    tensors: dict[str, torch.Tensor]


@dataclass
class ExportPlan:
    """Everything export_checkpoint writes, computed without touching the model."""

    linears: dict[str, LinearExport]
    kv_scales: dict[str, torch.Tensor]  # checkpoint key -> fp32 scale
    fused_groups: list[list[str]]
    hf_quant_config: dict
    flavor: str
    backend: str
    quantizers: dict[str, TensorQuantizer] = field(repr=False, default_factory=dict)


class CompressedWeightQuantizer(TensorQuantizer):
    """The weight quantizer of a layer whose weight already holds its exported round trip.

    Keeps the original quantizer's config and amax (so reports and re-exports see what was
    calibrated) and `exported`, the checkpoint tensors of its layer; its forward passes the weight
    through unchanged, as modelopt's compressed (real-quant) weights are used as they are.
    """

    def __init__(self, source: TensorQuantizer, layer_format: str, exported: dict[str, torch.Tensor]):
        super().__init__(source.config, backend=source.backend, flavor=source.flavor, name=source.name)
        if source.is_calibrated:
            self.set_amax(source.amax)
        self.layer_format = layer_format
        self.exported = {key: value.detach().cpu() for key, value in exported.items()}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x

    def extra_repr(self) -> str:
        return f"{super().extra_repr()} compressed={self.layer_format}"


def _child_quantizer(module: nn.Module, name: str) -> Optional[TensorQuantizer]:
    quantizer = getattr(module, name, None)
    return quantizer if isinstance(quantizer, TensorQuantizer) else None


def layer_format(name: str, module: nn.Module) -> Optional[str]:
    """modelopt's per-layer format (get_quantization_format) of a layer with a weight_quantizer.

    None: the weight is not quantized (the layer goes to exclude_modules). "fp8": per-tensor FP8
    weight (input FP8 or off); "nvfp4": NVFP4 weight and input; "w4a16_nvfp4": NVFP4 weight, input
    off. Other combinations are formats modelopt exports with rules refquant does not implement.
    """
    weight_q = _child_quantizer(module, "weight_quantizer")
    input_q = _child_quantizer(module, "input_quantizer")
    if weight_q is None or not weight_q.is_enabled:
        return None
    input_format = input_q.config.format if input_q is not None and input_q.is_enabled else None
    if weight_q.config.format == "fp8":
        if weight_q.config.axis is not None:
            raise ValueError(
                f"{name}: per-channel FP8 weights (axis={weight_q.config.axis}) export as modelopt's "
                "FP8_PER_CHANNEL_PER_TOKEN, which refquant does not write. Use per-tensor FP8 "
                "(axis unset) for the weight."
            )
        if input_format == "nvfp4":
            raise ValueError(f"{name}: an FP8 weight with an NVFP4 input has no modelopt checkpoint format.")
        return "fp8"
    if input_format == "nvfp4":
        return "nvfp4"
    if input_format is None:
        return "w4a16_nvfp4"
    raise ValueError(
        f"{name}: an NVFP4 weight with an FP8 input is modelopt's W4A8_NVFP4_FP8, whose weight scales "
        "follow other rules; refquant does not export it. Quantize the input as NVFP4, or turn it off."
    )


def _quantizable_layers(model: nn.Module) -> dict[str, Optional[str]]:
    """Every layer modelopt gives quantizers to, with its format (None: unquantized).

    modelopt wraps nn.Linear and nn.Embedding; a wrapped layer that stays unquantized (lm_head and
    the embeddings under the shipped recipes) is listed in exclude_modules.
    """
    layers: dict[str, Optional[str]] = {}
    for name, module in model.named_modules():
        if _child_quantizer(module, "weight_quantizer") is not None:
            layers[name] = layer_format(name, module)
        elif isinstance(module, (nn.Linear, nn.Embedding)):
            layers[name] = None
    return layers


def shared_input_groups(model: nn.Module) -> list[list[str]]:
    """Names of the quantized linears that receive the same input tensor, groups of 2 or more.

    modelopt's collect_shared_input_modules: one forward of the token ids [[1, 1]] with every
    quantizer off, a hook on every linear whose input or weight quantizer is on, grouped by the
    identity of the input tensor (q/k/v read the same normed hidden states, so do gate/up).
    """
    inputs: dict[int, list[str]] = {}
    keep_alive: list[torch.Tensor] = []  # ids stay unique while the tensors live
    handles = []

    def hook(name: str):
        def record(module, args, output):
            if args and isinstance(args[0], torch.Tensor):
                keep_alive.append(args[0])
                inputs.setdefault(id(args[0]), []).append(name)

        return record

    for name, module in model.named_modules():
        weight_q = _child_quantizer(module, "weight_quantizer")
        input_q = _child_quantizer(module, "input_quantizer")
        if weight_q is None or not (weight_q.is_enabled or (input_q is not None and input_q.is_enabled)):
            continue
        handles.append(module.register_forward_hook(hook(name)))
    if not handles:
        return []
    parameter = next(model.parameters())
    tokens = torch.ones((1, 2), dtype=torch.long, device=parameter.device)
    try:
        with torch.no_grad(), all_quantizers_off(model):
            model(input_ids=tokens, use_cache=False)
    finally:
        for handle in handles:
            handle.remove()
    return [names for names in inputs.values() if len(names) > 1]


def _export_amax(amax: torch.Tensor, maxbound: float, clamp: bool) -> torch.Tensor:
    """modelopt's TensorQuantizer.export_amax: zero or NaN amax -> maxbound (a layer calibration
    never reached; 448 for FP8, 6 for NVFP4); FP8 also clamps to [tiny, max] of the amax dtype."""
    amax = torch.where(amax == 0, torch.full_like(amax, maxbound), amax)
    amax = torch.nan_to_num(amax, nan=maxbound)
    if clamp:
        info = torch.finfo(amax.dtype)
        amax = amax.clamp(min=info.tiny, max=info.max)
    return amax


def _fp8_scale(amax: torch.Tensor, flavor: str) -> torch.Tensor:
    """fp32 amax / 448 per flavor: modelopt's `amax.float() / 448.0` (SPEC.md 2.4)."""
    return _divide_by_448(amax.float(), flavor)


def _group_max(amaxes: list[torch.Tensor]) -> torch.Tensor:
    return torch.max(torch.stack([a.reshape(()) for a in amaxes]))


def _required_amax(name: str, quantizer: TensorQuantizer) -> torch.Tensor:
    amax = quantizer.amax
    if amax is None:
        raise ValueError(
            f"{name} is enabled but has no amax: a checkpoint needs calibrated scales. Run "
            "rq.quantize_model(model, recipe, calib_batches) (max calibration) before exporting."
        )
    return amax


def export_linear_tensors(
    name: str, module: nn.Module, fmt: str, weight_amax: torch.Tensor, input_amax: Optional[torch.Tensor], flavor: str
) -> dict[str, torch.Tensor]:
    """The checkpoint tensors of one quantized linear (modelopt's _export_quantized_weight).

    weight_amax / input_amax: the amaxes after fusion. The weight is quantized in its own dtype.
    """
    weight = module.weight.detach()
    input_q = _child_quantizer(module, "input_quantizer")
    tensors: dict[str, torch.Tensor] = {}
    if fmt == "fp8":
        weight_scale = _fp8_scale(weight_amax, flavor).reshape(())
        tensors["weight"] = fp8_quantize(weight, scale=weight_scale, flavor=flavor).data
        tensors["weight_scale"] = weight_scale
        # modelopt writes an FP8 input scale whenever the input quantizer holds a calibrated amax.
        if input_q is not None and input_q.is_calibrated:
            tensors["input_scale"] = _fp8_scale(_export_amax(input_q.amax, E4M3_MAX, clamp=True), flavor).reshape(())
        return tensors
    quantized = nvfp4_quantize(weight, amax=weight_amax.reshape(()), flavor=flavor)
    tensors["weight"] = quantized.packed
    tensors["weight_scale"] = quantized.block_scale
    tensors["weight_scale_2"] = quantized.global_scale.reshape(())
    if fmt == "nvfp4" and input_amax is not None:
        # NVFP4 activations: amax / (6 * 448), from the fused amax
        sanitized = _export_amax(input_amax, E2M1_MAX, clamp=False)
        tensors["input_scale"] = global_scale_from_amax(sanitized.float(), flavor).reshape(())
    return tensors


def dequantize_linear_weight(fmt: str, tensors: dict[str, torch.Tensor], shape: torch.Size, dtype: torch.dtype) -> torch.Tensor:
    """The weight a checkpoint layer holds, as the nearest `dtype` values: code * scale formed in
    fp32 (as a runtime's GEMM applies its fp32 scales), rounded once to `dtype`. (modelopt's
    FP8QTensor.dequantize multiplies in `dtype`, rounding the scale first; we do not copy that.)"""
    if fmt == "fp8":
        fp8 = FP8Tensor(data=tensors["weight"], scale=tensors["weight_scale"], dtype=torch.float32)
        return fp8.dequantize().to(dtype)
    return NVFP4Tensor(
        packed=tensors["weight"],
        block_scale=tensors["weight_scale"],
        global_scale=tensors["weight_scale_2"],
        shape=torch.Size(shape),
        dtype=dtype,
    ).dequantize()


def _uniform(quantizers: dict[str, TensorQuantizer], attribute: str) -> str:
    values = {getattr(q, attribute) for q in quantizers.values()}
    if len(values) > 1:
        raise ValueError(
            f"the model's quantizers use different {attribute}s ({sorted(values)}); a checkpoint is "
            f"written with one. Call rq.insert_quantizers(model, {attribute}=...) to set one for all."
        )
    return values.pop() if values else ("reference" if attribute == "backend" else "modelopt-cpu")


def _kv_cache_algo(model: nn.Module) -> Optional[str]:
    """modelopt's kv_cache_quant_algo: "FP8" if an enabled K/V (or output) quantizer is FP8, else
    "NVFP4" if one is NVFP4; None when none is enabled; one format for the whole model."""
    found: Optional[str] = None
    for name, module in model.named_modules():
        formats = [
            q.config.format
            for attr in ("k_bmm_quantizer", "v_bmm_quantizer", "output_quantizer")
            if (q := _child_quantizer(module, attr)) is not None and q.is_enabled
        ]
        if not formats:
            continue
        algo = "FP8" if "fp8" in formats else "NVFP4"
        if found is not None and algo != found:
            raise ValueError(
                f"{name}: KV cache quantized as {algo} while another layer uses {found}; the checkpoint "
                "has one kv_cache_quant_algo. Quantize K and V alike in every attention module."
            )
        found = algo
    return found


def plan_export(model: nn.Module) -> ExportPlan:
    """Compute every tensor and config entry the checkpoint of `model` holds; the model is unchanged."""
    quantizers = dict(named_quantizers(model))
    if not any(q.is_enabled for q in quantizers.values()):
        raise ValueError(
            f"{type(model).__name__} has no enabled quantizer, so there is nothing to export as a "
            "quantized checkpoint. Quantize it first: rq.quantize_model(model, recipe, calib_batches)."
        )
    for name, quantizer in quantizers.items():
        if quantizer.is_calibrating:
            raise ValueError(f"{name} is still calibrating; finish calibration before exporting.")
    flavor = _uniform(quantizers, "flavor")
    backend = _uniform(quantizers, "backend")
    formats = _quantizable_layers(model)
    modules = dict(model.named_modules())

    weight_amax: dict[str, torch.Tensor] = {}
    input_amax: dict[str, Optional[torch.Tensor]] = {}
    for name, fmt in formats.items():
        if fmt is None:
            continue
        module = modules[name]
        weight_amax[name] = _required_amax(f"{name}.weight_quantizer", module.weight_quantizer)
        input_q = _child_quantizer(module, "input_quantizer")
        input_amax[name] = input_q.amax if input_q is not None and input_q.is_enabled else None

    compressed = {name for name in weight_amax if isinstance(modules[name].weight_quantizer, CompressedWeightQuantizer)}
    fused_groups = []
    if len(compressed) < len(weight_amax):  # a fully compressed model carries its fused amaxes already
        for group in shared_input_groups(model):
            group_formats = {formats.get(name) for name in group}
            if len(group_formats) != 1:
                raise ValueError(
                    f"layers {group} read the same input but are quantized differently "
                    f"({sorted(map(str, group_formats))}); deployment fuses them, so they need one format."
                )
            if group_formats.pop() not in FUSED_FORMATS:
                continue
            fused_groups.append(group)
            fused_weight = _group_max([weight_amax[name] for name in group])
            for name in group:
                weight_amax[name] = fused_weight.to(weight_amax[name].dtype)
            if all(input_amax[name] is not None for name in group):
                fused_input = _group_max([input_amax[name] for name in group])
                for name in group:
                    input_amax[name] = fused_input.to(input_amax[name].dtype)

    linears = {}
    for name in weight_amax:
        module = modules[name]
        if name in compressed:
            tensors = dict(module.weight_quantizer.exported)
        else:
            tensors = export_linear_tensors(name, module, formats[name], weight_amax[name], input_amax[name], flavor)
        linears[name] = LinearExport(name, formats[name], weight_amax[name], input_amax[name], tensors)

    kv_scales = {}
    for name, module in modules.items():
        for attr, suffix in KV_QUANTIZERS.items():
            quantizer = _child_quantizer(module, attr)
            if quantizer is not None and quantizer.is_enabled and quantizer.is_calibrated:
                key = f"{name}.{suffix}" if name else suffix
                kv_scales[key] = _fp8_scale(quantizer.amax, flavor)

    hf_quant_config = {
        "producer": {"name": "modelopt", "version": MODELOPT_FORMAT_VERSION},
        "quantization": {"quant_algo": None, "kv_cache_quant_algo": None},
    }
    hf_quant_config["quantization"].update(layer_quant_config(formats))
    kv_algo = _kv_cache_algo(model)
    if kv_algo is not None:
        hf_quant_config["quantization"]["kv_cache_quant_algo"] = kv_algo
    return ExportPlan(linears, kv_scales, fused_groups, hf_quant_config, flavor, backend, quantizers)


# ---------------------------------------------------------------------------------------------
# hf_quant_config.json and config.json's quantization_config (modelopt's own rules)
# ---------------------------------------------------------------------------------------------


def _layer_config(fmt: str) -> dict:
    config = {"quant_algo": LAYER_QUANT_ALGO[fmt]}
    if fmt != "fp8":
        config["group_size"] = NVFP4_BLOCK_SIZE
    return config


def layer_quant_config(formats: dict[str, Optional[str]]) -> dict:
    """modelopt's process_layer_quant_config: one format -> its fields plus exclude_modules
    (summarised with prefix wildcards); several -> "MIXED_PRECISION" with quantized_layers."""
    quantized = {name: _layer_config(fmt) for name, fmt in formats.items() if fmt is not None}
    excluded = [name for name, fmt in formats.items() if fmt is None]
    result: dict = {"quant_algo": None, "kv_cache_quant_algo": None, "quantized_layers": quantized}
    distinct = {json.dumps(config, sort_keys=True) for config in quantized.values()}
    if len(distinct) > 1:
        result["quant_algo"] = "MIXED_PRECISION"
    elif len(distinct) == 1:
        result.update(next(iter(quantized.values())))
        result["exclude_modules"] = sorted(summarise_excluded(excluded, list(quantized)))
        result.pop("quantized_layers")
    return result


def summarise_excluded(unquantized: list[str], quantized: list[str]) -> set[str]:
    """modelopt's _prefix_wildcard_summarize_exclude_modules: cover the unquantized layer names
    with "prefix*" (or "prefix.*") wildcards that match no quantized layer."""
    negative = set()
    for name in quantized:
        negative.add(name)
        negative.update(name[:i] + "*" for i in range(len(name) + 1))

    def candidates(name: str):
        for i, char in enumerate(name):
            if char == ".":
                yield [name[:i] + "*"]
                yield [name[:i], name[:i] + ".*"]
        yield [name]

    summary: set[str] = set()
    for name in unquantized:
        chosen: list[str] = []
        for wildcards in candidates(name):
            if any(w in negative for w in wildcards):
                continue
            if all(w in summary for w in wildcards):
                chosen = []
                break
            chosen = wildcards
            break
        if len(chosen) == 2 and sorted(chosen, key=len)[1] == sorted(chosen, key=len)[0] + ".*":
            summary.add(sorted(chosen, key=len)[1])
        else:
            summary.update(chosen)
    return summary


def _weights_group(bits: int, group_size: Optional[int]) -> dict:
    group = {"dynamic": False, "num_bits": bits, "type": "float"}
    if group_size is not None:
        group["group_size"] = group_size
    return group


def _config_group(quant_algo: str, group_size: Optional[int]) -> dict:
    if quant_algo == "FP8":
        return {"input_activations": _weights_group(8, None), "weights": _weights_group(8, None)}
    if quant_algo == "NVFP4":
        return {"input_activations": _weights_group(4, group_size), "weights": _weights_group(4, group_size)}
    return {"weights": _weights_group(4, group_size)}  # W4A16_NVFP4


def quantization_config(hf_quant_config: dict) -> dict:
    """config.json's `quantization_config`: modelopt's convert_hf_quant_config_format for the
    formats refquant writes (the llm-compressor style the runtimes read)."""
    details = hf_quant_config["quantization"]
    algo = details.get("quant_algo")
    converted: dict = {}
    if algo in ("FP8", "NVFP4", "W4A16_NVFP4"):
        group = _config_group(algo, details.get("group_size", NVFP4_BLOCK_SIZE))
        converted["config_groups"] = {"group_0": {**group, "targets": ["Linear"]}}
    elif algo == "MIXED_PRECISION":
        by_config: dict[tuple, list[str]] = {}
        for layer, config in details["quantized_layers"].items():
            by_config.setdefault(tuple(sorted(config.items())), []).append(layer)
        converted["config_groups"] = {}
        for index, (key, layers) in enumerate(by_config.items()):
            config = dict(key)
            group = _config_group(config["quant_algo"], config.get("group_size"))
            converted["config_groups"][f"group_{index}"] = {**group, "targets": sorted(layers)}
        converted["quantized_layers"] = details["quantized_layers"]
    excluded = details.get("exclude_modules")
    converted["ignore"] = excluded if excluded is not None else []
    if algo:
        converted["quant_algo"] = algo
    kv_algo = details.get("kv_cache_quant_algo")
    if kv_algo:
        converted["kv_cache_scheme"] = {"dynamic": False, "num_bits": 8, "type": "float"} if kv_algo == "FP8" else kv_algo
    converted["producer"] = hf_quant_config["producer"]
    converted["quant_method"] = "modelopt"
    return converted


# ---------------------------------------------------------------------------------------------
# refquant_quantizers.json: the exact quantizer state (runtimes ignore it)
# ---------------------------------------------------------------------------------------------


def encode_amax(amax: Optional[torch.Tensor]) -> Optional[dict]:
    """An amax as JSON, exactly: dtype, shape and each value as a hex float (float.hex)."""
    if amax is None:
        return None
    values = amax.detach().cpu().double().flatten().tolist()
    return {"dtype": str(amax.dtype).removeprefix("torch."), "shape": list(amax.shape), "values": [v.hex() for v in values]}


def decode_amax(encoded: Optional[dict]) -> Optional[torch.Tensor]:
    if encoded is None:
        return None
    dtype = getattr(torch, encoded["dtype"])
    values = torch.tensor([float.fromhex(v) for v in encoded["values"]], dtype=torch.float64)
    return values.to(dtype).reshape(encoded["shape"])


def _non_persistent_buffer_dtypes(model: nn.Module) -> dict[str, str]:
    persistent = set(model.state_dict())
    return {
        name: str(buffer.dtype).removeprefix("torch.")
        for name, buffer in model.named_buffers()
        if name not in persistent and buffer.is_floating_point()
    }


def _restore_buffer_dtypes(model: nn.Module, dtypes: dict[str, str]) -> None:
    for name, dtype in dtypes.items():
        owner_name, _, attr = name.rpartition(".")
        owner = model.get_submodule(owner_name)
        buffer = owner._buffers.get(attr)
        if buffer is not None and str(buffer.dtype).removeprefix("torch.") != dtype:
            owner._buffers[attr] = buffer.to(getattr(torch, dtype))


def _state_document(model: nn.Module, plan: ExportPlan) -> dict:
    """What load_checkpoint needs to rebuild the compressed model: every quantizer's config and
    amax (after fusion, i.e. as compress_weights leaves it) and each layer's format."""
    from .._version import __version__

    quantizers = {}
    for name, quantizer in plan.quantizers.items():
        amax = quantizer.amax if quantizer.is_calibrated else None
        layer, _, attr = name.rpartition(".")
        linear = plan.linears.get(layer)
        if linear is not None and quantizer.is_calibrated:
            if attr == "weight_quantizer":
                amax = linear.weight_amax
            elif attr == "input_quantizer" and linear.input_amax is not None:
                amax = linear.input_amax
        quantizers[name] = {"config": quantizer.config.to_dict(), "amax": encode_amax(amax)}
    return {
        "format": STATE_FORMAT,
        "version": STATE_VERSION,
        "writer": f"refquant {__version__}",
        "modelopt_format": MODELOPT_FORMAT_VERSION,
        "backend": plan.backend,
        "flavor": plan.flavor,
        "attn_implementation": getattr(model.config, "_attn_implementation", None),
        "layers": {name: linear.layer_format for name, linear in plan.linears.items()},
        # Non-persistent buffers (RoPE's inv_freq) are in no checkpoint; a model cast with
        # .to(bfloat16) holds them in bf16, one built with dtype= in fp32. Keep the exported one's.
        "buffer_dtypes": _non_persistent_buffer_dtypes(model),
        "fused_groups": plan.fused_groups,
        "quantizers": quantizers,
    }


# ---------------------------------------------------------------------------------------------
# export_checkpoint
# ---------------------------------------------------------------------------------------------


def checkpoint_state_dict(model: nn.Module, plan: ExportPlan) -> dict[str, torch.Tensor]:
    """The tensors of the checkpoint: the model's own state with every quantizer buffer dropped,
    each quantized linear's weight replaced by its exported tensors, K/V scales added, tied
    aliases (lm_head tied to the embeddings) dropped as save_pretrained does."""
    quantizer_prefixes = tuple(f"{name}." for name in plan.quantizers)
    tied = getattr(model, "all_tied_weights_keys", None) or {}
    out: dict[str, torch.Tensor] = {}
    for key, value in model.state_dict().items():
        if key.startswith(quantizer_prefixes):
            continue
        layer, _, suffix = key.rpartition(".")
        if layer in plan.linears and suffix == "weight":
            for tensor_suffix, tensor in plan.linears[layer].tensors.items():
                out[f"{layer}.{tensor_suffix}"] = tensor
            continue
        out[key] = value
    out.update(plan.kv_scales)
    for alias, canonical in tied.items():
        if alias in out and canonical in out:
            del out[alias]
    return {key: value.detach().to("cpu").contiguous() for key, value in out.items()}


def _write_safetensors(state_dict: dict[str, torch.Tensor], folder: Path) -> None:
    from huggingface_hub import split_torch_state_dict_into_shards
    from safetensors.torch import save_file

    split = split_torch_state_dict_into_shards(state_dict, max_shard_size=MAX_SHARD_SIZE)
    for filename, keys in split.filename_to_tensors.items():
        save_file({key: state_dict[key] for key in keys}, str(folder / filename), metadata={"format": "pt"})
    if split.is_sharded:
        index = {"metadata": split.metadata, "weight_map": split.tensor_to_filename}
        (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")


def _write_json(path: Path, document: dict) -> None:
    path.write_text(json.dumps(document, indent=4) + "\n")


def _write_configs(model: nn.Module, plan: ExportPlan, folder: Path) -> None:
    """config.json as save_pretrained writes it (architectures, dtype) plus quantization_config;
    generation_config.json when the model has one; hf_quant_config.json."""
    import copy

    config = copy.deepcopy(model.config)
    config.architectures = [type(model).__name__]
    weight = next(model.parameters())
    config.dtype = str(weight.dtype).removeprefix("torch.")
    config.save_pretrained(folder)
    generation_config = getattr(model, "generation_config", None)
    if generation_config is not None:
        generation_config.save_pretrained(folder)
    config_path = folder / "config.json"
    document = json.loads(config_path.read_text())
    document["quantization_config"] = quantization_config(plan.hf_quant_config)
    _write_json(config_path, document)
    _write_json(folder / "hf_quant_config.json", plan.hf_quant_config)


def _check_out_dir(out_dir: Path) -> None:
    if out_dir.exists():
        raise ValueError(
            f"output folder {str(out_dir)!r} already exists; refquant never writes into or over an "
            "existing checkpoint. Choose a new folder, or remove the old one first."
        )


def export_checkpoint(model: nn.Module, out_dir: str | os.PathLike) -> Path:
    """Write `model` (quantized and calibrated by rq.quantize_model) to the new folder `out_dir` as
    modelopt's unified Hugging Face checkpoint; returns its path. The model is not modified.

    Atomic: everything is written into a temporary sibling folder, renamed to `out_dir` only once
    complete; on any error the temporary folder is removed and `out_dir` does not appear.
    Raises ValueError when `out_dir` exists, when the model is not a transformers model (no
    `config`), when nothing is quantized or a quantizer lacks its calibrated amax, and for layer
    formats modelopt's export does not define.
    """
    out_dir = Path(out_dir)
    _check_out_dir(out_dir)
    if getattr(model, "config", None) is None or not hasattr(model.config, "save_pretrained"):
        raise ValueError(
            f"{type(model).__name__} has no transformers config; export_checkpoint writes Hugging Face "
            "checkpoints of transformers models (e.g. AutoModelForCausalLM)."
        )
    plan = plan_export(model)
    state_dict = checkpoint_state_dict(model, plan)
    state_document = _state_document(model, plan)

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = out_dir.parent / f".{out_dir.name}.partial-{uuid.uuid4().hex[:8]}"
    staging.mkdir()
    try:
        _write_configs(model, plan, staging)
        _write_safetensors(state_dict, staging)
        _write_json(staging / STATE_FILE, state_document)
        _check_out_dir(out_dir)  # someone may have created it meanwhile
        os.rename(staging, out_dir)  # atomic on one filesystem: the folder appears complete or not at all
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return out_dir


# ---------------------------------------------------------------------------------------------
# compress_weights and load_checkpoint
# ---------------------------------------------------------------------------------------------


def _apply_plan(model: nn.Module, plan: ExportPlan) -> list[str]:
    """Give `model` the state its checkpoint describes: fused amaxes, each quantized weight replaced
    by its dequantized checkpoint tensors, weight quantizers that pass the weight through."""
    modules = dict(model.named_modules())
    for name, linear in plan.linears.items():
        module = modules[name]
        weight_q = module.weight_quantizer
        if isinstance(weight_q, CompressedWeightQuantizer):
            continue
        if weight_q.is_calibrated:
            weight_q.set_amax(linear.weight_amax)
        input_q = _child_quantizer(module, "input_quantizer")
        if input_q is not None and input_q.is_calibrated and linear.input_amax is not None:
            input_q.set_amax(linear.input_amax)
        weight = dequantize_linear_weight(linear.layer_format, linear.tensors, module.weight.shape, module.weight.dtype)
        with torch.no_grad():
            module.weight.copy_(weight.to(module.weight.device))
        module.weight_quantizer = CompressedWeightQuantizer(weight_q, linear.layer_format, linear.tensors)
    return list(plan.linears)


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


def read_checkpoint_tensors(folder: Path) -> dict[str, torch.Tensor]:
    """Every tensor of the checkpoint's safetensors files (single file or sharded with an index)."""
    from safetensors.torch import load_file

    index_path = folder / "model.safetensors.index.json"
    if index_path.is_file():
        files = sorted(set(json.loads(index_path.read_text())["weight_map"].values()))
    else:
        files = ["model.safetensors"]
    tensors: dict[str, torch.Tensor] = {}
    for filename in files:
        if not (folder / filename).is_file():
            raise ValueError(f"{folder / filename} is missing; the checkpoint is incomplete.")
        tensors.update(load_file(str(folder / filename)))
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
    from .ptq import insert_quantizers

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
    quantizer_prefixes = tuple(f"{name}." for name in quantizers)
    used: set[str] = set()
    plain: dict[str, torch.Tensor] = {}
    for key, value in model.state_dict().items():
        if key.startswith(quantizer_prefixes):
            continue
        layer, _, suffix = key.rpartition(".")
        if layer in layers and suffix == "weight":
            continue
        if key in tensors:
            plain[key] = tensors[key]
            used.add(key)
    missing_keys = [k for k in model.load_state_dict(plain, strict=False).missing_keys if not k.startswith(quantizer_prefixes)]
    tied = getattr(model, "all_tied_weights_keys", None) or {}
    missing_keys = [k for k in missing_keys if k not in tied and not (k.rpartition(".")[0] in layers and k.endswith(".weight"))]
    if missing_keys:
        raise ValueError(f"the checkpoint in {folder} lacks tensors the model needs: {missing_keys[:5]}.")

    for name, fmt in layers.items():
        module = modules[name]
        keys = {suffix: f"{name}.{suffix}" for suffix in ("weight", "weight_scale", "weight_scale_2", "input_scale")}
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
