"""The checkpoint tensors of quantized MoE experts, as modelopt 0.47's export writes them
(modelopt/torch/export/moe_utils.py `_export_fused_experts`, hf_export_handlers.py
`_export_bmm_experts`, unified_export_hf.py `_export_quantized_weight`), and the experts a
compressed model holds.

Fused experts (Qwen2/3-MoE, Mixtral, OLMoE, DeepSeek-V3, ...): every expert is written as its own
linears, `{experts}.{i}.gate_proj`, `.up_proj`, `.down_proj` (non-gated: `.up_proj`, `.down_proj`),
each exported as a linear of its format is (refquant.hf.export.tensors.export_linear_tensors):
  weight amax  the expert's weight quantizer's; gate and up both take the one of their fused
               gate_up slice (one weight_scale / weight_scale_2 for the pair, as engines fuse them).
               An expert weight quantizer without an amax, or with an amax of 0, takes the max |w|
               of its slice in fp32 (for gate/up: of the fused slice), as modelopt's fallback.
  input scale  the projection's shared input quantizer's, the same for every expert; none when it
               was never calibrated (no calibration token reached any expert of the layer).
They are written also when the experts are not quantized (bf16 slices, as modelopt splits them).
An expert no calibration token reached still gets every scale: its weight amax comes from the
weight-only calibration pass, its input scale from the shared input quantizer.

gpt-oss (transposed): the 3-D weights keep their names; each is quantized whole with the
projection's one amax, transposed to (E, out, in) so NVFP4's blocks run along `in`, and written
transposed back ((E, in/2, out) packed bytes, (E, in/16, out) block scales); scales are
`{proj}_weight_scale`, `{proj}_weight_scale_2`, `{proj}_input_scale`. FP8 divides the 3-D weight
by its scale as modelopt's `weight / scale.unsqueeze(-1)`, whose fp32 quotient is rounded once.
"""

from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Callable, Iterator, Optional

import torch
from torch import nn

from ...numerics.fp8 import fp8_quantize
from ...numerics.nvfp4 import nvfp4_quantize
from ...quant.quantizer import TensorQuantizer
from ..dispatch import loaded_weights, require_loaded
from ..experts import ExpertsLayout, is_quant_experts
from .configs import LAYER_QUANT_ALGO
from .names import CheckpointNames, checkpoint_names
from .plan import CompressedWeightQuantizer, layer_format, required_amax
from .tensors import dequantize_linear_weight, export_input_scale, export_linear_tensors, fp8_weight_scale
from .validate import checked_tensors, expected_layer_tensors


@dataclass
class ProjectionExport:
    """One exported linear of an expert (fused), or one exported 3-D weight (gpt-oss).

    key:        the module-relative prefix of its tensors: "3.gate_proj" (fused) or "gate_up_proj"
    parameter:  the module's 3-D parameter it is read from ("gate_up_proj", "up_proj", "down_proj")
    index:      fused: the expert whose slice of `parameter` it is; None: all of it (gpt-oss)
    rows:       fused: its rows of that slice (gate or up of a fused gate_up); all rows otherwise
    layer_format: None: written unquantized
    """

    key: str
    parameter: str
    index: Optional[int]
    rows: slice
    layer_format: Optional[str]
    weight_amax: Optional[torch.Tensor]
    input_amax: Optional[torch.Tensor]
    weight_quantizer: TensorQuantizer = field(repr=False)
    input_quantizer: TensorQuantizer = field(repr=False)

    def part_of(self, parameter: torch.Tensor) -> torch.Tensor:
        """Its part of the 3-D `parameter` (a view): expert `index`'s `rows`, or all of it."""
        return parameter if self.index is None else parameter[self.index][self.rows]


@dataclass
class ExpertsExport:
    """One experts module as the checkpoint holds it.

    parameters: the module's 3-D parameters whose checkpoint tensors these are.
    stream(): (module-relative checkpoint key, tensor), computed one expert's part (gpt-oss: one
    projection) at a time as they are asked for, on the module's device: a consumer that moves
    each away as it comes holds one part's tensors, not the layer's experts'. tensors(): all of
    them as one dict. Neither is kept.
    """

    name: str
    layout: ExpertsLayout
    layer_format: Optional[str]
    projections: list[ProjectionExport] = field(repr=False)
    stream: Callable[[], Iterator[tuple[str, torch.Tensor]]] = field(repr=False)

    @property
    def parameters(self) -> tuple[str, ...]:
        return self.layout.projections

    def tensors(self) -> dict[str, torch.Tensor]:
        return dict(self.stream())


