"""What a model exports, computed without touching it: each quantized linear's format and tensors,
the fusion groups of shared-input layers, the K/V scales, each MoE experts module's plan
(refquant.hf.export.experts), the checkpoint names (refquant.hf.export.names) and hf_quant_config
under those names (ExportPlan)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import torch
from torch import nn

from ...numerics.checks import bad_amax_values
from ...quant.quantizer import TensorQuantizer, all_quantizers_off, child_quantizer, named_quantizers, refuse_folded
from ..dispatch import execution_device, loaded_weights, require_loaded
from .configs import MODELOPT_FORMAT_VERSION, layer_quant_config
from .tensors import export_linear_tensors, fp8_scale

# Formats whose shared-input layers get one input / global weight scale (modelopt fuses every
# format except FP8 per-tensor, unified_export_hf.py `_fuse_shared_input_modules`).
FUSED_FORMATS = ("nvfp4", "w4a16_nvfp4")
KV_QUANTIZERS = {"k_bmm_quantizer": "k_proj.k_scale", "v_bmm_quantizer": "v_proj.v_scale"}


@dataclass
class LinearExport:
    """One quantized linear as the checkpoint holds it.

    layer_format: "fp8", "nvfp4" or "w4a16_nvfp4" (modelopt's names).
    weight_amax / input_amax: the amax the export used (after fusion), in the quantizer's dtype.
    tensors(): checkpoint suffix ("weight", "weight_scale", "weight_scale_2", "input_scale") ->
    tensor, computed at each call (on the layer's device) and not kept: the export streams the
    checkpoint a layer at a time, so a plan holds no layer's tensors.
    """

    name: str
    layer_format: str
    weight_amax: torch.Tensor
    input_amax: Optional[torch.Tensor]
    compute: Callable[[], dict[str, torch.Tensor]] = field(repr=False)

    def tensors(self) -> dict[str, torch.Tensor]:
        return self.compute()


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
    experts: dict = field(default_factory=dict)  # module name -> refquant.hf.export.experts.ExpertsExport
    names: Any = None  # refquant.hf.export.names.CheckpointNames: in-memory -> checkpoint key


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


def layer_format(name: str, module: nn.Module) -> Optional[str]:
    """modelopt's per-layer format (get_quantization_format) of a layer with a weight_quantizer.

    None: the weight is not quantized (the layer goes to exclude_modules). "fp8": per-tensor FP8
    weight (input FP8 or off); "nvfp4": NVFP4 weight and input; "w4a16_nvfp4": NVFP4 weight, input
    off. Other combinations are formats modelopt exports with rules refquant does not implement.
    """
    weight_q = child_quantizer(module, "weight_quantizer")
    input_q = child_quantizer(module, "input_quantizer")
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
    """Every layer with a weight quantizer, with its format (None: unquantized).

    modelopt's get_quant_config lists a layer only if its weight has a quantizer, enabled or not:
    one that stays unquantized (lm_head and nn.Embedding under the shipped recipes) goes to
    exclude_modules, and a layer modelopt gave no quantizers (Gemma's scaled embedding, whose
    class overrides nn.Embedding's forward; refquant.hf.placement) is not listed at all.
    """
    return {
        name: layer_format(name, module)
        for name, module in model.named_modules()
        if child_quantizer(module, "weight_quantizer") is not None
    }


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
        weight_q = child_quantizer(module, "weight_quantizer")
        input_q = child_quantizer(module, "input_quantizer")
        if weight_q is None or not (weight_q.is_enabled or (input_q is not None and input_q.is_enabled)):
            continue
        handles.append(module.register_forward_hook(hook(name)))
    if not handles:
        return []
    tokens = torch.ones((1, 2), dtype=torch.long, device=execution_device(model))
    try:
        with torch.no_grad(), all_quantizers_off(model):
            model(input_ids=tokens, use_cache=False)
    finally:
        for handle in handles:
            handle.remove()
    return [names for names in inputs.values() if len(names) > 1]


def _group_max(amaxes: list[torch.Tensor]) -> torch.Tensor:
    # a group's layers may sit on different devices of a split model; a max is exact anywhere
    return torch.max(torch.stack([a.reshape(()).to(amaxes[0].device) for a in amaxes]))


def required_amax(name: str, quantizer: TensorQuantizer) -> torch.Tensor:
    """The amax of the enabled quantizer `name` that the checkpoint's scales come from; ValueError
    when it has none (calibration did not run)."""
    amax = quantizer.amax
    if amax is None:
        raise ValueError(
            f"{name} is enabled but has no amax: a checkpoint needs calibrated scales. Run "
            "rq.quantize_model(model, recipe, calib_batches) (max calibration) before exporting."
        )
    return amax


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
            if (q := child_quantizer(module, attr)) is not None and q.is_enabled
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


def _stored_tensors(quantizer: CompressedWeightQuantizer) -> Callable[[], dict[str, torch.Tensor]]:
    return lambda: dict(quantizer.exported)


def _linear_tensors(
    name: str, module: nn.Module, fmt: str, weight_amax: torch.Tensor, input_amax: Optional[torch.Tensor], flavor: str
) -> Callable[[], dict[str, torch.Tensor]]:
    def compute() -> dict[str, torch.Tensor]:
        with loaded_weights(module):  # an offloaded weight, loaded as its accelerate hook loads it
            require_loaded(f"{name}.weight", module.weight)
            return export_linear_tensors(name, module, fmt, weight_amax, input_amax, flavor)

    return compute


def tied_weight_partners(model: nn.Module) -> dict[str, str]:
    """layer -> the other layer it shares its weight with (both directions): the ties transformers
    declares (`all_tied_weights_keys`, lm_head -> embed_tokens under tie_word_embeddings) and any
    weight Parameter that two distinct modules hold."""
    partners: dict[str, str] = {}
    for alias, canonical in (getattr(model, "all_tied_weights_keys", None) or {}).items():
        alias_layer, _, alias_attr = alias.rpartition(".")
        canonical_layer, _, canonical_attr = canonical.rpartition(".")
        if alias_attr == canonical_attr == "weight" and alias_layer != canonical_layer:
            partners[alias_layer], partners[canonical_layer] = canonical_layer, alias_layer
    holders: dict[int, tuple[str, nn.Module]] = {}
    for name, module in model.named_modules(remove_duplicate=False):
        weight = module._parameters.get("weight")
        if weight is None:
            continue
        first_name, first_module = holders.setdefault(id(weight), (name, module))
        if first_module is not module and name not in partners:
            partners[name] = first_name
            partners.setdefault(first_name, name)
    return partners


def quantized_tied_weights(model: nn.Module) -> dict[str, str]:
    """layer -> tie partner, for each layer whose weight quantizer is enabled although its weight is
    tied to another layer's (tied_weight_partners)."""
    modules = dict(model.named_modules(remove_duplicate=False))
    found = {}
    for layer, partner in tied_weight_partners(model).items():
        quantizer = child_quantizer(modules[layer], "weight_quantizer") if layer in modules else None
        if quantizer is not None and quantizer.is_enabled:
            found[layer] = partner
    return found


def tied_weight_problem(layer: str, partner: str) -> str:
    """Why a quantized tied weight cannot be exported, in words (the start of an error message)."""
    return (
        f"{layer} shares its weight with {partner} (tied, e.g. tie_word_embeddings=True), and its weight "
        "quantizer is enabled. refquant does not export a quantized tied weight: the checkpoint holds a tied "
        "weight once, for both layers (modelopt 0.47 writes the quantized copy next to the plain one and "
        "keeps the tie in config.json; runtimes that honour the tie, rq.load_checkpoint included, then use "
        "one copy for both layers, so what was calibrated is not what runs)"
    )


def _check_tied_weights(model: nn.Module) -> None:
    found = quantized_tied_weights(model)
    if found:
        layer, partner = next(iter(found.items()))
        raise ValueError(
            f"{tied_weight_problem(layer, partner)}. Switch {layer}.weight_quantizer off (a recipe rule "
            f"{{ quantizer_name = \"*{layer.rpartition('.')[2]}*\", enable = false }} at the end; the shipped "
            "recipes keep lm_head unquantized) and quantize again."
        )


def kv_scale_quantizers(model: nn.Module) -> dict[str, TensorQuantizer]:
    """checkpoint key (`...self_attn.k_proj.k_scale`, `...v_proj.v_scale`) -> the K or V quantizer
    whose scale the checkpoint holds: each enabled one that does not use the constant amax (the
    "cast" KV modes write no scale). The export refuses one without a calibrated amax
    (uncalibrated_scale_quantizers), so every key here gets its quantizer's amax / 448."""
    found = {}
    for name, module in model.named_modules():
        for attr, suffix in KV_QUANTIZERS.items():
            quantizer = child_quantizer(module, attr)
            if quantizer is not None and quantizer.is_enabled and not quantizer.config.use_constant_amax:
                found[f"{name}.{suffix}" if name else suffix] = quantizer
    return found


def uncalibrated_scale_quantizers(model: nn.Module, layers) -> list[str]:
    """Quantizers whose scale the checkpoint's config promises but which hold no amax: the input
    quantizer of each quantized layer in `layers` (a static input_scale) and K/V (k_scale, v_scale,
    kv_scale_quantizers), each enabled, not constant, without a calibrated amax. Calibration did not
    finish, or its data never reached them; a checkpoint would lack the scale and a runtime use a
    default (or fail)."""
    modules = dict(model.named_modules())
    missing = []
    for name in layers:
        input_q = child_quantizer(modules[name], "input_quantizer")
        if input_q is not None and input_q.is_enabled and input_q.amax is None:
            missing.append(f"{name}.input_quantizer")
    quantizer_names = {quantizer: name for name, quantizer in named_quantizers(model)}
    missing += [quantizer_names[q] for q in kv_scale_quantizers(model).values() if q.amax is None]
    return missing


def _check_scales_calibrated(model: nn.Module, linears: dict[str, "LinearExport"]) -> None:
    missing = uncalibrated_scale_quantizers(model, linears)
    if missing:
        raise ValueError(
            f"{missing[0]} (and {len(missing) - 1} more) is enabled but holds no calibrated amax, so the "
            "checkpoint would lack the scale its config promises: calibration did not finish (or its data "
            "never reached these layers). Run rq.quantize_model(model, recipe, calib_batches) to the end, "
            "with at least one batch, before exporting."
        )


def plan_export(model: nn.Module) -> ExportPlan:
    """Compute every tensor and config entry the checkpoint of `model` holds; the model is unchanged."""
    quantizers = dict(named_quantizers(model))
    refuse_folded(quantizers.items(), "export or compress the weights")
    if not any(q.is_enabled for q in quantizers.values()):
        raise ValueError(
            f"{type(model).__name__} has no enabled quantizer, so there is nothing to export as a "
            "quantized checkpoint. Quantize it first: rq.quantize_model(model, recipe, calib_batches)."
        )
    for name, quantizer in quantizers.items():
        if quantizer.is_calibrating:
            raise ValueError(f"{name} is still calibrating; finish calibration before exporting.")
        bad = bad_amax_values(quantizer.amax) if quantizer.is_enabled and quantizer.is_calibrated else []
        if bad:  # written in place on a GPU, where calls do not read it back (refquant.quant.quantizer)
            raise ValueError(
                f"{name} holds the amax {bad} ({quantizer.amax.dtype}); an amax must be finite and >= 0, "
                "and modelopt's export would write it as a default scale. Recalibrate, or store a valid "
                "one with set_amax()."
            )
    _check_tied_weights(model)
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
        weight_amax[name] = required_amax(f"{name}.weight_quantizer", module.weight_quantizer)
        input_q = child_quantizer(module, "input_quantizer")
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
            compute = _stored_tensors(module.weight_quantizer)
        else:
            compute = _linear_tensors(name, module, formats[name], weight_amax[name], input_amax[name], flavor)
        linears[name] = LinearExport(name, formats[name], weight_amax[name], input_amax[name], compute)
    _check_scales_calibrated(model, linears)

    kv_scales = {key: fp8_scale(quantizer.amax, flavor) for key, quantizer in kv_scale_quantizers(model).items()}

    hf_quant_config = {
        "producer": {"name": "modelopt", "version": MODELOPT_FORMAT_VERSION},
        "quantization": {"quant_algo": None, "kv_cache_quant_algo": None},
    }
    from .experts import config_layers, model_checkpoint_names, plan_experts
    from .names import renamed_quant_config

    experts = plan_experts(model, flavor)
    hf_quant_config["quantization"].update(layer_quant_config(config_layers(model, formats, experts)))
    kv_algo = _kv_cache_algo(model)
    if kv_algo is not None:
        hf_quant_config["quantization"]["kv_cache_quant_algo"] = kv_algo
    names = model_checkpoint_names(model, experts)
    hf_quant_config = renamed_quant_config(hf_quant_config, names)
    return ExportPlan(linears, kv_scales, fused_groups, hf_quant_config, flavor, backend, quantizers, experts, names)
