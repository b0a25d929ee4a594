"""Convert checkpoint tensors between modelopt's and compressed-tensors' NVFP4 and FP8 formats.

    ct_tensors = modelopt_to_compressed_tensors(modelopt_tensors)     # {name: tensor} -> {name: tensor}
    modelopt_tensors = compressed_tensors_to_modelopt(ct_tensors)

Per quantized linear `P` (names as the two formats write them; compressed-tensors 0.19 / 0.20's
NVFP4PackedCompressor and its own modelopt converter,
compressed_tensors/entrypoints/convert/converters/modelopt_nvfp4.py):

  NVFP4     modelopt                          compressed-tensors
            P.weight          uint8 [o, i/2]  P.weight_packed       same bytes (both: even element low)
            P.weight_scale    E4M3 [o, i/16]  P.weight_scale        same bytes
            P.weight_scale_2  fp32 0-d  s     P.weight_global_scale fp32 [1]  G with fl(1 / G) == s
            P.input_scale     fp32 0-d  s     P.input_global_scale  fp32 [1]  G with fl(1 / G) == s
  FP8       P.weight          E4M3            P.weight              same bytes
            P.weight_scale    fp32 0-d        P.weight_scale        fp32 [1] (amax / 448 in both)
            P.input_scale     fp32 0-d        P.input_scale         fp32 [1]

modelopt stores decode scales (amax / 2688), compressed-tensors the encode scale (2688 / amax), and
a runtime reading compressed-tensors takes 1 / G back. So G is written as fl(1 / s), and kept only
when fl(1 / G) gives s's bits again: then either checkpoint gives the runtime the same scale, and
converting back gives the same bytes. About one fp32 scale in six has no such G (no fp32 reciprocal
maps back onto it); those raise ValueError unless `exact=False`, which writes fl(1 / s) anyway (the
runtime's scale then moves by an ulp). Other tensors (unquantized weights, K/V scales) pass through.
The config files (hf_quant_config.json, quantization_config) are not converted here.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ...numerics.formats import SUPPORTED_FLOAT_DTYPES, fp32_bits


@dataclass(frozen=True)
class CheckpointNames:
    """How one format names an NVFP4 layer's tensors (after the layer's prefix), and the shape it
    gives a per-tensor scale (NVFP4 global scales, FP8 weight and input scales). The block scale is
    `weight_scale` in both formats."""

    packed_weight: str
    weight_global_scale: str
    input_global_scale: str
    scale_shape: tuple[int, ...]


MODELOPT = CheckpointNames("weight", "weight_scale_2", "input_scale", ())
COMPRESSED_TENSORS = CheckpointNames("weight_packed", "weight_global_scale", "input_global_scale", (1,))


def reciprocal_scale(scale: torch.Tensor, name: str, exact: bool = True) -> torch.Tensor:
    """fp32 G = fl(1 / s) for a one-element fp32 scale s, checked to map back: fl(1 / G) == s in bits.

    Raises ValueError (naming `name`, the value and its bits) when s is not a finite positive fp32, or,
    with `exact`, when no fp32 G maps back onto s.
    """
    if scale.numel() != 1 or not scale.is_floating_point():
        raise ValueError(f"{name}: a global scale is one floating-point number; got shape {tuple(scale.shape)} {scale.dtype}.")
    value = scale.reshape(()).float()
    if not (torch.isfinite(value) and value > 0):
        raise ValueError(f"{name} = {float(value)!r}: a scale must be finite and > 0 to be inverted; fix the checkpoint.")
    inverse = 1.0 / value
    if exact and fp32_bits(float(1.0 / inverse)) != fp32_bits(float(value)):
        raise ValueError(
            f"{name} = {float(value)!r} (fp32 0x{fp32_bits(float(value)):08X}) has no exact fp32 reciprocal: "
            f"1 / fl(1 / s) = {float(1.0 / inverse)!r}, so the other format's 1 / x convention cannot hold "
            "this scale. Pass exact=False to write fl(1 / s) (the scale a runtime rebuilds moves by one ulp)."
        )
    return inverse


def modelopt_to_compressed_tensors(tensors: dict[str, torch.Tensor], *, exact: bool = True) -> dict[str, torch.Tensor]:
    """modelopt HF checkpoint tensors -> compressed-tensors' (the table in the module docstring)."""
    return convert_checkpoint_tensors(tensors, MODELOPT, COMPRESSED_TENSORS, exact=exact)


