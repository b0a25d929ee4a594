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

import torch

NVFP4_MODELOPT = ("weight", "weight_scale", "weight_scale_2", "input_scale")


def _fp32_bits(t: torch.Tensor) -> int:
    return int(t.reshape(1).view(torch.int32)[0]) & 0xFFFFFFFF


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
    if exact and _fp32_bits(1.0 / inverse) != _fp32_bits(value):
        raise ValueError(
            f"{name} = {float(value)!r} (fp32 0x{_fp32_bits(value):08X}) has no exact fp32 reciprocal: "
            f"1 / fl(1 / s) = {float(1.0 / inverse)!r}, so the other format's 1 / x convention cannot hold "
            "this scale. Pass exact=False to write fl(1 / s) (the scale a runtime rebuilds moves by one ulp)."
        )
    return inverse


def modelopt_to_compressed_tensors(tensors: dict[str, torch.Tensor], *, exact: bool = True) -> dict[str, torch.Tensor]:
    """modelopt HF checkpoint tensors -> compressed-tensors' (the table in the module docstring)."""
    out = dict(tensors)
    for prefix in _prefixes(tensors, "weight_scale_2"):
        out[f"{prefix}.weight_packed"] = _require(out, f"{prefix}.weight", torch.uint8).clone()
        del out[f"{prefix}.weight"]
        _require(out, f"{prefix}.weight_scale", torch.float8_e4m3fn)
        out[f"{prefix}.weight_global_scale"] = reciprocal_scale(out.pop(f"{prefix}.weight_scale_2"),
                                                                f"{prefix}.weight_scale_2", exact).reshape(1)
        if f"{prefix}.input_scale" in out:
            out[f"{prefix}.input_global_scale"] = reciprocal_scale(out.pop(f"{prefix}.input_scale"),
                                                                   f"{prefix}.input_scale", exact).reshape(1)
    for prefix in _fp8_prefixes(out):
        for suffix in ("weight_scale", "input_scale"):
            if f"{prefix}.{suffix}" in out:
                out[f"{prefix}.{suffix}"] = _one_fp32(out[f"{prefix}.{suffix}"], f"{prefix}.{suffix}").reshape(1)
    return out


def compressed_tensors_to_modelopt(tensors: dict[str, torch.Tensor], *, exact: bool = True) -> dict[str, torch.Tensor]:
    """compressed-tensors checkpoint tensors -> modelopt's (the table in the module docstring)."""
    out = dict(tensors)
    for prefix in _prefixes(tensors, "weight_global_scale"):
        out[f"{prefix}.weight"] = _require(out, f"{prefix}.weight_packed", torch.uint8).clone()
        del out[f"{prefix}.weight_packed"]
        _require(out, f"{prefix}.weight_scale", torch.float8_e4m3fn)
        out[f"{prefix}.weight_scale_2"] = reciprocal_scale(out.pop(f"{prefix}.weight_global_scale"),
                                                           f"{prefix}.weight_global_scale", exact).reshape(())
        if f"{prefix}.input_global_scale" in out:
            out[f"{prefix}.input_scale"] = reciprocal_scale(out.pop(f"{prefix}.input_global_scale"),
                                                            f"{prefix}.input_global_scale", exact).reshape(())
    for prefix in _fp8_prefixes(out):
        for suffix in ("weight_scale", "input_scale"):
            if f"{prefix}.{suffix}" in out:
                out[f"{prefix}.{suffix}"] = _one_fp32(out[f"{prefix}.{suffix}"], f"{prefix}.{suffix}").reshape(())
    return out


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
    if scale.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise ValueError(f"{name} has dtype {scale.dtype}; an FP8 scale is fp32, bf16 or fp16.")
    return scale.float()