def _view(weight: Optional[torch.Tensor], weight_quantizer: TensorQuantizer, input_quantizer: TensorQuantizer):
    """What export_linear_tensors and layer_format read of a linear: its weight and quantizers
    (modelopt's export wraps each expert projection in such a module too)."""
    return SimpleNamespace(weight=weight, weight_quantizer=weight_quantizer, input_quantizer=input_quantizer)


def experts_format(name: str, module: nn.Module) -> Optional[str]:
    """modelopt's get_quantization_format of an experts module: its projections' format (the
    representative quantizer of each is expert 0's); ValueError when they differ."""
    formats = {}
    for projection in module._refquant_layout.projections:
        input_q, weight_q = module.projection_quantizers(projection)
        representative = weight_q[0] if isinstance(weight_q, nn.ModuleList) else weight_q
        formats[projection] = layer_format(f"{name}.{projection}", _view(None, representative, input_q))
    distinct = {fmt for fmt in formats.values() if fmt is not None}
    if len(distinct) > 1 or (distinct and None in formats.values()):
        raise ValueError(
            f"{name}: its projections are quantized differently ({formats}); modelopt's checkpoint "
            "gives an experts module one format. Quantize gate_up_proj and down_proj alike."
        )
    return distinct.pop() if distinct else None


def _takes_weight_fallback(quantizer: TensorQuantizer) -> bool:
    """Whether the export takes this enabled expert weight quantizer's amax from the weight
    (modelopt's fallback for an uncalibrated expert): it has no amax, or an amax of 0."""
    amax = quantizer.amax
    return quantizer.is_enabled and (amax is None or bool((amax == 0).all()))


def _weight_amax_or_fallback(quantizer: TensorQuantizer, weight: torch.Tensor, name: str) -> Optional[torch.Tensor]:
    """The amax the export uses for an expert's weight: the quantizer's, or where it has none or
    0, max |w| of `weight` (named `name` in errors) in fp32 (modelopt's fallback for an
    uncalibrated expert)."""
    if not quantizer.is_enabled:
        return None
    if _takes_weight_fallback(quantizer):
        return require_loaded(name, weight).detach().abs().amax().to(torch.float32)
    return quantizer.amax


def _input_amax(quantizer: TensorQuantizer) -> Optional[torch.Tensor]:
    return quantizer.amax if quantizer.is_enabled else None


def _fused_parts(module: nn.Module, index: int) -> list[tuple[str, str, slice]]:
    """(part name, projection, rows of that projection's slice) of expert `index`, in modelopt's order."""
    layout = module._refquant_layout
    if not layout.gated:
        return [("up_proj", layout.first_proj, slice(None)), ("down_proj", "down_proj", slice(None))]
    rows = getattr(module, layout.first_proj).shape[1] // 2
    intermediate = getattr(module, "intermediate_dim", None) or getattr(module, "intermediate_size", None) or rows
    return [("gate_proj", layout.first_proj, slice(0, intermediate)),
            ("up_proj", layout.first_proj, slice(intermediate, None)),
            ("down_proj", "down_proj", slice(None))]