def compressed_tensors_to_modelopt(tensors: dict[str, torch.Tensor], *, exact: bool = True) -> dict[str, torch.Tensor]:
    """compressed-tensors checkpoint tensors -> modelopt's (the table in the module docstring)."""
    return convert_checkpoint_tensors(tensors, COMPRESSED_TENSORS, MODELOPT, exact=exact)


def convert_checkpoint_tensors(tensors: dict[str, torch.Tensor], source: CheckpointNames, target: CheckpointNames, *,
                               exact: bool = True) -> dict[str, torch.Tensor]:
    """A new dict: `tensors` with each NVFP4 layer's tensors renamed from `source`'s names to
    `target`'s (the packed weight and block scales are the same tensors) and its global scales
    inverted (reciprocal_scale), and every per-tensor scale reshaped to target's scale_shape. A
    layer is NVFP4 where `source`'s weight global scale is, FP8 where its weight is float8_e4m3fn."""
    out = dict(tensors)
    for prefix in _prefixes(tensors, source.weight_global_scale):
        out[f"{prefix}.{target.packed_weight}"] = _require(out, f"{prefix}.{source.packed_weight}", torch.uint8)
        del out[f"{prefix}.{source.packed_weight}"]
        _require(out, f"{prefix}.weight_scale", torch.float8_e4m3fn)
        out[f"{prefix}.{target.weight_global_scale}"] = _pop_inverse(out, f"{prefix}.{source.weight_global_scale}",
                                                                     target.scale_shape, exact)
        if f"{prefix}.{source.input_global_scale}" in out:
            out[f"{prefix}.{target.input_global_scale}"] = _pop_inverse(out, f"{prefix}.{source.input_global_scale}",
                                                                        target.scale_shape, exact)
    for prefix in _fp8_prefixes(out):
        for suffix in ("weight_scale", "input_scale"):
            name = f"{prefix}.{suffix}"
            if name in out:
                out[name] = _one_fp32(out[name], name).reshape(target.scale_shape)
    return out


def _pop_inverse(tensors: dict, name: str, shape: tuple[int, ...], exact: bool) -> torch.Tensor:
    """Remove the global scale `name` from `tensors` and return its reciprocal_scale, of `shape`."""
    return reciprocal_scale(tensors.pop(name), name, exact).reshape(shape)


def _prefixes(tensors: dict, suffix: str) -> list[str]:
    return sorted(name.removesuffix(f".{suffix}") for name in tensors if name.endswith(f".{suffix}"))


def _fp8_prefixes(tensors: dict) -> list[str]:
    return sorted(name.removesuffix(".weight") for name, t in tensors.items()
                  if name.endswith(".weight") and t.dtype == torch.float8_e4m3fn)


def _require(tensors: dict, name: str, dtype: torch.dtype) -> torch.Tensor:
    if name not in tensors:
        raise ValueError(f"{name} is missing: an NVFP4 layer holds packed codes, block scales and a global scale.")
    if tensors[name].dtype != dtype:
        raise ValueError(f"{name} has dtype {tensors[name].dtype}; NVFP4 stores it as {dtype}.")
    return tensors[name]


def _one_fp32(scale: torch.Tensor, name: str) -> torch.Tensor:
    """A per-tensor FP8 scale as fp32, widened exactly; per-channel scales have no per-tensor form."""
    if scale.numel() != 1:
        raise ValueError(f"{name} has shape {tuple(scale.shape)}: modelopt's FP8 checkpoints hold one scale per tensor; "
                         "a per-channel compressed-tensors scale has no modelopt FP8 form.")
    if scale.dtype not in SUPPORTED_FLOAT_DTYPES:
        raise ValueError(f"{name} has dtype {scale.dtype}; an FP8 scale is fp32, bf16 or fp16.")
    return scale.float()