def _plan_fused(name: str, module: nn.Module, fmt: Optional[str], flavor: str) -> ExpertsExport:
    layout = module._refquant_layout
    projections: list[ProjectionExport] = []
    weight_quantizers = [q for projection in layout.projections for q in module.projection_quantizers(projection)[1]]
    # a fallback amax reads its weight: offloaded weights are loaded as the module's hook loads them
    reads_weights = any(_takes_weight_fallback(q) for q in weight_quantizers)
    with loaded_weights(module) if reads_weights else nullcontext():
        for index in range(module.num_experts):
            first_fallback = None
            for part, projection, rows in _fused_parts(module, index):
                input_q, weight_qs = module.projection_quantizers(projection)
                weight_q = weight_qs[index]
                weight = getattr(module, projection)[index]
                part_format = layer_format(f"{name}.{index}.{part}", _view(None, weight_q, input_q))
                weight_amax = input_amax = None
                if part_format is not None:
                    if projection == layout.first_proj and layout.gated:
                        # gate and up share the fused slice's amax (and its fallback)
                        if first_fallback is None:
                            first_fallback = _weight_amax_or_fallback(weight_q, weight, f"{name}.{projection}")
                        weight_amax = first_fallback
                    else:
                        weight_amax = _weight_amax_or_fallback(weight_q, weight, f"{name}.{projection}")
                    input_amax = _input_amax(input_q)
                projections.append(ProjectionExport(
                    f"{index}.{part}", projection, index, rows, part_format, weight_amax, input_amax,
                    weight_quantizer=weight_q, input_quantizer=input_q))

    def stream() -> Iterator[tuple[str, torch.Tensor]]:
        with loaded_weights(module):
            for export in projections:
                weight_q = export.weight_quantizer
                if isinstance(weight_q, CompressedWeightQuantizer):
                    # its tensors are the expert's (gate and up share one quantizer): this part's
                    part = export.key.removeprefix(f"{export.index}.")
                    yield from ((f"{export.index}.{k}", v) for k, v in weight_q.exported.items() if k.startswith(part + "."))
                    continue
                parameter = require_loaded(f"{name}.{export.parameter}", getattr(module, export.parameter))
                weight = export.part_of(parameter).detach()
                if export.layer_format is None:
                    yield f"{export.key}.weight", weight
                    continue
                tensors = export_linear_tensors(f"{name}.{export.key}", _view(weight, weight_q, export.input_quantizer),
                                                export.layer_format, export.weight_amax, export.input_amax, flavor)
                yield from ((f"{export.key}.{suffix}", tensor) for suffix, tensor in tensors.items())

    return ExpertsExport(name, layout, fmt, projections, stream)


def _plan_transposed(name: str, module: nn.Module, fmt: Optional[str], flavor: str) -> ExpertsExport:
    layout = module._refquant_layout
    projections = []
    for projection in layout.projections:
        input_q, weight_q = module.projection_quantizers(projection)
        weight_amax = input_amax = None
        if fmt is not None:
            weight_amax = (weight_q.amax if isinstance(weight_q, CompressedWeightQuantizer)
                           else required_amax(f"{name}.{projection}_weight_quantizer", weight_q))
            input_amax = _input_amax(input_q)
        projections.append(ProjectionExport(
            projection, projection, None, slice(None), fmt, weight_amax, input_amax,
            weight_quantizer=weight_q, input_quantizer=input_q))

    def stream() -> Iterator[tuple[str, torch.Tensor]]:
        with loaded_weights(module):
            for export in projections:
                weight = require_loaded(f"{name}.{export.key}", getattr(module, export.key)).detach()
                if export.layer_format is None:
                    yield export.key, weight
                elif isinstance(export.weight_quantizer, CompressedWeightQuantizer):
                    yield from export.weight_quantizer.exported.items()
                else:
                    yield from _transposed_tensors(export, weight, flavor).items()

    return ExpertsExport(name, layout, fmt, projections, stream)


def _transposed_tensors(export: ProjectionExport, weight: torch.Tensor, flavor: str) -> dict:
    """A gpt-oss projection's tensors: its (E, in, out) weight quantized with one amax."""
    key = export.key
    tensors: dict[str, torch.Tensor] = {}
    if export.layer_format == "fp8":
        scale = fp8_weight_scale(export.weight_amax, flavor)
        # modelopt divides the 3-D weight by scale.unsqueeze(-1): a dimensioned fp32 divisor, so
        # the quotient stays fp32 (one rounding), unlike a 2-D weight's bf16 quotient
        tensors[key] = fp8_quantize(weight, scale=scale.reshape(1), flavor=flavor).data
        tensors[f"{key}_weight_scale"] = scale
    else:
        quantized = nvfp4_quantize(weight.transpose(-1, -2), amax=export.weight_amax.reshape(()), flavor=flavor)
        tensors[key] = quantized.packed.transpose(-1, -2)
        tensors[f"{key}_weight_scale"] = quantized.block_scale.transpose(-1, -2)
        tensors[f"{key}_weight_scale_2"] = quantized.global_scale.reshape(())
    input_scale = export_input_scale(export.layer_format, export.input_quantizer, export.input_amax, flavor)
    if input_scale is not None:
        tensors[f"{key}_input_scale"] = input_scale
    return tensors


def plan_experts(model: nn.Module, flavor: str) -> dict[str, ExpertsExport]:
    """Every quantized-experts module of `model` (refquant.hf.experts), planned for export."""
    plans = {}
    for name, module in model.named_modules():
        if not is_quant_experts(module):
            continue
        fmt = experts_format(name, module)
        plan = _plan_transposed if module._refquant_layout.kind == "transposed" else _plan_fused
        plans[name] = plan(name, module, fmt, flavor)
    return plans


def model_checkpoint_names(model: nn.Module, experts: dict[str, ExpertsExport]) -> CheckpointNames:
    """checkpoint_names of `model`, whose fused experts (planned as `experts`) the export writes
    expert by expert, so their 3-D parameters are not in the checkpoint under their own names."""
    return checkpoint_names(model, {f"{name}.{p}" for name, e in experts.items() if e.layout.kind == "fused" for p in e.parameters})


# --- compressed experts (compress_weights, load_checkpoint) ------------------------------------
LINEAR_SUFFIXES = ("weight", "weight_scale", "weight_scale_2", "input_scale")  # an expert's linear's tensors


def dequantized_experts(export: ExpertsExport, tensors: dict[str, torch.Tensor], module: nn.Module) -> dict[str, torch.Tensor]:
    """Each 3-D parameter of the experts module as the checkpoint `tensors` (module-relative keys)
    hold it: quantized projections dequantized (refquant.hf.export.tensors.dequantize_linear_weight)."""
    weights = {p: getattr(module, p).detach().clone() for p in export.parameters}
    for projection in export.projections:
        if export.layout.kind == "transposed":
            if projection.layer_format is None:
                weights[projection.key] = tensors[projection.key].to(weights[projection.key].dtype)
                continue
            stored = {"weight": tensors[projection.key], "weight_scale": tensors[f"{projection.key}_weight_scale"]}
            if projection.layer_format != "fp8":
                stored = {"weight": stored["weight"].transpose(-1, -2), "weight_scale": stored["weight_scale"].transpose(-1, -2),
                          "weight_scale_2": tensors[f"{projection.key}_weight_scale_2"]}
            target = weights[projection.key]
            shape = target.shape if projection.layer_format == "fp8" else target.transpose(-1, -2).shape
            value = dequantize_linear_weight(projection.layer_format, stored, shape, target.dtype)
            weights[projection.key] = value if projection.layer_format == "fp8" else value.transpose(-1, -2)
            continue
        target = projection.part_of(weights[projection.parameter])
        stored = {suffix: tensors[f"{projection.key}.{suffix}"] for suffix in LINEAR_SUFFIXES if f"{projection.key}.{suffix}" in tensors}
        if projection.layer_format is None:
            target.copy_(stored["weight"])
        else:
            target.copy_(dequantize_linear_weight(projection.layer_format, stored, target.shape, target.dtype))
    return weights


def compress_experts(module: nn.Module, export: ExpertsExport, tensors: dict[str, torch.Tensor]) -> None:
    """Give the experts module, in place, what its checkpoint `tensors` hold: each 3-D parameter
    the dequantized weights, each weight quantizer of a quantized projection a
    CompressedWeightQuantizer holding its own tensors (module-relative keys as exported)."""
    weights = dequantized_experts(export, tensors, module)
    with torch.no_grad():
        for parameter, value in weights.items():
            getattr(module, parameter).copy_(value.to(getattr(module, parameter).device))
    if export.layout.kind == "transposed":
        for projection in export.layout.projections:
            _, quantizer = module.projection_quantizers(projection)
            if export.layer_format is not None and not isinstance(quantizer, CompressedWeightQuantizer):
                own = {k: v for k, v in tensors.items() if k == projection or k.startswith(f"{projection}_")}
                setattr(module, f"{projection}_weight_quantizer", CompressedWeightQuantizer(quantizer, export.layer_format, own))
        return
    # an expert's weight quantizer holds the tensors of its parts (gate and up share one), keyed
    # without the expert's index; its format is its first part's
    parts: dict[tuple[str, int], list[ProjectionExport]] = {}
    for projection in export.projections:
        parts.setdefault((projection.parameter, projection.index), []).append(projection)
    for (parameter, index), own_parts in parts.items():
        quantizers = module.projection_quantizers(parameter)[1]
        quantizer = quantizers[index]
        if not quantizer.is_enabled or isinstance(quantizer, CompressedWeightQuantizer):
            continue
        own = {f"{part.key.removeprefix(f'{index}.')}.{suffix}": tensors[f"{part.key}.{suffix}"]
               for part in own_parts for suffix in LINEAR_SUFFIXES if f"{part.key}.{suffix}" in tensors}
        quantizers[index] = CompressedWeightQuantizer(quantizer, own_parts[0].layer_format, own)


def expected_experts_tensors(export: ExpertsExport, module: nn.Module) -> dict[str, tuple[Optional[torch.dtype], tuple[int, ...], bool]]:
    """module-relative key -> (dtype, shape, is a scale) of every tensor the export writes for one
    experts module, its quantizers restored (refquant.hf.export.validate.expected_layer_tensors for
    each expert's linear). An unquantized projection's weight has dtype None: like the model's other
    plain tensors it is cast to the parameter's dtype on load."""
    expected: dict[str, tuple[Optional[torch.dtype], tuple[int, ...], bool]] = {}
    for projection in export.projections:
        weight = projection.part_of(getattr(module, projection.parameter))
        quantizers = (projection.weight_quantizer, projection.input_quantizer)
        if export.layout.kind == "transposed":
            if projection.layer_format is None:
                expected[projection.key] = (None, tuple(weight.shape), False)
                continue
            # quantized as (E, out, in) and written transposed back (NVFP4); FP8 keeps (E, in, out)
            transposed = projection.layer_format != "fp8"
            view = _view(weight.transpose(-1, -2) if transposed else weight, *quantizers)
            for suffix, (dtype, shape) in expected_layer_tensors(projection.layer_format, view).items():
                if transposed and len(shape) == 3:
                    shape = (*shape[:-2], shape[-1], shape[-2])
                key = projection.key if suffix == "weight" else f"{projection.key}_{suffix}"
                expected[key] = (dtype, tuple(shape), suffix != "weight")
            continue
        if projection.layer_format is None:
            expected[f"{projection.key}.weight"] = (None, tuple(weight.shape), False)
            continue
        view = _view(weight, *quantizers)
        for suffix, (dtype, shape) in expected_layer_tensors(projection.layer_format, view).items():
            expected[f"{projection.key}.{suffix}"] = (dtype, tuple(shape), suffix != "weight")
    return expected


def checkpoint_experts_tensors(export: ExpertsExport, module: nn.Module, tensors: dict[str, torch.Tensor],
                               rename: Callable[[str], str], file_of: Callable[[str], Path], used: set[str]) -> dict[str, torch.Tensor]:
    """The module-relative tensors of one experts module read from a checkpoint's `tensors` (keys
    as written: in-memory names through `rename`), each checked as a dense layer's are
    (refquant.hf.export.validate.checked_tensors): present, of its dtype and shape, finite (scales
    not negative); ValueError naming the file (`file_of` the key) and the tensor otherwise. The keys
    read are added to `used`."""
    kind = LAYER_QUANT_ALGO[export.layer_format] if export.layer_format else "unquantized"
    expected = {relative: (rename(f"{export.name}.{relative}"), dtype, shape, scale)
                for relative, (dtype, shape, scale) in expected_experts_tensors(export, module).items()}
    return checked_tensors(tensors, expected, file_of, used,
                           f"missing: the checkpoint of a {kind} experts module holds it for every expert")


# --- the layers hf_quant_config lists ----------------------------------------------------------
ROUTER_ATTRIBUTES = ("gate", "router", "shared_expert_gate")


def config_layers(model: nn.Module, formats: dict[str, Optional[str]], experts: dict[str, ExpertsExport]) -> dict[str, Optional[str]]:
    """The layers modelopt's get_quant_config lists, in module order, with their formats (None:
    unquantized, into exclude_modules): the linears and embeddings of `formats`, each experts
    module, then every MoE router left in original precision (modelopt's
    _get_unquantized_moe_router_names: a `gate` / `router` / `shared_expert_gate` child with a
    `weight` of a module that has `experts`; transformers 5's routers are no nn.Linear and get no
    quantizer, yet their bf16 weight is in the checkpoint)."""
    layers: dict[str, Optional[str]] = {}
    for name, _ in model.named_modules():
        if name in formats:
            layers[name] = formats[name]
        elif name in experts:
            layers[name] = experts[name].layer_format
    for name, module in model.named_modules():
        if not hasattr(module, "experts"):
            continue
        for attribute in ROUTER_ATTRIBUTES:
            router = getattr(module, attribute, None)
            if isinstance(router, nn.Module) and isinstance(getattr(router, "weight", None), torch.Tensor):
                layers.setdefault(f"{name}.{attribute}" if name else attribute, None)
    return layers
